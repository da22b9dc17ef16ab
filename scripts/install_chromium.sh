#!/usr/bin/env bash
# Debian's Chromium, for the web chat's browser test (tests/test_chat_web.py drives it with Playwright; Playwright's
# own browser download does not work offline). Does nothing when chromium is already installed. apt's log goes to
# a file and is shown only on failure.
set -euo pipefail
command -v chromium >/dev/null && exit 0
as_root() { if [[ $(id -u) -eq 0 ]]; then "$@"; else sudo "$@"; fi; }
log=/tmp/raft-toolkit-apt.log
echo "installing chromium for the browser test (log: $log)"
{ as_root apt-get update -q && DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -q chromium; } >"$log" 2>&1 \
  || { tail -n 30 "$log"; echo "could not install chromium: install Debian's chromium package, then run make test again" >&2; exit 1; }
