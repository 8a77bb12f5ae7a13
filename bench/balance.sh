#!/usr/bin/env bash
# Uneven servers (issue 21): two real Apaches behind kaproxy, one of them slow, and the
# balancers compared on the same open-loop load — does `least_request` keep the slow server's
# queue (and so the clients' p99) down where `round_robin` keeps sending it its share?
#
#   bench/balance.sh [--rate 200] [--duration 20] [--slow 100ms] [--fast 10ms] [--workers 8]
#                    [--balancers round_robin,least_request] [--rounds 1]
#   KAPROXY_BIN=path/to/kaproxy BENCH_BIN=path/to/kaproxy-bench bench/balance.sh ...
#
# Each run starts two fresh Apaches (kaproxy-bench apache: testkit's launcher, prefork with
# --workers children each, as Debian runs Apache with mod_php), both serving /work.cgi, a CGI
# that sleeps --fast on one ("fast") and --slow on the other ("slow") before it answers, and a
# fresh kaproxy (one upstream of the two, weights equal, `balance` set, everything else at its
# defaults) on 127.0.0.1:19190. kaproxy-bench sends GET /work.cgi at --rate requests per second
# in total for --duration seconds, open loop (latency from each request's intended send time),
# over up to 512 connections. Reported per balancer: the clients' p50/p90/p99/max, errors, and
# the share of requests each server answered (kaproxy_requests_total by server).
#
# With the defaults the slow server can answer 8 / 100 ms = 80 requests per second: half of
# 200 is more than it can take, so under round-robin its listen backlog grows for the whole run.
# Loopback only; every process the script starts is stopped by PID (bench/lib.sh).
set -euo pipefail

RATE=200
DURATION=20
SLOW=100ms
FAST=10ms
WORKERS=8
BALANCERS=round_robin,least_request
ROUNDS=1
while [ $# -gt 0 ]; do
    case "$1" in
        --rate) RATE="$2"; shift 2 ;;
        --duration) DURATION="$2"; shift 2 ;;
        --slow) SLOW="$2"; shift 2 ;;
        --fast) FAST="$2"; shift 2 ;;
        --workers) WORKERS="$2"; shift 2 ;;
        --balancers) BALANCERS="$2"; shift 2 ;;
        --rounds) ROUNDS="$2"; shift 2 ;;
        -h|--help) sed -n '2,21p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "unknown argument $1 (--help)" >&2; exit 2 ;;
    esac
done

HERE="$(cd "$(dirname "$0")" && pwd)"
ROOT="$(cd "$HERE/.." && pwd)"
TARGET="${CARGO_TARGET_DIR:-$ROOT/target}"
KAPROXY="${KAPROXY_BIN:-$TARGET/release/kaproxy}"
BENCH="${BENCH_BIN:-$TARGET/release/kaproxy-bench}"
if [ -z "${KAPROXY_BIN:-}${BENCH_BIN:-}" ]; then
    (cd "$ROOT" && cargo build --release -q -p kaproxy -p kaproxy-bench)
fi
[ -x /usr/sbin/apache2 ] || { echo "Apache is needed (apt-get install apache2)" >&2; exit 1; }
command -v python3 >/dev/null || { echo "python3 is needed to read the reports" >&2; exit 1; }

. "$HERE/lib.sh"
WORK=$(mktemp -d /tmp/kaproxy-balance.XXXXXX)
PIDS=()
cleanup() {
    for pid in "${PIDS[@]}"; do stop_pid "$pid"; done
    rm -rf "$WORK"
}
trap cleanup EXIT
ports_free 19190 19191

# apache NAME DELAY: starts one, its address in ADDR. Not called in $(...): the PID must
# reach this shell's PIDS, so that the run (and the exit trap) stops it.
apache() {
    local name=$1 delay=$2 addr_file="$WORK/$1.addr"
    rm -f "$addr_file"
    "$BENCH" apache --prefork "$WORKERS" --keepalive 5s --name "$name" \
        --cgi "work.cgi=$delay" --addr-file "$addr_file" >"$WORK/$name.log" 2>&1 &
    PIDS+=($!)
    for _ in $(seq 1 100); do [ -s "$addr_file" ] && break; sleep 0.1; done
    [ -s "$addr_file" ] || { echo "Apache $name did not start:" >&2; cat "$WORK/$name.log" >&2; exit 1; }
    ADDR=$(cat "$addr_file")
}

# run BALANCE ROUND: one measured run; appends a row to $WORK/rows.
run() {
    local balance=$1 round=$2
    local fast slow kpid
    apache fast "$FAST"; fast=$ADDR
    apache slow "$SLOW"; slow=$ADDR
    cat > "$WORK/kaproxy.toml" <<EOF
[listen]
http = "127.0.0.1:19190"
[admin]
listen = "127.0.0.1:19191"
[upstreams.web]
balance = "$balance"
servers = ["$fast", "$slow"]
keepalive_timeout = "5s"
[log]
level = "warn"
access_log = false
EOF
    "$KAPROXY" -c "$WORK/kaproxy.toml" run >"$WORK/kaproxy.log" 2>&1 &
    kpid=$!
    PIDS+=($kpid)
    for _ in $(seq 1 100); do curl -s -o /dev/null http://127.0.0.1:19190/ && break; sleep 0.1; done
    log "$balance (round $round): fast $fast ($FAST), slow $slow ($SLOW), $RATE req/s for ${DURATION}s"
    "$BENCH" -c 512 --rate "$RATE" -d "${DURATION}s" --timeout 30s --json \
        http://127.0.0.1:19190/work.cgi > "$WORK/report.json" 2>"$WORK/bench.err" || true
    curl -s http://127.0.0.1:19191/metrics > "$WORK/metrics.txt"
    python3 - "$balance" "$fast" "$slow" "$WORK/report.json" "$WORK/metrics.txt" >> "$WORK/rows" <<'PY'
import json, re, sys
balance, fast, slow, report, metrics = sys.argv[1:]
r = json.load(open(report))
by = {fast: 0.0, slow: 0.0}
for line in open(metrics):
    m = re.match(r'kaproxy_requests_total\{([^}]*)\} (\S+)', line)
    if m:
        labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group(1)))
        if labels.get("server") in by:
            by[labels["server"]] += float(m.group(2))
total = sum(by.values()) or 1
l = r["latency_ms"]
print(f"| {balance} | {r['responses']} | {r['client_visible_errors']} | {l['p50']:.1f} | {l['p90']:.1f} | "
      f"{l['p99']:.1f} | {l['max']:.1f} | {100 * by[fast] / total:.1f} % | {100 * by[slow] / total:.1f} % |")
PY
    tail -n1 "$WORK/rows" >&2
    stop_pid "$kpid"; forget_pid "$kpid"
    for pid in "${PIDS[@]}"; do stop_pid "$pid"; done
    PIDS=()
}

IFS=, read -r -a LIST <<< "$BALANCERS"
for round in $(seq 1 "$ROUNDS"); do
    for balance in "${LIST[@]}"; do
        run "$balance" "$round"
    done
done

echo
echo "Two Apaches (prefork, $WORKERS workers each; /work.cgi sleeps $FAST on fast, $SLOW on slow), $("$KAPROXY" --version 2>/dev/null | head -n1) ($(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo "?")),"
echo "\`kaproxy-bench -c 512 --rate $RATE -d ${DURATION}s\` GET /work.cgi, open loop; latency in ms."
echo
echo "| balance | responses | client errors | p50 | p90 | p99 | max | fast's share | slow's share |"
echo "|---|---:|---:|---:|---:|---:|---:|---:|---:|"
cat "$WORK/rows"
