"""Process launch and process-group set-up.

`drpo-train` on a single machine starts `distributed.nproc_per_node` processes itself
(through `torch.distributed.run`) unless it already runs under a launcher: torchrun,
the `deepspeed` launcher and `accelerate launch` set RANK / WORLD_SIZE / LOCAL_RANK;
`srun` sets SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID, which we translate.

It also owns the multi-node command lines (torchrun with c10d rendezvous, the DeepSpeed
launcher with a hostfile, srun with one task per GPU) that launch/ runs and docs/launch.md
shows, so that the scripts, the docs and the tests agree on one spelling.
"""

from __future__ import annotations

import functools
import os
import socket
import sys
from dataclasses import dataclass
from typing import Optional, Sequence

LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


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
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
    master_port: int,
    python: str = sys.executable,
    shutdown_timeout_s: int = STOP_GRACE_S,
) -> list[str]:
    """The command that re-runs this CLI as `nproc` local processes."""
    # Older torch (the package allows >= 2.6) lacks these flags; their runs keep torchrun's defaults.
    stop_flags = [
        flag
        for flag in (f"--signals-to-handle={TORCHRUN_SIGNALS}", f"--shutdown-timeout={shutdown_timeout_s}")
        if flag.split("=")[0] in torchrun_options()
    ]
    return [
        python,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={nproc}",
        "--nnodes=1",
        "--master_addr=127.0.0.1",
        f"--master_port={master_port}",
        *stop_flags,
        "-m",
        "drpo_trainer.cli",
        *argv,
    ]


# ---------------------------------------------------------------------------------------------
# Multi-node command lines. World size = processes per node x nodes; nodes are assumed alike.

GPUS_PER_NODE = 8  # what "auto" means when planning a run for a machine we are not on
CLI_PROGRAM = "drpo-train"
CLI_MODULE = "drpo_trainer.cli"


def planned_world_size(nproc_per_node: int | str, nnodes: int, gpus_per_node: int = GPUS_PER_NODE) -> int:
    """World size a config asks for on nodes with `gpus_per_node` GPUs ('auto' = one process per GPU)."""
    if nnodes < 1 or gpus_per_node < 1:
        raise ValueError(f"nnodes={nnodes} and gpus_per_node={gpus_per_node} must both be >= 1")
    nproc = gpus_per_node if nproc_per_node == "auto" else int(nproc_per_node)
    if nproc < 1:
        raise ValueError(f"distributed.nproc_per_node={nproc_per_node!r} must be 'auto' or >= 1")
    return nproc * nnodes


def _torchrun_nproc(nproc_per_node: int | str) -> str:
    # torchrun's own "auto" means the CPU count on a machine without CUDA; "gpu" fails loudly there instead.
    if nproc_per_node == "auto":
        return "gpu"
    if int(nproc_per_node) < 1:
        raise ValueError(f"nproc_per_node={nproc_per_node!r} must be 'auto' or >= 1")
    return str(int(nproc_per_node))


def _check_endpoint(endpoint: str, what: str) -> None:
    host, _, port = endpoint.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{what}={endpoint!r} must be HOST:PORT (e.g. node-001:29500), HOST being node 0")


def build_multinode_command(
    argv: Sequence[str],
    *,
    nnodes: int,
    rdzv_endpoint: str,
    nproc_per_node: int | str = "auto",
    rdzv_id: str = "drpo",
    max_restarts: int = 0,
    shutdown_timeout_s: int = STOP_GRACE_S,
    torchrun: Sequence[str] = ("torchrun",),
    program: str = CLI_PROGRAM,
) -> list[str]:
    """torchrun with c10d rendezvous, run identically on every node (no node rank needed).

    `rdzv_endpoint` is HOST:PORT of any one node that all others can reach; `rdzv_id` must be
    the same on all nodes and differ between concurrent jobs sharing an endpoint. Restarts stay
    off: a failed rank is better handled by `--resume auto` than by an in-place restart, which
    would re-initialise the vLLM engines while the old ones hold GPU memory. SIGTERM or SIGUSR1
    to torchrun reaches every worker, which checkpoints and exits (see STOP_GRACE_S); torchrun's
    own exit code is then not 75, so scripts look for output_dir/PREEMPTED instead.
    """
    if nnodes < 1:
        raise ValueError(f"nnodes={nnodes} must be >= 1")
    if max_restarts < 0:
        raise ValueError(f"max_restarts={max_restarts} must be >= 0")
    _check_endpoint(rdzv_endpoint, "rdzv_endpoint")
    return [
        *torchrun,
        f"--nnodes={nnodes}",
        f"--nproc-per-node={_torchrun_nproc(nproc_per_node)}",
        "--rdzv-backend=c10d",
        f"--rdzv-endpoint={rdzv_endpoint}",
        f"--rdzv-id={rdzv_id}",
        f"--max-restarts={max_restarts}",
        f"--signals-to-handle={TORCHRUN_SIGNALS}",
        f"--shutdown-timeout={shutdown_timeout_s}",
        "--no-python",
        program,
        *argv,
    ]


def build_deepspeed_command(
    argv: Sequence[str],
    *,
    hostfile: str,
    master_addr: str,
    master_port: int = 29500,
    num_nodes: Optional[int] = None,
    num_gpus: Optional[int] = None,
    module: str = CLI_MODULE,
) -> list[str]:
    """The `deepspeed` launcher over an MPI-style hostfile (`host slots=8` lines; pdsh + ssh).

    `--no_local_rank` matters: without it the launcher appends `--local_rank=N`, which is not
    a drpo-train option (the rank comes from LOCAL_RANK in the environment). `--module` runs
    the CLI with the launcher's own interpreter on every node, so the remote PATH need not
    hold `drpo-train`.
    """
    if not 0 < master_port < 65536:
        raise ValueError(f"master_port={master_port} must be in 1..65535")
    cmd = ["deepspeed", f"--hostfile={hostfile}", f"--master_addr={master_addr}", f"--master_port={master_port}"]
    if num_nodes is not None:
        cmd.append(f"--num_nodes={num_nodes}")
    if num_gpus is not None:
        cmd.append(f"--num_gpus={num_gpus}")
    return [*cmd, "--no_local_rank", "--module", module, *argv]


def build_srun_command(
    argv: Sequence[str], *, nnodes: int, gpus_per_node: int = GPUS_PER_NODE, program: str = CLI_PROGRAM
) -> list[str]:
    """srun with one task per GPU; each task sees all of its node's GPUs and picks LOCAL_RANK.

    Tasks must not be bound to one GPU each (no --gpus-per-task): LOCAL_RANK indexes the
    node's visible devices. `--kill-on-bad-exit=1` ends the step when any rank fails, instead
    of leaving the others blocked in a collective until the time limit.
    """
    if nnodes < 1 or gpus_per_node < 1:
        raise ValueError(f"nnodes={nnodes} and gpus_per_node={gpus_per_node} must both be >= 1")
    return [
        "srun",
        f"--nodes={nnodes}",
        f"--ntasks-per-node={gpus_per_node}",
        f"--ntasks={nnodes * gpus_per_node}",
        "--kill-on-bad-exit=1",
        program,
        *argv,
    ]


@dataclass
class DistContext:
    rank: int
    world_size: int
    local_rank: int
    device: "object"  # torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_distributed(backend: str = "auto") -> DistContext:
    """Initialise the default process group (1 process too) and pick this rank's device."""
    if launched_externally() == "slurm":
        os.environ.update(slurm_to_torch_env(dict(os.environ)))
    for var, default in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0"), ("MASTER_ADDR", "127.0.0.1")):
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
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    import deepspeed

    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(dist_backend=backend)
    return DistContext(
        rank=torch.distributed.get_rank(),
        world_size=torch.distributed.get_world_size(),
        local_rank=local_rank,
        device=device,
    )
