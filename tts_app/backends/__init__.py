"""Backend factory: picks the engine named in the config.

``chattts`` is imported lazily because torch is only in the app's optional extra; the
espeak backend needs nothing beyond the ``app`` extra.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from tts_app.backends.base import Backend

BACKENDS = ("espeak", "chattts")


def make_backend(name: str, options: Mapping[str, Any]) -> Backend:
    """Build (not load) the backend ``name`` with its options from ``backend.<name>``.

    Options are passed as keyword arguments to the backend's constructor.
    """
    if name == "espeak":
        from tts_app.backends.espeak import EspeakBackend

        return EspeakBackend(**options)
    if name == "chattts":
        from tts_app.backends.chattts import ChatTTSBackend

        return ChatTTSBackend(**options)
    raise ValueError(f"unknown backend {name!r}; expected one of {', '.join(BACKENDS)}")
