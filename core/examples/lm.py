"""A small causal language model on the standard library's text, split by topic.

The model. :func:`make_model` builds a GPT-2-architecture transformer from a
``transformers`` config (by default about 3.3 M parameters, 256 byte tokens),
initialised from the job's seed, so nothing is downloaded and every tier
builds the same frozen base. With ``pretrained`` (a model name or a local
path) it loads that model with ``AutoModelForCausalLM.from_pretrained``
instead: the same job then fine-tunes a real pretrained model, whose
tokenizer ``make_data``'s ``tokenizer`` must name.

How an LM fits fedkube's classification interface. Training and evaluation
(``fedkube.training.learning``) compute ``cross_entropy(model(x), y)`` over a batch of
rows. Here a row of ``x`` is ``seq_len`` token ids and the same row of ``y``
is the next token at each position; :class:`CausalLM` returns the logits as
``(batch, vocab, seq_len)``, the layout ``cross_entropy`` takes for a target
of shape ``(batch, seq_len)``. The loss is then the mean next-token
cross-entropy (perplexity is ``exp(loss)``) and the "accuracy" is next-token
accuracy, with no change to the worker, combiner or aggregator.

With ``spec.training.peft`` set, ``fedkube.training.learning.build_model`` wraps this
model with LoRA adapters (peft); only the adapters train and travel.

The data. :func:`make_data` follows the DataContext protocol of the other
examples over the corpus of :mod:`fedkube.examples.corpus`: role ``train``
is one client's windows (its tenant's topics, divided across the tenant's
replicas), ``test`` the held-out windows of every topic, ``pooled`` every
topic's training windows.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from fedkube.datasets import ArrayData, DataContext
from fedkube.examples import corpus
from fedkube.training import partition

SPLITS = ("topic", "partition")


class CausalLM(nn.Module):
    """A causal LM whose forward takes token ids and returns ``(batch, vocab, seq)`` logits.

    ``x`` may arrive as floats (fedkube's training loop hands every model
    float32 features): ids are exact in float32 up to 2**24.
    """

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm = lm
        # peft reads model.config (model_type) for its default target modules.
        self.config = lm.config

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.lm(input_ids=x.long()).logits
        return logits.transpose(1, 2)


def make_model(
    pretrained: str | None = None,
    vocab_size: int = corpus.ByteTokenizer.vocab_size,
    context: int = 128,
    width: int = 256,
    layers: int = 4,
    heads: int = 4,
    dropout: float = 0.0,
    **pretrained_kwargs: Any,
) -> nn.Module:
    """A GPT-2-architecture causal LM, or the ``pretrained`` model (name or path).

    Without ``pretrained``: ``width``-dimensional, ``layers`` blocks of
    ``heads`` heads, ``context`` positions, randomly initialised (the caller
    seeds torch). ``pretrained_kwargs`` go to ``from_pretrained`` (e.g.
    ``revision``, ``local_files_only``).
    """
    from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

    if pretrained is not None:
        kwargs = {"dtype": torch.float32, **pretrained_kwargs}
        return CausalLM(AutoModelForCausalLM.from_pretrained(pretrained, **kwargs))
    if pretrained_kwargs:
        raise TypeError(
            f"make_model: {', '.join(sorted(pretrained_kwargs))} only apply with `pretrained`"
        )
    config = GPT2Config(
        vocab_size=vocab_size,
        n_positions=context,
        n_embd=width,
        n_layer=layers,
        n_head=heads,
        resid_pdrop=dropout,
        embd_pdrop=dropout,
        attn_pdrop=dropout,
        bos_token_id=None,
        eos_token_id=None,
    )
    return CausalLM(GPT2LMHeadModel(config))


def _tokenizer_ids(name: str, text: str) -> np.ndarray:
    """Token ids of ``text`` under a pretrained tokenizer (a name or a path)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(name)
    return np.asarray(tokenizer(text)["input_ids"], dtype=np.int64)


def topic_splits(
    context: DataContext,
    topics: list[str] | None = None,
    seq_len: int = 64,
    windows_per_topic: int | None = 320,
    kind: str = "docstrings",
    tokenizer: str | None = None,
) -> list[corpus.TopicSplit]:
    """Every topic's training and held-out windows, derived from the job's seed."""
    names = list(topics) if topics is not None else list(corpus.TOPICS)
    if not names:
        raise ValueError("make_data: topics must name at least one topic")
    if tokenizer is None:
        return [
            corpus.split_topic(
                name, index, seq_len, context.seed, context.test_fraction, windows_per_topic, kind
            )
            for index, name in enumerate(names)
        ]
    splits = []
    for index, name in enumerate(names):
        rows = corpus.windows(_tokenizer_ids(tokenizer, corpus.topic_text(name, kind)), seq_len)
        splits.append(
            corpus.split_rows(
                name, rows, index, context.seed, context.test_fraction, windows_per_topic
            )
        )
    return splits


def make_data(
    context: DataContext,
    topics: list[str] | None = None,
    seq_len: int = 64,
    windows_per_topic: int | None = 320,
    kind: str = "docstrings",
    split: str = "topic",
    tokenizer: str | None = None,
) -> ArrayData:
    """Input windows ``x`` and next-token targets ``y``, both ``(rows, seq_len)`` int64.

    ``topics``: which of :data:`corpus.TOPICS` (default all, in that order);
    ``kind``: ``docstrings`` or ``source``; ``windows_per_topic``: windows
    kept per topic before the held-out share is cut (None: all of them).
    ``split``: ``topic`` gives each tenant its own topics (non-IID, the
    default); ``partition`` follows ``spec.data.partition`` instead (``iid``,
    or Dirichlet(α) over topics as labels). ``tokenizer``: a pretrained
    tokenizer (name or path) instead of bytes, for a ``pretrained`` model.
    """
    if split not in SPLITS:
        raise ValueError(f"make_data: split must be one of {', '.join(SPLITS)}, got {split!r}")
    splits = topic_splits(context, topics, seq_len, windows_per_topic, kind, tokenizer)
    if context.role == "test":
        return _xy(np.concatenate([s.test for s in splits]))
    train = [s.train for s in splits]
    if context.role == "pooled":
        return _xy(np.concatenate(train))
    client = context.client
    if client is None:
        raise ValueError("role 'train' needs a client")
    if split == "topic":
        own = corpus.tenant_rows(splits, client.tenant_index, client.num_tenants)
    else:
        rows = np.concatenate(train)
        labels = np.concatenate([np.full(len(t), j) for j, t in enumerate(train)])
        if context.partition_scheme == "dirichlet":
            parts = partition.dirichlet(labels, client.num_tenants, context.alpha, context.seed)
        else:
            parts = partition.iid(len(rows), client.num_tenants, context.seed)
        own = rows[parts[client.tenant_index]]
    mine = partition.split_replicas(np.arange(len(own)), client.replicas, client.replica)
    return _xy(own[mine])


def _xy(rows: np.ndarray) -> ArrayData:
    return ArrayData(np.ascontiguousarray(rows[:, :-1]), np.ascontiguousarray(rows[:, 1:]))


def perplexity(loss: float) -> float:
    """``exp`` of a mean next-token cross-entropy (in nats)."""
    return float(np.exp(loss))
