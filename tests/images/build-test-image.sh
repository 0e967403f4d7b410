#!/usr/bin/env bash
# Make sure Docker is usable here and the local test images exist: kgpu-test:latest (a plain
# image) and kgpu-pytorch-test:latest (images/kgpu-pytorch/Dockerfile built FROM kgpu-test,
# rebuilt whenever its sources change: the image carries their hash as a label).
# Idempotent and unattended (CI=true, no stdin): installs docker.io if dockerd is missing,
# starts dockerd with --userns-remap=default and --icc=false in the background if `docker info`
# fails (log: /tmp/dockerd.log; a dockerd this script started earlier without them is restarted
# with them, its images carried over; any other dockerd without them is an error), makes /dev/fuse 0666, and builds
# the image from a debootstrap --variant=minbase rootfs piped to `docker import` (no registry
# is reachable; the Debian archive is the one this machine's apt uses). Does nothing that is
# already done; prints what it did. Run it after `make install`: the pod image carries the
# project environment's rclone.
set -euo pipefail

IMAGE="${KGPU_TEST_IMAGE:-kgpu-test:latest}"
PYTORCH_IMAGE="${KGPU_TEST_PYTORCH_IMAGE:-kgpu-pytorch-test:latest}"
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
SUITE="${KGPU_TEST_SUITE:-bookworm}"
MIRROR="${KGPU_TEST_MIRROR:-}"  # default: the archive this machine's apt uses for $SUITE
DOCKERD_LOG="${DOCKERD_LOG:-/tmp/dockerd.log}"
export DEBIAN_FRONTEND=noninteractive

say() { echo "build-test-image: $*"; }
sudo_() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo -n "$@"; fi; }

apt_updated=
apt_install() {
  if [ -z "$apt_updated" ]; then sudo_ apt-get update -qq; apt_updated=1; fi
  sudo_ apt-get install -y -qq --no-install-recommends "$@" </dev/null >/dev/null
}

# 1. docker.io (the daemon; a docker CLI alone is not enough).
if ! command -v dockerd >/dev/null 2>&1; then
  say "installing docker.io"
  apt_install docker.io
else
  say "dockerd present: $(command -v dockerd)"
fi

# 2. dockerd running, with user namespaces remapped (docs/pod-isolation.md): a pod's root is then
#    an unprivileged host uid (the `dockremap` subuid range, which dockerd creates itself), so the
#    CAP_SYS_ADMIN its FUSE mounts need counts only in its own namespaces. Without it the docker
#    backend gives pods no FUSE at all and the mount tests cannot pass.
userns_on() { [[ "$(docker info --format '{{json .SecurityOptions}}' 2>/dev/null)" == *name=userns* ]]; }
# ...and with inter-container communication off on its default bridge: pods never reach each other.
icc_off() { [ "$(docker network inspect --format '{{index .Options "com.docker.network.bridge.enable_icc"}}' bridge 2>/dev/null)" = false ]; }
set_up() { userns_on && icc_off; }
# A dockerd this script started: its output goes to $DOCKERD_LOG.
started_here() { [ "$(readlink "/proc/$1/fd/1" 2>/dev/null)" = "$(readlink -f "$DOCKERD_LOG")" ]; }

start_dockerd() {
  # A pid file left by a dockerd that died (a restored machine) keeps a new one from starting.
  if [ -f /var/run/docker.pid ] && ! kill -0 "$(cat /var/run/docker.pid)" 2>/dev/null; then
    say "removing stale /var/run/docker.pid"
    sudo_ rm -f /var/run/docker.pid
  fi
  local flags=()
  # The flag and the same key in daemon.json together stop dockerd from starting.
  grep -qs '"userns-remap"' /etc/docker/daemon.json || flags+=(--userns-remap=default)
  grep -qs '"icc"' /etc/docker/daemon.json || flags+=(--icc=false)
  say "starting dockerd ${flags[*]} in the background (log: $DOCKERD_LOG)"
  # Its own session, so it outlives this script and whatever started it (pytest, CI).
  if [ "$(id -u)" -eq 0 ]; then start=(setsid nohup dockerd); else start=(sudo -n setsid nohup dockerd); fi
  "${start[@]}" "${flags[@]}" >>"$DOCKERD_LOG" 2>&1 </dev/null &
  dockerd_pid=$!
  for _ in $(seq 1 150); do
    docker info >/dev/null 2>&1 && break
    kill -0 "$dockerd_pid" 2>/dev/null || break  # it exited: no use waiting
    sleep 0.2
  done
  if ! docker info >/dev/null 2>&1; then
    say "dockerd did not become ready; last lines of $DOCKERD_LOG:" >&2
    tail -n 30 "$DOCKERD_LOG" >&2 || true
    exit 1
  fi
  say "dockerd ready"
}

if ! docker info >/dev/null 2>&1; then
  start_dockerd
elif set_up; then
  say "dockerd already running, with userns-remap and --icc=false"
else
  pid=$(cat /var/run/docker.pid 2>/dev/null || true)
  if [ -n "${DOCKER_HOST:-}" ] || [ -z "$pid" ] || ! started_here "$pid"; then
    say "the running dockerd${DOCKER_HOST:+ at $DOCKER_HOST} does not remap user namespaces or lets containers" \
      "on its bridge reach each other, and this script did not start it. Add {\"userns-remap\": \"default\"," \
      "\"icc\": false} to /etc/docker/daemon.json and restart it (docs/pod-isolation.md)." >&2
    exit 1
  fi
  # One this script started before it asked for these flags: restart it with them. Without
  # userns-remap its images live under another data root than the remapped daemon's: carry them.
  carry=$(mktemp /tmp/kgpu-test-images.XXXXXX.tar)
  images=()
  for image in "$IMAGE" "$PYTORCH_IMAGE"; do docker image inspect "$image" >/dev/null 2>&1 && images+=("$image"); done
  if ! userns_on && [ ${#images[@]} -gt 0 ] && docker save -o "$carry" "${images[@]}"; then
    say "saved ${images[*]} to carry them over"
  fi
  say "restarting the dockerd this script started (pid $pid) with userns-remap and --icc=false"
  sudo_ kill -TERM "$pid"
  for _ in $(seq 1 300); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
  if kill -0 "$pid" 2>/dev/null; then say "dockerd (pid $pid) did not stop within 60 s" >&2; exit 1; fi
  start_dockerd
  if [ -s "$carry" ] && ! set_up; then say "dockerd started without userns-remap or --icc=false (see $DOCKERD_LOG)" >&2; exit 1; fi
  if [ -s "$carry" ] && docker load -q -i "$carry" >/dev/null; then say "loaded ${images[*]}"; fi
  rm -f "$carry"
fi
if ! set_up; then
  say "dockerd does not remap user namespaces, or its bridge lets containers reach each other (see $DOCKERD_LOG)" >&2
  exit 1
fi

# A pod's root is not host root: it opens /dev/fuse only if everyone may (most distributions'
# default; 0600 on some fresh machines).
if [ -c /dev/fuse ] && [ "$(stat -c %a /dev/fuse)" != 666 ]; then
  say "chmod 0666 /dev/fuse (was $(stat -c %a /dev/fuse))"
  sudo_ chmod 0666 /dev/fuse
fi

# 3. The plain test image.
build_pytorch_image() {
  local wanted built
  wanted=$(bash "$ROOT/images/kgpu-pytorch/build.sh" --hash)
  built=$(docker image inspect -f '{{index .Config.Labels "net.kgpu.source-hash"}}' "$PYTORCH_IMAGE" 2>/dev/null || true)
  if [ "$built" = "$wanted" ]; then
    say "image $PYTORCH_IMAGE is up to date"
    return
  fi
  local started=$(date +%s)
  # Debian's mirror is reachable from a build container here, PyPI is not: wheels come from this host.
  bash "$ROOT/images/kgpu-pytorch/build.sh" --base "$IMAGE" --tag "$PYTORCH_IMAGE" --offline-python 3.11 |
    sed 's/^/build-test-image: /'
  say "built $PYTORCH_IMAGE in $(( $(date +%s) - started )) s"
}

# What the plain image holds (an SSH session needs the image's own sftp-server, and rsync):
# an image built with another list is rebuilt, and the pytorch image on top of it with it.
PACKAGES=ca-certificates,curl,fuse3,procps,openssh-sftp-server,rsync
built_with=$(docker image inspect -f '{{index .Config.Labels "net.kgpu.packages"}}' "$IMAGE" 2>/dev/null || true)
if [ "$built_with" = "$PACKAGES" ]; then
  say "image $IMAGE already exists"
  build_pytorch_image
  exit 0
fi
if docker image inspect "$IMAGE" >/dev/null 2>&1; then
  say "image $IMAGE was built with other packages (${built_with:-unknown}): rebuilding it and $PYTORCH_IMAGE"
  docker image rm -f "$PYTORCH_IMAGE" "$IMAGE" >/dev/null 2>&1 || true
fi

if ! command -v debootstrap >/dev/null 2>&1; then
  say "installing debootstrap"
  apt_install debootstrap
fi

# Debian's archive as this machine's own apt reaches it (its sources list), for $SUITE.
if [ -z "$MIRROR" ]; then
  MIRROR=$(apt-get indextargets --no-release-info --format '$(RELEASE) $(REPO_URI)' 2>/dev/null |
    awk -v suite="$SUITE" '$1 == suite { print $2; exit }')
fi
if [ -z "$MIRROR" ]; then
  say "this machine's apt has no source for Debian $SUITE: set KGPU_TEST_MIRROR to a Debian archive" >&2
  exit 1
fi

started=$(date +%s)
rootfs=$(mktemp -d /tmp/kgpu-test-rootfs.XXXXXX)
trap 'sudo_ rm -rf "$rootfs"' EXIT
say "debootstrap --variant=minbase $SUITE into $rootfs"
sudo_ debootstrap --variant=minbase --include="$PACKAGES" \
  "$SUITE" "$rootfs" "$MIRROR" >/tmp/kgpu-test-debootstrap.log 2>&1 || {
  say "debootstrap failed; last lines of /tmp/kgpu-test-debootstrap.log:" >&2
  tail -n 30 /tmp/kgpu-test-debootstrap.log >&2
  exit 1
}
# Keep it small: no docs, man pages, locales, apt lists or caches.
sudo_ rm -rf "$rootfs"/usr/share/doc/* "$rootfs"/usr/share/man/* "$rootfs"/usr/share/info/* \
  "$rootfs"/usr/share/locale/* "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin \
  "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/log/*.log
say "importing $rootfs as $IMAGE"
sudo_ tar -C "$rootfs" -c . | docker import \
  -c 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
  -c 'ENV LANG=C.UTF-8' \
  -c 'CMD ["sleep", "infinity"]' \
  -c "LABEL net.kgpu.packages=$PACKAGES" \
  - "$IMAGE" >/dev/null
size=$(docker image inspect -f '{{.Size}}' "$IMAGE")
say "built $IMAGE ($((size / 1024 / 1024)) MiB) in $(( $(date +%s) - started )) s"
build_pytorch_image
