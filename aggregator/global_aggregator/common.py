"""Names every seam of the global tier shares: its logger, its tier label, its poll interval.

Kept apart so that the seams import it without importing each other.
"""

from __future__ import annotations

import logging

log = logging.getLogger("fedkube.global")

TIER = "global"
# How often the round loop polls Redis (a partial's arrival wakes it sooner).
POLL_INTERVAL_S = 0.25
