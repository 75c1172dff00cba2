#!/usr/bin/env bash
# What `make bench` needs beyond deploy/bootstrap.sh (nginx and .venv): wrk, from Debian's
# packages through apt-get when it is missing and we are root (otherwise it says how to install
# it), perf when we may install it, and the peers' own environment. Idempotent and instant when
# all are there.
set -o errexit -o nounset -o pipefail
cd "$(dirname "$0")/.."

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

# perf (Debian's linux-perf), for whom the fleets' fast path waits behind under the flood
# (bench/sched.py); without it that figure is left out and the results say so.
if ! command -v perf >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "bench bootstrap: installing linux-perf with apt-get"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq linux-perf >/dev/null || echo "bench bootstrap: linux-perf not installed"
fi

# The peers (bench/peers/): their own environment from their own pinned requirements, never the
# product's .venv. Rebuilt only when bench/peers/requirements.txt changes.
peers=bench/peers
wanted=$(sha256sum "$peers/requirements.txt" | cut -d' ' -f1)
if [ ! -x "$peers/.venv/bin/python" ] || [ "$(cat "$peers/.venv/.requirements.sha256" 2>/dev/null)" != "$wanted" ]; then
    echo "bench bootstrap: creating $peers/.venv from $peers/requirements.txt"
    "${PYTHON:-python3}" -m venv --clear "$peers/.venv"
    "$peers/.venv/bin/pip" install -qq --disable-pip-version-check -r "$peers/requirements.txt"
    echo "$wanted" > "$peers/.venv/.requirements.sha256"
fi
