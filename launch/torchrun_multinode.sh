#!/usr/bin/env bash
# Multi-node training with torchrun (c10d rendezvous): run THIS SAME COMMAND on every node.
#
#   RDZV_HOST=node-001 NNODES=2 launch/torchrun_multinode.sh --config configs/qwen3_30b_a3b_base_drpo.yaml
#
# Step by step (details in docs/launch.md):
#   1. Every node has the same code, Python environment (or the Docker image), config and data
#      at the same paths; `output_dir` is on a filesystem all nodes share (ZeRO-3 checkpoints are
#      written by every rank).
#   2. RDZV_HOST = a hostname or IP of ONE node that every node can reach (any node; usually the
#      first). RDZV_PORT (default 29500) must be free there and open between nodes.
#   3. Start the command on every node (ssh, pdsh, tmux...). Nodes wait for each other; training
#      starts once NNODES have joined. No node rank is needed.
#   4. To stop with a checkpoint: send SIGTERM or SIGUSR1 to this script (or to torchrun) on every
#      node. The workers finish the current step, write a checkpoint and exit; this script then
#      exits 75. Start the same command again to continue (--resume auto is always passed).
#
# Environment:
#   RDZV_HOST        (required) rendezvous host, see step 2
#   NNODES           (required) number of nodes
#   RDZV_PORT        rendezvous port (29500)
#   NPROC_PER_NODE   processes per node ("gpu" = one per visible GPU)
#   RDZV_ID          job id shared by the nodes; change it for concurrent jobs on one host (drpo)
#   SHUTDOWN_TIMEOUT seconds the workers get to finish a step and checkpoint after a stop signal (1800)
#   DRY_RUN=1        print the torchrun command and exit
#   GLOO_SOCKET_IFNAME, NCCL_SOCKET_IFNAME  the cluster network's interface (e.g. ib0): gloo and NCCL
#                    listen there. The rendezvous store listens on every interface of RDZV_HOST:
#                    only the job's nodes should reach RDZV_PORT (docs/launch.md, "Ports").
set -uo pipefail

: "${RDZV_HOST:?set RDZV_HOST to the hostname or IP of one node that every node can reach (see step 2)}"
: "${NNODES:?set NNODES to the number of nodes, e.g. NNODES=2}"
RDZV_PORT="${RDZV_PORT:-29500}"
NPROC_PER_NODE="${NPROC_PER_NODE:-gpu}"
RDZV_ID="${RDZV_ID:-drpo}"
SHUTDOWN_TIMEOUT="${SHUTDOWN_TIMEOUT:-1800}"
EXIT_PREEMPTED=75

# tests/test_launch.py parses this command with torchrun's own argument parser (DRY_RUN=1 prints it).
cmd=(torchrun
  --nnodes="$NNODES"
  --nproc-per-node="$NPROC_PER_NODE"
  --rdzv-backend=c10d
  --rdzv-endpoint="$RDZV_HOST:$RDZV_PORT"
  --rdzv-id="$RDZV_ID"
  --max-restarts=0
  --signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1
  --shutdown-timeout="$SHUTDOWN_TIMEOUT"
  --no-python drpo-train --resume auto "$@")

if [[ "${DRY_RUN:-0}" == 1 ]]; then
  printf '%s\n' "${cmd[@]}"
  exit 0
fi

# Resolve output_dir first: a bad config fails here in a second, on every node, before any rendezvous.
output_dir="$(drpo-train "$@" --print-config | sed -n 's/^output_dir: *//p')" || exit 2
# A marker left by an earlier stop must not make this run look stopped if it fails before its
# own start-up clears it (every node does this before the rendezvous completes).
rm -f "$output_dir/PREEMPTED"

"${cmd[@]}" &
child=$!
# bash runs traps only between commands, so torchrun runs in the background and we wait on it.
trap 'kill -TERM "$child" 2>/dev/null' TERM INT
trap 'kill -USR1 "$child" 2>/dev/null' USR1
while :; do
  wait "$child"
  rc=$?
  kill -0 "$child" 2>/dev/null || break  # still alive: the wait was interrupted by a trapped signal
done

# torchrun's exit code after a signal is its own, not the workers' 75: the marker tells.
if [[ -f "$output_dir/PREEMPTED" ]]; then
  echo "stopped after a checkpoint (step $(cat "$output_dir/PREEMPTED")); run the same command to continue" >&2
  exit "$EXIT_PREEMPTED"
fi
exit "$rc"
