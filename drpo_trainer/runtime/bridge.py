"""The asynchronous layout's processes and the links between them (docs/async.md).

One launch (torchrun, srun, the deepspeed launcher) starts W processes. With
`distributed.rollout_processes: R` the last R global ranks are rollout processes and the first
L = W - R are learners:

    learners  0 .. L-1   their own default process group: DeepSpeed's world, ZeRO-3 shards
    rollouts  L .. W-1   their own default process group (vLLM's world on GPU)

and a bridge joins the two roles:

    data group      gloo, all W ranks; rollout -> learner messages (batches, eval counts, parity
                    scores), point to point, as plain data (runtime/wire.py: JSON and tensor bytes,
                    never a pickle). gloo reports a peer that died at once.
    weights group   learner 0 + the rollout ranks; gloo on CPU, NCCL on GPU; learner 0 broadcasts
                    the gathered weights bucket by bucket (never through the filesystem).
    store           the launcher's TCP store: a counter of finished batches (queue depth).

All groups come from the launcher's one rendezvous (distributed.rendezvous_store: env://, with
the store bound to MASTER_ADDR), each under its own store prefix. On one node the store and gloo
listen on loopback only (runtime/distributed.py). A process sees RANK / WORLD_SIZE of its role's group, so that
DeepSpeed (learners) and vLLM's external launcher (rollouts) see only their own world.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Iterable, Iterator

import torch

from drpo_trainer.runtime.distributed import DistContext
from drpo_trainer.runtime.wire import WireError, decode, dtype_from_name, dtype_name, encode

# A rollout process waits for the learner through whole checkpoint writes and evaluations, and
# a learner for the rollouts through long generations: only a peer that is alive but stuck for
# this long is given up on (a peer that dies is reported at once by gloo).
BRIDGE_TIMEOUT = timedelta(hours=3)
_ALIGN = 16  # byte offset of every tensor in a flat weight bucket (a dtype view needs alignment)


class PeerLost(RuntimeError):
    """The process at the other end of the bridge stopped (crashed, was killed, or failed)."""


class BadMessage(PeerLost):
    """What arrived is not a message of ours: nothing more is taken from that peer."""


@dataclass
class Bridge:
    rank: int  # global rank in the launch
    world: int
    n_learners: int
    store: Any
    data: Any  # gloo process group over all ranks
    weights: Any  # process group over learner 0 + rollout ranks (None on learners 1..L-1)
    weights_device: torch.device
    _pending: list = field(default_factory=list)  # isends not yet completed: (work, buffers)

    @property
    def is_rollout(self) -> bool:
        return self.rank >= self.n_learners

    @property
    def n_rollouts(self) -> int:
        return self.world - self.n_learners

    @property
    def rollout_ranks(self) -> list[int]:
        return list(range(self.n_learners, self.world))

    def describe(self, rank: int) -> str:
        if rank >= self.n_learners:
            return f"rollout process {rank - self.n_learners} (global rank {rank})"
        return f"learner {rank} (global rank {rank})"

    # -- messages: rollout -> learner, in order per (sender, receiver) --------------------------
    def send(self, dst: int, obj: Any) -> None:
        """Queue `obj` (plain data, runtime/wire.py) for `dst` without waiting for it to be received
        (completed by `flush`)."""
        payload = torch.frombuffer(bytearray(encode(obj)), dtype=torch.uint8)
        size = torch.tensor([payload.numel()], dtype=torch.int64)
        self._pending.append((self.data.send([size], dst, 0), size))
        self._pending.append((self.data.send([payload], dst, 0), payload))
        self._pending = [(w, b) for w, b in self._pending if not w.is_completed()]

    def recv(self, src: int) -> Any:
        size = torch.zeros(1, dtype=torch.int64)
        self._wait(self.data.recv([size], src, 0), src)
        payload = torch.empty(int(size.item()), dtype=torch.uint8)
        self._wait(self.data.recv([payload], src, 0), src)
        return self._decode(payload, src)

    def flush(self, peer: int) -> None:
        """Wait until every queued message was received (`peer`: whom to blame if it never is)."""
        for work, _ in self._pending:
            self._wait(work, peer)
        self._pending.clear()

    def _decode(self, payload: torch.Tensor, src: int) -> Any:
        try:
            return decode(payload.cpu().numpy().tobytes(), f"message from {self.describe(src)}")
        except WireError as err:
            raise BadMessage(f"{err}; {self.describe(self.rank)} stops instead of guessing") from None

    def _wait(self, work, peer: int) -> None:
        try:
            work.wait()
        except RuntimeError as exc:
            raise PeerLost(
                f"{self.describe(peer)} stopped while {self.describe(self.rank)} was waiting for it: "
                f"{str(exc).splitlines()[0][:300]}. Its own error is above in the log; the run fails instead of "
                "waiting. Resume with --resume auto"
            ) from None

    # -- weights group: learner 0 -> every rollout process ----------------------------------------
    def broadcast_object(self, obj: Any = None) -> Any:
        """Learner 0 sends `obj` (plain data); every rollout process returns it."""
        dev = self.weights_device
        if self.rank == 0:
            payload = torch.frombuffer(bytearray(encode(obj)), dtype=torch.uint8).to(dev)
            size = torch.tensor([payload.numel()], dtype=torch.int64, device=dev)
        else:
            size = torch.zeros(1, dtype=torch.int64, device=dev)
        self._broadcast(size)
        if self.rank != 0:
            payload = torch.empty(int(size.item()), dtype=torch.uint8, device=dev)
        self._broadcast(payload)
        return obj if self.rank == 0 else self._decode(payload, 0)

    def _broadcast(self, tensor: torch.Tensor) -> None:
        opts = torch.distributed.BroadcastOptions()
        opts.rootRank, opts.rootTensor = 0, 0
        self._wait(self.weights.broadcast([tensor], opts), 0 if self.is_rollout else self.n_learners)

    def broadcast_buckets(self, buckets: Iterable[list[tuple[str, torch.Tensor]]]) -> tuple[int, int]:
        """Learner 0: send each bucket (name, full tensor) as one flat buffer; returns (buckets, bytes).
        Learners 1..L-1 iterate too (a ZeRO-3 gather is a collective of all learners) and send nothing."""
        n_buckets = n_bytes = 0
        for bucket in buckets:
            n_buckets += 1
            n_bytes += sum(t.numel() * t.element_size() for _, t in bucket)
            if self.rank != 0:
                continue
            meta = [[name, dtype_name(t.dtype), list(t.shape)] for name, t in bucket]
            self.broadcast_object(meta)
            self._broadcast(_flatten([t for _, t in bucket], self.weights_device))
        if self.rank == 0:
            self.broadcast_object([])  # the end of this version's weights
        return n_buckets, n_bytes

    def receive_buckets(self) -> Iterator[list[tuple[str, torch.Tensor]]]:
        """Rollout process: the buckets of one `broadcast_buckets`, each valid until the next."""
        while True:
            meta = self.broadcast_object()
            if not meta:
                return
            meta = self._bucket_meta(meta)
            offsets, total = _layout([(dtype, shape) for _, dtype, shape in meta])
            flat = torch.empty(total, dtype=torch.uint8, device=self.weights_device)
            self._broadcast(flat)
            yield [
                (name, flat[off : off + _nbytes(dtype, shape)].view(dtype).view(shape))
                for (name, dtype, shape), off in zip(meta, offsets)
            ]

    def _bucket_meta(self, meta: Any) -> list[tuple[str, torch.dtype, tuple]]:
        """[[name, dtype, shape], ...] as learner 0 sent it -> (name, torch dtype, shape), checked."""
        try:
            if not isinstance(meta, list):
                raise WireError(f"bucket list is a {type(meta).__name__}")
            out = []
            for entry in meta:
                ok = isinstance(entry, list) and len(entry) == 3 and isinstance(entry[0], str)
                if not (ok and isinstance(entry[2], list) and all(type(d) is int and d >= 0 for d in entry[2])):
                    raise WireError(f"bucket entry {str(entry)[:80]} is not [name, dtype, shape]")
                out.append((entry[0], dtype_from_name(entry[1]), tuple(entry[2])))
            return out
        except WireError as err:
            raise BadMessage(f"malformed weights header from {self.describe(0)}: {err}") from None


def _nbytes(dtype: torch.dtype, shape: tuple) -> int:
    n = 1
    for d in shape:
        n *= d
    return n * torch.empty((), dtype=dtype).element_size()


def _layout(specs: list[tuple[torch.dtype, tuple]]) -> tuple[list[int], int]:
    offsets, total = [], 0
    for dtype, shape in specs:
        total = -(-total // _ALIGN) * _ALIGN
        offsets.append(total)
        total += _nbytes(dtype, shape)
    return offsets, total


def _flatten(tensors: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    offsets, total = _layout([(t.dtype, tuple(t.shape)) for t in tensors])
    flat = torch.zeros(total, dtype=torch.uint8, device=device)
    for t, off in zip(tensors, offsets):
        n = t.numel() * t.element_size()
        flat[off : off + n] = t.detach().contiguous().reshape(-1).view(torch.uint8).to(device)
    return flat


def _process_group(backend: str, store, rank: int, size: int):
    if backend == "nccl":  # GPU path: written against torch's ProcessGroupNCCL, not run on hardware here
        opts = torch.distributed.ProcessGroupNCCL.Options()
        opts._timeout = BRIDGE_TIMEOUT
        return torch.distributed.ProcessGroupNCCL(store, rank, size, opts)
    return torch.distributed.ProcessGroupGloo(store, rank, size, BRIDGE_TIMEOUT)


def connect(backend: str, rollout_processes: int) -> tuple[DistContext, Bridge]:
    """Join the launch as a learner or a rollout process; returns this process's role context
    (its rank and world within its role) and the bridge."""
    from drpo_trainer.config import learner_count
    from drpo_trainer.runtime.distributed import prepare_process, rendezvous_store

    backend, local_rank, device = prepare_process(backend)
    store, rank, world = rendezvous_store(BRIDGE_TIMEOUT)
    n_learners = learner_count(world, rollout_processes)  # the config check's rule, for this launch
    rollout = rank >= n_learners
    role = "rollout" if rollout else "learner"
    role_rank, role_world = (rank - n_learners, rollout_processes) if rollout else (rank, n_learners)
    # the role's own world is what DeepSpeed, vLLM and our collectives see
    os.environ.update(RANK=str(role_rank), WORLD_SIZE=str(role_world), DRPO_ROLE=role)
    torch.distributed.init_process_group(
        backend, store=torch.distributed.PrefixStore(f"drpo/{role}", store), rank=role_rank, world_size=role_world
    )
    if not rollout:
        import deepspeed  # wraps the initialised learner group

        deepspeed.init_distributed(dist_backend=backend)
    data_store = torch.distributed.PrefixStore("drpo/data", store)
    data = torch.distributed.ProcessGroupGloo(data_store, rank, world, BRIDGE_TIMEOUT)
    weights = None
    if rank == 0 or rollout:  # learner 0 is weights-rank 0, rollout process j is j + 1
        weights = _process_group(
            backend,
            torch.distributed.PrefixStore("drpo/weights", store),
            0 if rank == 0 else rank - n_learners + 1,
            rollout_processes + 1,
        )
    ctx = DistContext(role_rank, role_world, local_rank, device, backend=backend)
    bridge = Bridge(
        rank=rank,
        world=world,
        n_learners=n_learners,
        store=torch.distributed.PrefixStore("drpo/counters", store),
        data=data,
        weights=weights,
        weights_device=device if backend == "nccl" else torch.device("cpu"),
    )
    return ctx, bridge
