#!/usr/bin/env bash
# Install what the serving tests need beyond pip: Debian's Chromium and its driver for the web-demo
# test (tests/test_web_demo.py drives /usr/bin/chromium through /usr/bin/chromedriver; no browser
# download). Idempotent and quiet; needs root (the test skips with a reason without them).
# Usage: bash .ci/serve_setup.sh
set -euo pipefail

if [[ $(id -u) -ne 0 ]]; then
    echo "serve_setup: not root, skipping (the web demo test will skip)" >&2
    exit 0
fi

need=()
[[ -x /usr/bin/chromium ]] || need+=(chromium)
[[ -x /usr/bin/chromedriver ]] || need+=(chromium-driver)

if ((${#need[@]})); then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null
    apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

echo "serve_setup: $(/usr/bin/chromium --version 2>/dev/null | head -1), $(/usr/bin/chromedriver --version 2>/dev/null | cut -d' ' -f1-2)"
