"""Deployment configs; a package so the manifest generator imports one way (config.kubernetes)."""
