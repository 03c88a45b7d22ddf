"""Process launch and process-group set-up.

`drpo-train` on a single machine starts `distributed.nproc_per_node` processes itself
(through `torch.distributed.run`) unless it already runs under a launcher: torchrun,
the `deepspeed` launcher and `accelerate launch` set RANK / WORLD_SIZE / LOCAL_RANK;
`srun` sets SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID, which we translate.

Multi-node command lines (torchrun with c10d rendezvous, srun with one task per GPU, the
DeepSpeed launcher with a hostfile) are spelled once, in the launch/ scripts that users run;
tests/test_launch.py checks them with the launchers' own argument parsers.

Listening sockets (docs/launch.md, "Ports"): a run on one machine listens on loopback only. Its
rendezvous store is bound to 127.0.0.1 (torch's TCPStore would listen on every interface), by
local_launch.py for torchrun's agent and by `rendezvous_store` where rank 0 hosts it, and gloo
(NCCL's bootstrap) is pointed at the loopback interface. A multi-node run's store listens on the
address MASTER_ADDR names when that is an IP address.
"""

from __future__ import annotations

import functools
import ipaddress
import os
import socket
import sys
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Optional

LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
LOOPBACK = "127.0.0.1"


def launched_externally(env: Optional[dict] = None) -> Optional[str]:
    """Name of the launcher that started this process, or None."""
    env = os.environ if env is None else env
    if all(v in env for v in LAUNCHER_VARS):
        if "TORCHELASTIC_RUN_ID" in env:
            return "torchrun"
        if "ACCELERATE_MIXED_PRECISION" in env or any(k.startswith("ACCELERATE_") for k in env):
            return "accelerate"
        return "deepspeed" if "CROSS_RANK" in env or "DS_ACCELERATOR" in env else "env"
    if "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1 and "SLURM_STEP_ID" in env:
        return "slurm"
    return None


def slurm_to_torch_env(env: dict) -> dict:
    """srun (one task per GPU) -> the variables torch.distributed expects."""
    out = {
        "RANK": env["SLURM_PROCID"],
        "WORLD_SIZE": env["SLURM_NTASKS"],
        "LOCAL_RANK": env.get("SLURM_LOCALID", "0"),
        "MASTER_PORT": env.get("MASTER_PORT", "29500"),
    }
    if "MASTER_ADDR" in env:
        out["MASTER_ADDR"] = env["MASTER_ADDR"]
    else:
        nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST", "127.0.0.1")
        out["MASTER_ADDR"] = _first_slurm_host(nodelist)
    return out


def _first_slurm_host(nodelist: str) -> str:
    """'gpu[01-04,07],cpu1' -> 'gpu01' (scontrol is the authority; this covers the common forms)."""
    head = nodelist.split(",")[0] if "[" not in nodelist.split(",")[0] else nodelist
    if "[" not in head:
        return head
    prefix, rest = head.split("[", 1)
    first = rest.split("]")[0].split(",")[0].split("-")[0]
    return prefix + first


def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def loopback_interface() -> str:
    """The loopback interface's name: gloo and NCCL bind to the interface their *_SOCKET_IFNAME names."""
    try:
        for name in sorted(os.listdir("/sys/class/net")):
            with open(f"/sys/class/net/{name}/flags") as f:
                if int(f.read(), 16) & 0x8:  # IFF_LOOPBACK
                    return name
    except (OSError, ValueError):
        pass
    return "lo0" if sys.platform == "darwin" else "lo"


def single_node_env() -> dict[str, str]:
    """The variables that keep every listening socket of a run on this machine alone on loopback."""
    lo = loopback_interface()
    return {"MASTER_ADDR": LOOPBACK, "GLOO_SOCKET_IFNAME": lo, "NCCL_SOCKET_IFNAME": lo}


def bind_address(master_addr: str) -> Optional[str]:
    """Where the process hosting the store listens: MASTER_ADDR if it is an IP address (`localhost`:
    loopback), or None (a host name: every interface, torch's default, since the name may resolve
    to another address on that host than on the others)."""
    if master_addr == "localhost":
        return LOOPBACK
    try:
        return str(ipaddress.ip_address(master_addr.strip("[]")))
    except ValueError:
        return None


def listening_socket(address: str, port: int) -> tuple[int, int]:
    """A socket bound to (address, port) and listening; returns (file descriptor, port). The
    caller's TCPStore owns the descriptor from then on."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((address, port))
    except OSError as err:
        sock.close()
        raise RuntimeError(
            f"cannot listen on {address}:{port} for the rendezvous store: {err.strerror}. Fix: set MASTER_PORT to a "
            "free port, and MASTER_ADDR to an address of the machine of rank 0"
        ) from None
    sock.listen(1024)
    port = sock.getsockname()[1]
    return sock.detach(), port


def store_server(address: str, port: int, world: Optional[int], timeout: timedelta, wait: bool = True) -> Any:
    """A TCPStore server listening on (address, port) only; port 0 picks a free one (read `.port`).
    multi_tenant: a later TCPStore of this process on the same port (torchrun's) shares this server."""
    import torch

    fd, port = listening_socket(address, port)
    return torch.distributed.TCPStore(
        address, port, world, True, timeout, wait_for_workers=wait, multi_tenant=True, master_listen_fd=fd
    )


def rendezvous_store(timeout: timedelta) -> tuple[Any, int, int]:
    """(store, rank, world) of the launch from RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT: what
    `torch.distributed.rendezvous("env://")` returns, except that a store hosted by rank 0 listens
    on `bind_address(MASTER_ADDR)` instead of every interface."""
    import torch

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    addr, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    bind = bind_address(addr)
    if rank == 0 and bind is not None and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return store_server(bind, port, world, timeout), rank, world
    # a client of torchrun's agent store or of rank 0's; or rank 0 of a launch that names a host name
    store = next(torch.distributed.rendezvous("env://", timeout=timeout))[0]
    return store, rank, world


def broadcast_plain(value: Any, ctx: "DistContext", src: int = 0) -> Any:
    """`value` (plain data, runtime/wire.py) of rank `src` on every rank of the default group, sent
    as bytes that are decoded, never unpickled."""
    if ctx.world_size == 1:
        return value
    import torch

    from drpo_trainer.runtime.wire import decode, encode

    dev = ctx.comm_device
    payload = torch.frombuffer(bytearray(encode(value)), dtype=torch.uint8).to(dev) if ctx.rank == src else None
    size = torch.tensor([payload.numel() if payload is not None else 0], dtype=torch.int64, device=dev)
    torch.distributed.broadcast(size, src)
    if payload is None:
        payload = torch.empty(int(size.item()), dtype=torch.uint8, device=dev)
    torch.distributed.broadcast(payload, src)
    return value if ctx.rank == src else decode(payload.cpu().numpy().tobytes(), f"broadcast from rank {src}")


def all_gather_plain(value: Any, ctx: "DistContext") -> list[Any]:
    """Every rank's `value` (plain data, runtime/wire.py), in rank order, on every rank of the default
    group: bytes padded to the longest, decoded, never unpickled."""
    if ctx.world_size == 1:
        return [value]
    import torch

    from drpo_trainer.runtime.wire import decode, encode

    dev = ctx.comm_device
    mine = torch.frombuffer(bytearray(encode(value)), dtype=torch.uint8).to(dev)
    sizes = [torch.zeros(1, dtype=torch.int64, device=dev) for _ in range(ctx.world_size)]
    torch.distributed.all_gather(sizes, torch.tensor([mine.numel()], dtype=torch.int64, device=dev))
    width = int(max(s.item() for s in sizes))
    parts = [torch.empty(width, dtype=torch.uint8, device=dev) for _ in range(ctx.world_size)]
    torch.distributed.all_gather(parts, torch.nn.functional.pad(mine, (0, width - mine.numel())))
    return [
        value if r == ctx.rank else decode(p[: int(n.item())].cpu().numpy().tobytes(), f"rank {r}")
        for r, (p, n) in enumerate(zip(parts, sizes))
    ]


def resolve_nproc(nproc_per_node: int | str) -> int:
    if nproc_per_node != "auto":
        return int(nproc_per_node)
    try:
        import torch

        return max(1, torch.cuda.device_count())
    except Exception:
        return 1


# A stop request lets the trainer finish its step and write a checkpoint; torchrun forwards the
# signal to its workers and SIGKILLs them after --shutdown-timeout (30 s by default), which is
# shorter than one long-response step. This is the grace we give instead (an upper bound: the
# workers exit as soon as the checkpoint is written).
STOP_GRACE_S = 1800
# torchrun dies of SIGUSR1 (SLURM's usual warning signal) unless told to forward it.
TORCHRUN_SIGNALS = "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"


@functools.lru_cache(maxsize=1)
def torchrun_options() -> frozenset[str]:
    """Option strings the installed torch.distributed.run accepts."""
    from torch.distributed.run import get_args_parser

    return frozenset(opt for action in get_args_parser()._actions for opt in action.option_strings)


def build_launch_command(
    nproc: int,
    argv: list[str],
    *,
    master_port: int = 0,
    python: str = sys.executable,
    shutdown_timeout_s: int = STOP_GRACE_S,
) -> list[str]:
    """The command that re-runs this CLI as `nproc` local processes: torchrun's arguments, run by
    local_launch.py, which binds the rendezvous store to loopback (port 0: a free port, chosen
    when it is bound) and adds --master_addr / --master_port."""
    # Older torch (the package allows >= 2.6) lacks these flags; their runs keep torchrun's defaults.
    stop_flags = [
        flag
        for flag in (f"--signals-to-handle={TORCHRUN_SIGNALS}", f"--shutdown-timeout={shutdown_timeout_s}")
        if flag.split("=")[0] in torchrun_options()
    ]
    return [
        python,
        "-m",
        "drpo_trainer.runtime.local_launch",
        *([f"--store_port={master_port}"] if master_port else []),
        f"--nproc_per_node={nproc}",
        "--nnodes=1",
        *stop_flags,
        "-m",
        "drpo_trainer.cli",
        *argv,
    ]


@dataclass(frozen=True)
class DistContext:
    """This process's place in the run: what the learner, checkpoints, export and metric reductions
    are given instead of each asking the default process group. Collectives run on that group."""

    rank: int
    world_size: int
    local_rank: int
    device: "object"  # torch.device
    backend: str = "gloo"  # of the process group: which device collectives of host values go through

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def comm_device(self) -> "object":
        """Where a tensor must be for a collective: the current GPU under nccl, else the CPU."""
        import torch

        return torch.device("cuda", torch.cuda.current_device()) if self.backend == "nccl" else torch.device("cpu")

    def barrier(self) -> None:
        if self.world_size > 1:
            import torch

            torch.distributed.barrier()

    @classmethod
    def current(cls) -> "DistContext":
        """The context of the initialised default process group, or of a lone process without one
        (tools and tests that call a rank-aware function outside a run)."""
        import torch

        if not torch.distributed.is_initialized():
            return cls(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
        cuda = torch.cuda.is_available()
        return cls(
            rank=torch.distributed.get_rank(),
            world_size=torch.distributed.get_world_size(),
            local_rank=int(os.environ.get("LOCAL_RANK", 0)),
            device=torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu"),
            backend=torch.distributed.get_backend(),
        )


def prepare_process(backend: str = "auto") -> tuple[str, int, "object"]:
    """This process's launch variables (srun's translated, a lone process's defaulted), its
    collective backend (auto = nccl on GPU) and device; returns (backend, local_rank, device).
    A lone process (no launcher) is a single-node run: it listens on loopback only."""
    if launched_externally() is None:
        os.environ.update(single_node_env())
    elif launched_externally() == "slurm":
        os.environ.update(slurm_to_torch_env(dict(os.environ)))
    for var, default in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0"), ("MASTER_ADDR", LOOPBACK)):
        os.environ.setdefault(var, default)
    if "MASTER_PORT" not in os.environ:
        os.environ["MASTER_PORT"] = str(free_port())
    import torch

    cuda = torch.cuda.is_available()
    if not cuda:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if backend == "auto":
        backend = "nccl" if cuda else "gloo"
    local_rank = int(os.environ["LOCAL_RANK"])
    if cuda:
        torch.cuda.set_device(local_rank)
        return backend, local_rank, torch.device("cuda", local_rank)
    return backend, local_rank, torch.device("cpu")


def setup_distributed(backend: str = "auto") -> DistContext:
    """Initialise the default process group (1 process too) and pick this rank's device."""
    backend, local_rank, device = prepare_process(backend)
    import deepspeed
    import torch

    if not torch.distributed.is_initialized():
        from deepspeed.constants import default_pg_timeout

        store, rank, world = rendezvous_store(default_pg_timeout)
        torch.distributed.init_process_group(
            backend, store=store, rank=rank, world_size=world, timeout=default_pg_timeout
        )
        deepspeed.init_distributed(dist_backend=backend)  # wraps the initialised group
    return DistContext(
        rank=torch.distributed.get_rank(),
        world_size=torch.distributed.get_world_size(),
        local_rank=local_rank,
        device=device,
        backend=torch.distributed.get_backend(),
    )
