"""Split sessions end to end: the cloud's per-edge handler, federated rounds, the edge's run.

Session, as messages (edge -> cloud on the left):

    hello ->                          <- welcome (config, modules, groups, client id, global,
                                                  next round, trains in it, evaluate first)
    [step_start -> (<- lora_input, lora_output ->)* <- features, feature_grad ->
        (<- lora_output_grad, lora_input_grad ->)* <- step_end]*    (one training step)
    frozen_factors ->                 (Kill-and-Revive: a module killed or revived)
    round_update ->                   <- round_global   (federated: delta in, new global out)
    round_update(skipped) ->          <- round_global   (not sampled: the global once the round closed)
    round_update(evaluated) ->        (the evaluating edge reports the global's accuracy)
    goodbye ->

Federation: every edge is one client; each round (numbered from 1, as in ``dpeft simulate``)
trains the seeded sample of ``clients_per_round`` edges the round engine would draw; after
``train.local_steps`` steps their adapter deltas (LoRA factors and head, killed modules
included) are aggregated by the configured dpeft strategy (``strategy.name``: fedavg,
fedadam, flexlora, ...) and every edge continues from ``strategy.client_state(new_global,
client_id)``. All edges share the one frozen base of the cloud. With a run directory the
cloud checkpoints every round and resumes (:mod:`dpeft.rounds.recorder`; the edges' own
state: :mod:`dpeft.split.checkpoint`).
"""

from __future__ import annotations

import dataclasses
import logging
import secrets
import threading
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch
import yaml

from dpeft.config import RunConfig, config_to_dict
from dpeft.errors import ConfigError, ProtocolError
from dpeft.rounds.recorder import ROUND0_FIELDS, ResumePoint, RoundRecorder
from dpeft.rounds.sampling import sample_clients
from dpeft.rounds.tally import RoundTally, finish_step, strategy_metrics
from dpeft.split.cloud import CloudModel, CloudSession
from dpeft.split.config import SplitConfig, load_split_config
from dpeft.split.edge import EdgeModel, StepStats
from dpeft.split.wire import Channel
from dpeft.state import AdapterState, subtract
from dpeft.strategies import ClientUpdate, make_strategy

log = logging.getLogger("dpeft.split")
VERSION = "dpeft-split/2"  # 2: rounds numbered from 1, sampled rounds, resume


def config_yaml(run: RunConfig, split: SplitConfig, for_edges: bool = False) -> str:
    """The resolved run + split config as YAML; ``for_edges`` blanks secrets (token, auth paths)."""
    if for_edges:
        if hasattr(run, "auth"):
            run = dataclasses.replace(run, auth=type(run.auth)())
        split = dataclasses.replace(split, token="")
    tree = config_to_dict(run)
    tree["split"] = dataclasses.asdict(split)
    return yaml.safe_dump(tree, sort_keys=False)


def configs_from_yaml(text: str) -> tuple[RunConfig, SplitConfig]:
    import os
    import tempfile

    fd, path = tempfile.mkstemp(suffix=".yaml")
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        return load_split_config(path)
    finally:
        os.unlink(path)


# ---------------------------------------------------------------- federation (cloud side)


class Federation:
    """Rounds over a fixed set of edges: a seeded sample per round, a streaming aggregate, a dpeft strategy.

    Rounds are numbered from 1 like ``dpeft simulate``'s (round 0 is the untrained global's
    metrics line). Round r trains the edges ``sample_clients(seed, r, range(split.edges),
    clients_per_round)`` (the round engine's sampler); the others sit it out and receive the new
    global when it closes. A driver over the round core (:mod:`dpeft.rounds`): with ``run_dir``
    its :class:`~dpeft.rounds.recorder.RoundRecorder` writes ``metrics.jsonl`` and a checkpoint
    per round (with the edges' client ids and the round's row, which waits for the evaluating
    edge), and resumes from the newest readable checkpoint there unless ``resume`` is false.
    """

    def __init__(
        self, run: RunConfig, split: SplitConfig, initial: AdapterState, run_dir: Path | None = None, export=None, resume: bool = True
    ) -> None:
        self.run = run
        self.split = split
        self.edges = split.edges
        self.rounds = run.rounds
        self.strategy = make_strategy(run.strategy)
        self.global_state = initial
        self.schema = initial.schema()
        self.round = 0  # rounds closed so far; the next one is round + 1
        self._agg = None
        self._tally: RoundTally | None = None
        self._cond = threading.Condition()
        self._registered: dict[str, int] = {}  # edge id -> client id (kept in checkpoints)
        self._connected: set[int] = set()
        self._round_t0 = time.time()
        self.run_dir = run_dir
        self.recorder = RoundRecorder(run_dir, run.rounds, run.seed, export=export, elapsed_digits=3)
        self.metrics = self.recorder.metrics
        self.failed: str | None = None
        found = self.recorder.resume(self.schema) if run_dir is not None and resume else None
        if found is not None:
            self._resume(found)
        else:  # a fresh run: older checkpoints would outrank (and be kept over) the new ones
            self.recorder.start_over()
            self._hold(0, {**ROUND0_FIELDS, "wall_s": 0.0})

    @property
    def rows(self) -> list[dict[str, Any]]:
        return self.recorder.rows

    @property
    def resumed_from(self) -> int | None:
        """The checkpointed round this federation resumed from (None: it started at round 0)."""
        return self.recorder.resumed_from

    # -- resume -----------------------------------------------------------------
    def _resume(self, found: ResumePoint) -> None:
        self.global_state = found.global_state
        self.strategy.load_state_dict(found.strategy_state)
        self.round = found.round
        self._registered = {str(k): int(v) for k, v in found.info.get("edges", {}).items() if 0 <= int(v) < self.edges}
        row = found.info.get("row")
        if row and not any(r.get("round") == found.round for r in self.rows):
            self._hold(found.round, row)  # its line was lost with the process: evaluate (again) and write it

    # -- edges ------------------------------------------------------------------
    def reserve(self, edge_ids: list[str]) -> None:
        """Give these edge ids the lowest free client ids, in order (simulate: edge-i is client i)."""
        with self._cond:
            for edge_id in edge_ids:
                if edge_id not in self._registered:
                    free = sorted(set(range(self.edges)) - set(self._registered.values()))
                    if free:
                        self._registered[edge_id] = free[0]

    def register(self, edge_id: str) -> int:
        """This edge's client id: its own from before (a reconnect or a resumed run), else a free one."""
        with self._cond:
            cid = self._registered.get(edge_id)
            if cid is None:
                free = sorted(set(range(self.edges)) - set(self._registered.values()))
                if not free:  # a slot whose edge id is not connected now (e.g. an edge restarted with a new id)
                    free = sorted(set(range(self.edges)) - self._connected)
                if not free:
                    raise ProtocolError(f"all {self.edges} edge slots are taken (split.edges)")
                cid = free[0]
                self._registered = {k: v for k, v in self._registered.items() if v != cid}
                self._registered[edge_id] = cid
            self._connected.add(cid)
            return cid

    def unregister(self, client_id: int) -> None:
        with self._cond:
            self._connected.discard(client_id)

    def sampled(self, round_num: int) -> list[int]:
        """The edges (client ids) that train in round ``round_num``: the round engine's seeded sample."""
        return sample_clients(self.run.seed, round_num, list(range(self.edges)), self.run.clients_per_round)

    def _next_for(self, client_id: int) -> tuple[AdapterState, int, bool]:
        nxt = self.round + 1
        trains = nxt <= self.rounds and client_id in self.sampled(nxt)
        return self.strategy.client_state(self.global_state, client_id), nxt, trains

    def welcome(self, client_id: int) -> tuple[AdapterState, int, bool, bool]:
        """(state to start from, next round, trains in it, evaluate the state first)."""
        with self._cond:
            state, nxt, trains = self._next_for(client_id)
            return state, nxt, trains, self.recorder.is_held(self.round)

    # -- rounds -----------------------------------------------------------------
    def _wait(self, predicate, what: str) -> None:
        timeout = self.run.sync.round_timeout_s
        if not self._cond.wait_for(lambda: predicate() or self.failed is not None, timeout=timeout):
            self.failed = f"{what} not complete after {timeout:.0f} s (sync.round_timeout_s)"
            self._cond.notify_all()
        if self.failed:
            raise ProtocolError(self.failed)

    def submit(self, client_id: int, round_num: int, delta: AdapterState, num_examples: int, metrics: dict[str, float]) -> tuple[AdapterState, int, bool]:
        """Fold one edge's delta; block until the round closes; return (its next state, next round, trains in it)."""
        with self._cond:
            if round_num != self.round + 1:
                raise ProtocolError(f"update for round {round_num}, but the federation is at round {self.round + 1}")
            sampled = self.sampled(round_num)
            if client_id not in sampled:
                raise ProtocolError(f"edge {client_id} sent an update for round {round_num}, which did not sample it")
            if self._agg is None or self._tally is None:
                self._agg = self.strategy.begin_round(self.global_state)
                self._tally = RoundTally(sums=("bytes_up", "bytes_down", "steps", "edge_flops"))
                self._tally.t0 = self._round_t0
            if metrics.get("train_loss") != metrics.get("train_loss"):  # NaN: left out of the round's mean loss
                metrics = {k: v for k, v in metrics.items() if k != "train_loss"}
            update = ClientUpdate(client_id=client_id, delta=delta, num_examples=max(1, num_examples), metrics=metrics)
            self._agg.add(update)
            self._tally.add(update, num_examples)
            if self._agg.count == len(sampled):
                # lines stay in order: the previous round's evaluation comes first
                self._wait(lambda: not self.recorder.is_held(self.round), f"the evaluation of round {self.round}")
                self._close_round(round_num, sampled)
                self._cond.notify_all()
            else:
                self._wait(lambda: self.round >= round_num, f"round {round_num}")
            return self._next_for(client_id)

    def skip(self, client_id: int, round_num: int) -> tuple[AdapterState, int, bool]:
        """An edge not sampled for ``round_num``: block until that round closes; then as :meth:`submit`."""
        with self._cond:
            if round_num > self.round + 1 or (round_num == self.round + 1 and client_id in self.sampled(round_num)):
                raise ProtocolError(f"edge {client_id} cannot sit out round {round_num}")
            self._wait(lambda: self.round >= round_num, f"round {round_num}")
            return self._next_for(client_id)

    def _close_round(self, round_num: int, sampled: list[int]) -> None:
        tally, aggregator = self._tally, self._agg
        assert tally is not None and aggregator is not None
        self.global_state = finish_step(self.strategy, self.global_state, aggregator, round_num)
        self._agg = self._tally = None
        sums = tally.sums
        row = tally.row(round_num, aggregator.count, sampled, int(sums["bytes_up"]), int(sums["bytes_down"]), reasons=False)
        row.update({"split_steps": int(sums["steps"]), "edge_flops": sums["edge_flops"], "wall_s": round(time.time() - tally.t0, 3)})
        row.update(strategy_metrics(self.strategy, aggregator.count))
        self._round_t0 = time.time()
        self.round = round_num
        self.recorder.save(round_num, self.global_state, self.strategy.state_dict(), {"edges": dict(self._registered), "row": row})
        self._hold(round_num, row)

    def _hold(self, round_num: int, row: dict[str, Any]) -> None:
        """Write the line now, or keep it for the evaluating edge's result."""
        self.recorder.hold(round_num, row)
        if not self.split.eval_examples:
            self._wrote(self.recorder.release(round_num))

    def report_eval(self, round_num: int, loss: float | None, accuracy: float | None) -> None:
        """The evaluating edge's result for round ``round_num`` (None: it had no held-out data)."""
        with self._cond:
            evaluation = {"eval_loss": loss, "eval_accuracy": accuracy} if loss is not None else None
            self._wrote(self.recorder.release(round_num, evaluation))
            self._cond.notify_all()

    def flush(self) -> None:
        """Write any line still waiting for an evaluation (end of the run)."""
        with self._cond:
            self._wrote(self.recorder.flush())

    def _wrote(self, rows: list[dict[str, Any]]) -> None:
        for row in rows:
            if row["round"] == 0:  # round 1's clock starts once the edges are up and the start is evaluated
                self._round_t0 = time.time()
            log.info("round %s: %s", row["round"], row)


# ---------------------------------------------------------------- the cloud's handler


class CloudService:
    """Per-edge session handler over one CloudModel (and optional Federation)."""

    def __init__(self, cloud: CloudModel, run: RunConfig, split: SplitConfig, federation: Federation | None = None) -> None:
        self.cloud = cloud
        self.run = run
        self.split = split
        self.federation = federation
        self.config_yaml = config_yaml(run, split, for_edges=True)
        self._next_id = 0
        self._lock = threading.Lock()
        self.sessions: list[CloudSession] = []
        self.finished = threading.Event()
        self._done_edges = 0

    def handle(self, channel: Channel) -> None:
        channel.set_wire_dtype(self.split.wire_dtype)
        hello = channel.recv("hello")
        if self.split.token and not secrets.compare_digest(hello.fields["token"], self.split.token):
            raise ProtocolError("invalid token")
        if hello.fields["version"] != VERSION:
            raise ProtocolError(f"the edge speaks {hello.fields['version'][:40]!r}, this cloud {VERSION!r}: run the same dpeft version on both")
        edge_id = hello.fields["edge_id"][:128] or "edge"
        fed = self.federation
        evaluate_now = False
        if fed is not None:
            client_id = fed.register(edge_id)
            state, next_round, trains, evaluate_now = fed.welcome(client_id)
            rounds, local_steps = fed.rounds, self.run.train.local_steps
        else:
            with self._lock:
                client_id = self._next_id
                self._next_id += 1
            state, rounds, local_steps, next_round, trains = None, 1, self.split.steps, 1, True
        evaluate = bool(client_id == 0 and self.split.eval_examples > 0)
        try:
            self._serve(channel, edge_id, client_id, fed, state, rounds, local_steps, next_round, trains, evaluate, evaluate and evaluate_now)
        finally:
            if fed is not None:
                fed.unregister(client_id)

    def _serve(self, channel: Channel, edge_id: str, client_id: int, fed: Federation | None, state, rounds, local_steps, next_round, trains, evaluate, evaluate_now) -> None:
        channel.send(
            "welcome",
            state.tensors if state is not None else None,
            session=secrets.token_hex(8),
            config_yaml=self.config_yaml,
            modules=self.cloud.keys,
            groups=self.cloud.groups,
            client_id=client_id,
            evaluate=evaluate,
            rounds=rounds,
            local_steps=local_steps,
            federated=fed is not None,
            round=next_round,
            train=trains,
            evaluate_now=evaluate_now,
        )
        session = CloudSession(self.cloud, channel, name=edge_id)
        with self._lock:
            self.sessions.append(session)
        schema = fed.schema if fed is not None else None
        while True:
            msg = channel.recv()
            if msg.kind == "step_start":
                session.handle_step(msg)
            elif msg.kind == "frozen_factors":
                session.handle_frozen(msg)
            elif msg.kind == "round_update":
                if fed is None:
                    raise ProtocolError("round_update, but this cloud runs no federation")
                f = msg.fields
                if f["skipped"]:  # not sampled for this round: wait for it to close
                    msg.tensors({})
                    new_state, next_round, trains = fed.skip(client_id, int(f["round"]))
                    channel.send("round_global", new_state.tensors, round=next_round, done=next_round > fed.rounds, train=trains)
                    continue
                if f["num_examples"] == 0:  # an evaluation report (an edge without examples cannot train)
                    msg.tensors({})
                    if f["evaluated"]:
                        fed.report_eval(int(f["round"]), float(f["eval_loss"]), float(f["eval_accuracy"]))
                    else:
                        fed.report_eval(int(f["round"]), None, None)
                    continue
                delta = AdapterState(msg.tensors(schema))
                for k, v in delta.items():
                    if not torch.isfinite(v).all():
                        raise ProtocolError(f"non-finite delta in {k}")
                metrics = {k: float(f[k]) for k in ("train_loss", "bytes_up", "bytes_down", "steps", "edge_flops")}
                new_state, next_round, trains = fed.submit(client_id, int(f["round"]), delta, int(f["num_examples"]), metrics)
                channel.send("round_global", new_state.tensors, round=next_round, done=next_round > fed.rounds, train=trains)
            elif msg.kind == "goodbye":
                break
            else:
                raise ProtocolError(f"unexpected {msg.kind} between steps")
        with self._lock:
            self._done_edges += 1
            if fed is not None and self._done_edges >= fed.edges:
                self.finished.set()


# ---------------------------------------------------------------- the edge's run


@dataclasses.dataclass
class EdgeData:
    """An edge's private examples (tokenized) and optional held-out set."""

    train: Any  # TokenizedData
    indices: list[int]
    test: Any | None
    num_labels: int


@dataclasses.dataclass
class EdgeReport:
    steps: int = 0
    losses: list[float] = dataclasses.field(default_factory=list)
    stats: list[StepStats] = dataclasses.field(default_factory=list)
    evals: list[dict[str, float]] = dataclasses.field(default_factory=list)
    killed_history: list[tuple[int, list[int], list[int]]] = dataclasses.field(default_factory=list)
    rounds: list[int] = dataclasses.field(default_factory=list)  # federated rounds closed while connected
    trained: list[int] = dataclasses.field(default_factory=list)  # the rounds this edge trained in


def split_evaluate(edge: EdgeModel, channel: Channel, data, batch_size: int, limit: int | None = None) -> dict[str, float]:
    """Accuracy and loss through the split (forward only; labels stay on the edge).

    Causal LM: next-token loss and token accuracy over the non-pad targets, as
    :func:`dpeft.train.loop.evaluate` computes them.
    """
    from dpeft.split.edge import causal_lm_loss

    n = len(data) if limit is None else min(limit, len(data))
    loss_sum, correct, total = 0.0, 0, 0
    for start in range(0, n, batch_size):
        b = data.batch(list(range(start, min(start + batch_size, n))))
        _, logits = edge.step(channel, b["input_ids"], b["attention_mask"], None, train=False)
        if edge.causal:
            mask = b["attention_mask"][:, 1:].bool()
            loss_sum += float(causal_lm_loss(logits, b["input_ids"], b["attention_mask"], reduction="sum"))
            correct += int((logits[:, :-1].argmax(-1)[mask] == b["input_ids"][:, 1:][mask]).sum())
            total += int(mask.sum())
        else:
            loss_sum += float(torch.nn.functional.cross_entropy(logits, b["labels"], reduction="sum"))
            correct += int((logits.argmax(-1) == b["labels"]).sum())
            total += len(b["labels"])
    return {"eval_loss": loss_sum / max(total, 1), "eval_accuracy": correct / max(total, 1)}


def handshake(channel: Channel, edge_id: str, token: str = ""):
    """Send hello; return the welcome (its payload not yet consumed)."""
    channel.send("hello", edge_id=edge_id, token=token, version=VERSION)
    return channel.recv("welcome")


def run_edge_session(
    channel: Channel, welcome, edge: EdgeModel, data: EdgeData, run: RunConfig, split: SplitConfig, edge_id: str = "edge", state_dir: Path | None = None
) -> EdgeReport:
    """Train through the cloud per the welcome (rounds x steps, federated or not); then goodbye.

    Federated rounds are numbered from 1; a round the cloud did not sample this edge for is
    sat out (``round_update(skipped)``, then the new global). With ``state_dir`` the edge saves
    its private training state (optimizer, Kill-and-Revive, step count, RNG) after each round's
    training and restores it when the cloud resumes a run (see :mod:`dpeft.split.checkpoint`).
    """
    from dpeft.split.checkpoint import clear_edge_state, restore_edge_state, save_edge_state
    from dpeft.train.loop import batch_schedule, label_log_prior, task_seed

    w = welcome.fields
    if list(w["modules"]) != edge.keys:
        raise ProtocolError("the cloud's LoRA modules differ from this edge's (different model or adapter config)")
    federated = bool(w["federated"])
    if federated:
        edge.load(AdapterState(welcome.tensors(edge.state().schema())))
    else:
        welcome.tensors({})
    client_id = int(w["client_id"])
    report = EdgeReport()
    log_prior = None
    if run.model.task == "seq_cls" and run.train.loss == "prior_calibrated" and data.train.labels is not None:
        log_prior = label_log_prior(data.train.labels, data.indices, data.num_labels)

    def on_frozen(killed: list[int], revived: list[int]) -> None:
        report.killed_history.append((edge.step_count, killed, revived))
        edge.sync_frozen(channel, killed, revived)

    def evaluate(round_num: int) -> None:
        if data.test is not None:
            ev = split_evaluate(edge, channel, data.test, run.train.eval_batch_size, split.eval_examples)
            ev["round"] = round_num
            report.evals.append(ev)
            channel.send("round_update", round=round_num, evaluated=True, eval_loss=ev["eval_loss"], eval_accuracy=ev["eval_accuracy"])
        else:  # no held-out data on this edge: the round's metrics line goes out without evaluation
            channel.send("round_update", round=round_num, evaluated=False)

    rounds = int(w["rounds"])
    steps = int(w["local_steps"])
    round_num = int(w["round"]) if federated else 1
    trains = bool(w["train"]) if federated else True
    if federated and state_dir is not None:
        if round_num <= 1:
            clear_edge_state(state_dir)
        else:
            got = restore_edge_state(state_dir, round_num - 1, edge)
            if got is None:
                log.warning("no saved edge state of a round <= %d in %s: the optimizer and Kill-and-Revive start over", round_num - 1, state_dir)
            else:
                log.info("edge state of round %d restored from %s", got, state_dir)
    if federated and edge.killed():  # a resumed edge: the cloud needs the killed modules' factors again
        edge.sync_frozen(channel, edge.killed(), [])
    if federated and w["evaluate_now"]:
        evaluate(round_num - 1)
    while round_num <= rounds:
        if not trains:
            channel.send("round_update", round=round_num, skipped=True)
        else:
            start_state = edge.state() if federated else None
            losses = []
            stats0 = len(report.stats)
            for idx in batch_schedule(data.indices, steps, run.train.batch_size, task_seed(run.seed, round_num, client_id)):
                b = data.train.batch(idx)
                st, _ = edge.step(channel, b["input_ids"], b["attention_mask"], b.get("labels"), train=True, log_prior=log_prior, on_frozen=on_frozen)
                losses.append(st.loss)
                report.stats.append(st)
                report.steps += 1
            report.losses.extend(losses)
            report.trained.append(round_num)
            if not federated:
                break
            if state_dir is not None:
                save_edge_state(state_dir, round_num, edge)
            delta = subtract(edge.state(), start_state)
            rs = report.stats[stats0:]
            channel.send(
                "round_update",
                delta.tensors,
                round=round_num,
                num_examples=len(data.indices),
                train_loss=sum(losses) / len(losses),
                steps=len(rs),
                bytes_up=sum(s.bytes_up for s in rs),
                bytes_down=sum(s.bytes_down for s in rs),
                edge_flops=float(sum(s.flops for s in rs)),
            )
        g = channel.recv("round_global")
        edge.load(AdapterState(g.tensors(edge.state().schema())))
        # the killed modules' factors changed with the new global: refresh the cloud's copies
        if edge.killed():
            edge.sync_frozen(channel, edge.killed(), [])
        closed, round_num, trains = int(g.fields["round"]) - 1, int(g.fields["round"]), bool(g.fields["train"])
        report.rounds.append(closed)
        if w["evaluate"]:
            evaluate(closed)
        if g.fields["done"]:
            break
    channel.send("goodbye", reason="done")
    return report


def cloud_model_from_config(run: RunConfig, split: SplitConfig, num_labels: int) -> CloudModel:
    """Build the peft model the edges also build, then turn it into the cloud's half."""
    from dpeft.adapters import build_model
    from dpeft.split.spec import slice_layers

    bundle = build_model(run.model, run.adapter, num_labels, run.seed)
    if split.layers:
        slice_layers(bundle.model, split.layers)
    return CloudModel(bundle.model, bundle.model_id)


def edge_model_from_config(run: RunConfig, split: SplitConfig, num_labels: int, drop_body: bool = True):
    """(EdgeModel, tokenizer) for this config; the frozen body is freed when ``drop_body``."""
    from dpeft.adapters import build_model
    from dpeft.split.spec import slice_layers

    bundle = build_model(run.model, run.adapter, num_labels, run.seed)
    if split.layers:
        slice_layers(bundle.model, split.layers)
    edge = EdgeModel(bundle.model, run.train, split.kr)
    if drop_body:
        edge.drop_body()
    return edge, bundle.tokenizer


def num_labels_for(run: RunConfig) -> int:
    """Label count of the configured dataset (the cloud needs it only for the head's shape)."""
    from dpeft.data import load_dataset

    if run.data.dataset == "file" and not (run.data.path and Path(run.data.path).is_file()):
        raise ConfigError("data.path", "the cloud needs the label set: give data.path (a file with the labels) or use a built-in dataset")
    train, _ = load_dataset(run.data, run.seed)
    return len(train.label_names)


__all__ = [
    "CloudService",
    "EdgeData",
    "EdgeReport",
    "Federation",
    "OrderedDict",
    "cloud_model_from_config",
    "config_yaml",
    "configs_from_yaml",
    "edge_model_from_config",
    "handshake",
    "run_edge_session",
    "split_evaluate",
]
