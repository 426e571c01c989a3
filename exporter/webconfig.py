"""The Prometheus exporter-toolkit web config (``--web.config.file``): TLS and basic auth.

The file format is the one every Prometheus exporter reads
(https://github.com/prometheus/exporter-toolkit/blob/master/docs/web-configuration.md)::

    tls_server_config:
      cert_file: /etc/tls/tls.crt
      key_file: /etc/tls/tls.key
      client_ca_file: /etc/tls/ca.crt            # optional
      client_auth_type: RequireAndVerifyClientCert
      min_version: TLS12                          # optional
    basic_auth_users:
      prometheus: $2y$10$...                      # bcrypt hash

Supported: ``cert_file``, ``key_file``, ``client_ca_file``, ``client_auth_type``
(``NoClientCert``, ``VerifyClientCertIfGiven``, ``RequireAndVerifyClientCert``),
``min_version``/``max_version`` and ``basic_auth_users``; anything else stops start-up with
a :class:`~exporter.config.ConfigError` (a setting silently ignored would be a hole). The file
is read once at start-up.

bcrypt is slow by design: a check runs on a worker thread, and a successful one is remembered
for a minute (by a keyed hash of the credentials, never the password), so a scrape costs one
bcrypt a minute, not one per request.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import os
import ssl
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import bcrypt
from aiohttp import web
from aiohttp.typedefs import Middleware

from exporter.config import ConfigError
from exporter.schema import InvalidInput, load_yaml

_CLIENT_AUTH = {
    "NoClientCert": ssl.CERT_NONE,
    "VerifyClientCertIfGiven": ssl.CERT_OPTIONAL,
    "RequireAndVerifyClientCert": ssl.CERT_REQUIRED,
}
_TLS_VERSIONS = {"TLS12": ssl.TLSVersion.TLSv1_2, "TLS13": ssl.TLSVersion.TLSv1_3}
_TLS_KEYS = {"cert_file", "key_file", "client_ca_file", "client_auth_type", "min_version",
             "max_version"}
_TOP_KEYS = {"tls_server_config", "basic_auth_users"}


@dataclass(frozen=True)
class WebConfig:
    """What the web config file asks for: a server TLS context and basic-auth users."""

    ssl_context: ssl.SSLContext | None = None
    users: dict[str, bytes] = field(default_factory=dict)


def load_web_config(path: str | os.PathLike[str]) -> WebConfig:
    """Read and validate a web config file; raise ConfigError naming the file and key."""
    name = str(path)
    try:
        data = load_yaml(Path(path).read_bytes())
    except OSError as exc:
        raise ConfigError(name, "", f"cannot read the web config file ({exc.strerror})") \
            from None
    except InvalidInput as exc:
        raise ConfigError(name, *exc.problems[0]) from None
    data = {} if data is None else data
    _mapping(name, "(top level)", data, _TOP_KEYS)
    users = _users(name, data.get("basic_auth_users") or {})
    tls = data.get("tls_server_config")
    return WebConfig(_ssl_context(name, tls) if tls else None, users)


def _mapping(file: str, key: str, value: Any, allowed: set[str]) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ConfigError(file, key, f"expected a mapping, got {type(value).__name__}")
    unknown = sorted(map(str, set(value) - allowed))
    if unknown:
        raise ConfigError(file, unknown[0] if key == "(top level)" else f"{key}.{unknown[0]}",
                          f"not supported by tts-exporter; expected one of "
                          f"{', '.join(sorted(allowed))}")
    return value


def _users(file: str, value: Any) -> dict[str, bytes]:
    if not isinstance(value, dict):
        raise ConfigError(file, "basic_auth_users", "expected a mapping of user: bcrypt hash")
    users = {}
    for user, hashed in value.items():
        key = f"basic_auth_users.{user}"
        if not isinstance(user, str) or not isinstance(hashed, str) or \
                not hashed.startswith(("$2a$", "$2b$", "$2y$")):
            raise ConfigError(file, key, "expected a bcrypt hash ($2a$/$2b$/$2y$...)")
        users[user] = hashed.encode()
    return users


def _ssl_context(file: str, value: Any) -> ssl.SSLContext:
    tls = _mapping(file, "tls_server_config", value, _TLS_KEYS)

    def text(key: str, default: str = "") -> str:
        got = tls.get(key, default)
        if not isinstance(got, str):
            raise ConfigError(file, f"tls_server_config.{key}", "expected a string")
        return got

    cert, key = text("cert_file"), text("key_file")
    if not cert or not key:
        raise ConfigError(file, "tls_server_config", "expected both cert_file and key_file")
    auth = text("client_auth_type", "NoClientCert")
    if auth not in _CLIENT_AUTH:
        raise ConfigError(file, "tls_server_config.client_auth_type",
                          f"expected one of {', '.join(_CLIENT_AUTH)}, got {auth!r}")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    for bound, attr in (("min_version", "minimum_version"), ("max_version", "maximum_version")):
        version = text(bound, "TLS12" if bound == "min_version" else "TLS13")
        if version not in _TLS_VERSIONS:
            raise ConfigError(file, f"tls_server_config.{bound}",
                              f"expected TLS12 or TLS13, got {version!r}")
        setattr(context, attr, _TLS_VERSIONS[version])
    try:
        context.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(file, "tls_server_config.cert_file",
                          f"cannot load the certificate and key ({exc})") from None
    context.verify_mode = _CLIENT_AUTH[auth]
    ca = text("client_ca_file")
    if auth != "NoClientCert" and not ca:
        raise ConfigError(file, "tls_server_config.client_ca_file",
                          f"expected a CA file to verify client certificates ({auth})")
    if ca:
        try:
            context.load_verify_locations(cafile=ca)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(file, "tls_server_config.client_ca_file",
                              f"cannot load the CA file ({exc})") from None
    return context


class BasicAuth:
    """Checks ``Authorization: Basic`` against bcrypt hashes, off the event loop, remembering
    successes for ``cache_s`` (at most ``cache_size`` credentials)."""

    def __init__(self, users: dict[str, bytes], cache_s: float = 60.0, cache_size: int = 64,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.users = users
        self.cache_s, self.cache_size = cache_s, cache_size
        self.clock = clock
        self._key = os.urandom(32)
        self._ok: OrderedDict[bytes, float] = OrderedDict()
        # A wrong password costs a bcrypt; two at a time bound what failed guesses can burn.
        self._checks = asyncio.Semaphore(2)
        # Unknown users cost a bcrypt too, so timing does not tell which users exist.
        self._decoy = bcrypt.hashpw(b"decoy", bcrypt.gensalt(rounds=10))

    async def check(self, header: str) -> bool:
        scheme, _, encoded = header.partition(" ")
        if scheme.lower() != "basic":
            return False
        try:
            raw = base64.b64decode(encoded.strip().encode("ascii"), validate=True)
        except (binascii.Error, UnicodeEncodeError):
            return False
        user_bytes, sep, password = raw.partition(b":")
        if not sep:
            return False
        digest = hmac.new(self._key, raw, hashlib.sha256).digest()
        now = self.clock()
        expires = self._ok.get(digest)
        if expires is not None and expires > now:
            return True
        hashed = self.users.get(user_bytes.decode("utf-8", "replace"))
        async with self._checks:
            ok = await asyncio.to_thread(bcrypt.checkpw, password, hashed or self._decoy)
        if ok and hashed is not None:
            self._ok[digest] = now + self.cache_s
            self._ok.move_to_end(digest)
            while len(self._ok) > self.cache_size:
                self._ok.popitem(last=False)
            return True
        return False

    def middleware(self, open_paths: Iterable[str]) -> Middleware:
        """Basic auth for every GET/HEAD route but ``open_paths``; POST routes carry their own
        bearer token (one Authorization header cannot carry both)."""
        exempt = frozenset(open_paths)

        @web.middleware
        async def basic_auth(request: web.Request,
                             handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) \
                -> web.StreamResponse:
            if request.method == "POST" or request.path in exempt or \
                    await self.check(request.headers.get("Authorization", "")):
                return await handler(request)
            return web.json_response({"error": "basic authentication required"}, status=401,
                                     headers={"WWW-Authenticate":
                                              'Basic realm="tts-exporter", charset="UTF-8"'})

        return basic_auth
