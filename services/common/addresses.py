"""A client's address as the fleet compares it, wherever it reads one (an instance's peer check,
the slow line's per-client key): without an IPv6 zone id, an IPv4-mapped IPv6 address as IPv4."""

from __future__ import annotations

import ipaddress

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def plain_ip(address: str) -> IPAddress:
    """"::ffff:10.0.0.1" -> 10.0.0.1, "fe80::1%eth0" -> fe80::1; ValueError if it is no address."""
    ip = ipaddress.ip_address(address.split("%")[0])  # a zone id names an interface, not a client
    if ip.version == 6 and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip
