"""Who is asking: the one client identity behind rate limits and idempotency scope.

A header the client sets itself (``X-Client-ID``, ``X-Forwarded-For``) identifies nobody: a
fresh value per request would be a fresh rate-limit bucket and a fresh idempotency scope. So
only the TCP peer is believed, and headers only when that peer is a proxy of ours:

- peer not in ``trusted_proxies``: the peer address;
- peer trusted and ``client_header`` set (the proxy authenticated the caller): ``key:<value>``;
- peer trusted otherwise: the rightmost ``X-Forwarded-For`` address that is not itself a
  trusted proxy (every proxy appends the address it saw, so the entries to its left are
  whatever the client claimed), or the leftmost entry when every hop is trusted.
"""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Iterable

from multidict import MultiMapping

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
# An identity header longer than this, or not printable ASCII, is not a credential we keep
# a bucket for: the proxy that sent it is misconfigured, so the address is used instead.
MAX_HEADER_CHARS = 128


def parse_network(text: str) -> Network:
    """``10.0.0.0/8`` or a single address; raises ValueError with the reason."""
    return ipaddress.ip_network(text.strip(), strict=False)


def _address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        ip = ipaddress.ip_address(text.strip())
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped        # a dual-stack socket's view of an IPv4 peer
    return ip


class ClientIdentity:
    """The rules above, for one ``trusted_proxies`` list and identity header name."""

    def __init__(self, trusted_proxies: Iterable[str], client_header: str) -> None:
        self._trusted = tuple(parse_network(text) for text in trusted_proxies)
        self._header = client_header
        # Every request asks about its peer; a bounded cache keeps the address parsing off
        # the request path for the peers actually seen (few behind a proxy).
        self._trusted_peer = functools.lru_cache(maxsize=4096)(
            lambda peer: self._is_trusted(_address(peer)))

    def _is_trusted(self, ip: ipaddress.IPv4Address | ipaddress.IPv6Address | None) -> bool:
        return ip is not None and any(ip in network for network in self._trusted)

    def of(self, peer: str | None, headers: MultiMapping[str]) -> str:
        """The identity of a request from ``peer`` (the socket's remote address)."""
        if peer is None or not self._trusted_peer(peer):
            return peer or "unknown"
        given = headers.get(self._header, "") if self._header else ""
        if 0 < len(given) <= MAX_HEADER_CHARS and given.isascii() and given.isprintable():
            return f"key:{given}"
        # Several X-Forwarded-For lines are one list, in order (RFC 9110 field combining).
        hops = [hop.strip() for line in headers.getall("X-Forwarded-For", ())
                for hop in line.split(",") if hop.strip()]
        for hop in reversed(hops):
            ip = _address(hop)
            if not self._is_trusted(ip):
                # one spelling per address; a proxy only appends addresses, so a non-address
                # here is a misbehaving hop, kept short
                return str(ip) if ip is not None else hop[:64]
        return hops[0] if hops else peer
