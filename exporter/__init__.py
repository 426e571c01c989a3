"""tts-sentinel sidecar: TTS logs, GPU memory and cache disk as Prometheus metrics,
plus the VRAM ingress gate."""
