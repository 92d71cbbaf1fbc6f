"""Structured logs: one JSON object per line with job, round, tenant, region.

Services log through ``logger.info("...", extra=fields(job=..., round=...))``
so that a log pipeline (or ``grep``) can follow one round or one tenant.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from typing import Any

LOG_FILE_ENV = "FEDKUBE_LOG_FILE"  # log there instead of stderr (services inside Ray actors)

CONTEXT_FIELDS = ("component", "job", "round", "region", "tenant", "client", "worker", "reason")


def fields(**values: Any) -> dict[str, Any]:
    """``extra=`` for a log call; None values are dropped."""
    return {key: value for key, value in values.items() if value is not None}


class JsonFormatter(logging.Formatter):
    def __init__(self, component: str):
        super().__init__()
        self.component = component

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "component": self.component,
            "msg": record.getMessage(),
        }
        for name in CONTEXT_FIELDS[1:]:
            if hasattr(record, name):
                entry[name] = getattr(record, name)
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def configure(component: str, level: str = "INFO") -> None:
    path = os.environ.get(LOG_FILE_ENV)
    if path:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    handler: logging.Handler = (
        logging.FileHandler(path) if path else logging.StreamHandler(sys.stderr)
    )
    handler.setFormatter(JsonFormatter(component))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
