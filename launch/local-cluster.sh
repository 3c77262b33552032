#!/usr/bin/env bash
# A local Switchyard cluster as separate processes: etcd and NATS (when
# installed), one frontend and N mocker workers. Prints where everything
# listens; Ctrl-C (or SIGTERM) stops everything it started, and only that.
#
#   launch/local-cluster.sh [WORKERS]        default 2 workers
#
# Settings (environment): HTTP_PORT (8000), BASE_PORT (first port for etcd,
# NATS and the status servers; 23790), SWITCHYARD (the binary; default: build
# it with cargo), and any DYN_* variable, which every process inherits.
# Without etcd installed it falls back to file discovery in a temporary
# directory; without nats-server, to the ZMQ event plane.
set -euo pipefail

WORKERS="${1:-2}"
HTTP_PORT="${HTTP_PORT:-8000}"
BASE_PORT="${BASE_PORT:-23790}"
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
STATE="$(mktemp -d -t switchyard-cluster-XXXXXX)"
PIDS=()

stop_all() {
    trap - INT TERM EXIT
    echo
    echo "stopping ${#PIDS[@]} processes"
    # Workers and frontend first (they drain), infrastructure last.
    for ((i = ${#PIDS[@]} - 1; i >= 0; i--)); do
        kill -TERM "${PIDS[i]}" 2>/dev/null || true
        wait "${PIDS[i]}" 2>/dev/null || true
    done
    rm -rf "$STATE"
}
trap stop_all INT TERM EXIT

if [[ -z "${SWITCHYARD:-}" ]]; then
    echo "building switchyard (cargo build --release -p switchyard)"
    (cd "$ROOT" && cargo build --release -q -p switchyard)
    SWITCHYARD="$ROOT/target/release/switchyard"
fi

find_binary() {
    for candidate in "$@"; do
        if command -v "$candidate" >/dev/null 2>&1; then command -v "$candidate"; return 0; fi
        if [[ -x "$candidate" ]]; then echo "$candidate"; return 0; fi
    done
    return 1
}

wait_for_port() { # port, what
    for _ in $(seq 1 100); do
        if (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; then return 0; fi
        sleep 0.1
    done
    echo "error: $2 did not listen on port $1 within 10 s (log: $STATE)" >&2
    exit 1
}

ETCD_PORT=$BASE_PORT
NATS_PORT=$((BASE_PORT + 2))
if ETCD=$(find_binary etcd /usr/bin/etcd); then
    "$ETCD" --name local --data-dir "$STATE/etcd" \
        --listen-client-urls "http://127.0.0.1:$ETCD_PORT" --advertise-client-urls "http://127.0.0.1:$ETCD_PORT" \
        --listen-peer-urls "http://127.0.0.1:$((BASE_PORT + 1))" \
        --initial-advertise-peer-urls "http://127.0.0.1:$((BASE_PORT + 1))" \
        --initial-cluster "local=http://127.0.0.1:$((BASE_PORT + 1))" \
        --log-level error >"$STATE/etcd.log" 2>&1 &
    PIDS+=($!)
    wait_for_port "$ETCD_PORT" etcd
    export DYN_DISCOVERY_BACKEND=etcd ETCD_ENDPOINTS="http://127.0.0.1:$ETCD_PORT"
    echo "etcd        http://127.0.0.1:$ETCD_PORT"
else
    echo "etcd is not installed (Debian: apt-get install etcd-server); using file discovery in $STATE/kv"
    export DYN_DISCOVERY_BACKEND=file DYN_FILE_KV="$STATE/kv"
fi

if NATS=$(find_binary nats-server /usr/sbin/nats-server); then
    "$NATS" -a 127.0.0.1 -p "$NATS_PORT" >"$STATE/nats.log" 2>&1 &
    PIDS+=($!)
    wait_for_port "$NATS_PORT" nats-server
    export NATS_SERVER="nats://127.0.0.1:$NATS_PORT" DYN_EVENT_PLANE=nats
    echo "nats        nats://127.0.0.1:$NATS_PORT"
else
    echo "nats-server is not installed (Debian: apt-get install nats-server); using the ZMQ event plane"
    export DYN_EVENT_PLANE=zmq
fi

for ((w = 0; w < WORKERS; w++)); do
    STATUS_PORT=$((BASE_PORT + 10 + w))
    DYN_SYSTEM_PORT=$STATUS_PORT "$SWITCHYARD" worker mocker >"$STATE/worker-$w.log" 2>&1 &
    PIDS+=($!)
    wait_for_port "$STATUS_PORT" "worker $w"
    echo "worker $w    status http://127.0.0.1:$STATUS_PORT (/health, /metrics)"
done

"$SWITCHYARD" frontend --http-host 127.0.0.1 --http-port "$HTTP_PORT" >"$STATE/frontend.log" 2>&1 &
PIDS+=($!)
wait_for_port "$HTTP_PORT" frontend
echo "frontend    http://127.0.0.1:$HTTP_PORT/v1 (/health, /metrics)"
echo "logs        $STATE"
echo "cluster ready. Try:"
echo "  curl http://127.0.0.1:$HTTP_PORT/v1/chat/completions -H 'Content-Type: application/json' \\"
echo "    -d '{\"model\":\"mock-model\",\"messages\":[{\"role\":\"user\",\"content\":\"Hello!\"}],\"max_tokens\":20}'"
echo "Ctrl-C stops everything."
wait
