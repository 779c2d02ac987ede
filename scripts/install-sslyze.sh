#!/usr/bin/env bash
# Install sslyze (PyPI) for the TLS grade gate (tests/integration/test_tls_grade.py) into a venv of
# its own: sslyze pins cryptography below the version the project uses (sslyze 6.3.1 wants
# cryptography<47, the project's venv has a newer one), so it cannot share .venv.
#
#   $SPAM_KILLER_DEPS_DIR/sslyze-venv   (default: /opt/spam-killer-deps/sslyze-venv)
#
# The test runs "$SPAM_KILLER_DEPS_DIR/sslyze-venv/bin/python -m sslyze". Idempotent: nothing is
# done when the venv already has the pinned version. Environment:
#   PYTHON=/path/to/python3   interpreter for the venv (default: python3 on PATH, >= 3.10)
#   SPAM_KILLER_DEPS_DIR      parent folder of the venv (default: /opt/spam-killer-deps)
#   SSLYZE_VERSION            version to install (default: the pin below)
set -euo pipefail

SSLYZE_VERSION="${SSLYZE_VERSION:-6.3.1}"
DEPS_DIR="${SPAM_KILLER_DEPS_DIR:-/opt/spam-killer-deps}"
VENV="$DEPS_DIR/sslyze-venv"
PYTHON="${PYTHON:-python3}"

log() { printf 'install-sslyze: %s\n' "$*" >&2; }
die() { printf 'install-sslyze: error: %s\n' "$*" >&2; exit 1; }

if [[ ${1:-} == -h || ${1:-} == --help ]]; then
    sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'
    exit 0
fi
[[ $# -eq 0 ]] || die "unexpected argument: $1 (see --help)"

installed_version() {
    "$VENV/bin/python" -c 'import importlib.metadata as m; print(m.version("sslyze"))' 2>/dev/null \
        || true
}

if [[ -x $VENV/bin/python && $(installed_version) == "$SSLYZE_VERSION" ]] \
    && "$VENV/bin/python" -m sslyze --help >/dev/null 2>&1; then
    printf 'install-sslyze: ok: sslyze %s in %s (up to date)\n' "$SSLYZE_VERSION" "$VENV"
    exit 0
fi

command -v "$PYTHON" >/dev/null || die "$PYTHON not found (set PYTHON=/path/to/python3)"
"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 10))' \
    || die "$PYTHON is older than 3.10, which sslyze $SSLYZE_VERSION needs"

if [[ ! -x $VENV/bin/python ]]; then
    log "creating $VENV with $("$PYTHON" --version 2>&1)"
    mkdir -p "$DEPS_DIR"
    rm -rf "$VENV"
    "$PYTHON" -m venv "$VENV"
fi
log "pip install sslyze==$SSLYZE_VERSION into $VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q "sslyze==$SSLYZE_VERSION"

"$VENV/bin/python" -m sslyze --help >/dev/null 2>&1 \
    || die "$VENV/bin/python -m sslyze does not start"
[[ $(installed_version) == "$SSLYZE_VERSION" ]] \
    || die "$VENV has sslyze $(installed_version), expected $SSLYZE_VERSION"
printf 'install-sslyze: ok: sslyze %s in %s (installed)\n' "$SSLYZE_VERSION" "$VENV"
