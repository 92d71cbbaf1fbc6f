"""The global aggregator (moved here from aggregator/global_aggregator.py; split next)."""

from fedkube.aggregator.global_aggregator.service import GlobalAggregator, GlobalConfig, run_global

__all__ = ["GlobalAggregator", "GlobalConfig", "run_global"]
