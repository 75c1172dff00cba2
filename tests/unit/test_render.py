"""Rendering: the settings reach nginx.conf and supervisord.conf, and real nginx accepts the result."""

from __future__ import annotations

import configparser
import json
import shutil
import subprocess

import pytest

from deploy import render
from services.common.settings import load


def settings_for(tmp_path, **env):
    return load(env={"FLEET_RUN_DIR": str(tmp_path), **env})


def test_every_rendered_file_says_on_line_one_that_it_is_generated(tmp_path):
    for name, text in render.render(settings_for(tmp_path)).items():
        first = text.splitlines()[0]
        if name.endswith(".json"):
            continue  # JSON has no comments; the snapshot is only read by the services
        assert "generated from deploy/fleet.toml" in first and "do not edit" in first, name


@pytest.mark.skipif(not shutil.which("nginx") and not shutil.which("/usr/sbin/nginx"), reason="nginx not installed")
def test_nginx_accepts_the_rendered_config(tmp_path):
    s = settings_for(tmp_path, FLEET_EDGE_PORT="18080", FLEET_FAST_INSTANCES="3", FLEET_SLOW_INSTANCES="2")
    render.write(s)
    result = subprocess.run(
        [render.nginx_binary(), "-t", "-p", f"{tmp_path}/nginx/", "-c", "conf/nginx.conf", "-e", f"{tmp_path}/logs/e.log"],
        capture_output=True, text=True,
    )
    assert result.returncode == 0, result.stderr


def test_settings_reach_the_nginx_upstreams_and_listen_address(tmp_path):
    s = settings_for(tmp_path, FLEET_EDGE_PORT="9000", FLEET_FAST_BASE_PORT="7100", FLEET_FAST_INSTANCES="3",
                     FLEET_SLOW_BASE_PORT="7200", FLEET_SLOW_INSTANCES="2", FLEET_EDGE_MAX_BODY_KB="64")
    conf = render.render(s)["nginx/conf/nginx.conf"]
    assert "listen 127.0.0.1:9000 default_server;" in conf
    for port in (7101, 7102, 7103, 7201, 7202):
        assert f"server 127.0.0.1:{port} max_fails" in conf
    assert "server 127.0.0.1:7100 backup" in conf and "server 127.0.0.1:7200 backup" in conf  # spares
    assert "7104" not in conf and "7203" not in conf
    assert "client_max_body_size 64k;" in conf
    assert f"{tmp_path}/nginx/nginx.pid" in conf


def block(conf: str, opening: str) -> str:
    """The body of the nginx block that starts with `opening` (up to its own closing brace, past any
    nested block such as an if)."""
    body = conf.split(opening, 1)[1]
    depth = 1
    for i, char in enumerate(body):
        depth += {"{": 1, "}": -1}.get(char, 0)
        if depth == 0:
            return body[:i]
    raise AssertionError(f"{opening!r} is never closed")


def test_slow_requests_are_never_retried_after_a_timeout(tmp_path):
    conf = render.render(settings_for(tmp_path))["nginx/conf/nginx.conf"]
    slow_location = block(conf, "location /slow/ {")
    assert "proxy_next_upstream error;" in slow_location
    assert "timeout" not in slow_location.split("proxy_next_upstream")[1].split(";")[0]


def slow_read_timeout(conf: str) -> int:
    return int(conf.split("location /slow/ {")[1].split("proxy_read_timeout ")[1].split("s;")[0])


def test_nginx_waits_longer_than_a_job_s_deadline_which_covers_its_wait_in_line(tmp_path):
    # A job's deadline counts from its admission (services/slow/app.py): however long the line,
    # the instance answers within slow.job_timeout, so nginx waits that long and a margin, never
    # job_timeout x the line's waves (which made a stuck request hold a client for minutes).
    s = settings_for(tmp_path, FLEET_SLOW_WORKERS="2", FLEET_SLOW_QUEUE_LIMIT="8", FLEET_SLOW_JOB_TIMEOUT="30")
    assert 30 < slow_read_timeout(render.render(s)["nginx/conf/nginx.conf"]) <= 40


def test_nginx_s_wait_for_a_heavy_answer_does_not_grow_with_the_line_on_a_dask_cluster_either(tmp_path):
    s = settings_for(tmp_path, FLEET_SLOW_BACKEND="dask", FLEET_SLOW_INSTANCES="2", FLEET_DASK_WORKERS="2",
                     FLEET_DASK_THREADS_PER_WORKER="1", FLEET_SLOW_WORKERS="4", FLEET_SLOW_JOB_TIMEOUT="30",
                     FLEET_SLOW_QUEUE_LIMIT="100")
    assert 30 < slow_read_timeout(render.render(s)["nginx/conf/nginx.conf"]) <= 40


def test_trusted_proxies_name_the_client_and_nobody_else_does(tmp_path):
    conf = render.render(settings_for(tmp_path, FLEET_EDGE_REAL_IP="10.0.0.5, 10.1.0.0/16",
                                      FLEET_EDGE_REAL_IP_HEADER="X-Forwarded-For"))["nginx/conf/nginx.conf"]
    assert "set_real_ip_from 10.0.0.5/32;" in conf and "set_real_ip_from 10.1.0.0/16;" in conf
    assert "real_ip_header X-Forwarded-For;" in conf and "real_ip_recursive on;" in conf
    plain = render.render(settings_for(tmp_path))["nginx/conf/nginx.conf"]
    assert "set_real_ip_from" not in plain and "real_ip_header" not in plain


def test_the_edge_s_per_client_limits_count_an_ipv6_client_by_its_64(tmp_path):
    conf = render.render(settings_for(tmp_path))["nginx/conf/nginx.conf"]
    assert "limit_req_zone $fleet_client zone=slow_per_client" in conf
    assert "limit_conn_zone $fleet_client zone=slow_conn_per_client" in conf


def test_an_ipv6_bind_address_is_bracketed(tmp_path):
    conf = render.render(settings_for(tmp_path, FLEET_EDGE_BIND="::1"))["nginx/conf/nginx.conf"]
    assert "listen [::1]:8080 default_server;" in conf


def test_supervisor_runs_each_instance_with_a_stop_wait_longer_than_its_drain(tmp_path):
    s = settings_for(tmp_path, FLEET_FAST_INSTANCES="3", FLEET_SLOW_DRAIN_TIMEOUT="40", FLEET_FAST_DRAIN_TIMEOUT="5")
    parser = configparser.RawConfigParser(inline_comment_prefixes=(";",))
    parser.read_string(render.render(s)["supervisord.conf"])
    programs = [name for name in parser.sections() if name.startswith("program:")]
    # One program (one supervisor group) per instance, so that each can be replaced on its own.
    # The upstream service's replicas, beside the fast instances that call them, have no spare.
    assert sorted(programs) == sorted(["program:nginx", "program:runner-01", "program:slow-01", "program:slow-spare",
                                       "program:upstream-01", "program:upstream-02",
                                       "program:fast-01", "program:fast-02", "program:fast-03", "program:fast-spare"])
    upstream = parser["program:upstream-02"]["command"]
    assert "-m services.upstream " in upstream and upstream.endswith("--instance 2")
    assert parser["program:fast-03"]["command"].endswith("--instance 3")
    assert parser["program:fast-spare"]["autostart"] == "false" and parser["program:fast-01"]["autostart"] == "true"
    assert int(parser["program:slow-01"]["stopwaitsecs"]) > 40
    assert int(parser["program:fast-01"]["stopwaitsecs"]) > 5
    for program in programs:
        assert parser[program]["killasgroup"] == "true"  # no worker outlives its server
    assert parser["program:slow-01"]["stopasgroup"] == "false"  # SIGTERM to the instance alone: it drains
    assert parser["unix_http_server"]["chmod"] == "0700"
    assert "inet_http_server" not in parser


def test_every_log_supervisor_writes_is_rotated_by_the_settings_size_and_count(tmp_path):
    s = settings_for(tmp_path, FLEET_OBSERVE_LOG_MAX_MB="7", FLEET_OBSERVE_LOG_BACKUPS="4", FLEET_SLOW_BACKEND="dask")
    parser = configparser.RawConfigParser(inline_comment_prefixes=(";",))
    parser.read_string(render.render(s)["supervisord.conf"])
    assert (parser["supervisord"]["logfile_maxbytes"], parser["supervisord"]["logfile_backups"]) == ("7MB", "4")
    programs = [name for name in parser.sections() if name.startswith("program:")]
    assert "program:dask-scheduler" in programs
    for program in programs:
        assert parser[program]["stdout_logfile_maxbytes"] == "7MB" and parser[program]["stdout_logfile_backups"] == "4"
        assert parser[program]["redirect_stderr"] == "true"  # so stdout's bound covers stderr too


def test_write_reports_only_the_files_that_changed(tmp_path):
    s = settings_for(tmp_path)
    assert len(render.write(s)) == 6  # nginx.conf, supervisord.conf, settings.json, the job page, targets, rules
    assert render.write(s) == []
    changed = render.write(settings_for(tmp_path, FLEET_SLOW_WORKERS="3"))
    assert "settings.json" in changed


def test_the_edge_answers_methods_the_fleet_does_not_serve_itself(tmp_path):
    conf = render.render(settings_for(tmp_path))["nginx/conf/nginx.conf"]
    server = conf.split("server {")[1]
    assert "if ($fleet_method_refused) {" in server and "return 405;" in server
    refused = block(conf, 'map "$request_method $fleet_request_path" $fleet_method_refused {')
    # volatile: error_page's redirect (a GET) is judged again, never refused by a cached value
    assert "volatile;" in refused and '"~^(GET|HEAD|POST)? "                   0;' in refused
    assert '"~^DELETE /jobs/[A-Za-z0-9_-]+$"        0;' in refused and "default                                 1;" in refused
    # under /jobs/ only GET (and a job's DELETE): these lines come before the general one
    assert refused.index('"~^[A-Z]+ /jobs/"') < refused.index('"~^(GET|HEAD|POST)? "')
    assert "add_header Allow $fleet_allow always;" in conf
    allow = block(conf, "map $fleet_request_path $fleet_allow {")
    assert 'default                     "GET, HEAD, POST";' in allow and '"~^/slow/"                  "GET, POST";' in allow
    assert '"~^/jobs/[^/]+$"            "GET, DELETE";' in allow


def test_upstreams_share_their_state_between_nginx_workers(tmp_path):
    conf = render.render(settings_for(tmp_path))["nginx/conf/nginx.conf"]
    for name in ("fast", "slow"):
        assert f"zone {name} " in conf.split(f"upstream {name} {{")[1].split("}")[0]


def test_heavy_requests_are_limited_per_client_and_retried_on_one_other_instance_at_most(tmp_path):
    s = settings_for(tmp_path, FLEET_SLOW_MAX_PER_CLIENT="3")
    conf = render.render(s)["nginx/conf/nginx.conf"]
    slow_location = block(conf, "location /slow/ {")
    assert "limit_conn slow_conn_per_client 3;" in slow_location
    assert "limit_conn_zone $fleet_client zone=slow_conn_per_client" in conf
    assert "limit_conn_status 429;" in conf
    assert "proxy_next_upstream_tries 2;" in slow_location
    assert "location = /slow {" in conf  # no HTML redirect for /slow


def test_every_fast_location_limits_each_client_s_rate_requests_in_flight_and_body(tmp_path):
    s = settings_for(tmp_path, FLEET_EDGE_FAST_RATE_PER_SECOND="7", FLEET_EDGE_FAST_RATE_BURST="9",
                     FLEET_EDGE_FAST_CONN_PER_CLIENT="5", FLEET_EDGE_ECHO_MAX_BODY_KB="48", FLEET_EDGE_MAX_BODY_KB="2048")
    conf = render.render(s)["nginx/conf/nginx.conf"]
    assert "limit_req_zone $fleet_client zone=fast_per_client:10m rate=7r/s;" in conf
    assert "limit_conn_zone $fleet_client zone=fast_conn_per_client:10m;" in conf
    for name, body in (("location / {", "1k"), ("location = /echo {", "48k")):
        location = conf.split(name)[1].split("}")[0]
        assert "limit_req zone=fast_per_client burst=9 nodelay;" in location, name
        assert "limit_conn fast_conn_per_client 5;" in location, name
        assert f"client_max_body_size {body};" in location, name
    assert "client_max_body_size 2048k;" in conf  # the slow routes' (http level)


def test_healthz_has_a_rate_bucket_of_its_own_so_a_busy_address_never_fails_its_probe(tmp_path):
    s = settings_for(tmp_path, FLEET_EDGE_FAST_RATE_PER_SECOND="7", FLEET_EDGE_FAST_RATE_BURST="9")
    conf = render.render(s)["nginx/conf/nginx.conf"]
    assert "limit_req_zone $fleet_client zone=health_per_client:10m rate=7r/s;" in conf
    location = conf.split("location = /healthz {")[1].split("}")[0]
    assert "limit_req zone=health_per_client burst=9 nodelay;" in location
    assert "fast_per_client" not in location and "limit_conn" not in location


def test_old_nginx_workers_are_bounded_by_the_longest_heavy_request(tmp_path):
    s = settings_for(tmp_path, FLEET_SLOW_WORKERS="2", FLEET_SLOW_QUEUE_LIMIT="8", FLEET_SLOW_JOB_TIMEOUT="30")
    conf = render.render(s)["nginx/conf/nginx.conf"]
    read_timeout = int(conf.split("location /slow/ {")[1].split("proxy_read_timeout ")[1].split("s;")[0])
    shutdown = int(conf.split("worker_shutdown_timeout ")[1].split("s;")[0])
    assert read_timeout < shutdown < read_timeout + 60


# ports in the kernel's ephemeral range ------------------------------------------------------------

def test_the_ephemeral_range_is_read_from_the_kernel_and_defaults_to_linux_s(tmp_path):
    from deploy.control import ephemeral_ports
    (tmp_path / "range").write_text("40000\t50000\n")
    assert ephemeral_ports(tmp_path / "range") == range(40000, 50001)
    assert ephemeral_ports(tmp_path / "missing") == range(32768, 61000)


def test_listening_ports_in_the_ephemeral_range_are_named_in_a_warning(tmp_path, capsys):
    from deploy.control import ephemeral_ports, warn_of_ephemeral_ports
    low = ephemeral_ports().start
    warn_of_ephemeral_ports(settings_for(tmp_path))  # the defaults: 8080, 81xx, 82xx
    assert capsys.readouterr().out == ""
    warn_of_ephemeral_ports(settings_for(tmp_path, FLEET_FAST_BASE_PORT=str(low + 10)))
    out = capsys.readouterr().out
    assert out.startswith("warning: ") and f"{low + 11} (fast-01)" in out and f"below {low}" in out


# a fleet across hosts ------------------------------------------------------------------------------

EXAMPLE = str(render.REPO_ROOT / "deploy" / "hosts.example.toml")


def host_part(tmp_path, host, **env):
    files = render.render(settings_for(tmp_path, FLEET_SETTINGS=EXAMPLE, FLEET_HOST=host, **env))
    conf = configparser.ConfigParser(interpolation=None, inline_comment_prefixes=(";",))
    conf.read_string(files["supervisord.conf"])
    programs = {s.split(":", 1)[1]: conf[s]["command"] for s in conf.sections() if s.startswith("program:")}
    return files, programs


def test_each_host_renders_only_its_part_bound_to_its_address(tmp_path):
    files, web1 = host_part(tmp_path, "web1")
    assert set(web1) == {"nginx", "dask-scheduler", "runner-01", "slow-01", "slow-spare", "fast-01", "fast-02",
                         "fast-spare", "upstream-01", "upstream-02"}
    assert "services.upstream" in web1["upstream-01"]
    # Dashboards (task names, logs, stacks; no login) stay on loopback unless exposed on purpose.
    assert "--host 10.77.0.1 --port 8786 --dashboard-address 127.0.0.1:8787" in web1["dask-scheduler"]
    exposed = host_part(tmp_path, "web1", FLEET_DASK_EXPOSE_DASHBOARDS="true")[1]
    assert "--dashboard-address 10.77.0.1:8787" in exposed["dask-scheduler"]
    files, heavy1 = host_part(tmp_path, "heavy1", FLEET_DASK_WORKERS="2")
    assert set(heavy1) == {"dask-worker-01", "dask-worker-02"}
    assert "tls://10.77.0.1:8786 --name heavy1-dask-worker-01" in heavy1["dask-worker-01"]
    assert "--host 10.77.0.2 --worker-port 8801 --dashboard-address 127.0.0.1:8802" in heavy1["dask-worker-01"]
    targets = json.loads(files["prometheus/targets.json"])
    assert [t["targets"] for t in targets] == [["127.0.0.1:8802"], ["127.0.0.1:8804"]]


def test_dask_across_hosts_speaks_tls_with_the_host_s_own_certificate_and_requires_it(tmp_path):
    certs = tmp_path / "certs"
    certs.mkdir()
    for name in ("ca", "heavy2", "heavy2-key"):
        (certs / f"{name}.pem").write_text(f"{name}\n")
    (certs / "edge-token").write_text("0123abcd\n")
    for host, program in (("web1", "dask-scheduler"), ("heavy2", "dask-worker-01")):
        settings = settings_for(tmp_path, FLEET_SETTINGS=EXAMPLE, FLEET_HOST=host, FLEET_DASK_CERTS_DIR=str(certs))
        files, programs = host_part(tmp_path, host, FLEET_DASK_CERTS_DIR=str(certs))
        tls = settings.run_dir / "private"  # the processes read copies in the run dir, readable by their user only
        assert f"--tls-ca-file {tls}/ca.pem --tls-cert {tls}/cert.pem --tls-key {tls}/key.pem" in programs[program]
        assert 'DASK_DISTRIBUTED__COMM__REQUIRE_ENCRYPTION="True"' in files["supervisord.conf"]
    render.write(settings, files)  # heavy2's: its own certificate and key, copied
    assert (tls / "cert.pem").read_text() == "heavy2\n" and (tls / "key.pem").read_text() == "heavy2-key\n"
    assert (tls / "edge-token").read_text() == "0123abcd\n"  # the fleet's, the same on every host
    assert oct((tls / "key.pem").stat().st_mode & 0o777) == "0o600" and oct(tls.stat().st_mode & 0o777) == "0o711"
    assert "--protocol tls" in host_part(tmp_path, "web1")[1]["dask-scheduler"]


def test_a_managed_cluster_on_one_host_speaks_tls_with_certificates_deploy_makes_itself(tmp_path):
    settings = settings_for(tmp_path, FLEET_SLOW_BACKEND="dask")
    files = render.render(settings)
    single = files["supervisord.conf"]
    assert "--protocol tls --tls-ca-file" in single and 'REQUIRE_ENCRYPTION="True"' in single
    assert "tls://127.0.0.1:8786" in single
    render.write(settings, files)
    private = settings.private_dir
    first = {name: (private / name).read_bytes() for name in ("ca.pem", "cert.pem", "key.pem")}
    render.write(settings, files)  # kept across deploys: the running cluster's processes hold them
    assert {name: (private / name).read_bytes() for name in first} == first

    from cryptography import x509

    ca = x509.load_pem_x509_certificate(first["ca.pem"])
    cert = x509.load_pem_x509_certificate(first["cert.pem"])
    assert cert.issuer == ca.subject and b"PRIVATE KEY" in first["key.pem"]


def test_nginx_balances_over_every_host_s_instances_from_the_edge_address(tmp_path):
    two_web = tmp_path / "two.toml"
    two_web.write_text(
        '[hosts.web1]\naddress = "10.0.0.1"\nroles = ["edge", "fast", "slow"]\n'
        '[hosts.web2]\naddress = "10.0.0.2"\nroles = ["fast"]\n')
    nginx = render.render(settings_for(tmp_path, FLEET_SETTINGS=str(two_web), FLEET_HOST="web2"))[
        "nginx/conf/nginx.conf"]
    for server in ("10.0.0.1:8101", "10.0.0.1:8102", "10.0.0.2:8101", "10.0.0.2:8102", "10.0.0.1:8201"):
        assert f"server {server} max_fails" in nginx, server
    assert "server 10.0.0.2:8100 backup" in nginx and "server 10.0.0.1:8100 backup" in nginx
    assert "10.0.0.2:820" not in nginx  # web2 has no slow role
    assert "proxy_bind 10.0.0.1;" in nginx
    assert "proxy_bind" not in render.render(settings_for(tmp_path))["nginx/conf/nginx.conf"]


def test_job_locations_go_to_the_slow_instances_and_the_event_stream_is_never_buffered(tmp_path):
    conf = render.render(settings_for(tmp_path, FLEET_JOBS_KEEPALIVE_SECONDS="20"))["nginx/conf/nginx.conf"]
    jobs = block(conf, "location /jobs/ {")
    assert "proxy_pass http://slow;" in jobs and "proxy_next_upstream error timeout;" in jobs
    events = block(conf, "location ~ ^/jobs/[^/]+/events$ {")
    assert "proxy_pass http://slow;" in events and "proxy_buffering off;" in events
    assert "proxy_read_timeout 30s;" in events  # past the 20 s between keep-alive comments
    assert "proxy_next_upstream error;" in events  # a cut stream is the client's to resume (Last-Event-ID)
    server = conf.split("server {")[1]
    assert "proxy_set_header Prefer $fleet_prefer;" in server and "proxy_set_header Last-Event-ID $fleet_last_event_id;" in server
