"""Every command that README.md and the docs show runs here, shortened (tests/doc_commands.py
collects them):

- `drpo-train` training commands run for real for one step (`trainer.max_steps=1`, eval off,
  output under a temporary `runs/`); `--resume`, `export`, `eval` and `plot` act on those runs (a
  documented `runs/<name>/checkpoints/step_N` means the newest checkpoint of that run; `plot`
  writes its image and `eval` its results into the temporary directory, not over the documented
  ones; `eval` evaluates the first 8 problems, and first trains the run it names when no earlier
  command has);
- commands marked `# needs ...` (GPUs, the network) or `# takes ~N min`, and paper configs whose
  model is on the hub, are parsed: `--print-config` for drpo-train (the config resolves and
  validates), `--help` for scripts; `rollout.backend=vllm` is parsed here and run for real by
  tests/vllm_engine;
- benchmarks run in `--help` mode (full runs are minutes); `data/make_synthetic.py` and the figure
  script write into the temporary directory and are compared with the bundled files; `experiments/`
  scripts run for real with `--results-dir` in the temporary directory.
"""

from __future__ import annotations

import filecmp
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from doc_commands import REPO, DocCommand, collect, collect_all

SHORT = [
    "trainer.max_steps=1",
    "eval.files={}",
    "checkpoint.export_final=false",
    "tracking.progress_bar=false",
    "tracking.wandb.mode=disabled",
]


def schedule_lr(optim, i: int, total: int) -> float:
    """The lr of optimizer step i (0-based) of `total` (docs: optim.schedule), written out here."""
    if i < optim.warmup_steps:
        return optim.lr * (i + 1) / optim.warmup_steps
    if optim.schedule == "constant":
        return optim.lr
    return optim.lr * 0.5 * (1 + math.cos(math.pi * (i - optim.warmup_steps) / (total - optim.warmup_steps)))


def check_first_step(cmd: DocCommand, out: Path, cfg) -> None:
    """A documented training command ran the configuration it documents, for its one step: the run's
    resolved config is that configuration, step 1 is logged, and its lr is the schedule's."""
    import yaml

    from drpo_trainer.config import dump_config

    assert yaml.safe_load((out / "config.yaml").read_text()) == yaml.safe_load(dump_config(cfg)), cmd.where
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    (step1,) = [r for r in rows if r["step"] == 1 and "optim/lr" in r]
    n = cfg.trainer.minibatches_per_step
    want = sum(schedule_lr(cfg.optim, i, cfg.trainer.max_steps * n) for i in range(n)) / n
    assert step1["optim/lr"] == pytest.approx(want, rel=1e-9), cmd.where
    assert 0.0 <= step1["reward/mean"] <= 1.0, cmd.where


class DocRunner:
    """Runs documented commands against one temporary directory, in document order."""

    def __init__(self, tmp: Path, cache_dir: str) -> None:
        self.tmp = tmp
        self.env = {
            k: v
            for k, v in os.environ.items()
            if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
        }
        self.env.update(
            HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", DRPO_CACHE_DIR=cache_dir
        )
        self.runs: dict[str, Path] = {}  # documented output_dir -> where its last run went
        self.count = 0

    def _run(self, argv: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
        return subprocess.run(argv, cwd=REPO, env=self.env, capture_output=True, text=True, timeout=timeout)

    def _mapped(self, path: str) -> str:
        """runs/<name>/checkpoints/step_N -> the newest checkpoint of the last <name> run here."""
        m = re.match(r"runs/([^/]+)(/.*)?$", path)
        if not m:
            return str(self.tmp / path) if not Path(path).is_absolute() else path
        base = self.runs.get(m.group(1), self.tmp / "runs" / m.group(1))
        rest = m.group(2) or ""
        step = re.match(r"/checkpoints/step_\d+$", rest)
        if step:
            found = sorted((base / "checkpoints").glob("step_*"))
            assert found, f"no checkpoint under {base} for {path}: an earlier documented command should have made one"
            return str(found[-1])
        return str(base) + rest

    def train(self, cmd: DocCommand) -> subprocess.CompletedProcess:
        from drpo_trainer.config import ConfigError, load_config

        args = list(cmd.argv[1:])
        config = args[args.index("--config") + 1]
        overrides = [a for a in args if "=" in a and not a.startswith("-")]
        try:
            cfg = load_config(config, overrides)
        except ConfigError:  # the CLI must then refuse it with exit 2 and the key: let it answer
            return self._run([sys.executable, "-m", "drpo_trainer.cli", *args, "--print-config"], 120)
        parse_only = bool(cmd.needs) or cfg.rollout.backend == "vllm" or not cfg.model.path.startswith("builtin:")
        if parse_only or "--print-config" in args:
            res = self._run(
                [
                    sys.executable,
                    "-m",
                    "drpo_trainer.cli",
                    *args,
                    *([] if "--print-config" in args else ["--print-config"]),
                ],
                120,
            )
            assert res.returncode != 0 or "algorithm:" in res.stdout, res.stdout[-2000:]
            return res
        # a documented resume or export of `runs/<name>` continues the run of the plain config, not
        # one started with other overrides (a resume with another loss would rightly be refused)
        name = Path(cfg.output_dir).name + "".join(f"|{o}" for o in sorted(overrides))
        if "--resume" in args:
            i = args.index("--resume") + 1
            if args[i] != "auto":
                args[i] = self._mapped(args[i])
            out = self.runs.get(name, self.tmp / "runs" / name)
        else:
            self.count += 1
            out = self.tmp / f"run{self.count}" / name
        self.runs[name] = out
        res = self._run([sys.executable, "-m", "drpo_trainer.cli", *args, f"output_dir={out}", *SHORT])
        if res.returncode == 0:
            assert (out / "metrics.jsonl").is_file(), f"{cmd.where}: no metrics.jsonl in {out}"
            if "--resume" not in args:
                check_first_step(cmd, out, load_config(config, [*overrides, f"output_dir={out}", *SHORT]))
        return res

    def export(self, cmd: DocCommand) -> subprocess.CompletedProcess:
        args = list(cmd.argv[2:])
        args[0], args[1] = self._mapped(args[0]), self._mapped(args[1])
        res = self._run([sys.executable, "-m", "drpo_trainer.cli", "export", *args])
        if res.returncode == 0:
            written = "adapter_config.json" if "--adapter" in args else "config.json"  # peft's or transformers'
            assert (Path(args[1]) / written).is_file()
        return res

    def eval(self, cmd: DocCommand) -> subprocess.CompletedProcess:
        args = list(cmd.argv[2:])
        model = args[0]
        run = re.match(r"runs/([^/]+)/", model)
        if run and run.group(1) not in self.runs:  # no earlier command trained it (a -k selection)
            config = args[args.index("--config") + 1]
            assert self.train(DocCommand(cmd.where, ("drpo-train", "--config", config))).returncode == 0
        if run:
            args[0] = self._mapped(model)
            if model.endswith("/final") and not Path(args[0]).exists():  # the runs here skip the final export
                (ckpt,) = sorted((Path(args[0]).parent / "checkpoints").glob("step_*"))[-1:]
                assert (
                    self._run([sys.executable, "-m", "drpo_trainer.cli", "export", str(ckpt), args[0]]).returncode == 0
                )
        self.count += 1
        out = self.tmp / f"eval{self.count}"
        if "--out" in args:
            args[args.index("--out") + 1] = str(out)
        else:
            args += ["--out", str(out)]
        res = self._run(
            [
                sys.executable,
                "-m",
                "drpo_trainer.cli",
                "eval",
                *args,
                "eval.max_problems=8",
                "tracking.progress_bar=false",
            ]
        )
        if res.returncode == 0:
            result = json.loads((out / "metrics.json").read_text())
            (name,) = result["sets"]
            n = result["sets"][name]["samples_per_prompt"]
            assert result["sets"][name]["problems"] == 8, cmd.where
            assert {f"avg@{n}", "pass@1", f"pass@{n}", f"maj@{n}"} <= set(result["sets"][name]), cmd.where
            assert len((out / "samples.jsonl").read_text().splitlines()) == 8 * n, cmd.where
        return res

    def plot(self, cmd: DocCommand) -> subprocess.CompletedProcess:
        args = list(cmd.argv[2:])
        out = self.tmp / "report.png"
        if "-o" in args:
            i = args.index("-o") + 1
            out = self.tmp / Path(args[i]).name
            args[i] = str(out)
        else:
            args += ["-o", str(out)]
        args = [self._mapped(a) if a.startswith("runs/") else a for a in args]
        res = self._run([sys.executable, "-m", "drpo_trainer.cli", "plot", *args])
        if res.returncode == 0:
            assert out.stat().st_size > 10_000, f"{cmd.where}: {out} is too small to be the figure"
        return res

    def python(self, cmd: DocCommand) -> subprocess.CompletedProcess:
        args = list(cmd.argv[1:])
        script = args[0]
        if cmd.needs or script.startswith("benchmarks/"):
            return self._run([sys.executable, script, "--help"], 120)
        if script == "data/make_synthetic.py":
            res = self._run([sys.executable, *args, "--out-dir", str(self.tmp / "data")])
            for f in ("synthetic_math_train.jsonl", "synthetic_math_eval.jsonl"):  # byte-identical, as documented
                assert filecmp.cmp(self.tmp / "data" / f, REPO / "data" / f, shallow=False), f
            return res
        if script.startswith("experiments/"):
            return self._run(
                [sys.executable, *args, "--results-dir", str(self.tmp / "experiments" / Path(script).stem)]
            )
        if script.startswith("docs/figures/"):
            out = self.tmp / Path(script).with_suffix(".png").name
            res = self._run([sys.executable, *args, "--out", str(out)])
            assert res.returncode != 0 or out.stat().st_size > 10_000
            return res
        return self._run([sys.executable, *args])  # python -m drpo_trainer.<module> ...

    def __call__(self, cmd: DocCommand) -> subprocess.CompletedProcess:
        handlers = {"train": self.train, "eval": self.eval, "export": self.export, "plot": self.plot}
        return handlers.get(cmd.kind, self.python)(cmd)


@pytest.fixture(scope="module")
def runner(tmp_path_factory, warm_model_dir):
    return DocRunner(tmp_path_factory.mktemp("doc_commands"), str(Path(warm_model_dir).parent))


def _unique(commands: list[DocCommand]) -> list[DocCommand]:
    seen, out = set(), []
    for c in commands:
        if (c.argv, c.needs) not in seen:
            seen.add((c.argv, c.needs))
            out.append(c)
    return out


def test_collector_finds_the_documented_commands():
    commands = collect_all()
    text = {" ".join(c.argv) for c in commands}
    assert "drpo-train --config configs/tiny_cpu.yaml" in text  # the quick start, out of its && chain
    assert "drpo-train --config configs/tiny_cpu.yaml trainer.max_steps=50 algorithm.loss=grpo" in text
    assert "python -m drpo_trainer.builtin.tiny_model" in text  # an inline code span
    assert any(c.argv[:2] == ("drpo-train", "export") for c in commands)
    assert any(c.argv[:2] == ("drpo-train", "plot") for c in commands)
    assert any(c.where.startswith("docs/launch.md") and c.needs == "GPUs" for c in commands)  # torchrun line
    assert len(commands) >= 30


def test_a_long_command_is_marked_to_be_parsed_only(tmp_path):
    text = "```bash\npython experiments/loss_comparison.py  # takes ~40 min on 2 cores\n```\n"
    (long,) = collect(tmp_path / "x.md", text)
    assert long.needs == "~40 min of CPU time"
    (short,) = collect(tmp_path / "x.md", text.replace("  # takes ~40 min on 2 cores", ""))
    assert short.needs == ""


def test_a_command_named_in_prose_is_not_run(tmp_path):
    text = "`drpo-train eval` loads it; `drpo-train export` with `--adapter`; `drpo-train eval runs/x/final`\n"
    assert [c.argv for c in collect(tmp_path / "x.md", text)] == [("drpo-train", "eval", "runs/x/final")]


def test_paper_configs_are_marked_as_needing_gpus():
    for c in collect_all():
        if c.kind == "train" and any(a.startswith("configs/qwen3") or a.startswith("configs/r1_") for a in c.argv):
            assert c.needs, f"{c.where}: `{' '.join(c.argv)}` needs GPUs; mark it `# needs GPUs` in the docs"


@pytest.mark.distributed  # README's two-process example starts two processes
@pytest.mark.parametrize("cmd", _unique(collect_all()), ids=lambda c: f"{c.kind}:{c.where}")
def test_documented_command_runs(runner, cmd):
    res = runner(cmd)
    assert res.returncode == 0, (
        f"{cmd.where}: `{' '.join(cmd.argv)}` failed:\n{res.stdout[-1500:]}\n{res.stderr[-3000:]}"
    )


def test_a_broken_readme_example_fails(runner, tmp_path):
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    broken = readme.replace("trainer.max_steps=50 algorithm.loss=grpo", "trainer.max_stepz=50 algorithm.loss=grpo")
    assert broken != readme
    (cmd,) = [c for c in collect(tmp_path / "README.md", broken) if "trainer.max_stepz=50" in c.argv]
    res = runner(cmd)
    assert res.returncode == 2 and "trainer.max_stepz" in res.stderr and "max_steps" in res.stderr


@pytest.mark.parametrize("loss", ["drpo", "spo", "dppo_tv", "dppo_kl", "grpo", "pg"])
def test_every_registry_loss_resolves_from_the_command_line(runner, loss):
    """`algorithm.loss=X` on the command line resolves X's own parameters, not drpo's delta. The
    CLI's config path is the one a run takes; every loss trains through the real learner in
    test_exact_shortcuts, and README's drpo and grpo commands run for one step above."""
    import yaml

    from drpo_trainer.algorithms.losses import loss_param_defaults, policy_loss_names

    assert loss in policy_loss_names()
    res = runner._run(
        [
            sys.executable,
            "-m",
            "drpo_trainer.cli",
            "--config",
            "configs/tiny_cpu.yaml",
            f"algorithm.loss={loss}",
            *SHORT,
            "--print-config",
        ],
        120,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    resolved = yaml.safe_load(res.stdout)["algorithm"]
    assert resolved["loss"] == loss and resolved["loss_params"] == loss_param_defaults(loss)  # not drpo's delta
