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

Federated rounds (every edge one client, a seeded sample per round, a dpeft strategy,
checkpoints and resume) are :class:`~dpeft.split.federation.Federation`'s; all edges share the
one frozen base of the cloud.
"""

from __future__ import annotations

import dataclasses
import logging
import secrets
import threading
from pathlib import Path
from typing import Any

import torch
import yaml

from dpeft.config import RunConfig, config_to_dict
from dpeft.errors import ConfigError, ProtocolError
from dpeft.split.batcher import StepBatcher
from dpeft.split.cloud import CloudModel, CloudSession
from dpeft.split.config import SplitConfig, load_split_config
from dpeft.split.edge import EdgeModel, StepStats
from dpeft.split.federation import Federation
from dpeft.split.wire import Channel
from dpeft.state import AdapterState, subtract

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
        #: stacks concurrent steps of several edges into one pass of the base (None: each alone)
        self.batcher = StepBatcher(cloud, split.batch_window_ms, split.max_batch_edges) if split.max_batch_edges > 1 else None

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
        session = CloudSession(self.cloud, channel, name=edge_id)
        with self._lock:
            self.sessions.append(session)
        if self.batcher is not None:
            self.batcher.join()  # before the welcome: an edge that has it counts for the batch window
        try:
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
            self._loop(channel, session, client_id, fed)
        finally:
            if self.batcher is not None:
                self.batcher.leave()

    def _loop(self, channel: Channel, session: CloudSession, client_id: int, fed: Federation | None) -> None:
        schema = fed.schema if fed is not None else None
        while True:
            msg = channel.recv()
            if msg.kind == "step_start":
                session.handle_step(msg, self.batcher)
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
            if start_state is None:  # not federated
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
    from dpeft.train.device import resolve_device

    return CloudModel(bundle.model, bundle.model_id, device=resolve_device(split.cloud_device, key="split.cloud_device"))


def edge_model_from_config(run: RunConfig, split: SplitConfig, num_labels: int, drop_body: bool = True):
    """(EdgeModel, tokenizer) for this config; the frozen body is freed when ``drop_body``."""
    from dpeft.adapters import build_model
    from dpeft.split.spec import slice_layers

    bundle = build_model(run.model, run.adapter, num_labels, run.seed)
    if split.layers:
        slice_layers(bundle.model, split.layers)
    from dpeft.train.device import resolve_device

    edge = EdgeModel(bundle.model, run.train, split.kr, device=resolve_device(split.edge_device, key="split.edge_device"))
    if drop_body:
        edge.drop_body()
    return edge, bundle.tokenizer


def num_labels_for(run: RunConfig) -> int:
    """Label count of the configured dataset (the cloud needs it only for the head's shape)."""
    from dpeft.data import load_run_data

    if run.data.dataset == "file" and not (run.data.path and Path(run.data.path).is_file()):
        raise ConfigError("data.path", "the cloud needs the label set: give data.path (a file with the labels) or use a built-in dataset")
    return len(load_run_data(run, n_clients=run.split.edges).label_names)


__all__ = [
    "CloudService",
    "EdgeData",
    "EdgeReport",
    "Federation",
    "cloud_model_from_config",
    "config_yaml",
    "configs_from_yaml",
    "edge_model_from_config",
    "handshake",
    "run_edge_session",
    "split_evaluate",
]
