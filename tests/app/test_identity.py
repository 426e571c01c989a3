"""One client identity, through real HTTP: headers count only from a trusted proxy, behind it
X-Forwarded-For names the client, and a global bucket caps everyone together.

The app's test client connects from 127.0.0.1 (the trusted proxy, as the shipped nginx is);
``peer`` opens a second client from 127.0.0.2, an address nobody trusts.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from multidict import CIMultiDict

from tests.app.conftest import Running, StartApp, expect_error
from tts_app.identity import ClientIdentity

PAYLOAD = {"text": "Who am I?"}
STRICT = {"enabled": True, "rate_per_s": 0.01, "burst": 2}


@pytest.fixture
async def untrusted() -> AsyncIterator[aiohttp.ClientSession]:
    connector = aiohttp.TCPConnector(local_addr=("127.0.0.2", 0), force_close=True)
    async with aiohttp.ClientSession(connector=connector) as session:
        yield session


async def post(app: Running, session: aiohttp.ClientSession | None = None,
               route: str = "/v1/tts", headers: dict[str, str] | None = None) -> Any:
    if session is None:
        return await app.client.post(route, json=PAYLOAD, headers=headers)
    return await session.post(app.client.make_url(route), json=PAYLOAD, headers=headers)


@pytest.mark.slow
async def test_identity_headers_from_an_untrusted_peer_are_ignored(
        start_app: StartApp, untrusted: aiohttp.ClientSession) -> None:
    app = await start_app({"admission": {"rate_limit": STRICT}})
    statuses = []
    for i in range(6):        # a fresh identity claim per request, as the abuse did
        response = await post(app, untrusted, headers={"X-Client-ID": f"fresh-{i}",
                                                 "X-Forwarded-For": f"198.51.100.{i}"})
        statuses.append(response.status)
        if response.status == 429:
            await expect_error(response, "RATE_LIMITED")
    assert statuses == [200, 200, 429, 429, 429, 429]
    # the trusted proxy's own clients are other identities: not pushed out, not limited
    assert (await post(app, headers={"X-Forwarded-For": "198.51.100.77"})).status == 200


@pytest.mark.slow
async def test_behind_a_trusted_proxy_the_rightmost_untrusted_address_is_the_client(
        start_app: StartApp) -> None:
    app = await start_app({"admission": {"rate_limit": STRICT},
                           "identity": {"trusted_proxies": ["127.0.0.1", "10.0.0.0/8"]}})
    # nginx appends the address it saw; what the client claimed sits to its left
    for claimed in ("1.1.1.1", "2.2.2.2"):
        response = await post(app, headers={"X-Forwarded-For": f"{claimed}, 203.0.113.5"})
        assert response.status == 200
    await expect_error(await post(app, headers={"X-Forwarded-For": "3.3.3.3, 203.0.113.5"}),
                       "RATE_LIMITED")
    # two trusted hops (an LB in 10/8 in front of nginx): the address before them
    await expect_error(await post(app, headers={"X-Forwarded-For":
                                                "9.9.9.9, 203.0.113.5, 10.1.2.3"}),
                       "RATE_LIMITED")
    # several header lines are one list
    await expect_error(await app.client.post("/v1/tts", json=PAYLOAD, headers=[
        ("X-Forwarded-For", "4.4.4.4"), ("X-Forwarded-For", "203.0.113.5")]), "RATE_LIMITED")
    assert (await post(app, headers={"X-Forwarded-For": "203.0.113.6"})).status == 200
    # an authenticated identity set by the proxy wins over the address
    for _ in range(2):
        assert (await post(app, headers={"X-Forwarded-For": "203.0.113.5",
                                   "X-Client-ID": "tenant-a"})).status == 200
    await expect_error(await post(app, headers={"X-Client-ID": "tenant-a"}), "RATE_LIMITED")


@pytest.mark.slow
async def test_global_bucket_limits_all_clients_together(start_app: StartApp) -> None:
    app = await start_app({"admission": {"rate_limit": {
        "enabled": True, "rate_per_s": 100, "burst": 100,
        "global_rate_per_s": 0.01, "global_burst": 3}}})
    for i in range(3):
        assert (await post(app, headers={"X-Forwarded-For": f"198.51.100.{i}"})).status == 200
    limited = await post(app, headers={"X-Forwarded-For": "198.51.100.200"})
    body = await expect_error(limited, "RATE_LIMITED")
    assert "service-wide" in body["error"]["message"]
    assert int(limited.headers["Retry-After"]) >= 1
    await expect_error(await post(app, route="/v1/tts/jobs",
                                  headers={"X-Forwarded-For": "198.51.100.201"}), "RATE_LIMITED")


@pytest.mark.parametrize(("peer", "headers", "expected"), [
    ("192.0.2.1", {"X-Client-ID": "x", "X-Forwarded-For": "1.2.3.4"}, "192.0.2.1"),
    ("127.0.0.1", {}, "127.0.0.1"),
    ("127.0.0.1", {"X-Forwarded-For": "1.2.3.4, 127.0.0.1"}, "1.2.3.4"),
    ("::ffff:127.0.0.1", {"X-Forwarded-For": "2001:DB8:0::1"}, "2001:db8::1"),
    ("127.0.0.1", {"X-Forwarded-For": "1.2.3.4, not-an-address"}, "not-an-address"),
    ("127.0.0.1", {"X-Forwarded-For": "127.0.0.1, 127.0.0.1"}, "127.0.0.1"),
    ("127.0.0.1", {"X-Forwarded-For": " , "}, "127.0.0.1"),
    ("127.0.0.1", {"X-Client-ID": "", "X-Forwarded-For": "1.2.3.4"}, "1.2.3.4"),
    ("127.0.0.1", {"X-Client-ID": "k" * 129, "X-Forwarded-For": "1.2.3.4"}, "1.2.3.4"),
    ("127.0.0.1", {"X-Client-ID": "tenant"}, "key:tenant"),
    (None, {"X-Client-ID": "x"}, "unknown"),
])
def test_identity_rules(peer: str | None, headers: dict[str, str], expected: str) -> None:
    identity = ClientIdentity(["127.0.0.1"], "X-Client-ID")
    assert identity.of(peer, CIMultiDict(headers)) == expected
