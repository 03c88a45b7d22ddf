"""Where metrics go: `<output_dir>/metrics.jsonl`, Weights & Biases, and the console.

Only rank 0 tracks. W&B never hangs a run: `online` without an API key falls back to
`offline` with one message; every log call names its `step` explicitly so that a
resumed run keeps increasing steps in the same W&B run (its id is in the checkpoint).
"""

from __future__ import annotations

import json
import math
import os
import secrets
import string
import sys
from pathlib import Path
from typing import Optional

from drpo_trainer.config import Config, dump_config


def _has_wandb_key() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path.home() / ".netrc"
    return netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="ignore")


def _clean(v):
    if isinstance(v, float) and not math.isfinite(v):
        return None if math.isnan(v) else (1e308 if v > 0 else -1e308)
    return v


class Tracker:
    def __init__(self, cfg: Config, *, enabled: bool, run_id: Optional[str] = None, start_step: int = 0) -> None:
        self.enabled = enabled
        self.cfg = cfg
        self.run = None
        self.run_id = run_id
        self.bar = None
        self.recent_rewards: list[float] = []
        if not enabled:
            return
        out = Path(cfg.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        self.path = out / "metrics.jsonl"
        self._truncate_after(start_step)
        self.file = open(self.path, "a", buffering=1)
        self._init_wandb()
        if cfg.tracking.progress_bar:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=cfg.trainer.max_steps, initial=start_step, desc="drpo", unit="step", dynamic_ncols=True)

    def _truncate_after(self, step: int) -> None:
        """On resume, drop lines of steps after the checkpoint: they will be produced again."""
        if not self.path.exists():
            return
        keep = []
        for line in self.path.read_text().splitlines():
            try:
                if json.loads(line).get("step", 0) <= step:
                    keep.append(line)
            except json.JSONDecodeError:
                continue  # a line cut by a crash
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(l + "\n" for l in keep))
        os.replace(tmp, self.path)

    def _init_wandb(self) -> None:
        w = self.cfg.tracking.wandb
        mode = w.mode
        if mode == "disabled":
            return
        if mode == "online" and not _has_wandb_key():
            print(
                "wandb: no API key found (WANDB_API_KEY or `wandb login`); logging offline instead. "
                "Sync later with `wandb sync <output_dir>/wandb/offline-run-*`.",
                file=sys.stderr,
            )
            mode = "offline"
        import wandb

        if self.run_id is None:
            # wandb.util.generate_id is gone in recent wandb; `secrets` leaves the seeded RNGs untouched
            self.run_id = "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))
        self.run = wandb.init(
            project=w.project,
            entity=w.entity,
            name=w.name or Path(self.cfg.output_dir).name,
            tags=w.tags or None,
            id=self.run_id,
            resume="allow",
            mode=mode,
            dir=self.cfg.output_dir,
            config=json.loads(json.dumps(self.cfg.model_dump(mode="json"))),
            settings=wandb.Settings(init_timeout=60, silent=True),
        )

    def log(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        row = {"step": step, **{k: _clean(v) for k, v in sorted(metrics.items())}}
        self.file.write(json.dumps(row) + "\n")
        if self.run is not None:
            self.run.log(metrics, step=step)
        if self.bar is not None:
            post = {}
            if "reward/mean" in metrics:  # a single step's reward is noisy: show the last 10 steps' mean
                self.recent_rewards = (self.recent_rewards + [metrics["reward/mean"]])[-10:]
                post["reward@10"] = f"{sum(self.recent_rewards) / len(self.recent_rewards):.3f}"
            if "time/step" in metrics:
                post["s/step"] = f"{metrics['time/step']:.1f}"
            evals = [k for k in metrics if k.startswith("eval/")]
            for k in evals[:2]:
                post[k.split("/", 1)[1]] = f"{metrics[k]:.3f}"
            self.bar.n = step
            self.bar.set_postfix(post, refresh=True)

    def message(self, text: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, file=sys.stderr)

    def close(self) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.close()
        self.file.close()
        if self.run is not None:
            self.run.finish()


def write_resolved_config(cfg: Config) -> None:
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "config.yaml.tmp"
    tmp.write_text(dump_config(cfg))
    os.replace(tmp, out / "config.yaml")
