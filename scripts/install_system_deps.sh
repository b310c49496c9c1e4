#!/usr/bin/env bash
# Install the system packages that flexbench's server tests use: PostgreSQL (a team MLflow
# backend, tested against a throw-away cluster on 127.0.0.1) and Chromium (headless check of
# the MLflow UI). Debian/Ubuntu only. Idempotent: a quick no-op when both are present.
#
#   scripts/install_system_deps.sh           # as root (CI); prints what it does
#
# Without root and with a package missing, it says what to install and exits 0: the tests that
# need the package then skip with an explicit reason.
set -euo pipefail

have_postgres() {
    command -v initdb >/dev/null 2>&1 || compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null
}
have_chromium() {
    command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1
}

missing=()
if have_postgres; then echo "install_system_deps: postgresql present"; else missing+=(postgresql); fi
if have_chromium; then echo "install_system_deps: chromium present"; else missing+=(chromium); fi

if [ "${#missing[@]}" -eq 0 ]; then
    echo "install_system_deps: nothing to do"
    exit 0
fi

if [ "$(id -u)" -ne 0 ]; then
    echo "install_system_deps: missing ${missing[*]}; run as root: apt-get install -y ${missing[*]}"
    echo "install_system_deps: (the tests that need them will be skipped)"
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "install_system_deps: missing ${missing[*]} and no apt-get here; install them by hand" >&2
    exit 1
fi

export DEBIAN_FRONTEND=noninteractive
echo "install_system_deps: apt-get update"
apt-get update -q
echo "install_system_deps: apt-get install -y ${missing[*]}"
# Installing postgresql creates (but, without systemd, does not start) a default cluster; the
# tests start their own cluster under /tmp instead.
apt-get install -y -q "${missing[@]}"
echo "install_system_deps: done"
