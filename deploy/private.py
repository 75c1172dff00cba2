"""The run dir's private/: what only the fleet's processes (and root) may read.

    private/                root's (mode 711): the fleet's user reads its files, cannot add any
        ca.pem cert.pem key.pem   this host's TLS files (Dask; the edge-to-instance hop across hosts)
        edge-token          the secret nginx adds to every request it passes on (X-Fleet-Edge)
        edge-header.conf    nginx's include that adds it; root's alone (nginx's master reads it)
        job-store-password  the fleet's own job store's password (deploy/store.py): the slow instances read it
        job-store-auth.conf the include that sets it, which the store (redis-server) reads

The files the fleet's user reads are created by root and handed over by descriptor
(deploy/rundir.py): root never follows a link in a directory another user can write.

Where they come from:
- one host: deploy makes them itself, once, and keeps them across deploys (running processes hold
  them); the TLS files only for a managed Dask cluster, from a CA that signs one certificate;
- across hosts, or a tls:// scheduler: from dask.certs_dir (`make certs`, copied to every host),
  since every host must hold the same CA and the same token.
"""

from __future__ import annotations

from deploy import certs, rundir, store
from deploy.privilege import User
from services.common.settings import Settings
from services.common.web import EDGE_HEADER

EDGE_HEADER_CONF = "edge-header.conf"
# What versions before this one kept in the run dir, as the fleet's user's directory.
LEGACY_TLS_DIR = "tls"


def edge_header_conf(settings: Settings) -> str:
    return str(settings.private_dir / EDGE_HEADER_CONF)


def write(settings: Settings, user: User | None) -> None:
    """Make private/ and its files for this host's part of the fleet (before supervisord starts)."""
    private = settings.private_dir
    rundir.own_dir(private, 0o711)  # traversable, not listable: the user opens only the files it owns
    rundir.remove_tree(settings.run_dir / LEGACY_TLS_DIR)
    owner = {"uid": user.uid, "gid": user.gid} if user is not None else {}
    if settings.dask_tls or settings.edge_tls:
        for what, data in tls_files(settings).items():
            rundir.write_file(settings.tls_files()[what], data, 0o600, **owner)
    token = edge_token(settings)
    rundir.write_file(settings.edge_token_file, token, 0o600, **owner)
    header = f'proxy_set_header {EDGE_HEADER} "{token.decode().strip()}";\n'
    rundir.write_file(private / EDGE_HEADER_CONF, header.encode(), 0o600)
    if store.used_here(settings):
        store.write_secrets(settings, owner)


def tls_files(settings: Settings) -> dict[str, bytes]:
    """{"ca"|"cert"|"key": PEM} for this host: made here once for one host, else from certs_dir."""
    if settings.own_certs:
        kept = {what: rundir.read_file(path) for what, path in settings.tls_files().items()}
        if all(kept.values()) and _current(kept, settings.address):
            return kept  # the cluster's processes hold these: a new CA would part them
        return certs.one_host_files(settings.address)
    found = {what: rundir.read_file(path) for what, path in settings.certs().items() if what in ("ca", "cert", "key")}
    missing = [str(settings.certs()[what]) for what, data in found.items() if data is None]
    if missing:
        raise rundir.RunDirError(f"this host ({settings.inventory.here.name}) lacks {', '.join(missing)}: run "
                                 f"`make certs` (with the same FLEET_SETTINGS) and copy {settings.certs_dir}/ "
                                 "to every host (dask.certs_dir, FLEET_DASK_CERTS_DIR)")
    return found


def _current(files: dict[str, bytes], address: str) -> bool:
    from cryptography import x509

    try:
        ca, cert = (x509.load_pem_x509_certificate(files[w]) for w in ("ca", "cert"))
    except ValueError:
        return False
    return certs.cert_current(cert, address, ca)


def edge_token(settings: Settings) -> bytes:
    """The token this host's nginx adds and its instances expect: the fleet's own across hosts
    (certs_dir, from make certs), this run dir's on one host (made once)."""
    if not settings.inventory.single:
        path = settings.certs()["edge_token"]
        token = rundir.read_file(path)
        if not token or not token.strip().isalnum():
            raise rundir.RunDirError(f"{path} is missing or not a token: run `make certs` (with the same "
                                     f"FLEET_SETTINGS) and copy {settings.certs_dir}/ to every host")
        return token
    token = rundir.read_file(settings.edge_token_file)
    return token if token and token.strip().isalnum() else certs.new_edge_token()
