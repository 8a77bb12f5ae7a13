#!/usr/bin/env bash
# Counts kaproxy's heap allocations per request on the HTTP/1.1 keep-alive path with heaptrack.
#
#   bench/allocs.sh [--requests N] [--warmup N] [--connections C] [--access-log]
#                   [--label TEXT] [--out FILE] [--keep DIR] [--no-install]
#   KAPROXY_BIN=path/to/kaproxy bench/allocs.sh ...   counts another build, which must have been
#                                                     built with `--features system-alloc`
#
# kaproxy's binary allocates through mimalloc (#[global_allocator] in src/main.rs), which heaptrack
# does not see; this script builds it with `--features system-alloc` (glibc malloc) into its own
# target dir (CARGO_TARGET_DIR, default target/, plus /system-alloc). It runs kaproxy twice under
# heaptrack, each time: start, a warm-up of --warmup GETs, then either exactly --requests GETs
# (kaproxy-bench -n) or nothing for as long as those took, then SIGTERM by PID. Allocations per
# request = (allocation calls in the first run - calls in the second) / --requests; the same for
# bytes (the sizes asked of malloc/calloc/realloc/posix_memalign, from heaptrack's size histogram).
# What is subtracted: start-up, the warm-up, timers, shutdown. What is left besides the requests:
# accepting and closing the C client connections of the measured load (C of them, not per request).
#
# Setup: the backend is nginx serving a 77-byte file with keep-alive (as in compare.sh), in its
# own process: `kaproxy demo`'s backends (kaproxy-demo) would run inside the kaproxy process
# heaptrack watches, and close every connection after 100 requests as Apache does. kaproxy
# has one upstream, `[runtime] worker_threads = 1`, the pool and limits of compare.sh, and the
# access log OFF (the proxy's own work; --access-log turns it on, at log level info, as by
# default). Clients: kaproxy-bench, plain HTTP/1.1 keep-alive, C connections (default 16).
# Nothing is pinned: the counts do not depend on the core. Loopback only; every process the
# script starts is stopped by PID when it exits.
#
# Prints a table and a one-line result; --out FILE appends that line to FILE (for example
# bench/RESULTS.md, below its notes marker). --keep DIR keeps heaptrack's two data files there
# (`heaptrack_print -a -f FILE` lists the top allocation sites; `-f LOADED -d IDLE` the difference).
# --label names the build in the result line (default: the git revision, or KAPROXY_BIN).
set -euo pipefail

REQUESTS=20000
WARMUP=2000
CONNS=16
ACCESS_LOG=0
INSTALL=1
LABEL=""
OUT=""
KEEP=""
HERE="$(cd "$(dirname "$0")" && pwd)"
ROOT="$(cd "$HERE/.." && pwd)"

usage() { sed -n '2,/^set -euo/p' "$0" | sed -n 's/^# \{0,1\}//p'; }
while [ $# -gt 0 ]; do
    case "$1" in
        --requests) REQUESTS="$2"; shift 2 ;;
        --warmup) WARMUP="$2"; shift 2 ;;
        --connections) CONNS="$2"; shift 2 ;;
        --access-log) ACCESS_LOG=1; shift ;;
        --label) LABEL="$2"; shift 2 ;;
        --out) OUT="$2"; shift 2 ;;
        --keep) KEEP="$2"; shift 2 ;;
        --no-install) INSTALL=0; shift ;;
        -h|--help) usage; exit 0 ;;
        *) echo "unknown argument: $1" >&2; usage >&2; exit 2 ;;
    esac
done
for v in REQUESTS WARMUP CONNS; do
    [ "${!v}" -ge 1 ] 2>/dev/null || { echo "--$(echo "$v" | tr 'A-Z' 'a-z') must be a positive integer" >&2; exit 2; }
done
[ "$REQUESTS" -le 2000000 ] || { echo "--requests: at most 2000000" >&2; exit 2; }

# log, install_missing, stop_pid, forget_pid, ports_free, wait_port, dev_certificate,
# release_binaries: bench/lib.sh.
. "$HERE/lib.sh"

# ---- tools ----
need_pkgs=()
command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || need_pkgs+=(nginx)
command -v heaptrack >/dev/null || need_pkgs+=(heaptrack)
install_missing "${need_pkgs[@]}"
NGINX=$(command -v nginx || echo /usr/sbin/nginx)

ALLOC_TARGET="${CARGO_TARGET_DIR:-$ROOT/target}/system-alloc"
log "building kaproxy (--features system-alloc) and kaproxy-bench (release, into $ALLOC_TARGET)"
(cd "$ROOT" && CARGO_TARGET_DIR="$ALLOC_TARGET" \
    cargo build --release -q -p kaproxy -p kaproxy-bench --features kaproxy/system-alloc)
KAPROXY="${KAPROXY_BIN:-$ALLOC_TARGET/release/kaproxy}"
BENCH="$ALLOC_TARGET/release/kaproxy-bench"
if [ -z "$LABEL" ]; then
    if [ -n "${KAPROXY_BIN:-}" ]; then
        LABEL="$KAPROXY_BIN"
    else
        LABEL="kaproxy $(cd "$ROOT" && git rev-parse --short HEAD 2>/dev/null || echo unknown)"
        if [ "$(cd "$ROOT" && git status --porcelain -- src Cargo.toml 2>/dev/null | wc -l)" -gt 0 ]; then
            LABEL="$LABEL (with uncommitted changes in src/)"
        fi
    fi
fi

# ---- processes (stopped by PID on exit) ----
WORK=$(mktemp -d /tmp/kaproxy-allocs.XXXXXX)
chmod 755 "$WORK"
PIDS=()
cleanup() {
    local pid
    # Newest first: kaproxy before the heaptrack script that waits for it.
    for ((i = ${#PIDS[@]} - 1; i >= 0; i--)); do stop_pid "${PIDS[$i]}" 100; done
    rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

BACKEND_PORT=18280
KAPROXY_PORT=18281
ports_free $BACKEND_PORT $KAPROXY_PORT

# ---- backend: nginx serving the same small file as compare.sh ----
mkdir -p "$WORK/www" "$WORK/backend"
printf 'hello from the static backend, a small response for the keep-alive benchmark\n' > "$WORK/www/small"
chmod -R a+rX "$WORK"
cat > "$WORK/backend/nginx.conf" <<EOF
user root;
worker_processes 1;
error_log $WORK/backend/error.log warn;
pid $WORK/backend/nginx.pid;
events { worker_connections 1024; }
http {
    access_log off;
    keepalive_timeout 75s;
    keepalive_requests 1000000;
    client_body_temp_path $WORK/backend/body;
    proxy_temp_path $WORK/backend/proxy;
    fastcgi_temp_path $WORK/backend/fastcgi;
    uwsgi_temp_path $WORK/backend/uwsgi;
    scgi_temp_path $WORK/backend/scgi;
    default_type application/octet-stream;
    server {
        listen 127.0.0.1:$BACKEND_PORT;
        root $WORK/www;
    }
}
EOF
"$NGINX" -p "$WORK/backend" -c "$WORK/backend/nginx.conf" -g 'daemon off;' >"$WORK/backend/stdout.log" 2>&1 &
PIDS+=($!)
wait_port $BACKEND_PORT 10

# ---- kaproxy: one upstream, one worker, compare.sh's pool ----
if [ "$ACCESS_LOG" = 1 ]; then LOG_LEVEL=info; ACCESS=true; else LOG_LEVEL=warn; ACCESS=false; fi
cat > "$WORK/kaproxy.toml" <<EOF
[listen]
http = "127.0.0.1:$KAPROXY_PORT"

[downstream]
idle_timeout = "75s"
max_requests_per_connection = 1000000

[upstreams.web]
servers = ["127.0.0.1:$BACKEND_PORT"]
keepalive_timeout = "75s"       # the backend nginx's keepalive_timeout
idle_timeout = "60s"
max_requests_per_connection = 1000000
max_idle_per_server = 256

[admin]
listen = ""

[runtime]
worker_threads = 1

[log]
level = "$LOG_LEVEL"
access_log = $ACCESS
EOF
"$KAPROXY" check --config "$WORK/kaproxy.toml" > "$WORK/check.log" 2>&1 || {
    echo "kaproxy check rejects the config:" >&2; cat "$WORK/check.log" >&2; exit 1; }

URL="http://127.0.0.1:$KAPROXY_PORT/small"
# Every load is bounded by its request count and by this time (a run cut short fails check_load).
LOAD_CAP=300s
LOAD_SECONDS=""

# Runs kaproxy under heaptrack: warm-up, then REQUESTS GETs (or a pause as long as they took),
# then SIGTERM. Sets RUN_CALLS and RUN_BYTES: allocation calls and bytes of the whole run.
# (Not in a subshell: PIDS and LOAD_SECONDS must reach the caller.)
heaptrack_run() {
    local label=$1 requests=$2
    unset RUST_LOG
    heaptrack -o "$WORK/ht.$label" "$KAPROXY" run --config "$WORK/kaproxy.toml" \
        >"$WORK/heaptrack.$label.log" 2>&1 &
    local ht=$!
    PIDS+=("$ht")
    # heaptrack is a shell script that runs kaproxy as its child.
    local kp=""
    for _ in $(seq 1 100); do
        kp=$(ps -o pid=,comm= --ppid "$ht" 2>/dev/null | awk '$2 == "kaproxy" { print $1 }' || true)
        [ -n "$kp" ] && break
        sleep 0.1
    done
    [ -n "$kp" ] || { echo "kaproxy did not start under heaptrack:" >&2; cat "$WORK/heaptrack.$label.log" >&2; exit 1; }
    PIDS+=("$kp")
    wait_port $KAPROXY_PORT 30 || { cat "$WORK/heaptrack.$label.log" >&2; exit 1; }

    "$BENCH" -c"$CONNS" -n"$WARMUP" -d"$LOAD_CAP" --timeout 10s --json "$URL" >"$WORK/warmup.$label.json" 2>/dev/null
    check_load "$WORK/warmup.$label.json" "$WARMUP"
    if [ "$requests" -gt 0 ]; then
        local t0 t1
        t0=$(date +%s.%N)
        "$BENCH" -c"$CONNS" -n"$requests" -d"$LOAD_CAP" --timeout 10s --json "$URL" >"$WORK/load.$label.json" 2>/dev/null
        t1=$(date +%s.%N)
        check_load "$WORK/load.$label.json" "$requests"
        LOAD_SECONDS=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.2f\n", b - a }')
        log "$label: $requests requests in $LOAD_SECONDS s under heaptrack"
    else
        log "$label: no requests, $LOAD_SECONDS s pause"
        sleep "$LOAD_SECONDS"
    fi

    stop_pid "$kp" 100; forget_pid "$kp"
    # heaptrack's script exits once its interpreter has written the data file.
    for _ in $(seq 1 600); do kill -0 "$ht" 2>/dev/null || break; sleep 0.1; done
    stop_pid "$ht" 100; forget_pid "$ht"
    local data
    data=$(ls "$WORK/ht.$label".* 2>/dev/null | head -n 1)
    [ -n "$data" ] || { echo "heaptrack wrote no data:" >&2; cat "$WORK/heaptrack.$label.log" >&2; exit 1; }
    # The size histogram lists every allocation call as "size count": exact calls and bytes.
    heaptrack_print -f "$data" -H "$WORK/hist.$label" -p 0 -a 0 -T 0 -l 0 >"$WORK/print.$label" 2>&1
    read -r RUN_CALLS RUN_BYTES < <(awk '{ calls += $2; bytes += $1 * $2 } END { printf "%d %d\n", calls, bytes }' "$WORK/hist.$label")
    log "$label: $RUN_CALLS allocation calls, $RUN_BYTES bytes"
    if [ -n "$KEEP" ]; then
        mkdir -p "$KEEP"
        cp "$data" "$KEEP/heaptrack.kaproxy.$label.${data##*.}"
    fi
}
check_load() { # json-file expected-requests
    python3 - "$1" "$2" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
want = int(sys.argv[2])
ok = d.get("status", {}).get("2xx", 0)
if d["requests"] != want or ok != want or d.get("client_visible_errors", 0) != 0:
    sys.exit(f"load run: {d['requests']} requests, {ok} 2xx, "
             f"{d.get('client_visible_errors')} client-visible errors; want {want} 2xx")
PY
}

heaptrack_run loaded "$REQUESTS"; CALLS_N=$RUN_CALLS; BYTES_N=$RUN_BYTES
heaptrack_run idle 0; CALLS_0=$RUN_CALLS; BYTES_0=$RUN_BYTES

PER_REQ=$(awk -v a="$CALLS_N" -v b="$CALLS_0" -v n="$REQUESTS" 'BEGIN { printf "%.1f\n", (a - b) / n }')
BYTES_PER_REQ=$(awk -v a="$BYTES_N" -v b="$BYTES_0" -v n="$REQUESTS" 'BEGIN { printf "%.0f\n", (a - b) / n }')
if awk -v p="$PER_REQ" 'BEGIN { exit !(p < 1) }'; then
    echo "fewer than one allocation per request: was $KAPROXY built with --features system-alloc?" >&2
    echo "(with mimalloc as the global allocator heaptrack sees almost nothing)" >&2
    exit 1
fi
if [ "$ACCESS_LOG" = 1 ]; then ACCESS_TEXT="access log on"; else ACCESS_TEXT="access log off"; fi
LINE="- $(date -u '+%Y-%m-%d %H:%M UTC'), \`bench/allocs.sh --requests $REQUESTS\`, $LABEL: **$PER_REQ allocations and $BYTES_PER_REQ bytes allocated per request** (HTTP/1.1 keep-alive GET of a $(stat -c %s "$WORK/www/small")-byte file, kaproxy-bench c=$CONNS, \`worker_threads = 1\`, $ACCESS_TEXT; heaptrack, system allocator; a run with $WARMUP warm-up requests and none after subtracted)"

echo
printf '| run | requests after the warm-up | allocation calls | bytes allocated |\n'
printf '|---|---:|---:|---:|\n'
printf '| loaded | %d | %d | %d |\n' "$REQUESTS" "$CALLS_N" "$BYTES_N"
printf '| idle (pause of %s s) | 0 | %d | %d |\n' "$LOAD_SECONDS" "$CALLS_0" "$BYTES_0"
printf '| per request: (loaded - idle) / %d | | %s | %s |\n' "$REQUESTS" "$PER_REQ" "$BYTES_PER_REQ"
echo
echo "$LINE"
if [ -n "$OUT" ]; then
    printf '%s\n' "$LINE" >> "$OUT"
    log "appended to $OUT"
fi
