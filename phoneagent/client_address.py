"""Which client a request comes from: the address the per-client bounds count (the console's
sign-in, the HTTP API's failed keys) and the logs name.

Without configuration it is the connection's address. Behind a reverse proxy (the Ingress the
Kubernetes files expect, a cloud load balancer) every connection comes from the proxy, so every
client would share one bound: a stranger's wrong passwords would lock the operator out, and 20
bad API keys a minute would refuse every client of the API. ``PHONEAGENT_TRUSTED_PROXIES``
lists the proxies' addresses or networks. A request whose connection comes from one of them is
taken to be from the address the proxies give in ``X-Forwarded-For``: the right-most entry that
is not itself a trusted proxy. Each proxy appends the address it was reached from, so entries
a client wrote itself are further left and only what the trusted proxies wrote is believed. A
request that reaches the server directly keeps its connection's address, whatever it claims.

No I/O: ``config`` reads the setting, and ``client_limits.real_client`` (the middleware) applies
it to every request. IPv6 clients are counted by their /64 (:func:`bound_key`): a subscriber is
usually given a whole /64, so counting single addresses would give one attacker 2^64 fresh tries.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence

__all__ = ["Network", "bound_key", "forwarded_client", "parse_trusted_proxies"]

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address


def parse_trusted_proxies(text: str) -> tuple[Network, ...]:
    """``10.0.0.0/8, 192.168.1.7, fd00::/8`` → networks; ValueError naming each bad entry."""
    networks, bad = [], []
    for entry in (e.strip() for e in text.split(",")):
        if not entry:
            continue
        try:
            networks.append(ipaddress.ip_network(entry, strict=False))
        except ValueError:
            bad.append(repr(entry[:50]))
    if bad:
        raise ValueError(f"not an address or network: {', '.join(bad)}")
    return tuple(networks)


def forwarded_client(
    peer: str | None, forwarded_for: Iterable[str], trusted: Sequence[Network]
) -> str | None:
    """The client of a connection from ``peer`` that carried these ``X-Forwarded-For`` header
    values (in the order received): ``peer`` itself unless it is a trusted proxy."""
    address = _address(peer)
    if address is None or not _within(address, trusted):
        return peer
    hops = [hop.strip() for value in forwarded_for for hop in value.split(",")]
    for hop in reversed(hops):
        hop_address = _address(hop)
        if hop_address is None:
            # Written by a trusted proxy, yet not an address ("unknown", a name): nothing
            # further left can be believed. The proxy counts as the client, as without a proxy.
            return str(address)
        address = hop_address
        if not _within(address, trusted):
            return str(address)
    return str(address)  # every hop is a trusted proxy: the left-most is the client


def bound_key(client: str) -> str:
    """What a per-client bound counts ``client`` as: an IPv4 address as it is, an IPv6 one by
    its /64 (anything else, e.g. "?", as it is)."""
    address = _address(client)
    if isinstance(address, ipaddress.IPv6Address):
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    return client


def _address(text: str | None) -> Address | None:
    """An address as a peer or a proxy writes it: ``1.2.3.4``, ``1.2.3.4:5678``, ``::1``,
    ``[::1]:443``; an IPv4-mapped IPv6 address as its IPv4 one. None if it is not one."""
    if not text:
        return None
    text = text.strip()
    if text.startswith("["):
        text = text[1:].partition("]")[0]
    elif text.count(":") == 1:
        text = text.partition(":")[0]
    try:
        address = ipaddress.ip_address(text.partition("%")[0])  # no zone id (fe80::1%eth0)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _within(address: Address, trusted: Sequence[Network]) -> bool:
    return any(address.version == n.version and address in n for n in trusted)
