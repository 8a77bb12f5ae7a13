#!/usr/bin/env bash
# Runs each coverage-guided fuzz target in fuzz/ for a bounded time; exits 1 if any crashed.
#
#   bench/fuzz.sh [--seconds N] [--only config,keep_alive,proxy_header,forwarded,http1_body,http1_response,http1_request,http1_encode] [--merge]
#
# Targets: config (the config loader and `check` report), keep_alive (the backend's Keep-Alive
# header), proxy_header (the PROXY v1/v2 reader), forwarded (the forwarding-header policy),
# http1_body and http1_response (kaproxy::http1 against hyper's server and client: where a
# request or response body ends), http1_request (the requests kaproxy's own HTTP/1.1 loop takes
# against what hyper's server reads from the same bytes), http1_encode (a response as the own
# loop writes it against hyper's server writing the same one).
# Uses cargo-fuzz (libFuzzer) with `--sanitizer none`, which builds on the stable toolchain;
# installs cargo-fuzz with `cargo install` if it is missing. Each run starts from the committed
# seeds in fuzz/corpus/TARGET and writes what it finds to fuzz/target/corpus/TARGET (not
# committed). --merge then folds only the inputs that add coverage into fuzz/corpus/TARGET
# (libFuzzer -merge=1), to commit a grown but still minimal corpus. A crash leaves its input in
# fuzz/artifacts/TARGET/; replay it with
#   cd fuzz && cargo fuzz run --sanitizer none TARGET artifacts/TARGET/crash-...
set -euo pipefail

SECONDS_EACH=20
ONLY="config,keep_alive,proxy_header,forwarded,http1_body,http1_response,http1_request,http1_encode"
MERGE=0
HERE="$(cd "$(dirname "$0")" && pwd)"
ROOT="$(cd "$HERE/.." && pwd)"
FUZZ="$ROOT/fuzz"

usage() { sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'; }
while [ $# -gt 0 ]; do
    case "$1" in
        --seconds) SECONDS_EACH="${2:-}"; shift 2 ;;
        --only) ONLY="${2:-}"; shift 2 ;;
        --merge) MERGE=1; shift ;;
        -h|--help) usage; exit 0 ;;
        *) echo "unknown argument: $1" >&2; usage >&2; exit 2 ;;
    esac
done
[ "$SECONDS_EACH" -ge 1 ] 2>/dev/null || { echo "--seconds must be whole seconds >= 1" >&2; exit 2; }
IFS=, read -r -a TARGETS <<<"$ONLY"
for t in "${TARGETS[@]}"; do
    [ -f "$FUZZ/fuzz_targets/$t.rs" ] || { echo "no fuzz target $t (fuzz/fuzz_targets/$t.rs)" >&2; exit 2; }
done

command -v cargo >/dev/null || { echo "cargo not found on PATH" >&2; exit 1; }
if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "==> cargo-fuzz missing: cargo install --locked cargo-fuzz --version ^0.13"
    cargo install --locked cargo-fuzz --version "^0.13"
fi
echo "==> $(cargo fuzz --version), $(rustc --version)"

cd "$FUZZ"
# --sanitizer none: no -Zsanitizer, so no nightly; libFuzzer's coverage instrumentation
# (-Cpasses=sancov-module) and debug assertions are still on.
FLAGS=(--sanitizer none)
start=$(date +%s)
echo "==> cargo fuzz build ${FLAGS[*]} (${TARGETS[*]})"
for t in "${TARGETS[@]}"; do
    cargo fuzz build "${FLAGS[@]}" "$t"
done
echo "    built in $(( $(date +%s) - start )) s"

failed=()
mkdir -p target/fuzz-logs
for t in "${TARGETS[@]}"; do
    scratch="target/corpus/$t"
    log="target/fuzz-logs/$t.log"
    mkdir -p "$scratch" "corpus/$t" "artifacts/$t"
    seeds=$(find "corpus/$t" -type f | wc -l)
    echo "==> $t: ${SECONDS_EACH} s from $seeds seeds (fuzz/corpus/$t), new inputs to fuzz/$scratch"
    # -timeout: one input taking 10 s is a hang, reported like a crash.
    if cargo fuzz run "${FLAGS[@]}" "$t" "$scratch" "corpus/$t" -- \
        -max_total_time="$SECONDS_EACH" -timeout=10 -rss_limit_mb=2048 \
        -print_final_stats=1 >"$log" 2>&1; then
        runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n1)
        cov=$(grep -o 'cov: [0-9]*' "$log" | tail -n1)
        echo "    ok: ${runs:-?} runs, ${cov:-cov: ?}, corpus now $(find "$scratch" -type f | wc -l) new inputs"
    else
        failed+=("$t")
        echo "    FAILED: $t (full log: fuzz/$log; input in fuzz/artifacts/$t/)"
        grep -v '^#[0-9]' "$log" | tail -n 60 | sed 's/^/    | /'
    fi
    if [ "$MERGE" = 1 ]; then
        echo "    merging new coverage into fuzz/corpus/$t"
        cargo fuzz run "${FLAGS[@]}" "$t" "corpus/$t" "$scratch" -- -merge=1 >"$log.merge" 2>&1 ||
            { echo "    merge failed (fuzz/$log.merge)"; failed+=("$t-merge"); }
        echo "    fuzz/corpus/$t: $(find "corpus/$t" -type f | wc -l) files, $(du -sh "corpus/$t" | cut -f1)"
    fi
done

echo "==> fuzzed ${#TARGETS[@]} target(s) x ${SECONDS_EACH} s in $(( $(date +%s) - start )) s (build included)"
if [ ${#failed[@]} -gt 0 ]; then
    echo "==> FAILED: ${failed[*]}" >&2
    exit 1
fi
echo "==> no crashes"
