"""Offline forensics over app logs: ``tts-exporter analyze`` (summary report or one timeline)."""
