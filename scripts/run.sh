#!/usr/bin/env bash
# Quick start: install what is needed, then run Spam Killer on its built-in defaults:
# STARTTLS on 127.0.0.1:2525 with a self-signed certificate made on first run, recipients
# @localhost, and a local development upstream that stores accepted mail in
# spam-killer-data/maildir/new. Extra arguments go to `spam-killer run` (e.g. -c FILE).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/install-deps.sh
exec .venv/bin/spam-killer run "$@"
