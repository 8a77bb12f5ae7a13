#!/usr/bin/env bash
# Slow clients against kaproxy, nginx and HAProxy in front of Apache prefork with 8 workers
# (issue 16): does a legitimate GET still get its answer within 1 s, how many attacker
# connections does each proxy close, and how much memory does each proxy take?
#
#   bench/slowclients.sh [--duration 40] [--only upload,download,both,h2] [--no-install]
#                        [--out bench/SLOW_CLIENTS.md] [--section TITLE]
#                        [--proxies kaproxy,nginx,haproxy] [--buffering auto|on|off]
#                        [--memory-limit BYTES] [--rss-slack BYTES] [--workers 8]
#                        [--apache-timeout 300] [--keep DIR]
#   KAPROXY_BIN=path/to/kaproxy bench/slowclients.sh ...   runs that build instead of this tree's
#   BENCH_BIN=path/to/kaproxy-bench ...   and that kaproxy-bench (nothing is built then)
#
# Scenarios (kaproxy-bench slow, all attackers opened at once, plus one legitimate GET / every
# 0.5 s on a fresh connection, deadline 1 s):
#   upload    12 slow uploaders: POST /upload.bin, Content-Length 4 MiB, 256 KiB at once, then
#             1 byte every 3 s
#   download  12 slow readers: GET /big.bin (48 MiB), SO_RCVBUF 4096 before connect, 4 KiB/s
#   both      the 12 uploaders and the 12 readers at once
#   h2        12 HTTP/2 connections over TLS (ALPN h2) x 200 POST streams that announce 4 MiB,
#             send 60 000 bytes and stall
# Every run starts a fresh Apache (kaproxy-bench apache: testkit's launcher, prefork with
# MaxRequestWorkers 8, Timeout 300 and KeepAliveTimeout 5 as Debian ships them, its own
# ServerRoot in a temp dir) and a fresh proxy; the proxy's RSS (its processes and their
# children, from /proc, every 0.5 s) is reported before the attack and at its peak, and
# kaproxy's /metrics (kaproxy_body_*, kaproxy_upstream_connections_*,
# kaproxy_pool_idle_connections, kaproxy_upstream_errors_total, kaproxy_server_up,
# kaproxy_requests_total) at the end of each scenario.
# The buffering keys of issue 16 ([upstreams.web] request_buffering, max_request_body_bytes,
# response_buffering, max_response_spill_bytes, [buffering] memory_limit, temp_dir) are written
# only when `kaproxy check` accepts them (--buffering auto), so the script runs on builds from
# before them too; --buffering off never writes them, --buffering on fails without them.
#
# "Done when" (issue 16), checked at the end of the report: with the uploaders and the readers
# at once (both) every legitimate GET through kaproxy is answered within 1 s, as through nginx,
# and in every scenario kaproxy's RSS grows by at most memory_limit + --rss-slack (32 MiB).
#
# Time: scenarios x proxies x (duration + about 12 s), 4 x 3 x 52 s ~ 11 minutes by default.
# Loopback only. Every process the script starts is stopped by PID when it exits (bench/lib.sh).
set -euo pipefail

DURATION=40
ONLY="upload,download,both,h2"
PROXY_LIST="kaproxy,nginx,haproxy"
INSTALL=1
BUFFERING=auto
MEMORY_LIMIT=$((32 << 20))
RSS_SLACK=$((32 << 20))
WORKERS=8
APACHE_TIMEOUT=300
SECTION=""
KEEP=""        # --keep DIR: the raw results (JSON per run), configs and logs are copied there
HERE="$(cd "$(dirname "$0")" && pwd)"
ROOT="$(cd "$HERE/.." && pwd)"
OUT="$HERE/SLOW_CLIENTS.md"

usage() { sed -n '2,/^set -euo/p' "$0" | sed -n 's/^# \{0,1\}//p'; }
while [ $# -gt 0 ]; do
    case "$1" in
        --duration) DURATION="$2"; shift 2 ;;
        --only) ONLY="$2"; shift 2 ;;
        --proxies) PROXY_LIST="$2"; shift 2 ;;
        --out) OUT="$2"; shift 2 ;;
        --section) SECTION="$2"; shift 2 ;;
        --no-install) INSTALL=0; shift ;;
        --buffering) BUFFERING="$2"; shift 2 ;;
        --memory-limit) MEMORY_LIMIT="$2"; shift 2 ;;
        --rss-slack) RSS_SLACK="$2"; shift 2 ;;
        --workers) WORKERS="$2"; shift 2 ;;
        --apache-timeout) APACHE_TIMEOUT="$2"; shift 2 ;;
        --keep) KEEP="$2"; shift 2 ;;
        -h|--help) usage; exit 0 ;;
        *) echo "unknown argument: $1" >&2; usage >&2; exit 2 ;;
    esac
done
[ "$DURATION" -ge 5 ] 2>/dev/null || { echo "--duration must be whole seconds >= 5" >&2; exit 2; }
[ "$WORKERS" -ge 1 ] 2>/dev/null || { echo "--workers must be a positive integer" >&2; exit 2; }
[ "$MEMORY_LIMIT" -ge 1 ] 2>/dev/null || { echo "--memory-limit must be bytes" >&2; exit 2; }
case $BUFFERING in auto|on|off) ;; *) echo "--buffering must be auto, on or off" >&2; exit 2 ;; esac

SCENARIOS=()
for s in upload download both h2; do
    case ",$ONLY," in *",$s,"*) SCENARIOS+=("$s") ;; esac
done
PROXIES=()
for p in kaproxy nginx haproxy; do
    case ",$PROXY_LIST," in *",$p,"*) PROXIES+=("$p") ;; esac
done
[ ${#SCENARIOS[@]} -gt 0 ] || { echo "--only names none of upload,download,both,h2" >&2; exit 2; }
[ ${#PROXIES[@]} -gt 0 ] || { echo "--proxies names none of kaproxy,nginx,haproxy" >&2; exit 2; }

# ---- ports (loopback only); Apache takes free ports of its own ----
declare -A HTTP_PORT=([kaproxy]=18281 [nginx]=18282 [haproxy]=18283)
declare -A TLS_PORT=([kaproxy]=18641 [nginx]=18642 [haproxy]=18643)
ADMIN_PORT=18901
BIG_LEN=$((48 << 20))
UPLOAD_FILE_LEN=1000

# log, install_missing, stop_pid, forget_pid, ports_free, wait_port, dev_certificate,
# release_binaries: bench/lib.sh.
. "$HERE/lib.sh"

# ---- tools ----
need_pkgs=()
[ -x /usr/sbin/apache2 ] || need_pkgs+=(apache2)
command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || need_pkgs+=(nginx)
command -v haproxy >/dev/null || [ -x /usr/sbin/haproxy ] || need_pkgs+=(haproxy)
command -v openssl >/dev/null || need_pkgs+=(openssl)
command -v jq >/dev/null || need_pkgs+=(jq)
command -v curl >/dev/null || need_pkgs+=(curl)
install_missing "${need_pkgs[@]}"
NGINX=$(command -v nginx || echo /usr/sbin/nginx)
HAPROXY=$(command -v haproxy || echo /usr/sbin/haproxy)
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

release_binaries "$ROOT"

WORK=$(mktemp -d /tmp/kaproxy-slow.XXXXXX)
chmod 755 "$WORK"
PIDS=()

cleanup() {
    local pid
    for pid in "${PIDS[@]}"; do stop_pid "$pid" 150; done
    if [ -n "$KEEP" ]; then
        mkdir -p "$KEEP" && cp -r "$WORK"/results "$WORK"/*.toml "$WORK"/*.cfg "$WORK"/*.log "$WORK"/nginx "$KEEP"/ 2>/dev/null || true
    fi
    rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM
trap 'echo "slowclients.sh: line $LINENO failed: $BASH_COMMAND" >&2' ERR

ports_free "${HTTP_PORT[@]}" "${TLS_PORT[@]}" $ADMIN_PORT

LOAD_BEFORE=$(cut -d' ' -f1-3 /proc/loadavg)

# ---- certificate (ECDSA P-256, every proxy's TLS listener) ----
dev_certificate "$WORK"
mkdir -p "$WORK/kaproxy-spill"

# ---- Apache (kaproxy-bench apache: testkit's launcher) ----
APACHE_PID=""
APACHE_ADDR=""
start_apache() {
    rm -f "$WORK/apache.addr"
    "$BENCH" apache --prefork "$WORKERS" --keepalive 5s --max-keepalive-requests 100 \
        --timeout "${APACHE_TIMEOUT}s" --file "big.bin=$BIG_LEN" --file "upload.bin=$UPLOAD_FILE_LEN" \
        --addr-file "$WORK/apache.addr" > "$WORK/apache.log" 2>&1 &
    APACHE_PID=$!
    PIDS+=("$APACHE_PID")
    for _ in $(seq 1 300); do
        [ -s "$WORK/apache.addr" ] && { APACHE_ADDR=$(cat "$WORK/apache.addr"); return 0; }
        kill -0 "$APACHE_PID" 2>/dev/null || break
        sleep 0.1
    done
    echo "Apache did not start:" >&2; cat "$WORK/apache.log" >&2; exit 1
}
stop_apache() {
    stop_pid "$APACHE_PID" 150
    forget_pid "$APACHE_PID"
}

# ---- kaproxy ----
# kaproxy_conf BUFFERING(0/1) FILE: the config, Apache at $APACHE_ADDR.
kaproxy_conf() {
    local buffering=$1 file=$2
    cat > "$file" <<EOF
[listen]
http = "127.0.0.1:${HTTP_PORT[kaproxy]}"
https = "127.0.0.1:${TLS_PORT[kaproxy]}"

[tls]
cert = "$WORK/cert.pem"
key = "$WORK/key.pem"

[downstream]
body_timeout = "10s"
send_timeout = "10s"

[upstreams.web]
servers = ["$APACHE_ADDR"]
keepalive_timeout = "5s"                # Apache's KeepAliveTimeout
EOF
    [ "$buffering" = 0 ] || cat >> "$file" <<EOF
request_buffering = true
max_request_body_bytes = $((16 << 20))      # nginx: client_max_body_size 16m
response_buffering = true
max_response_spill_bytes = $((1 << 30))     # nginx: proxy_max_temp_file_size 1024m

[buffering]
memory_limit = $MEMORY_LIMIT
temp_dir = "$WORK/kaproxy-spill"
EOF
    cat >> "$file" <<EOF

[admin]
listen = "127.0.0.1:$ADMIN_PORT"

[log]
level = "warn"
access_log = false
EOF
}
# Which config this build takes: with the buffering keys if `kaproxy check` accepts them.
KAPROXY_BUFFERING=0
BUFFERING_NOTE=""
APACHE_ADDR="127.0.0.1:9"   # any address will do for `check`
if [ "$BUFFERING" != off ]; then
    kaproxy_conf 1 "$WORK/kaproxy-check.toml"
    if "$KAPROXY" check --config "$WORK/kaproxy-check.toml" > "$WORK/kaproxy-check.out" 2>&1; then
        KAPROXY_BUFFERING=1
    else
        BUFFERING_NOTE=$(grep -m1 -iE 'buffering|memory_limit|temp_dir|max_re|unknown' "$WORK/kaproxy-check.out" \
            | sed 's/^ *//; s|'"$WORK"'|$WORK|g; s/, expected one of.*//' || true)
        [ -n "$BUFFERING_NOTE" ] || BUFFERING_NOTE=$(sed -n 1p "$WORK/kaproxy-check.out")
        [ "$BUFFERING" = auto ] || { echo "--buffering on: kaproxy check rejects the keys: $BUFFERING_NOTE" >&2; exit 1; }
        log "kaproxy: buffering keys left out (\`kaproxy check\` rejects them: $BUFFERING_NOTE)"
    fi
fi

# ---- nginx ----
nginx_conf() {
    mkdir -p "$WORK/nginx"
    cat > "$WORK/nginx/nginx.conf" <<EOF
user root;
worker_processes auto;
error_log $WORK/nginx/error.log warn;
pid $WORK/nginx/nginx.pid;
events { worker_connections 4096; }
http {
    access_log off;
    client_body_temp_path $WORK/nginx/body;
    proxy_temp_path $WORK/nginx/proxy;
    fastcgi_temp_path $WORK/nginx/fastcgi;
    uwsgi_temp_path $WORK/nginx/uwsgi;
    scgi_temp_path $WORK/nginx/scgi;
    client_body_timeout 10s;
    send_timeout 10s;
    # The default 1m would answer the 4 MiB uploads 413 at once; kaproxy's max_request_body_bytes.
    client_max_body_size 16m;
    # Otherwise nginx's defaults: proxy_request_buffering on, proxy_buffering on (bodies past
    # the memory buffers go to temp files, up to proxy_max_temp_file_size 1024m), HTTP/1.0
    # without keep-alive to the backend.
    server {
        listen 127.0.0.1:${HTTP_PORT[nginx]};
        listen 127.0.0.1:${TLS_PORT[nginx]} ssl http2;
        ssl_certificate $WORK/cert.pem;
        ssl_certificate_key $WORK/key.pem;
        location / {
            proxy_pass http://$APACHE_ADDR;
        }
    }
}
EOF
}

# ---- HAProxy ----
haproxy_conf() {
    cat > "$WORK/haproxy.cfg" <<EOF
global
    maxconn 4096
defaults
    mode http
    timeout connect 5s
    timeout client 10s
    timeout server 60s
    # Waits for the whole body, or until its buffer (tune.bufsize, 16 KiB) is full.
    option http-buffer-request
frontend fe
    bind 127.0.0.1:${HTTP_PORT[haproxy]}
    bind 127.0.0.1:${TLS_PORT[haproxy]} ssl crt $WORK/combined.pem alpn h2,http/1.1
    default_backend be
backend be
    server apache $APACHE_ADDR
EOF
}

PROXY_PID=""
start_proxy() {
    local name=$1
    case $name in
        kaproxy)
            kaproxy_conf "$KAPROXY_BUFFERING" "$WORK/kaproxy.toml"
            "$KAPROXY" run --config "$WORK/kaproxy.toml" > "$WORK/kaproxy.log" 2>&1 &
            ;;
        nginx)
            nginx_conf
            "$NGINX" -p "$WORK/nginx" -c "$WORK/nginx/nginx.conf" -g 'daemon off;' \
                > "$WORK/nginx/stdout.log" 2>&1 &
            ;;
        haproxy)
            haproxy_conf
            "$HAPROXY" -db -f "$WORK/haproxy.cfg" > "$WORK/haproxy.log" 2>&1 &
            ;;
    esac
    PROXY_PID=$!
    PIDS+=("$PROXY_PID")
    wait_port "${HTTP_PORT[$name]}" && wait_port "${TLS_PORT[$name]}" || {
        echo "--- $name did not start; its log:" >&2
        cat "$WORK/$name.log" "$WORK/$name"/*.log 2>/dev/null | tail -n 20 >&2 || true
        exit 1
    }
    # One GET through it: the proxy reaches Apache before the attack starts.
    local code
    code=$(curl -s -o /dev/null -w '%{http_code}' --max-time 5 "http://127.0.0.1:${HTTP_PORT[$name]}/" || true)
    [ "$code" = 200 ] || { echo "$name: GET / answered '$code', not 200" >&2; exit 1; }
}
stop_proxy() {
    stop_pid "$PROXY_PID" 150
    forget_pid "$PROXY_PID"
}

scenario_args() {
    local s=$1 p=$2
    case $s in
        upload) echo "--uploaders 12 --readers 0" ;;
        download) echo "--uploaders 0 --readers 12" ;;
        both) echo "--uploaders 12 --readers 12" ;;
        h2) echo "--uploaders 0 --readers 0 --h2-conns 12 --h2-streams 200 --h2-bytes 60000 --h2-url https://127.0.0.1:${TLS_PORT[$p]:-TLSPORT}/upload.bin" ;;
    esac
}
# kaproxy's metrics kept at the end of each scenario.
METRIC_PREFIXES="kaproxy_body_,kaproxy_upstream_connections_,kaproxy_pool_idle_connections,kaproxy_upstream_errors_total,kaproxy_server_up,kaproxy_requests_total"
COMMON_ARGS="-d ${DURATION}s --upload-path /upload.bin --read-path /big.bin --legit-path /"

RES="$WORK/results"
mkdir -p "$RES"
declare -A SHOWN_CONF=()
for s in "${SCENARIOS[@]}"; do
    for p in "${PROXIES[@]}"; do
        log "$s: $p ($DURATION s)"
        start_apache
        start_proxy "$p"
        metrics=()
        [ "$p" != kaproxy ] || metrics=(--metrics "http://127.0.0.1:$ADMIN_PORT/metrics" --metric-prefixes "$METRIC_PREFIXES")
        # shellcheck disable=SC2046
        # In the background and waited for, so that SIGINT/SIGTERM end the script at once.
        "$BENCH" slow $COMMON_ARGS $(scenario_args "$s" "$p") --rss-pid "$PROXY_PID" "${metrics[@]}" \
            --json "http://127.0.0.1:${HTTP_PORT[$p]}" > "$RES/$s.$p.json" 2> "$RES/$s.$p.err" &
        bench_pid=$!
        PIDS+=("$bench_pid")
        wait "$bench_pid" || { echo "kaproxy-bench slow failed ($s, $p):" >&2; cat "$RES/$s.$p.err" >&2; }
        forget_pid "$bench_pid"
        case $p in
            kaproxy) SHOWN_CONF[$p]=$(sed "s|$WORK|\$WORK|g; s|$APACHE_ADDR|APACHE|g" "$WORK/kaproxy.toml") ;;
            nginx) SHOWN_CONF[$p]=$(sed "s|$WORK|\$WORK|g; s|$APACHE_ADDR|APACHE|g" "$WORK/nginx/nginx.conf") ;;
            haproxy) SHOWN_CONF[$p]=$(sed "s|$WORK|\$WORK|g; s|$APACHE_ADDR|APACHE|g" "$WORK/haproxy.cfg") ;;
        esac
        # Did the proxy survive the run?
        kill -0 "$PROXY_PID" 2>/dev/null || echo "exited during the run" > "$RES/$s.$p.died"
        stop_proxy
        stop_apache
        [ -s "$RES/$s.$p.json" ] && jq -r '"    legit \(.legit.within_deadline)/\(.legit.sent) within 1 s, max \(.legit.max_latency_ms // "-") ms; RSS \(.rss.before_kib / 1024 | floor) -> \(.rss.peak_kib / 1024 | floor) MiB"' "$RES/$s.$p.json" >&2 || true
    done
done
LOAD_AFTER=$(cut -d' ' -f1-3 /proc/loadavg)

# ---- report ----
SCENARIO_LABEL_upload="upload: 12 slow uploaders"
SCENARIO_LABEL_download="download: 12 slow readers"
SCENARIO_LABEL_both="both: 12 uploaders + 12 readers"
SCENARIO_LABEL_h2="h2: 12 x 200 stalled streams"
label() { local v="SCENARIO_LABEL_$1"; echo "${!v}"; }

JQ_ROW='
def mib: . / 1024 * 10 | round / 10;
def ms: if . == null then "-" else (. | round | tostring) + " ms" end;
def closed: if .slots > 0 then (.closed_by_proxy | tostring) + " of " + (.opened | tostring) else "-" end;
def answered: [.answered | to_entries[] | "\(.key)x\(.value)"] | join(" ") | if . == "" then "" else " (" + . + ")" end;
def fin: if .fin_queued > 0 then " (\(.fin_queued) with the FIN queued)" else "" end;
[ "**\(.legit.within_deadline) of \(.legit.sent)**",
  "\(.legit.late) / \(.legit.unanswered) / \(.legit.errors + ([.legit.non_2xx[]] | add // 0))",
  (if .legit.unanswered > 0 then "> \(.legit.timeout_ms / 1000) s" else (.legit.max_latency_ms | ms) end),
  (.uploaders | closed) + (.uploaders | answered),
  (.readers | closed) + (.readers | answered) + (.readers | fin),
  (if .h2 then (.h2.streams.closed_by_proxy | tostring) + " of " + (.h2.streams.opened | tostring) + (.h2.streams | answered) + "; conns " + (.h2.connections_closed_by_proxy | tostring) else "-" end),
  "\(.rss.before_kib | mib) → \(.rss.peak_kib | mib)"
] | join(" | ")'
table() {
    echo "| scenario | proxy | legit GETs within 1 s | late / unanswered (5 s) / errors | max latency | uploads closed by the proxy (answers) | downloads closed by the proxy | h2 streams closed by the proxy; connections closed | RSS before → peak, MiB |"
    echo "|---|---|---:|---:|---:|---|---|---|---:|"
    local s p row
    for s in "${SCENARIOS[@]}"; do
        for p in "${PROXIES[@]}"; do
            if [ -s "$RES/$s.$p.json" ]; then
                row=$(jq -r "$JQ_ROW" "$RES/$s.$p.json")
            else
                row="(no result) | | | | | | "
            fi
            [ ! -f "$RES/$s.$p.died" ] || row="$row (the proxy exited during the run)"
            echo "| $(label "$s") | $p | $row |"
        done
    done
}
timelines() {
    local s p
    for s in "${SCENARIOS[@]}"; do
        for p in "${PROXIES[@]}"; do
            [ -s "$RES/$s.$p.json" ] || continue
            printf -- '- %s, %s: `%s`\n' "$s" "$p" "$(jq -r .legit.timeline "$RES/$s.$p.json")"
        done
    done
}
kaproxy_metrics() {
    local s
    case " ${PROXIES[*]} " in *" kaproxy "*) ;; *) return 0 ;; esac
    for s in "${SCENARIOS[@]}"; do
        [ -s "$RES/$s.kaproxy.json" ] || continue
        printf '<details><summary>%s: kaproxy /metrics at the end</summary>\n\n```\n' "$s"
        jq -r 'if .metrics then .metrics[] else "(not fetched: \(.metrics_error // "?"))" end' "$RES/$s.kaproxy.json" \
            | sed "s|$APACHE_ADDR|APACHE|g; s|127\.0\.0\.1:[0-9]*|APACHE|g"
        printf '```\n</details>\n\n'
    done
}
configs() {
    local p lang
    for p in "${PROXIES[@]}"; do
        [ -n "${SHOWN_CONF[$p]:-}" ] || continue
        case $p in kaproxy) lang=toml ;; nginx) lang=nginx ;; *) lang="" ;; esac
        printf '<details><summary>%s</summary>\n\n```%s\n%s\n```\n</details>\n\n' "$p" "$lang" "${SHOWN_CONF[$p]}"
    done
}

cpu_model=$(awk -F': ' '/^model name/ { print $2; exit }' /proc/cpuinfo)
nginx_v=$("$NGINX" -v 2>&1 | sed 's/^nginx version: nginx\///')
haproxy_v=$("$HAPROXY" -v 2>/dev/null | sed -n '1s/ - http.*//p' || true)
apache_v=$(/usr/sbin/apache2 -v 2>/dev/null | sed -n 's/^Server version: //p' || true)
rustc_v=$(rustc --version 2>/dev/null || echo "rustc (unknown)")
head_v=$(cd "$ROOT" && git rev-parse --short HEAD 2>/dev/null || echo unknown)
# --no-optional-locks: another git process at work in the tree must not fail the report.
dirty=$(cd "$ROOT" && { git --no-optional-locks status --porcelain -- src Cargo.toml 2>/dev/null || true; } | wc -l)
if [ -n "${KAPROXY_BIN:-}" ]; then
    KAPROXY_BUILT="kaproxy: \`KAPROXY_BIN=$KAPROXY_BIN\`$( [ -n "${KAPROXY_COMMIT:-}" ] && echo " (built from $KAPROXY_COMMIT)" || true ); kaproxy-bench $( [ -n "${BENCH_BIN:-}" ] && echo "\`BENCH_BIN=$BENCH_BIN\`, tree at" || echo from ) $head_v, $rustc_v"
else
    KAPROXY_BUILT="kaproxy $head_v$( [ "$dirty" -gt 0 ] && echo " (with uncommitted changes in src/)" || true ) built with $rustc_v, release profile"
fi
if [ "$KAPROXY_BUFFERING" = 1 ]; then
    BUF_LINE="kaproxy's buffering keys written (\`kaproxy check\` accepts them): memory_limit = $MEMORY_LIMIT bytes, temp_dir in \$WORK."
elif [ "$BUFFERING" = off ]; then
    BUF_LINE="kaproxy's buffering keys not written (\`--buffering off\`)."
else
    BUF_LINE="kaproxy's buffering keys not written: this build's \`kaproxy check\` rejects them (\`${BUFFERING_NOTE}\`)."
fi
[ -n "$SECTION" ] || SECTION="kaproxy $head_v"
BEGIN_MARK="<!-- section: $SECTION -->"
END_MARK="<!-- end of section: $SECTION -->"
TABLE=$(table)
# Issue 16's "done when", from the results of the scenarios that ran.
done_when() {
    local k n growth worst=0 s ok
    if [ -s "$RES/both.kaproxy.json" ]; then
        k=$(jq -r '"\(.legit.within_deadline) of \(.legit.sent)"' "$RES/both.kaproxy.json")
        n=$( [ -s "$RES/both.nginx.json" ] && jq -r '"\(.legit.within_deadline) of \(.legit.sent)"' "$RES/both.nginx.json" || echo "not run")
        ok=$(jq -r 'if .legit.sent > 0 and .legit.within_deadline == .legit.sent then "x" else " " end' "$RES/both.kaproxy.json")
        echo "- [$ok] both (12 uploaders + 12 readers): every legitimate GET through kaproxy answered within 1 s: $k (nginx: $n)"
    fi
    for s in "${SCENARIOS[@]}"; do
        [ -s "$RES/$s.kaproxy.json" ] || continue
        growth=$(jq -r '(.rss.peak_kib - .rss.before_kib) * 1024' "$RES/$s.kaproxy.json")
        [ "$growth" -le "$worst" ] || worst=$growth
    done
    [ -s "$RES/both.kaproxy.json" ] || [ "$worst" -gt 0 ] || return 0
    ok=" "; [ "$worst" -gt $((MEMORY_LIMIT + RSS_SLACK)) ] || ok=x
    local limit_note="memory_limit $((MEMORY_LIMIT >> 20)) MiB"
    [ "$KAPROXY_BUFFERING" = 1 ] || limit_note="$limit_note, not configured: this build has no [buffering]"
    echo "- [$ok] kaproxy's RSS grew by at most memory_limit + $((RSS_SLACK >> 20)) MiB in every scenario: at most $(awk -v b="$worst" 'BEGIN { printf "%.1f", b / 1048576 }') MiB ($limit_note)"
}
DONE_WHEN=$(done_when)
[ -n "$DONE_WHEN" ] || DONE_WHEN="(kaproxy did not run)"
SECTION_FILE="$WORK/section.md"
{
    cat <<EOF
$BEGIN_MARK
## $SECTION

Written by \`bench/slowclients.sh --duration $DURATION --only $(IFS=,; echo "${SCENARIOS[*]}") --proxies $(IFS=,; echo "${PROXIES[*]}")\` on $(date -u '+%Y-%m-%d %H:%M UTC').

- $(nproc) CPUs: $cpu_model; $(awk '/MemTotal/ { printf "%.0f GiB", $2 / 1048576 }' /proc/meminfo) RAM; kernel $(uname -r)
- $KAPROXY_BUILT
- $apache_v (prefork, MaxRequestWorkers $WORKERS, Timeout $APACHE_TIMEOUT, KeepAliveTimeout 5); nginx $nginx_v; $haproxy_v
- $BUF_LINE
- load average (1/5/15 min) before: $LOAD_BEFORE, after: $LOAD_AFTER (2 cores, shared with whatever else ran)

$TABLE

Issue 16's "done when":

$DONE_WHEN

Legitimate client: \`GET /\` (a 45-byte page) every 0.5 s on a fresh connection, open loop; "within
1 s" = the whole 2xx response within 1 s of the connect; a GET is waited for up to 5 s, so "max
latency" is "> 5 s" when some GET got nothing in 5 s ("unanswered").
"closed by the proxy" = attacker connections the proxy answered, closed or reset, out of those
opened (each is opened again 100 ms later); an answer's status is in brackets (e.g. 408x12).
A proxy that gives up on a slow reader closes its socket with megabytes still queued for it, so
its FIN would reach the reader only after minutes of reading 4 KiB/s: a reader checks
/proc/net/tcp every second and counts its connection closed ("with the FIN queued") as soon as
the proxy's side of it has left ESTABLISHED.
RSS: VmRSS of the proxy's processes (nginx's master and workers) before the attack and the
highest sample (every 0.5 s) during it.

Legitimate GETs in send order (\`.\` within 1 s, \`L\` late, \`x\` error or not 2xx, \`T\` unanswered):

$(timelines)

$(kaproxy_metrics)
Commands (PORT = the proxy's; \`kaproxy-bench apache\` started Apache on a free port first):

\`\`\`
$BENCH apache --prefork $WORKERS --keepalive 5s --max-keepalive-requests 100 --timeout ${APACHE_TIMEOUT}s --file big.bin=$BIG_LEN --file upload.bin=$UPLOAD_FILE_LEN --addr-file FILE
$(for s in "${SCENARIOS[@]}"; do echo "kaproxy-bench slow $COMMON_ARGS $(scenario_args "$s" PORT) --rss-pid PROXY_PID [--metrics http://127.0.0.1:$ADMIN_PORT/metrics] --json http://127.0.0.1:PORT"; done)
\`\`\`

Configurations (APACHE = Apache's address, \$WORK = the script's temp dir):

$(configs)
$END_MARK
EOF
} > "$SECTION_FILE"

# The file keeps every section; a run replaces the section of its title, or appends it.
if [ ! -f "$OUT" ]; then
    cat > "$OUT" <<'EOF'
# Slow clients in front of Apache prefork: kaproxy, nginx, HAProxy (issue 16)

Written by `bench/slowclients.sh` (see bench/README.md). Apache 2.4 with the prefork MPM and
`MaxRequestWorkers 8` (as with mod_php) serves a 48 MiB file (`/big.bin`), a small file that
also takes POST (`/upload.bin`: Apache's core handler reads the whole request body, then sends
the file) and `/`; kaproxy, nginx and HAProxy in turn proxy plain HTTP to it, each with 10 s
client body and send timeouts. Slow clients stay inside every timeout; a legitimate client asks
for `/` every 0.5 s. Each section below is one run of the script; a new run replaces the
section with the same title and keeps the others. Text outside the sections is kept too.
EOF
fi
if grep -qF "$BEGIN_MARK" "$OUT"; then
    awk -v b="$BEGIN_MARK" -v e="$END_MARK" -v f="$SECTION_FILE" '
        $0 == b { while ((getline line < f) > 0) print line; skip = 1; next }
        skip && $0 == e { skip = 0; next }
        !skip { print }' "$OUT" > "$OUT.tmp"
    mv "$OUT.tmp" "$OUT"
else
    { echo; cat "$SECTION_FILE"; } >> "$OUT"
fi

echo
echo "$TABLE"
echo
echo "$DONE_WHEN"
echo
log "wrote section \"$SECTION\" of $OUT"
