"""Where a live child no longer says what the operator applied (``kubectl edit`` and the like).

The spec-hash annotation tells the reconciler when *the job* changed; it
cannot tell when someone edited a child, since an edit leaves the annotation
as it was. :func:`drift` compares the fields the operator sets with the live
object, so the next pass applies the child again and server-side apply (with
``force``) takes those fields back.

Only what the operator sets counts: the API server adds defaults, other
controllers add fields and list elements (an extra owner reference, an
injected sidecar's env), and none of that is drift. It has to be that way
round: server-side apply does not remove what another manager owns, so
counting it would make the operator re-apply the same object on every pass.
The rules, for ``desired`` against ``live``:

- a mapping drifts where one of its keys drifts; an empty or false desired
  value matches a missing one (the API server drops ``{}``, ``[]`` and unset
  ``omitempty`` fields);
- a list of scalars (``args``, ``command``) is atomic: it must be equal;
- a list of mappings (``containers``, ``env``, ``ports``) drifts where one of
  the desired elements has no live element that matches it;
- scalars match when equal, when equal as text (``1`` and ``"1"``), or when
  both are the same Kubernetes quantity (``"0.5"`` and ``"500m"``).
"""

from __future__ import annotations

from collections.abc import Mapping
from decimal import Decimal, InvalidOperation
from typing import Any

from kubernetes.utils import parse_quantity

# What the operator never sets, or that is not the object's content.
IGNORED = frozenset({"apiVersion", "kind", "status"})
METADATA_COMPARED = ("labels", "annotations")


def drift(desired: Mapping[str, Any], live: Mapping[str, Any]) -> list[str]:
    """The paths of ``desired``'s fields that ``live`` does not match (empty: none)."""
    found: list[str] = []
    metadata = desired.get("metadata") or {}
    live_metadata = live.get("metadata") or {}
    for key in METADATA_COMPARED:
        if key in metadata:
            found += _diff(metadata[key], live_metadata.get(key), f"metadata.{key}")
    for key, value in desired.items():
        if key not in IGNORED and key != "metadata":
            found += _diff(value, live.get(key), key)
    return found


def _diff(desired: Any, live: Any, path: str) -> list[str]:
    if _empty(desired):
        return [] if _empty(live) else [path]
    if isinstance(desired, Mapping):
        if not isinstance(live, Mapping):
            return [path]
        found: list[str] = []
        for key, value in desired.items():
            found += _diff(value, live.get(key), f"{path}.{key}")
        return found
    if isinstance(desired, list):
        if not isinstance(live, list):
            return [path]
        if not any(isinstance(item, Mapping) for item in desired):
            return [] if len(desired) == len(live) and not _list_diff(desired, live) else [path]
        return [
            f"{path}[{index}]"
            for index, item in enumerate(desired)
            if not any(not _diff(item, candidate, "") for candidate in live)
        ]
    return [] if _same_scalar(desired, live) else [path]


def _list_diff(desired: list[Any], live: list[Any]) -> bool:
    return any(not _same_scalar(a, b) for a, b in zip(desired, live, strict=True))


def _empty(value: Any) -> bool:
    return value is None or value is False or value == "" or value == {} or value == []


def _same_scalar(desired: Any, live: Any) -> bool:
    if desired == live or (live is not None and str(desired) == str(live)):
        return True
    if isinstance(desired, bool) or isinstance(live, bool) or live is None:
        return False
    try:
        return Decimal(parse_quantity(desired)) == Decimal(parse_quantity(live))
    except (ValueError, TypeError, InvalidOperation):
        return False
