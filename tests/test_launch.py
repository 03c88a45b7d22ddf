"""Launchers: detection, the local and multi-node command lines, the launch/ scripts and the Dockerfile."""

import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from drpo_trainer.runtime.distributed import (
    STOP_GRACE_S,
    _first_slurm_host,
    build_launch_command,
    free_port,
    launched_externally,
    slurm_to_torch_env,
)


def test_local_launch_command_reruns_the_cli_under_torch_distributed_run():
    cmd = build_launch_command(2, ["--config", "c.yaml", "trainer.max_steps=3"], python="py")
    assert cmd[:3] == ["py", "-m", "drpo_trainer.runtime.local_launch"]  # torchrun, its store on loopback
    assert "--nproc_per_node=2" in cmd and "--nnodes=1" in cmd
    assert not any(a.startswith(("--master", "--store_port")) for a in cmd)  # the port is chosen when bound
    i = cmd.index("drpo_trainer.cli")
    assert cmd[i - 1] == "-m" and cmd[i + 1 :] == ["--config", "c.yaml", "trainer.max_steps=3"]
    assert build_launch_command(2, [], master_port=12345, python="py")[3] == "--store_port=12345"


def test_local_launch_runs_torchrun_with_its_store_already_listening_on_loopback(monkeypatch):
    """torchrun gets --master_addr=127.0.0.1 and the port of a store that listens there only; its
    own TCPStore on that port shares that server (multi-tenant) instead of opening one on every interface."""
    import torch.distributed.run
    from test_network import listening

    from drpo_trainer.runtime import local_launch

    got = {}

    def fake_torchrun(args):
        got["args"] = args
        got["port"] = port = int(args[1].split("=")[1])
        got["listening"] = [s for s in listening(os.getpid()) if s[1] == port]
        store = torch.distributed.TCPStore("127.0.0.1", port, 1, True, multi_tenant=True)  # as torchrun's is made
        store.set("k", "v")
        got["clients_see"] = torch.distributed.TCPStore("127.0.0.1", port, 1, False).get("k")
        got["after"] = [s for s in listening(os.getpid()) if s[1] == port]

    monkeypatch.setattr(torch.distributed.run, "main", fake_torchrun)
    monkeypatch.setattr(os, "environ", dict(os.environ))
    local_launch.main(["--nproc_per_node=2", "--nnodes=1", "-m", "drpo_trainer.cli", "--config", "c.yaml"])
    assert got["args"][0] == "--master_addr=127.0.0.1" and got["args"][2:4] == ["--nproc_per_node=2", "--nnodes=1"]
    assert got["listening"] == got["after"] == [("127.0.0.1", got["port"])] and got["clients_see"] == b"v"
    assert os.environ["GLOO_SOCKET_IFNAME"] == "lo" and os.environ["MASTER_ADDR"] == "127.0.0.1"


def test_detects_launchers():
    assert launched_externally({}) is None
    torchrun = {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "TORCHELASTIC_RUN_ID": "x"}
    assert launched_externally(torchrun) == "torchrun"
    assert (
        launched_externally({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "ACCELERATE_USE_DEEPSPEED": "true"})
        == "accelerate"
    )
    assert launched_externally({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"}) is not None
    # an sbatch shell (no job step) is not a launcher: drpo-train then starts its own processes
    assert launched_externally({"SLURM_PROCID": "0", "SLURM_NTASKS": "8"}) is None
    assert launched_externally({"SLURM_PROCID": "3", "SLURM_NTASKS": "8", "SLURM_STEP_ID": "0"}) == "slurm"


def test_slurm_env_translation():
    env = {"SLURM_PROCID": "5", "SLURM_NTASKS": "16", "SLURM_LOCALID": "1", "SLURM_STEP_NODELIST": "gpu[07-08]"}
    out = slurm_to_torch_env(env)
    assert out == {"RANK": "5", "WORLD_SIZE": "16", "LOCAL_RANK": "1", "MASTER_PORT": "29500", "MASTER_ADDR": "gpu07"}
    assert _first_slurm_host("node1,node2") == "node1"
    assert _first_slurm_host("a[3,5-9]") == "a3"


# ---------------------------------------------------------------------------------------------
# Multi-node command lines: the launch/ scripts, checked against the launchers' own argument parsers.

ROOT = Path(__file__).resolve().parents[1]


def _torchrun_args(cmd):
    from torch.distributed.run import get_args_parser

    return get_args_parser().parse_args(cmd)


def test_local_launch_command_gives_workers_time_to_checkpoint_and_forwards_sigusr1():
    cmd = build_launch_command(4, ["--config", "c.yaml"], python="py")
    args = _torchrun_args(["--master_addr=127.0.0.1", "--master_port=29511", *cmd[3:]])  # as local_launch adds them
    assert args.shutdown_timeout == STOP_GRACE_S == 1800  # torchrun's default would SIGKILL after 30 s
    assert "SIGUSR1" in args.signals_to_handle.split(",") and "SIGTERM" in args.signals_to_handle.split(",")
    assert (args.nproc_per_node, args.nnodes, args.master_port, args.module) == ("4", "1", 29511, True)
    assert (args.training_script, args.training_script_args) == ("drpo_trainer.cli", ["--config", "c.yaml"])


def _multinode_dry_run(user, **env):
    env = {**os.environ, "RDZV_HOST": "node-001", "NNODES": "2", "DRY_RUN": "1", **env}
    out = subprocess.run(
        ["bash", str(ROOT / "launch/torchrun_multinode.sh"), *user], env=env, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    return out.stdout.splitlines()


def test_multinode_script_runs_valid_torchrun_with_c10d_rendezvous():
    cmd = _multinode_dry_run(["--config", "x.yaml", "trainer.max_steps=5"])
    assert cmd == [
        "torchrun",
        "--nnodes=2",
        "--nproc-per-node=gpu",  # one process per visible GPU (torchrun's "auto" would count CPUs)
        "--rdzv-backend=c10d",
        "--rdzv-endpoint=node-001:29500",
        "--rdzv-id=drpo",
        "--max-restarts=0",
        "--signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1",
        "--shutdown-timeout=1800",
        "--no-python",
        "drpo-train",
        "--resume",
        "auto",
        "--config",
        "x.yaml",
        "trainer.max_steps=5",
    ]
    args = _torchrun_args(cmd[1:])
    assert (args.nnodes, args.nproc_per_node, args.rdzv_backend, args.rdzv_endpoint, args.rdzv_id) == (
        "2",
        "gpu",
        "c10d",
        "node-001:29500",
        "drpo",
    )
    assert args.no_python and args.max_restarts == 0 and args.shutdown_timeout == STOP_GRACE_S
    assert "SIGUSR1" in args.signals_to_handle.split(",")
    assert args.training_script == "drpo-train"
    # the argv reaches drpo-train's own parser unchanged
    from drpo_trainer.cli import _parser

    parsed = _parser().parse_args(args.training_script_args)
    assert (parsed.resume, parsed.config, parsed.overrides) == ("auto", "x.yaml", ["trainer.max_steps=5"])
    knobs = _multinode_dry_run([], NPROC_PER_NODE="4", RDZV_PORT="1234", RDZV_ID="job7", SHUTDOWN_TIMEOUT="60")
    args = _torchrun_args(knobs[1:])
    assert (args.nproc_per_node, args.rdzv_endpoint, args.rdzv_id, args.shutdown_timeout) == (
        "4",
        "node-001:1234",
        "job7",
        60,
    )


def test_multinode_script_names_the_missing_variable():
    env = {k: v for k, v in os.environ.items() if k not in ("RDZV_HOST", "NNODES")}
    out = subprocess.run(
        ["bash", str(ROOT / "launch/torchrun_multinode.sh"), "--config", "x.yaml"],
        env=env,
        capture_output=True,
        text=True,
    )
    assert out.returncode != 0 and "RDZV_HOST" in out.stderr


_FAKE_TORCHRUN = """#!/bin/bash
printf '%s\\n' "$@" > "$STUB_DIR/torchrun_args"
if [ "$STUB_PREEMPT" = 1 ]; then echo 7 > "$STUB_OUT/PREEMPTED"; fi
exit "$STUB_EXIT"
"""


@pytest.mark.parametrize(
    "stale_marker, preempt, stub_exit, want_rc",
    [(False, True, 1, 75), (True, False, 1, 1), (True, False, 0, 0)],
)
def test_multinode_script_exit_code_follows_the_preempted_marker(tmp_path, stale_marker, preempt, stub_exit, want_rc):
    """torchrun's exit code after a stop is its own; the script reports 75 exactly when this run
    wrote output_dir/PREEMPTED (a marker left by an earlier run is cleared first)."""
    out_dir = tmp_path / "run"
    out_dir.mkdir()
    if stale_marker:
        (out_dir / "PREEMPTED").write_text("3")
    (tmp_path / "torchrun").write_text(_FAKE_TORCHRUN)
    (tmp_path / "torchrun").chmod(0o755)
    env = {
        **os.environ,
        "PATH": f"{tmp_path}:{Path(sys.executable).parent}:{os.environ['PATH']}",  # drpo-train for --print-config
        "RDZV_HOST": "node-001", "NNODES": "1", "STUB_DIR": str(tmp_path), "STUB_OUT": str(out_dir),
        "STUB_PREEMPT": "1" if preempt else "0", "STUB_EXIT": str(stub_exit),
    }  # fmt: skip
    user = ["--config", str(ROOT / "configs/tiny_cpu.yaml"), f"output_dir={out_dir}"]
    res = subprocess.run(
        ["bash", str(ROOT / "launch/torchrun_multinode.sh"), *user], env=env, capture_output=True, text=True
    )
    assert res.returncode == want_rc, res.stderr
    assert (tmp_path / "torchrun_args").read_text().splitlines()[-5:] == ["--resume", "auto", *user]


_WORKER = textwrap.dedent(
    """
    import os, signal, sys, time
    from pathlib import Path
    from drpo_trainer.runtime.distributed import launched_externally
    out = Path(sys.argv[1]); rank = os.environ["RANK"]; stop = []
    signal.signal(signal.SIGUSR1, lambda *_: stop.append(1))
    (out / f"ready{rank}").write_text("")
    while not stop:
        time.sleep(0.05)
    time.sleep(3)  # "finishing the step": longer than the 1 s default shutdown timeout set below
    env = os.environ
    (out / f"stopped{rank}").write_text(f"{launched_externally()} {env['WORLD_SIZE']} {env['LOCAL_RANK']}")
    sys.exit(75)
    """
)


@pytest.mark.distributed
def test_torchrun_forwards_sigusr1_and_waits_for_the_checkpoint(tmp_path):
    """A real torchrun with the script's flags: SIGUSR1 reaches every worker, and they get the
    grace to finish (TORCH_ELASTIC_SHUTDOWN_TIMEOUT=1 would kill them without our flag)."""
    script = _multinode_dry_run(
        [], NNODES="1", NPROC_PER_NODE="2", RDZV_HOST="127.0.0.1", RDZV_PORT=str(free_port()), SHUTDOWN_TIMEOUT="60"
    )
    flags = script[1 : script.index("--no-python") + 1]  # torchrun's own flags, as the script passes them
    cmd = [sys.executable, "-m", "torch.distributed.run", *flags, sys.executable, "-c", _WORKER, str(tmp_path)]
    env = {**os.environ, "TORCH_ELASTIC_SHUTDOWN_TIMEOUT": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not all((tmp_path / f"ready{r}").exists() for r in (0, 1)):
            assert proc.poll() is None and time.monotonic() < deadline, (
                proc.stderr.read() if proc.poll() is not None else "timeout"
            )
            time.sleep(0.1)
        proc.send_signal(signal.SIGUSR1)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert (tmp_path / "stopped0").read_text() == "torchrun 2 0"
    assert (tmp_path / "stopped1").read_text() == "torchrun 2 1"
    assert proc.returncode != 0  # torchrun reports the signal, not 75: scripts read output_dir/PREEMPTED


# ---------------------------------------------------------------------------------------------
# DeepSpeed launcher


def test_hostfile_example_parses_and_its_command_is_a_valid_deepspeed_launch():
    from deepspeed.launcher.runner import fetch_hostfile, parse_args

    path = ROOT / "launch/hostfile.example"
    assert dict(fetch_hostfile(str(path))) == {"node-001": 8, "node-002": 8}
    m = re.search(r"#\s+(deepspeed .*?\\\n#\s+.*?)\n", path.read_text())
    shown = m.group(1).replace("\\\n#", " ").split()
    assert shown[0] == "deepspeed"
    args = parse_args(shown[1:])
    assert (args.hostfile, args.master_addr, args.master_port) == ("launch/hostfile", "node-001", 29500)
    # without --no_local_rank the launcher appends --local_rank=N, which drpo-train rejects
    assert args.no_local_rank and args.module and args.user_script == "drpo_trainer.cli"
    assert args.user_args == ["--config", "configs/qwen3_30b_a3b_base_drpo.yaml", "--resume", "auto"]
    assert (ROOT / args.user_args[1]).is_file()
    # docs/launch.md shows the same command
    docs = " ".join((ROOT / "docs/launch.md").read_text().replace("\\\n", " ").split())
    assert " ".join(shown) in docs


# ---------------------------------------------------------------------------------------------
# SLURM: the sbatch script, run against stand-ins for srun and scontrol.


_FAKE_SRUN = """#!/bin/bash
printf '%s\\n' "$@" > "$STUB_DIR/srun_args"
echo "$MASTER_ADDR:$MASTER_PORT" > "$STUB_DIR/master"
trap 'echo USR1 > "$STUB_DIR/signal"; exit 75' USR1
trap 'echo TERM > "$STUB_DIR/signal"; exit 75' TERM
if [ -n "${STUB_EXIT:-}" ]; then exit "$STUB_EXIT"; fi
touch "$STUB_DIR/ready"
while :; do sleep 0.05; done
"""
_FAKE_SCONTROL = """#!/bin/bash
echo "$*" >> "$STUB_DIR/scontrol.log"
if [ "$1 $2" = "show hostnames" ]; then echo gpu07; echo gpu08; fi
"""


def _run_sbatch(tmp_path, send=None, **extra_env):
    for name, body in (("srun", _FAKE_SRUN), ("scontrol", _FAKE_SCONTROL)):
        (tmp_path / name).write_text(body)
        (tmp_path / name).chmod(0o755)
    env = {
        **os.environ,
        "PATH": f"{tmp_path}:{os.environ['PATH']}",
        "STUB_DIR": str(tmp_path),
        "SLURM_JOB_ID": "4242",
        "SLURM_JOB_NUM_NODES": "2",
        "SLURM_NTASKS_PER_NODE": "8",
        "SLURM_JOB_NODELIST": "gpu[07-08]",
        **extra_env,
    }
    env.pop("MASTER_PORT", None)
    proc = subprocess.Popen(
        ["bash", str(ROOT / "launch/slurm_train.sbatch"), "--config", "c.yaml", "trainer.max_steps=9"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    if send is not None:
        deadline = time.monotonic() + 20
        while not (tmp_path / "ready").exists():
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.05)
        proc.send_signal(send)
    out, _ = proc.communicate(timeout=30)
    calls = (tmp_path / "scontrol.log").read_text().splitlines() if (tmp_path / "scontrol.log").exists() else []
    return proc.returncode, out, calls


def test_sbatch_forwards_sigusr1_and_requeues_after_the_checkpoint(tmp_path):
    rc, out, calls = _run_sbatch(tmp_path, send=signal.SIGUSR1)
    assert rc == 75, out
    assert (tmp_path / "signal").read_text().strip() == "USR1"  # reached the job step
    assert calls == ["show hostnames gpu[07-08]", "requeue 4242"]
    srun_args = (tmp_path / "srun_args").read_text().splitlines()
    assert srun_args == [
        "--nodes=2", "--ntasks-per-node=8", "--ntasks=16", "--kill-on-bad-exit=1",
        "drpo-train", "--resume", "auto", "--config", "c.yaml", "trainer.max_steps=9",
    ]  # fmt: skip
    # rank 0's host from scontrol; port 20000 + 4242 % 20000 = 24242
    assert (tmp_path / "master").read_text().strip() == "gpu07:24242"


def test_sbatch_sigterm_checkpoints_but_does_not_requeue(tmp_path):
    rc, out, calls = _run_sbatch(tmp_path, send=signal.SIGTERM)
    assert rc == 75 and (tmp_path / "signal").read_text().strip() == "TERM"
    assert calls == ["show hostnames gpu[07-08]"], out  # scancel means stop; SLURM requeues preemptions itself


@pytest.mark.parametrize("stub_exit", ["0", "1", "75"])
def test_sbatch_requeues_only_on_its_own_warning_signal(tmp_path, stub_exit):
    rc, out, calls = _run_sbatch(tmp_path, STUB_EXIT=stub_exit)
    assert rc == int(stub_exit), out
    assert calls == ["show hostnames gpu[07-08]"]


def test_sbatch_stops_requeueing_after_max_requeues(tmp_path):
    rc, out, calls = _run_sbatch(tmp_path, send=signal.SIGUSR1, SLURM_RESTART_COUNT="3", MAX_REQUEUES="3")
    assert rc == 75 and calls == ["show hostnames gpu[07-08]"] and "MAX_REQUEUES=3" in out


def test_sbatch_script_asks_for_the_warning_signal_and_requeue():
    text = (ROOT / "launch/slurm_train.sbatch").read_text()
    assert re.search(r"^#SBATCH --signal=B:USR1@\d+$", text, re.M) and re.search(r"^#SBATCH --requeue$", text, re.M)
    assert "--gpus-per-task" not in text  # LOCAL_RANK indexes all of the node's GPUs


# ---------------------------------------------------------------------------------------------
# Docker image


def test_dockerfile_pins_a_tested_vllm_and_runs_any_command():
    from drpo_trainer.rollout.vllm_engine import check_vllm_version

    text = (ROOT / "Dockerfile").read_text()
    version = re.search(r"^ARG VLLM_VERSION=(\S+)$", text, re.M).group(1)
    check_vllm_version(version)  # raises outside the engine's tested range
    assert re.search(r"^FROM vllm/vllm-openai:v\$\{VLLM_VERSION\}$", text, re.M)
    assert re.search(r"^ENTRYPOINT \[\]$", text, re.M)  # the base image would start the vLLM server
    import deepspeed

    assert f'"deepspeed=={deepspeed.__version__}"' in text  # the version tested on CPU here


def test_local_launch_command_leaves_out_flags_an_older_torchrun_lacks(monkeypatch):
    import drpo_trainer.runtime.distributed as dist

    monkeypatch.setattr(dist, "torchrun_options", lambda: frozenset({"--nproc_per_node", "--nnodes"}))
    cmd = dist.build_launch_command(2, ["--config", "c.yaml"], master_port=1, python="py")
    assert not any(a.startswith(("--signals-to-handle", "--shutdown-timeout")) for a in cmd)
    assert cmd[-3:] == ["drpo_trainer.cli", "--config", "c.yaml"]
