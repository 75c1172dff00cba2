"""The fleet's hosts: which machine runs which part, from the settings file's [hosts] table.

    [hosts.web1]
    address = "10.77.0.1"
    roles = ["edge", "fast", "slow", "scheduler"]

    [hosts.heavy1]
    address = "10.77.0.2"
    roles = ["workers"]

    [hosts.db1]
    address = "10.77.0.4"
    roles = ["store"]           # the fleet's own Redis job store (jobs.store = "redis", no jobs.redis_url)

Without a [hosts] table the fleet is one host, "local", on loopback with every role it needs, as
it always was. `FLEET_HOST=<name>` says which host this machine is: deploy starts that host's part
only. An inventory that cannot work is refused before anything starts, naming what is wrong.

    >>> inv = parse({"web1": {"address": "10.77.0.1", "roles": ["edge", "fast", "slow"]}},
    ...             {"slow.backend": "local", "dask.scheduler": "managed"}, here="web1")
    >>> inv.here.address, inv.edge.name, inv.runs("slow")
    ('10.77.0.1', 'web1', True)
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import Any, Mapping

ROLES = ("edge", "fast", "slow", "scheduler", "workers", "store")
ONE_HOLDER = ("edge", "scheduler", "store")  # roles exactly one host may have
LOCAL = "local"  # the one host of a fleet without [hosts]
LOOPBACK = "127.0.0.1"
NAME = re.compile(r"^[a-z][a-z0-9-]{0,30}$")  # a host's name becomes part of program and file names


class InventoryError(ValueError):
    """The [hosts] table cannot describe a working fleet; the message says why."""


@dataclass(frozen=True)
class Host:
    name: str
    address: str
    roles: tuple[str, ...]


@dataclass(frozen=True)
class Inventory:
    hosts: tuple[Host, ...]  # in the file's order
    here: Host  # the host this machine is (FLEET_HOST)
    single: bool  # no [hosts] table: one host on loopback

    @property
    def edge(self) -> Host:
        return next(h for h in self.hosts if "edge" in h.roles)

    def with_role(self, role: str) -> list[Host]:
        return [h for h in self.hosts if role in h.roles]

    def runs(self, role: str) -> bool:
        """Whether this machine runs `role`."""
        return role in self.here.roles

    def snapshot(self) -> dict[str, Any]:
        return {"hosts": {h.name: {"address": h.address, "roles": list(h.roles)} for h in self.hosts},
                "here": self.here.name, "single": self.single}

    @classmethod
    def from_snapshot(cls, data: Mapping[str, Any], values: Mapping[str, Any]) -> "Inventory":
        if data.get("single", True):
            return parse(None, values, None)
        return parse(data["hosts"], values, data["here"])


def host_port(address: str, port: int) -> str:
    """address:port as URLs and Dask write it: [::1]:8786 for IPv6."""
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"


def needed_roles(values: Mapping[str, Any]) -> tuple[str, ...]:
    """The roles a fleet with these settings needs: a cluster's only when the fleet runs one, the
    store's only when it runs its own Redis job store."""
    needed = ["edge", "fast", "slow"]
    if values["slow.backend"] == "dask" and values["dask.scheduler"] == "managed":
        needed += ["scheduler", "workers"]
    if values.get("jobs.store") == "redis" and not values.get("jobs.redis_url"):
        needed.append("store")
    return tuple(needed)


def parse(table: Mapping[str, Any] | None, values: Mapping[str, Any], here: str | None) -> Inventory:
    """The inventory from a [hosts] table (None: the single loopback host) and the resolved
    settings; `here` is FLEET_HOST. Raises InventoryError."""
    needed = needed_roles(values)
    if table is None:
        if here not in (None, "", LOCAL):
            raise InventoryError(f"FLEET_HOST={here}: the settings have no [hosts] table (one host, {LOCAL!r})")
        local = Host(LOCAL, LOOPBACK, needed)
        return Inventory((local,), local, single=True)
    if not isinstance(table, Mapping) or not table:
        raise InventoryError("[hosts] must hold at least one [hosts.<name>] table")
    hosts = tuple(_host(name, entry, needed) for name, entry in table.items())
    addresses = [h.address for h in hosts]
    for address in addresses:
        if addresses.count(address) > 1:
            raise InventoryError(f"two hosts have the address {address}: "
                                 f"{', '.join(h.name for h in hosts if h.address == address)}")
    for role in needed:
        holders = [h.name for h in hosts if role in h.roles]
        if not holders:
            raise InventoryError(f"no host has the {role} role: give it to one in [hosts]")
        if role in ONE_HOLDER and len(holders) > 1:
            raise InventoryError(f"only one host may have the {role} role; {', '.join(holders)} do")
    if not here:
        raise InventoryError(f"set FLEET_HOST to the host this machine is: one of {', '.join(h.name for h in hosts)}")
    chosen = next((h for h in hosts if h.name == here), None)
    if chosen is None:
        raise InventoryError(f"FLEET_HOST={here}: no such host in [hosts]; known: {', '.join(h.name for h in hosts)}")
    return Inventory(hosts, chosen, single=False)


def _host(name: str, entry: Any, needed: tuple[str, ...]) -> Host:
    where = f"[hosts.{name}]"
    if not NAME.match(name):
        raise InventoryError(f"{where}: a host name is lower-case letters, digits and '-', starting with a letter")
    if not isinstance(entry, Mapping):
        raise InventoryError(f"{where} must be a table with address and roles")
    unknown = sorted(set(entry) - {"address", "roles"})
    if unknown:
        raise InventoryError(f"{where}: unknown key {unknown[0]}; a host has address and roles")
    raw = entry.get("address")
    try:
        address = ipaddress.ip_address(raw if isinstance(raw, str) else "")
    except ValueError:
        raise InventoryError(f"{where}: address must be a literal IPv4 or IPv6 address, got {raw!r}") from None
    if address.is_unspecified or address.is_multicast:
        raise InventoryError(f"{where}: address {raw} is not one host's address (every program binds it)")
    roles = entry.get("roles")
    if not isinstance(roles, list) or not roles or not all(isinstance(r, str) for r in roles):
        raise InventoryError(f"{where}: roles must be a non-empty list of: {', '.join(ROLES)}")
    for role in roles:
        if role not in ROLES:
            raise InventoryError(f"{where}: unknown role {role!r}; roles are {', '.join(ROLES)}")
        if role not in needed:
            raise InventoryError(f"{where}: role {role!r} needs the fleet's own " + (
                'job store (jobs.store = "redis", no jobs.redis_url)' if role == "store" else
                'Dask cluster (slow.backend = "dask", dask.scheduler = "managed")'))
    if len(set(roles)) != len(roles):
        raise InventoryError(f"{where}: a role is listed twice")
    return Host(name, str(address), tuple(roles))
