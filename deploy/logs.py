"""`make logs`: follow every log of the fleet, merged into one readable stream.

    python -m deploy.logs                 # follow (Ctrl-C to stop)
    python -m deploy.logs --once          # print what is there and exit
    python -m deploy.logs | grep <request id>

nginx's JSON access log and the instances' JSON lines are shown as
`time  source  level  request_id  message`; other lines (supervisord, nginx's error log) as they
are. The request id a response carries (X-Request-ID, the edge's own) finds the request at the edge
and in the instance; an id the client sent is shown on the edge's line (client_request_id=...).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from services.common.settings import run_dir_from


def render(source: str, line: str) -> str:
    try:
        record = json.loads(line)
    except ValueError:
        return f"{source:<14} {line}"
    if not isinstance(record, dict):
        return f"{source:<14} {line}"
    if "uri" in record and "status" in record:  # nginx access log
        return (f"{record.get('time', '')[11:19]}  {'edge':<11} {'access':<7} {record.get('request_id', '-'):<32} "
                f"{record.get('method')} {record.get('uri')} {record.get('status')} "
                f"{record.get('request_time')}s upstream={record.get('upstream_addr') or '-'}"
                + (f" client_request_id={record['client_request_id']}" if record.get("client_request_id") else ""))
    text = (f"{record.get('time', '')[11:23]}  {record.get('instance', source):<11} {record.get('level', ''):<7} "
            f"{record.get('request_id', '-'):<32} {record.get('message', '')}")
    if record.get("traceback"):
        text += "\n    " + record["traceback"].rstrip().replace("\n", "\n    ")
    return text


def follow(log_dir: Path, once: bool) -> None:
    positions: dict[Path, int] = {}  # bytes of each file already shown
    while True:
        for path in sorted(log_dir.glob("*.log")):
            size = path.stat().st_size
            skip_partial = False
            if path not in positions:  # first sight: when following, start near the end
                positions[path] = 0 if once else max(0, size - 4096)
                skip_partial = positions[path] > 0
            if positions[path] > size:  # truncated or rotated: from the top
                positions[path] = 0
            with path.open("rb") as f:
                f.seek(positions[path])
                data = f.read(size - positions[path])
            consumed = 0
            if skip_partial:  # we seeked into the middle of a line
                consumed = data.find(b"\n") + 1
                data = data[consumed:]
            complete, newline, _ = data.rpartition(b"\n")  # a line still being written waits
            positions[path] += consumed + len(complete) + len(newline)
            for line in complete.decode(errors="replace").splitlines():
                if line.strip():
                    print(render(path.stem, line), flush=True)
        if once:
            return
        time.sleep(0.5)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deploy.logs", description=__doc__.split("\n")[0])
    parser.add_argument("--once", action="store_true", help="print what is there and exit")
    options = parser.parse_args(argv)
    log_dir = run_dir_from(os.environ) / "logs"
    if not log_dir.is_dir():
        print(f"no logs in {log_dir}: run make deploy-local", file=sys.stderr)
        return 1
    try:
        follow(log_dir, options.once)
    except KeyboardInterrupt:
        pass
    except BrokenPipeError:  # | head
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
