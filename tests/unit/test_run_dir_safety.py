"""What root does in the run dir cannot be turned against it (issue 29, items 1, 2 and 4).

Deployed by root, the fleet's processes run as another user, and other local users share /tmp.
These tests play those users: they plant links and make directories first, then deploy renders
the run dir as root again, and nothing outside what the fleet made may change.
"""

from __future__ import annotations

import os
import pwd
import subprocess
import tempfile
import zlib
from pathlib import Path

import pytest

from deploy import fleet, privilege, render, rundir
from services.common.settings import SettingsError, load

EXAMPLE = str(render.REPO_ROOT / "deploy" / "hosts.example.toml")
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="plays another local user: needs root")


def settings_for(run_dir: Path, **env: str):
    return load(env={"FLEET_RUN_DIR": str(run_dir), **env})


def other_user() -> pwd.struct_passwd:
    """A local user who is not root: the fleet's own (it owns what the fleet hands it), or nobody."""
    return pwd.getpwnam(privilege.DEFAULT_USER if privilege.user_exists(privilege.DEFAULT_USER) else "nobody")


def as_user(user: pwd.struct_passwd, *command: str) -> subprocess.CompletedProcess:
    return subprocess.run(list(command), user=user.pw_uid, group=user.pw_gid, extra_groups=[],
                          capture_output=True, text=True, timeout=30)


@pytest.fixture
def shared_dir():
    """A directory other users can reach (pytest's own temp dirs are under a 0700 one), as
    /opt/fleet would be; and in it a sticky one everybody may write, as /tmp is."""
    path = Path(tempfile.mkdtemp(prefix="fleet-test-", dir="/tmp"))
    path.chmod(0o755)
    (path / "tmp").mkdir(mode=0o1777)
    (path / "tmp").chmod(0o1777)
    yield path
    rundir.remove_tree(path)


# item 1: edge.cache_dir ------------------------------------------------------------------------

@pytest.mark.parametrize("cache_dir", ["/", "/var/cache/nginx", "../scratch", "nginx/../../x", ".", ""])
def test_an_edge_cache_dir_outside_the_run_dir_is_refused_before_anything_starts(tmp_path, cache_dir):
    with pytest.raises(SettingsError, match="edge.cache_dir"):
        settings_for(tmp_path / "run", FLEET_EDGE_CACHE_DIR=cache_dir)


def test_a_directory_the_fleet_did_not_make_is_never_emptied_as_the_edge_cache(tmp_path):
    run_dir = tmp_path / "run"
    scratch = run_dir / "scratch"
    scratch.mkdir(parents=True)
    (scratch / "precious.txt").write_text("not the fleet's")
    settings = settings_for(run_dir, FLEET_EDGE_CACHE_DIR="scratch")
    with pytest.raises(rundir.RunDirError, match="was not made by the fleet"):
        render.write(settings)  # what `make deploy-local` does before anything starts
    fleet.clear_edge_cache(settings)  # what start and `make stop` do
    assert (scratch / "precious.txt").read_text() == "not the fleet's"


def test_the_edge_cache_the_fleet_made_is_emptied_and_its_mark_kept(tmp_path):
    settings = settings_for(tmp_path / "run")
    render.write(settings)
    entries = render.edge_cache_entries(settings)
    (entries / "a" / "bc").mkdir(parents=True)
    (entries / "a" / "bc" / "0123").write_text("cached answer")
    fleet.clear_edge_cache(settings)
    assert not entries.exists() and render.edge_cache_marked(settings)
    assert f"proxy_cache_path {entries} " in render.render(settings)["nginx/conf/nginx.conf"]


@needs_root
def test_the_edge_cache_is_not_emptied_through_a_link_in_the_run_dir(shared_dir):
    run_dir = shared_dir / "run"
    settings = settings_for(run_dir)
    render.write(settings)
    victim = shared_dir / "victim"
    victim.mkdir()
    (victim / "keep.txt").write_text("another directory's")
    rundir.remove_tree(render.edge_cache_entries(settings))
    render.edge_cache_entries(settings).symlink_to(victim)  # as if the cache's owner swapped it
    fleet.clear_edge_cache(settings)
    assert (victim / "keep.txt").exists() and not render.edge_cache_entries(settings).exists()


# item 2: root never follows a link the fleet's user planted ---------------------------------------

@needs_root
def test_a_link_planted_by_the_fleet_s_user_never_makes_root_hand_over_its_target(shared_dir, monkeypatch):
    user = other_user()
    certs = shared_dir / "certs"
    certs.mkdir(mode=0o700)
    for name in ("ca", "heavy2", "heavy2-key"):
        (certs / f"{name}.pem").write_text(f"{name}\n")
    (certs / "edge-token").write_text("0123abcd\n")
    run_dir = shared_dir / "run"
    settings = settings_for(run_dir, FLEET_SETTINGS=EXAMPLE, FLEET_HOST="heavy2", FLEET_DASK_CERTS_DIR=str(certs))
    monkeypatch.setattr(privilege, "run_as", lambda s: privilege.User(user.pw_name, user.pw_uid, user.pw_gid, "x"))
    monkeypatch.setattr(privilege, "prepare", lambda s, u: None)  # the cgroups are not this test's
    render.write(settings)  # the first deploy: the TLS files handed to the fleet's user
    secret = shared_dir / "root-only"
    secret.write_text("root's\n")
    secret.chmod(0o600)
    # The fleet's user plants links wherever it can: in the TLS directory (its own before), under
    # the names deploy writes and under a new one.
    for directory in ("tls", "private"):
        for name in ("key.pem", "planted.pem"):
            as_user(user, "ln", "-sf", str(secret), str(run_dir / directory / name))
    render.write(settings)  # the next deploy
    assert secret.stat().st_uid == 0 and secret.read_text() == "root's\n"
    key = settings.tls_files()["key"]
    assert not key.is_symlink() and key.stat().st_uid == user.pw_uid and key.read_text() == "heavy2-key\n"
    assert as_user(user, "cat", str(key)).stdout == "heavy2-key\n"  # what it needs, it reads
    assert as_user(user, "cat", str(settings.private_dir / "edge-header.conf")).returncode != 0  # root's


@needs_root
def test_directories_handed_to_the_fleet_s_user_are_never_walked_into(shared_dir):
    user = other_user()
    settings = settings_for(shared_dir / "run", FLEET_SLOW_IDLE_CGROUP="false")
    handed = privilege.User(user.pw_name, user.pw_uid, user.pw_gid, "x")
    settings.run_dir.mkdir()
    privilege.prepare(settings, handed)  # a deploy: home/ and dask/ are the user's
    secret = shared_dir / "root-only"
    secret.write_text("root's\n")
    home = settings.run_dir / "home"
    as_user(user, "ln", "-s", str(secret), str(home / "link"))
    as_user(user, "mkdir", str(home / "sub"))
    privilege.prepare(settings, handed)  # the next deploy
    assert secret.stat().st_uid == 0 and (home / "link").is_symlink() and (home / "sub").is_dir()


# item 4: nothing in a predictable place of the system's temp dir -----------------------------------

@needs_root
def test_nginx_never_uses_a_temp_or_cache_directory_another_user_made_first(tmp_path):
    user = other_user()
    run_dir = tmp_path / "run"  # 0700, as pytest's: nginx's workers could not reach it as nobody
    settings = settings_for(run_dir)
    # Where versions before this one put nginx's temp files and cache in that case.
    squatted = Path("/tmp") / f"fleet-nginx-{zlib.crc32(str(run_dir).encode()):08x}"
    assert as_user(user, "mkdir", "-m", "0777", str(squatted)).returncode == 0
    try:
        render.write(settings)
        conf = (run_dir / "nginx" / "conf" / "nginx.conf").read_text()
        paths = [line.split()[1].rstrip(";") for line in conf.splitlines()
                 if line.strip().startswith(("client_body_temp_path", "proxy_temp_path", "fastcgi_temp_path",
                                             "uwsgi_temp_path", "scgi_temp_path", "proxy_cache_path"))]
        assert len(paths) == 6
        assert all(Path(p).is_relative_to(run_dir) for p in paths), paths
        assert str(squatted) not in conf and os.listdir(squatted) == []
        # nginx's workers run as the instances do: here, with no user able to reach the run dir, root.
        assert "user root root;" in conf or f"user {user.pw_name} " in conf
    finally:
        squatted.rmdir()


@needs_root
def test_a_run_dir_another_user_made_first_is_refused(shared_dir):
    user = other_user()
    run_dir = shared_dir / "tmp" / "theirs"  # FLEET_RUN_DIR=/tmp/fleet2, made first by someone else
    assert as_user(user, "mkdir", str(run_dir)).returncode == 0
    with pytest.raises(rundir.UnsafePath, match=f"belongs to {user.pw_name}"):
        render.write(settings_for(run_dir))
    assert os.listdir(run_dir) == []
