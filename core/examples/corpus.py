"""A text corpus that needs no download: the Python standard library, by topic.

The text. Every Python installation carries its standard library as source,
so the corpus is read from there (``sysconfig``'s ``stdlib`` path): for each
topic, the docstrings (``kind="docstrings"``: English prose about that
topic's API) or the whole source (``kind="source"``) of a fixed group of
modules, files in sorted order, docstrings in source order, joined by blank
lines. Test suites inside packages are skipped, and a module this Python
lacks (``tomllib`` before 3.11, say) is left out of its topic. The text is
therefore the same for every process of one installation (one container
image), which is what a job needs: every tier derives the same split.

The tokens. :class:`ByteTokenizer` maps text to its UTF-8 bytes (256 ids),
so there is no vocabulary to ship or learn and any text encodes.

The split. Each topic's token stream is cut into non-overlapping windows of
``seq_len + 1`` tokens (input and next-token target). The windows of each
topic are shuffled with the job's seed (``windows_per_topic`` of them kept,
if set), and the first ``test_fraction`` of them form that topic's held-out
share. Tenants own topics (:func:`topic_owners`): with fewer tenants than
topics, tenant ``i`` owns topics ``i, i + T, i + 2T, ...``; with more, topic
``j`` is shared by tenants ``j, j + n, ...`` who split its training windows.
The split is non-IID by construction: a tenant sees only its topics'
vocabulary. Role ``test`` is the held-out windows of *every* topic, so the
global tier measures the model on everyone's text.
"""

from __future__ import annotations

import ast
import functools
import sysconfig
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# Topic -> standard-library modules (a package or a module file). Only modules
# found in every CPython from 3.10 to 3.13 are named, except tomllib (3.11+).
TOPICS: dict[str, tuple[str, ...]] = {
    "email": ("email", "mailbox", "smtplib", "imaplib", "poplib", "mimetypes"),
    "web": ("http", "urllib", "wsgiref", "xmlrpc", "html", "webbrowser"),
    "asyncio": ("asyncio", "concurrent", "selectors", "socketserver"),
    "xml": ("xml",),
    "testing": ("unittest", "doctest", "pdb", "bdb", "trace", "timeit"),
    "logging": ("logging", "warnings", "traceback"),
    "imports": ("importlib", "pkgutil", "zipimport", "runpy", "modulefinder", "sysconfig"),
    "data": ("json", "csv", "pickle", "shelve", "configparser", "tomllib", "plistlib"),
}
KINDS = ("docstrings", "source")
# Folders of test suites inside stdlib packages: not part of a topic's text.
_TEST_DIRS = {"test", "tests", "idle_test"}
# Separate random streams (numpy SeedSequence entropy [seed, purpose, ...]).
_SPLIT = 1


class ByteTokenizer:
    """UTF-8 bytes as token ids: a 256-token vocabulary that encodes any text."""

    vocab_size = 256

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int64)

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _module_files(root: Path, module: str) -> list[Path]:
    package = root / module
    if package.is_dir():
        return [
            path
            for path in sorted(package.rglob("*.py"))
            if not _TEST_DIRS & set(path.relative_to(package).parts[:-1])
        ]
    single = root / f"{module}.py"
    return [single] if single.is_file() else []


def _docstrings(source: str) -> list[str]:
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return []
    nodes = [
        node
        for node in ast.walk(tree)
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)
    ]
    nodes.sort(key=lambda node: getattr(node, "lineno", 0))
    return [doc for node in nodes if (doc := ast.get_docstring(node))]


@functools.lru_cache(maxsize=64)
def topic_text(topic: str, kind: str = "docstrings") -> str:
    """The text of one topic (see the module docstring)."""
    if topic not in TOPICS:
        raise ValueError(f"unknown topic {topic!r}; topics are {', '.join(TOPICS)}")
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; kinds are {', '.join(KINDS)}")
    root = stdlib_root()
    parts: list[str] = []
    for module in TOPICS[topic]:
        for path in _module_files(root, module):
            source = path.read_text(encoding="utf-8", errors="replace")
            parts.extend(_docstrings(source) if kind == "docstrings" else [source])
    if not parts:
        raise ValueError(f"topic {topic!r}: no {kind} found under {root}")
    return "\n\n".join(parts)


def windows(tokens: np.ndarray, seq_len: int) -> np.ndarray:
    """Non-overlapping windows of ``seq_len + 1`` tokens, one per row."""
    if seq_len < 1:
        raise ValueError("seq_len must be at least 1")
    if len(tokens) < seq_len + 1:
        return np.zeros((0, seq_len + 1), dtype=np.int64)
    view = np.lib.stride_tricks.sliding_window_view(tokens, seq_len + 1)
    return np.array(view[::seq_len], dtype=np.int64)


def topic_owners(topics: int, tenants: int) -> list[list[int]]:
    """For each topic, the tenants that own it (every tenant owns at least one topic)."""
    if topics < 1 or tenants < 1:
        raise ValueError("topic_owners: need at least one topic and one tenant")
    owners: list[list[int]] = [[] for _ in range(topics)]
    for k in range(max(topics, tenants)):
        if k % tenants not in owners[k % topics]:
            owners[k % topics].append(k % tenants)
    return owners


@dataclass(frozen=True)
class TopicSplit:
    """One topic's windows: training rows and held-out rows (``seq_len + 1`` tokens each)."""

    topic: str
    train: np.ndarray
    test: np.ndarray


def split_topic(
    topic: str,
    index: int,
    seq_len: int,
    seed: int,
    test_fraction: float,
    windows_per_topic: int | None = None,
    kind: str = "docstrings",
) -> TopicSplit:
    """One topic's byte windows, shuffled with the seed, ``test_fraction`` held out."""
    rows = windows(ByteTokenizer().encode(topic_text(topic, kind)), seq_len)
    return split_rows(topic, rows, index, seed, test_fraction, windows_per_topic)


def split_rows(
    topic: str,
    rows: np.ndarray,
    index: int,
    seed: int,
    test_fraction: float,
    windows_per_topic: int | None = None,
) -> TopicSplit:
    """Shuffle topic number ``index``'s windows and hold out ``test_fraction`` of them."""
    order = np.random.default_rng([seed, _SPLIT, index]).permutation(len(rows))
    if windows_per_topic is not None:
        order = order[:windows_per_topic]
    if len(order) < 2:
        raise ValueError(f"topic {topic!r} has fewer than 2 windows of {rows.shape[1]} tokens")
    held = min(len(order) - 1, max(1, round(test_fraction * len(order))))
    return TopicSplit(topic, rows[np.sort(order[held:])], rows[np.sort(order[:held])])


def tenant_rows(splits: Sequence[TopicSplit], tenant: int, tenants: int) -> np.ndarray:
    """The training windows of one tenant: its share of each topic it owns."""
    owners = topic_owners(len(splits), tenants)
    mine = [
        np.array_split(split.train, len(owners[j]))[owners[j].index(tenant)]
        for j, split in enumerate(splits)
        if tenant in owners[j]
    ]
    return np.concatenate(mine)


def tenant_topics(topics: Sequence[str], tenant: int, tenants: int) -> list[str]:
    """The names of the topics a tenant owns."""
    owners = topic_owners(len(topics), tenants)
    return [topic for j, topic in enumerate(topics) if tenant in owners[j]]
