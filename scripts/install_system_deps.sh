#!/bin/sh
# System packages the test suite needs, installed once (`make test` calls this; quick when done).
# Each block checks first and installs only what is missing. Debian/Ubuntu (apt-get); as root,
# or with passwordless sudo. Elsewhere it prints what to install and exits 0: the tests that need a
# missing package then say so when they are skipped.
set -eu

SUDO=""
if [ "$(id -u)" != "0" ]; then
    if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then SUDO="sudo -n"; else SUDO="none"; fi
fi
APT_UPDATED=""

apt_install() {  # apt_install PACKAGE...
    if ! command -v apt-get >/dev/null 2>&1 || [ "$SUDO" = "none" ]; then
        echo "install_system_deps: please install: $* (no apt-get or no root here); the tests that need it are skipped" >&2
        return 0
    fi
    if [ -z "$APT_UPDATED" ]; then
        $SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -qq
        APT_UPDATED=1
    fi
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@"
}

# --- PostgreSQL: the database tests run on it as well as on SQLite (tests/pg_support.py starts a
# throwaway cluster with initdb + pg_ctl; nothing is configured system-wide, no service is started).
if ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || command -v initdb >/dev/null 2>&1; then
    :
else
    echo "install_system_deps: installing postgresql"
    apt_install postgresql
    # Debian's package starts a cluster service where systemd runs; the tests do not use it.
fi

# --- Chromium: tests/e2e/test_browser.py drives /usr/bin/chromium with Playwright (the Python
# package only; `playwright install` is never run, so no browser download is needed).
if [ -x /usr/bin/chromium ]; then
    :
else
    echo "install_system_deps: installing chromium"
    apt_install chromium
fi
