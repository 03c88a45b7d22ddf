"""`drpo-train`: the command line.

    drpo-train --config configs/tiny_cpu.yaml [key=value ...]      train (or continue: --resume auto)
    drpo-train --config X --print-config                           show the resolved config and exit
    drpo-train eval MODEL --config X [--out DIR] [key=value ...]   a model's avg@n, pass@j, maj@n per eval set
    drpo-train export <checkpoint> <dir> [--overwrite] [--adapter]  checkpoint -> HF safetensors model
                                                                   (LoRA: merged, or the peft adapter)
    drpo-train plot RUN_DIR [RUN_DIR ...] [-o report.png]          runs' metrics.jsonl -> one figure

Exit codes: 0 done, 1 a file could not be written or read (a full disk, an incomplete checkpoint to
export), 2 bad configuration or input, or a file or machine check that failed before loading (for
plot: a directory that is not a run, or an image format it cannot write), 75 stopped by
SIGTERM/SIGUSR1 after a checkpoint.

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


COMMANDS = """commands:
  drpo-train [train] --config X [key=value ...]  train a policy (the default command; --resume auto continues)
  drpo-train eval MODEL --config X               evaluate a model or checkpoint: avg@n, pass@j, maj@n per eval set
  drpo-train export CHECKPOINT DIR               convert a checkpoint to a Hugging Face model directory
  drpo-train plot RUN_DIR [RUN_DIR ...]          draw runs' metrics.jsonl as one figure
`drpo-train COMMAND --help` shows a command's options."""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="drpo-train",
        description="RL of LLMs on verifiable math with the DRPO objective.\n\n" + COMMANDS,
        epilog="Overrides: dotted key=value after the options, e.g. trainer.max_steps=20 rollout.samples_per_prompt=8",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", help="YAML file overriding the defaults (see configs/)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("--resume", default=None, help="'auto' (newest valid checkpoint in output_dir) or a checkpoint path")
    p.add_argument(
        "--allow-config-change",
        default="",
        metavar="KEYS",
        help="comma-separated keys (or sections) that may differ from the resumed checkpoint's config, "
        "e.g. trainer.max_steps,optim; 'data.contents' allows other training data",
    )
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed launcher
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    return p


def main(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["train"]:
        argv = argv[1:]
    if argv[:1] == ["eval"]:
        return _eval(argv[1:])
    if argv[:1] == ["export"]:
        return _export(argv[1:])
    if argv[:1] == ["plot"]:
        return _plot(argv[1:])
    args = _parser().parse_intermixed_args(argv)  # overrides may come before and after options
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as err:
        print(f"drpo-train: {err}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    if args.print_config:
        print(dump_config(cfg), end="")
        return 0

    from drpo_trainer.runtime.distributed import build_launch_command, launched_externally, resolve_nproc

    nproc = resolve_nproc(cfg.distributed.nproc_per_node)
    trains_here = launched_externally() is not None or nproc == 1
    if trains_here:  # from now on a SIGTERM asks for a clean stop instead of killing the start-up
        from drpo_trainer.runtime.stop import StopFlag

        stop = StopFlag()
    launch = int(os.environ["WORLD_SIZE"]) if "WORLD_SIZE" in os.environ else nproc * cfg.distributed.nnodes
    try:
        # config rules that need the launch's process count, then facts about this machine and its files
        learners = cfg.learner_processes(launch)  # the processes that train (the rest only sample)
        cfg.check_world(learners)  # before any heavy import or process start
        from drpo_trainer.runtime.preflight import preflight

        rank = int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", 0)))  # in the whole launch
        samples = not trains_here or not cfg.distributed.rollout_processes or rank >= learners
        preflight(cfg, int(os.environ.get("LOCAL_WORLD_SIZE", nproc)), samples=samples)
        from drpo_trainer.runtime.run_identity import check_resume, check_world_change

        allowed = [k.strip() for k in args.allow_config_change.split(",") if k.strip()]
        changes = check_resume(cfg, args.resume, allowed)
        check_world_change(cfg, args.resume, learners)
        from drpo_trainer.io.run_dir import check_output_dir

        check_output_dir(cfg.output_dir, args.resume)  # a new run never writes over another one
    except ConfigError as err:
        print(f"drpo-train: {err}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    if changes and int(os.environ.get("RANK", 0)) == 0 and trains_here:
        print("drpo-train: resuming with changed settings: " + "; ".join(changes), file=sys.stderr)
    if not trains_here:
        cmd = build_launch_command(nproc, argv)  # its store listens on a free loopback port
        return _run_children(cmd, cfg.output_dir)

    from drpo_trainer.io.checkpoint import CheckpointWriteError
    from drpo_trainer.io.data import DataError
    from drpo_trainer.runtime.bridge import PeerLost
    from drpo_trainer.runtime.loop import TrainingDiverged
    from drpo_trainer.runtime.process import run_process

    try:
        run_process(cfg, resume=args.resume, stop=stop)
    except (ConfigError, DataError) as err:
        print(f"drpo-train: {err}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    # a non-finite step, a full disk (the checkpoints are intact), a lost peer (its own log says why)
    except (TrainingDiverged, CheckpointWriteError, PeerLost) as err:
        print(f"drpo-train: {err}", file=sys.stderr, flush=True)
        return 1
    return 0


def _run_children(cmd: list[str], output_dir: str) -> int:
    """Run the local launcher; a stop signal reaches the workers as SIGTERM (torchrun forwards
    SIGTERM and would die of SIGUSR1), they checkpoint and exit; we then exit 75."""
    import signal
    from pathlib import Path

    from drpo_trainer.runtime.stop import EXIT_PREEMPTED, PREEMPTED_MARKER

    proc = subprocess.Popen(cmd)
    stopping = []

    def forward(signum, _frame):
        stopping.append(signum)
        proc.send_signal(signal.SIGINT if signum == signal.SIGINT else signal.SIGTERM)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
        signal.signal(sig, forward)
    rc = proc.wait()
    if stopping and (Path(output_dir) / PREEMPTED_MARKER).exists():
        return EXIT_PREEMPTED
    return rc


def _export(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="drpo-train export", description="Checkpoint -> Hugging Face model directory.")
    p.add_argument("checkpoint", help="a checkpoints/step_* directory")
    p.add_argument("out_dir", help="where to write config.json, model.safetensors and the tokenizer")
    p.add_argument(
        "--dtype", default=None, choices=["float32", "bfloat16", "float16"], help="default: the run's model.dtype"
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a non-empty out_dir that is not an earlier export (never the current directory, a run "
        "directory or the checkpoint itself)",
    )
    p.add_argument(
        "--adapter",
        action="store_true",
        help="a LoRA checkpoint (model.lora): write the peft adapter directory (adapter_config.json + "
        "adapter_model.safetensors, loaded with peft.PeftModel.from_pretrained) instead of the merged model",
    )
    args = p.parse_args(argv)
    from drpo_trainer.io.export import export_checkpoint

    try:
        out = export_checkpoint(
            args.checkpoint, args.out_dir, dtype=args.dtype, overwrite=args.overwrite, adapter=args.adapter
        )
    except ConfigError as err:  # a target it may not replace, a file that could run code
        print(f"drpo-train export: {err}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    except OSError as err:  # an incomplete checkpoint, a full disk
        print(f"drpo-train export: {err}", file=sys.stderr)
        return 1
    print(f"exported {args.checkpoint} -> {out}")
    return 0


def _eval(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="drpo-train eval",
        description="Evaluate a model on the config's eval sets with the training run's engine, verifier and eval "
        "settings: avg@n, pass@j and maj@n per set (docs/evaluation.md). Writes metrics.json, samples.jsonl and "
        "eval_config.yaml, and prints a table.",
        epilog="Overrides: dotted key=value, e.g. eval.max_problems=32 eval.samples_per_prompt=16",
    )
    p.add_argument(
        "model",
        help="a Hugging Face model directory (e.g. runs/NAME/final), builtin:tiny-math, a hub id in the local "
        "cache, or a checkpoint directory (runs/NAME/checkpoints/step_*)",
    )
    p.add_argument("--config", help="YAML file: the eval sets, engine, verifier and sampling settings")
    p.add_argument(
        "--out",
        default=None,
        help="directory for the results; default <output_dir>/eval/<model name>. Refused when it holds other files "
        "than an earlier evaluation's",
    )
    p.add_argument(
        "--step",
        type=int,
        default=0,
        help="sample with the seeds of a one-process training run's eval at this step (default 0)",
    )
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    args = p.parse_intermixed_args(argv)
    from pathlib import Path

    from drpo_trainer.io.data import DataError
    from drpo_trainer.runtime.eval_command import check_eval, default_out, run_eval, table

    try:
        cfg = load_config(args.config, args.overrides)
        out = Path(args.out) if args.out else default_out(cfg, args.model)
        check_eval(cfg, args.model, out)
        result = run_eval(cfg, args.model, out, step=args.step, config_file=args.config)
    except (ConfigError, DataError) as err:
        print(f"drpo-train eval: {err}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    except OSError as err:  # a full disk, an unreadable file
        print(f"drpo-train eval: {err}", file=sys.stderr)
        return 1
    print(table(result))
    print(f"wrote {out / 'metrics.json'} and {out / 'samples.jsonl'}")
    return 0


def _plot(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="drpo-train plot",
        description="One figure of the runs' metrics.jsonl against step: reward, eval, lengths, entropy, the "
        "loss's trust-region metrics, train-inference mismatch, ratios, grad norm, lr, time per phase. "
        "Works on a run that is still going.",
    )
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="output_dir of a run (holds metrics.jsonl)")
    p.add_argument("-o", "--out", default="report.png", help="image to write (.png, .pdf, .svg); default report.png")
    p.add_argument("--labels", default=None, help="comma-separated line labels, one per RUN_DIR; default: dir names")
    p.add_argument(
        "--smooth",
        type=int,
        default=1,
        metavar="N",
        help="trailing moving average over the last N logged steps of the training metrics (eval points are "
        "drawn as logged); default 1 = off",
    )
    args = p.parse_args(argv)
    from drpo_trainer.io.plot import PlotError, make_report

    labels = [s.strip() for s in args.labels.split(",")] if args.labels is not None else None
    try:
        fig = make_report(args.run_dirs, args.out, labels=labels, smooth=args.smooth)
    except PlotError as err:
        print(f"drpo-train plot: {err}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    print(f"wrote {args.out} ({len(fig.axes) - sum(not a.get_visible() for a in fig.axes)} panels)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
