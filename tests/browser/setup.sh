#!/usr/bin/env bash
# What the sign-in tests need besides the Python packages (idempotent; run by .ci/run):
# Debian's chromium (Playwright drives it; never `playwright install`, which downloads a browser),
# and tests/oidc's node_modules (the oidc-provider package) from its lock file.
set -euo pipefail
cd "$(dirname "$0")/../.."

if [ ! -x /usr/bin/chromium ]; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium
fi
if ! command -v npm >/dev/null; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nodejs npm
fi
# npm ci again when the lock file changed since the last install (its hash is kept beside the modules).
lock_hash=$(sha1sum tests/oidc/package-lock.json | cut -c1-40)
if [ "$(cat tests/oidc/node_modules/.kgpu-lock-sha1 2>/dev/null)" != "$lock_hash" ]; then
  (cd tests/oidc && npm ci --no-audit --no-fund --loglevel=error)
  echo "$lock_hash" > tests/oidc/node_modules/.kgpu-lock-sha1
fi
