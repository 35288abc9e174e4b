"""A resumed run says so: a stderr line naming the round and run_dir, a summary that counts only
the rounds this process ran, and a run clock (``elapsed_s``) that continues from the checkpoint."""

from __future__ import annotations

import json

from enginelib import Reply, make_engine

from dpeft.rounds.checkpoint import latest_checkpoint

BASE = ["clients=2", "clients_per_round=2"]


def test_resume_says_so_and_continues_the_run_clock(tmp_path, capsys) -> None:
    slow = lambda t, s: Reply(delay_s=0.4)  # noqa: E731 - every round takes a measurable time
    first, tr = make_engine(tmp_path, ["rounds=2", *BASE], slow)
    first.run(tr)
    assert first.resumed_from is None
    assert "resumed from" not in capsys.readouterr().err
    _, _, _, info = latest_checkpoint(first.run_dir / "checkpoints")
    assert info["seed"] == first.cfg.seed and info["elapsed_s"] >= 0.8  # the run clock is checkpointed

    resumed, tr = make_engine(tmp_path, ["rounds=3", *BASE], slow, resume=True)
    err = capsys.readouterr().err
    assert f"resumed from round 2 of 3 in {resumed.run_dir}" in err
    rows = resumed.run(tr)
    assert [r["round"] for r in rows] == [0, 1, 2, 3]
    # the clock went on from the checkpoint instead of restarting at zero
    assert rows[3]["elapsed_s"] >= info["elapsed_s"] + 0.4
    assert rows[3]["elapsed_s"] > rows[2]["elapsed_s"]
    on_disk = [json.loads(line) for line in (resumed.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in on_disk] == [0, 1, 2, 3]

    resumed.metrics.print_summary(rows, t_start=0.0)
    summary = capsys.readouterr().err
    assert "1 round in" in summary and "by this process (resumed from round 2)" in summary, summary


def test_a_fresh_run_summary_counts_every_round(tmp_path, capsys) -> None:
    engine, tr = make_engine(tmp_path, ["rounds=2", *BASE], lambda t, s: Reply())
    rows = engine.run(tr)
    engine.metrics.print_summary(rows, t_start=0.0)
    summary = capsys.readouterr().err
    assert "2 rounds in" in summary and "resumed from" not in summary, summary


def test_checkpoints_without_a_run_clock_still_resume(tmp_path, capsys) -> None:
    """Checkpoints written before the clock was kept: the clock continues from the round's metrics row."""
    from dpeft.rounds.checkpoint import save_checkpoint

    first, tr = make_engine(tmp_path, ["rounds=2", *BASE], lambda t, s: Reply(delay_s=0.3))
    rows = first.run(tr)
    ckpts = first.run_dir / "checkpoints"
    round_num, glob, strat, info = latest_checkpoint(ckpts)
    save_checkpoint(ckpts, round_num, glob, strat, {"seed": info["seed"]})  # the old info: no elapsed_s
    resumed, tr = make_engine(tmp_path, ["rounds=3", *BASE], lambda t, s: Reply(), resume=True)
    assert resumed.resumed_from == 2
    assert resumed.recorder.elapsed() >= rows[2]["elapsed_s"]


def test_a_rounds_lost_metrics_line_is_written_from_its_checkpoint(tmp_path, capsys) -> None:
    """A process that died after round 2's checkpoint but before its metrics line: the resumed run
    writes the line as it was recorded (clock included), then goes on."""
    first, tr = make_engine(tmp_path, ["rounds=2", *BASE], lambda t, s: Reply(delay_s=0.2))
    rows = first.run(tr)
    _, _, _, info = latest_checkpoint(first.run_dir / "checkpoints")
    assert info["row"] == json.loads(json.dumps(rows[2]))  # complete: wall_s and elapsed_s set before the checkpoint
    metrics = first.run_dir / "metrics.jsonl"
    lines = metrics.read_text().splitlines(keepends=True)
    metrics.write_text("".join(lines[:2]))  # round 2's line never made it
    resumed, tr = make_engine(tmp_path, ["rounds=3", *BASE], lambda t, s: Reply(), resume=True)
    assert resumed.resumed_from == 2
    assert metrics.read_text().splitlines(keepends=True) == lines
    rows = resumed.run(tr)
    assert [r["round"] for r in rows] == [0, 1, 2, 3]
    assert [json.loads(line)["round"] for line in metrics.read_text().splitlines()] == [0, 1, 2, 3]


def test_a_lost_line_without_a_checkpointed_row_stays_lost(tmp_path, capsys) -> None:
    """Checkpoints written before rows were kept in them still resume; the line cannot come back."""
    from dpeft.rounds.checkpoint import save_checkpoint

    first, tr = make_engine(tmp_path, ["rounds=2", *BASE], lambda t, s: Reply())
    first.run(tr)
    ckpts = first.run_dir / "checkpoints"
    round_num, glob, strat, info = latest_checkpoint(ckpts)
    save_checkpoint(ckpts, round_num, glob, strat, {k: v for k, v in info.items() if k != "row"})
    metrics = first.run_dir / "metrics.jsonl"
    metrics.write_text("".join(metrics.read_text().splitlines(keepends=True)[:2]))
    resumed, tr = make_engine(tmp_path, ["rounds=3", *BASE], lambda t, s: Reply(), resume=True)
    assert resumed.resumed_from == 2
    assert [r["round"] for r in resumed.run(tr)] == [0, 1, 3]
