"""Chaos: processes SIGKILLed at seeded random moments of a run and restarted as a user would;
the final adapter equals an uninterrupted run's (1e-6).

* `dpeft coordinator` + two `dpeft worker --data FILE` processes (one client each, so every
  round needs both): a worker killed twice and the coordinator once, each at a moment drawn
  (seeded) from the run's progress: a round's ``event=tasks_submitted``, an
  ``event=upload_accepted`` after it, or the target worker holding a task (one kept status
  channel). A killed worker's command is restarted once the coordinator logged it dead; the
  coordinator's command is restarted with the same listen address and run_dir (it resumes from
  its checkpoint) and the workers reconnect by themselves.
* `dpeft split cloud` + two `dpeft split edge` processes (each with its own --state-dir): one
  edge killed once, when a round's metrics line is written or when that edge saved its round
  training state, and restarted with the same command.

The uninterrupted references run the same commands without kills. Moments are waited for on
log lines, status replies and files (never on sleeps); every process is killed in a ``finally``.
Two faults these kills once exposed have their own tests at the end: a worker restarted *before*
the coordinator declared it dead (its new session releases the task the killed process held),
and a coordinator dying between a round's checkpoint and its metrics line (the resumed run
writes the line from the checkpoint).
"""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import random
import re
import shutil
import sys
from pathlib import Path

import pytest
from edge_testlib import free_port, tiny_overrides
from test_crash_resume import Admin

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
#: the seed of the kill plans (DPEFT_CHAOS_SEED=N tries other plans)
SEED = int(os.environ.get("DPEFT_CHAOS_SEED", "20261204"))
ROUNDS = 6
#: each worker brings its own data (one client each): every round needs both, so a killed
#: worker's task waits for its restart and every planned moment comes; tasks of 40 steps (a
#: kill can land mid-task); a silent worker is declared dead after 2 s
COORD_EXTRA = {
    "rounds": ROUNDS, "clients": 2, "clients_per_round": 2, "train__local_steps": 40, "transport__dead_after_s": 2.0, "transport__heartbeat_s": 0.5,
}
EXAMPLES_PER_WORKER = 40
SPLIT_EXTRA = {"rounds": ROUNDS, "clients": 2, "train__local_steps": 4, "split__edges": 2, "split__layers": 1, "split__eval_examples": 16}
RUN_TIMEOUT_S = 300.0


def _load_reference_runs():
    """scripts/reference_runs.py (its Proc: a dpeft subprocess in its own group, logged to a file)."""
    spec = importlib.util.spec_from_file_location("reference_runs", ROOT / "scripts" / "reference_runs.py")
    assert spec is not None and spec.loader is not None
    module = sys.modules.get("reference_runs") or importlib.util.module_from_spec(spec)
    if "reference_runs" not in sys.modules:
        sys.modules["reference_runs"] = module
        spec.loader.exec_module(module)
    return module


refruns = _load_reference_runs()
Proc, RunFailed = refruns.Proc, refruns.RunFailed


class Cast:
    """The processes of one run by role; every one ever started is killed by :meth:`kill_all`."""

    def __init__(self, work: Path) -> None:
        self.work = work
        self.current: dict[str, Proc] = {}
        self.starts: dict[str, int] = {}
        self.all: list[Proc] = []

    def start(self, role: str, args: list[str]) -> Proc:
        n = self.starts[role] = self.starts.get(role, 0) + 1
        p = Proc(args, self.work / f"{role}-{n}.log")
        self.current[role] = p
        self.all.append(p)
        return p

    def sigkill(self, role: str) -> bool:
        """SIGKILL ``role``'s process group; True when it was still running."""
        p = self.current[role]
        alive = p.popen.poll() is None
        p.kill()
        return alive

    def until(self, pred, what: str, timeout: float = 180.0):
        try:
            running = [p for p in self.current.values() if p.popen.poll() is None]  # not the one just killed
            return refruns.wait_until(pred, timeout, what, running)
        except RunFailed as exc:
            pytest.fail(str(exc))

    def finish(self, server: str, timeout: float = RUN_TIMEOUT_S, grace_s: float = 10.0) -> dict[str, int | None]:
        """The ``server`` (coordinator / cloud) exits 0; then the clients' exit codes (None: still
        retrying after ``grace_s``, then killed). A client that was backing off while a restarted
        server lived its last seconds only learns of the end by its --patience: that is no failure."""
        codes: dict[str, int | None] = {}
        for role in [server, *(r for r in self.current if r != server)]:
            p = self.current[role]
            try:
                codes[role] = p.wait(timeout if role == server else grace_s)
            except RunFailed:
                codes[role] = None
            text = p.text()
            assert "Traceback" not in text, f"{role}:\n{text[-4000:]}"
            if role == server:
                assert codes[role] == 0, f"{role} exited {codes[role]}:\n{text[-4000:]}\n{self.logs()}"
            else:
                assert codes[role] in (0, None) or "unreachable" in text, f"{role} exited {codes[role]}:\n{text[-4000:]}"
        return codes

    def logs(self) -> str:
        return "\n".join(f"--- {p.log.name} (rc={p.popen.poll()})\n{p.text()[-2500:]}" for p in self.all)

    def kill_all(self) -> None:
        for p in self.all:
            p.kill()


def _final_adapter(run: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(run / "adapter" / "adapter_model.safetensors"))


def _assert_same_adapter(got_run: Path, want_run: Path, what: str) -> None:
    got, want = _final_adapter(got_run), _final_adapter(want_run)
    assert got.keys() == want.keys()
    diffs = {k: float((got[k].double() - want[k].double()).abs().max()) for k in want}
    worst = max(diffs, key=diffs.get)
    assert diffs[worst] <= 1e-6, f"{what}: tensor {worst} differs from the uninterrupted run's by {diffs[worst]:.3g}"
    assert any(float(want[k].abs().max()) > 0 for k in want if "lora_B" in k), "the reference did not train"
    rounds = [json.loads(line)["round"] for line in (got_run / "metrics.jsonl").read_text().splitlines()]
    assert rounds == list(range(ROUNDS + 1)), f"{what}: metrics rounds {rounds}"


# ------------------------------------------------------------------ coordinator + workers


def coordinator_plan(seed: int) -> list[tuple[int, str, str]]:
    """Three kills (from round, moment, target) in run order: a worker twice, the coordinator once.

    Moments: ``submitted`` (the round's tasks queued), ``uploaded`` (an upload of the round
    accepted; for a worker: its own), ``busy`` (a worker holds a task). Each waits for a round
    >= the given one, so a restarted worker is back at work before it can be killed again."""
    rng = random.Random(seed)
    targets = ["coordinator", rng.choice(["w0", "w1"]), rng.choice(["w0", "w1"])]
    rng.shuffle(targets)
    rounds = sorted(rng.sample(range(1, ROUNDS - 1), 3))
    moments = [rng.choice(["submitted", "uploaded"] if t == "coordinator" else ["busy", "uploaded"]) for t in targets]
    return list(zip(rounds, moments, targets, strict=True))


def log_moment(text: str, from_round: int, moment: str, worker: str | None = None) -> bool:
    """The coordinator's log shows tasks of a round >= ``from_round`` submitted (``uploaded``: and
    then an upload accepted, from ``worker`` if given)."""
    current = 0
    for line in text.splitlines():
        m = re.search(r"event=tasks_submitted round=(\d+)", line)
        if m:
            current = int(m.group(1))
        if current >= from_round:
            if moment == "submitted":
                return True
            if "event=upload_accepted" in line and (worker is None or f"worker={worker} " in line):
                return True
    return False


def busy_moment(admin: Admin, from_round: int, worker: str) -> bool:
    """``worker`` holds a task of a round >= ``from_round`` (the coordinator's status)."""
    try:
        st = admin.status()
    except Exception:  # noqa: BLE001 - between polls the coordinator may be loading
        return False
    return st["round"] >= from_round and any(w["worker_id"] == worker and w["current_task"] for w in st["workers"])


def coordinator_moment(log: Proc, admin: Admin, from_round: int, moment: str, target: str):
    """A predicate: the moment of a planned kill has come."""
    if moment == "busy":
        return lambda: busy_moment(admin, from_round, target)
    who = None if target == "coordinator" else target
    return lambda: log_moment(log.text(), from_round, moment, who)


def declared_dead(coordinator: Proc, worker: str):
    """A predicate: the coordinator logged ``worker`` dead once more than now (or it exited)."""
    line = f"event=worker_dead worker={worker} "
    seen = coordinator.text().count(line)
    return lambda: coordinator.text().count(line) > seen or coordinator.popen.poll() is not None


def write_worker_data(out: Path) -> dict[str, Path]:
    """w0.csv, w1.csv: disjoint rotten tomatoes slices (text, label name)."""
    from dpeft.data.datasets import rotten_tomatoes

    ds = rotten_tomatoes()
    files = {}
    for i, w in enumerate(("w0", "w1")):
        rows = range(i * EXAMPLES_PER_WORKER, (i + 1) * EXAMPLES_PER_WORKER)
        files[w] = out / f"{w}.csv"
        with open(files[w], "w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(["text", "label"])
            writer.writerows((ds.texts[j], ds.label_names[ds.labels[j]]) for j in rows)
    return files


def run_coordinator_cast(model: Path, run: Path, work: Path, plan: list[tuple[int, str, str]]) -> list[str]:
    """The coordinator + w0 + w1 run, with ``plan``'s kills and restarts; returns what was done."""
    listen = f"127.0.0.1:{free_port()}"
    coord_args = ["coordinator", "--listen", listen, *tiny_overrides(model, run, **COORD_EXTRA)]
    data = write_worker_data(work)

    def worker_args(w: str) -> list[str]:
        return ["worker", "--coordinator", listen, "--worker-id", w, "--data", str(data[w]), "--threads", "1", "--patience", "120"]

    cast, done, admins = Cast(work), [], []

    def start_coordinator() -> Admin:
        coord = cast.start("coordinator", coord_args)
        cast.until(lambda: "event=listening" in coord.text(), "the coordinator to listen")
        admins.append(Admin(listen))  # one status channel per coordinator process, opened once it listens
        return admins[-1]

    try:
        admin = start_coordinator()
        for w in ("w0", "w1"):  # one after the other: w0 claims client slot 0, w1 slot 1
            cast.start(w, worker_args(w))
            log = cast.current["coordinator"]
            cast.until(lambda: f"event=worker_joined worker={w} " in log.text(), f"{w} to join")  # noqa: B023 - called at once
        for round_num, moment, target in plan:
            cast.until(coordinator_moment(cast.current["coordinator"], admin, round_num, moment, target), f"round >= {round_num} {moment} ({target})")
            alive = cast.sigkill(target)
            done.append(f"SIGKILL {target} at round >= {round_num} {moment} (was {'running' if alive else 'gone'})")
            if target == "coordinator":
                admin.close()
                admin = start_coordinator()
            else:
                # restarted once the coordinator declared it dead (or finished); a restart before
                # that is test_worker_restarted_before_declared_dead_*
                cast.until(declared_dead(cast.current["coordinator"], target), f"{target} declared dead")
                cast.start(target, worker_args(target))
        codes = cast.finish("coordinator")
        return done + [f"{role} exit code {rc}" for role, rc in codes.items() if rc != 0]
    except BaseException:
        print(cast.logs())
        raise
    finally:
        for a in admins:
            a.close()
        cast.kill_all()


def test_coordinator_and_workers_sigkilled_end_like_an_uninterrupted_run(tiny_model: Path, tmp_path: Path) -> None:
    (tmp_path / "ref").mkdir()
    run_coordinator_cast(tiny_model, tmp_path / "ref" / "run", tmp_path / "ref", [])
    plan = coordinator_plan(SEED)
    assert sorted(t[:1] for _, _, t in plan) == ["c", "w", "w"]
    (tmp_path / "chaos").mkdir()
    done = run_coordinator_cast(tiny_model, tmp_path / "chaos" / "run", tmp_path / "chaos", plan)
    print("\n".join(done))
    resumed = (tmp_path / "chaos" / "coordinator-2.log").read_text()
    assert "event=resumed" in resumed or "event=listening" in resumed, resumed[-3000:]
    _assert_same_adapter(tmp_path / "chaos" / "run", tmp_path / "ref" / "run", f"after {'; '.join(done)}")


# ------------------------------------------------------------------ split cloud + edges


def split_plan(seed: int) -> tuple[int, str, str]:
    """One edge kill: (round, moment, edge); moment ``closed`` = round's metrics line written, ``trained`` = the edge saved its round state."""
    rng = random.Random(seed + 1)
    return rng.randrange(1, ROUNDS - 1), rng.choice(["closed", "trained"]), rng.choice(["e0", "e1"])


def split_moment(run: Path, state_dir: Path, round_num: int, moment: str) -> bool:
    if moment == "trained":
        return (state_dir / f"round-{round_num:06d}.safetensors").exists()
    metrics = run / "metrics.jsonl"
    return metrics.exists() and any(json.loads(line)["round"] == round_num for line in metrics.read_text().splitlines() if line.strip())


def run_split_cast(model: Path, run: Path, work: Path, kill: tuple[int, str, str] | None) -> list[str]:
    """`dpeft split cloud` + edges e0, e1 (client ids by join order; each edge's shard is its client id)."""
    listen = f"127.0.0.1:{free_port()}"
    cloud_args = ["split", "cloud", "--listen", listen, "--fresh", *tiny_overrides(model, run, **SPLIT_EXTRA)]

    def edge_args(e: str) -> list[str]:
        return ["split", "edge", "--cloud", listen, "--edge-id", e, "--threads", "1", "--patience", "120", "--state-dir", str(work / f"state-{e}")]

    cast, done = Cast(work), []
    try:
        cloud = cast.start("cloud", cloud_args)
        cast.until(lambda: "listening on" in cloud.text(), "the split cloud to listen")
        for e in ("e0", "e1"):
            cast.start(e, edge_args(e))
        if kill is not None:
            round_num, moment, edge = kill
            cast.until(lambda: split_moment(run, work / f"state-{edge}", round_num, moment), f"round {round_num} {moment}")
            alive = cast.sigkill(edge)
            done.append(f"SIGKILL {edge} at round {round_num} {moment} (was {'running' if alive else 'gone'})")
            cast.start(edge, edge_args(edge))
        codes = cast.finish("cloud")
        return done + [f"{role} exit code {rc}" for role, rc in codes.items() if rc != 0]
    except BaseException:
        print(cast.logs())
        raise
    finally:
        cast.kill_all()


def test_split_edge_sigkilled_ends_like_an_uninterrupted_run(tiny_model: Path, tmp_path: Path) -> None:
    (tmp_path / "ref").mkdir()
    run_split_cast(tiny_model, tmp_path / "ref" / "run", tmp_path / "ref", None)
    (tmp_path / "chaos").mkdir()
    done = run_split_cast(tiny_model, tmp_path / "chaos" / "run", tmp_path / "chaos", split_plan(SEED))
    print("\n".join(done))
    _assert_same_adapter(tmp_path / "chaos" / "run", tmp_path / "ref" / "run", f"after {'; '.join(done)}")


def test_worker_restarted_before_declared_dead_does_not_strand_its_task(tiny_model: Path, tmp_path: Path) -> None:
    """SIGKILL a worker holding a task and restart the same command at once (well within
    transport.dead_after_s): the new process re-joins under the same id and its polls keep the
    id alive, so the reaper would never re-queue the task the killed process held; the join of
    the new session does (with sync.task_timeout_s unset the round would otherwise wait until
    sync.round_timeout_s, here 30 s, and fail)."""
    listen = f"127.0.0.1:{free_port()}"
    extra = dict(COORD_EXTRA, rounds=1, transport__dead_after_s=120.0, transport__heartbeat_s=1.0, sync__round_timeout_s=30.0)
    worker = ["worker", "--coordinator", listen, "--worker-id", "w0", "--threads", "1", "--patience", "60"]
    cast = Cast(tmp_path)
    admin = None
    try:
        coord = cast.start("coordinator", ["coordinator", "--listen", listen, *tiny_overrides(tiny_model, tmp_path / "run", **extra)])
        cast.until(lambda: "event=listening" in coord.text(), "the coordinator to listen")
        admin = Admin(listen)
        cast.start("w0", worker)
        cast.until(lambda: busy_moment(admin, 1, "w0"), "w0 to hold a task")
        assert cast.sigkill("w0")
        cast.start("w0", worker)
        try:
            rc = coord.wait(120)
        except RunFailed as exc:
            pytest.fail(str(exc))
        assert rc == 0, f"the round did not complete after the restart:\n{coord.text()[-2500:]}"
        assert "event=session_replaced worker=w0 requeued=1" in coord.text(), coord.text()[-2500:]
    finally:
        if admin is not None:
            admin.close()
        cast.kill_all()


def test_crash_after_checkpoint_keeps_the_rounds_metrics_line(tiny_model: Path, tmp_path: Path) -> None:
    """A coordinator that dies after writing round 1's checkpoint but before its metrics line
    (here: the adapter export right after the checkpoint fails on a file in its way, as a
    SIGKILL at that moment would stop it) resumes after round 1 and writes round 1's line from
    the checkpoint, as the first process would have written it."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "adapter").write_text("in the way")
    args = ["simulate", *tiny_overrides(tiny_model, run, rounds=1, simulate__processes=1)]
    first = Proc(args, tmp_path / "first.log")
    assert first.wait(RUN_TIMEOUT_S) != 0 and (run / "checkpoints" / "round-000001.safetensors").exists(), first.text()[-2000:]
    for obstacle in run.glob("adapter*"):
        obstacle.unlink() if obstacle.is_file() else shutil.rmtree(obstacle)
    again = Proc(args, tmp_path / "again.log")
    assert again.wait(RUN_TIMEOUT_S) == 0, again.text()[-2000:]
    rounds = [json.loads(line)["round"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert rounds == [0, 1], f"metrics rounds after the resume: {rounds}"
    row = json.loads((run / "metrics.jsonl").read_text().splitlines()[1])
    assert row["clients"] > 0 and row["wall_s"] > 0 and row["elapsed_s"] > 0, row
