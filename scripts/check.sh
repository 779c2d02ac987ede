#!/usr/bin/env bash
# Every check, the same way locally and in CI: install what is needed (Debian packages, postfix's
# smtp-sink/smtp-source, the venv), then lint, type-check and run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/install-deps.sh
.venv/bin/ruff check src tests bench fuzz
.venv/bin/ruff format --check src tests bench fuzz
.venv/bin/mypy
./scripts/tls-second-opinion.sh  # informative only: never fails the build
PYTHONASYNCIODEBUG=1 exec .venv/bin/python -m pytest "$@"
