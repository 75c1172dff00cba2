"""The [hosts] inventory: which host runs which part, and every inventory that cannot work refused."""

from __future__ import annotations

import doctest

import pytest

from services.common import inventory
from services.common.inventory import LOCAL, InventoryError, parse

DASK = {"slow.backend": "dask", "dask.scheduler": "managed"}
LOCAL_POOL = {"slow.backend": "local", "dask.scheduler": "managed"}


def two_hosts() -> dict:
    return {"web1": {"address": "10.77.0.1", "roles": ["edge", "fast", "slow", "scheduler"]},
            "heavy1": {"address": "10.77.0.2", "roles": ["workers"]},
            "heavy2": {"address": "10.77.0.3", "roles": ["workers"]}}


def test_the_module_docstring_example_holds():
    assert doctest.testmod(inventory).failed == 0


def test_without_hosts_the_fleet_is_one_loopback_host_with_every_role_it_needs():
    single = parse(None, DASK, None)
    assert single.single and single.here.name == LOCAL and single.here.address == "127.0.0.1"
    assert single.here.roles == ("edge", "fast", "slow", "scheduler", "workers")
    assert parse(None, LOCAL_POOL, None).here.roles == ("edge", "fast", "slow")


def test_each_host_has_its_roles_and_fleet_host_picks_this_machine_s_part():
    inv = parse(two_hosts(), DASK, "heavy2")
    assert inv.here.address == "10.77.0.3" and inv.runs("workers") and not inv.runs("edge")
    assert inv.edge.name == "web1"
    assert [h.name for h in inv.with_role("workers")] == ["heavy1", "heavy2"]


def test_the_snapshot_round_trips():
    inv = parse(two_hosts(), DASK, "web1")
    assert inventory.Inventory.from_snapshot(inv.snapshot(), DASK) == inv
    single = parse(None, DASK, None)
    assert inventory.Inventory.from_snapshot(single.snapshot(), DASK) == single


def broken(change) -> dict:
    hosts = two_hosts()
    change(hosts)
    return hosts


@pytest.mark.parametrize("hosts, here, message", [
    (broken(lambda h: h["heavy1"].update(roles=["workers", "cache"])), "web1", "unknown role 'cache'"),
    (broken(lambda h: h["web1"]["roles"].remove("edge")), "web1", "no host has the edge role"),
    (broken(lambda h: h["heavy1"]["roles"].append("edge")), "web1", "only one host may have the edge role; web1, heavy1 do"),
    (broken(lambda h: h["web1"]["roles"].remove("slow")), "web1", "no host has the slow role"),
    (broken(lambda h: [h.pop("heavy1"), h.pop("heavy2")]), "web1", "no host has the workers role"),
    (broken(lambda h: h["heavy1"]["roles"].append("scheduler")), "web1", "only one host may have the scheduler role"),
    (broken(lambda h: h["heavy1"].update(address="heavy1.example.com")), "web1", "must be a literal IPv4 or IPv6"),
    (broken(lambda h: h["heavy1"].update(address="0.0.0.0")), "web1", "is not one host's address"),
    (broken(lambda h: h["heavy2"].update(address="10.77.0.2")), "web1", "two hosts have the address 10.77.0.2"),
    (broken(lambda h: h["heavy1"].update(roles=[])), "web1", "roles must be a non-empty list"),
    (broken(lambda h: h["heavy1"].update(port=22)), "web1", "unknown key port"),
    (broken(lambda h: h.update({"Web_2": {"address": "10.77.0.9", "roles": ["fast"]}})), "web1", "a host name is"),
    (two_hosts(), "heavy9", "FLEET_HOST=heavy9: no such host"),
    (two_hosts(), None, "set FLEET_HOST to the host this machine is: one of web1, heavy1, heavy2"),
])
def test_an_inventory_that_cannot_work_is_refused_naming_why(hosts, here, message):
    with pytest.raises(InventoryError, match=message.replace("(", r"\(")):
        parse(hosts, DASK, here)


def test_cluster_roles_are_refused_when_the_fleet_runs_no_cluster_of_its_own():
    with pytest.raises(InventoryError, match="needs the fleet's own Dask cluster"):
        parse(two_hosts(), LOCAL_POOL, "web1")
    external = {"slow.backend": "dask", "dask.scheduler": "tcp://10.0.0.5:8786"}
    with pytest.raises(InventoryError, match="needs the fleet's own Dask cluster"):
        parse(two_hosts(), external, "web1")


def test_fleet_host_without_an_inventory_is_refused():
    with pytest.raises(InventoryError, match="no \\[hosts\\] table"):
        parse(None, DASK, "web1")
