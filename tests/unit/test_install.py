"""Installing is an explicit step (`make install`); the systemd unit and `deploy.fleet up` only start
what is installed, and refuse a .venv built from another requirements.txt."""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys

import pytest

from deploy import control, fleet
from services.common.settings import REPO_ROOT

UNIT = REPO_ROOT / "deploy" / "fleet.service"
INSTALLS = re.compile(r"\b(make|bootstrap\.sh|apt-get|apt|dpkg|pip3?|ensurepip|venv)\b")


def exec_lines() -> dict[str, str]:
    """{ExecStart: command, ...} of the unit, comments left out."""
    lines = [line.strip() for line in UNIT.read_text().splitlines()]
    return dict(line.split("=", 1) for line in lines if line.startswith("Exec"))


def test_no_command_of_the_systemd_unit_installs_anything():
    commands = exec_lines()
    assert {"ExecStart", "ExecReload", "ExecStop"} <= set(commands)
    for name, command in commands.items():
        assert not INSTALLS.search(command.replace("/.venv/", "/")), f"{name}={command}"


def test_the_systemd_unit_runs_the_fleet_with_the_venv_s_interpreter_and_says_to_install_after_an_update():
    python = "/opt/fleet/.venv/bin/python -m deploy.fleet"
    assert exec_lines() == {"ExecStart": f"{python} up", "ExecReload": f"{python} reload", "ExecStop": f"{python} stop"}
    assert "make install" in UNIT.read_text()


def test_make_install_runs_the_bootstrap_alone_and_make_help_lists_it():
    makefile = (REPO_ROOT / "Makefile").read_text()
    target = re.search(r"^install:(?P<deps>[^#\n]*)## (?P<help>.+)\n(?P<recipe>(\t.*\n)+)", makefile, re.M)
    assert target, "an install target with a ## help comment"
    assert target["deps"].strip() == "" and target["recipe"].strip() == "@$(BOOTSTRAP)"
    assert "BOOTSTRAP := deploy/bootstrap.sh" in makefile
    assert re.search(r"^deploy-local: bootstrap\b", makefile, re.M)  # people's command still installs first


def venv_recording(tmp_path, digest: str | None):
    venv = tmp_path / "venv"
    venv.mkdir()
    if digest is not None:
        (venv / ".requirements.sha256").write_text(digest + "\n")  # as deploy/bootstrap.sh writes it
    return venv


def test_a_venv_built_from_this_requirements_txt_passes_the_check(tmp_path):
    digest = hashlib.sha256((REPO_ROOT / "requirements.txt").read_bytes()).hexdigest()
    control.check_installed(venv_recording(tmp_path, digest))


@pytest.mark.parametrize("digest", ["0" * 64, "", None])
def test_a_venv_built_from_another_requirements_txt_or_not_by_the_bootstrap_is_refused(tmp_path, digest):
    with pytest.raises(control.FleetError, match="make install"):
        control.check_installed(venv_recording(tmp_path, digest))


@pytest.mark.parametrize("command", ["up", "reload"])
def test_fleet_up_refuses_a_venv_from_another_requirements_txt_and_installs_and_starts_nothing(
        tmp_path, monkeypatch, capsys, command):
    venv = venv_recording(tmp_path, "0" * 64)
    monkeypatch.setattr(sys, "prefix", str(venv))  # deploy.fleet runs from this .venv

    def no_process(*args, **kwargs):
        raise AssertionError(f"started a process: {args}")
    monkeypatch.setattr(subprocess, "Popen", no_process)  # no pip, no apt-get, no supervisord
    monkeypatch.setenv("FLEET_RUN_DIR", str(tmp_path / "run"))

    assert fleet.main([command]) == 1
    error = capsys.readouterr().err
    assert "requirements.txt" in error and "make install" in error and str(venv) in error
    assert not (tmp_path / "run").exists()  # nothing rendered
    assert sorted(p.name for p in venv.iterdir()) == [".requirements.sha256"]  # nothing installed


# the interpreter the .venv is made from (issue 29, item 9) ----------------------------------------

SYSTEM_PYTHON = "/usr/bin/python3.11"


def fleet_user_can_run(python: str) -> bool:
    from deploy import privilege

    user = privilege.DEFAULT_USER
    return subprocess.run(["runuser", "-u", user, "--", python, "-c", ""], capture_output=True).returncode == 0


@pytest.mark.skipif(os.geteuid() != 0 or not os.path.exists(SYSTEM_PYTHON), reason="needs root and Debian's python3.11")
def test_the_bootstrap_makes_the_venv_from_a_python_the_fleet_s_user_can_run_when_python3_is_closed_to_it(tmp_path):
    from deploy import privilege

    if not privilege.user_exists(privilege.DEFAULT_USER):
        pytest.skip("the bootstrap makes the user fleet first")
    # python3 first on PATH is one the fleet's user cannot run, as a pyenv Python under /root is.
    closed = tmp_path / "closed"  # pytest's temp dirs are 0700
    closed.mkdir(mode=0o700)
    (closed / "python3").symlink_to(SYSTEM_PYTHON)
    assert not fleet_user_can_run(str(closed / "python3"))
    result = subprocess.run(["bash", str(REPO_ROOT / "deploy" / "bootstrap.sh"), "--print-python"],
                            env={**os.environ, "PATH": f"{closed}:{os.environ['PATH']}", "PYTHON": ""},
                            capture_output=True, text=True, timeout=60)
    chosen = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else ""
    assert chosen and fleet_user_can_run(chosen), result.stdout + result.stderr
