"""The regional combiner: one per region, between its workers and the global tier.

See :mod:`fedkube.aggregator.combiner.service` for what it does per round.
"""

from fedkube.aggregator.combiner.service import Combiner, CombinerConfig, run_combiner

__all__ = ["Combiner", "CombinerConfig", "run_combiner"]
