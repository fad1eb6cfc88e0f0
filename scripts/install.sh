#!/usr/bin/env bash
# Set up a fresh Debian/Ubuntu machine (as root) to build, run and test dstfuse:
# system packages, then a virtualenv in REPO/.venv with dstfuse installed
# editable plus its test extras. Idempotent: a second run skips apt when every
# package is installed and skips pip when the packaging files are unchanged.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$REPO/.venv"
STAMP="$VENV/.dstfuse-installed"

APT_PACKAGES=(
    python3 python3-venv python3-dev gcc fuse3 libfuse3-dev pkg-config
    e2fsprogs xfsprogs util-linux iproute2 fio nbdkit libnbd-bin python3-libnbd
    qemu-utils openssl systemd
    procps psmisc
)

say() { printf 'install: %s\n' "$*"; }
die() { printf 'install: error: %s\n' "$*" >&2; exit 1; }

install_apt_packages() {
    local missing=() pkg
    for pkg in "${APT_PACKAGES[@]}"; do
        # "install ok installed" only; a removed package leaves config-files.
        if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'ok installed'; then
            missing+=("$pkg")
        fi
    done
    if [ ${#missing[@]} -eq 0 ]; then
        say "system packages: all present"
        return
    fi
    [ "$(id -u)" -eq 0 ] || die "missing packages (${missing[*]}); run as root to install them"
    command -v apt-get >/dev/null || die "missing packages (${missing[*]}) and no apt-get"
    say "system packages: installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

# The first interpreter >= 3.11 that can build a venv with pip in it. The
# distribution's /usr/bin/python3 comes first: Debian builds it with PGO and
# LTO, and it runs dstfuse's mirror path about 20 % faster than a plain build
# of the same version found earlier in PATH (pyenv's, for one;
# docs/performance.md).
find_python() {
    local candidate
    for candidate in /usr/bin/python3 python3 python3.13 python3.12 python3.11; do
        command -v "$candidate" >/dev/null 2>&1 || continue
        if "$candidate" -c 'import sys, venv, ensurepip; sys.exit(sys.version_info < (3, 11))' \
                2>/dev/null; then
            command -v "$candidate"
            return
        fi
    done
    return 1
}

venv_works() {
    [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -m pip --version >/dev/null 2>&1 &&
        "$VENV/bin/python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null
}

create_venv() {
    if venv_works; then
        say "virtualenv: $VENV exists"
        return
    fi
    [ ! -e "$VENV" ] || { say "virtualenv: $VENV is broken, recreating"; rm -rf "$VENV"; }
    local python
    if python="$(find_python)"; then
        say "virtualenv: creating $VENV with $python"
        "$python" -m venv "$VENV"
    elif python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null &&
            python3 -m pip --version >/dev/null 2>&1; then
        # No ensurepip (e.g. Debian's python3 without python3-venv): make the
        # venv bare and let the system pip install pip into it.
        say "virtualenv: no ensurepip; creating bare $VENV and installing pip into it"
        python3 -m venv --without-pip "$VENV"
        python3 -m pip --python "$VENV/bin/python" install -q pip
    else
        die "no Python >= 3.11 with venv/ensurepip found (install python3-venv)"
    fi
    venv_works || die "virtualenv $VENV has no working pip"
}

# Everything that decides what pip installs; a change re-runs pip.
packaging_digest() {
    cat "$REPO/setup.cfg" "$REPO/pyproject.toml" 2>/dev/null | sha256sum | cut -d' ' -f1
}

install_dstfuse() {
    local digest
    digest="$(packaging_digest)"
    if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$digest" ] &&
            "$VENV/bin/python" -c 'import dstfuse, pyfuse3, trio, pytest' 2>/dev/null; then
        say "python packages: up to date"
        return
    fi
    say "python packages: installing dstfuse[test] (editable; pyfuse3 may build from source)"
    "$VENV/bin/python" -m pip install -q --upgrade pip
    "$VENV/bin/python" -m pip install -q -e "$REPO[test]"
    printf '%s\n' "$digest" >"$STAMP"
}

install_apt_packages
create_venv
install_dstfuse
say "done: run tests with 'bash scripts/test.sh'"
