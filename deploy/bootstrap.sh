#!/usr/bin/env bash
# Make this machine ready to run the fleet: nginx (through apt-get when root) and .venv from the
# pinned requirements.txt. Idempotent and quick when nothing changed; `make install` runs it alone,
# and `make deploy-local`, `make test` and .ci/run all start here (deploy/fleet.service never does).
set -o errexit -o nounset -o pipefail
cd "$(dirname "$0")/.."

# process.user = "auto": when root deploys, the fleet's processes run as this system user (no
# login, no home), if it can read the code and the run dir (deploy/privilege.py).
SERVICE_USER=fleet
if [ "${1:-}" != --print-python ] && [ "$(id -u)" = 0 ] && ! getent passwd "$SERVICE_USER" >/dev/null 2>&1 && command -v useradd >/dev/null 2>&1; then
    echo "bootstrap: creating the system user $SERVICE_USER"
    useradd --system --user-group --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin "$SERVICE_USER"
fi

# The interpreter the .venv is made from. That user must be able to run it: a Python under /root
# (pyenv) is closed to it, and the fleet would fall back to running everything as root. So, unless
# PYTHON says which, take the first Python 3.11+ of these that it can run (Debian's
# /usr/bin/python3.11 where python3 is pyenv's), else the first Python 3.11+ at all.
# `deploy/bootstrap.sh --print-python` prints the choice and changes nothing.
is_311() { "$1" -c 'import sys; sys.exit(sys.version_info < (3, 11))' >/dev/null 2>&1; }
user_can_run() {  # as the service user, with its own groups only (runuser: setpriv resolved the path as root)
    [ "$(id -u)" = 0 ] && getent passwd "$SERVICE_USER" >/dev/null 2>&1 \
        && runuser -u "$SERVICE_USER" -- "$1" -c '' >/dev/null 2>&1
}
choose_python() {
    local candidate first=""
    for candidate in python3 /usr/bin/python3.11 /usr/bin/python3 /usr/local/bin/python3.11; do
        command -v "$candidate" >/dev/null 2>&1 && is_311 "$candidate" || continue
        candidate=$(command -v "$candidate")
        [ -n "$first" ] || first=$candidate
        if user_can_run "$candidate"; then echo "$candidate"; return; fi
    done
    echo "$first"
}
python=${PYTHON:-$(choose_python)}
if [ -z "$python" ] || ! is_311 "$python"; then
    echo "error: Python 3.11 or newer is needed (tomllib, asyncio.timeout); set PYTHON=/path/to/python3.11" >&2
    exit 1
fi
if [ "${1:-}" = --print-python ]; then
    echo "$python"
    exit 0
fi

# Only the edge host of a fleet across hosts runs nginx (FLEET_HOST's roles in FLEET_SETTINGS), and
# only a host running the fleet's own job store needs redis-server (jobs.store = "redis" with no
# jobs.redis_url, on the host with the store role; deploy/store.py). `--tests` (make test): the store tests run a
# real redis-server, so it is installed too.
read -r needs_nginx needs_store < <("$python" - "${1:-}" <<'PY'
import os, sys, tomllib
host, path = os.environ.get("FLEET_HOST"), os.environ.get("FLEET_SETTINGS")
try:
    table = tomllib.load(open(path or "deploy/fleet.toml", "rb"))
except (OSError, ValueError):
    table = {}  # deploy itself says what is wrong with the file
try:
    roles = table["hosts"][host]["roles"] if host and path else ["edge", "slow", "store"]
except (KeyError, TypeError):
    roles = ["edge", "slow", "store"]  # deploy itself says what is wrong with the inventory
jobs = {**tomllib.load(open("deploy/fleet.toml", "rb"))["jobs"], **table.get("jobs", {})}
store = os.environ.get("FLEET_JOBS_STORE", jobs.get("store", "sqlite")).strip()
url = os.environ.get("FLEET_JOBS_REDIS_URL", jobs.get("redis_url", "")).strip()
managed = store == "redis" and not url and "store" in roles
print("yes" if "edge" in roles else "no", "yes" if managed or sys.argv[1] == "--tests" else "no")
PY
)

# apt-get install, as root, without starting the package's own service: the fleet runs its own
# (Debian's nginx would start on port 80, its redis-server on 6379). policy-rc.d exit 101 = "do not start".
apt_install() {
    local added_policy=no
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d
        added_policy=yes
        trap 'rm -f /usr/sbin/policy-rc.d' EXIT  # even if apt-get fails: never leave it behind
    fi
    [ -n "${apt_updated:-}" ] || { apt-get update -qq; apt_updated=yes; }
    local status=0
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null || status=$?
    [ "$added_policy" = yes ] && rm -f /usr/sbin/policy-rc.d
    return $status
}

if [ "$needs_nginx" = yes ] && ! command -v nginx >/dev/null 2>&1 && [ ! -x /usr/sbin/nginx ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "bootstrap: installing nginx with apt-get"
        # nginx-light has every module the fleet uses; newer Debian releases only ship "nginx".
        apt_install nginx-light || apt_install nginx
    else
        echo "error: nginx is not installed. Install it with: sudo apt-get install nginx-light" >&2
        exit 1
    fi
fi

if [ "$needs_store" = yes ] && ! command -v redis-server >/dev/null 2>&1 && [ ! -x /usr/bin/redis-server ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "bootstrap: installing redis-server with apt-get (the job store)"
        apt_install redis-server
    elif [ "${1:-}" = --tests ]; then
        echo "warning: redis-server is not installed: the Redis store tests are skipped (sudo apt-get install redis-server)" >&2
    else
        echo 'error: jobs.store = "redis" needs redis-server. Install it with: sudo apt-get install redis-server' >&2
        exit 1
    fi
fi

# Prometheus (Debian's, with promtool): `--observe` (make observe) runs it, `--tests` checks the
# rules with promtool and has a test open its pages. Its recommended exporters are not the fleet's.
if { [ "${1:-}" = --observe ] || [ "${1:-}" = --tests ]; } && ! command -v promtool >/dev/null 2>&1 \
        && [ ! -x /usr/bin/promtool ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "bootstrap: installing prometheus with apt-get (make observe, the rules' tests)"
        apt_install --no-install-recommends prometheus
        # Debian enables its own prometheus.service for the next boot: on every interface, port
        # 9090, with no login. The fleet runs its own only when asked (make observe), on loopback.
        if command -v systemctl >/dev/null 2>&1; then systemctl disable prometheus.service >/dev/null 2>&1 || true; fi
    elif [ "${1:-}" = --tests ]; then
        echo "warning: prometheus is not installed: the rules' tests are skipped (sudo apt-get install --no-install-recommends prometheus)" >&2
    else
        echo "error: make observe needs prometheus. Install it with: sudo apt-get install --no-install-recommends prometheus" >&2
        exit 1
    fi
fi

# A .venv made before from an interpreter the service user cannot run (pyenv's, under /root) is
# made again from one it can, when there is one: the fleet then drops root as it should.
if [ -z "${PYTHON:-}" ] && [ -x .venv/bin/python ] && ! user_can_run .venv/bin/python && user_can_run "$python"; then
    echo "bootstrap: the user $SERVICE_USER cannot run .venv's interpreter ($(readlink -f .venv/bin/python)); making .venv again from $python"
    rm -rf .venv
fi

wanted=$(sha256sum requirements.txt | cut -d' ' -f1)
if [ ! -x .venv/bin/python ] || [ "$(cat .venv/.requirements.sha256 2>/dev/null)" != "$wanted" ]; then
    echo "bootstrap: creating .venv from requirements.txt"
    "$python" -m venv .venv
    .venv/bin/pip install -qq --disable-pip-version-check -r requirements.txt
    echo "$wanted" > .venv/.requirements.sha256
fi
