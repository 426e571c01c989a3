"""tts-sentinel sidecar: TTS logs, GPU memory and cache disk as Prometheus metrics,
plus the VRAM ingress gate."""

from importlib.metadata import PackageNotFoundError, version

# pyproject.toml holds the version; the app reads it the same way (neither imports the other).
try:
    __version__ = version("tts-sentinel")
except PackageNotFoundError:    # running from a source tree that was never installed
    __version__ = "0.0.0"
