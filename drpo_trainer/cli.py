"""`drpo-train`: the command line.

    drpo-train --config configs/tiny_cpu.yaml [key=value ...]      train (or continue: --resume auto)
    drpo-train --config X --print-config                           show the resolved config and exit

On one machine it starts `distributed.nproc_per_node` processes itself, unless it was
started by torchrun, the deepspeed launcher, accelerate launch or srun. Heavy libraries
load only after the config has been validated, so mistakes fail in a second.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from typing import Optional

from drpo_trainer.config import ConfigError, dump_config, load_config

EXIT_CONFIG_ERROR = 2


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="drpo-train",
        description="RL of LLMs on verifiable math with the DRPO objective.",
        epilog="Overrides: dotted key=value after the options, e.g. trainer.max_steps=20 rollout.samples_per_prompt=8",
    )
    p.add_argument("--config", help="YAML file overriding the defaults (see configs/)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("--resume", default=None, help="'auto' (newest valid checkpoint in output_dir) or a checkpoint path")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    return p


def main(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as err:
        print(f"drpo-train: {err}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    if args.print_config:
        print(dump_config(cfg), end="")
        return 0

    from drpo_trainer.distributed import build_launch_command, free_port, launched_externally, resolve_nproc

    nproc = resolve_nproc(cfg.distributed.nproc_per_node)
    if launched_externally() is None and nproc > 1:
        cmd = build_launch_command(nproc, argv, master_port=free_port())
        return _run_children(cmd)

    from drpo_trainer.trainer import train

    try:
        train(cfg, resume=args.resume)
    except ConfigError as err:
        print(f"drpo-train: {err}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    return 0


def _run_children(cmd: list[str]) -> int:
    """Run the local launcher; forward SIGTERM/SIGINT/SIGUSR1 so children checkpoint and exit."""
    import signal

    proc = subprocess.Popen(cmd, env=dict(os.environ, DRPO_LAUNCHED_BY="drpo-train"))

    def forward(signum, _frame):
        proc.send_signal(signum)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
        signal.signal(sig, forward)
    return proc.wait()


if __name__ == "__main__":
    sys.exit(main())
