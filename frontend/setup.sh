#!/usr/bin/env bash
# Installs the page's only third-party dependency (livekit-client, pinned in package-lock.json)
# The gateway serves only its browser build, node_modules/livekit-client/dist/, to the page.
# The page has no build step: everything else in frontend/ is served as written.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$here"

if ! command -v npm >/dev/null 2>&1; then
  # The local avatar needs nothing from npm; only the LiveKit view of cloud avatars does.
  echo "frontend/setup.sh: npm not found: skipping livekit-client (needed only for HeyGen/LiveAvatar;" \
       "install Node.js 20+ and run 'bash frontend/setup.sh')" >&2
  exit 0
fi

npm ci --no-audit --no-fund --loglevel=error
version=$(node -p "require('./node_modules/livekit-client/package.json').version")
echo "frontend: livekit-client ${version} installed"
