# Sourced by the bench scripts (compare.sh, allocs.sh, slowclients.sh, hostile.sh): what they
# all do the same way. Processes are stopped by PID, never by name; the callers keep theirs in
# the array PIDS.

log() { printf '==> %s\n' "$*" >&2; }

# install_missing PKG...: apt-get installs the Debian packages named (the caller lists what is
# missing), unless INSTALL=0 (--no-install), which stops the script instead.
install_missing() {
    [ $# -gt 0 ] || return 0
    [ "${INSTALL:-1}" = 1 ] || { echo "missing: $* (run without --no-install)" >&2; exit 1; }
    log "installing $*"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    apt-get install -y -q --no-install-recommends "$@"
}

# stop_pid PID [TENTHS]: SIGTERM, then up to TENTHS tenths of a second (default 50) for the
# process to exit, then SIGKILL; reaps it either way. A PID already gone is fine.
stop_pid() {
    local pid=$1 tenths=${2:-50}
    kill -TERM "$pid" 2>/dev/null || return 0
    for _ in $(seq 1 "$tenths"); do
        kill -0 "$pid" 2>/dev/null || { wait "$pid" 2>/dev/null || true; return 0; }
        sleep 0.1
    done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
}

# forget_pid PID: drops PID from PIDS (it was stopped already).
forget_pid() {
    local kept=() p
    for p in "${PIDS[@]}"; do [ "$p" = "$1" ] || kept+=("$p"); done
    PIDS=("${kept[@]}")
}

# ports_free PORT...: stops the script if something listens on one of them on 127.0.0.1.
ports_free() {
    local port
    for port in "$@"; do
        if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
            echo "port 127.0.0.1:$port is already in use" >&2; exit 1
        fi
    done
}

# wait_port PORT [SECONDS]: waits (default 10 s) until something listens on 127.0.0.1:PORT.
wait_port() {
    local port=$1 seconds=${2:-10}
    for _ in $(seq 1 $((seconds * 10))); do
        (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && return 0
        sleep 0.1
    done
    echo "nothing listens on 127.0.0.1:$port" >&2
    return 1
}

# dev_certificate DIR: a self-signed ECDSA P-256 certificate for localhost and 127.0.0.1 in
# DIR/cert.pem and DIR/key.pem, and both in DIR/combined.pem (HAProxy's form).
dev_certificate() {
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 7 \
        -subj "/CN=localhost" -addext "subjectAltName=DNS:localhost,IP:127.0.0.1" \
        -keyout "$1/key.pem" -out "$1/cert.pem" 2>/dev/null
    cat "$1/cert.pem" "$1/key.pem" > "$1/combined.pem"
}

# release_binaries ROOT: sets KAPROXY and BENCH to KAPROXY_BIN and BENCH_BIN when given, else
# to this tree's release builds, building what is not given.
release_binaries() {
    local root=$1 dir="${CARGO_TARGET_DIR:-$1/target}/release"
    if [ -n "${KAPROXY_BIN:-}" ] && [ -n "${BENCH_BIN:-}" ]; then
        log "kaproxy is $KAPROXY_BIN, kaproxy-bench $BENCH_BIN (nothing built)"
    elif [ -n "${KAPROXY_BIN:-}" ]; then
        log "building kaproxy-bench (release); kaproxy is $KAPROXY_BIN"
        (cd "$root" && cargo build --release -q -p kaproxy-bench)
    elif [ -n "${BENCH_BIN:-}" ]; then
        log "building kaproxy (release); kaproxy-bench is $BENCH_BIN"
        (cd "$root" && cargo build --release -q -p kaproxy)
    else
        log "building kaproxy and kaproxy-bench (release)"
        (cd "$root" && cargo build --release -q -p kaproxy -p kaproxy-bench)
    fi
    KAPROXY="${KAPROXY_BIN:-$dir/kaproxy}"
    BENCH="${BENCH_BIN:-$dir/kaproxy-bench}"
    [ -x "$BENCH" ] || { echo "no kaproxy-bench binary at $BENCH" >&2; exit 1; }
    [ -x "$KAPROXY" ] || { echo "no kaproxy binary at $KAPROXY" >&2; exit 1; }
}
