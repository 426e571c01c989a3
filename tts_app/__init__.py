"""The co-packaged ChatTTS HTTP app (aiohttp) that writes the log contract the sidecar reads."""
