"""The fleet's own job store (jobs.store = "redis", no jobs.redis_url; deploy/store.py): its
settings, its supervisor program and config, its password, and how deploy applies it."""

from __future__ import annotations

import configparser
import os
import stat

import pytest

from deploy import apply, certs, private, render, store
from deploy.control import health_urls, ports_of
from services.common.settings import SettingsError, load

REDIS = {"FLEET_JOBS_STORE": "redis"}


def settings_for(tmp_path, **env):
    return load(env={"FLEET_RUN_DIR": str(tmp_path), **env})


def programs_of(conf: str) -> dict[str, dict[str, str]]:
    parser = configparser.RawConfigParser(inline_comment_prefixes=(";",))
    parser.read_string(conf)
    return {s.split(":", 1)[1]: dict(parser[s]) for s in parser.sections() if s.startswith("program:")}


def directives(conf: str) -> dict[str, str]:
    """redis.conf's directives (comments are whole lines there)."""
    found = {}
    for line in conf.splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, value = line.partition(" ")
            assert name not in found, f"{name} twice"
            found[name] = value
    return found


def test_the_store_setting_takes_sqlite_or_redis_and_a_url_of_a_server_or_nothing(tmp_path):
    assert settings_for(tmp_path).jobs.store == "sqlite"
    assert settings_for(tmp_path, **REDIS).job_store_url == "redis://127.0.0.1:8379/0"
    external = settings_for(tmp_path, **REDIS, FLEET_JOBS_REDIS_URL="rediss://:pw@10.0.0.9:6380/2")
    assert external.job_store_url == "rediss://:pw@10.0.0.9:6380/2" and external.job_store_password_file is None
    for key, bad in (("FLEET_JOBS_STORE", "mongo"), ("FLEET_JOBS_REDIS_URL", "10.0.0.9:6379"),
                     ("FLEET_JOBS_STORE_TIMEOUT", "0"), ("FLEET_JOBS_REDIS_MAXMEMORY_MB", "8")):
        with pytest.raises(SettingsError, match=key):
            settings_for(tmp_path, **{key: bad})
    with pytest.raises(SettingsError, match="jobs.redis_port"):
        settings_for(tmp_path, **REDIS, FLEET_JOBS_REDIS_PORT="8201")  # slow-01's


def test_a_managed_store_runs_first_under_supervisor_from_its_rendered_config(tmp_path):
    s = settings_for(tmp_path, **REDIS, FLEET_JOBS_REDIS_PORT="23050", FLEET_JOBS_REDIS_MAXMEMORY_MB="64")
    files = render.render(s)
    programs = programs_of(files["supervisord.conf"])
    job_store = programs["job-store"]
    assert job_store["command"].split()[1] == f"{tmp_path}/job-store.conf"
    # started before the slow instances (which open it as they start) and the cluster; stopped last
    assert int(job_store["priority"]) < min(int(p.get("priority", 999)) for n, p in programs.items() if n != "job-store")
    assert job_store["autorestart"] == "true" and job_store["killasgroup"] == "true"
    conf = directives(files[store.CONF])
    assert files[store.CONF].splitlines()[0] == render.HEADER
    assert (conf["bind"], conf["port"], conf["dir"]) == ("127.0.0.1", "23050", f"{tmp_path}/jobs")
    # an answered write is in the log before the answer, and fsynced: durable creations
    assert (conf["appendonly"], conf["appendfsync"], conf["save"]) == ("yes", "always", '""')
    assert (conf["maxmemory"], conf["maxmemory-policy"]) == ("64mb", "noeviction")
    assert conf["include"] == str(tmp_path / "private" / store.AUTH_CONF)
    assert "requirepass" not in files[store.CONF]  # the password stays in private/
    assert health_urls(s)["job-store"] == "redis://127.0.0.1:23050/0"
    assert ("job-store", "127.0.0.1", 23050, "FLEET_JOBS_REDIS_PORT") in ports_of(s)


def test_no_store_program_for_sqlite_or_an_existing_server(tmp_path):
    for env in ({}, {**REDIS, "FLEET_JOBS_REDIS_URL": "redis://10.0.0.9:6379/0"}):
        s = settings_for(tmp_path, **env)
        files = render.render(s)
        assert "job-store" not in programs_of(files["supervisord.conf"]) and store.CONF not in files
        assert "job-store" not in health_urls(s) and not store.managed(s)


def test_the_store_s_password_is_made_once_readable_by_the_fleet_alone_and_kept_across_deploys(tmp_path):
    s = settings_for(tmp_path, **REDIS)
    os.chmod(tmp_path, 0o755)
    private.write(s, None)
    password = s.job_store_password_file.read_text()
    auth = (s.private_dir / store.AUTH_CONF).read_text()
    assert len(password) == 64 and auth == f"requirepass {password}\n"
    for path in (s.job_store_password_file, s.private_dir / store.AUTH_CONF):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    private.write(s, None)  # a second deploy: the running store and instances hold this one
    assert s.job_store_password_file.read_text() == password


def test_a_changed_store_config_restarts_the_store_first_and_nothing_else(tmp_path):
    before = settings_for(tmp_path, **REDIS)
    after = settings_for(tmp_path, **REDIS, FLEET_JOBS_REDIS_MAXMEMORY_MB="512")
    applied = apply.wanted_state(before, render.render(before))
    wanted = apply.wanted_state(after, render.render(after))
    changed = [n for n in wanted["programs"] if applied["programs"].get(n) != wanted["programs"][n]]
    # every instance reads the snapshot (which holds the setting); the store comes first
    plan = apply.make_plan(applied, wanted, restart_instances=False)
    assert "job-store" in changed and plan.start[0] == "job-store"
    assert apply.make_plan(applied, applied, restart_instances=True).start[0] != "job-store"  # reload: instances only


HOSTS = ('[jobs]\nstore = "{store}"\n'
         '[hosts.web1]\naddress = "10.77.0.1"\nroles = ["edge", "fast", "slow"]\n'
         '[hosts.web2]\naddress = "10.77.0.2"\nroles = ["slow"]\n'
         '[hosts.db1]\naddress = "10.77.0.4"\nroles = {db1}\n')


def across_hosts(tmp_path, host: str, store_kind: str = "redis", db1: str = '["store"]'):
    hosts = tmp_path / "hosts.toml"
    hosts.write_text(HOSTS.format(store=store_kind, db1=db1))
    return load(env={"FLEET_RUN_DIR": str(tmp_path / f"run-{host}"), "FLEET_SETTINGS": str(hosts), "FLEET_HOST": host,
                     "FLEET_DASK_CERTS_DIR": str(tmp_path / "certs"), "FLEET_JOBS_REDIS_PORT": "23060"})


def test_sqlite_with_slow_instances_on_two_hosts_is_refused_naming_the_redis_store(tmp_path):
    s = across_hosts(tmp_path, "web2", store_kind="sqlite", db1='["fast"]')
    with pytest.raises(SettingsError, match='jobs.store = "redis"'):
        store.check(s)


def test_the_fleet_s_own_store_across_hosts_runs_on_the_store_host_alone_speaking_tls_to_the_fleet_s_certificates(
        tmp_path):
    db1, web2 = across_hosts(tmp_path, "db1"), across_hosts(tmp_path, "web2")
    assert store.managed(db1) and not store.managed(web2) and store.used_here(web2)
    assert "job-store" in programs_of(render.render(db1)["supervisord.conf"])
    assert "job-store" not in programs_of(render.render(web2)["supervisord.conf"])
    conf = directives(render.render(db1)[store.CONF])
    files = db1.tls_files()
    # TLS only (no plain port), on the store host's own address, to clients with the fleet's certificates
    assert (conf["bind"], conf["port"], conf["tls-port"], conf["tls-auth-clients"]) == ("10.77.0.4", "0", "23060", "yes")
    assert (conf["tls-cert-file"], conf["tls-key-file"], conf["tls-ca-cert-file"]) == (
        str(files["cert"]), str(files["key"]), str(files["ca"]))
    # every slow host finds it on the store host, over TLS
    assert web2.job_store_url == db1.job_store_url == "rediss://10.77.0.4:23060/0"
    assert ("job-store", "10.77.0.4", 23060, "FLEET_JOBS_REDIS_PORT") in ports_of(db1)
    assert "job-store" not in health_urls(web2)


def test_across_hosts_every_host_takes_the_store_s_password_from_make_certs_and_without_it_deploy_says_so(tmp_path):
    db1, web2 = across_hosts(tmp_path, "db1"), across_hosts(tmp_path, "web2")
    with pytest.raises(Exception, match="make certs"):
        private.write(web2, None)
    certs.make_certs(web2)
    for s in (db1, web2):
        private.write(s, None)
    shared = (tmp_path / "certs" / "job-store-password").read_text().strip()
    assert db1.job_store_password_file.read_text() == web2.job_store_password_file.read_text() == shared
    assert (db1.private_dir / store.AUTH_CONF).read_text() == f"requirepass {shared}\n"
    assert not (web2.private_dir / store.AUTH_CONF).exists()  # only the store's host sets it


def test_the_store_role_needs_the_fleet_s_own_store_and_one_host_alone(tmp_path):
    with pytest.raises(SettingsError, match="job store"):
        across_hosts(tmp_path, "web1", store_kind="sqlite")
    with pytest.raises(SettingsError, match="store role"):
        across_hosts(tmp_path, "web1", db1='["fast"]')  # redis, and no host has the role
    with pytest.raises(SettingsError, match="only one host"):
        across_hosts(tmp_path, "web1", db1='["store"]\n[hosts.db2]\naddress = "10.77.0.5"\nroles = ["store"]')
