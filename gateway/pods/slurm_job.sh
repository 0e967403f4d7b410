#!/bin/bash
# kgpu pod as a Slurm batch job (gateway/pods/slurm.py submits it with sbatch): one container,
# named after the job, for the job's lifetime, with only the job's GPUs inside. Cancelling the job
# (scancel: TERM) removes the container; a container that exits ends the job.
#
# Everything comes in the job's environment, by name (sbatch --export=KGPU_POD_...), never on a
# command line: the image, the pod's env as a base64 env-file (KGPU_POD_ENV), the in-pod token
# (KGPU_POD_TOKEN, copied into the container as /run/kgpu/token, mode 0400), the limits.
# A failure to start is put into the job's comment ("... error=WHY") for the gateway to read.
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin  # --export=LIST passes none
set -u
name=$SLURM_JOB_NAME
docker=docker
work=

started=
remove() {
  "$docker" rm -f "$name" >/dev/null 2>&1
  if [ -z "$started" ]; then
    # TERM reaches the docker CLI too: a create the daemon was still finishing lands after the first remove.
    sleep 1
    "$docker" rm -f "$name" >/dev/null 2>&1
  fi
  [ -n "$work" ] && { umount --lazy "$work/disk" 2>/dev/null; rm -rf --one-file-system "$work"; }
}
trap 'remove; exit 0' TERM INT HUP

fail() {
  echo "kgpu pod: $*" >&2
  scontrol update JobId="$SLURM_JOB_ID" Comment="$KGPU_POD_COMMENT error=$(echo "$*" | tr -c '[:print:]' ' ' | cut -c1-400)" 2>/dev/null
  remove
  exit 1
}

umask 077
work=$(mktemp -d) || fail "no temporary folder on $SLURMD_NODENAME"
image=$KGPU_POD_IMAGE
prefix=$KGPU_POD_PREFIX

# /workspace and /tmp on a disk of the pod's own, of KGPU_POD_DISK_GIB (as gateway/pods/disk.py
# makes for local and docker pods): a write past it fails with ENOSPC in the pod. It needs root
# and loop devices on the node; without them the reaper watches the pod's disk use instead.
disk_args=()
make_disk() {
  local owner root img=$work/disk.img disk=$work/disk
  root=$("$docker" info --format '{{.DockerRootDir}}' 2>/dev/null); root=${root##*/}
  owner=0; [[ $root =~ ^([0-9]+)\.[0-9]+$ ]] && owner=${BASH_REMATCH[1]}  # root in the pod, with userns-remap
  truncate -s "${KGPU_POD_DISK_GIB}G" "$img" &&
    mkfs.ext4 -q -F -m 0 -O ^has_journal -E "root_owner=$owner:$owner" "$img" >/dev/null 2>&1 &&
    mkdir -p "$disk" && mount -o loop,nosuid,nodev "$img" "$disk" && chmod 711 "$work" || return 1
  mkdir -p "$disk/workspace" "$disk/tmp" && chown "$owner:$owner" "$disk/workspace" "$disk/tmp" &&
    chmod 700 "$disk/workspace" && chmod 1777 "$disk/tmp" || return 1
  disk_args=(--mount "type=bind,source=$disk/workspace,target=/workspace" --mount "type=bind,source=$disk/tmp,target=/tmp")
}
if [ -n "${KGPU_POD_DISK_GIB:-}" ] && [ "$(id -u)" -eq 0 ] && command -v mkfs.ext4 >/dev/null; then
  make_disk || { echo "kgpu pod: no disk of its own on $SLURMD_NODENAME; its disk use is watched" >&2
                 umount --lazy "$work/disk" 2>/dev/null; rm -f "$work/disk.img"; disk_args=(); }
fi

entrypoint() { "$docker" image inspect --format '{{json .Config.Entrypoint}}' "$image" 2>/dev/null; }
if ! entrypoint=$(entrypoint); then
  [ "$KGPU_POD_PULL" = 1 ] || fail "image $image is not on node $SLURMD_NODENAME (pulling is off)"
  "$docker" pull -q "$image" >/dev/null 2>"$work/pull" || fail "could not pull $image: $(tail -c 300 "$work/pull")"
  entrypoint=$(entrypoint)
fi

# Only the job's GPUs (Slurm's indices on this node), numbered from 0 inside the container.
gpus=${SLURM_JOB_GPUS:-}
gpu_args=()
visible=
n=0
for g in ${gpus//,/ }; do
  if [ "$KGPU_POD_NVIDIA" = 1 ]; then :; else
    dev=${KGPU_POD_GPU_DEVICE_DIR//\{node\}/$SLURMD_NODENAME}/nvidia$g
    [ -c "$dev" ] || fail "no GPU device $dev on node $SLURMD_NODENAME"
    if [ "$dev" = "/dev/nvidia$g" ]; then
      gpu_args+=(--device "$dev")
    else
      # Elsewhere than its path in the container (the test cluster's dummy devices): a user-namespaced
      # runc binds a --device from the host's file of the container's path, so bind it and allow it.
      read -r major minor < <(stat -c '%t %T' "$dev")
      gpu_args+=(--mount "type=bind,source=$dev,target=/dev/nvidia$g" --device-cgroup-rule "c $((16#$major)):$((16#$minor)) rwm")
    fi
  fi
  visible=$visible${visible:+,}$n
  n=$((n + 1))
done
[ "$KGPU_POD_NVIDIA" = 1 ] && [ -n "$gpus" ] && gpu_args+=(--gpus "\"device=$gpus\"")

# Pods never reach each other: a bridge network must have inter-container communication off.
network=${KGPU_POD_NETWORK:-bridge}
if [ "$network" != host ] && [ "$("$docker" network inspect --format '{{.Driver}}' "$network" 2>/dev/null)" = bridge ] &&
  [ "$("$docker" network inspect --format '{{index .Options "com.docker.network.bridge.enable_icc"}}' "$network" 2>/dev/null)" != false ]; then
  fail "the docker network $network on node $SLURMD_NODENAME lets pods reach each other: start dockerd with --icc=false, or use a network made with -o com.docker.network.bridge.enable_icc=false (docs/pod-isolation.md)"
fi

security=$("$docker" info --format '{{json .SecurityOptions}}' 2>/dev/null)
args=(--name "$name" --hostname "${KGPU_POD_RENTAL:0:63}" --init
  --label "$prefix.rental_id=$KGPU_POD_RENTAL" --label "$prefix.managed=true" --label "$prefix.slurm_job=$SLURM_JOB_ID"
  --env-file "$work/env" -e "CUDA_VISIBLE_DEVICES=$visible" -e "NVIDIA_VISIBLE_DEVICES=${gpus:-void}"
  -e NVIDIA_DRIVER_CAPABILITIES=compute,utility -w /workspace
  --cpus "$KGPU_POD_CPUS" --memory "$KGPU_POD_MEMORY" --memory-swap "$KGPU_POD_MEMORY" --shm-size "$KGPU_POD_SHM"
  --pids-limit "$KGPU_POD_PIDS_LIMIT" --security-opt no-new-privileges "${gpu_args[@]}" "${disk_args[@]}")
for cap in ${KGPU_POD_CAP_DROP//,/ }; do args+=(--cap-drop "$cap"); done
[ -n "$KGPU_POD_NETWORK" ] && args+=(--network "$KGPU_POD_NETWORK")
# FUSE mounts need CAP_SYS_ADMIN, root on the host unless the daemon remaps user namespaces
# (docs/pod-isolation.md): only then does the pod get /dev/fuse and the capability.
if [[ $security == *name=userns* && $KGPU_POD_NETWORK != host ]]; then
  args+=(--device /dev/fuse:/dev/fuse:rwm --cap-add SYS_ADMIN --label "$prefix.fuse=true")
  [[ $security == *name=apparmor* ]] && args+=(--security-opt apparmor=unconfined)
elif [[ $security == *name=userns* ]]; then
  args+=(--userns host --label "$prefix.fuse=host-network")
else
  args+=(--label "$prefix.fuse=no-userns")
fi
if [[ $entrypoint =~ (^|[\"/])$KGPU_POD_BOOTSTRAP_NAME\" ]]; then
  args+=(--label "$prefix.bootstrap=true")
  cmd=("$image")
else
  args+=(--label "$prefix.bootstrap=false" --entrypoint sleep)
  cmd=("$image" infinity)
fi

printf '%s' "$KGPU_POD_ENV" | base64 -d > "$work/env" || fail "unreadable pod environment"
"$docker" create "${args[@]}" "${cmd[@]}" >/dev/null 2>"$work/err" || fail "could not create the container: $(tail -c 300 "$work/err")"
rm -f "$work/env"
if [ -n "$KGPU_POD_TOKEN" ]; then
  mkdir -p "$work/root/run/kgpu" && chmod 755 "$work/root/run" "$work/root/run/kgpu"
  printf '%s' "$KGPU_POD_TOKEN" > "$work/root/run/kgpu/token" && chmod 400 "$work/root/run/kgpu/token"
  tar -C "$work/root" --owner=0 --group=0 -cf - run/kgpu | "$docker" cp - "$name:/" 2>"$work/err" \
    || fail "could not give the pod its token: $(tail -c 300 "$work/err")"
  rm -rf "$work/root"
fi
unset KGPU_POD_TOKEN KGPU_POD_ENV
"$docker" start "$name" >/dev/null 2>"$work/err" || fail "could not start the container: $(tail -c 300 "$work/err")"

# Live as long as the container; TERM (scancel) interrupts the wait and runs the trap.
started=1
"$docker" wait "$name" > "$work/code" 2>/dev/null &
wait $!
code=$(cat "$work/code" 2>/dev/null)
trap - TERM INT HUP
fail "the container exited (code ${code:-unknown})"
