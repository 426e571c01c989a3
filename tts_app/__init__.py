"""The co-packaged ChatTTS HTTP app (aiohttp) that writes the log contract the sidecar reads."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("tts-sentinel")
except PackageNotFoundError:    # running from a source tree that was never installed
    __version__ = "0.0.0"
