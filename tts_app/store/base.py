"""The store interface the jobs and the engine use, and the local (single-replica) store."""

from __future__ import annotations

from typing import Any, Protocol


class Store(Protocol):
    """Shared state between replicas. Every method answers within the store's timeout; when
    the store cannot answer, reads are misses, leases are granted and writes are dropped, so
    the caller carries on with its own state."""

    kind: str
    shared: bool

    def status(self) -> dict[str, Any]: ...

    def count_bad_value(self, key: str, problem: str) -> None: ...

    async def get(self, key: str) -> bytes | None: ...

    async def put(self, key: str, value: bytes, ttl_s: float, only_new: bool = False) -> bool:
        """Store ``value``; ``only_new``: only when the key is absent. True when written."""
        ...

    async def put_bounded(self, key: str, value: bytes, ttl_s: float, budget: str,
                          max_bytes: int) -> None:
        """Store ``value`` as one of the entries of ``budget``, whose values together stay
        within ``max_bytes`` (the oldest entries go first)."""
        ...

    async def delete(self, key: str) -> None: ...

    async def take_lease(self, key: str, ttl_s: float) -> bool:
        """True when this process may go ahead: it holds the lease, or the store is down."""
        ...

    async def renew_lease(self, key: str, ttl_s: float) -> None: ...

    async def release_lease(self, key: str) -> None: ...

    async def exists(self, key: str) -> bool: ...

    async def close(self) -> None: ...


class LocalStore:
    """``store.url: local``: nothing is shared; callers skip the store (``shared`` is False)."""

    kind = "local"
    shared = False

    def status(self) -> dict[str, Any]:
        return {"kind": self.kind, "healthy": True, "fallbacks_total": 0,
                "bad_values_total": 0}

    def count_bad_value(self, key: str, problem: str) -> None:
        return None

    async def get(self, key: str) -> bytes | None:
        return None

    async def put(self, key: str, value: bytes, ttl_s: float, only_new: bool = False) -> bool:
        return False

    async def put_bounded(self, key: str, value: bytes, ttl_s: float, budget: str,
                          max_bytes: int) -> None:
        return None

    async def delete(self, key: str) -> None:
        return None

    async def take_lease(self, key: str, ttl_s: float) -> bool:
        return True

    async def renew_lease(self, key: str, ttl_s: float) -> None:
        return None

    async def release_lease(self, key: str) -> None:
        return None

    async def exists(self, key: str) -> bool:
        return False

    async def close(self) -> None:
        return None
