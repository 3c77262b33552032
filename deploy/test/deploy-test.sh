#!/usr/bin/env bash
# `make deploy-test`: the image, the compose stack and the Kubernetes
# manifests, run for real on podman (deploy/README.md, "Tested on podman").
#
#   deploy/test/deploy-test.sh            # everything (about 2 min warm)
#   KEEP_STACK=1 deploy/test/deploy-test.sh   # leave the stack up to look at it
#
# 1. Images: Debian bookworm bases built with debootstrap and `podman import`
#    (cached, see build_base), stand-ins for etcd, NATS and Prometheus built
#    from Debian packages under the names the compose file uses, and
#    switchyard:local from deploy/docker/Dockerfile (target `prebuilt`: the
#    runtime stage with the binary built on the host by cargo).
# 2. The compose stack (podman-compose), minus Grafana (no package here).
# 3. Against it: authentication on etcd and NATS; every health check; both
#    workers registered (`switchyard instances` in the frontend container);
#    the official openai client through the published port; Prometheus's
#    targets all up and dynamo_frontend_requests_total answered; the Grafana
#    dashboard's queries against what Prometheus serves (and the checker
#    failing on a broken dashboard).
# 4. The Kubernetes manifests: schema-checked (kubernetes-validate, 1.33) and
#    the frontend and worker containers run by `podman kube play`.
# 5. `compose down`, and nothing of the project left running — also when a
#    step fails (trap).
#
# Every wait has a deadline; a failure names the step and dumps the logs.
# Needs root (rootful podman) and Debian packages it installs when missing.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
cd "$ROOT"
HERE=$ROOT/deploy/test
COMPOSE_DIR=$ROOT/deploy/compose
PROJECT=switchyard
# Outside the git tree, kept between runs so reruns skip debootstrap.
CACHE=${SWITCHYARD_DEPLOY_CACHE:-/var/cache/switchyard-deploy}
BASE_IMAGE=localhost/switchyard-deploy/debian:bookworm
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
# The openai client and kubernetes-validate, outside the clone: shared by
# every clone and run on the machine, and root-owned files stay out of target/.
VENV=${DEPLOY_TEST_VENV:-$CACHE/venv}
WORK=$(mktemp -d /tmp/switchyard-deploy-test.XXXXXX)
export CONTAINERS_CONF=$HERE/containers.conf
# Ports published on the host: free ones, so the test never collides with a
# stack or a `switchyard run` already there.
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
export SWITCHYARD_HTTP_PORT=${SWITCHYARD_HTTP_PORT:-$(free_port)}
export SWITCHYARD_PROMETHEUS_PORT=${SWITCHYARD_PROMETHEUS_PORT:-$(free_port)}
export SWITCHYARD_GRAFANA_PORT=${SWITCHYARD_GRAFANA_PORT:-$(free_port)}
API=http://127.0.0.1:$SWITCHYARD_HTTP_PORT
PROM=http://127.0.0.1:$SWITCHYARD_PROMETHEUS_PORT
# Grafana is not started (no Debian package, no registry): everything else is.
SERVICES=(etcd nats frontend worker-1 worker-2 prometheus)
# The Pods `podman kube play` makes from deploy/k8s (check_k8s.py play).
KUBE_PODS="sy-kube-etcd|sy-kube-nats|sy-kube-frontend|sy-kube-worker-mocker"

START=$(date +%s)
STEP="start"
step() { STEP=$*; printf '\n== [%4ss] %s\n' "$(( $(date +%s) - START ))" "$*"; }
fail() { echo "deploy-test: FAILED in step '$STEP': $*" >&2; exit 1; }

# wait_for SECONDS WHAT COMMAND...: runs COMMAND every second until it
# succeeds; after SECONDS, fails naming WHAT and showing the last output.
wait_for() {
    local seconds=$1 what=$2; shift 2
    local deadline=$(( $(date +%s) + seconds )) out
    while true; do
        if out=$("$@" 2>&1); then return 0; fi
        if (( $(date +%s) >= deadline )); then
            fail "$what: not within ${seconds}s; last output: $out"
        fi
        sleep 1
    done
}

# wait_quietly SECONDS COMMAND...: like wait_for, but returns 1 at the deadline.
wait_quietly() {
    local deadline=$(( $(date +%s) + $1 )); shift
    until "$@" >/dev/null 2>&1; do
        (( $(date +%s) < deadline )) || return 1
        sleep 1
    done
}

compose() { (cd "$COMPOSE_DIR" && timeout 300 podman-compose -p "$PROJECT" "$@"); }
container() { echo "${PROJECT}_$1_1"; }

leftovers() {
    podman ps -a --filter "label=io.podman.compose.project=$PROJECT" --format '{{.Names}}'
    podman pod ps --filter "name=pod_$PROJECT" --format '{{.Name}}'
    podman pod ps --format '{{.Name}}' | grep -E "^($KUBE_PODS)\$" || true
    podman volume ls --format '{{.Name}}' | grep -E '^sy-kube-' || true
    podman volume ls --filter "label=io.podman.compose.project=$PROJECT" --format '{{.Name}}'
    podman network ls --format '{{.Name}}' | grep -x "${PROJECT}_switchyard" || true
}

kube_down() {
    local pod volume
    for pod in $(podman pod ps --format '{{.Name}}' | grep -E "^($KUBE_PODS)\$" || true); do
        timeout 60 podman pod rm -f -t 5 "$pod" >/dev/null 2>&1 || true
    done
    for volume in $(podman volume ls --format '{{.Name}}' | grep -E '^sy-kube-' || true); do
        timeout 60 podman volume rm -f "$volume" >/dev/null 2>&1 || true
    done
}

down() {
    kube_down
    compose down -v -t 10 >"$WORK/down.log" 2>&1 || true
    timeout 60 podman network rm -f "${PROJECT}_switchyard" >/dev/null 2>&1 || true
}

on_exit() {
    local status=$?
    if (( status != 0 )) && podman ps -a --filter "label=io.podman.compose.project=$PROJECT" -q 2>/dev/null | grep -q .; then
        echo "---- container logs (last 30 lines each) ----" >&2
        for s in "${SERVICES[@]}"; do
            # (podman 4.3's `logs --tail` printed nothing for some containers.)
            echo "-- $s" >&2; timeout 30 podman logs "$(container "$s")" 2>&1 | tail -30 >&2 || true
        done
    fi
    if [ -n "${KEEP_STACK:-}" ] && (( status == 0 )); then
        echo "KEEP_STACK set: the stack stays up (API $API, Prometheus $PROM);"
        echo "stop it with: cd deploy/compose && CONTAINERS_CONF=$CONTAINERS_CONF podman-compose -p $PROJECT down -v"
        echo "              podman network rm ${PROJECT}_switchyard   # podman-compose 1.0.3's down leaves it"
    else
        down
        local left; left=$(leftovers)
        if [ -n "$left" ]; then
            echo "deploy-test: compose down left these behind: $left" >&2
            status=1
        fi
    fi
    rm -rf "$WORK"
    (( status == 0 )) && printf '\ndeploy-test: PASSED in %ss\n' "$(( $(date +%s) - START ))"
    exit $status
}
# One run at a time on a machine: two runs would share the project name, the
# image tags and the stand-ins, and the second's clean-up would stop the
# first's stack.
LOCK=/var/lock/switchyard-deploy-test.lock
[ -w "$(dirname "$LOCK")" ] || LOCK=/tmp/switchyard-deploy-test.lock
exec 9>"$LOCK"
if ! flock -n 9; then
    echo "deploy-test: another run holds $LOCK; waiting up to 15 min"
    flock -w 900 9 || { rm -rf "$WORK"; echo "deploy-test: gave up waiting for the other run" >&2; exit 1; }
fi
# Only the run holding the lock may clean up.
trap on_exit EXIT
trap 'exit 130' INT TERM

###########################################################################
step "prerequisites"
[ "$(id -u)" = 0 ] || fail "run as root: the test uses rootful podman (rootless was not tried)"
missing=""
for pair in podman:podman runc:runc debootstrap:debootstrap podman-compose:podman-compose \
            openssl:openssl python3:python3 curl:curl flock:util-linux; do
    command -v "${pair%%:*}" >/dev/null 2>&1 || missing="$missing ${pair#*:}"
done
python3 -c 'import venv, ensurepip' 2>/dev/null || missing="$missing python3-venv"
if [ -n "$missing" ]; then
    echo "installing:$missing"
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $missing >/dev/null
fi
if ! "$VENV/bin/python" -c 'import openai, kubernetes_validate, check_jsonschema' >/dev/null 2>&1; then
    echo "creating $VENV with openai, kubernetes-validate 1.33.1 and check-jsonschema (PyPI)"
    rm -rf "$VENV"; mkdir -p "$(dirname "$VENV")"; python3 -m venv "$VENV"
    timeout 600 "$VENV/bin/pip" install -q --disable-pip-version-check openai 'kubernetes-validate==1.33.1' pyyaml check-jsonschema \
        || { rm -rf "$VENV"; fail "pip install of openai and kubernetes-validate into $VENV failed"; }
fi
podman --version; podman-compose version 2>/dev/null | grep -i compose || true

###########################################################################
step "the compose file against the Compose Specification schema"
"$VENV/bin/check-jsonschema" --builtin-schema vendor.compose-spec "$COMPOSE_DIR/docker-compose.yml" \
    || fail "docker-compose.yml does not follow the Compose Specification"

###########################################################################
step "clean up what an interrupted run may have left"
down
[ -z "$(leftovers)" ] || fail "old containers of project $PROJECT remain: $(leftovers)"

###########################################################################
step "base image $BASE_IMAGE (debootstrap, cached in $CACHE)"
# Debian bookworm minbase, the stand-in for debian:bookworm-slim. The rootfs
# tarball is kept, so a pruned image store is refilled in seconds; delete
# $CACHE to rebuild from the Debian mirror (about 1.5 min).
if ! podman image exists "$BASE_IMAGE"; then
    mkdir -p "$CACHE"
    if [ ! -s "$CACHE/bookworm-minbase.tar" ]; then
        rootfs=$CACHE/rootfs.tmp
        rm -rf "$rootfs"
        timeout 900 debootstrap --variant=minbase --include=ca-certificates bookworm "$rootfs" \
            http://deb.debian.org/debian >"$CACHE/debootstrap.log" 2>&1 \
            || fail "debootstrap failed, see $CACHE/debootstrap.log"
        # The same suites debian:bookworm-slim uses.
        cat >"$rootfs/etc/apt/sources.list" <<'EOF'
deb http://deb.debian.org/debian bookworm main
deb http://deb.debian.org/debian bookworm-updates main
deb http://deb.debian.org/debian-security bookworm-security main
EOF
        rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
        tar -C "$rootfs" -cf "$CACHE/bookworm-minbase.tar.tmp" .
        mv "$CACHE/bookworm-minbase.tar.tmp" "$CACHE/bookworm-minbase.tar"
        rm -rf "$rootfs"
    fi
    timeout 300 podman import --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'CMD ["/bin/bash"]' "$CACHE/bookworm-minbase.tar" "$BASE_IMAGE" >/dev/null 2>&1 \
        || fail "podman import of $CACHE/bookworm-minbase.tar failed"
fi

###########################################################################
step "stand-in images for etcd, NATS and Prometheus (Debian packages)"
# The names the compose file uses, so `podman-compose up` finds them locally
# and never tries a registry.
build_standin() {
    local file=$1 name=$2
    timeout 600 podman build -q --build-arg "BASE_IMAGE=$BASE_IMAGE" -f "$HERE/standins/$file" \
        -t "$name" "$HERE/standins" >"$WORK/build-$file.log" 2>&1 \
        || { cat "$WORK/build-$file.log" >&2; fail "building $name failed"; }
}
build_standin etcd.Containerfile quay.io/coreos/etcd:v3.5.17
build_standin nats.Containerfile docker.io/library/nats:2.10-alpine
build_standin prometheus.Containerfile docker.io/prom/prometheus:v2.55.1

###########################################################################
step "switchyard:local from deploy/docker/Dockerfile (target prebuilt)"
# The runtime stage of the real Dockerfile, on the same base the `runtime`
# target uses, with the binary cargo builds here (no registry or crates.io
# from inside a build container). RUNTIME_IMAGE points at the local base.
# SWITCHYARD_PROFILE=debug (run directly, without make) takes the debug binary
# `cargo test` has just built instead of a release build: the same code and
# the same image, in a fraction of the build time.
if [ -z "${SWITCHYARD_BIN:-}" ]; then
    case ${SWITCHYARD_PROFILE:-release} in
        release) profile_flag=--release; profile_dir=release ;;
        debug) profile_flag=; profile_dir=debug ;;
        *) fail "SWITCHYARD_PROFILE must be release or debug, not ${SWITCHYARD_PROFILE}" ;;
    esac
    timeout 1800 "${CARGO:-cargo}" build $profile_flag -q -p switchyard || fail "cargo build failed"
    SWITCHYARD_BIN=$TARGET_DIR/$profile_dir/switchyard
fi
[ -x "$SWITCHYARD_BIN" ] || fail "no binary at $SWITCHYARD_BIN"
mkdir -p "$WORK/bin" && cp "$SWITCHYARD_BIN" "$WORK/bin/switchyard"
previous=$(podman image inspect -f '{{.Id}}' localhost/switchyard:local 2>/dev/null || true)
timeout 600 podman build -q -f deploy/docker/Dockerfile --target prebuilt \
    --ignorefile deploy/docker/Dockerfile.dockerignore \
    --build-arg "RUNTIME_IMAGE=$BASE_IMAGE" \
    --build-context "switchyard-bin=$WORK/bin" \
    -t localhost/switchyard:local . >"$WORK/build-switchyard.log" 2>&1 \
    || { cat "$WORK/build-switchyard.log" >&2; fail "building switchyard:local failed"; }
# The image it replaces would stay behind untagged, one per run.
if [ -n "$previous" ] && [ "$previous" != "$(podman image inspect -f '{{.Id}}' localhost/switchyard:local)" ]; then
    podman rmi "$previous" >/dev/null 2>&1 || true
fi
timeout 60 podman run --rm localhost/switchyard:local --version \
    || fail "the image's binary does not run"

###########################################################################
step "secrets (deploy/compose/make-secrets.sh) and the stack up"
"$COMPOSE_DIR/make-secrets.sh" >/dev/null
compose up -d --no-build "${SERVICES[@]}" >"$WORK/up.log" 2>&1 \
    || { cat "$WORK/up.log" >&2; fail "podman-compose up failed"; }
podman ps --filter "label=io.podman.compose.project=$PROJECT" --format '{{.Names}}  {{.Image}}  {{.Status}}'

###########################################################################
step "name resolution on the stack's network (a known podman fault, worked around)"
# With Debian bookworm's podman 4.3 (netavark and aardvark-dns 1.4), a
# container on a compose network sometimes gets no DNS answers at all: its
# queries reach the host (conntrack shows them unreplied) but aardvark-dns
# never answers that container's address, even after a SIGHUP or a restart
# of aardvark-dns, while the other containers resolve fine. It happened in
# about one run in two, to the frontend or a worker, which then cannot reach
# NATS or etcd by name. Restarting the container (it gets a new address)
# cures it. So each container that looks names up is checked by resolving
# `etcd`, which exists from the start; one that cannot is restarted (a
# container of a Pod: its Pod), at most three times, with a warning. Names
# that may not exist yet (the Pods') are then waited for, never "cured".
ensure_dns() {  # CONTAINER... ; every one must resolve etcd, then every name
    local c n attempt pod
    for c in "$@"; do
        for attempt in 1 2 3 4; do
            # A container that just joined may need a few seconds: give it 20.
            if wait_quietly 20 timeout 20 podman exec "$c" timeout 8 getent hosts etcd; then
                break
            fi
            (( attempt < 4 )) || fail "$c gets no DNS answers after 3 restarts"
            pod=$(podman inspect -f '{{.PodName}}' "$c" 2>/dev/null || true)
            echo "WARNING: $c gets no DNS answers (podman/aardvark-dns fault); restarting ${pod:-it} ($attempt/3)"
            if [ -n "$pod" ]; then
                { timeout 60 podman pod stop -t 5 "$pod" && timeout 60 podman pod start "$pod"; } >/dev/null \
                    || fail "restarting Pod $pod failed"
            else
                timeout 60 podman restart -t 5 "$c" >/dev/null || fail "restarting $c failed"
            fi
            sleep 1
        done
        for n in "${SERVICES[@]}" ${EXTRA_NAMES:-}; do
            wait_for 30 "$c resolving $n" timeout 20 podman exec "$c" timeout 8 getent hosts "$n"
        done
    done
    echo "every container resolves: ${SERVICES[*]} ${EXTRA_NAMES:-}"
}
# The containers that look names up: the Switchyard processes and Prometheus
# (etcd and NATS only answer, and restarting them would disturb the others).
clients() { for s in frontend worker-1 worker-2 prometheus; do container "$s"; done; }
ensure_dns $(clients)

###########################################################################
step "every service's health check passes (podman healthcheck run)"
# podman runs health checks from systemd timers, which this machine (no
# systemd as PID 1) does not have; `podman healthcheck run` runs the
# compose-defined check once, exactly as the engine would.
for s in "${SERVICES[@]}"; do
    c=$(container "$s")
    [ "$(podman inspect -f '{{if .Config.Healthcheck}}yes{{end}}' "$c")" = yes ] \
        || fail "$c has no health check (podman-compose did not pass it on)"
    wait_for 90 "health check of $s" timeout 30 podman healthcheck run "$c"
    echo "healthy: $s ($(podman inspect -f '{{join .Config.Healthcheck.Test " "}}' "$c" | cut -c1-90))"
done

###########################################################################
step "etcd and NATS refuse clients without credentials"
# From inside the frontend's container: a process on the stack's network.
# Each refusal is checked after the same request with credentials worked, so
# that a name that did not resolve (podman's DNS while containers start)
# cannot pass for a refusal.
fe=$(container frontend)
tls=/etc/switchyard/tls
etcd_health() { timeout 30 podman exec "$fe" curl -fsS --max-time 5 --cacert $tls/ca.pem "$@" https://etcd:2379/health; }
with_cert() { etcd_health --cert $tls/etcd-client.pem --key $tls/etcd-client-key.pem | grep -q '"health":"true"'; }
wait_for 30 "etcd over TLS with the client certificate" with_cert
echo "etcd: answers a client with the stack's certificate"
set +e
out=$(etcd_health 2>&1); code=$?
set -e
# 6: name not resolved, 7: no connection, 28: timeout; a TLS refusal is 35, 55, 56 or 58.
case $code in
    0) fail "etcd answered a client without a certificate: $out" ;;
    6|7|28) fail "could not test etcd without a certificate (curl exit $code): $out" ;;
esac
echo "etcd: refused without a client certificate (curl exit $code: $out)"
if timeout 30 podman exec "$fe" curl -fsS --max-time 5 http://etcd:2379/health >/dev/null 2>&1; then
    fail "etcd answered plain http"
fi
set +e
out=$(timeout 30 podman exec "$(container etcd)" etcdctl --endpoints=https://127.0.0.1:2379 \
    --cacert=/etc/etcd/tls/ca.pem --command-timeout=5s get --prefix "" 2>&1); code=$?
set -e
(( code != 0 )) || fail "etcdctl without a client certificate read etcd: $out"
echo "etcd: etcdctl without a client certificate refused ($(echo "$out" | tail -1 | cut -c1-120))"
# NATS: the protocol by hand (INFO, CONNECT, PING), as any client would.
nats_probe='exec 3<>/dev/tcp/nats/4222 || exit 1; read -r -t 5 info <&3; printf "CONNECT %s\r\nPING\r\n" "$1" >&3; read -r -t 5 reply <&3; echo "$reply"'
nats_says() { timeout 30 podman exec "$fe" bash -c "$nats_probe" probe "$1" | tr -d '\r'; }
creds=$(timeout 30 podman exec "$fe" bash -c 'printf "{\"verbose\":false,\"user\":\"%s\",\"pass\":\"%s\"}" "$NATS_AUTH_USERNAME" "$NATS_AUTH_PASSWORD"')
nats_accepts() { [ "$(nats_says "$creds")" = PONG ]; }
wait_for 30 "NATS accepting the stack's credentials" nats_accepts
echo "nats: the stack's credentials are accepted (PONG)"
reply=$(nats_says '{"verbose":false}')
[[ $reply == *"Authorization Violation"* ]] || fail "NATS accepted a client without credentials: $reply"
echo "nats: refused without credentials ($reply)"
reply=$(nats_says '{"verbose":false,"user":"switchyard","pass":"guess"}')
[[ $reply == *"Authorization Violation"* ]] || fail "NATS accepted a wrong password: $reply"
echo "nats: refused with a wrong password ($reply)"

###########################################################################
step "both workers are registered (switchyard instances, inside the stack)"
instances() { timeout 30 podman exec "$fe" switchyard instances; }
count_workers() {
    local out; out=$(instances) || return 1
    echo "$out"
    [ "$(grep -c -E 'worker-[12]' <<<"$out")" -ge 2 ] && grep -q worker-1 <<<"$out" && grep -q worker-2 <<<"$out"
}
wait_for 60 "two workers in discovery" count_workers
instances

###########################################################################
step "the official openai client through the published port $API"
wait_for 60 "the frontend's /health" curl -fsS --max-time 3 "$API/health"
curl -fsS --max-time 3 "$API/live" >/dev/null || fail "/live"
timeout 120 "$VENV/bin/python" tests/e2e/openai_client.py "$API/v1" || fail "openai client checks"
timeout 120 "$VENV/bin/python" "$HERE/traffic.py" "$API/v1" 20 || fail "traffic"

###########################################################################
step "Prometheus: every target up, dynamo_frontend_requests_total answered"
targets_up() {
    curl -fsS --max-time 5 "$PROM/api/v1/targets" | python3 -c '
import json, sys
targets = json.load(sys.stdin)["data"]["activeTargets"]
for t in targets:
    print(t["labels"]["job"], t["scrapeUrl"], t["health"], t.get("lastError", ""))
assert len(targets) == 4, f"{len(targets)} targets, expected 4"
assert all(t["health"] == "up" for t in targets)'
}
wait_for 60 "all Prometheus targets up" targets_up
targets_up
query() { curl -fsS --max-time 5 "$PROM/api/v1/query" --data-urlencode "query=$1"; }
has_data() { query "$1" | python3 -c 'import json,sys; r=json.load(sys.stdin)["data"]["result"]; print(r); assert r'; }
wait_for 30 "dynamo_frontend_requests_total in Prometheus" has_data 'dynamo_frontend_requests_total{model="mock-model"}'
has_data 'sum by (model, status) (dynamo_frontend_requests_total)'
# Both workers served requests: the per-worker counter is non-zero on each.
wait_for 30 "requests on both workers" has_data \
    'count(sum by (instance) (dynamo_component_requests_total) > 0) == 2'
wait_for 30 "the abandoned stream counted" has_data 'dynamo_frontend_model_cancellation_total'

###########################################################################
step "Grafana dashboard and provisioning against what Prometheus serves"
# Labelled counters with no series until their first event, which a healthy
# stack does not produce: every worker busy, a worker error.
NO_SERIES_YET=(dynamo_frontend_model_rejection_total dynamo_component_errors_total)
"$VENV/bin/python" "$HERE/check_dashboard.py" --prometheus "$PROM" --no-series-yet "${NO_SERIES_YET[@]}" \
    || fail "the dashboard asks for what Prometheus does not serve"
# The checker must be able to fail: the same dashboard with one panel asking
# for a metric nobody serves, and one expression Prometheus cannot parse.
python3 - "$ROOT/deploy/grafana/switchyard.json" "$WORK/bad-dashboard.json" <<'EOF'
import json, sys
d = json.load(open(sys.argv[1]))
d["panels"].append({"type": "timeseries", "title": "broken on purpose",
    "datasource": {"type": "prometheus", "uid": "${datasource}"},
    "targets": [{"expr": "rate(dynamo_frontend_no_such_metric_total[1m])"}, {"expr": "sum(rate("}]})
json.dump(d, open(sys.argv[2], "w"))
EOF
if "$VENV/bin/python" "$HERE/check_dashboard.py" --prometheus "$PROM" --dashboard "$WORK/bad-dashboard.json" \
        --no-series-yet "${NO_SERIES_YET[@]}" >"$WORK/bad.log" 2>&1; then
    fail "the checker passed a dashboard with a missing metric"
fi
grep -q dynamo_frontend_no_such_metric_total "$WORK/bad.log" || fail "the checker failed without naming the missing metric"
grep -q "refuses 'sum(rate('" "$WORK/bad.log" || fail "the checker did not catch the unparseable query"
echo "checker on a broken dashboard: fails as it should:"; sed 's/^/    /' "$WORK/bad.log" | grep FAIL

###########################################################################
step "Kubernetes manifests: schema (1.33) and containers under podman kube play"
deploy/k8s/make-secrets.sh "$WORK/k8s-secrets" >"$WORK/k8s-secrets.yaml" 2>/dev/null || fail "deploy/k8s/make-secrets.sh"
"$VENV/bin/python" "$HERE/check_k8s.py" schema deploy/k8s "$WORK/k8s-secrets.yaml" || fail "manifest schema check"
"$VENV/bin/python" "$HERE/check_k8s.py" play deploy/k8s "$WORK/kube-play.yaml" \
    --secrets "$COMPOSE_DIR/secrets" || fail "making the kube play pods"
timeout 120 podman kube play --network "${PROJECT}_switchyard" "$WORK/kube-play.yaml" >"$WORK/kube-play.log" 2>&1 \
    || { cat "$WORK/kube-play.log" >&2; fail "podman kube play"; }
# Starting the Pods can break name resolution of containers already running
# (above): all of them are checked again.
EXTRA_NAMES=${KUBE_PODS//|/ } ensure_dns $(clients) sy-kube-frontend-frontend sy-kube-worker-mocker-worker
timeout 300 "$VENV/bin/python" "$HERE/check_k8s.py" verify "$WORK/kube-play.yaml" --prober "$fe" \
    || fail "the manifests' containers under podman"
# podman kube down leaves the Pods' volumes (and, without systemd, logs
# errors about health-check timers it cannot remove): down() removes them.
timeout 120 podman kube down "$WORK/kube-play.yaml" >"$WORK/kube-down.log" 2>&1 || true
kube_down

###########################################################################
step "compose down leaves nothing running"
if [ -z "${KEEP_STACK:-}" ]; then
    compose down -v -t 10 >"$WORK/down.log" 2>&1 || { cat "$WORK/down.log" >&2; fail "compose down failed"; }
    left=$(podman ps -a --filter "label=io.podman.compose.project=$PROJECT" --format '{{.Names}} {{.Status}}';
           podman volume ls --filter "label=io.podman.compose.project=$PROJECT" --format '{{.Name}}')
    [ -z "$left" ] || fail "compose down left containers or volumes behind: $left"
    echo "compose down: no container or volume of project $PROJECT left"
    # podman-compose 1.0.3 creates the project's network but its `down` does
    # not remove it (nothing runs on it); newer podman-compose and docker
    # compose do.
    if podman network exists "${PROJECT}_switchyard"; then
        echo "compose down left the network ${PROJECT}_switchyard (podman-compose 1.0.3); removing it"
        podman network rm "${PROJECT}_switchyard" >/dev/null
    fi
    left=$(leftovers)
    [ -z "$left" ] || fail "left behind: $left"
fi
