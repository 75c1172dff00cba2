"""bench/machine.py: what a bench run ran on, as machine.md shows it, and which code it measured."""

from __future__ import annotations

import subprocess

from bench import machine, report
from bench.subjects import REPO


def test_the_machine_description_fills_every_row_of_machine_md():
    info = machine.machine()
    run = {"command": "python -m bench --quick", "date": "today", "loadavg_before": "0.10",
           "loadavg_after": "0.20", "source": "commit abc1234"}
    text = report.machine_markdown(info, run)
    assert f"| cores | {info['cores']} |" in text
    assert f"| Python | {info['python']} |" in text
    assert "| code measured | commit abc1234 |" in text


def test_a_program_that_is_not_installed_is_named_not_found():
    assert machine._first_line(["/nonexistent/wrk", "-v"]) == "not found"


def test_the_code_measured_is_the_work_tree_s_commit():
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                          text=True).stdout.strip()
    assert machine.source().startswith(f"commit {head}")


def test_without_git_the_code_measured_is_unknown(monkeypatch):
    def no_git(*args, **kwargs):
        raise FileNotFoundError("git")

    monkeypatch.setattr(machine.subprocess, "run", no_git)
    assert machine.source() == "unknown (no git)"
