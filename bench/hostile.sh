#!/usr/bin/env bash
# Issue 17 ("Hostile input, part 2"), probed again as an attacker would: kaproxy beside nginx
# and HAProxy configured alike, each in front of the two recording backends that
# `kaproxy-bench probe` runs itself (adm: Host route.test + /admin..., web: everything else).
# Writes bench/HOSTILE.md: a row per case, a column per proxy (its answer and what reached which
# backend, with a grade), and whether kaproxy answers at least as well as nginx.
#
#   bench/hostile.sh [--only 1,2,...] [--no-install] [--out bench/HOSTILE.md]
#                    [--proxies kaproxy,nginx,haproxy] [--tunnel-wait 30] [--keep DIR]
#   KAPROXY_BIN=path/to/kaproxy bench/hostile.sh ...   runs that build instead of this tree's
#   BENCH_BIN=path/to/kaproxy-bench ...   and that kaproxy-bench (nothing is built then)
#
# Each proxy is started in turn on fixed loopback ports with the same routes, plain HTTP and
# TLS (one self-signed ECDSA certificate, ALPN h2 and http/1.1) and the same timers: request
# head 10 s (kaproxy [downstream] header_timeout, nginx client_header_timeout, HAProxy timeout
# http-request), idle tunnel 10 s (kaproxy tunnel_idle_timeout, nginx proxy_read_timeout in
# location /_be/ws, HAProxy timeout tunnel), response 5 s (kaproxy response_timeout, nginx
# proxy_read_timeout, HAProxy timeout server). Then `kaproxy-bench probe` sends cases 1-15 (and
# the routes' baseline, case 0) and the proxy is stopped. Case 13 (a slow upload) runs a second
# time against each proxy with request streaming: kaproxy request_buffering = false, nginx
# proxy_request_buffering off, HAProxy without option http-buffer-request.
#
# Time: about 1-2 minutes per proxy (case 7 waits up to --tunnel-wait, 30 s, case 11 up to
# 30 s, case 13 about 8 s), about 5 minutes in all after the build; every probe run is bounded
# by `timeout 600`, so the whole is at most proxies x 2 x 600 s.
# Loopback only. Every process the script starts is stopped by PID when it exits (bench/lib.sh).
set -euo pipefail

ONLY=""
PROXY_LIST="kaproxy,nginx,haproxy"
INSTALL=1
TUNNEL_WAIT=30
KEEP=""
HERE="$(cd "$(dirname "$0")" && pwd)"
ROOT="$(cd "$HERE/.." && pwd)"
OUT="$HERE/HOSTILE.md"
ARGS_SHOWN="$*"

usage() { sed -n '2,/^set -euo/p' "$0" | sed -n 's/^# \{0,1\}//p'; }
while [ $# -gt 0 ]; do
    case "$1" in
        --only) ONLY="$2"; shift 2 ;;
        --proxies) PROXY_LIST="$2"; shift 2 ;;
        --out) OUT="$2"; shift 2 ;;
        --no-install) INSTALL=0; shift ;;
        --tunnel-wait) TUNNEL_WAIT="$2"; shift 2 ;;
        --keep) KEEP="$2"; shift 2 ;;
        -h|--help) usage; exit 0 ;;
        *) echo "unknown argument: $1" >&2; usage >&2; exit 2 ;;
    esac
done
[ "$TUNNEL_WAIT" -ge 15 ] 2>/dev/null || { echo "--tunnel-wait must be whole seconds >= 15 (the tunnels idle out at 10 s)" >&2; exit 2; }
case "$ONLY" in ''|*[!0-9,-]*) [ -z "$ONLY" ] || { echo "--only takes case numbers like 1,2,13 or 1-6" >&2; exit 2; } ;; esac
PROXIES=()
for p in kaproxy nginx haproxy; do
    case ",$PROXY_LIST," in *",$p,"*) PROXIES+=("$p") ;; esac
done
[ ${#PROXIES[@]} -gt 0 ] || { echo "--proxies names none of kaproxy,nginx,haproxy" >&2; exit 2; }

# Does --only include case 13 (then the streamed variant runs too)?
wants_case() {
    local n=$1 part a b
    [ -n "$ONLY" ] || return 0
    IFS=, read -ra parts <<< "$ONLY"
    for part in "${parts[@]}"; do
        case $part in
            *-*) a=${part%-*}; b=${part#*-}; [ "$n" -ge "$a" ] && [ "$n" -le "$b" ] && return 0 ;;
            *) [ "$part" = "$n" ] && return 0 ;;
        esac
    done
    return 1
}

# ---- ports (loopback only) ----
declare -A HTTP_PORT=([kaproxy]=19381 [nginx]=19382 [haproxy]=19383)
declare -A TLS_PORT=([kaproxy]=19741 [nginx]=19742 [haproxy]=19743)
ADMIN_PORT=19951
ADM=127.0.0.1:19491
WEB=127.0.0.1:19492

# log, install_missing, stop_pid, forget_pid, ports_free, wait_port, dev_certificate,
# release_binaries: bench/lib.sh.
. "$HERE/lib.sh"

# ---- tools ----
need_pkgs=()
command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || need_pkgs+=(nginx)
command -v haproxy >/dev/null || [ -x /usr/sbin/haproxy ] || need_pkgs+=(haproxy)
command -v openssl >/dev/null || need_pkgs+=(openssl)
command -v jq >/dev/null || need_pkgs+=(jq)
command -v timeout >/dev/null || need_pkgs+=(coreutils)
install_missing "${need_pkgs[@]}"
NGINX=$(command -v nginx || echo /usr/sbin/nginx)
HAPROXY=$(command -v haproxy || echo /usr/sbin/haproxy)

release_binaries "$ROOT"

WORK=$(mktemp -d /tmp/kaproxy-hostile.XXXXXX)
chmod 755 "$WORK"
PIDS=()

cleanup() {
    local pid
    for pid in "${PIDS[@]}"; do stop_pid "$pid" 100; done
    if [ -n "$KEEP" ]; then
        mkdir -p "$KEEP" && cp -r "$WORK"/results "$WORK"/*.toml "$WORK"/*.cfg "$WORK"/*.log "$WORK"/nginx "$KEEP"/ 2>/dev/null || true
    fi
    rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM
trap 'echo "hostile.sh: line $LINENO failed: $BASH_COMMAND" >&2' ERR

ports_free "${HTTP_PORT[@]}" "${TLS_PORT[@]}" $ADMIN_PORT ${ADM##*:} ${WEB##*:}

# ---- certificate (ECDSA P-256, every proxy's TLS listener) ----
dev_certificate "$WORK"

# ---- configurations; VARIANT is buffered (every case) or streamed (case 13 again) ----
kaproxy_conf() {
    local variant=$1 file=$2 stream=""
    [ "$variant" = buffered ] || stream='request_buffering = false             # nginx proxy_request_buffering off'
    cat > "$file" <<EOF
[listen]
http = "127.0.0.1:${HTTP_PORT[kaproxy]}"
https = "127.0.0.1:${TLS_PORT[kaproxy]}"

[tls]
cert = "$WORK/cert.pem"
key = "$WORK/key.pem"

[downstream]
header_timeout = "10s"                 # nginx client_header_timeout, HAProxy timeout http-request

[upstreams.adm]
servers = ["$ADM"]
response_timeout = "5s"                # nginx proxy_read_timeout 5s, HAProxy timeout server 5s
tunnel_idle_timeout = "10s"            # nginx proxy_read_timeout 10s (/_be/ws), HAProxy timeout tunnel
$stream

[upstreams.web]
servers = ["$WEB"]
response_timeout = "5s"
tunnel_idle_timeout = "10s"
$stream

[[routes]]
host = "route.test"
path_prefix = "/admin"
upstream = "adm"

[[routes]]
upstream = "web"

[admin]
listen = "127.0.0.1:$ADMIN_PORT"

[log]
level = "warn"
access_log = false
EOF
}

nginx_conf() {
    local variant=$1 stream=""
    [ "$variant" = buffered ] || stream='proxy_request_buffering off;'
    mkdir -p "$WORK/nginx"
    cat > "$WORK/nginx/nginx.conf" <<EOF
user root;
worker_processes 1;
error_log $WORK/nginx/error.log warn;
pid $WORK/nginx/nginx.pid;
events { worker_connections 1024; }
http {
    access_log off;
    client_body_temp_path $WORK/nginx/body;
    proxy_temp_path $WORK/nginx/proxy;
    fastcgi_temp_path $WORK/nginx/fastcgi;
    uwsgi_temp_path $WORK/nginx/uwsgi;
    scgi_temp_path $WORK/nginx/scgi;
    client_header_timeout 10s;
    client_max_body_size 16m;
    proxy_read_timeout 5s;
    $stream
    # As kaproxy does: the client's Host, X-Forwarded-For, and WebSocket (any Upgrade) passed
    # through on every route (nginx's usual WebSocket configuration).
    proxy_http_version 1.1;
    proxy_set_header Host \$http_host;
    proxy_set_header X-Forwarded-For \$proxy_add_x_forwarded_for;
    proxy_set_header Upgrade \$http_upgrade;
    proxy_set_header Connection \$connection_upgrade;
    map \$http_upgrade \$connection_upgrade { default upgrade; '' close; }
    upstream adm { server $ADM; }
    upstream web { server $WEB; }
    ssl_certificate $WORK/cert.pem;
    ssl_certificate_key $WORK/key.pem;
    # nginx 1.22 offers TLS 1.0-1.2 by default; kaproxy and HAProxy offer 1.2 and 1.3.
    ssl_protocols TLSv1.2 TLSv1.3;
    server {
        listen 127.0.0.1:${HTTP_PORT[nginx]} default_server;
        listen 127.0.0.1:${TLS_PORT[nginx]} ssl http2 default_server;
        location / { proxy_pass http://web; }
        location /_be/ws { proxy_pass http://web; proxy_read_timeout 10s; }
    }
    server {
        listen 127.0.0.1:${HTTP_PORT[nginx]};
        listen 127.0.0.1:${TLS_PORT[nginx]} ssl http2;
        server_name route.test;
        location / { proxy_pass http://web; }
        location /admin { proxy_pass http://adm; }
        location /_be/ws { proxy_pass http://web; proxy_read_timeout 10s; }
    }
}
EOF
}

haproxy_conf() {
    local variant=$1 buffer="    option http-buffer-request"
    [ "$variant" = buffered ] || buffer="    # no option http-buffer-request: bodies stream"
    cat > "$WORK/haproxy.cfg" <<EOF
global
    maxconn 1024
defaults
    mode http
    timeout connect 5s
    timeout client 60s
    timeout server 5s
    timeout tunnel 10s
    timeout http-request 10s
$buffer
frontend fe
    bind 127.0.0.1:${HTTP_PORT[haproxy]}
    bind 127.0.0.1:${TLS_PORT[haproxy]} ssl crt $WORK/combined.pem alpn h2,http/1.1
    acl route_host hdr_reg(host) -i ^route\\.test\\.?(:[0-9]*)?\$
    acl admin_path path_beg /admin
    use_backend adm if route_host admin_path
    default_backend web
backend adm
    server adm $ADM
backend web
    server web $WEB
EOF
}

conf_file() {
    case $1 in
        kaproxy) echo "$WORK/kaproxy.toml" ;;
        nginx) echo "$WORK/nginx/nginx.conf" ;;
        haproxy) echo "$WORK/haproxy.cfg" ;;
    esac
}

PROXY_PID=""
start_proxy() {
    local name=$1 variant=$2 port
    # Checked again before every start: another process taking a port meanwhile would mix its
    # traffic into the results.
    for port in "${HTTP_PORT[$name]}" "${TLS_PORT[$name]}" $ADMIN_PORT ${ADM##*:} ${WEB##*:}; do
        if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
            echo "port 127.0.0.1:$port is in use by another process: stopping" >&2; exit 1
        fi
    done
    case $name in
        kaproxy)
            kaproxy_conf "$variant" "$WORK/kaproxy.toml"
            "$KAPROXY" check --config "$WORK/kaproxy.toml" > "$WORK/kaproxy-check.log" 2>&1 || {
                echo "kaproxy check rejects the config:" >&2; cat "$WORK/kaproxy-check.log" >&2; exit 1; }
            "$KAPROXY" run --config "$WORK/kaproxy.toml" > "$WORK/kaproxy.$variant.log" 2>&1 &
            ;;
        nginx)
            nginx_conf "$variant"
            "$NGINX" -p "$WORK/nginx" -c "$WORK/nginx/nginx.conf" -g 'daemon off;' \
                > "$WORK/nginx/stdout.$variant.log" 2>&1 &
            ;;
        haproxy)
            haproxy_conf "$variant"
            "$HAPROXY" -db -f "$WORK/haproxy.cfg" > "$WORK/haproxy.$variant.log" 2>&1 &
            ;;
    esac
    PROXY_PID=$!
    PIDS+=("$PROXY_PID")
    wait_port "${HTTP_PORT[$name]}" && wait_port "${TLS_PORT[$name]}" || {
        echo "--- $name did not start; its log:" >&2
        cat "$WORK/$name.$variant.log" "$WORK/$name"/*.log 2>/dev/null | tail -n 20 >&2 || true
        exit 1
    }
}
stop_proxy() {
    stop_pid "$PROXY_PID" 100
    forget_pid "$PROXY_PID"
}

RES="$WORK/results"
mkdir -p "$RES"
declare -A SHOWN_CONF=()
PROBE_COMMON="--adm $ADM --web $WEB --tunnel-wait ${TUNNEL_WAIT}s --tunnel-idle 10s --header-wait 30s --header-timeout 10s --response-timeout 5s --timeout 5s"
# run_probe PROXY VARIANT ONLY OUTFILE
run_probe() {
    local p=$1 variant=$2 only=$3 out=$4 only_args=()
    [ -z "$only" ] || only_args=(--only "$only")
    log "$p ($variant)${only:+: cases $only}"
    start_proxy "$p" "$variant"
    # shellcheck disable=SC2086
    # In the background and waited for, so that SIGINT/SIGTERM end the script at once.
    timeout --kill-after=5 600 "$BENCH" probe --name "$p" --http "127.0.0.1:${HTTP_PORT[$p]}" \
        --https "127.0.0.1:${TLS_PORT[$p]}" $PROBE_COMMON "${only_args[@]}" --json \
        > "$out" 2> "${out%.json}.err" &
    local probe_pid=$!
    PIDS+=("$probe_pid")
    wait "$probe_pid" || { echo "kaproxy-bench probe failed ($p, $variant):" >&2; tail -n 20 "${out%.json}.err" >&2; }
    forget_pid "$probe_pid"
    kill -0 "$PROXY_PID" 2>/dev/null || echo "exited during the run" > "${out%.json}.died"
    if [ "$variant" = buffered ]; then
        SHOWN_CONF[$p]=$(sed "s|$WORK|\$WORK|g" "$(conf_file "$p")")
    else
        SHOWN_CONF[$p.streamed]=$(sed "s|$WORK|\$WORK|g" "$(conf_file "$p")")
    fi
    stop_proxy
}

for p in "${PROXIES[@]}"; do
    run_probe "$p" buffered "$ONLY" "$RES/$p.json"
    if wants_case 13; then
        run_probe "$p" streamed 13 "$RES/$p.streamed.json"
    fi
done

# ---- report ----
cell() {   # cell PROXY CASE [streamed]
    local f="$RES/$1.json"
    [ -z "${3:-}" ] || f="$RES/$1.streamed.json"
    [ -s "$f" ] || { echo "(no result)"; return; }
    jq -r --argjson c "$2" '
        def md: gsub("\\|"; "\\|") | gsub("_"; "\\_") | gsub("\\*"; "\\*") | gsub("<"; "&lt;");
        [.cases[] | select(.case == $c)] | if length == 0 then "(not run)"
        else .[0] | "\(.cell | md)<br>**\(.score)**: \(.grade | md)" end' "$f"
}
score() {  # score PROXY CASE [streamed]
    local f="$RES/$1.json"
    [ -z "${3:-}" ] || f="$RES/$1.streamed.json"
    [ -s "$f" ] || { echo ""; return; }
    jq -r --argjson c "$2" '[.cases[] | select(.case == $c)] | if length == 0 then "" else .[0].score end' "$f"
}
title() {
    local f
    for f in "$RES"/*.json; do
        [ -s "$f" ] || continue
        jq -r --argjson c "$1" '[.cases[] | select(.case == $c)] | if length == 0 then empty else .[0].title end' "$f" \
            | sed 's/|/\\|/g; s/_/\\_/g; s/\*/\\*/g' && return
    done
}
has() { case " ${PROXIES[*]} " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }
VERDICT_YES=0
VERDICT_ALL=0
NOT_AS_WELL=""
verdict() {  # verdict CASE [streamed]
    local k n
    if [ "$1" = 0 ]; then echo "(the routes' baseline)"; return; fi
    has kaproxy && has nginx || { echo "—"; return; }
    k=$(score kaproxy "$1" "${2:-}"); n=$(score nginx "$1" "${2:-}")
    [ -n "$k" ] && [ -n "$n" ] || { echo "—"; return; }
    if [ "$k" -gt "$n" ]; then echo "yes (better: $k vs $n)"
    elif [ "$k" -eq "$n" ]; then echo "yes (alike: $k)"
    else echo "**no** ($k vs $n)"
    fi
}
table() {
    local header="| # | case |" sep="|---|---|" c row label
    for p in "${PROXIES[@]}"; do header="$header $p |"; sep="$sep---|"; done
    echo "$header kaproxy at least as well as nginx? |"
    echo "$sep---|"
    local rows=(0 1 2 3 4 5 6 7 8 9 10 11 12 13 13s 14 15)
    for c in "${rows[@]}"; do
        local n=${c%s} streamed=""
        [ "$c" = "$n" ] || streamed=1
        if [ -n "$streamed" ]; then
            [ -s "$RES/${PROXIES[0]}.streamed.json" ] || continue
            label="$(title 13) — **streamed** (kaproxy request\\_buffering = false, nginx proxy\\_request\\_buffering off, HAProxy without http-buffer-request)"
        else
            [ "$n" = 0 ] || wants_case "$n" || continue
            label=$(title "$n")
            [ "$n" != 13 ] || label="$label — buffered (each proxy's default)"
        fi
        row="| $c | $label |"
        for p in "${PROXIES[@]}"; do row="$row $(cell "$p" "$n" "$streamed") |"; done
        row="$row $(verdict "$n" "$streamed") |"
        echo "$row"
    done
}
count_verdicts() {
    local c n streamed k ng
    has kaproxy && has nginx || return 0
    for c in 1 2 3 4 5 6 7 8 9 10 11 12 13 13s 14 15; do
        n=${c%s}; streamed=""; [ "$c" = "$n" ] || streamed=1
        k=$(score kaproxy "$n" "$streamed"); ng=$(score nginx "$n" "$streamed")
        [ -n "$k" ] && [ -n "$ng" ] || continue
        VERDICT_ALL=$((VERDICT_ALL + 1))
        if [ "$k" -ge "$ng" ]; then VERDICT_YES=$((VERDICT_YES + 1)); else NOT_AS_WELL="$NOT_AS_WELL $c"; fi
    done
}
configs() {
    local key lang
    for key in kaproxy kaproxy.streamed nginx nginx.streamed haproxy haproxy.streamed; do
        [ -n "${SHOWN_CONF[$key]:-}" ] || continue
        case $key in kaproxy*) lang=toml ;; nginx*) lang=nginx ;; *) lang="" ;; esac
        printf '<details><summary>%s</summary>\n\n```%s\n%s\n```\n</details>\n\n' \
            "${key/.streamed/ (case 13 again, streamed)}" "$lang" "${SHOWN_CONF[$key]}"
    done
}
died() {
    local f
    for f in "$RES"/*.died; do
        [ -e "$f" ] || continue
        echo "- **$(basename "${f%.died}") exited during its run.**"
    done
}

TABLE=$(table)
count_verdicts
cpu_model=$(awk -F': ' '/^model name/ { print $2; exit }' /proc/cpuinfo)
nginx_v=$("$NGINX" -v 2>&1 | sed 's/^nginx version: nginx\///')
nginx_ssl=$("$NGINX" -V 2>&1 | sed -n 's/^built with //p' | head -n1)
haproxy_v=$("$HAPROXY" -v 2>/dev/null | sed -n '1s/ - http.*//p' || true)
rustc_v=$(rustc --version 2>/dev/null || echo "rustc (unknown)")
head_v=$(cd "$ROOT" && git rev-parse --short HEAD 2>/dev/null || echo unknown)
# --no-optional-locks: another git process at work in the tree must not fail the report.
dirty=$(cd "$ROOT" && { git --no-optional-locks status --porcelain -- src Cargo.toml 2>/dev/null || true; } | wc -l)
if [ -n "${KAPROXY_BIN:-}" ]; then
    KAPROXY_BUILT="kaproxy: \`KAPROXY_BIN=$KAPROXY_BIN\`; kaproxy-bench from $head_v"
else
    KAPROXY_BUILT="kaproxy $head_v$( [ "$dirty" -gt 0 ] && echo " (with uncommitted changes in src/ by others at the time)" || true ) built with $rustc_v, release profile"
fi
if [ "$VERDICT_ALL" -gt 0 ]; then
    SUMMARY="kaproxy answers at least as well as nginx in **$VERDICT_YES of $VERDICT_ALL** rows."
    [ -z "$NOT_AS_WELL" ] || SUMMARY="$SUMMARY Not as well:$(echo "$NOT_AS_WELL" | sed 's/ /, /g; s/^, / /') (see the row's grades)."
else
    SUMMARY="(kaproxy and nginx did not both run: no verdicts)"
fi

mkdir -p "$(dirname "$OUT")"
{
    cat <<EOF
# Hostile input, part 2 (issue 17): kaproxy beside nginx and HAProxy

Written by \`bench/hostile.sh${ARGS_SHOWN:+ $ARGS_SHOWN}\` on $(date -u '+%Y-%m-%d %H:%M UTC').
Each case of the issue is sent again as an attacker would, by \`kaproxy-bench probe\`
(\`bench/src/probe/\`), to each proxy in turn, every proxy in front of the same two recording
backends that the probe itself runs: \`adm\` gets \`Host: route.test\` with a path under
\`/admin\`, \`web\` everything else. Raw HTTP/1.1 bytes go to the plain listener, raw HTTP/2 frames
(ALPN h2, the certificate not verified) and the TLS handshakes of case 15 to the TLS listener;
each case on fresh connections, one after the other.

- $(nproc) CPUs: $cpu_model; kernel $(uname -r)
- $KAPROXY_BUILT
- nginx $nginx_v ($nginx_ssl); $haproxy_v
- the same routes and timers everywhere: request head 10 s, idle tunnel 10 s (watched for up to
  $TUNNEL_WAIT s), response 5 s; nginx and HAProxy otherwise with their defaults (nginx passes
  the client's \`Host\` and any \`Upgrade\` on every route, as its WebSocket configuration does)
$(died)

$SUMMARY

$TABLE

**Reading a cell**: the answer (status, or how the connection ended, with the time when it
matters) → what reached which backend (method, target and \`Host\` as the backend read them,
and what is notable: Cookie lines, header fields, body bytes, \`Upgrade\`, a 101 and the bytes
that went through the tunnel); then the grade, **2** good, **1** acceptable, **0** bad:

- 1-3, 5, 6 (routes): **0** if a request reached a backend other than the one the routes give to
  what that backend reads (its path resolved as a lenient backend resolves it: \`%XX\` of
  unreserved characters decoded, dot segments removed, slashes merged; its host after any
  userinfo), if a target that is not origin or absolute form reached a backend, or if nothing
  answered; **2** for a 4xx from the proxy, or routed and forwarded in normal form; **1** for
  routed right but forwarded as sent (the backend resolves it again), a close or a 5xx.
- 4 (h2c): **0** for a 101 to the client (a tunnel carrying the client's own HTTP/2 past the
  routes); **1** if \`Upgrade: h2c\` reached the backend but its 101 was refused; **2** served as plain
  HTTP/1.1 with no \`Upgrade\` passed on.
- 7 (idle WebSocket): **2** closed within the configured 10 s + 5 s after the last byte; **1**
  closed earlier or later; **0** still open after the wait.
- 8 (a 101 nobody asked for): **2** refused with a 5xx; **0** relayed (a tunnel).
- 9 (cookie crumbs): **2** one \`Cookie: a=1; b=2; c=3\` (RFC 9113 §8.2.3); **0** several lines
  or not served.
- 10 (1 500 fields): **2** a 4xx and nothing reached a backend; **1** every field forwarded (the
  backend's limit decides; Apache's \`LimitRequestFields\` is 100) or a close without an
  answer; **0** no answer or fields lost.
- 11 (trickled header block): **2** closed within the configured 10 s + 5 s of HEADERS; **1**
  later; **0** still open after 30 s.
- 12 (1 MiB chunk extension): **2** a 5xx, or the chunk re-framed without the extension; **1** a
  response cut short or a close; **0** the extension relayed or no answer.
- 13 (slow upload): **2** 200 with the whole body at the backend; **0** anything else.
- 14 (CONNECT): **2** a 4xx/5xx and nothing forwarded; **0** forwarded or a 2xx tunnel.
- 15 (cipher order): **2** the server's order wins in TLS 1.3 and 1.2, **1** in one, **0** in
  neither.

"At least as well as nginx" means kaproxy's grade is at least nginx's in that row.

Configuration notes (facts of the setup, not results):

- nginx 1.22 offers TLS 1.0-1.2 by default: \`ssl_protocols TLSv1.2 TLSv1.3\` is set so that case 15
  compares like with like; \`ssl_prefer_server_ciphers\` is left at its default (off).
- nginx passes \`Upgrade\` and \`Connection: upgrade\` on every route here, as its usual WebSocket
  recipe does and as kaproxy tunnels WebSocket on every route; an nginx that sets them only in a
  WebSocket location tunnels nothing elsewhere (case 4 would then depend on the path).
- HAProxy routes with \`path_beg /admin\` on the path as sent (2.6 has \`http-request
  normalize-uri\`, off by default); nginx matches locations on the decoded, merged, resolved
  path and, with \`proxy_pass\` without a URI, forwards the path as the client sent it.
- The backends accept anything (no field limit, any Host, any method): what a proxy lets through
  is what reaches them.

Commands (PORT = the proxy's ports; the probe binds the backends at $ADM and $WEB):

\`\`\`
kaproxy-bench probe --name PROXY --http 127.0.0.1:PORT --https 127.0.0.1:TLSPORT $PROBE_COMMON${ONLY:+ --only $ONLY} --json
kaproxy-bench probe --name PROXY --http 127.0.0.1:PORT --https 127.0.0.1:TLSPORT $PROBE_COMMON --only 13 --json   # streamed variant
\`\`\`

Configurations (\$WORK = the script's temp dir):

$(configs)
EOF
} > "$OUT"

echo
echo "$SUMMARY"
log "wrote $OUT"
