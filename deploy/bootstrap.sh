#!/usr/bin/env bash
# Make this machine ready to run the fleet: nginx (through apt-get when root) and .venv from the
# pinned requirements.txt. Idempotent and quick when nothing changed; `make install` runs it alone,
# and `make deploy-local`, `make test` and .ci/run all start here (deploy/fleet.service never does).
set -o errexit -o nounset -o pipefail
cd "$(dirname "$0")/.."

python=${PYTHON:-python3}
if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
    echo "error: Python 3.11 or newer is needed (tomllib, asyncio.timeout); set PYTHON=/path/to/python3.11" >&2
    exit 1
fi

# Only the edge host of a fleet across hosts runs nginx (FLEET_HOST's roles in FLEET_SETTINGS).
needs_nginx=$("$python" - <<'PY'
import os, tomllib
host, path = os.environ.get("FLEET_HOST"), os.environ.get("FLEET_SETTINGS")
try:
    roles = tomllib.load(open(path, "rb"))["hosts"][host]["roles"] if host and path else ["edge"]
except (OSError, KeyError, TypeError, ValueError):
    roles = ["edge"]  # deploy itself says what is wrong with the inventory
print("yes" if "edge" in roles else "no")
PY
)

if [ "$needs_nginx" = yes ] && ! command -v nginx >/dev/null 2>&1 && [ ! -x /usr/sbin/nginx ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "bootstrap: installing nginx with apt-get"
        # Debian's package would start a system nginx on port 80; the fleet runs its own, so keep
        # the package's service stopped (policy-rc.d exit 101 = "do not start").
        added_policy=no
        if [ ! -e /usr/sbin/policy-rc.d ]; then
            printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d
            added_policy=yes
            trap 'rm -f /usr/sbin/policy-rc.d' EXIT  # even if apt-get fails: never leave it behind
        fi
        apt-get update -qq
        # nginx-light has every module the fleet uses; newer Debian releases only ship "nginx".
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx-light >/dev/null \
            || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx >/dev/null
        [ "$added_policy" = yes ] && rm -f /usr/sbin/policy-rc.d
    else
        echo "error: nginx is not installed. Install it with: sudo apt-get install nginx-light" >&2
        exit 1
    fi
fi

# process.user = "auto": when root deploys, the fleet's processes run as this system user (no
# login, no home), if it can read the code and the run dir (deploy/privilege.py).
if [ "$(id -u)" = 0 ] && ! getent passwd fleet >/dev/null 2>&1 && command -v useradd >/dev/null 2>&1; then
    echo "bootstrap: creating the system user fleet"
    useradd --system --user-group --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin fleet
fi

wanted=$(sha256sum requirements.txt | cut -d' ' -f1)
if [ ! -x .venv/bin/python ] || [ "$(cat .venv/.requirements.sha256 2>/dev/null)" != "$wanted" ]; then
    echo "bootstrap: creating .venv from requirements.txt"
    "$python" -m venv .venv
    .venv/bin/pip install -qq --disable-pip-version-check -r requirements.txt
    echo "$wanted" > .venv/.requirements.sha256
fi
