"""Plain data between processes (drpo_trainer/runtime/wire.py): a RolloutBatch survives the wire and a
checkpoint bit for bit, and anything that is not a message of ours (a pickle, a wrong type or shape)
is refused with a message before it is used."""

from __future__ import annotations

import math
import os
import pickle
import struct

import pytest
import torch

from drpo_trainer.rollout.base import Completion
from drpo_trainer.rollout.producer import RolloutBatch
from drpo_trainer.runtime.wire import (
    MAGIC,
    WireError,
    batch_from_plain,
    batch_to_plain,
    completions_from_plain,
    completions_to_plain,
    decode,
    encode,
)

NEG_NAN = struct.unpack("<d", bytes.fromhex("000000000000f8ff"))[0]  # x86's default NaN: sign bit set
ODD_NAN = struct.unpack("<d", bytes.fromhex("0100000000f0ff7f"))[0]  # a signalling NaN with a payload


def bits(x: float) -> bytes:
    return struct.pack("<d", x)


def _batch() -> RolloutBatch:
    comps = [
        Completion(0, [5, 6, 7], [8, 9, 2], [-0.25, -1e-300, -math.inf], "stop", "a \\boxed{5}"),
        Completion(0, [5, 6, 7], [], [], "length", ""),
        Completion(1, [10], [11, 12], [NEG_NAN, -0.0], "length", 'é"\\n$t'),
        Completion(1, [10], [2**40], [0.1 + 0.2], "stop", "{}"),
    ]
    return RolloutBatch(
        step=7,
        version=5,
        learner_rank=1,
        indices=[31, 4],
        completions=comps,
        rewards=[1.0, 0.0, 0.5, ODD_NAN],
        reward_metrics={"reward/mean": 0.375, "$t": 2.0},
        advantages=[1.2247448713915887, -math.inf, 5e-324, -0.0],
        adv_metrics={"adv/std": torch.tensor(0.8164966, dtype=torch.float32), "adv/zero_std": 0.25},
        sampler_after=(1, 12),
        seconds={"generate": 0.123, "score": 4.5e-05, "rollout_idle": 0.0},
    )


def _same(a: RolloutBatch, b: RolloutBatch) -> None:
    """Field by field; every float compared by its 8 bytes (nan == nan, -0.0 != 0.0)."""
    assert (a.step, a.version, a.learner_rank, a.indices, a.sampler_after) == (
        b.step,
        b.version,
        b.learner_rank,
        b.indices,
        b.sampler_after,
    )
    assert type(b.sampler_after) is tuple
    for name in ("rewards", "advantages"):
        assert [bits(x) for x in getattr(a, name)] == [bits(x) for x in getattr(b, name)], name
    for name in ("reward_metrics", "adv_metrics", "seconds"):
        x, y = getattr(a, name), getattr(b, name)
        assert list(x) == list(y), name
        for k in x:
            if isinstance(x[k], torch.Tensor):  # group_advantages' statistics are 0-d float32 tensors
                assert y[k].dtype == x[k].dtype and y[k].shape == () and bits(y[k].item()) == bits(x[k].item())
            else:
                assert type(y[k]) is type(x[k]) and bits(y[k]) == bits(x[k]), (name, k)
    assert len(a.completions) == len(b.completions)
    for x, y in zip(a.completions, b.completions):
        assert (x.prompt_index, x.prompt_ids, x.completion_ids, x.finish_reason, x.text) == (
            y.prompt_index,
            y.prompt_ids,
            y.completion_ids,
            y.finish_reason,
            y.text,
        )
        assert [bits(v) for v in x.rollout_logprobs] == [bits(v) for v in y.rollout_logprobs]
        assert all(type(t) is int for t in y.completion_ids) and all(type(v) is float for v in y.rollout_logprobs)


def test_a_batch_crosses_the_wire_bit_for_bit():
    batch = _batch()
    _same(batch, batch_from_plain(decode(encode(batch_to_plain(batch)))))
    # the message format the bridge sends: (kind, step, payload); tuples arrive as lists
    kind, step, payload = decode(encode(("batch", 7, batch_to_plain(batch))))
    assert (kind, step) == ("batch", 7)
    _same(batch, batch_from_plain(payload))


def test_a_batch_kept_by_a_checkpoint_loads_weights_only(tmp_path):
    """checkpoint_state's plain form is what torch.load(weights_only=True) accepts."""
    batch = _batch()
    torch.save({"batches_ahead": [batch_to_plain(batch)]}, tmp_path / "state.pt")
    loaded = torch.load(tmp_path / "state.pt", weights_only=True)
    _same(batch, batch_from_plain(loaded["batches_ahead"][0]))
    # the object itself is refused by a weights-only load: that is why the plain form exists
    torch.save({"batches_ahead": [batch]}, tmp_path / "object.pt")
    with pytest.raises(Exception, match="RolloutBatch"):
        torch.load(tmp_path / "object.pt", weights_only=True)
    old = torch.load(tmp_path / "object.pt", weights_only=False)["batches_ahead"][0]  # the previous format
    with pytest.raises(WireError, match="expected a dict"):  # only plain data becomes a batch
        batch_from_plain(old)


def test_plain_values_round_trip_with_their_types():
    t = torch.arange(6, dtype=torch.bfloat16).reshape(2, 3)
    value = {
        "none": None,
        "flags": [True, False],
        "big": 2**62,
        "floats": [1.0, -0.0, 1e-310, math.inf],
        "$tag-like": {"$t": "not a tensor", "$$f": 1},
        "tensors": [t, torch.zeros(0, 4, dtype=torch.int32), torch.tensor(3.5, dtype=torch.float64)],
        "header": ("version", 3),
    }
    out = decode(encode(value))
    assert out["none"] is None and out["flags"] == [True, False] and out["big"] == 2**62
    assert [bits(x) for x in out["floats"]] == [bits(x) for x in value["floats"]]
    assert out["$tag-like"] == {"$t": "not a tensor", "$$f": 1}
    assert out["header"] == ["version", 3]
    got = out["tensors"]
    assert got[0].dtype == torch.bfloat16 and torch.equal(got[0], t)
    assert got[1].shape == (0, 4) and got[1].dtype == torch.int32
    assert got[2].shape == () and got[2].item() == 3.5


def test_encode_refuses_what_is_not_plain_data():
    with pytest.raises(WireError, match="Completion is not plain data"):
        encode({"c": _batch().completions[0]})
    with pytest.raises(WireError, match="dict keys must be str"):
        encode({1: 2})
    with pytest.raises(WireError, match="complex64"):
        encode(torch.zeros(2, dtype=torch.complex64))


class _WritesMarker:
    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def test_a_pickle_sent_as_a_message_is_refused_and_never_run(tmp_path):
    marker = tmp_path / "ran"
    payload = pickle.dumps(("batch", 3, _WritesMarker(str(marker))))
    with pytest.raises(WireError, match="malformed message from rollout process 0: does not start with b'DRPOMSG1'"):
        decode(payload, "message from rollout process 0")
    # a pickle behind our magic bytes is still only JSON to the decoder
    disguised = MAGIC + struct.pack("<Q", len(payload)) + payload
    with pytest.raises(WireError, match="header is not JSON"):
        decode(disguised)
    assert not marker.exists()
    pickle.loads(payload)  # the same bytes, unpickled, would have run the command: the probe is real
    assert marker.exists()


def _frame(header: dict, tail: bytes = b"") -> bytes:
    h = __import__("json").dumps(header).encode()
    return MAGIC + struct.pack("<Q", len(h)) + h + tail


@pytest.mark.parametrize(
    "data, problem",
    [
        (b"DRPO", "does not start with"),
        (MAGIC + struct.pack("<Q", 999) + b"{}", "header of 999 bytes is longer than the 2 bytes that follow"),
        (_frame({"value": 1}), 'header is not {"tensors": [...], "value": ...}'),
        (
            _frame({"tensors": [["float32", [2], 8]], "value": {"$t": 0}}, b"1234"),
            "tensor 0: 8 bytes announced, 4 left",
        ),
        (_frame({"tensors": [["float32", [2], 4]], "value": None}, b"1234"), "4 bytes do not hold a float32 tensor"),
        (_frame({"tensors": [["object", [1], 8]], "value": None}, b"12345678"), "unknown tensor dtype 'object'"),
        (_frame({"tensors": [["uint8", [-1], 0]], "value": None}), "shape [-1] is not a list"),
        (_frame({"tensors": [], "value": {"$t": 0}}), "bad tagged value"),
        (_frame({"tensors": [], "value": {"$t": 0, "x": 1}}), "shares its object"),
        (_frame({"tensors": [], "value": 1}, b"x"), "1 bytes after the last tensor"),
        (MAGIC + struct.pack("<Q", 3) + b"NaN", "NaN is not written by the encoder"),
        (MAGIC + struct.pack("<Q", 200_000) + b"[" * 100_000 + b"]" * 100_000, "header is not JSON"),
    ],
)
def test_malformed_bytes_are_refused_with_what_is_wrong(data, problem):
    with pytest.raises(WireError, match="^malformed message: .*" + __import__("re").escape(problem)):
        decode(data)


def test_a_batch_with_a_wrong_type_or_shape_is_refused_with_the_field():
    good = batch_to_plain(_batch())
    cases = [
        ({"step": "7"}, "step is not an int"),
        ({"rewards": [1.0, 0.0]}, "rewards is not a list of 4 floats"),
        ({"sampler_after": [1, 2, 3]}, "sampler_after is not [epoch, index]"),
        ({"extra": 1}, "keys"),
        ({"seconds": {"generate": "fast"}}, "seconds is not {str: number}"),
        ({"adv_metrics": {"adv/std": torch.zeros(2)}}, "adv_metrics is not {str: number}"),
    ]
    for change, problem in cases:
        with pytest.raises(WireError, match=__import__("re").escape(problem)):
            batch_from_plain(decode(encode({**good, **change})))
    comps = completions_to_plain(_batch().completions)
    bad_cases = [
        ({"completion_ids": comps["completion_ids"].float()}, "completion_ids is not a 1-D torch.int64"),
        ({"completion_ids": comps["completion_ids"].reshape(1, -1)}, "completion_ids is not a 1-D torch.int64"),
        ({"rollout_logprobs_lengths": [3, 0, 2, 2]}, "rollout_logprobs holds 6 values, its lengths add up to 7"),
        ({"finish_reason": ["stop", "eos", "length", "stop"]}, 'finish_reason is not a list of "stop" / "length"'),
        ({"text": ["a", "b"]}, "per-completion lists differ in length"),
    ]
    for change, problem in bad_cases:
        with pytest.raises(WireError, match=__import__("re").escape(problem)):
            completions_from_plain(decode(encode({**comps, **change})))
    with pytest.raises(WireError, match="expected a dict"):
        batch_from_plain(["not", "a", "batch"])


def test_the_bridge_turns_a_malformed_message_into_one_error_naming_the_sender():
    from drpo_trainer.runtime.bridge import BadMessage, Bridge

    bridge = Bridge(rank=0, world=2, n_learners=1, store=None, data=None, weights=None, weights_device="cpu")
    junk = torch.frombuffer(bytearray(pickle.dumps({"x": 1})), dtype=torch.uint8)
    with pytest.raises(BadMessage, match=r"^malformed message from rollout process 0 \(global rank 1\): does not"):
        bridge._decode(junk, 1)
    with pytest.raises(BadMessage, match=r"weights header .* bucket entry \['w', 'float32', \[2, -1\]\]"):
        bridge._bucket_meta([["w", "float32", [2, -1]]])
    assert bridge._bucket_meta([["w", "bfloat16", [2, 3]]]) == [("w", torch.bfloat16, (2, 3))]


def test_a_wire_round_trip_is_fast_enough_for_a_large_batch():
    """512 completions x 1024 tokens: the bulk travels as tensors, not as JSON numbers."""
    import time

    comps = [Completion(i // 8, [1] * 256, list(range(1024)), [-0.5] * 1024, "length", "x" * 100) for i in range(512)]
    batch = RolloutBatch(1, 0, 0, list(range(64)), comps, [0.0] * 512, {}, [0.0] * 512, {}, (0, 64))
    start = time.perf_counter()
    data = encode(batch_to_plain(batch))
    back = batch_from_plain(decode(data))
    assert time.perf_counter() - start < 10  # ~1 s on one loaded core; JSON floats would take several times that
    assert back.completions[511].completion_ids[1023] == 1023 and len(data) > 512 * 1024 * 16
