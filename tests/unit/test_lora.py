"""Federated LoRA: only adapters travel, the LM fits the training loop, export merges."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from fedkube import classifier
from fedkube.cli import main
from fedkube.datasets import ArrayData, DataContext
from fedkube.examples import corpus, lm
from fedkube.spec import FederatedJob, parse_job
from fedkube.state import checkpoint
from fedkube.task import Role, TaskContext, load_task
from fedkube.tools.export import ExportError, export_merged, merge
from fedkube.training.learning import (
    build_model,
    data_context,
    float_state,
    is_adapted,
    load_data,
    load_float_state,
    train_local,
)
from fedkube.wire import codec

# Small enough to build in a fraction of a second, wide enough that rank-4
# adapters on c_attn are about 200 times smaller than the model.
MODEL_KWARGS = {"context": 32, "width": 256, "layers": 2, "heads": 4}
DATA_KWARGS = {"seq_len": 16, "windows_per_topic": 40}
LORA = {"rank": 4, "alpha": 8.0}


def evaluate(job: FederatedJob, model: torch.nn.Module, data: Any) -> tuple[float, float]:
    """(loss, accuracy) of the built-in classifier task on ``data``."""
    metrics = classifier.Classifier().evaluate(model, data, TaskContext(job, "test")).metrics
    return metrics["loss"], metrics["accuracy"]


def lora_job_dict(peft: dict[str, Any] | None = LORA, tenants: int = 4, **spec: Any) -> dict:
    names = [f"t{i}" for i in range(tenants)]
    document: dict[str, Any] = {
        "apiVersion": "fedkube.io/v1alpha1",
        "kind": "FederatedJob",
        "metadata": {"name": "lora"},
        "spec": {
            "rounds": 2,
            "seed": 3,
            "model": {"entrypoint": "fedkube.examples.lm:make_model", "kwargs": MODEL_KWARGS},
            "data": {"entrypoint": "fedkube.examples.lm:make_data", "kwargs": DATA_KWARGS},
            "regions": [{"name": "eu"}, {"name": "us"}],
            "tenants": [
                {"name": name, "region": "eu" if i % 2 == 0 else "us"}
                for i, name in enumerate(names)
            ],
            "training": {"batchSize": 8, "optimizer": "adam", "learningRate": 0.01},
        },
    }
    if peft is not None:
        document["spec"]["training"]["peft"] = copy.deepcopy(peft)
    document["spec"].update(spec)
    return document


def lora_job(**overrides: Any) -> FederatedJob:
    return parse_job(lora_job_dict(**overrides))


@pytest.fixture(scope="module")
def adapted_job() -> FederatedJob:
    return lora_job()


def frozen_base(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters() if not p.requires_grad}


def randomise_adapters(model: torch.nn.Module, seed: int = 0) -> dict[str, np.ndarray]:
    """Non-zero adapters (B starts at zero, which would make merging trivially exact)."""
    rng = np.random.default_rng(seed)
    adapters = {
        name: rng.normal(0.0, 0.05, array.shape).astype(np.float32)
        for name, array in float_state(model).items()
    }
    load_float_state(model, adapters)
    return adapters


# -- what travels ------------------------------------------------------------


def test_with_peft_only_the_adapter_tensors_are_in_the_float_state(adapted_job):
    model = build_model(adapted_job)

    state = float_state(model)

    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert is_adapted(model)
    assert set(state) == trainable
    assert state and all(".lora_A." in name or ".lora_B." in name for name in state)
    # one A and one B per adapted module (GPT-2's c_attn in each of the 2 blocks)
    assert len(state) == 2 * MODEL_KWARGS["layers"]


def test_the_adapters_on_the_wire_are_over_100_times_smaller_than_the_whole_model(adapted_job):
    full_job = lora_job(peft=None)

    adapters = codec.encode(float_state(build_model(adapted_job)), {})
    whole = codec.encode(float_state(build_model(full_job)), {})

    assert len(whole) >= 100 * len(adapters), (len(whole), len(adapters))


def test_without_peft_the_whole_floating_point_state_travels_as_before():
    job = lora_job(peft=None)
    model = build_model(job)

    state = float_state(model)

    assert not is_adapted(model)
    assert set(state) == {n for n, t in model.state_dict().items() if t.is_floating_point()}


def test_every_tier_builds_the_same_frozen_base_and_the_same_initial_adapters(adapted_job):
    first, second = build_model(adapted_job), build_model(adapted_job)

    bases = frozen_base(first), frozen_base(second)
    adapters = float_state(first), float_state(second)

    assert bases[0].keys() == bases[1].keys()
    assert all(torch.equal(bases[0][name], bases[1][name]) for name in bases[0])
    assert all(np.array_equal(adapters[0][name], adapters[1][name]) for name in adapters[0])


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_local_training_changes_the_adapters_and_leaves_the_base_alone(optimizer):
    document = lora_job_dict()
    document["spec"]["training"]["optimizer"] = optimizer
    job = parse_job(document)
    model = build_model(job)
    client = job.clients()[0]
    data = load_data(job, "train", client)
    base_before, adapters_before = frozen_base(model), float_state(model)

    one_epoch = job.spec.training.model_copy(update={"epochs": 1})
    ctx = TaskContext(job, "train", seed=1, training_override=one_epoch)
    result = train_local(load_task(job), model, data, ctx)

    base_after, adapters_after = frozen_base(model), float_state(model)
    assert result.steps > 0 and np.isfinite(result.loss)
    assert all(torch.equal(base_before[name], base_after[name]) for name in base_before)
    for name, before in adapters_before.items():
        assert not np.array_equal(before, adapters_after[name]), name


def test_loading_a_float_state_into_a_fresh_model_reproduces_its_outputs(adapted_job):
    trained = build_model(adapted_job)
    randomise_adapters(trained, seed=4)
    fresh = build_model(adapted_job)
    x = torch.randint(0, 256, (3, DATA_KWARGS["seq_len"])).float()

    load_float_state(fresh, float_state(trained))

    trained.eval()
    fresh.eval()
    assert torch.equal(trained(x), fresh(x))


# -- the language model in the classification interface -----------------------


def test_the_lm_returns_logits_in_the_layout_cross_entropy_takes_for_token_targets(adapted_job):
    model = build_model(adapted_job)
    data = load_data(adapted_job, "test")
    batch = torch.as_tensor(data.x[:5], dtype=torch.float32)

    logits = model(batch)

    assert data.x.shape == data.y.shape and data.x.shape[1] == DATA_KWARGS["seq_len"]
    assert logits.shape == (5, corpus.ByteTokenizer.vocab_size, DATA_KWARGS["seq_len"])
    # y is x shifted by one token: the next token at every position
    assert np.array_equal(data.x[:, 1:], data.y[:, :-1])


def test_an_untrained_lm_is_about_as_perplexed_as_a_uniform_guess_over_bytes(adapted_job):
    model = build_model(adapted_job)

    loss, accuracy = evaluate(adapted_job, model, load_data(adapted_job, "test"))

    assert 100 < lm.perplexity(loss) < 1000
    assert 0 <= accuracy < 0.2


def test_evaluation_in_slices_gives_the_loss_of_one_pass(adapted_job, monkeypatch):
    model = build_model(adapted_job)
    randomise_adapters(model)
    data = load_data(adapted_job, "test")
    whole = evaluate(adapted_job, model, data)

    monkeypatch.setattr(classifier, "EVAL_TARGETS", 3 * DATA_KWARGS["seq_len"])
    sliced = evaluate(adapted_job, model, data)

    assert sliced[0] == pytest.approx(whole[0], rel=1e-5)
    assert sliced[1] == pytest.approx(whole[1], abs=1e-9)


# -- tokenizer and corpus --------------------------------------------------------


def test_the_byte_tokenizer_round_trips_any_text():
    tokenizer = corpus.ByteTokenizer()
    text = "def f(x):\n    return x  # ünïcødé ✓"

    ids = tokenizer.encode(text)

    assert ids.dtype == np.int64 and ids.max() < tokenizer.vocab_size
    assert tokenizer.decode(ids) == text


def test_every_topic_has_text_from_the_standard_library():
    for topic in corpus.TOPICS:
        assert len(corpus.topic_text(topic)) > 10_000, topic
    assert "MIME" in corpus.topic_text("email") and "coroutine" in corpus.topic_text("asyncio")


def test_the_split_is_the_same_for_the_same_seed_and_differs_for_another(adapted_job):
    client = adapted_job.clients()[1]
    other_seed = parse_job(lora_job_dict(seed=4))

    first = load_data(adapted_job, "train", client)
    again = load_data(adapted_job, "train", client)
    reseeded = load_data(other_seed, "train", other_seed.clients()[1])

    assert np.array_equal(first.x, again.x) and np.array_equal(first.y, again.y)
    assert not np.array_equal(first.x, reseeded.x)


def test_each_tenant_trains_on_its_own_topics_only_and_no_held_out_window_is_trained_on(
    adapted_job,
):
    topics = list(corpus.TOPICS)
    splits = lm.topic_splits(load_context(adapted_job, "test"), **DATA_KWARGS)
    rows_of = {s.topic: {r.tobytes() for r in s.train} for s in splits}
    held_out = {r.tobytes() for s in splits for r in s.test}

    owned = [corpus.tenant_topics(topics, i, 4) for i in range(4)]
    trained = [windows_of(load_data(adapted_job, "train", c)) for c in adapted_job.clients()]

    assert owned == [
        ["email", "testing"],
        ["web", "logging"],
        ["asyncio", "imports"],
        ["xml", "data"],
    ]
    for mine, rows in zip(owned, trained, strict=True):
        assert rows == set().union(*(rows_of[t] for t in mine))
        assert not rows & held_out


def test_the_held_out_split_draws_from_every_tenants_topics(adapted_job):
    splits = lm.topic_splits(load_context(adapted_job, "test"), **DATA_KWARGS)

    test = windows_of(load_data(adapted_job, "test"))

    for split in splits:
        assert len(split.test) > 0
        assert {r.tobytes() for r in split.test} <= test
    pooled = windows_of(load_data(adapted_job, "pooled"))
    assert not pooled & test


def test_the_split_is_non_iid_each_tenant_sees_words_the_others_hardly_do():
    document = lora_job_dict()
    document["spec"]["data"]["kwargs"] = {"seq_len": 64, "windows_per_topic": None}
    job = parse_job(document)
    texts = [
        corpus.ByteTokenizer().decode(load_data(job, "train", c).x.reshape(-1))
        for c in job.clients()
    ]

    # tenant 2 owns asyncio, tenant 1 logging, tenant 3 data (json)
    for word, owner in [("coroutine", 2), ("logger", 1), ("JSON", 3)]:
        counts = [text.count(word) for text in texts]
        others = max(c for i, c in enumerate(counts) if i != owner)
        assert counts[owner] > 5 * max(others, 1), (word, counts)


def test_more_tenants_than_topics_share_a_topics_windows_between_them():
    owners = corpus.topic_owners(topics=3, tenants=7)

    assert owners == [[0, 3, 6], [1, 4], [2, 5]]
    assert corpus.topic_owners(topics=8, tenants=3)[:3] == [[0], [1], [2]]


def test_a_tenants_replicas_split_its_windows_without_overlap():
    document = lora_job_dict(tenants=2)
    document["spec"]["tenants"][0]["replicas"] = 2
    job = parse_job(document)
    whole = parse_job(lora_job_dict(tenants=2))

    a, b = (windows_of(load_data(job, "train", c)) for c in job.clients() if c.tenant == "t0")

    assert a and b and not a & b
    assert a | b == windows_of(load_data(whole, "train", whole.clients()[0]))


# -- export -----------------------------------------------------------------------


def saved_checkpoint(job: FederatedJob, directory: Path) -> torch.nn.Module:
    """A trained-looking adapted model, checkpointed as the global aggregator would."""
    model = build_model(job)
    adapters = randomise_adapters(model, seed=9)
    checkpoint.save(directory, job.name, 2, adapters, {"loss": 1.0})
    return model


def test_export_merges_the_adapters_so_the_merged_model_computes_what_the_adapted_one_did(
    adapted_job, tmp_path
):
    adapted = saved_checkpoint(adapted_job, tmp_path / "checkpoints")
    out = tmp_path / "merged.safetensors"

    done = export_merged(adapted_job, tmp_path / "checkpoints", out)

    tensors, metadata = codec.decode(out.read_bytes())
    base = lm.make_model(**MODEL_KWARGS)
    load_float_state(base, dict(tensors))
    x = torch.randint(0, 256, (4, DATA_KWARGS["seq_len"])).float()
    adapted.eval()
    base.eval()
    with torch.no_grad():
        assert torch.allclose(base(x), adapted(x), atol=1e-4)
        # and the merge did something: the base alone computes otherwise
        assert not torch.allclose(build_model(lora_job(peft=None))(x), adapted(x), atol=1e-3)
    assert done.round == 2 and metadata["fedkube.round"] == "2"
    assert metadata["fedkube.kind"] == "merged-model" and metadata["fedkube.job"] == "lora"
    assert not any("lora" in name for name in tensors)
    assert set(tensors) == set(float_state(lm.make_model(**MODEL_KWARGS)))


def test_export_refuses_a_job_without_peft_and_says_why(tmp_path):
    job = lora_job(peft=None)

    with pytest.raises(ExportError, match=r"no spec\.training\.peft"):
        export_merged(job, tmp_path, tmp_path / "out.safetensors")


def test_export_refuses_adapters_of_another_shape_naming_them(adapted_job):
    other = build_model(lora_job(peft={"rank": 2}))

    with pytest.raises(ExportError, match=r"shape \(2, 256\) in the checkpoint but \(4, 256\)"):
        merge(adapted_job, float_state(other))


def test_export_without_a_checkpoint_says_none_was_found(adapted_job, tmp_path):
    with pytest.raises(ExportError, match="no checkpoint of job 'lora'"):
        export_merged(adapted_job, tmp_path / "empty", tmp_path / "out.safetensors")


def test_fedkube_export_writes_the_merged_model_and_refuses_a_full_model_job(
    adapted_job, tmp_path, capsys
):
    import yaml

    saved_checkpoint(adapted_job, tmp_path / "checkpoints")
    manifest = tmp_path / "lora.yaml"
    manifest.write_text(yaml.safe_dump(lora_job_dict()))
    plain = tmp_path / "plain.yaml"
    plain.write_text(yaml.safe_dump(lora_job_dict(peft=None)))
    out = tmp_path / "merged.safetensors"

    code = main(
        [
            "export",
            str(manifest),
            "--checkpoint-dir",
            str(tmp_path / "checkpoints"),
            "--out",
            str(out),
        ]
    )
    refused = main(
        [
            "export",
            str(plain),
            "--checkpoint-dir",
            str(tmp_path / "checkpoints"),
            "--out",
            str(tmp_path / "plain.safetensors"),
        ]
    )

    printed = capsys.readouterr()
    assert code == 0 and out.exists() and "merged into the base" in printed.out
    assert refused == 2 and "no spec.training.peft" in printed.err
    assert not (tmp_path / "plain.safetensors").exists()


# -- helpers -------------------------------------------------------------------------


def load_context(job: FederatedJob, role: Role) -> DataContext:
    return data_context(job, role, None)


def windows_of(data: ArrayData) -> set[bytes]:
    """Each (x, y) row as the window of seq_len + 1 tokens it came from."""
    rows = np.concatenate([data.x, data.y[:, -1:]], axis=1)
    return {row.tobytes() for row in rows}


def test_a_pretrained_model_named_by_a_local_path_is_loaded_with_its_weights(tmp_path):
    torch.manual_seed(0)
    saved = lm.make_model(**MODEL_KWARGS)
    saved.lm.save_pretrained(tmp_path / "tiny-gpt2")

    loaded = lm.make_model(pretrained=str(tmp_path / "tiny-gpt2"), local_files_only=True)

    x = torch.randint(0, 256, (2, 8)).float()
    saved.eval()
    loaded.eval()
    with torch.no_grad():
        assert torch.equal(saved(x), loaded(x))
