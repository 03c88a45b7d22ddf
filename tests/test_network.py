"""Nothing a single-node run opens is reachable from another machine (docs/launch.md, "Ports").

The listening sockets of every process of a real run are read while it runs, from
/proc/<pid>/fd (the process's socket inodes) and /proc/<pid>/net/tcp, tcp6 (the sockets of its
network namespace, by inode): each must be bound to 127.0.0.1 or ::1.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import pytest
from job_helpers import REPO, job_env

from drpo_trainer.runtime import distributed as dist

pytestmark = pytest.mark.skipif(not Path("/proc/self/net/tcp").exists(), reason="reads Linux's /proc")


def listening(pid: int) -> list[tuple[str, int]]:
    """(address, port) of every TCP socket `pid` listens on."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:  # closed meanwhile
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    out = []
    for table, family in (("tcp", socket.AF_INET), ("tcp6", socket.AF_INET6)):
        with open(f"/proc/{pid}/net/{table}") as f:
            next(f)
            for line in f:
                fields = line.split()
                if fields[3] != "0A" or fields[9] not in inodes:  # 0A: TCP_LISTEN
                    continue
                addr, port = fields[1].split(":")
                raw = bytes.fromhex(addr)  # the kernel prints each 32-bit word in host (little-endian) order
                raw = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
                out.append((socket.inet_ntop(family, raw), int(port, 16)))
    return out


def process_tree(pid: int) -> list[int]:
    pids = [pid]
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                for child in f.read().split():
                    pids += process_tree(int(child))
    except OSError:  # exited meanwhile
        pass
    return pids


def watch(cmd: list[str], **kw) -> tuple[int, str, dict[int, set]]:
    """Run `cmd`; every 0.1 s until it exits, record the listening sockets of it and its descendants."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, **kw)
    seen: dict[int, set] = {}
    deadline = time.monotonic() + 240
    while proc.poll() is None and time.monotonic() < deadline:
        for pid in process_tree(proc.pid):
            try:
                seen.setdefault(pid, set()).update(listening(pid))
            except OSError:
                pass
        time.sleep(0.1)
    if proc.poll() is None:
        proc.kill()
    _, err = proc.communicate()
    return proc.returncode, err, seen


def is_loopback(address: str) -> bool:
    return ipaddress.ip_address(address).is_loopback


# -- the probe itself can see a socket that is open to the network --------------------------------
def test_the_probe_sees_torchs_default_store_listening_on_every_interface():
    """What the run's store would be without the loopback binding (and what it was before)."""
    import torch

    store = torch.distributed.TCPStore("127.0.0.1", 0, 1, True, timedelta(seconds=10))
    assert ("::", store.port) in listening(os.getpid()) or ("0.0.0.0", store.port) in listening(os.getpid())
    ours = dist.store_server(dist.LOOPBACK, 0, 1, timedelta(seconds=10))
    assert ("127.0.0.1", ours.port) in listening(os.getpid())
    assert ("::", ours.port) not in listening(os.getpid()) and ("0.0.0.0", ours.port) not in listening(os.getpid())
    ours.set("k", "v")
    assert torch.distributed.TCPStore("127.0.0.1", ours.port, 1, False).get("k") == b"v"


# -- real runs ------------------------------------------------------------------------------------
def test_a_lone_process_listens_on_loopback_only():
    """`drpo-train` with one process initialises its group in-process (setup_distributed): its store
    and gloo listen on loopback, even when the environment names other interfaces."""
    script = (
        "import os, sys; from drpo_trainer.runtime.distributed import setup_distributed; "
        "ctx = setup_distributed('gloo'); print(os.environ['MASTER_PORT'], file=sys.stderr, flush=True); "
        "sys.stdin.readline()"
    )
    env = job_env(GLOO_SOCKET_IFNAME="eth0", MASTER_ADDR="0.0.0.0")  # left over from a cluster shell
    proc = subprocess.Popen(
        [sys.executable, "-c", script], cwd=REPO, env=env, stdin=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        port = int(proc.stderr.readline().strip().split()[-1])
        socks = listening(proc.pid)
    finally:
        proc.communicate("\n", timeout=60)
    assert proc.returncode == 0
    assert ("127.0.0.1", port) in socks  # the store, and at least one gloo socket besides it
    assert len(socks) >= 2 and all(is_loopback(a) for a, _ in socks), socks


@pytest.mark.distributed
def test_a_two_process_run_listens_on_loopback_only(tiny_model_dir, tmp_path):
    """The asynchronous layout on one machine: torchrun's agent (the rendezvous store), a learner
    (its gloo group, DeepSpeed, the bridge's data group) and a rollout process (the weights group)."""
    cmd = [sys.executable, "-m", "drpo_trainer.cli", "--config", "configs/tiny_cpu.yaml"]
    cmd += [f"model.path={tiny_model_dir}", f"output_dir={tmp_path / 'run'}", "trainer.max_steps=1"]
    cmd += ["eval.files={}", "checkpoint.export_final=false", "tracking.progress_bar=false"]
    cmd += ["trainer.prompts_per_step=4", "rollout.samples_per_prompt=2", "distributed.nproc_per_node=2"]
    cmd += ["distributed.rollout_processes=1", "trainer.max_off_policy_steps=1", "algorithm.mismatch_correction=tis"]
    rc, err, seen = watch(cmd, cwd=REPO, env=job_env(GLOO_SOCKET_IFNAME="eth0"))
    assert rc == 0, err[-3000:]
    socks = {pid: s for pid, s in seen.items() if s}
    # the CLI (no sockets), the launcher hosting the store, learner and rollout process (gloo each);
    # a child forked meanwhile (a reward worker, a compiler DeepSpeed starts) may hold inherited sockets
    assert len(socks) >= 3, seen
    open_ = sorted({(pid, a, p) for pid, s in socks.items() for a, p in s if not is_loopback(a)})
    assert not open_, f"listening beyond loopback: {open_}"
    assert "metrics.jsonl" in os.listdir(tmp_path / "run")


# -- the rules --------------------------------------------------------------------------------------
def test_the_store_binds_to_the_address_the_launcher_names():
    assert dist.bind_address("127.0.0.1") == "127.0.0.1"
    assert dist.bind_address("localhost") == "127.0.0.1"
    assert dist.bind_address("10.1.2.3") == "10.1.2.3"
    assert dist.bind_address("[fd00::2]") == "fd00::2"
    assert dist.bind_address("node-001") is None  # a host name: every interface (torch's own store)


def test_single_node_variables_point_gloo_and_nccl_at_loopback():
    env = dist.single_node_env()
    assert env["MASTER_ADDR"] == "127.0.0.1"
    assert env["GLOO_SOCKET_IFNAME"] == env["NCCL_SOCKET_IFNAME"] == "lo"  # Linux's loopback interface


def test_a_store_address_that_is_not_this_machines_is_one_line_with_a_fix():
    with pytest.raises(RuntimeError, match=r"cannot listen on 203\.0\.113\.77:0 .*Fix: set MASTER_PORT"):
        dist.listening_socket("203.0.113.77", 0)  # TEST-NET-3: an address of no interface here
