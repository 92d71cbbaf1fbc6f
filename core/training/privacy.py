"""Client-level differential privacy: Gaussian noise and the accountant.

DP-FedAvg (McMahan et al. 2018, "Learning Differentially Private Recurrent
Language Models"): every client's update is clipped to L2 norm ``S``
(``spec.privacy.dp.clipNorm``; the worker uses ``fedkube.training.norms.clip``, the same
clip as the robust rule's) and counts once in the mean, whatever its
sample count, so that one client moves the sum by at most ``S``. Gaussian
noise of standard deviation ``z·S`` (``z`` the noise multiplier) is added to
that sum:

* ``central``: once per round, by the global aggregator, to the mean of all
  regions' clipped updates (std ``z·S / m`` on the mean of ``m`` updates).
  The hierarchy adds noise once, not per region. The aggregator tier sees
  individual clipped updates: it must be trusted.
* ``local``: every worker adds ``N(0, (z·S)²)`` to its own clipped update
  before it leaves the client. Nobody needs to be trusted with a clean
  update, at the price of ``√m`` times more noise in the mean.

The privacy spent is computed by Google's ``dp-accounting`` library (its
RDP accountant), never by a formula of ours. Central: each round is the
sampled Gaussian mechanism at the round's real sampling rate (selected /
clients of the job), accounted as Poisson sampling at that rate, as
TensorFlow Federated and Flower do for fixed-size client sampling. Local: a
client's own update is a Gaussian mechanism each round it takes part in;
the combiner sees who sent, so sampling does not amplify, and ε is stated
for a client that takes part in every round (the worst case).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fedkube.errors import UpdateRejected
from fedkube.spec import DifferentialPrivacy, DpMode, JobSpec
from fedkube.training.norms import clip
from fedkube.wire.protocol import Reason

# A clipped update's norm may exceed S by float rounding, never by more.
CLIP_TOLERANCE = 1e-5


def counted_weight(dp: DifferentialPrivacy | None, weight: float) -> float:
    """What a client's update counts for in the sum: its samples, or 1 under DP.

    Under differential privacy every client counts once: a sample count as
    weight would let one client move the sum past clipNorm.
    """
    return 1.0 if dp is not None else weight


# -- the three steps, one per tier ---------------------------------------------
def privatise_update(
    dp: DifferentialPrivacy, delta: Mapping[str, np.ndarray], noise_multiplier: Callable[[], float]
) -> dict[str, np.ndarray]:
    """The worker's step: the update clipped to clipNorm and, under local DP, noised.

    ``noise_multiplier`` is asked only under local DP (solving it may take an
    accountant's search, so the worker computes it once and keeps it).
    """
    clipped, _scale = clip(delta, dp.clip_norm)
    if dp.mode is not DpMode.local:
        return clipped
    return add_gaussian_noise(clipped, noise_multiplier() * dp.clip_norm, noise_rng())


def check_clipped(dp: DifferentialPrivacy | None, norm: float) -> None:
    """The combiner's step: refuse a central-DP update that its worker did not clip.

    Under local DP the update carries its noise and its norm says nothing,
    so only central DP can be checked here.
    """
    if dp is None or dp.mode is not DpMode.central:
        return
    if norm > dp.clip_norm * (1 + CLIP_TOLERANCE):
        raise UpdateRejected(
            Reason.over_clip_norm.value,
            f"update L2 norm {norm:.6g} > spec.privacy.dp.clipNorm {dp.clip_norm}: "
            "the worker must clip it",
        )


def central_noise_std(dp: DifferentialPrivacy, noise_multiplier: float, count: int) -> float | None:
    """The global tier's step: the noise's std on the round's mean of ``count`` clipped
    updates under central DP; None when no noise is added there (local DP, or nobody in
    the mean)."""
    if dp.mode is DpMode.central and count:
        return noise_multiplier * dp.clip_norm / count
    return None


def sampling_rate(spec: JobSpec, population: int) -> float:
    """The share of clients a round selects (``select_clients``' sample size)."""
    if population <= 0:
        return 0.0
    return max(1, round(spec.participation.fraction * population)) / population


def add_gaussian_noise(
    tensors: Mapping[str, np.ndarray], std: float, rng: np.random.Generator
) -> dict[str, np.ndarray]:
    """``tensors + N(0, std²)`` per value, as new float32 arrays."""
    return {
        name: (a + rng.normal(0.0, std, a.shape)).astype(np.float32) for name, a in tensors.items()
    }


def noise_rng() -> np.random.Generator:
    """A generator seeded from the operating system: noise nobody can replay."""
    return np.random.default_rng()


def _event(mode: DpMode, noise_multiplier: float, rate: float) -> Any:
    import dp_accounting

    gaussian = dp_accounting.GaussianDpEvent(noise_multiplier)
    if mode is DpMode.local or rate >= 1.0:
        return gaussian
    return dp_accounting.PoissonSampledDpEvent(rate, gaussian)


def _accountant(orders: Sequence[float] | None = None) -> Any:
    from dp_accounting.rdp import RdpAccountant

    return RdpAccountant(orders=list(orders)) if orders is not None else RdpAccountant()


def epsilon_of(
    mode: DpMode,
    noise_multiplier: float,
    rates: Sequence[float],
    delta: float,
    orders: Sequence[float] | None = None,
) -> float:
    """ε at ``delta`` after one round per entry of ``rates`` (sampling rates)."""
    if not rates:
        return 0.0
    if noise_multiplier <= 0:
        return math.inf
    accountant = _accountant(orders)
    # Rounds at the same rate compose as one event with a count: the RDP of a
    # sampled Gaussian is costly to compute, its composition is a product.
    for rate, rounds in Counter(rates).items():
        accountant.compose(_event(mode, noise_multiplier, rate), rounds)
    return float(accountant.get_epsilon(delta))


def noise_multiplier_for(
    mode: DpMode, epsilon: float, delta: float, rate: float, rounds: int
) -> float:
    """The smallest noise multiplier whose ``rounds`` rounds at ``rate`` spend ``epsilon``."""
    import dp_accounting

    return float(
        dp_accounting.calibrate_dp_mechanism(
            _accountant,
            lambda z: dp_accounting.SelfComposedDpEvent(_event(mode, z, rate), rounds),
            epsilon,
            delta,
            dp_accounting.ExplicitBracketInterval(1e-3, 1e4),
            tol=1e-4,
        )
    )


def noise_multiplier(spec: JobSpec, population: int) -> float:
    """The job's noise multiplier: given, or solved from its target ε for its planned rounds."""
    dp = spec.privacy.dp
    assert dp is not None
    if dp.noise_multiplier is not None:
        return dp.noise_multiplier
    assert dp.epsilon is not None
    return noise_multiplier_for(
        dp.mode, dp.epsilon, dp.delta, sampling_rate(spec, population), spec.rounds
    )


@dataclass
class Accountant:
    """The privacy a job has spent so far: one sampling rate per closed round."""

    dp: DifferentialPrivacy
    noise_multiplier: float
    rates: list[float] = field(default_factory=list)

    def spend(self, rate: float) -> float:
        """Count one more round at ``rate``; returns ε so far."""
        self.rates.append(rate)
        return self.epsilon()

    def epsilon(self) -> float:
        return epsilon_of(self.dp.mode, self.noise_multiplier, self.rates, self.dp.delta)

    def epsilon_after(self, rate: float) -> float:
        """ε if one more round ran at ``rate`` (nothing is counted)."""
        return epsilon_of(self.dp.mode, self.noise_multiplier, [*self.rates, rate], self.dp.delta)
