"""Split sessions end to end: the cloud's per-edge handler, federated rounds, the edge's run.

Session, as messages (edge -> cloud on the left):

    hello ->                          <- welcome (config, modules, groups, client id, global)
    [step_start -> (<- lora_input, lora_output ->)* <- features, feature_grad ->
        (<- lora_output_grad, lora_input_grad ->)* <- step_end]*    (one training step)
    frozen_factors ->                 (Kill-and-Revive: a module killed or revived)
    round_update ->                   <- round_global   (federated: delta in, new global out)
    round_update(evaluated) ->        (the evaluating edge reports the global's accuracy)
    goodbye ->

Federation: every edge is one client; after each round of ``train.local_steps`` steps the
edges' adapter deltas (LoRA factors and head, killed modules included) are aggregated by the
configured dpeft strategy (``strategy.name``: fedavg, fedadam, flexlora, ...) and each edge
continues from ``strategy.client_state(new_global, client_id)``. All edges share the one
frozen base of the cloud.
"""

from __future__ import annotations

import dataclasses
import json
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
from dpeft.split.cloud import CloudModel, CloudSession
from dpeft.split.config import SplitConfig, load_split_config
from dpeft.split.edge import EdgeModel, StepStats
from dpeft.split.wire import Channel
from dpeft.state import AdapterState, subtract
from dpeft.strategies import ClientUpdate, make_strategy

log = logging.getLogger("dpeft.split")
VERSION = "dpeft-split/1"


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
    """Rounds over a fixed set of edges: a streaming aggregate per round, a dpeft strategy."""

    def __init__(self, run: RunConfig, split: SplitConfig, initial: AdapterState, run_dir: Path | None = None, export=None) -> None:
        self.run = run
        self.split = split
        self.edges = split.edges
        self.rounds = run.rounds
        self.strategy = make_strategy(run.strategy)
        self.global_state = initial
        self.round = 0
        self._agg = None
        self._cond = threading.Condition()
        self._registered: dict[str, int] = {}
        self._pending: dict[int, dict[str, Any]] = {}
        self._round_info: dict[str, Any] = {}
        self._round_t0 = time.time()
        self.run_dir = run_dir
        self.export = export
        self.rows: list[dict[str, Any]] = []
        self.failed: str | None = None

    def register(self, edge_id: str) -> int:
        with self._cond:
            if edge_id in self._registered:
                return self._registered[edge_id]
            if len(self._registered) >= self.edges:
                raise ProtocolError(f"all {self.edges} edge slots are taken (split.edges)")
            cid = len(self._registered)
            self._registered[edge_id] = cid
            if cid == 0:
                self._round_t0 = time.time()
            return cid

    def client_global(self, client_id: int) -> AdapterState:
        with self._cond:
            return self.strategy.client_state(self.global_state, client_id)

    def submit(self, client_id: int, round_num: int, delta: AdapterState, num_examples: int, metrics: dict[str, float]) -> tuple[AdapterState, int]:
        """Fold one edge's delta; block until the round closes; return (its next state, next round)."""
        timeout = self.run.sync.round_timeout_s
        with self._cond:
            if round_num != self.round:
                raise ProtocolError(f"update for round {round_num}, but the federation is at round {self.round}")
            if self._agg is None:
                self._agg = self.strategy.begin_round(self.global_state)
                self._round_info = {"t0": self._round_t0, "loss": [], "bytes_up": 0, "bytes_down": 0, "steps": 0, "edge_flops": 0.0, "examples": 0}
            self._agg.add(ClientUpdate(client_id=client_id, delta=delta, num_examples=max(1, num_examples), metrics=metrics))
            info = self._round_info
            info["loss"].append(metrics.get("train_loss", float("nan")))
            for key in ("bytes_up", "bytes_down", "steps", "edge_flops"):
                info[key] += metrics.get(key, 0)
            info["examples"] += num_examples
            if self._agg.count == self.edges:
                self.global_state = self.strategy.finish_round(self.global_state, self._agg)
                self._agg = None
                self._close_round(info)
                self.round += 1
                self._cond.notify_all()
            else:
                target = round_num + 1
                if not self._cond.wait_for(lambda: self.round >= target or self.failed is not None, timeout=timeout):
                    self.failed = f"round {round_num} not complete after {timeout:.0f} s (sync.round_timeout_s)"
                    self._cond.notify_all()
                if self.failed:
                    raise ProtocolError(self.failed)
            return self.strategy.client_state(self.global_state, client_id), self.round

    def _close_round(self, info: dict[str, Any]) -> None:
        losses = [x for x in info["loss"] if x == x]
        row = {
            "round": self.round,
            "clients": self.edges,
            "num_examples": info["examples"],
            "train_loss": sum(losses) / len(losses) if losses else None,
            "bytes_up": int(info["bytes_up"]),
            "bytes_down": int(info["bytes_down"]),
            "split_steps": int(info["steps"]),
            "edge_flops": info["edge_flops"],
            "wall_s": round(time.time() - info["t0"], 3),
        }
        self._round_t0 = time.time()
        row.update({f"strategy_{k}": v for k, v in self.strategy.last_metrics.items()})
        if self.export is not None:
            self.export(self.global_state)
        if self.split.eval_examples:
            self._pending[self.round] = row
        else:
            self._write(row)

    def report_eval(self, round_num: int, loss: float | None, accuracy: float | None) -> None:
        """The evaluating edge's result for round ``round_num`` (None: it had no held-out data)."""
        with self._cond:
            row = self._pending.pop(round_num, None)
            if row is None:
                return
            if loss is not None:
                row["eval_loss"] = loss
                row["eval_accuracy"] = accuracy
            self._write(row)

    def _write(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        if self.run_dir is not None:
            with open(self.run_dir / "metrics.jsonl", "a") as fh:
                fh.write(json.dumps(row) + "\n")
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
        edge_id = hello.fields["edge_id"][:128] or "edge"
        fed = self.federation
        if fed is not None:
            client_id = fed.register(edge_id)
            state = fed.client_global(client_id)
            rounds, local_steps, start = fed.rounds, self.run.train.local_steps, fed.round
        else:
            with self._lock:
                client_id = self._next_id
                self._next_id += 1
            state, rounds, local_steps, start = None, 1, self.split.steps, 0
        channel.send(
            "welcome",
            state.tensors if state is not None else None,
            session=secrets.token_hex(8),
            config_yaml=self.config_yaml,
            modules=self.cloud.keys,
            groups=self.cloud.groups,
            client_id=client_id,
            evaluate=bool(client_id == 0 and self.split.eval_examples > 0),
            rounds=rounds - start,
            local_steps=local_steps,
            federated=fed is not None,
        )
        session = CloudSession(self.cloud, channel, name=edge_id)
        with self._lock:
            self.sessions.append(session)
        schema = self.federation.global_state.schema() if fed is not None else None
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
                new_state, next_round = fed.submit(client_id, int(f["round"]), delta, int(f["num_examples"]), metrics)
                channel.send("round_global", new_state.tensors, round=next_round, done=next_round >= fed.rounds)
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


def split_evaluate(edge: EdgeModel, channel: Channel, data, batch_size: int, limit: int | None = None) -> dict[str, float]:
    """Accuracy and loss through the split (forward only; labels stay on the edge)."""
    n = len(data) if limit is None else min(limit, len(data))
    loss_sum, correct = 0.0, 0
    for start in range(0, n, batch_size):
        b = data.batch(list(range(start, min(start + batch_size, n))))
        _, logits = edge.step(channel, b["input_ids"], b["attention_mask"], None, train=False)
        loss_sum += float(torch.nn.functional.cross_entropy(logits, b["labels"], reduction="sum"))
        correct += int((logits.argmax(-1) == b["labels"]).sum())
    return {"eval_loss": loss_sum / max(n, 1), "eval_accuracy": correct / max(n, 1)}


def handshake(channel: Channel, edge_id: str, token: str = ""):
    """Send hello; return the welcome (its payload not yet consumed)."""
    channel.send("hello", edge_id=edge_id, token=token, version=VERSION)
    return channel.recv("welcome")


def run_edge_session(channel: Channel, welcome, edge: EdgeModel, data: EdgeData, run: RunConfig, split: SplitConfig, edge_id: str = "edge") -> EdgeReport:
    """Train through the cloud per the welcome (rounds x steps, federated or not); then goodbye."""
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
    if run.train.loss == "prior_calibrated" and data.train.labels is not None:
        log_prior = label_log_prior(data.train.labels, data.indices, data.num_labels)

    def on_frozen(killed: list[int], revived: list[int]) -> None:
        report.killed_history.append((edge.step_count, killed, revived))
        edge.sync_frozen(channel, killed, revived)

    round_num = 0
    rounds = int(w["rounds"])
    steps = int(w["local_steps"])
    for _ in range(rounds):
        start_state = edge.state() if federated else None
        losses = []
        stats0 = len(report.stats)
        for idx in batch_schedule(data.indices, steps, run.train.batch_size, task_seed(run.seed, round_num, client_id)):
            b = data.train.batch(idx)
            st, _ = edge.step(channel, b["input_ids"], b["attention_mask"], b["labels"], train=True, log_prior=log_prior, on_frozen=on_frozen)
            losses.append(st.loss)
            report.stats.append(st)
            report.steps += 1
        report.losses.extend(losses)
        if not federated:
            break
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
        if w["evaluate"]:
            if data.test is not None:
                ev = split_evaluate(edge, channel, data.test, run.train.eval_batch_size, split.eval_examples)
                ev["round"] = round_num
                report.evals.append(ev)
                channel.send("round_update", round=round_num, evaluated=True, eval_loss=ev["eval_loss"], eval_accuracy=ev["eval_accuracy"])
            else:  # no held-out data on this edge: the round's metrics line goes out without evaluation
                channel.send("round_update", round=round_num, evaluated=False)
        round_num = int(g.fields["round"])
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
