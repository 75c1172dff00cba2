"""Fixtures both tiers share."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest


@pytest.fixture
def short_tmp_path():
    """A temporary directory as short as a deployed fleet's run dir (.run in a clone), for what
    keeps Unix sockets under it (supervisord's, a forkserver's: 107 bytes at most): pytest's own
    are deep, and deeper under pytest-xdist (popen-gw0/)."""
    path = Path(tempfile.mkdtemp(prefix="fleet-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)
