"""Tracking: metrics.jsonl rows, their truncation on resume, and W&B never blocking a run."""

import json

import pytest

from drpo_trainer.config import load_config
from drpo_trainer.io.tracking import Tracker


def _cfg(tmp_path, *overrides):
    return load_config(None, [f"output_dir={tmp_path / 'run'}", "tracking.progress_bar=false", *overrides])


def test_metrics_jsonl_one_row_per_step_and_resume_truncates_later_steps(tmp_path):
    cfg = _cfg(tmp_path)
    t = Tracker(cfg, enabled=True)
    for step in range(1, 6):
        t.log(step, {"reward/mean": step / 10, "loss/policy": float("nan")})
    t.close()
    path = tmp_path / "run" / "metrics.jsonl"
    rows = [json.loads(l) for l in path.read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
    assert rows[2]["reward/mean"] == 0.3 and rows[2]["loss/policy"] is None  # NaN is written as null
    with open(path, "a") as f:
        f.write('{"step": 6, "rew')  # a line cut by a crash
    resumed = Tracker(cfg, enabled=True, start_step=3)  # the checkpoint was at step 3
    resumed.log(4, {"reward/mean": 0.9})
    resumed.close()
    rows = [json.loads(l) for l in path.read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert rows[-1]["reward/mean"] == 0.9


def test_online_without_api_key_falls_back_to_offline_with_one_message(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    monkeypatch.delenv("WANDB_MODE", raising=False)
    cfg = _cfg(tmp_path, "tracking.wandb.mode=online")
    t = Tracker(cfg, enabled=True)
    t.log(1, {"reward/mean": 0.5})
    t.close()
    err = capsys.readouterr().err
    assert err.count("logging offline instead") == 1
    offline = list((tmp_path / "run" / "wandb").glob("offline-run-*"))
    assert len(offline) == 1 and t.run_id in offline[0].name


def test_disabled_rank_writes_nothing(tmp_path):
    cfg = _cfg(tmp_path)
    t = Tracker(cfg, enabled=False)
    t.log(1, {"reward/mean": 1.0})
    t.close()
    assert not (tmp_path / "run").exists()


def _closed_port() -> int:
    import socket

    with socket.socket() as s:  # bound, never listening, then closed: connections are refused
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_server_that_never_answers_is_given_up_after_the_timeout(monkeypatch):
    import socket
    import time

    from drpo_trainer.io import tracking

    monkeypatch.setattr(socket, "create_connection", lambda *a, **k: time.sleep(30))  # a hung DNS or connect
    assert tracking._server_unreachable(0.2).endswith("no answer within 0.2 s")


@pytest.mark.parametrize("base_url", ["closed-port", "http://no-such-host.invalid"])
def test_online_with_a_key_but_no_server_falls_back_to_offline_in_bounded_time(tmp_path, monkeypatch, capsys, base_url):
    url = f"http://127.0.0.1:{_closed_port()}" if base_url == "closed-port" else base_url
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    monkeypatch.setenv("WANDB_BASE_URL", url)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    cfg = _cfg(tmp_path, "tracking.wandb.mode=online", "tracking.wandb.connect_timeout_s=3")
    t = Tracker(cfg, enabled=True, run_id="keepme01")
    t.log(1, {"reward/mean": 0.5})
    t.close()
    err = capsys.readouterr().err
    assert err.count("server unreachable") == 1 and "logging offline instead" in err
    offline = list((tmp_path / "run" / "wandb").glob("offline-run-*"))
    assert len(offline) == 1 and "keepme01" in offline[0].name  # same id: `wandb sync` joins the online run
