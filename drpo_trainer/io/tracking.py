"""Where metrics go: `<output_dir>/metrics.jsonl`, Weights & Biases, and the console
(completion samples: `samples.py`, whose rows also go to W&B as Tables through `log_table`).

Only rank 0 tracks. W&B never hangs or ends a run: `online` falls back to `offline` with one
message when there is no API key, when the server cannot be reached within
`tracking.wandb.connect_timeout_s`, or when `wandb.init` fails or takes longer than
`tracking.wandb.init_timeout_s`; the offline run keeps the same id, so `wandb sync` later joins
it to the online run. Every log call names its `step` explicitly so that a resumed run keeps
increasing steps in the same W&B run (its id is in the checkpoint).
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


def _server_unreachable(timeout_s: float) -> Optional[str]:
    """None if a TCP connection to the W&B server opens within timeout_s, else the reason."""
    import socket
    import threading
    from urllib.parse import urlparse

    url = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai"))
    host, port = url.hostname or "", url.port or (443 if url.scheme == "https" else 80)
    outcome: list[Optional[str]] = []

    def attempt() -> None:  # name resolution has no timeout of its own: bound it with the thread's join
        try:
            with socket.create_connection((host, port), timeout=timeout_s):
                outcome.append(None)
        except OSError as exc:  # DNS failure, refused, unreachable, timeout
            outcome.append(f"{host}:{port}: {exc or type(exc).__name__}")

    thread = threading.Thread(target=attempt, daemon=True)
    thread.start()
    thread.join(timeout_s)
    return outcome[0] if outcome else f"{host}:{port}: no answer within {timeout_s:g} s"


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
        self.table_failed = False
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

            self.bar = tqdm(
                total=cfg.trainer.max_steps, initial=start_step, desc="drpo", unit="step", dynamic_ncols=True
            )

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
        sync = f"Sync later with `wandb sync {self.cfg.output_dir}/wandb/offline-run-*`."
        if mode == "online" and not _has_wandb_key():
            print(
                f"wandb: no API key found (WANDB_API_KEY or `wandb login`); logging offline instead. {sync}",
                file=sys.stderr,
            )
            mode = "offline"
        if mode == "online":
            reason = _server_unreachable(w.connect_timeout_s)
            if reason is not None:
                print(f"wandb: server unreachable ({reason}); logging offline instead. {sync}", file=sys.stderr)
                mode = "offline"
        if self.run_id is None:
            # wandb.util.generate_id is gone in recent wandb; `secrets` leaves the seeded RNGs untouched
            self.run_id = "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))
        try:
            self.run = self._wandb_init(mode)
        except Exception as exc:  # noqa: BLE001 - whatever W&B raises, the run goes on
            if mode != "online":
                raise
            print(
                f"wandb: init failed online ({type(exc).__name__}: {str(exc)[:200]}); logging offline instead. {sync}",
                file=sys.stderr,
            )
            self.run = self._wandb_init("offline")

    def _wandb_init(self, mode: str):
        import wandb

        w = self.cfg.tracking.wandb
        return wandb.init(
            project=w.project,
            entity=w.entity,
            name=w.name or Path(self.cfg.output_dir).name,
            tags=w.tags or None,
            id=self.run_id,
            resume="allow",
            mode=mode,
            dir=self.cfg.output_dir,
            config=json.loads(json.dumps(self.cfg.model_dump(mode="json"))),
            settings=wandb.Settings(init_timeout=w.init_timeout_s, silent=True),
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
            evals = [k for k in metrics if k.startswith("eval/") and ("/avg@" in k or "/maj@" in k)]
            for k in evals[:2]:
                post[k.split("/", 1)[1]] = f"{metrics[k]:.3f}"
            self.bar.n = step
            self.bar.set_postfix(post, refresh=True)

    def log_table(self, step: int, key: str, rows: list[dict]) -> None:
        """Rows (dicts with the same keys) as a W&B Table under `key`; nothing without W&B. A Table that
        W&B refuses costs one message, never the run (samples.jsonl has the rows anyway)."""
        if self.run is None or not rows:
            return
        try:
            import wandb

            columns = list(rows[0])
            self.run.log(
                {key: wandb.Table(columns=columns, data=[[r.get(c) for c in columns] for r in rows])}, step=step
            )
        except Exception as exc:  # noqa: BLE001 - a table is a convenience
            if not self.table_failed:
                self.message(
                    f"wandb: could not log the table {key} ({type(exc).__name__}: {str(exc)[:200]}); "
                    "samples stay in samples.jsonl"
                )
            self.table_failed = True

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
