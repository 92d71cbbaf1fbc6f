"""The aggregator tier: regional combiners and the global aggregator.

Imported as ``fedkube.aggregator`` (the folder is mapped in pyproject.toml).
"""
