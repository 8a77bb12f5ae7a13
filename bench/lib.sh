# Sourced by the bench scripts (compare.sh, allocs.sh): how a process the script started is
# stopped, by PID and never by name.

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
