#!/usr/bin/env bash
# Install what the backplane tests need: Debian's redis-server binary. The
# tests start their own redis-server on a free loopback port and stop it by
# PID, so the system service is neither needed nor started (policy-rc.d
# keeps the package from starting it). Idempotent: does nothing when
# redis-server is already there.
set -euo pipefail

export DEBIAN_FRONTEND=noninteractive

SUDO=""
if [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null 2>&1; then
    SUDO="sudo"
fi

if command -v redis-server >/dev/null 2>&1; then
    echo "install-redis: $(command -v redis-server) present" >&2
else
    echo "install-redis: installing Debian redis-server" >&2
    $SUDO apt-get update
    # Exit status 101 from policy-rc.d: "do not start services now".
    policy=/usr/sbin/policy-rc.d
    created_policy=""
    if [ ! -e "$policy" ]; then
        printf '#!/bin/sh\nexit 101\n' | $SUDO tee "$policy" >/dev/null
        $SUDO chmod +x "$policy"
        created_policy=1
    fi
    $SUDO apt-get install -y --no-install-recommends redis-server
    if [ -n "$created_policy" ]; then
        $SUDO rm -f "$policy"
    fi
fi

redis-server --version >&2
