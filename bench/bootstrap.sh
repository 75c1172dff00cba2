#!/usr/bin/env bash
# What `make bench` needs beyond deploy/bootstrap.sh (nginx and .venv): wrk, from Debian's
# packages through apt-get when it is missing and we are root; otherwise say how to install it.
# Idempotent and instant when wrk is there.
set -o errexit -o nounset -o pipefail

if ! command -v wrk >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "bench bootstrap: installing wrk with apt-get"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk >/dev/null
    else
        echo "error: wrk is not installed. Install it with: sudo apt-get install wrk" >&2
        exit 1
    fi
fi
