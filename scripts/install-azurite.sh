#!/usr/bin/env bash
# Installs Azurite (Microsoft's storage emulator) into .azurite/ for the blob upload tests.
# 3.35.0 is the last release that runs on Node.js 20 (3.36+ declare node >= 22).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -x .azurite/node_modules/.bin/azurite-blob ]; then
  exit 0
fi
if ! command -v npm >/dev/null 2>&1; then
  echo "npm not found: the blob upload tests need Azurite (install Node.js, then rerun)" >&2
  exit 1
fi
mkdir -p .azurite
npm install --no-audit --no-fund --silent --prefix .azurite azurite@3.35.0 >/dev/null
echo "Azurite $(node .azurite/node_modules/azurite/dist/src/blob/main.js --version 2>/dev/null || echo 3.35.0) in .azurite/"
