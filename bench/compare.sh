#!/usr/bin/env bash
# Runs the same load against the backend directly, kaproxy, nginx and HAProxy in one run,
# interleaved round by round, and writes the medians and ratios to bench/RESULTS.md.
#
#   bench/compare.sh [--rounds N] [--duration SECONDS] [--out FILE] [--no-install]
#                    [--only h1,h1tls,newconn,h2,big,h1up,both,idle]
#   KAPROXY_BIN=path/to/kaproxy bench/compare.sh ...   runs that build instead of this tree's
#
# Layout on the 2-core machine: every proxy is pinned to CPU 0 with one worker (kaproxy
# `[runtime] worker_threads = 1`, nginx `worker_processes 1`, HAProxy `nbthread 1`); the
# backend (nginx serving static files) and the load generators are pinned to CPU 1.
# In h1, h1tls and h2 a second kaproxy, "kaproxy default", runs the same config without the
# `[runtime]` table (what a user runs), pinned to CPU 0 like the others.
# h1up: plain HTTP/1.1 clients, TLS from each proxy to the backend (pinned as above).
# both: each proxy with its defaults on both cores (kaproxy without `[runtime]`, nginx
# `worker_processes auto`, HAProxy without nbthread), nothing pinned, against a second,
# unpinned backend; HTTP/1.1 plain and over TLS.
# Load generators: wrk for HTTP/1.1 keep-alive (plain, TLS, 1 MiB), h2load for HTTP/2,
# kaproxy-bench for TLS with a new connection per request and for the 10 000 idle connections.
# Every process the script starts is killed by PID when it exits.
set -euo pipefail

ROUNDS=3
DURATION=10
INSTALL=1
HERE="$(cd "$(dirname "$0")" && pwd)"
ROOT="$(cd "$HERE/.." && pwd)"
OUT="$HERE/RESULTS.md"

ONLY="h1,h1tls,newconn,h2,big,h1up,both,idle"

usage() { sed -n '2,/^set -euo/p' "$0" | sed -n 's/^# \{0,1\}//p'; }
while [ $# -gt 0 ]; do
    case "$1" in
        --rounds) ROUNDS="$2"; shift 2 ;;
        --duration) DURATION="$2"; shift 2 ;;
        --out) OUT="$2"; shift 2 ;;
        --no-install) INSTALL=0; shift ;;
        --only) ONLY="$2"; shift 2 ;;
        -h|--help) usage; exit 0 ;;
        *) echo "unknown argument: $1" >&2; usage >&2; exit 2 ;;
    esac
done
[ "$ROUNDS" -ge 1 ] 2>/dev/null || { echo "--rounds must be a positive integer" >&2; exit 2; }
[ "$DURATION" -ge 1 ] 2>/dev/null || { echo "--duration must be whole seconds >= 1" >&2; exit 2; }

# ---- ports (loopback only) ----
BACKEND_HTTP=18180; BACKEND_TLS=18543
KAPROXY_HTTP=18181; KAPROXY_TLS=18544
NGINX_HTTP=18182;   NGINX_TLS=18545
HAPROXY_HTTP=18183; HAPROXY_TLS=18546
# Every target: "direct" (the backend), the proxies pinned to CPU 0 (kaproxy with
# worker_threads = 1, kaproxy-default without [runtime]), the h1up proxies (TLS to the
# backend), the both-cores proxies (*-both, unpinned, against backend-both).
declare -A HTTP_PORT=(
    [direct]=$BACKEND_HTTP [backend]=$BACKEND_HTTP
    [kaproxy]=$KAPROXY_HTTP [nginx]=$NGINX_HTTP [haproxy]=$HAPROXY_HTTP
    [kaproxy-default]=18184
    [kaproxy-both]=18185 [nginx-both]=18186 [haproxy-both]=18187 [backend-both]=18188
    [kaproxy-up]=18189 [nginx-up]=18190 [haproxy-up]=18191
)
declare -A TLS_PORT=(
    [direct]=$BACKEND_TLS [backend]=$BACKEND_TLS
    [kaproxy]=$KAPROXY_TLS [nginx]=$NGINX_TLS [haproxy]=$HAPROXY_TLS
    [kaproxy-default]=18547
    [kaproxy-both]=18548 [nginx-both]=18549 [haproxy-both]=18550
)
PROXIES=(kaproxy nginx haproxy)
# The targets of each scenario, in the order they run within a round.
scenario_targets() {
    case $1 in
        h1|h1tls|h2) echo direct kaproxy kaproxy-default nginx haproxy ;;
        newconn|big) echo direct kaproxy nginx haproxy ;;
        h1up) echo "$UP_TARGETS" ;;
        both|bothtls) echo kaproxy-both nginx-both haproxy-both ;;
    esac
}
UP_TARGETS="kaproxy-up nginx-up haproxy-up"   # kaproxy-up is dropped if `kaproxy check` rejects it
UP_SKIPPED=""
IDLE_CONNS=10000
IDLE_HOLD=10      # seconds each idle connection is held open
IDLE_SAMPLE=7     # seconds after the load starts when RSS is sampled

# log, install_missing, stop_pid, forget_pid, ports_free, wait_port, dev_certificate,
# release_binaries: bench/lib.sh.
. "$HERE/lib.sh"

# ---- tools ----
need_pkgs=()
command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || need_pkgs+=(nginx)
command -v haproxy >/dev/null || [ -x /usr/sbin/haproxy ] || need_pkgs+=(haproxy)
command -v wrk >/dev/null || need_pkgs+=(wrk)
command -v h2load >/dev/null || need_pkgs+=(nghttp2-client)
command -v openssl >/dev/null || need_pkgs+=(openssl)
command -v taskset >/dev/null || need_pkgs+=(util-linux)
install_missing "${need_pkgs[@]}"
NGINX=$(command -v nginx || echo /usr/sbin/nginx)
HAPROXY=$(command -v haproxy || echo /usr/sbin/haproxy)
[ "$(nproc)" -ge 2 ] || { echo "needs at least 2 CPUs (proxy on CPU 0, load on CPU 1)" >&2; exit 1; }

# 10 000 idle client connections need the file descriptors on both ends.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
if [ "$(ulimit -n)" != unlimited ] && [ "$(ulimit -n)" -lt $((IDLE_CONNS + 2000)) ]; then
    echo "ulimit -n is $(ulimit -n); the idle-connection scenario needs $((IDLE_CONNS + 2000))" >&2
    exit 1
fi

log "building kaproxy and kaproxy-bench (release)"
(cd "$ROOT" && cargo build --release -q -p kaproxy -p kaproxy-bench)
# KAPROXY_BIN runs another kaproxy build (say, an older commit's) in the same scenarios.
RELEASE_DIR="${CARGO_TARGET_DIR:-$ROOT/target}/release"
KAPROXY="${KAPROXY_BIN:-$RELEASE_DIR/kaproxy}"
BENCH="$RELEASE_DIR/kaproxy-bench"

WORK=$(mktemp -d /tmp/kaproxy-compare.XXXXXX)
chmod 755 "$WORK"
PIDS=()
declare -A PID_OF=()

cleanup() {
    local pid
    for pid in "${PIDS[@]}"; do stop_pid "$pid"; done
    rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

ports_free "${HTTP_PORT[@]}" "${TLS_PORT[@]}"


# ---- certificate (ECDSA P-256, shared by every TLS listener) ----
dev_certificate "$WORK"

# ---- backend: nginx serving static files on CPU 1 ----
mkdir -p "$WORK/www"
printf 'hello from the static backend, a small response for the keep-alive benchmark\n' > "$WORK/www/small"
head -c 1048576 /dev/zero | tr '\0' 'x' > "$WORK/www/1m"
chmod -R a+rX "$WORK"

# Which scenarios run (h1up needs the TLS backend, both its own backend and proxies).
SCENARIOS=()
for s in h1 h1tls newconn h2 big h1up both; do
    case ",$ONLY," in *",$s,"*) SCENARIOS+=("$s") ;; esac
done
# `--only both` measures both cores over plain HTTP/1.1 and over TLS.
case ",$ONLY," in *",both,"*) SCENARIOS+=(bothtls) ;; esac
ran() { local s; for s in "${SCENARIOS[@]}"; do [ "$s" = "$1" ] && return 0; done; return 1; }

# backend_conf NAME HTTP-PORT [TLS-PORT]: the static backend's nginx.conf in $WORK/NAME.
backend_conf() {
    local name=$1 http=$2 tls=${3:-}
    mkdir -p "$WORK/$name"
    {
        cat <<EOF
user root;
worker_processes 1;
worker_rlimit_nofile 20000;
error_log $WORK/$name/error.log warn;
pid $WORK/$name/nginx.pid;
events { worker_connections 19000; }
http {
    access_log off;
    sendfile on;
    tcp_nopush on;
    open_file_cache max=64;
    keepalive_timeout 75s;
    keepalive_requests 1000000;
    client_body_temp_path $WORK/$name/body;
    proxy_temp_path $WORK/$name/proxy;
    fastcgi_temp_path $WORK/$name/fastcgi;
    uwsgi_temp_path $WORK/$name/uwsgi;
    scgi_temp_path $WORK/$name/scgi;
    default_type application/octet-stream;
    server {
        listen 127.0.0.1:$http backlog=4096;
EOF
        [ -z "$tls" ] || cat <<EOF
        listen 127.0.0.1:$tls ssl http2 backlog=4096;
        ssl_certificate $WORK/cert.pem;
        ssl_certificate_key $WORK/key.pem;
        ssl_protocols TLSv1.2 TLSv1.3;
        ssl_session_cache shared:SSL:10m;
EOF
        cat <<EOF
        root $WORK/www;
    }
}
EOF
    } > "$WORK/$name/nginx.conf"
}
backend_conf backend $BACKEND_HTTP $BACKEND_TLS
ran both && backend_conf backend-both "${HTTP_PORT[backend-both]}"

# ---- kaproxy ----
# kaproxy_conf TARGET BACKEND-PORT RUNTIME(1 = worker_threads = 1, 0 = no [runtime] table)
#              UPSTREAM-TLS(0/1): $WORK/TARGET.toml, listening on the target's ports.
kaproxy_conf() {
    local target=$1 backend=$2 runtime=$3 up_tls=$4
    local tls=${TLS_PORT[$target]:-}
    {
        printf '[listen]\nhttp = "127.0.0.1:%s"\n' "${HTTP_PORT[$target]}"
        if [ -n "$tls" ]; then
            cat <<EOF
https = "127.0.0.1:$tls"

[tls]
cert = "$WORK/cert.pem"
key = "$WORK/key.pem"
session_resumption = true
EOF
        fi
        cat <<EOF

[downstream]
idle_timeout = "75s"
max_requests_per_connection = 1000000

[upstreams.web]
servers = ["127.0.0.1:$backend"]
EOF
        [ "$up_tls" = 0 ] || cat <<EOF
tls = true                      # upstream TLS (issue 11); the backend's certificate is self-signed
tls_verify = false
EOF
        cat <<EOF
keepalive_timeout = "75s"       # the backend nginx's keepalive_timeout
idle_timeout = "60s"
max_requests_per_connection = 1000000
max_idle_per_server = 256

[admin]
listen = ""
EOF
        [ "$runtime" = 0 ] || printf '\n[runtime]\nworker_threads = 1\n'
        printf '\n[log]\nlevel = "warn"\naccess_log = false\n'
    } > "$WORK/$target.toml"
}
kaproxy_conf kaproxy $BACKEND_HTTP 1 0
kaproxy_conf kaproxy-default $BACKEND_HTTP 0 0
ran both && kaproxy_conf kaproxy-both "${HTTP_PORT[backend-both]}" 0 0
if ran h1up; then
    kaproxy_conf kaproxy-up $BACKEND_TLS 1 1
    # Upstream TLS keys are new (issue 11): a build whose `check` rejects them is left out of
    # h1up with the reason in the results, and the other proxies still run.
    if ! "$KAPROXY" check --config "$WORK/kaproxy-up.toml" > "$WORK/kaproxy-up.check" 2>&1; then
        UP_SKIPPED=$(grep -m1 -E 'tls|error|unknown' "$WORK/kaproxy-up.check" | sed 's/^ *//; s|'"$WORK"'|$WORK|g; s/, expected one of.*//' || true)
        UP_TARGETS="nginx-up haproxy-up"
        log "h1up: kaproxy left out: \`kaproxy check\` rejects upstream TLS ($UP_SKIPPED)"
    fi
fi

# ---- nginx as the proxy ----
# nginx_conf TARGET WORKERS BACKEND-PORT UPSTREAM-TLS(0/1): $WORK/TARGET/nginx.conf.
nginx_conf() {
    local target=$1 workers=$2 backend=$3 up_tls=$4
    local tls=${TLS_PORT[$target]:-} scheme=http
    [ "$up_tls" = 0 ] || scheme=https
    mkdir -p "$WORK/$target"
    {
        cat <<EOF
user root;
worker_processes $workers;
worker_rlimit_nofile 20000;
error_log $WORK/$target/error.log warn;
pid $WORK/$target/nginx.pid;
events { worker_connections 19000; }
http {
    access_log off;
    keepalive_timeout 75s;
    keepalive_requests 1000000;
    client_body_temp_path $WORK/$target/body;
    proxy_temp_path $WORK/$target/proxy;
    fastcgi_temp_path $WORK/$target/fastcgi;
    uwsgi_temp_path $WORK/$target/uwsgi;
    scgi_temp_path $WORK/$target/scgi;
    upstream backend {
        server 127.0.0.1:$backend;
        keepalive 256;
        keepalive_requests 1000000;
        keepalive_timeout 60s;
    }
    server {
        listen 127.0.0.1:${HTTP_PORT[$target]} backlog=4096;
EOF
        [ -z "$tls" ] || cat <<EOF
        listen 127.0.0.1:$tls ssl http2 backlog=4096;
        ssl_certificate $WORK/cert.pem;
        ssl_certificate_key $WORK/key.pem;
        ssl_protocols TLSv1.2 TLSv1.3;
        ssl_session_cache shared:SSL:10m;
EOF
        cat <<EOF
        location / {
            proxy_pass $scheme://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
EOF
        # nginx 1.22's proxy_ssl_protocols default lacks TLSv1.3; verification is off by default.
        [ "$up_tls" = 0 ] || cat <<EOF
            proxy_ssl_session_reuse on;
            proxy_ssl_protocols TLSv1.2 TLSv1.3;
            proxy_ssl_verify off;
EOF
        cat <<EOF
        }
    }
}
EOF
    } > "$WORK/$target/nginx.conf"
}
nginx_conf nginx 1 $BACKEND_HTTP 0
ran both && nginx_conf nginx-both auto "${HTTP_PORT[backend-both]}" 0
ran h1up && nginx_conf nginx-up 1 $BACKEND_TLS 1

# ---- HAProxy ----
# haproxy_conf TARGET NBTHREAD("" = HAProxy's default) BACKEND-PORT UPSTREAM-TLS(0/1): $WORK/TARGET.cfg.
haproxy_conf() {
    local target=$1 nbthread=$2 backend=$3 up_tls=$4
    local tls=${TLS_PORT[$target]:-}
    {
        echo "global"
        [ -z "$nbthread" ] || echo "    nbthread $nbthread"
        cat <<EOF
    maxconn 10100
    # HAProxy reserves two descriptors per connection; ulimit -n is capped at 20000 here,
    # and idle client connections need one each.
    no strict-limits
    ssl-default-bind-options ssl-min-ver TLSv1.2
EOF
        [ "$up_tls" = 0 ] || echo "    ssl-default-server-options ssl-min-ver TLSv1.2"
        cat <<EOF
defaults
    mode http
    maxconn 10100
    timeout connect 5s
    timeout client 75s
    timeout server 60s
    timeout http-keep-alive 75s
    option http-keep-alive
    http-reuse always
frontend fe
    bind 127.0.0.1:${HTTP_PORT[$target]}
EOF
        [ -z "$tls" ] || echo "    bind 127.0.0.1:$tls ssl crt $WORK/combined.pem alpn h2,http/1.1"
        cat <<EOF
    default_backend be
backend be
EOF
        # TLS sessions to servers are reused by default (no-ssl-reuse turns that off).
        if [ "$up_tls" = 0 ]; then
            echo "    server b1 127.0.0.1:$backend"
        else
            echo "    server b1 127.0.0.1:$backend ssl verify none"
        fi
    } > "$WORK/$target.cfg"
}
haproxy_conf haproxy 1 $BACKEND_HTTP 0
ran both && haproxy_conf haproxy-both "" "${HTTP_PORT[backend-both]}" 0
ran h1up && haproxy_conf haproxy-up 1 $BACKEND_TLS 1

# Targets pinned to CPU 0 (proxies) or CPU 1 (backend); the both-cores ones are not pinned.
pinned() { case $1 in *-both) return 1 ;; *) return 0 ;; esac; }
# start_backend NAME: backend on CPU 1, backend-both unpinned.
start_backend() {
    local name=$1 pin=(taskset -c 1)
    pinned "$name" || pin=()
    "${pin[@]}" "$NGINX" -p "$WORK/$name" -c "$WORK/$name/nginx.conf" -g 'daemon off;' \
        >"$WORK/$name/stdout.log" 2>&1 &
    PIDS+=($!); PID_OF[$name]=$!
    wait_port "$(http_port "$name")"
}
# start_proxy TARGET [may-fail]: a proxy that does not come up ends the run, or, with may-fail,
# returns 1 after printing its log.
start_proxy() {
    local name=$1 may_fail=${2:-} pin=(taskset -c 0)
    pinned "$name" || pin=()
    case $name in
        kaproxy*)
            "${pin[@]}" "$KAPROXY" run --config "$WORK/$name.toml" >"$WORK/$name.log" 2>&1 &
            ;;
        nginx*)
            "${pin[@]}" "$NGINX" -p "$WORK/$name" -c "$WORK/$name/nginx.conf" -g 'daemon off;' \
                >"$WORK/$name/stdout.log" 2>&1 &
            ;;
        haproxy*)
            "${pin[@]}" "$HAPROXY" -db -f "$WORK/$name.cfg" >"$WORK/$name.log" 2>&1 &
            ;;
    esac
    PIDS+=($!); PID_OF[$name]=$!
    if ! wait_port "$(http_port "$name")" || { [ -n "$(tls_port "$name")" ] && ! wait_port "$(tls_port "$name")"; }; then
        echo "--- $name did not start; its log:" >&2
        cat "$WORK/$name.log" "$WORK/$name"/*.log 2>/dev/null | tail -n 20 >&2 || true
        [ -n "$may_fail" ] || exit 1
        stop_proxy "$name"
        return 1
    fi
}
stop_proxy() {
    local pid=${PID_OF[$1]}
    stop_pid "$pid"
    forget_pid "$pid"
}
http_port() { echo "${HTTP_PORT[$1]}"; }
tls_port() { echo "${TLS_PORT[$1]:-}"; }

# The processes whose CPU and memory count for a target: the proxy and its children (nginx's
# worker); for "direct", nothing (the backend is not a proxy).
proc_tree() {
    local target=$1
    [ "$target" = direct ] && return 0
    local root=${PID_OF[$target]}
    echo "$root"
    local child
    for child in $(ps -o pid= --ppid "$root" 2>/dev/null); do echo "$child"; done
}
# utime + stime in clock ticks, summed over the target's processes.
cpu_ticks() {
    local total=0 pid
    for pid in $(proc_tree "$1"); do
        [ -r "/proc/$pid/stat" ] || continue
        total=$((total + $(awk '{ sub(/^.*\) /, ""); print $12 + $13 }' "/proc/$pid/stat")))
    done
    echo $total
}
rss_kib() {
    local total=0 pid
    for pid in $(proc_tree "$1"); do
        [ -r "/proc/$pid/status" ] || continue
        total=$((total + $(awk '/^VmRSS:/ { print $2 }' "/proc/$pid/status")))
    done
    echo $total
}
TICKS=$(getconf CLK_TCK)

RES="$WORK/results"
mkdir -p "$RES" "$WORK/runs"
# record METRIC TARGET VALUE: keeps numeric values only (a failed run leaves a gap, not a zero).
record() {
    if [[ "$3" =~ ^[0-9]+(\.[0-9]+)?([eE][-+]?[0-9]+)?$ ]]; then echo "$3" >> "$RES/$1.$2"; fi
}
is_num() { [[ "$1" =~ ^[0-9]+(\.[0-9]+)?$ ]]; }

# ---- output parsers ----
wrk_field() { # file field: rps | p99_ms | requests | mib_s | errors
    local f=$1
    case $2 in
        rps) awk '/^Requests\/sec:/ { print $2 }' "$f" ;;
        requests) awk '/requests in/ { print $1 }' "$f" ;;
        p99_ms) awk '$1 == "99%" { v = $2; u = v; sub(/[0-9.]+/, "", u); sub(/[a-z]+$/, "", v);
                     m = (u == "us") ? v / 1000 : (u == "ms") ? v : (u == "s") ? v * 1000 : (u == "m") ? v * 60000 : v;
                     printf "%.3f\n", m }' "$f" ;;
        mib_s) awk '/^Transfer\/sec:/ { v = $2; u = v; sub(/[0-9.]+/, "", u); sub(/[A-Za-z]+$/, "", v);
                     m = (u == "B") ? v / 1048576 : (u == "KB") ? v / 1024 : (u == "MB") ? v : (u == "GB") ? v * 1024 : v;
                     printf "%.1f\n", m }' "$f" ;;
        errors) awk '/Non-2xx or 3xx responses:/ { e += $NF }
                     /Socket errors:/ { gsub(/,/, ""); e += $4 + $6 + $8 + $10 }
                     END { print e + 0 }' "$f" ;;
    esac
}
h2load_field() { # file field: rps | requests | errors
    local f=$1
    case $2 in
        rps) awk '/^finished in/ { print $4 }' "$f" ;;
        requests) awk '/^requests:/ { print $8 }' "$f" ;;
        # "failed" includes non-2xx/3xx statuses and transport errors.
        errors) awk '/^requests:/ { e = $10 } END { print e + 0 }' "$f" ;;
    esac
}
json_field() { # file jq-like path (dotted)
    python3 -c 'import json,sys
d = json.load(open(sys.argv[1]))
for k in sys.argv[2].split("."): d = d[k]
print(d)' "$1" "$2" 2>/dev/null || echo -
}

# ---- one measurement ----
WRK_CMD="taskset -c 1 wrk -t1 -c64 -d${DURATION}s --latency URL/small"
WRK_1M_CMD="taskset -c 1 wrk -t1 -c16 -d${DURATION}s --latency URL/1m"
NEWCONN_CMD="taskset -c 1 kaproxy-bench -c16 -d${DURATION}s --new-conn --no-resume --insecure --json https://127.0.0.1:PORT/small"
H2_CMD="taskset -c 1 h2load -t1 -c16 -m4 -D ${DURATION} https://127.0.0.1:PORT/small"
IDLE_CMD="taskset -c 1 kaproxy-bench -c$IDLE_CONNS -n$IDLE_CONNS --idle-gap ${IDLE_HOLD}s --timeout 30s --json http://127.0.0.1:PORT/small"
# Both cores: nothing pinned; two wrk threads, so that the load generator is not held to one core.
WRK_BOTH_CMD="wrk -t2 -c64 -d${DURATION}s --latency URL/small"

run_scenario() {
    local scenario=$1 target=$2 round=$3
    local out="$WORK/runs/$scenario.$target.$round"
    local before after requests errors headline
    before=$(cpu_ticks "$target")
    case $scenario in
        h1)
            taskset -c 1 wrk -t1 -c64 -d"${DURATION}s" --latency "http://127.0.0.1:$(http_port "$target")/small" > "$out" 2>&1 || true
            record h1.rps "$target" "$(wrk_field "$out" rps)"
            record h1.p99 "$target" "$(wrk_field "$out" p99_ms)"
            headline="$(wrk_field "$out" rps) req/s"
            requests=$(wrk_field "$out" requests); errors=$(wrk_field "$out" errors) ;;
        h1tls)
            taskset -c 1 wrk -t1 -c64 -d"${DURATION}s" --latency "https://127.0.0.1:$(tls_port "$target")/small" > "$out" 2>&1 || true
            record h1tls.rps "$target" "$(wrk_field "$out" rps)"
            record h1tls.p99 "$target" "$(wrk_field "$out" p99_ms)"
            headline="$(wrk_field "$out" rps) req/s"
            requests=$(wrk_field "$out" requests); errors=$(wrk_field "$out" errors) ;;
        newconn)
            taskset -c 1 "$BENCH" -c16 -d"${DURATION}s" --new-conn --no-resume --insecure --json \
                "https://127.0.0.1:$(tls_port "$target")/small" > "$out" 2>"$out.err" || true
            record newconn.rps "$target" "$(json_field "$out" req_per_s)"
            record newconn.p99 "$target" "$(json_field "$out" latency_ms.p99)"
            headline="$(json_field "$out" req_per_s) handshakes/s"
            requests=$(json_field "$out" requests); errors=$(json_field "$out" client_visible_errors) ;;
        h2)
            taskset -c 1 h2load -t1 -c16 -m4 -D "$DURATION" "https://127.0.0.1:$(tls_port "$target")/small" > "$out" 2>&1 || true
            record h2.rps "$target" "$(h2load_field "$out" rps)"
            headline="$(h2load_field "$out" rps) req/s"
            requests=$(h2load_field "$out" requests); errors=$(h2load_field "$out" errors) ;;
        big)
            taskset -c 1 wrk -t1 -c16 -d"${DURATION}s" --latency "http://127.0.0.1:$(http_port "$target")/1m" > "$out" 2>&1 || true
            record big.mibs "$target" "$(wrk_field "$out" mib_s)"
            headline="$(wrk_field "$out" mib_s) MiB/s"
            requests=$(wrk_field "$out" requests); errors=$(wrk_field "$out" errors) ;;
        h1up)
            # Plain HTTP/1.1 from the client; the proxy speaks TLS to the backend.
            taskset -c 1 wrk -t1 -c64 -d"${DURATION}s" --latency "http://127.0.0.1:$(http_port "$target")/small" > "$out" 2>&1 || true
            record h1up.rps "$target" "$(wrk_field "$out" rps)"
            record h1up.p99 "$target" "$(wrk_field "$out" p99_ms)"
            headline="$(wrk_field "$out" rps) req/s"
            requests=$(wrk_field "$out" requests); errors=$(wrk_field "$out" errors) ;;
        both|bothtls)
            local url="http://127.0.0.1:$(http_port "$target")/small"
            [ "$scenario" = both ] || url="https://127.0.0.1:$(tls_port "$target")/small"
            wrk -t2 -c64 -d"${DURATION}s" --latency "$url" > "$out" 2>&1 || true
            record "$scenario.rps" "$target" "$(wrk_field "$out" rps)"
            record "$scenario.p99" "$target" "$(wrk_field "$out" p99_ms)"
            headline="$(wrk_field "$out" rps) req/s"
            requests=$(wrk_field "$out" requests); errors=$(wrk_field "$out" errors) ;;
    esac
    after=$(cpu_ticks "$target")
    is_num "$requests" || requests=0
    is_num "$errors" || errors=0
    if [ "$target" != direct ] && [ "${requests%.*}" -gt 0 ]; then
        # proxy CPU-seconds per 100 000 requests
        record "$scenario.cpu" "$target" "$(awk -v t=$((after - before)) -v hz="$TICKS" -v n="$requests" 'BEGIN { printf "%.3f\n", t / hz / n * 100000 }')"
    fi
    record "$scenario.errors" "$target" "$errors"
    log "round $round  $scenario  $target: ${headline:-no result}, errors $errors (output: $out)"
}

run_idle() {
    local target=$1 round=$2
    local out="$WORK/runs/idle.$target.$round"
    stop_proxy "$target"
    start_proxy "$target"
    sleep 0.5
    local base
    base=$(rss_kib "$target")
    taskset -c 1 "$BENCH" -c"$IDLE_CONNS" -n"$IDLE_CONNS" --idle-gap "${IDLE_HOLD}s" --timeout 30s --json \
        "http://127.0.0.1:$(http_port "$target")/small" > "$out" 2>"$out.err" &
    local bench_pid=$!
    PIDS+=("$bench_pid")
    sleep "$IDLE_SAMPLE"
    local held
    held=$(rss_kib "$target")
    wait "$bench_pid" || true
    forget_pid "$bench_pid"
    local ok
    ok=$(json_field "$out" status.2xx)
    is_num "$ok" || ok=0
    record idle.rss "$target" "$(awk -v k="$held" 'BEGIN { printf "%.1f\n", k / 1024 }')"
    record idle.base "$target" "$(awk -v k="$base" 'BEGIN { printf "%.1f\n", k / 1024 }')"
    record idle.errors "$target" $((IDLE_CONNS - ok))
    log "round $round  idle  $target: RSS $((base / 1024)) MiB -> $((held / 1024)) MiB with $ok/$IDLE_CONNS connections answered"
}

LOAD_BEFORE=$(cut -d' ' -f1-3 /proc/loadavg)
# The proxies to start: those of the scenarios that run, and kaproxy, nginx, HAProxy for idle.
STARTED=()
case ",$ONLY," in *",idle,"*) STARTED+=("${PROXIES[@]}") ;; esac
for scenario in "${SCENARIOS[@]}"; do
    for t in $(scenario_targets "$scenario"); do
        [ "$t" = direct ] && continue
        case " ${STARTED[*]} " in *" $t "*) ;; *) STARTED+=("$t") ;; esac
    done
done
log "starting the backend and ${STARTED[*]} (work dir $WORK)"
start_backend backend
ran both && start_backend backend-both
for p in "${STARTED[@]}"; do
    if [ "$p" = kaproxy-up ]; then
        if ! start_proxy "$p" may-fail; then
            UP_SKIPPED="kaproxy passed \`check\` but did not start (see its log above)"
            UP_TARGETS="nginx-up haproxy-up"
        fi
    else
        start_proxy "$p"
    fi
done
# Warm-up: every target answers, connections are pooled.
for t in direct "${STARTED[@]}"; do
    [ "$t" = kaproxy-up ] && [ -n "$UP_SKIPPED" ] && continue
    if pinned "$t"; then
        taskset -c 1 wrk -t1 -c8 -d1s "http://127.0.0.1:$(http_port "$t")/small" >/dev/null 2>&1 || true
    else
        wrk -t2 -c8 -d1s "http://127.0.0.1:$(http_port "$t")/small" >/dev/null 2>&1 || true
    fi
done

for round in $(seq 1 "$ROUNDS"); do
    for scenario in "${SCENARIOS[@]}"; do
        for target in $(scenario_targets "$scenario"); do
            run_scenario "$scenario" "$target" "$round"
        done
    done
    case ",$ONLY," in *",idle,"*)
        for target in "${PROXIES[@]}"; do
            run_idle "$target" "$round"
        done ;;
    esac
done

# ---- report ----
median() { [ -s "$1" ] && sort -g "$1" | awk '{ v[NR] = $1 } END { if (NR % 2) print v[(NR + 1) / 2]; else printf "%.3f\n", (v[NR / 2] + v[NR / 2 + 1]) / 2 }' || echo "-"; }
sum() { [ -s "$1" ] && awk '{ s += $1 } END { print s + 0 }' "$1" || echo "-"; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (a == "-" || b == "-" || b + 0 == 0) print "-"; else printf "%.2f\n", a / b }'; }
fmt() { awk -v v="$1" -v d="$2" 'BEGIN { if (v == "-") print "-"; else printf "%." d "f\n", v }'; }

# KEY|LABEL|DIGITS[|KAPROXY-COLUMN-TARGET|SUFFIX]: the row's medians come from $RES/KEY.TARGET,
# with the kaproxy column's target (default kaproxy) and the nginx and HAProxy columns' targets
# nginxSUFFIX and haproxySUFFIX. The direct column is filled only for the plain kaproxy rows.
DEF="kaproxy default config"
ROWS=(
    "h1.rps|HTTP/1.1 keep-alive c=64, req/s|0"
    "h1.p99|HTTP/1.1 keep-alive c=64, p99 ms|3"
    "h1.cpu|HTTP/1.1 keep-alive c=64, proxy CPU-s / 100k req|3"
    "h1.rps|HTTP/1.1 keep-alive, $DEF, req/s|0|kaproxy-default"
    "h1.p99|HTTP/1.1 keep-alive, $DEF, p99 ms|3|kaproxy-default"
    "h1.cpu|HTTP/1.1 keep-alive, $DEF, proxy CPU-s / 100k req|3|kaproxy-default"
    "h1tls.rps|HTTPS/1.1 keep-alive c=64, req/s|0"
    "h1tls.p99|HTTPS/1.1 keep-alive c=64, p99 ms|3"
    "h1tls.cpu|HTTPS/1.1 keep-alive c=64, proxy CPU-s / 100k req|3"
    "h1tls.rps|HTTPS/1.1 keep-alive, $DEF, req/s|0|kaproxy-default"
    "h1tls.p99|HTTPS/1.1 keep-alive, $DEF, p99 ms|3|kaproxy-default"
    "h1tls.cpu|HTTPS/1.1 keep-alive, $DEF, proxy CPU-s / 100k req|3|kaproxy-default"
    "newconn.rps|TLS new connection per request, handshakes/s|0"
    "newconn.p99|TLS new connection per request, p99 ms|3"
    "newconn.cpu|TLS new connection per request, proxy CPU-s / 100k|2"
    "h2.rps|HTTP/2 over TLS (h2load -c16 -m4), req/s|0"
    "h2.cpu|HTTP/2 over TLS, proxy CPU-s / 100k req|3"
    "h2.rps|HTTP/2 over TLS, $DEF, req/s|0|kaproxy-default"
    "h2.cpu|HTTP/2 over TLS, $DEF, proxy CPU-s / 100k req|3|kaproxy-default"
    "big.mibs|1 MiB responses c=16, MiB/s|0"
    "big.cpu|1 MiB responses, proxy CPU-s / 100k req|1"
    "h1up.rps|TLS to the backend, HTTP/1.1 clients c=64, req/s|0|kaproxy-up|-up"
    "h1up.p99|TLS to the backend, p99 ms|3|kaproxy-up|-up"
    "h1up.cpu|TLS to the backend, proxy CPU-s / 100k req|3|kaproxy-up|-up"
    "both.rps|Both cores, defaults, HTTP/1.1 c=64, req/s|0|kaproxy-both|-both"
    "both.p99|Both cores, defaults, HTTP/1.1, p99 ms|3|kaproxy-both|-both"
    "both.cpu|Both cores, defaults, HTTP/1.1, proxy CPU-s / 100k req|3|kaproxy-both|-both"
    "bothtls.rps|Both cores, defaults, HTTPS/1.1 c=64, req/s|0|kaproxy-both|-both"
    "bothtls.p99|Both cores, defaults, HTTPS/1.1, p99 ms|3|kaproxy-both|-both"
    "bothtls.cpu|Both cores, defaults, HTTPS/1.1, proxy CPU-s / 100k req|3|kaproxy-both|-both"
    "idle.base|RSS before the idle connections, MiB|1"
    "idle.rss|RSS holding $IDLE_CONNS idle keep-alive connections, MiB|1"
)
# SCENARIO|LABEL|KAPROXY-COLUMN-TARGET|SUFFIX, as above.
ERROR_ROWS=(
    "h1|errors in h1 (all rounds)"
    "h1|errors in h1, $DEF|kaproxy-default"
    "h1tls|errors in h1tls (all rounds)"
    "h1tls|errors in h1tls, $DEF|kaproxy-default"
    "newconn|errors in newconn (all rounds)"
    "h2|errors in h2 (all rounds)"
    "h2|errors in h2, $DEF|kaproxy-default"
    "big|errors in big (all rounds)"
    "h1up|errors in h1up (all rounds)|kaproxy-up|-up"
    "both|errors in both (all rounds)|kaproxy-both|-both"
    "bothtls|errors in bothtls (all rounds)|kaproxy-both|-both"
    "idle|errors in idle (all rounds)"
)
# Rows of the scenarios that ran only.
row_ran() { local s=${1%%.*}; [ "$s" = idle ] && case ",$ONLY," in *",idle,"*) return 0 ;; *) return 1 ;; esac; ran "$s"; }
table() {
    echo "| scenario, metric | direct | kaproxy | nginx | HAProxy | kaproxy/nginx | kaproxy/HAProxy |"
    echo "|---|---:|---:|---:|---:|---:|---:|"
    local row key label digits kt sfx k n h d
    for row in "${ROWS[@]}"; do
        IFS='|' read -r key label digits kt sfx <<<"$row"
        row_ran "$key" || continue
        kt=${kt:-kaproxy}
        d=-
        [ "$kt" = kaproxy ] && d=$(median "$RES/$key.direct" 2>/dev/null || echo -)
        k=$(median "$RES/$key.$kt"); n=$(median "$RES/$key.nginx$sfx"); h=$(median "$RES/$key.haproxy$sfx")
        echo "| $label | $(fmt "$d" "$digits") | $(fmt "$k" "$digits") | $(fmt "$n" "$digits") | $(fmt "$h" "$digits") | $(ratio "$k" "$n") | $(ratio "$k" "$h") |"
    done
    local s
    for row in "${ERROR_ROWS[@]}"; do
        IFS='|' read -r s label kt sfx <<<"$row"
        row_ran "$s" || continue
        kt=${kt:-kaproxy}
        d=-
        [ "$kt" = kaproxy ] && d=$(sum "$RES/$s.errors.direct")
        echo "| $label | $d | $(sum "$RES/$s.errors.$kt") | $(sum "$RES/$s.errors.nginx$sfx") | $(sum "$RES/$s.errors.haproxy$sfx") | | |"
    done
}

check() { # description, verdict expression over medians
    local desc=$1 ok=$2
    if [ "$ok" = 1 ]; then echo "- [x] $desc"; else echo "- [ ] $desc"; fi
}
ge() { awk -v a="$1" -v b="$2" -v f="$3" 'BEGIN { print (a != "-" && b != "-" && a + 0 >= (b + 0) * f) ? 1 : 0 }'; }
le() { awk -v a="$1" -v b="$2" -v f="$3" 'BEGIN { print (a != "-" && b != "-" && a + 0 <= (b + 0) * f) ? 1 : 0 }'; }
m() { median "$RES/$1.$2"; }
# The checks of the scenarios that ran.
targets() {
    if ran h1; then
    check "HTTP/1.1 plain req/s >= 1.2x nginx ($(m h1.rps kaproxy) vs $(m h1.rps nginx))" "$(ge "$(m h1.rps kaproxy)" "$(m h1.rps nginx)" 1.2)"
    check "HTTP/1.1 plain CPU/request <= 0.85x nginx ($(m h1.cpu kaproxy) vs $(m h1.cpu nginx))" "$(le "$(m h1.cpu kaproxy)" "$(m h1.cpu nginx)" 0.85)"
    check "HTTP/1.1 plain p99 <= nginx ($(m h1.p99 kaproxy) vs $(m h1.p99 nginx) ms)" "$(le "$(m h1.p99 kaproxy)" "$(m h1.p99 nginx)" 1)"
    fi
    if ran h1tls; then
    check "HTTPS/1.1 req/s >= 1.2x nginx ($(m h1tls.rps kaproxy) vs $(m h1tls.rps nginx))" "$(ge "$(m h1tls.rps kaproxy)" "$(m h1tls.rps nginx)" 1.2)"
    check "HTTPS/1.1 CPU/request <= 0.85x nginx ($(m h1tls.cpu kaproxy) vs $(m h1tls.cpu nginx))" "$(le "$(m h1tls.cpu kaproxy)" "$(m h1tls.cpu nginx)" 0.85)"
    check "HTTPS/1.1 p99 <= nginx ($(m h1tls.p99 kaproxy) vs $(m h1tls.p99 nginx) ms)" "$(le "$(m h1tls.p99 kaproxy)" "$(m h1tls.p99 nginx)" 1)"
    fi
    if ran newconn; then
    check "TLS handshakes/s >= nginx ($(m newconn.rps kaproxy) vs $(m newconn.rps nginx))" "$(ge "$(m newconn.rps kaproxy)" "$(m newconn.rps nginx)" 1)"
    check "TLS CPU/handshake <= 0.8x nginx ($(m newconn.cpu kaproxy) vs $(m newconn.cpu nginx))" "$(le "$(m newconn.cpu kaproxy)" "$(m newconn.cpu nginx)" 0.8)"
    fi
    if ran h2; then
    check "HTTP/2 req/s >= 1.1x HAProxy ($(m h2.rps kaproxy) vs $(m h2.rps haproxy))" "$(ge "$(m h2.rps kaproxy)" "$(m h2.rps haproxy)" 1.1)"
    fi
    if ran big; then
    check "1 MiB throughput >= nginx ($(m big.mibs kaproxy) vs $(m big.mibs nginx) MiB/s)" "$(ge "$(m big.mibs kaproxy)" "$(m big.mibs nginx)" 1)"
    fi
    case ",$ONLY," in *",idle,"*)
    check "RSS with $IDLE_CONNS idle connections <= nginx ($(m idle.rss kaproxy) vs $(m idle.rss nginx) MiB)" "$(le "$(m idle.rss kaproxy)" "$(m idle.rss nginx)" 1)" ;;
    esac
}
# Issue 10's: the one-core targets with kaproxy's default config too, and both cores.
targets_defaults() {
    local k=kaproxy-default
    if ran h1; then
    check "$DEF: HTTP/1.1 plain req/s >= 1.2x nginx ($(m h1.rps $k) vs $(m h1.rps nginx))" "$(ge "$(m h1.rps $k)" "$(m h1.rps nginx)" 1.2)"
    check "$DEF: HTTP/1.1 plain CPU/request <= 0.85x nginx ($(m h1.cpu $k) vs $(m h1.cpu nginx))" "$(le "$(m h1.cpu $k)" "$(m h1.cpu nginx)" 0.85)"
    check "$DEF: HTTP/1.1 plain p99 <= nginx ($(m h1.p99 $k) vs $(m h1.p99 nginx) ms)" "$(le "$(m h1.p99 $k)" "$(m h1.p99 nginx)" 1)"
    fi
    if ran h1tls; then
    check "$DEF: HTTPS/1.1 req/s >= 1.2x nginx ($(m h1tls.rps $k) vs $(m h1tls.rps nginx))" "$(ge "$(m h1tls.rps $k)" "$(m h1tls.rps nginx)" 1.2)"
    check "$DEF: HTTPS/1.1 CPU/request <= 0.85x nginx ($(m h1tls.cpu $k) vs $(m h1tls.cpu nginx))" "$(le "$(m h1tls.cpu $k)" "$(m h1tls.cpu nginx)" 0.85)"
    check "$DEF: HTTPS/1.1 p99 <= nginx ($(m h1tls.p99 $k) vs $(m h1tls.p99 nginx) ms)" "$(le "$(m h1tls.p99 $k)" "$(m h1tls.p99 nginx)" 1)"
    fi
    if ran both; then
    check "Both cores, defaults: HTTP/1.1 CPU/request <= nginx ($(m both.cpu kaproxy-both) vs $(m both.cpu nginx-both))" "$(le "$(m both.cpu kaproxy-both)" "$(m both.cpu nginx-both)" 1)"
    check "Both cores, defaults: HTTPS/1.1 CPU/request <= nginx ($(m bothtls.cpu kaproxy-both) vs $(m bothtls.cpu nginx-both))" "$(le "$(m bothtls.cpu kaproxy-both)" "$(m bothtls.cpu nginx-both)" 1)"
    fi
}

LOAD_AFTER=$(cut -d' ' -f1-3 /proc/loadavg)
cpu_model=$(awk -F': ' '/^model name/ { print $2; exit }' /proc/cpuinfo)
nginx_v=$("$NGINX" -v 2>&1 | sed 's/^nginx version: //')
# sed, not head: head would close the pipe early and pipefail would end the script.
haproxy_v=$("$HAPROXY" -v 2>/dev/null | sed -n 1p || true)
wrk_v=$(wrk -v 2>&1 | sed -n 1p || true)
h2load_v=$(h2load --version 2>&1 | sed -n 1p || true)
openssl_v=$(openssl version)
rustc_v=$(rustc --version)
kaproxy_v=$(cd "$ROOT" && git rev-parse --short HEAD 2>/dev/null || echo unknown)
kaproxy_dirty=$(cd "$ROOT" && git status --porcelain -- src Cargo.toml 2>/dev/null | wc -l)

TABLE=$(table)
TARGET_CHECKS=$(targets)
DEFAULT_CHECKS=$(targets_defaults)
[ -n "$TARGET_CHECKS" ] || TARGET_CHECKS="(none of their scenarios ran)"
[ -n "$DEFAULT_CHECKS" ] || DEFAULT_CHECKS="(none of their scenarios ran)"
SKIP_NOTE=""
if ran h1up && [ -n "$UP_SKIPPED" ]; then
    SKIP_NOTE="kaproxy was left out of the TLS-to-the-backend rows: $UP_SKIPPED."
fi
KAPROXY_BUILT="kaproxy $kaproxy_v$( [ "$kaproxy_dirty" -gt 0 ] && echo " (with uncommitted changes in src/)" || true ) built with $rustc_v, release profile"
[ -z "${KAPROXY_BIN:-}" ] || KAPROXY_BUILT="kaproxy: \`KAPROXY_BIN=$KAPROXY_BIN\` (kaproxy-bench from $kaproxy_v, $rustc_v)"
# The configurations of the targets that ran, for the report.
config_details() {
    local t file lang
    for t in kaproxy kaproxy-default nginx haproxy "${STARTED[@]}" backend backend-both; do
        case " $t " in *" kaproxy-default "*) ran h1 || ran h1tls || ran h2 || continue ;; esac
        case $t in
            kaproxy*) file="$WORK/$t.toml"; lang=toml ;;
            nginx*|backend*) file="$WORK/$t/nginx.conf"; lang=nginx ;;
            haproxy*) file="$WORK/$t.cfg"; lang="" ;;
        esac
        [ -f "$file" ] || continue
        case "${SHOWN:-} " in *" $t "*) continue ;; esac
        SHOWN="${SHOWN:-} $t"
        printf '<details><summary>%s</summary>\n\n```%s\n%s\n```\n</details>\n\n' \
            "$(config_title "$t")" "$lang" "$(sed "s|$WORK|\$WORK|g" "$file")"
    done
}
config_title() {
    case $1 in
        kaproxy) echo "kaproxy.toml" ;;
        kaproxy-default) echo "kaproxy-default.toml (kaproxy default config: no [runtime] table)" ;;
        kaproxy-both) echo "kaproxy-both.toml (both cores)" ;;
        kaproxy-up) echo "kaproxy-up.toml (TLS to the backend)" ;;
        nginx) echo "nginx.conf (proxy)" ;;
        nginx-both) echo "nginx.conf (proxy, both cores)" ;;
        nginx-up) echo "nginx.conf (proxy, TLS to the backend)" ;;
        haproxy) echo "haproxy.cfg" ;;
        haproxy-both) echo "haproxy.cfg (both cores)" ;;
        haproxy-up) echo "haproxy.cfg (TLS to the backend)" ;;
        backend) echo "nginx.conf (backend)" ;;
        backend-both) echo "nginx.conf (backend, both cores)" ;;
    esac
}
CONFIGS=$(config_details)
# Hand-written notes (profiles, causes of gaps) below this marker survive a new run.
NOTES_MARKER='<!-- Notes below this line are written by hand and kept by compare.sh. -->'
NOTES=""
if [ -f "$OUT" ]; then
    NOTES=$(awk -v m="$NOTES_MARKER" 'found { print } $0 == m { found = 1 }' "$OUT")
fi
{
    cat <<EOF
# kaproxy vs nginx vs HAProxy

Written by \`bench/compare.sh --rounds $ROUNDS --duration $DURATION\` on $(date -u '+%Y-%m-%d %H:%M UTC').
Medians of $ROUNDS interleaved rounds (each round runs every scenario against direct, kaproxy,
nginx, HAProxy in turn) of ${DURATION} s each. Absolute figures drift ±10–20 % between runs on this
machine; only the ratios of one run count. Scenarios: ${SCENARIOS[*]}$(case ",$ONLY," in *",idle,"*) echo " idle" ;; esac).

## Machine

- $(nproc) CPUs: $cpu_model; $(awk '/MemTotal/ { printf "%.0f GiB", $2 / 1048576 }' /proc/meminfo) RAM; kernel $(uname -r)
- $KAPROXY_BUILT
- nginx $nginx_v; $haproxy_v; $wrk_v; $h2load_v; $openssl_v
- load average (1/5/15 min) before the run: $LOAD_BEFORE, after: $LOAD_AFTER. The machine is shared;
  with the 2 cores busy only with this run the 1-minute figure stays near 2. Anything else running
  at the same time (builds, other benchmarks) shows up as noise in every column alike.

## Setup

- Each proxy pinned to CPU 0 (\`taskset -c 0\`) with one worker: kaproxy \`[runtime] worker_threads = 1\`,
  nginx \`worker_processes 1\`, HAProxy \`nbthread 1\`. Access logs off everywhere.
- Backend: nginx (one worker, CPU 1) serving static files: \`/small\` ($(stat -c %s "$WORK/www/small") bytes) and \`/1m\` (1 MiB);
  "direct" is the load generator against it (HTTP on :$BACKEND_HTTP, TLS + h2 on :$BACKEND_TLS).
- Load generators on CPU 1 with the backend. TLS: one ECDSA P-256 self-signed certificate for all,
  TLS 1.3 negotiated; upstream connections are plain HTTP/1.1 keep-alive for every proxy
  (nginx \`keepalive 256\`, HAProxy \`http-reuse always\`, kaproxy pool), with per-connection
  request limits raised to 1 000 000 on both sides so that no proxy reconnects for that reason.
- "kaproxy default config" rows (h1, h1tls, h2): a second kaproxy with the same config but no
  \`[runtime]\` table, as a user runs it (tokio's multi-thread scheduler with one worker per core the
  process may use: one, pinned), on CPU 0 like the others; measured in the same rounds.
- TLS to the backend (h1up): the clients speak plain HTTP/1.1 to the proxy, each proxy speaks TLS to
  the backend's TLS port, pinned and with one worker as above (nginx \`proxy_pass https://\` with
  \`proxy_ssl_session_reuse on\`, TLS 1.2–1.3, no verification, \`keepalive 256\`; HAProxy
  \`ssl verify none\` with its default session reuse and \`http-reuse always\`; kaproxy
  \`tls = true\`, \`tls_verify = false\`, its pool).
- Both cores, each proxy's defaults (both, bothtls): kaproxy with no \`[runtime]\` table, nginx
  \`worker_processes auto\`, HAProxy without \`nbthread\` (one thread per CPU), the other settings as
  above; nothing pinned, against a second backend (nginx, one worker, unpinned, :${HTTP_PORT[backend-both]}); wrk with
  two threads, unpinned. CPU per request sums every process and thread of the proxy.
- CPU: utime + stime of the proxy's processes (nginx master + workers; kaproxy's and HAProxy's
  threads are in their process's figures) from /proc, per 100 000 requests.
- RSS: VmRSS of the proxy's processes, freshly started, ${IDLE_SAMPLE} s after $IDLE_CONNS keep-alive clients
  each sent one request and then sat idle (kaproxy-bench holds them ${IDLE_HOLD} s).

## Commands (URL/PORT = the target's)

| scenario | load generator | command |
|---|---|---|
| HTTP/1.1 keep-alive | wrk (the common tool; fairer than our own client) | \`$WRK_CMD\` |
| HTTPS/1.1 keep-alive | wrk | same with https:// and the TLS port |
| TLS new connection per request | kaproxy-bench (wrk cannot open a connection per request) | \`$NEWCONN_CMD\` |
| HTTP/2 over TLS | h2load | \`$H2_CMD\` |
| 1 MiB responses | wrk | \`$WRK_1M_CMD\` |
| $IDLE_CONNS idle connections | kaproxy-bench | \`$IDLE_CMD\` |
| TLS to the backend | wrk | \`$WRK_CMD\` (plain HTTP to the proxy) |
| Both cores, defaults | wrk | \`$WRK_BOTH_CMD\`, and with https:// and the TLS port |

## Results

$TABLE

Ratios are kaproxy's median over the other's; for req/s and MiB/s higher is better, for p99, CPU and RSS lower is better.
In the "kaproxy default config", "TLS to the backend" and "Both cores" rows the kaproxy, nginx and
HAProxy columns are those setups' processes (see Setup). $SKIP_NOTE

## Targets (issue 3)

$TARGET_CHECKS

## Targets (issue 10: kaproxy's default config, both cores)

$DEFAULT_CHECKS

## Configurations

$CONFIGS
$NOTES_MARKER
EOF
    if [ -n "$NOTES" ]; then printf '%s\n' "$NOTES"; else printf '\n## Notes\n\n(none yet)\n'; fi
} > "$OUT.tmp"
mv "$OUT.tmp" "$OUT"

echo
echo "$TABLE"
[ -z "$SKIP_NOTE" ] || { echo; echo "$SKIP_NOTE"; }
echo
echo "Targets (issue 3):"
echo "$TARGET_CHECKS"
echo "Targets (issue 10: kaproxy's default config, both cores):"
echo "$DEFAULT_CHECKS"
echo
log "wrote $OUT"
