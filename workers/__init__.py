"""The worker runtime: fetch the global model, train locally, send an update.

Imported as ``fedkube.workers`` (the folder is mapped in pyproject.toml).
"""
