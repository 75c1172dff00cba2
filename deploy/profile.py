"""`make profile TARGET=slow-01 SECONDS=10`: a py-spy flame graph of one instance and its workers.

    python -m deploy.profile slow-01 10

Records the instance's process and its children (the slow pool's forkserver and workers) with
py-spy for SECONDS and writes an SVG flame graph into the run dir's profiles/ folder. py-spy
reads another process's memory, which needs ptrace permission: root, or
kernel.yama.ptrace_scope <= 1 for your own processes, or CAP_SYS_PTRACE in a container.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from pathlib import Path

from deploy import fleet
from services.common.settings import SettingsError, load

PTRACE_HELP = (
    "py-spy may not read that process (ptrace not permitted). Run as root, or allow it with\n"
    "  sudo sysctl kernel.yama.ptrace_scope=0\n"
    "or, in a container, add the SYS_PTRACE capability (docker run --cap-add SYS_PTRACE)."
)


def py_spy() -> str:
    local = Path(sys.executable).parent / "py-spy"
    return str(local) if local.exists() else shutil.which("py-spy") or "py-spy"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deploy.profile", description=__doc__.split("\n")[0])
    parser.add_argument("target", help="instance name: fast-01, slow-01, ...")
    parser.add_argument("seconds", type=float, nargs="?", default=10)
    options = parser.parse_args(argv)
    try:
        settings = load()
        names = [n for role in ("fast", "slow") for n, _ in settings.instances(role)]
        if options.target not in names:
            raise fleet.FleetError(f"TARGET must be one of {', '.join(names)}, got {options.target!r}")
        if not fleet.supervisord_pid(settings):
            raise fleet.FleetError(f"no fleet running in {settings.run_dir}: run make deploy-local")
        pid = fleet.process_info(settings, options.target)["pid"]
        if not pid:
            raise fleet.FleetError(f"{options.target} is not running")
    except (SettingsError, fleet.FleetError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    out = settings.run_dir / "profiles" / f"{options.target}-{time.strftime('%Y%m%d-%H%M%S')}.svg"
    out.parent.mkdir(parents=True, exist_ok=True)
    print(f"recording {options.target} (pid {pid}) and its workers for {options.seconds:g} s ...", flush=True)
    result = subprocess.run(
        [py_spy(), "record", "--pid", str(pid), "--subprocesses", "--duration", str(max(1, round(options.seconds))),
         "--output", str(out), "--format", "flamegraph", "--nonblocking", "--idle"],
        capture_output=True, text=True,
    )
    if result.returncode != 0 or not out.exists():
        text = (result.stderr + result.stdout).strip()
        if any(s in text for s in ("Permission denied", "Operation not permitted", "ptrace")):
            print(f"error: {PTRACE_HELP}\n(py-spy said: {text.splitlines()[-1] if text else ''})", file=sys.stderr)
        else:
            print(f"error: py-spy failed: {text}", file=sys.stderr)
        return 1
    print(f"flame graph: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
