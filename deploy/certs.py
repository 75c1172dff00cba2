"""The fleet's own CA and one certificate per inventory host, for TLS between hosts.

    make certs                                            # python -m deploy.certs
    FLEET_SETTINGS=deploy/hosts.example.toml make certs   # every host of that inventory

Writes into dask.certs_dir (.certs/ by default): ca.pem and ca-key.pem, then <host>.pem and
<host>-key.pem for each host, edge-token (the secret nginx adds to every request it passes to
an instance) and job-store-password (the fleet's own Redis job store's, jobs.store = "redis"). Copy the directory to every host; ca-key.pem only needs to stay where new
certificates are made. An existing CA and token are kept (certificates already handed out stay
valid), and so is a host's certificate that still names the host's address and has a year left.

Dask checks that every peer (scheduler, worker, client) presents a certificate of this CA; it
does not check names, so any host of the fleet can take any role. Between the edge and the
instances both sides show their host's certificate; nginx checks the instance's against
INSTANCE_NAME, which every host's certificate carries (any host may run instances). The
certificates name their host and address too, for the operator reading them.

A managed Dask cluster on one host needs none of this: deploy makes that host's files in the run
dir itself (one_host_files: a CA that signs one certificate, its key never written anywhere).
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import secrets
import sys
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from services.common.settings import Settings, SettingsError, load

CA_YEARS = 10
HOST_YEARS = 2
RENEW_BEFORE = datetime.timedelta(days=365)
# The name nginx checks on every instance's certificate (proxy_ssl_name): every host carries it.
INSTANCE_NAME = "instance.fleet"


def now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def write_private(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    """A private key, readable by its owner only, from the moment it exists."""
    data = key_pem(key)
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    tmp.replace(path)


def write_cert(path: Path, cert: x509.Certificate) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(cert_pem(cert))
    tmp.replace(path)


def load_ca(directory: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None:
    cert, key = directory / "ca.pem", directory / "ca-key.pem"
    if not (cert.is_file() and key.is_file()):
        return None
    return (x509.load_pem_x509_certificate(cert.read_bytes()),
            serialization.load_pem_private_key(key.read_bytes(), password=None))


def make_ca(directory: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    cert, key = new_ca()
    write_private(directory / "ca-key.pem", key)
    write_cert(directory / "ca.pem", cert)
    return cert, key


def new_ca() -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = new_key()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fleet CA")])
    cert = (x509.CertificateBuilder()
            .subject_name(name).issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now() - datetime.timedelta(minutes=5))
            .not_valid_after(now() + datetime.timedelta(days=365 * CA_YEARS))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                         crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256()))
    return cert, key


def host_cert_current(path: Path, address: str, ca: x509.Certificate) -> bool:
    """The host's certificate exists, is signed by this CA, names `address` and has a year left."""
    if not path.is_file() or not path.with_name(path.stem + "-key.pem").is_file():
        return False
    cert = x509.load_pem_x509_certificate(path.read_bytes())
    return cert_current(cert, address, ca)


def cert_current(cert: x509.Certificate, address: str, ca: x509.Certificate) -> bool:
    """Signed by this CA, names `address` and INSTANCE_NAME, and has a year left."""
    try:
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return False
    return (cert.issuer == ca.subject and ipaddress.ip_address(address) in names.get_values_for_type(x509.IPAddress)
            and INSTANCE_NAME in names.get_values_for_type(x509.DNSName)
            and cert.not_valid_after_utc - now() > RENEW_BEFORE)


def make_host_cert(directory: Path, name: str, address: str, ca: x509.Certificate,
                   ca_key: ec.EllipticCurvePrivateKey) -> None:
    cert, key = new_host_cert(name, address, ca, ca_key)
    write_private(directory / f"{name}-key.pem", key)
    write_cert(directory / f"{name}.pem", cert)


def new_host_cert(name: str, address: str, ca: x509.Certificate,
                  ca_key: ec.EllipticCurvePrivateKey) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = new_key()
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(ca.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now() - datetime.timedelta(minutes=5))
            .not_valid_after(now() + datetime.timedelta(days=365 * HOST_YEARS))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(name), x509.DNSName(INSTANCE_NAME),
                                                        x509.IPAddress(ipaddress.ip_address(address))]),
                           critical=False)
            # Every Dask process, and every instance, is a TLS server and a client of others: both.
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    return cert, key


def one_host_files(address: str) -> dict[str, bytes]:
    """PEM bytes of a CA, and of one certificate and key it signed for this host: a managed Dask
    cluster on one host authenticates its peers with them. The CA's key signs this one certificate
    and is then forgotten, so nothing can ever sign another."""
    ca, ca_key = new_ca()
    cert, key = new_host_cert("localhost", address, ca, ca_key)
    return {"ca": cert_pem(ca), "cert": cert_pem(cert), "key": key_pem(key)}


def new_edge_token() -> bytes:
    return secrets.token_hex(32).encode() + b"\n"


def make_certs(settings: Settings) -> list[str]:
    """Create what is missing in settings.certs_dir; return what was made."""
    directory = settings.certs_dir
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    made = []
    found = load_ca(directory)
    if found is None:
        found = make_ca(directory)
        made.append("ca.pem")
    ca, ca_key = found
    for host in settings.inventory.hosts:
        if not host_cert_current(directory / f"{host.name}.pem", host.address, ca):
            make_host_cert(directory, host.name, host.address, ca, ca_key)
            made.append(f"{host.name}.pem")
    # The secrets every host shares: the edge's token, the fleet's own job store's password.
    for path in (settings.certs()["edge_token"], settings.certs()["job_store_password"]):
        if not path.is_file():
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(new_edge_token())  # 64 hex digits: nothing in them a config line or a URL could misread
            made.append(path.name)
    return made


def main() -> int:
    try:
        settings = load(any_host=True)
    except SettingsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    made = make_certs(settings)
    hosts = ", ".join(h.name for h in settings.inventory.hosts)
    print(f"certificates in {settings.certs_dir} for {hosts}: "
          + (f"made {', '.join(made)}" if made else "all present and current"))
    if not settings.inventory.single:
        print(f"copy {settings.certs_dir}/ to every host (ca-key.pem may stay here: only `make certs` needs it)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
