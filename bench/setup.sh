#!/usr/bin/env bash
# Installs what bench/run.py needs, or says exactly what is missing and how to get it.
#
#   wrk, nginx        Debian packages (apt-get; needs root or passwordless sudo)
#   restate-server    npm package @restatedev/restate-server@$RESTATE_VERSION, into
#                     bench/.peers/restate (git-ignored; it carries a native binary)
#   restate-sdk, hypercorn, and this project, into the current Python environment
#
# Safe to re-run: installed pieces are left alone. Exit code 0 when everything is
# there; 1 when something could not be installed (run.py then skips that peer).
set -euo pipefail

RESTATE_VERSION="${RESTATE_VERSION:-1.7.12}"
PYTHON="${PYTHON:-python3}"
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(dirname "$here")"
peers="$here/.peers"
missing=0

say() { printf 'setup: %s\n' "$*"; }

as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"
    elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then sudo "$@"
    else return 1
    fi
}

# --- Debian packages ---------------------------------------------------------------
apt_wanted=()
command -v wrk >/dev/null 2>&1 || apt_wanted+=(wrk)
command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || apt_wanted+=(nginx)
if ! command -v npm >/dev/null 2>&1; then apt_wanted+=(nodejs npm); fi
if [ "${#apt_wanted[@]}" -gt 0 ]; then
    if command -v apt-get >/dev/null 2>&1 \
        && as_root env DEBIAN_FRONTEND=noninteractive apt-get update -q \
        && as_root env DEBIAN_FRONTEND=noninteractive \
            apt-get install -y -q --no-install-recommends "${apt_wanted[@]}"; then
        say "installed ${apt_wanted[*]}"
    else
        say "could not install ${apt_wanted[*]}: run as root:"
        say "  apt-get update && apt-get install -y ${apt_wanted[*]}"
        missing=1
    fi
fi
# The Debian package may start a system nginx on port 80; the benchmark runs its own
# nginx on a free loopback port and does not need or touch that one.

# --- Restate server (npm) ----------------------------------------------------------
restate_dir="$peers/restate"
restate_bin_glob="$restate_dir/node_modules/@restatedev/restate-server-*/bin/restate-server"
have_restate() {
    local bin
    for bin in $restate_bin_glob; do
        [ -x "$bin" ] && "$bin" --version 2>/dev/null | grep -q "$RESTATE_VERSION" && return 0
    done
    return 1
}
if have_restate; then
    say "restate-server $RESTATE_VERSION already in $restate_dir"
elif command -v npm >/dev/null 2>&1; then
    mkdir -p "$restate_dir"
    # --ignore-scripts: the package's only install script is a usage-analytics ping;
    # the server binary comes from the platform package and needs no script.
    if npm install --prefix "$restate_dir" --no-audit --no-fund --ignore-scripts \
        "@restatedev/restate-server@$RESTATE_VERSION" >/dev/null && have_restate; then
        say "installed restate-server $RESTATE_VERSION into $restate_dir"
    else
        say "npm could not install @restatedev/restate-server@$RESTATE_VERSION (no binary for $(uname -m)?)"
        missing=1
    fi
else
    say "npm not found: install Node.js and npm, then re-run (Restate will be skipped)"
    missing=1
fi

# --- Python packages ---------------------------------------------------------------
if ! "$PYTHON" -c 'import restate, hypercorn' 2>/dev/null; then
    if "$PYTHON" -m pip install -q restate-sdk hypercorn; then
        say "installed restate-sdk and hypercorn"
    else
        say "pip could not install restate-sdk hypercorn (Restate will be skipped)"
        missing=1
    fi
fi
if ! "$PYTHON" -c 'import aiohttp, yaml' 2>/dev/null || ! command -v stepgate >/dev/null 2>&1; then
    # The project itself: its dependencies (aiohttp, PyYAML, uvloop, ...) and the
    # `stepgate` CLI. run.py also works without it through PYTHONPATH, but not
    # without the dependencies.
    if "$PYTHON" -m pip install -q -e "$repo"; then
        say "installed the project (pip install -e .)"
    else
        say "pip install -e $repo failed; install the project's dependencies by hand"
        missing=1
    fi
fi

if [ "$missing" -eq 0 ]; then
    say "ready: python bench/run.py"
fi
exit "$missing"
