"""Plain data between processes and in checkpoints: never a pickle (docs/async.md, "Messages").

A *plain value* is None, bool, int, float, str, a list or tuple of plain values, a dict with str
keys and plain values, or a torch tensor. Such a value is what `torch.load(weights_only=True)`
accepts, and what `encode` turns into bytes for the wire:

    b"DRPOMSG1"  u64 little-endian header length  JSON header  tensor bytes, back to back

The header is {"tensors": [[dtype, shape, nbytes], ...], "value": tree}. In the tree a tensor is
{"$t": i}, a float that JSON cannot spell (inf, nan: any of its bit patterns) is {"$f": 16 hex
digits of its IEEE bytes}, and a dict key that starts with "$" gets one more "$". Finite floats are
JSON numbers written by repr, which reads back to the same bits. `decode` builds nothing but these
types, checks every dtype, shape and length against the bytes, and raises WireError otherwise.

Also here: a RolloutBatch (and the Completions in it) <-> a plain dict, with every field checked
on the way back, so that the asynchronous layout's messages and the batches a checkpoint keeps
are plain data.
"""

from __future__ import annotations

import json
import math
import struct
from typing import Any, Optional

import torch

from drpo_trainer.rollout.base import Completion
from drpo_trainer.rollout.producer import RolloutBatch

MAGIC = b"DRPOMSG1"
MAX_DEPTH = 64  # our messages nest 5 deep; a deeper tree is not one of ours
DTYPES = {
    name: getattr(torch, name)
    for name in ("float64", "float32", "float16", "bfloat16", "int64", "int32", "int16", "int8", "uint8", "bool")
}


class WireError(ValueError):
    """Bytes or a plain value that are not what the receiver expects."""


def dtype_name(dtype: torch.dtype) -> str:
    name = str(dtype).removeprefix("torch.")
    if name not in DTYPES:
        raise WireError(f"tensors of dtype {dtype} are not sent between processes (allowed: {', '.join(DTYPES)})")
    return name


def dtype_from_name(name: Any) -> torch.dtype:
    if not isinstance(name, str) or name not in DTYPES:
        raise WireError(f"unknown tensor dtype {name!r} (allowed: {', '.join(DTYPES)})")
    return DTYPES[name]


# -- bytes <-> plain value ----------------------------------------------------------------------------
def encode(value: Any) -> bytes:
    """A plain value -> bytes (raises WireError for anything else, e.g. an object of a class)."""
    tensors: list[torch.Tensor] = []
    tree = _to_json(value, tensors, 0)
    table = [[dtype_name(t.dtype), list(t.shape), t.numel() * t.element_size()] for t in tensors]
    header = json.dumps({"tensors": table, "value": tree}, allow_nan=False, separators=(",", ":")).encode()
    blobs = [t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() for t in tensors]
    return b"".join([MAGIC, struct.pack("<Q", len(header)), header, *blobs])


def decode(data: bytes, what: str = "message") -> Any:
    """bytes -> the plain value `encode` was given; WireError naming `what` if they are not such bytes."""
    try:
        return _decode(memoryview(data))
    except WireError as err:
        raise WireError(f"malformed {what}: {err}") from None


def _decode(data: memoryview) -> Any:
    if len(data) < 16 or bytes(data[:8]) != MAGIC:
        raise WireError(f"does not start with {MAGIC!r} (a pickle or another format is never read)")
    (n,) = struct.unpack("<Q", data[8:16])
    if n > len(data) - 16:
        raise WireError(f"header of {n} bytes is longer than the {len(data) - 16} bytes that follow")
    try:
        header = json.loads(bytes(data[16 : 16 + n]), parse_constant=_no_constant)
    except (ValueError, RecursionError) as err:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise WireError(f"header is not JSON: {str(err)[:200]}") from None
    if not isinstance(header, dict) or set(header) != {"tensors", "value"} or not isinstance(header["tensors"], list):
        raise WireError('header is not {"tensors": [...], "value": ...}')
    offset, tensors = 16 + n, []
    for i, entry in enumerate(header["tensors"]):
        tensor, offset = _read_tensor(data, offset, entry, i)
        tensors.append(tensor)
    if offset != len(data):
        raise WireError(f"{len(data) - offset} bytes after the last tensor")
    return _from_json(header["value"], tensors, 0)


def _no_constant(name: str):
    raise WireError(f"{name} is not written by the encoder")


def _read_tensor(data: memoryview, offset: int, entry: Any, i: int) -> tuple[torch.Tensor, int]:
    if not (isinstance(entry, list) and len(entry) == 3 and isinstance(entry[1], list)):
        raise WireError(f"tensor {i}: entry {str(entry)[:80]} is not [dtype, shape, nbytes]")
    dtype, shape, nbytes = dtype_from_name(entry[0]), entry[1], entry[2]
    if not all(_is_int(d) and d >= 0 for d in shape) or len(shape) > 8:
        raise WireError(f"tensor {i}: shape {shape} is not a list of at most 8 sizes >= 0")
    numel = math.prod(shape)
    if not _is_int(nbytes) or nbytes != numel * torch.empty((), dtype=dtype).element_size():
        raise WireError(f"tensor {i}: {nbytes!r} bytes do not hold a {entry[0]} tensor of shape {shape}")
    if offset + nbytes > len(data):
        raise WireError(f"tensor {i}: {nbytes} bytes announced, {len(data) - offset} left")
    if numel == 0:
        return torch.empty(shape, dtype=dtype), offset
    raw = torch.frombuffer(bytearray(data[offset : offset + nbytes]), dtype=torch.uint8)
    return raw.view(dtype).reshape(shape), offset + nbytes


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _to_json(v: Any, tensors: list, depth: int) -> Any:
    if depth > MAX_DEPTH:
        raise WireError(f"value nests deeper than {MAX_DEPTH}")
    if v is None or isinstance(v, (bool, int, str)):
        return v
    if isinstance(v, float):
        return v if math.isfinite(v) else {"$f": struct.pack("<d", v).hex()}
    if isinstance(v, (list, tuple)):
        return [_to_json(x, tensors, depth + 1) for x in v]
    if isinstance(v, dict):
        if not all(isinstance(k, str) for k in v):
            raise WireError(f"dict keys must be str, got {sorted({type(k).__name__ for k in v})}")
        return {("$" + k if k.startswith("$") else k): _to_json(x, tensors, depth + 1) for k, x in v.items()}
    if isinstance(v, torch.Tensor):
        tensors.append(v)
        return {"$t": len(tensors) - 1}
    raise WireError(f"{type(v).__name__} is not plain data (None, bool, int, float, str, list, dict, tensor)")


def _from_json(v: Any, tensors: list, depth: int) -> Any:
    if depth > MAX_DEPTH:
        raise WireError(f"value nests deeper than {MAX_DEPTH}")
    if isinstance(v, list):
        return [_from_json(x, tensors, depth + 1) for x in v]
    if not isinstance(v, dict):
        return v  # json.loads builds only None, bool, int, float, str besides lists and dicts
    tags = [k for k in v if k.startswith("$") and not k.startswith("$$")]
    if not tags:
        return {(k[1:] if k.startswith("$") else k): _from_json(x, tensors, depth + 1) for k, x in v.items()}
    if len(v) != 1:
        raise WireError(f"tag {tags[0]!r} shares its object with other keys")
    ((tag, x),) = v.items()
    if tag == "$t" and _is_int(x) and 0 <= x < len(tensors):
        return tensors[x]
    if tag == "$f" and isinstance(x, str) and len(x) == 16:
        try:
            return struct.unpack("<d", bytes.fromhex(x))[0]
        except ValueError:
            pass
    raise WireError(f"bad tagged value {str(v)[:80]}")


# -- RolloutBatch <-> plain dict ----------------------------------------------------------------------
_BATCH_INTS = ("step", "version", "learner_rank")
_BATCH_METRICS = ("reward_metrics", "adv_metrics", "seconds", "sampling")
_SEQS = ("prompt_ids", "completion_ids", "rollout_logprobs")  # per completion; flat tensor + lengths


def batch_to_plain(batch: RolloutBatch) -> dict:
    plain = {k: getattr(batch, k) for k in (*_BATCH_INTS, *_BATCH_METRICS)}
    plain.update(
        indices=list(batch.indices),
        completions=completions_to_plain(batch.completions),
        rewards=[float(r) for r in batch.rewards],
        advantages=[float(a) for a in batch.advantages],
        sampler_after=list(batch.sampler_after),
    )
    return plain


def batch_from_plain(plain: Any) -> RolloutBatch:
    if isinstance(plain, dict) and "sampling" not in plain:  # kept by a checkpoint written before the key
        plain = {**plain, "sampling": {}}
    _keys(plain, {*_BATCH_INTS, *_BATCH_METRICS, "indices", "completions", "rewards", "advantages", "sampler_after"})
    for k in _BATCH_INTS:
        _check(_is_int(plain[k]), f"{k} is not an int")
    for k in _BATCH_METRICS:  # values: numbers, or 0-d tensors (group_advantages' statistics)
        _check(isinstance(plain[k], dict) and all(map(_scalar, plain[k].values())), f"{k} is not {{str: number}}")
    completions = completions_from_plain(plain["completions"])
    n = len(completions)
    _check(_ints(plain["indices"]), "indices is not a list of ints")
    _check(_ints(plain["sampler_after"]) and len(plain["sampler_after"]) == 2, "sampler_after is not [epoch, index]")
    for k in ("rewards", "advantages"):
        _check(_floats(plain[k]) and len(plain[k]) == n, f"{k} is not a list of {n} floats (one per completion)")
    return RolloutBatch(
        step=plain["step"],
        version=plain["version"],
        learner_rank=plain["learner_rank"],
        indices=list(plain["indices"]),
        completions=completions,
        rewards=[float(x) for x in plain["rewards"]],
        reward_metrics=dict(plain["reward_metrics"]),
        advantages=[float(x) for x in plain["advantages"]],
        adv_metrics=dict(plain["adv_metrics"]),
        sampler_after=tuple(plain["sampler_after"]),
        seconds=dict(plain["seconds"]),
        sampling=dict(plain["sampling"]),
    )


def completions_to_plain(completions: list[Completion]) -> dict:
    """Column-wise: the token ids and log-probs of all completions as one flat tensor each."""
    plain: dict[str, Any] = {
        "prompt_index": [c.prompt_index for c in completions],
        "finish_reason": [c.finish_reason for c in completions],
        "text": [c.text for c in completions],
    }
    for k in _SEQS:
        seqs = [getattr(c, k) for c in completions]
        dtype = torch.float64 if k == "rollout_logprobs" else torch.int64  # float64: a Python float, bit for bit
        plain[k] = torch.tensor([x for s in seqs for x in s], dtype=dtype)
        plain[k + "_lengths"] = [len(s) for s in seqs]
    routes = [c.routes for c in completions]
    if any(r is not None for r in routes):  # MoE: one (sum n_i, layers, k) tensor, -1 lengths for None
        present = [r for r in routes if r is not None]
        plain["routes"] = torch.cat([r.reshape(r.shape[0], -1) for r in present]).view(-1, *present[0].shape[1:])
        plain["routes_lengths"] = [-1 if r is None else r.shape[0] for r in routes]
    return plain


def completions_from_plain(plain: Any) -> list[Completion]:
    routes = _routes_from_plain(plain)  # (absent for dense models and in checkpoints written before the key)
    if routes is not None:
        plain = {k: v for k, v in plain.items() if k not in ("routes", "routes_lengths")}
    _keys(plain, {"prompt_index", "finish_reason", "text", *_SEQS, *(k + "_lengths" for k in _SEQS)})
    n = len(plain["prompt_index"]) if isinstance(plain["prompt_index"], list) else -1
    _check(_ints(plain["prompt_index"]), "prompt_index is not a list of ints")
    _check(
        isinstance(plain["finish_reason"], list) and all(r in ("stop", "length") for r in plain["finish_reason"]),
        'finish_reason is not a list of "stop" / "length"',
    )
    _check(
        isinstance(plain["text"], list) and all(isinstance(t, str) for t in plain["text"]), "text is not a list of str"
    )
    _check(len(plain["finish_reason"]) == n and len(plain["text"]) == n, "per-completion lists differ in length")
    columns = {}
    for k in _SEQS:
        flat, lengths = plain[k], plain[k + "_lengths"]
        dtype = torch.float64 if k == "rollout_logprobs" else torch.int64
        _check(isinstance(flat, torch.Tensor) and flat.dtype == dtype and flat.dim() == 1, f"{k} is not a 1-D {dtype}")
        _check(_ints(lengths) and len(lengths) == n and min(lengths, default=0) >= 0, f"{k}_lengths is not {n} sizes")
        _check(sum(lengths) == flat.numel(), f"{k} holds {flat.numel()} values, its lengths add up to {sum(lengths)}")
        values, start, columns[k] = flat.tolist(), 0, []
        for m in lengths:
            columns[k].append(values[start : start + m])
            start += m
    return [
        Completion(
            prompt_index=plain["prompt_index"][i],
            prompt_ids=columns["prompt_ids"][i],
            completion_ids=columns["completion_ids"][i],
            rollout_logprobs=columns["rollout_logprobs"][i],
            finish_reason=plain["finish_reason"][i],
            text=plain["text"][i],
            routes=routes[i] if routes else None,
        )
        for i in range(n)
    ]


def _routes_from_plain(plain: Any) -> Optional[list[Optional[torch.Tensor]]]:
    """The MoE routes of `plain` (checked), or None when it has none."""
    if not isinstance(plain, dict) or "routes" not in plain:
        return None
    flat, lengths = plain["routes"], plain.get("routes_lengths")
    _check(
        isinstance(flat, torch.Tensor) and flat.dtype in (torch.uint8, torch.int16) and flat.dim() == 3,
        "routes is not a 3-D uint8/int16 tensor",
    )
    _check(_ints(lengths) and min(lengths, default=0) >= -1, "routes_lengths is not a list of sizes (-1: none)")
    _check(len(lengths) == len(plain.get("prompt_index") or []), "routes_lengths has not one entry per completion")
    _check(sum(m for m in lengths if m > 0) == flat.shape[0], "routes and routes_lengths disagree")
    out, start = [], 0
    for m in lengths:
        out.append(None if m < 0 else flat[start : start + m])
        start += max(m, 0)
    return out


def _keys(plain: Any, want: set) -> None:
    _check(isinstance(plain, dict), f"expected a dict with keys {sorted(want)}, got {type(plain).__name__}")
    _check(set(plain) == want, f"keys {sorted(plain)} are not {sorted(want)}")


def _ints(v: Any) -> bool:
    return isinstance(v, list) and all(_is_int(x) for x in v)


def _scalar(x: Any) -> bool:
    if isinstance(x, torch.Tensor):
        return x.dim() == 0 and x.dtype.is_floating_point
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _floats(v: Any) -> bool:
    return isinstance(v, list) and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v)


def _check(ok: bool, problem: str) -> None:
    if not ok:
        raise WireError(problem)
