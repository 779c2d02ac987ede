#!/usr/bin/env bash
# Install what Spam Killer's tests and benchmarks need on Debian 12:
#   - Debian packages: redis-server, swaks (+ Perl TLS), unbound, nmap, openssl, faketime, ca-certificates
#     (and python3-venv when the Python in use cannot make a venv). No daemon is left running:
#     the tests start their own instances on their own ports.
#   - postfix's smtp-sink and smtp-source, unpacked from the postfix .deb into
#     /opt/spam-killer-deps/postfix, WITHOUT installing or starting an MTA, and reachable through
#     wrapper scripts in /usr/local/bin.
#   - the project's virtualenv in .venv at the repository root, with `pip install -e '.[dev]'`.
#
# Idempotent: every step is skipped when its result is already there. Runs as root, or as a user
# with sudo. Environment:
#   PYTHON=/path/to/python3   interpreter for the venv (default: Debian's /usr/bin/python3 if it
#                             is 3.11 or newer, else python3 on PATH); a venv made with another
#                             interpreter is made anew
#   SPAM_KILLER_DEPS_DIR      where postfix is unpacked (default: /opt/spam-killer-deps)
#   FORCE_PIP=1               reinstall the Python packages even if pyproject.toml is unchanged
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "$0")/.." && pwd)"
DEPS_DIR="${SPAM_KILLER_DEPS_DIR:-/opt/spam-killer-deps}"
POSTFIX_DIR="$DEPS_DIR/postfix"
CACHE_DIR="$DEPS_DIR/cache"
BIN_DIR=/usr/local/bin
# Debian's python3 is built with profile-guided and link-time optimisation; a default pyenv or
# source build is not, and runs Spam Killer's own code about a quarter slower
# (docs/dependencies.md). So Debian's is the default when it is new enough.
if [[ -z ${PYTHON:-} ]]; then
    PYTHON=python3
    if /usr/bin/python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
        PYTHON=/usr/bin/python3
    fi
fi
VENV="$REPO_ROOT/.venv"
STAMP="$VENV/.install-deps.stamp"
PYTHON_STAMP="$VENV/.install-deps.python"  # the interpreter the venv was made with

# swaks only Recommends the Perl TLS modules; its STARTTLS tests need them.
APT_PACKAGES=(redis-server swaks libnet-ssleay-perl libio-socket-ssl-perl unbound nmap openssl
    faketime ca-certificates testssl.sh)
# Packages whose daemon the tests start themselves; the system service must not stay running.
SERVICE_PACKAGES=(redis-server unbound)
POLICY_RC_D=/usr/sbin/policy-rc.d
POLICY_BACKUP="$POLICY_RC_D.spam-killer-saved"

log() { printf 'install-deps: %s\n' "$*" >&2; }
die() { printf 'install-deps: error: %s\n' "$*" >&2; exit 1; }

if [[ ${1:-} == -h || ${1:-} == --help ]]; then
    sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//'
    exit 0
fi
[[ $# -eq 0 ]] || die "unexpected argument: $1 (see --help)"

if [[ $(id -u) -eq 0 ]]; then
    SUDO=()
else
    command -v sudo >/dev/null || die "not root and sudo is not installed"
    SUDO=(sudo)
fi
as_root() { "${SUDO[@]}" "$@"; }
apt_get() { as_root env DEBIAN_FRONTEND=noninteractive apt-get -q "$@"; }

command -v apt-get >/dev/null || die "apt-get not found: this script is for Debian 12"

# --- apt helpers -------------------------------------------------------------------------------
APT_UPDATED=0
apt_update_once() {
    if [[ $APT_UPDATED -eq 0 ]]; then
        log "apt-get update"
        apt_get update >/dev/null
        APT_UPDATED=1
    fi
}

is_installed() {
    [[ $(dpkg-query -W -f='${db:Status-Status}' "$1" 2>/dev/null || true) == installed ]]
}

POLICY_INSTALLED=0
restore_policy_rc_d() {
    [[ $POLICY_INSTALLED -eq 1 ]] || return 0
    if [[ -e $POLICY_BACKUP ]]; then
        as_root mv -f "$POLICY_BACKUP" "$POLICY_RC_D"
    else
        as_root rm -f "$POLICY_RC_D"
    fi
    POLICY_INSTALLED=0
}
trap restore_policy_rc_d EXIT

# While packages are installed, invoke-rc.d asks policy-rc.d and gets 101 ("action forbidden"),
# so no maintainer script starts a daemon. An existing policy-rc.d is put back afterwards.
block_service_starts() {
    [[ $POLICY_INSTALLED -eq 0 ]] || return 0
    if [[ -e $POLICY_RC_D && ! -e $POLICY_BACKUP ]]; then
        as_root cp -p "$POLICY_RC_D" "$POLICY_BACKUP"
    fi
    POLICY_INSTALLED=1
    printf '#!/bin/sh\n# installed by spam-killer scripts/install-deps.sh for the duration of an install\nexit 101\n' \
        | as_root tee "$POLICY_RC_D" >/dev/null
    as_root chmod 0755 "$POLICY_RC_D"
}

# Stop and disable the system instance of a service, whichever init system is in charge.
stop_service() {
    local svc=$1
    if [[ -d /run/systemd/system ]] && command -v systemctl >/dev/null; then
        as_root systemctl disable --now "$svc" >/dev/null 2>&1 || true
    else
        if [[ -x /etc/init.d/$svc ]] && as_root service "$svc" status >/dev/null 2>&1; then
            log "stopping $svc (started by its package)"
            as_root service "$svc" stop >/dev/null 2>&1 || true
        fi
        if command -v update-rc.d >/dev/null && [[ -x /etc/init.d/$svc ]]; then
            as_root update-rc.d "$svc" disable >/dev/null 2>&1 || true
        fi
    fi
}

install_packages() {
    local missing=() p
    for p in "$@"; do
        is_installed "$p" || missing+=("$p")
    done
    [[ ${#missing[@]} -gt 0 ]] || return 0
    apt_update_once
    block_service_starts
    log "apt-get install ${missing[*]}"
    apt_get install -y --no-install-recommends "${missing[@]}" >/dev/null
    NEWLY_INSTALLED+=("${missing[@]}")
}

# --- 1. Debian packages ------------------------------------------------------------------------
NEWLY_INSTALLED=()

python_ok() { "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; }
python_can_venv() { "$PYTHON" -c 'import ensurepip, venv' 2>/dev/null; }

command -v "$PYTHON" >/dev/null || install_packages python3
python_ok || die "$PYTHON is older than 3.11 (set PYTHON=/path/to/python3.11+)"
python_can_venv || install_packages python3-venv
python_can_venv || die "$PYTHON cannot create a venv (ensurepip missing)"

install_packages "${APT_PACKAGES[@]}"

for p in "${SERVICE_PACKAGES[@]}"; do
    if [[ " ${NEWLY_INSTALLED[*]} " == *" $p "* ]]; then
        stop_service "$p"
    fi
done

# --- 2. smtp-sink and smtp-source, without an MTA ---------------------------------------------
POSTFIX_SINK="$POSTFIX_DIR/usr/sbin/smtp-sink"
POSTFIX_SOURCE="$POSTFIX_DIR/usr/sbin/smtp-source"
POSTFIX_LIBDIR="$POSTFIX_DIR/usr/lib/postfix"

postfix_deb() {
    [[ -d $CACHE_DIR ]] || return 0
    find "$CACHE_DIR" -maxdepth 1 -name 'postfix_*.deb' 2>/dev/null | sort -V | tail -n 1
}

if [[ ! -x $POSTFIX_SINK || ! -x $POSTFIX_SOURCE ]]; then
    deb="$(postfix_deb)"
    if [[ -z $deb ]]; then
        apt_update_once
        as_root mkdir -p "$CACHE_DIR"
        # apt drops privileges to _apt for downloads; let it write into the cache.
        if id _apt >/dev/null 2>&1; then
            as_root chown _apt "$CACHE_DIR"
        fi
        log "apt-get download postfix into $CACHE_DIR"
        (cd "$CACHE_DIR" && apt_get download postfix >/dev/null)
        deb="$(postfix_deb)"
        [[ -n $deb ]] || die "apt-get download postfix left no .deb in $CACHE_DIR"
    fi
    log "unpacking $(basename "$deb") into $POSTFIX_DIR"
    as_root rm -rf "$POSTFIX_DIR.tmp"
    as_root mkdir -p "$POSTFIX_DIR.tmp"
    as_root dpkg-deb -x "$deb" "$POSTFIX_DIR.tmp"
    as_root rm -rf "$POSTFIX_DIR"
    as_root mv "$POSTFIX_DIR.tmp" "$POSTFIX_DIR"
fi

# Shared libraries: the postfix package's own lib* dependencies, then whatever ldd still misses.
missing_libs() {
    local f
    for f in "$POSTFIX_SINK" "$POSTFIX_SOURCE" "$POSTFIX_LIBDIR"/*.so; do
        LD_LIBRARY_PATH="$POSTFIX_LIBDIR" ldd "$f" 2>/dev/null | awk '/not found/ {print $1}'
    done | sort -u
}
if [[ -n $(missing_libs) ]]; then
    deb="$(postfix_deb)"
    [[ -n $deb ]] || die "shared libraries missing and no postfix .deb in $CACHE_DIR to read"
    mapfile -t lib_pkgs < <(dpkg-deb -f "$deb" Depends | tr ',' '\n' | sed 's/|.*//; s/(.*)//' \
        | awk '{print $1}' | grep '^lib' | grep -v '^libc6$' || true)
    install_packages "${lib_pkgs[@]}"
fi
still_missing="$(missing_libs | tr '\n' ' ')"
[[ -z $still_missing ]] || die "smtp-sink/smtp-source still miss shared libraries: $still_missing"

write_wrapper() {
    local name=$1 target=$2 dest="$BIN_DIR/$1" tmp
    tmp="$(mktemp)"
    cat >"$tmp" <<EOF
#!/bin/sh
# $name from Debian's postfix package, unpacked (no MTA installed) by spam-killer's
# scripts/install-deps.sh.
LD_LIBRARY_PATH="$POSTFIX_LIBDIR\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}"
export LD_LIBRARY_PATH
exec "$target" "\$@"
EOF
    if ! cmp -s "$tmp" "$dest" 2>/dev/null; then
        log "writing $dest"
        as_root install -m 0755 "$tmp" "$dest"
    fi
    rm -f "$tmp"
}
as_root mkdir -p "$BIN_DIR"
write_wrapper smtp-sink "$POSTFIX_SINK"
write_wrapper smtp-source "$POSTFIX_SOURCE"

# smtp-source without arguments prints its usage and exits non-zero; a loader error would say so.
usage_text="$("$BIN_DIR/smtp-source" 2>&1 || true)"
if [[ $usage_text != *usage* ]]; then
    die "$BIN_DIR/smtp-source does not start: $usage_text"
fi
POSTFIX_VERSION="$(dpkg-deb -f "$(postfix_deb)" Version 2>/dev/null || echo unknown)"

# --- 3. Python virtualenv ----------------------------------------------------------------------
want_python="$("$PYTHON" -c 'import os, sys; print(os.path.realpath(sys.executable))')"
if [[ -x $VENV/bin/python && "$(cat "$PYTHON_STAMP" 2>/dev/null || true)" != "$want_python" ]]; then
    log "$VENV was made with another interpreter than $want_python: making it anew"
    rm -rf "$VENV"
fi
if [[ ! -x $VENV/bin/python ]]; then
    log "creating $VENV with $want_python ($("$PYTHON" --version 2>&1))"
    "$PYTHON" -m venv "$VENV"
    printf '%s\n' "$want_python" >"$PYTHON_STAMP"
fi
want_stamp="$(sha256sum "$REPO_ROOT/pyproject.toml" | awk '{print $1}')"
have_stamp="$(cat "$STAMP" 2>/dev/null || true)"
if [[ ${FORCE_PIP:-0} == 1 || $want_stamp != "$have_stamp" || ! -x $VENV/bin/spam-killer ]]; then
    log "pip install --upgrade pip"
    "$VENV/bin/python" -m pip install -q --upgrade pip
    log "pip install -e '.[dev]'"
    (cd "$REPO_ROOT" && "$VENV/bin/python" -m pip install -q -e '.[dev]')
    printf '%s\n' "$want_stamp" >"$STAMP"
    PIP_STATE="installed"
else
    PIP_STATE="up to date"
fi

# --- 4. sslyze, in a venv of its own (it pins an older cryptography) ---------------------------
PYTHON="$PYTHON" SPAM_KILLER_DEPS_DIR="$DEPS_DIR" "$REPO_ROOT/scripts/install-sslyze.sh"

restore_policy_rc_d
if [[ ${#NEWLY_INSTALLED[@]} -gt 0 ]]; then
    apt_state="installed ${NEWLY_INSTALLED[*]}"
else
    apt_state="all present"
fi
printf 'install-deps: ok: apt %s; smtp-sink/smtp-source in %s (postfix %s, no MTA); %s %s (%s)\n' \
    "$apt_state" "$BIN_DIR" "$POSTFIX_VERSION" "$VENV" \
    "$("$VENV/bin/python" --version 2>&1)" "$PIP_STATE"
