"""Kubernetes manifests and their generator (gen_manifests.py)."""
