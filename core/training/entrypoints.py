"""Resolve ``module.path:callable`` entrypoints from the job spec."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from fedkube.errors import EntrypointError


def import_target(reference: str) -> Any:
    """Import ``module:attr`` (or a bare ``module``) and return what it names."""
    module_name, colon, attribute = reference.partition(":")
    if not module_name or (colon and not attribute):
        raise EntrypointError(f"entrypoint {reference!r} is not of the form module:callable")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        message = f"entrypoint {reference!r}: cannot import {module_name}: {exc}"
        raise EntrypointError(message) from exc
    target: Any = module
    for part in attribute.split(".") if attribute else ():
        if not hasattr(target, part):
            raise EntrypointError(f"entrypoint {reference!r}: {module_name} has no {attribute}")
        target = getattr(target, part)
    return target


def resolve(reference: str) -> Callable[..., Any]:
    """Import ``module:attr`` and return the callable it names."""
    if ":" not in reference:
        raise EntrypointError(f"entrypoint {reference!r} is not of the form module:callable")
    target = import_target(reference)
    if not callable(target):
        raise EntrypointError(f"entrypoint {reference!r} is not callable")
    return target
