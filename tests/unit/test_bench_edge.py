"""The bench's own nginx (bench/edge.py): the edge ceiling, the floor's edge and a peer's edge."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from bench import edge


def test_the_ceiling_answers_fast_itself_and_passes_nothing(tmp_path: Path) -> None:
    text = edge.render(tmp_path, 9000).read_text()
    assert 'return 200 "Hello!"' in text and "upstream" not in text and "proxy_pass" not in text


def test_the_floor_passes_fast_round_robin_to_each_of_its_instances(tmp_path: Path) -> None:
    text = edge.render(tmp_path, 9000, 9001, instances=3).read_text()
    assert [line.strip() for line in text.splitlines() if line.strip().startswith("server 127")] == [
        "server 127.0.0.1:9001;", "server 127.0.0.1:9002;", "server 127.0.0.1:9003;"]
    assert "location = /fast" in text and "return 404" in text  # nothing but /fast and /healthz


def test_a_peer_gets_every_path(tmp_path: Path) -> None:
    text = edge.render(tmp_path, 9000, 9001, every_path=True).read_text()
    assert "location = /fast" not in text and "return 404" not in text and "/healthz" not in text
    assert text.count("proxy_pass http://fast;") == 1 and "server 127.0.0.1:9001;" in text


@pytest.mark.skipif(shutil.which("nginx") is None and not Path("/usr/sbin/nginx").exists(), reason="nginx is not installed")
@pytest.mark.parametrize("kwargs", [{}, {"instance_port": 9001, "instances": 2},
                                    {"instance_port": 9001, "every_path": True}])
def test_nginx_accepts_each_form(tmp_path: Path, kwargs: dict) -> None:
    edge.render(tmp_path, 9000, **kwargs)
    result = subprocess.run([*edge.command(tmp_path), "-t"], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
