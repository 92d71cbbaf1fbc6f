"""What the global tier sends down and accepts up: the model's bytes, a region's partial."""

from __future__ import annotations

import numpy as np
import pytest

from fedkube.aggregator.global_aggregator.wire import decode_partial, encode_model
from fedkube.aggregator.validation import template_of
from fedkube.errors import UpdateRejected
from fedkube.spec import WireCompression
from fedkube.wire import codec
from fedkube.wire.protocol import M_JOB, M_KIND, M_VERSION

MODEL = {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.ones(3, np.float32)}


def partial_body(**metadata: str) -> bytes:
    values = {
        "fedkube.job": "job",
        "fedkube.round": "2",
        "fedkube.region": "eu",
        "fedkube.kind": "partial",
        "fedkube.weight": "30",
        "fedkube.count": "3",
        "fedkube.weighted_steps": "60",
    }
    values.update(metadata)
    return codec.encode(MODEL, {k: v for k, v in values.items() if v != "-"})


def test_the_model_is_encoded_with_its_job_version_and_kind():
    data = encode_model("job", 4, MODEL, WireCompression(), seed=7)
    tensors, metadata = codec.decode(data)
    assert (metadata[M_JOB], metadata[M_VERSION], metadata[M_KIND]) == ("job", "4", "model")
    assert all(np.array_equal(tensors[k], MODEL[k]) for k in MODEL)


def test_encoding_a_version_twice_gives_the_same_bytes():
    assert encode_model("job", 2, MODEL, WireCompression(), 7) == encode_model(
        "job", 2, MODEL, WireCompression(), 7
    )


def test_a_partial_decodes_with_its_weight_count_and_steps():
    partial = decode_partial(partial_body(), "job", 2, "eu", template_of(MODEL))
    assert (partial.region, partial.weight, partial.count, partial.steps) == ("eu", 30.0, 3, 60.0)


@pytest.mark.parametrize(
    ("metadata", "reason"),
    [
        ({"fedkube.round": "3"}, "metadata_mismatch"),
        ({"fedkube.count": "-"}, "bad_weight"),
        ({"fedkube.weight": "0"}, "bad_weight"),
        ({"fedkube.weighted_steps": "10"}, "bad_steps"),
    ],
)
def test_a_partial_that_disagrees_with_itself_or_its_request_is_refused(metadata, reason):
    with pytest.raises(UpdateRejected) as refused:
        decode_partial(partial_body(**metadata), "job", 2, "eu", template_of(MODEL))
    assert refused.value.reason == reason


def test_bytes_that_are_no_payload_are_refused_as_malformed():
    with pytest.raises(UpdateRejected) as refused:
        decode_partial(b"not a payload", "job", 2, "eu", template_of(MODEL))
    assert refused.value.reason == "malformed"
