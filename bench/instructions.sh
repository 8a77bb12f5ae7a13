#!/usr/bin/env bash
# User-space instructions per proxied request, counted by valgrind's callgrind: the one speed
# figure on this shared machine that does not move with the load of others (±1 % between runs),
# so it decides A/B questions that wall-clock runs cannot (bench/RESULTS.md, 2026-11-29).
#
#   bench/instructions.sh [--nginx] [--n1 2000] [--n2 12000] [--keep DIR] [BIN...]
#
# Each BIN (default: this tree's release kaproxy, built if missing) proxies to a static nginx
# backend (a 77-byte file) with one worker and the access log off; kaproxy-bench sends N1, then
# in a second run N2, keep-alive GETs over 16 connections, and the figure is
# (instructions(N2) - instructions(N1)) / (N2 - N1): start-up and shutdown cancel out.
# --nginx adds nginx as the proxy (`master_process off`, upstream keepalive 256) for scale.
# --keep DIR keeps each run's callgrind profile there (kaproxy-1.2000, kaproxy-1.12000, ..., nginx.N) for
# callgrind_annotate. Ports 19180-19182 on 127.0.0.1; every process started is stopped by PID.
set -euo pipefail

N1=2000
N2=12000
NGINX_TOO=0
KEEP=""
BINS=()
while [ $# -gt 0 ]; do
    case "$1" in
        --n1) N1="$2"; shift 2 ;;
        --n2) N2="$2"; shift 2 ;;
        --nginx) NGINX_TOO=1; shift ;;
        --keep) KEEP="$2"; mkdir -p "$KEEP"; shift 2 ;;
        -h|--help) sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) BINS+=("$1"); shift ;;
    esac
done
[ "$N2" -gt "$N1" ] || { echo "--n2 must be larger than --n1" >&2; exit 2; }

HERE="$(cd "$(dirname "$0")" && pwd)"
ROOT="$(cd "$HERE/.." && pwd)"
TARGET="${CARGO_TARGET_DIR:-$ROOT/target}"
command -v valgrind >/dev/null || { echo "valgrind is needed (apt-get install valgrind)" >&2; exit 1; }
NGINX=$(command -v nginx || echo /usr/sbin/nginx)
[ -x "$NGINX" ] || { echo "nginx is needed for the backend (apt-get install nginx)" >&2; exit 1; }
if [ ${#BINS[@]} -eq 0 ] || [ ! -x "$TARGET/release/kaproxy-bench" ]; then
    (cd "$ROOT" && cargo build --release -q -p kaproxy -p kaproxy-bench)
fi
[ ${#BINS[@]} -gt 0 ] || BINS=("$TARGET/release/kaproxy")
BENCH="$TARGET/release/kaproxy-bench"

# stop_pid: bench/lib.sh.
. "$HERE/lib.sh"
WORK=$(mktemp -d /tmp/kaproxy-instructions.XXXXXX)
PIDS=()
cleanup() {
    for pid in "${PIDS[@]}"; do stop_pid "$pid"; done
    rm -rf "$WORK"
}
trap cleanup EXIT

mkdir -p "$WORK/www" "$WORK/backend" "$WORK/proxy"
printf 'hello from the static backend, a small response for the keep-alive benchmark\n' > "$WORK/www/small"
nginx_conf() { # DIR BODY
    cat > "$1/nginx.conf" <<EOF
worker_processes 1;
error_log $1/error.log warn;
pid $1/nginx.pid;
events { worker_connections 4000; }
http {
    access_log off;
    keepalive_timeout 75s;
    keepalive_requests 1000000;
    client_body_temp_path $1/body;
    proxy_temp_path $1/proxy;
    fastcgi_temp_path $1/fastcgi;
    uwsgi_temp_path $1/uwsgi;
    scgi_temp_path $1/scgi;
    $2
}
EOF
}
nginx_conf "$WORK/backend" "server { listen 127.0.0.1:19180; root $WORK/www; }"
nginx_conf "$WORK/proxy" "upstream backend { server 127.0.0.1:19180; keepalive 256; keepalive_requests 1000000; keepalive_timeout 60s; }
    server { listen 127.0.0.1:19182; location / { proxy_pass http://backend; proxy_http_version 1.1; proxy_set_header Connection \"\"; } }"
cat > "$WORK/kaproxy.toml" <<EOF
[listen]
http = "127.0.0.1:19181"
[downstream]
idle_timeout = "75s"
max_requests_per_connection = 1000000
[admin]
listen = ""
[upstreams.web]
servers = ["127.0.0.1:19180"]
keepalive_timeout = "75s"
idle_timeout = "60s"
max_requests_per_connection = 1000000
max_idle_per_server = 256
[runtime]
worker_threads = 1
[log]
level = "warn"
access_log = false
EOF

"$NGINX" -p "$WORK/backend" -c "$WORK/backend/nginx.conf" -g 'daemon off; master_process off;' &
PIDS+=($!)
for _ in $(seq 1 50); do curl -s -o /dev/null http://127.0.0.1:19180/small && break; sleep 0.1; done

# instructions PORT N CMD...: the program's total instructions after N requests through PORT.
instructions() {
    local port=$1 n=$2; shift 2
    local out="$WORK/callgrind.$n"
    valgrind --tool=callgrind --callgrind-out-file="$out" "$@" >/dev/null 2>&1 &
    local pid=$!
    PIDS+=($pid)
    for _ in $(seq 1 150); do curl -s -o /dev/null "http://127.0.0.1:$port/small" && break; sleep 0.2; done
    "$BENCH" -c16 -n "$n" "http://127.0.0.1:$port/small" >/dev/null 2>&1
    # Under valgrind, exiting (and writing the profile) takes a while.
    stop_pid "$pid" 300
    awk '/^(summary|totals):/ { print $2; exit }' "$out"
    [ -z "$KEEP" ] || cp "$out" "$KEEP/$TAG.$n"
}

per_request() { # LABEL PORT CMD...
    local label=$1 port=$2; shift 2
    local a b
    a=$(instructions "$port" "$N1" "$@")
    b=$(instructions "$port" "$N2" "$@")
    printf '%s: %d instructions per request (%s at %d requests, %s at %d)\n' \
        "$label" $(( (b - a) / (N2 - N1) )) "$a" "$N1" "$b" "$N2"
}

i=0
for bin in "${BINS[@]}"; do
    i=$((i + 1))
    TAG="kaproxy-$i" per_request "kaproxy $bin" 19181 "$bin" -c "$WORK/kaproxy.toml" run
done
if [ "$NGINX_TOO" = 1 ]; then
    TAG=nginx per_request "nginx $("$NGINX" -v 2>&1 | sed 's/.*\///')" 19182 \
        "$NGINX" -p "$WORK/proxy" -c "$WORK/proxy/nginx.conf" -g 'daemon off; master_process off;'
fi
