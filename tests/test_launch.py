"""Launcher: detection of external launchers and the local multi-process command."""

import sys

from drpo_trainer.distributed import (
    _first_slurm_host,
    build_launch_command,
    launched_externally,
    slurm_to_torch_env,
)


def test_local_launch_command_reruns_the_cli_under_torch_distributed_run():
    cmd = build_launch_command(2, ["--config", "c.yaml", "trainer.max_steps=3"], master_port=12345, python="py")
    assert cmd[:3] == ["py", "-m", "torch.distributed.run"]
    assert "--nproc_per_node=2" in cmd and "--master_port=12345" in cmd and "--nnodes=1" in cmd
    i = cmd.index("drpo_trainer.cli")
    assert cmd[i - 1] == "-m" and cmd[i + 1 :] == ["--config", "c.yaml", "trainer.max_steps=3"]


def test_detects_launchers():
    assert launched_externally({}) is None
    torchrun = {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "TORCHELASTIC_RUN_ID": "x"}
    assert launched_externally(torchrun) == "torchrun"
    assert launched_externally({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "ACCELERATE_USE_DEEPSPEED": "true"}) == "accelerate"
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
