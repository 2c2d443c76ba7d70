#!/usr/bin/env bash
# Runs docker/docker-compose.yml for real and checks the cluster it starts
# through the router's published port.
#
# No Docker engine runs where caskade is tested, so the compose file runs on
# Debian's podman through its Docker-compatible API, driven by
# docker-compose 1.29. No registry serves images here either: the Debian
# base image is made with mmdebstrap, and the monitoring profile's
# Prometheus is a stand-in image around Debian's own prometheus binary,
# under the name the compose file uses. Grafana has no such stand-in; its
# dashboard is checked against what Prometheus scraped.
#
# The script first installs what it lacks (apt-get), makes the base
# image's file system and builds the release binaries. Everything else runs
# in network, mount and PID namespaces of its own (unshare): podman's
# firewall rules, sysctls, run and lock files, the published ports and
# every process vanish with them, and podman's storage lives in one
# temporary directory that is removed at exit, whatever happened, as are
# the empty cgroups podman leaves. The packages it installed stay.
#
# Usage: docker/test.sh  (as root, from anywhere)

set -euo pipefail
script=$(realpath "$0")
root=$(cd "$(dirname "$script")/.." && pwd)
cd "$root"

log() { printf '== %s (%ds)\n' "$*" "$SECONDS"; }
fail() {
  printf 'docker/test.sh: FAILED: %s\n' "$*" >&2
  exit 1
}

# Polls `$@` every second until it succeeds; fails with `what` after
# `seconds`.
eventually() {
  local what=$1 seconds=$2
  shift 2
  local deadline=$((SECONDS + seconds))
  until "$@"; do
    ((SECONDS < deadline)) || fail "$what: not within ${seconds}s"
    sleep 1
  done
}

# ---------------------------------------------------------------------------
# Outside: the tools, the checks of the monitoring files, and what needs
# the machine's network (the base image's file system, the binaries). Then
# the rest, in namespaces of its own.

if [[ ${1:-} != --inside ]]; then
  # What the test runs, without the packages they merely recommend (a
  # Docker engine, node-exporter), and with no service started meanwhile.
  packages=(podman runc netavark aardvark-dns iptables docker-compose mmdebstrap prometheus iproute2)
  need=()
  for package in "${packages[@]}"; do
    dpkg-query --show --showformat='${Status}' "$package" 2>/dev/null | grep -q 'ok installed' ||
      need+=("$package")
  done
  if ((${#need[@]})); then
    log "installing ${need[*]}"
    apt-get update -q >/dev/null
    no_services=
    if [[ ! -e /usr/sbin/policy-rc.d ]]; then
      printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
      chmod +x /usr/sbin/policy-rc.d
      no_services=/usr/sbin/policy-rc.d
    fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${need[@]}" >/dev/null
    [[ -z $no_services ]] || rm -f "$no_services"
  fi

  log "checking the monitoring files"
  promtool check config docker/prometheus/prometheus.yml
  promtool check rules docker/prometheus/alerts.yml
  python3 -m json.tool docker/grafana/dashboards/caskade.json >/dev/null ||
    fail "the Grafana dashboard is not valid JSON"

  work=$(mktemp -d /tmp/caskade-compose.XXXXXX)
  # podman's cgroups (cgroupfs) are the one thing outside the namespaces;
  # the empty ones are removed with the rest.
  leave() {
    rm -rf "$work"
    find /sys/fs/cgroup -depth -type d -path '*libpod_parent*' -exec rmdir {} + 2>/dev/null || true
  }
  trap leave EXIT
  log "making the base image's file system with mmdebstrap"
  mmdebstrap --quiet --variant=minbase bookworm "$work/rootfs.tar"
  log "building the release binaries"
  cargo build --release --locked --quiet -p caskade-cli -p caskade-node -p caskade-router
  log "entering network, mount and PID namespaces of the test's own"
  status=0
  # --kill-child: should this script be killed, the namespaces' processes
  # are killed with it, and their mounts go.
  unshare --net --mount --pid --fork --mount-proc --propagation private --kill-child \
    "$script" --inside "$work" || status=$?
  exit "$status"
fi
# Only ever as the first process of the namespaces made above: what follows
# mounts over /run and /var/lib.
(($$ == 1)) || fail "--inside is for the script itself"
work=$2

# Inside: loopback up; tmpfs over where podman, netavark and runc keep
# machine-wide state (/run, the lock file in /dev/shm, the image cache in
# /var/lib/containers), so that none of it outlives the test.
ip link set lo up
mount -t tmpfs tmpfs /run
mount -t tmpfs tmpfs /dev/shm
mount -t tmpfs tmpfs /var/lib

# ---------------------------------------------------------------------------
# A podman of our own

mkdir -p "$work/storage" "$work/run" "$work/networks" "$work/tmp"
cat >"$work/containers.conf" <<EOF
[containers]
# podman's default limits exceed what this machine allows.
default_ulimits = []

[engine]
# crun refuses hybrid cgroups; no systemd to manage cgroups.
cgroup_manager = "cgroupfs"
runtime = "runc"
events_logger = "file"
tmp_dir = "$work/tmp"

[network]
network_config_dir = "$work/networks"
EOF
cat >"$work/storage.conf" <<EOF
[storage]
driver = "overlay"
graphroot = "$work/storage"
runroot = "$work/run"
EOF
export CONTAINERS_CONF=$work/containers.conf
export CONTAINERS_STORAGE_CONF=$work/storage.conf
export DOCKER_HOST=unix://$work/podman.sock
export COMPOSE_PROJECT_NAME=caskade-test
export CASKADE_BUILD_TARGET=prebuilt
export TMPDIR=$work/tmp
# The namespace's own loopback: the compose file's default ports are free.
router_port=8443
prometheus_port=9090
compose() { docker-compose --file docker/docker-compose.yml --profile monitoring --profile spare "$@"; }

service=
ticker=
cleanup() {
  local status=$?
  set +e
  if ((status != 0)) && [[ -S $work/podman.sock ]]; then
    echo "---- container logs"
    timeout 60 docker-compose --file docker/docker-compose.yml --profile monitoring --profile spare \
      logs --no-color --tail=40 2>&1
  fi
  [[ -n $ticker ]] && kill "$ticker" 2>/dev/null
  # Removing the containers removes their cgroups; the rest (processes,
  # mounts, firewall rules) goes with the namespaces when this process
  # ends, and the outer script removes $work.
  if [[ -S $work/podman.sock ]]; then
    timeout 120 docker-compose --file docker/docker-compose.yml --profile monitoring --profile spare \
      down --volumes --remove-orphans --timeout 5 >/dev/null 2>&1
  fi
  if [[ -n $service ]]; then
    kill "$service" 2>/dev/null
    wait "$service" 2>/dev/null
  fi
  log "cleaned up"
  exit "$status"
}
trap cleanup EXIT

podman system service --time=0 "unix://$work/podman.sock" >"$work/podman.log" 2>&1 &
service=$!
eventually "podman's socket" 30 test -S "$work/podman.sock"

# podman runs health checks from systemd timers, and there is no systemd
# here: this loop is the timer.
(
  while sleep 2; do
    for container in $(podman ps --quiet); do
      podman healthcheck run "$container" >/dev/null 2>&1 || true
    done
  done
) &
ticker=$!

# ---------------------------------------------------------------------------
# Images

log "importing the base image"
podman import --quiet "$work/rootfs.tar" docker.io/library/debian:bookworm-slim >/dev/null
rm "$work/rootfs.tar"

log "making a stand-in Prometheus image from Debian's prometheus"
prometheus_image=$(sed -n 's/^ *image: \(.*prom\/prometheus.*\)$/\1/p' docker/docker-compose.yml)
mkdir "$work/prometheus"
cp "$(command -v prometheus)" "$work/prometheus/"
cat >"$work/prometheus/Dockerfile" <<'EOF'
FROM docker.io/library/debian:bookworm-slim
COPY prometheus /bin/prometheus
RUN mkdir /prometheus && chown nobody:nogroup /prometheus
USER nobody
EXPOSE 9090
ENTRYPOINT ["/bin/prometheus"]
EOF
podman build --quiet --tag "$prometheus_image" "$work/prometheus" >/dev/null

cli=$root/target/release/caskade

log "building the image (target prebuilt)"
compose build certs

# Whether the data volume of `service` holds nothing.
volume_is_empty() {
  local listing
  listing=$(compose run --rm --no-deps "$1" sh -c 'ls -A /var/lib/caskade; echo end' 2>/dev/null | tr -d '\r') || true
  [[ $listing == end ]] || fail "the refused $1 wrote to its volume: $listing"
}

# ---------------------------------------------------------------------------
# A node started before the certs service ever ran: nothing may be written.

log "a node without certificates refuses to start"
if output=$(compose run --rm --no-deps node4 2>&1); then
  fail "node4 started without certificates: $output"
fi
grep -q '/certs/' <<<"$output" || fail "no word of the missing certificates: $output"
printf '   %s\n' "$(grep -m1 '/certs/' <<<"$output")"
volume_is_empty node4

# ---------------------------------------------------------------------------
# The cluster

log "starting the cluster: docker-compose up --build"
compose up --detach --build certs node1 node2 node3 router prometheus

compose exec -T router cat /certs/ca.pem >"$work/ca.pem"
CASKADE_TOKEN=$(compose exec -T router cat /certs/admin.token | tr -d '\r\n')
export CASKADE_TOKEN CASKADE_URL=https://127.0.0.1:$router_port CASKADE_CA=$work/ca.pem
quietly() { "$@" >/dev/null 2>&1; }
eventually "the router to be ready" 120 quietly "$cli" health --ready

log "put, get, list, delete"
"$cli" put greeting hello >/dev/null
[[ $("$cli" get greeting) == hello ]] || fail "get greeting"
[[ $("$cli" ls greet) == greeting ]] || fail "ls greet"
"$cli" del greeting >/dev/null
if "$cli" get greeting >/dev/null 2>&1; then fail "greeting is still there"; fi

# `caskade status --json` checked by a Python expression over its `nodes`.
status_says() {
  "$cli" status --json 2>/dev/null | python3 -c "
import json, sys
nodes = json.load(sys.stdin)['nodes']
sys.exit(0 if ($1) else 1)"
}
all_caught_up='len(nodes) == 3 and all(n["ready"] and not n["down"] for n in nodes)
  and len({n["stats"].get("keys") for n in nodes}) == 1
  and all(p["reachable"] and p["lag_records"] == 0
          for n in nodes for p in n["stats"]["replication"])'
eventually "three ready nodes" 60 status_says "$all_caught_up"
"$cli" status

log "docker-compose kill node2; writes go on once it is marked down"
compose kill node2 >/dev/null
eventually "node2 to be marked down" 60 status_says \
  'any(n["id"] == 2 and n["down"] and not n["ready"] for n in nodes)'
# Each write may be refused for a moment while node2's ranges are taken
# over by the next replicas; none may take long.
retried=0
put_soon() {
  local deadline=$((SECONDS + 10))
  until "$cli" put "$1" "$2" >/dev/null 2>"$work/err"; do
    ((SECONDS < deadline)) || fail "put $1 with node2 down: $(cat "$work/err")"
    retried=$((retried + 1))
    sleep 0.5
  done
}
for i in $(seq 1 100); do put_soon "while-down/$i" "value $i"; done
echo "   100 writes, $retried retries"
[[ $("$cli" get while-down/100) == "value 100" ]] || fail "get while-down/100"

log "docker-compose start node2; it catches up"
compose start node2 >/dev/null
eventually "node2 to catch up: same key counts, lag 0" 120 status_says "$all_caught_up"
"$cli" status
status_says 'all(n["stats"]["keys"] >= 100 for n in nodes)' || fail "fewer than 100 keys on a node"

log "bad membership changes are refused"
epoch() { "$cli" status --json | python3 -c 'import json, sys; print(json.load(sys.stdin)["epoch"])'; }
before=$(epoch)
if "$cli" nodes add 2 node4:7001 2>"$work/err"; then fail "id 2 added twice"; fi
printf '   %s\n' "$(cat "$work/err")"
if "$cli" nodes add 4 'node4:port' 2>"$work/err"; then fail "an unparsable address accepted"; fi
printf '   %s\n' "$(cat "$work/err")"
# The router refuses it too, for clients that are not the CLI.
answer=$(python3 - "$router_port" "$work/ca.pem" <<'EOF'
import json, os, ssl, sys, urllib.error, urllib.request
port, ca = sys.argv[1], sys.argv[2]
request = urllib.request.Request(
    f"https://127.0.0.1:{port}/admin/v1/nodes", method="POST",
    data=json.dumps({"id": 4, "addr": "node4:port"}).encode(),
    headers={"Authorization": "Bearer " + os.environ["CASKADE_TOKEN"],
             "Content-Type": "application/json"})
try:
    urllib.request.urlopen(request, context=ssl.create_default_context(cafile=ca), timeout=10)
    print("accepted")
except urllib.error.HTTPError as e:
    print(e.code, e.read().decode())
EOF
)
[[ $answer == 400* ]] || fail "the router answered a bad address with: $answer"
printf '   router: %s\n' "$answer"
[[ $(epoch) == "$before" ]] || fail "a refused change changed the map"

log "a node given another node's id refuses to start"
if output=$(compose run --rm --no-deps -e CASKADE_NODE_ID=1 \
  -e 'CASKADE_NODE_CLUSTER__INITIAL_MEMBERS=1=node1:7001,2=node2:7001,3=node3:7001' node4 2>&1); then
  fail "node4 started with node 1's id: $output"
fi
grep -q 'another process answers there as node 1' <<<"$output" || fail "no word of the taken id: $output"
printf '   %s\n' "$(grep -o 'cluster.initial_members lists[^"]*' <<<"$output" | head -1)"
volume_is_empty node4

log "caskade nodes add 4 node4:7001, then remove it"
compose up --detach node4
"$cli" nodes add 4 node4:7001
eventually "node 4 to be ready" 120 status_says \
  'len(nodes) == 4 and all(n["ready"] and not n["down"] for n in nodes)'
"$cli" nodes remove 4
"$cli" nodes
status_says 'sorted(n["id"] for n in nodes) == [1, 2, 3]' || fail "node 4 is still in the map"
compose stop node4 >/dev/null

# ---------------------------------------------------------------------------
# Metrics, as Prometheus scraped them inside the compose network

log "Prometheus scrapes the router and every node"
prom_api() {
  python3 - "$prometheus_port" "$@" <<'EOF'
import json, sys, urllib.parse, urllib.request
port, path = sys.argv[1], sys.argv[2]
query = urllib.parse.urlencode(dict(a.split("=", 1) for a in sys.argv[3:]))
with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}?{query}", timeout=5) as answer:
    print(json.dumps(json.load(answer)["data"]))
EOF
}
targets_up() {
  prom_api /api/v1/query 'query=up' 2>/dev/null | python3 -c '
import json, sys
up = {r["metric"]["instance"]: r["value"][1] for r in json.load(sys.stdin)["result"]}
wanted = {"router:8443", "node1:9100", "node2:9100", "node3:9100"}
sys.exit(0 if all(up.get(t) == "1" for t in wanted) else 1)'
}
eventually "Prometheus to scrape every target" 90 targets_up

used=$(grep -ohE 'caskade_[a-z_]+' docker/grafana/dashboards/caskade.json docker/prometheus/alerts.yml |
  sed -E 's/_(bucket|sum|count)$//' | sort -u)
scraped_names() {
  prom_api /api/v1/label/__name__/values 2>/dev/null | python3 -c '
import json, re, sys
for name in json.load(sys.stdin):
    print(re.sub(r"_(bucket|sum|count)$", "", name))' | sort -u
}
deadline=$((SECONDS + 60))
until missing=$(comm -23 <(echo "$used") <(scraped_names)) && [[ -z $missing ]]; do
  ((SECONDS < deadline)) || fail "never scraped: $missing"
  sleep 2
done
echo "   $(wc -w <<<"$used") metric names used, all scraped"
alerts=$(prom_api /api/v1/rules | python3 -c '
import json, sys
print(len([r for g in json.load(sys.stdin)["groups"] for r in g["rules"]]))')
[[ $alerts == 7 ]] || fail "Prometheus loaded $alerts alert rules, not 7"

log "passed"
