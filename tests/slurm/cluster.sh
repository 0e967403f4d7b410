#!/usr/bin/env bash
# A two-node Slurm test cluster on this machine, for the slurm pod backend (docs/slurm.md).
#
#   bash tests/slurm/cluster.sh up     start it (idempotent) and print the `export KGPU_...` lines
#                                       that point `kgpu serve` at it: eval "$(bash tests/slurm/cluster.sh up)"
#   bash tests/slurm/cluster.sh down   cancel its jobs and stop what `up` started, by PID
#   bash tests/slurm/cluster.sh env    print the export lines only
#   bash tests/slurm/cluster.sh status exit 0 when it is up
#
# munged (if none answers), slurmctld on this host, and one slurmd per "node": node1 and node2 are
# network namespaces (10.77.0.11, .12 on the bridge kgpusl-br, the host at 10.77.0.1), entered with
# `nsenter --net=... unshare --uts` ("ip netns exec" remounts /sys and slurmd then finds no cgroup
# v1 freezer). Each node declares 2 GPUs as GRES on dummy character devices (mknod c 1 3). Both
# nodes share this host's dockerd, so a pod's container runs beside the others on docker's bridge.
# Needs root, slurm-wlm, munge, iproute2, iptables (.ci/run installs them).
# State, logs and the PIDs (run.pids) live under $KGPU_SLURM_DIR (default /tmp/kgpu-slurm).
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
DIR=${KGPU_SLURM_DIR:-/tmp/kgpu-slurm}
PREFIX=${KGPU_SLURM_SUBNET_PREFIX:-10.77.0}   # the bridge's /24: host .1, nodes .11 and .12
CTLD_PORT=${KGPU_SLURM_CTLD_PORT:-6817}
SLURMD_PORT=${KGPU_SLURM_SLURMD_PORT:-6818}
BRIDGE=kgpusl-br
NODES=(node1 node2)
export SLURM_CONF=$DIR/etc/slurm.conf
PIDS=$DIR/run.pids

say() { echo "cluster.sh: $*" >&2; }

print_env() {
  cat <<EOF
export SLURM_CONF=$SLURM_CONF
export KGPU_POD_BACKEND=slurm
export KGPU_SLURM_CONF=$SLURM_CONF
export KGPU_SLURM_PARTITION=gpu
export KGPU_SLURM_GPU_DEVICE_DIR='$DIR/dev/{node}'
export KGPU_SLURM_GATEWAY_ADDRESS=$PREFIX.1
EOF
}

alive() { [ -n "$1" ] && kill -0 "$1" 2>/dev/null; }

# Every PID in run.pids still alive and the controller answering: nothing to do.
running() {
  [ -s "$PIDS" ] || return 1
  while read -r _ pid; do alive "$pid" || return 1; done < "$PIDS"
  scontrol ping 2>/dev/null | grep -q UP
}

netns_up() {
  ip link show "$BRIDGE" >/dev/null 2>&1 || {
    ip link add "$BRIDGE" type bridge
    ip addr add "$PREFIX.1/24" dev "$BRIDGE"
    ip link set "$BRIDGE" up
  }
  local i=0 ns
  for node in "${NODES[@]}"; do
    i=$((i + 1)); ns=kgpusl-$node
    [ -e "/run/netns/$ns" ] && continue
    ip netns add "$ns"
    ip link del "kgpusl-veth$i" 2>/dev/null || true  # a veth left by a namespace someone held past its down
    ip link add "kgpusl-veth$i" type veth peer name eth0 netns "$ns"
    ip link set "kgpusl-veth$i" master "$BRIDGE" up
    ip -n "$ns" addr add "$PREFIX.1$i/24" dev eth0
    ip -n "$ns" link set eth0 up
    ip -n "$ns" link set lo up
    ip -n "$ns" route add default via "$PREFIX.1"
  done
  # dockerd sets FORWARD to DROP: bridged node-to-node traffic needs this
  iptables -C FORWARD -i "$BRIDGE" -o "$BRIDGE" -j ACCEPT 2>/dev/null \
    || iptables -I FORWARD 1 -i "$BRIDGE" -o "$BRIDGE" -j ACCEPT
}

netns_down() {
  for node in "${NODES[@]}"; do ip netns del "kgpusl-$node" 2>/dev/null || true; done
  ip link del "$BRIDGE" 2>/dev/null || true
  iptables -D FORWARD -i "$BRIDGE" -o "$BRIDGE" -j ACCEPT 2>/dev/null || true
}

configure() {
  mkdir -p "$DIR"/{etc,state,log,spool/node1,spool/node2,dev/node1,dev/node2}
  # The job state (scripts, environments: pod tokens) is the controller's alone; the dummy GPU devices
  # must be reachable by user-namespaced containers' root (an unprivileged host uid).
  chmod 711 "$DIR"
  chmod 700 "$DIR/state" "$DIR/spool"
  chmod 755 "$DIR/dev" "$DIR"/dev/node*
  for f in slurm.conf gres.conf; do
    sed -e "s#@DIR@#$DIR#g" -e "s#@HOST@#$(hostname -s)#g" -e "s#@BRIDGE_IP@#$PREFIX.1#g" \
        -e "s#@PREFIX@#$PREFIX#g" -e "s#@CTLD_PORT@#$CTLD_PORT#g" -e "s#@SLURMD_PORT@#$SLURMD_PORT#g" \
        "$here/$f.in" > "$DIR/etc/$f"
  done
  cp "$here/cgroup.conf" "$DIR/etc/"
  for node in "${NODES[@]}"; do
    for g in 0 1; do [ -e "$DIR/dev/$node/nvidia$g" ] || mknod -m 666 "$DIR/dev/$node/nvidia$g" c 1 3; done
  done
}

start_munged() {
  munge -n >/dev/null 2>&1 && return 0
  if [ ! -f /etc/munge/munge.key ]; then
    mkdir -p /etc/munge
    dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key 2>/dev/null
    chown munge:munge /etc/munge/munge.key
    chmod 400 /etc/munge/munge.key
  fi
  mkdir -p /run/munge && chown munge:munge /run/munge
  runuser -u munge -- /usr/sbin/munged
  for _ in $(seq 50); do munge -n >/dev/null 2>&1 && break; sleep 0.1; done
  echo "munged $(cat /run/munge/munged.pid)" >> "$PIDS"
}

up() {
  if running; then
    say "already up ($DIR)"
    print_env
    return 0
  fi
  [ -s "$PIDS" ] && down >/dev/null  # half up (a daemon died): start over
  for tool in slurmctld slurmd munged iptables ip nsenter; do
    command -v "$tool" >/dev/null || { say "$tool is missing (apt-get install slurm-wlm munge iproute2 iptables)"; exit 1; }
  done
  netns_up
  configure
  : > "$PIDS"
  start_munged
  # -c: a fresh cluster, no jobs carried over from an earlier `up`
  setsid slurmctld -D -c > "$DIR/log/slurmctld.stdout" 2>&1 < /dev/null &
  echo "slurmctld $!" >> "$PIDS"
  for _ in $(seq 100); do scontrol ping 2>/dev/null | grep -q UP && break; sleep 0.1; done
  scontrol ping 2>/dev/null | grep -q UP || { say "slurmctld did not start: $(tail -5 "$DIR/log/slurmctld.log")"; exit 1; }
  for node in "${NODES[@]}"; do
    setsid nsenter --net="/run/netns/kgpusl-$node" unshare --uts \
      sh -c "hostname $node; exec slurmd -D -N $node" > "$DIR/log/slurmd-$node.stdout" 2>&1 < /dev/null &
    echo "slurmd-$node $!" >> "$PIDS"
  done
  for _ in $(seq 150); do
    [ "$(sinfo -h -o %T 2>/dev/null | sort -u)" = idle ] && break
    sleep 0.2
  done
  if [ "$(sinfo -h -o %T 2>/dev/null | sort -u)" != idle ]; then
    say "the nodes did not become idle: $(sinfo -N -h -o '%N %T %E' 2>&1 | tr '\n' ';')"
    exit 1
  fi
  say "up: $(sinfo -N -h -o '%N %T %G' | tr '\n' ' ')($DIR)"
  print_env
}

down() {
  if [ -s "$PIDS" ] && scontrol ping 2>/dev/null | grep -q UP; then
    # Cancelled pods remove their containers (the job script's TERM trap): wait for their jobs to end.
    scancel --user="$(id -un)" 2>/dev/null || true
    for _ in $(seq 100); do [ -z "$(squeue -h -o %i 2>/dev/null)" ] && break; sleep 0.2; done
  fi
  if [ -f "$PIDS" ]; then
    tac "$PIDS" | while read -r name pid; do
      alive "$pid" || continue
      kill "$pid" 2>/dev/null || true
      for _ in $(seq 50); do alive "$pid" || break; sleep 0.1; done
      say "stopped $name ($pid)"
    done
    rm -f "$PIDS"
  fi
  netns_down
}

case "${1:-}" in
  up) up ;;
  down) down ;;
  env) print_env ;;
  status) running ;;
  *) echo "usage: $0 up|down|env|status" >&2; exit 2 ;;
esac
