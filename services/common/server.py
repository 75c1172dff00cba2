"""An instance's life: read the settings snapshot, listen on loopback, serve, drain on SIGTERM.

Both kinds of instance run through here; each kind's main() adds only what is its own (the slow
kind starts its worker pool before `serve` binds the port).

    python -m services.fast --settings .run/settings.json --instance 1
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import ssl
from dataclasses import dataclass
from typing import Callable, Coroutine

from tornado import web
from tornado.httpserver import HTTPServer

from services.common import logs, metrics, temp_dir
from services.common.watchdog import LoopWatchdog
from services.common.settings import Settings

log = logging.getLogger("fleet.server")

# Far longer than nginx's upstream keepalive_timeout (rendered below every drain timeout), so
# nginx, not Tornado, closes idle upstream connections and never sends a request down one that
# Tornado is closing.
IDLE_CONNECTION_TIMEOUT = 75


@dataclass(frozen=True)
class Instance:
    role: str  # "fast" or "slow"
    number: int  # 1..instances; 0 is the spare
    settings: Settings

    @property
    def spare(self) -> bool:
        return self.number == 0

    @property
    def name(self) -> str:
        return f"{self.role}-spare" if self.spare else f"{self.role}-{self.number:02d}"

    @property
    def port(self) -> int:
        return getattr(self.settings, self.role).base_port + self.number

    @property
    def drain_timeout(self) -> float:
        return getattr(self.settings, self.role).drain_timeout


def parse_args(role: str, argv: list[str] | None = None) -> Instance:
    parser = argparse.ArgumentParser(prog=f"python -m services.{role}", description=__doc__.split("\n")[0])
    parser.add_argument("--settings", required=True, help="the settings snapshot deploy rendered")
    parser.add_argument("--instance", required=True, help='instance number, from 1, or "spare"')
    options = parser.parse_args(argv)
    settings = Settings.from_snapshot(options.settings)
    count = getattr(settings, role).instances
    number = 0 if options.instance == "spare" else int(options.instance) if options.instance.isdigit() else -1
    if not 0 <= number <= count:
        parser.error(f'--instance must be 1-{count} or "spare" for {role}')
    instance = Instance(role, number, settings)
    logs.setup(instance.name, failed_request_lines_per_second=settings.observe.failed_request_lines_per_second)
    return instance


def run(instance: Instance, main: Callable[[], Coroutine]) -> None:
    """Run the instance's main coroutine on the event loop its settings choose (<role>.event_loop)."""
    temp_dir.take_own()  # before its pool's forkserver asks for a temporary directory
    loop_factory = None
    if getattr(instance.settings, instance.role).event_loop == "uvloop":
        import uvloop

        loop_factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        runner.run(main())


def app_settings(instance: Instance) -> dict:
    """Tornado Application settings both kinds share."""
    return {
        "role": instance.role,
        "instance_name": instance.name,
        # X-Served-By: the instance's name, and across hosts its host's too ("web2/slow-01").
        "served_by": (instance.name if instance.settings.inventory.single
                      else f"{instance.settings.inventory.here.name}/{instance.name}"),
        # Who may talk to an instance: the edge host and the instance's own host (health checks,
        # metrics); the socket's peer decides, never a header (web.BaseHandler.prepare).
        "trusted_peers": frozenset({instance.settings.inventory.edge.address, instance.settings.address}),
        "draining": False,
        "drain_deadline": None,  # the loop's time at which a drain gives up (drain), while draining
        "in_flight": InFlight(),
        "on_drain_deadline": lambda: None,  # the slow app answers its unfinished jobs here
        "log_function": logs.on_request_done,
        # No debug, no autoreload, no tracebacks in responses: write_error renders the contract.
        "debug": False,
        "serve_traceback": False,
    }


class InFlight:
    """Counts requests an instance has accepted and not yet answered, so a drain knows when it is done."""

    def __init__(self) -> None:
        self.count = 0
        self._idle = asyncio.Event()
        self._idle.set()

    def enter(self) -> None:
        self.count += 1
        self._idle.clear()

    def leave(self) -> None:
        self.count -= 1
        if self.count == 0:
            self._idle.set()

    async def wait_idle(self, timeout: float) -> bool:
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
            return True
        except asyncio.TimeoutError:
            return False


LISTEN_BACKLOG = 4096  # connections waiting to be accepted (the kernel caps it at net.core.somaxconn)


def tls_context(settings: Settings) -> ssl.SSLContext | None:
    """Across hosts the edge reaches this instance over a network: TLS, with this host's
    certificate of the fleet's CA, and a client must show one too (nginx shows the edge host's;
    deploy's health checks their own host's). On one host, plain HTTP on loopback."""
    if not settings.edge_tls:
        return None
    files = settings.tls_files()
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(files["ca"]))
    context.load_cert_chain(str(files["cert"]), str(files["key"]))
    context.verify_mode = ssl.CERT_REQUIRED
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    return context


def client_tls_context(settings: Settings) -> ssl.SSLContext | None:
    """TLS for talking to this fleet's instances across hosts (deploy's health checks, a fast
    instance's calls to the upstream service): their certificate checked against the fleet's CA,
    and this host's own shown (they refuse a client without one). None on one host."""
    if not settings.edge_tls:
        return None
    files = settings.tls_files()
    context = ssl.create_default_context(cafile=str(files["ca"]))
    context.load_cert_chain(str(files["cert"]), str(files["key"]))
    return context


async def serve(app: web.Application, instance: Instance) -> None:
    """Listen, serve until SIGTERM or SIGINT, then drain within the instance's drain timeout."""
    # The edge's secret (deploy/private.py): with it a request is the edge's, whose X-Real-IP
    # and X-Request-ID are then believed (web.BaseHandler); xheaders stays off, so that no other
    # caller's headers can change the client address. Read before serving: none, no start.
    app.settings["edge_token"] = instance.settings.edge_token_file.read_bytes().strip()
    server = HTTPServer(
        app,
        xheaders=False,
        ssl_options=tls_context(instance.settings),
        max_body_size=instance.settings.edge.max_body_kb * 1024,
        idle_connection_timeout=IDLE_CONNECTION_TIMEOUT,
    )
    # The host's inventory address: loopback on one host, where nginx beside it is the one client.
    # The backlog: past its keep-alive pool nginx opens new connections in bursts, and a busy event
    # loop accepts them late. Tornado's default 128 then overflows, the kernel drops SYNs, which are
    # retried only after 1 s, past proxy_connect_timeout: nginx marks the instance failed
    # (max_fails=1), soon every instance, and answers 502 "no live upstreams" to everyone for
    # fail_timeout. Measured at 9,200 req/s under the flood: 53-89 % of /fast answered 502.
    server.listen(instance.port, address=instance.settings.address, backlog=LISTEN_BACKLOG)
    in_flight: InFlight = app.settings["in_flight"]
    metrics.IN_FLIGHT.set_function(lambda: in_flight.count)
    observe = instance.settings.observe
    metrics.watch_logs(instance.settings.run_dir / "logs", observe.log_max_mb, observe.log_backups)
    loop_watchdog = LoopWatchdog(threshold=instance.settings.observe.blocked_loop_ms / 1000)
    loop_watchdog.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    log.info("%s serving on %s:%d", instance.name, instance.settings.address, instance.port)
    await stop.wait()
    await drain(server, app, instance.drain_timeout)
    loop_watchdog.stop()


async def drain(server: HTTPServer, app: web.Application, timeout: float) -> None:
    """Stop accepting, finish in-flight requests, let nginx let go of its connections, then exit.

    After server.stop() new connections are refused, so nginx takes them to another instance (a
    refused connect is safe to retry, even for a POST). Requests that still arrive on kept-alive
    connections are served and answered with `Connection: close` (no_keep_alive). Idle
    connections are left for nginx to close (its upstream keepalive_timeout is shorter than every
    drain timeout): closing one ourselves could race a request nginx is sending down it. At the
    deadline, the app's `on_drain_deadline` answers what is left (the slow app: 503), then every
    connection is closed.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    server.stop()
    app.settings["drain_deadline"] = deadline
    app.settings["draining"] = True
    server.conn_params.no_keep_alive = True
    in_flight: InFlight = app.settings["in_flight"]
    log.info("draining: %d request(s) in flight, %d connection(s), deadline %.0f s",
             in_flight.count, len(server._connections), timeout)
    if not await in_flight.wait_idle(timeout):
        log.warning("drain deadline passed with %d request(s) in flight", in_flight.count)
        app.settings["on_drain_deadline"]()
        await in_flight.wait_idle(1)  # let those answers go out
    while server._connections and loop.time() < deadline:
        await asyncio.sleep(0.05)
    if server._connections:
        log.info("closing %d idle connection(s) at the deadline", len(server._connections))
    await server.close_all_connections()
    log.info("drained in %.2f s", timeout - (deadline - loop.time()))
