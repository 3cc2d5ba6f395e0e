#!/usr/bin/env bash
# Installs the page's only third-party dependency (livekit-client, pinned in package-lock.json)
# and copies its browser build into frontend/vendor/, which the gateway serves at /vendor/.
# The page has no build step: everything else in frontend/ is served as written.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$here"

if ! command -v npm >/dev/null 2>&1; then
  echo "frontend/setup.sh: npm is required (Node.js 20 or newer)" >&2
  exit 1
fi

npm ci --no-audit --no-fund --loglevel=error
mkdir -p vendor
cp node_modules/livekit-client/dist/livekit-client.umd.js vendor/livekit-client.umd.js
version=$(node -p "require('./node_modules/livekit-client/package.json').version")
echo "frontend: livekit-client ${version} -> frontend/vendor/livekit-client.umd.js"
