"""Aggregation by ``torch.distributed`` all-reduce: FedAvg without routing tensors through a coordinator.

Every rank of one process group (gloo on CPU, nccl on GPU, set up the standard way:
``MASTER_ADDR``/``MASTER_PORT``, ``RANK``/``WORLD_SIZE``, ``init_process_group``) trains its
share of the round's sampled clients with the ordinary :class:`~dpeft.workers.runtime.WorkerRuntime`,
folds its updates into the strategy's own streaming aggregator, and the group all-reduces the
weighted sums: ``sum_i w_i * delta_i`` and ``sum_i w_i`` (float64, so the result matches the
coordinator's :class:`~dpeft.strategies.aggregate.StreamingWeightedMean` to rounding). Every rank
then takes the same server step (``strategy.finish_round``), so all ranks hold the same global
adapter; rank 0 alone evaluates and writes checkpoints, ``metrics.jsonl`` and the PEFT export.

Works for every strategy whose aggregator is a weighted mean of deltas (fedavg, fedprox,
fedavgm, fedadam/fedyogi/fedadagrad, ..., with or without ``clip_norm``, which is applied per
update before the reduce). Strategies that need every client's factors (flora, flexlora,
robust medians) cannot be all-reduced and are refused with a config error.

Bytes on paper (S = adapter bytes, N ranks): a star (coordinator) moves S down and S up per
worker and N*S through the coordinator's link each way; a ring all-reduce moves
2*(N-1)/N * S per rank each way, with no hot spot.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections import OrderedDict
from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from dpeft.codec import decode_state, encode_state
from dpeft.config import RunConfig, dump_config
from dpeft.errors import ConfigError, DpeftError
from dpeft.state import AdapterState
from dpeft.strategies import ClientUpdate, make_strategy
from dpeft.strategies.aggregate import StreamingWeightedMean
from dpeft.strategies.base import unwrap
from dpeft.transport.base import TrainTask

log = logging.getLogger("dpeft.allreduce")

#: all-reduce in buckets of this many bytes (float64), so a 64M-parameter adapter needs no 2x copy
BUCKET_BYTES = 64 << 20


def init_group(backend: str | None = None, timeout_s: float = 1800.0) -> str:
    """``init_process_group`` from the standard environment variables; returns the backend."""
    if dist.is_initialized():
        return str(dist.get_backend())
    missing = [k for k in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE") if k not in os.environ]
    if missing:
        raise DpeftError(f"torch.distributed needs {', '.join(missing)} in the environment (torchrun sets them)")
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend=backend, init_method="env://", timeout=timedelta(seconds=timeout_s))
    return backend


def _device() -> torch.device:
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def allreduce_weighted_sum(
    sums: Sequence[torch.Tensor], weight: float, count: int, extra: Sequence[float] = (), group: Any = None, bucket_bytes: int | None = None
) -> tuple[float, int, list[float]]:
    """All-reduce (SUM) float64 tensors in place plus scalars; returns (total weight, total count, extra sums).

    ``sums`` hold this rank's ``sum_i w_i * delta_i``; after the call every rank holds the sums
    over all ranks. Tensors are packed into buckets of ``bucket_bytes`` (one collective each).
    """
    device = _device()
    scalars = torch.tensor([float(weight), float(count), *map(float, extra)], dtype=torch.float64, device=device)
    dist.all_reduce(scalars, op=dist.ReduceOp.SUM, group=group)
    per_bucket = max(1, (bucket_bytes or BUCKET_BYTES) // 8)
    bucket: list[torch.Tensor] = []
    filled = 0

    def flush() -> None:
        nonlocal bucket, filled
        if not bucket:
            return
        if len(bucket) == 1 and device.type == "cpu" and bucket[0].is_contiguous():
            dist.all_reduce(bucket[0], op=dist.ReduceOp.SUM, group=group)
        else:
            flat = torch.cat([t.reshape(-1) for t in bucket]).to(device)
            dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
            flat = flat.cpu()
            offset = 0
            for t in bucket:
                t.copy_(flat[offset : offset + t.numel()].view_as(t))
                offset += t.numel()
        bucket, filled = [], 0

    for t in sums:
        if t.dtype != torch.float64:
            raise TypeError("all-reduce buffers must be float64")
        if t.numel() == 0:
            continue
        if filled and filled + t.numel() > per_bucket:
            flush()
        if t.numel() >= per_bucket:  # a big tensor goes alone, in slices
            flat = t.view(-1) if t.is_contiguous() else None
            if flat is None:
                raise ValueError("all-reduce buffers must be contiguous")
            for start in range(0, flat.numel(), per_bucket):
                piece = flat[start : start + per_bucket]
                if device.type == "cpu":
                    dist.all_reduce(piece, op=dist.ReduceOp.SUM, group=group)
                else:
                    on_dev = piece.to(device)
                    dist.all_reduce(on_dev, op=dist.ReduceOp.SUM, group=group)
                    piece.copy_(on_dev.cpu())
            continue
        bucket.append(t)
        filled += t.numel()
    flush()
    values = scalars.cpu().tolist()
    return values[0], int(round(values[1])), values[2:]


def allreduce_aggregator(aggregator: Any, extra: Sequence[float] = (), group: Any = None) -> list[float]:
    """Turn a rank-local streaming weighted mean into the group-wide one (in place).

    ``aggregator`` is a strategy aggregator (wrappers such as clipping are looked through) whose
    innermost part is a :class:`StreamingWeightedMean`; afterwards ``aggregator.result()`` is
    the FedAvg of every rank's updates. Returns the all-reduced ``extra`` scalars.
    """
    inner = unwrap(aggregator)
    if not isinstance(inner, StreamingWeightedMean):
        raise TypeError(f"{type(inner).__name__} is not a weighted mean; it cannot be all-reduced")
    # StreamingWeightedMean keeps sum_i w_i * delta_i (float64) in _sum and sum_i w_i in _weight.
    total, count, extra_sums = allreduce_weighted_sum(list(inner._sum.values()), inner._weight, inner._count, extra, group)
    inner._weight = total
    inner._count = count
    return extra_sums


def allreduce_fedavg(updates: Sequence[ClientUpdate], template: AdapterState, group: Any = None) -> AdapterState:
    """FedAvg (example-weighted mean delta) of all ranks' ``updates`` (a rank may have none)."""
    agg = StreamingWeightedMean(template)
    for u in updates:
        agg.add(u)
    allreduce_aggregator(agg, group=group)
    return agg.result()


def ring_bytes_per_rank(payload_bytes: int, world_size: int) -> int:
    """Bytes each rank sends (and receives) in a ring all-reduce of ``payload_bytes``."""
    return 0 if world_size <= 1 else int(2 * (world_size - 1) * payload_bytes / world_size)


# ---------------------------------------------------------------- broadcast helpers


def _broadcast_bytes(data: bytes | None, src: int = 0) -> bytes:
    device = _device()
    size = torch.tensor([len(data) if data is not None else 0], dtype=torch.int64, device=device)
    dist.broadcast(size, src)
    n = int(size.item())
    if dist.get_rank() == src:
        buf = torch.frombuffer(bytearray(data or b""), dtype=torch.uint8) if n else torch.empty(0, dtype=torch.uint8)
        buf = buf.to(device)
    else:
        buf = torch.empty(n, dtype=torch.uint8, device=device)
    if n:
        dist.broadcast(buf, src)
    return buf.cpu().numpy().tobytes()


def broadcast_state(state: AdapterState | None, src: int = 0) -> AdapterState:
    """Rank ``src``'s state on every rank (encoded with the dpeft codec, never pickled)."""
    data = encode_state(state) if dist.get_rank() == src else None
    return decode_state(_broadcast_bytes(data, src))


# ---------------------------------------------------------------- rounds


def warn_collective_ignores(cfg: RunConfig, prog: str, mode: str) -> list[str]:
    """Warn that all-reduce rounds cannot simulate stragglers and dropouts; returns the ignored keys."""
    ignored = [key for key, on in (("simulate.speed_factors", bool(cfg.simulate.speed_factors)), ("simulate.dropout", cfg.simulate.dropout > 0)) if on]
    if ignored:
        print(
            f"{prog}: warning: {' and '.join(ignored)} {'is' if len(ignored) == 1 else 'are'} ignored with {mode} "
            "(synchronous all-reduce rounds; simulate.byzantine_clients still apply)",
            file=sys.stderr,
            flush=True,
        )
    return ignored



def _check_strategy(strategy: Any, state: AdapterState) -> None:
    inner = unwrap(strategy.make_aggregator(state))
    if not isinstance(inner, StreamingWeightedMean):
        raise ConfigError(
            "strategy.name",
            f"{strategy.name!r} aggregates with {type(inner).__name__}, which all-reduce cannot compute; "
            "use a weighted-mean strategy (fedavg, fedprox, fedavgm, fedadam, ...) or the coordinator transports",
        )
    if inner.dtype != torch.float64:
        raise ConfigError(
            "strategy.options.accumulator",
            "all-reduce sums float64 buffers across ranks; use accumulator: float64 (the default) or the coordinator transports",
        )


def run_allreduce(cfg: RunConfig, resume: bool = True, quiet: bool = False) -> list[dict[str, Any]]:
    """All rounds on the current process group. Call on every rank; rank 0's metrics rows are returned."""
    from dpeft.coordinator.checkpoint import clear_checkpoints, latest_checkpoint, save_checkpoint
    from dpeft.coordinator.engine import sample_clients
    from dpeft.coordinator.global_model import GlobalModel
    from dpeft.coordinator.metrics import MetricsLog
    from dpeft.workers.runtime import WorkerRuntime
    from dpeft.workers.simulate import Heterogeneity

    if not dist.is_initialized():
        init_group()
    rank, world = dist.get_rank(), dist.get_world_size()
    if cfg.sync.name not in ("sync", "allreduce"):
        log.warning("all-reduce rounds are synchronous; sync.name=%s is ignored", cfg.sync.name)
    strategy = make_strategy(cfg.strategy)
    run_dir = Path(cfg.run_dir)
    runtime = Heterogeneity(cfg).install(WorkerRuntime(cfg))  # simulate.byzantine_clients apply
    gm = metrics = None
    start_round = 0
    glob: AdapterState | None = None
    strat_state = AdapterState()
    if rank == 0:
        gm = GlobalModel(cfg)
        glob = gm.initial_state()
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(dump_config(cfg))
        metrics = MetricsLog(run_dir, total_rounds=cfg.rounds)
        found = latest_checkpoint(run_dir / "checkpoints") if resume else None
        if found is not None:
            start_round, ck_glob, ck_strat, _info = found
            if ck_glob.schema() != glob.schema():
                raise DpeftError(f"checkpoint in {run_dir} is for a different adapter; use a new run_dir")
            glob = ck_glob
            strat_state = AdapterState(OrderedDict(ck_strat))
            metrics.truncate_after(start_round)
        else:
            metrics.truncate_after(-1)
            clear_checkpoints(run_dir / "checkpoints")  # an earlier run's rounds would outrank this one's
        glob.meta = {**glob.meta, "round": start_round}
    # every rank starts from rank 0's global adapter, round and server-optimizer state
    glob = broadcast_state(glob)
    strat_state = broadcast_state(strat_state if rank == 0 else None)
    if len(strat_state):
        strategy.load_state_dict(dict(strat_state.tensors))
    start_round = int(glob.meta.get("round", 0))
    _check_strategy(strategy, glob)
    schema = glob.schema()
    payload_bytes = sum(t.numel() for t in glob.tensors.values()) * 8 + 8 * 3
    per_rank = ring_bytes_per_rank(payload_bytes, world)

    if rank == 0 and start_round == 0 and not metrics.rows:
        t0 = time.time()
        row: dict[str, Any] = {"round": 0, "clients": 0, "num_examples": 0, "train_loss": None, "bytes_up": 0, "bytes_down": 0, "rejected": 0}
        row.update(gm.evaluate(glob))
        row["wall_s"] = time.time() - t0
        metrics.append(row)

    for round_num in range(start_round + 1, cfg.rounds + 1):
        t0 = time.time()
        sampled = sample_clients(cfg.seed, round_num, list(range(cfg.clients)), cfg.clients_per_round)
        mine = sampled[rank::world]
        state = AdapterState(glob.tensors, {**glob.meta, "round": round_num})
        payload = encode_state(state)
        hp = strategy.configure_train(round_num, glob)
        aggregator = strategy.begin_round(glob)
        loss_sum = loss_n = examples = rejected = 0.0
        t_train = time.time()
        tasks = [
            TrainTask(task_id=f"r{round_num}-c{c}", round=round_num, client_id=c, blob_id=f"r{round_num}", blob_size=len(payload), blob_sha256=b"", hyperparams=hp)
            for c in mine
        ]
        # this rank's clients of the round, trained together with train.lockstep (one after another otherwise)
        for c, (update, n, m) in zip(mine, runtime.train_tasks([(t, payload) for t in tasks]), strict=True):
            delta = decode_state(update, schema=schema)
            if n <= 0 or any(t.is_floating_point() and not bool(t.isfinite().all()) for t in delta.tensors.values()):
                rejected += 1
                continue
            aggregator.add(ClientUpdate(c, delta, int(n), m))
            examples += n
            if "train_loss" in m:
                loss_sum += m["train_loss"] * n
                loss_n += n
        train_s = time.time() - t_train
        t_reduce = time.time()
        loss_sum, loss_n, examples, rejected = allreduce_aggregator(aggregator, [loss_sum, loss_n, examples, rejected])
        reduce_s = time.time() - t_reduce
        count = aggregator.count
        if count == 0:
            raise DpeftError(f"round {round_num}: no valid update on any rank")
        glob = strategy.finish_round(glob, aggregator)
        glob.meta = {**state.meta}
        if rank == 0:
            row = {
                "round": round_num,
                "clients": count,
                "sampled": sampled,
                "num_examples": int(examples),
                "train_loss": loss_sum / loss_n if loss_n else None,
                "bytes_up": per_rank * world,
                "bytes_down": per_rank * world,
                "rejected": int(rejected),
                "rejected_reasons": {"non_finite": int(rejected)} if rejected else {},
                "transport": "allreduce",
                "world_size": world,
                "allreduce_s": reduce_s,
                "rank0_train_s": train_s,
            }
            if round_num % cfg.train.eval_every == 0 or round_num == cfg.rounds:
                t_eval = time.time()
                row.update(gm.evaluate(glob))
                row["eval_s"] = time.time() - t_eval
            extra = getattr(strategy, "last_metrics", None)
            if extra:
                row.update(extra)
            save_checkpoint(run_dir / "checkpoints", round_num, glob, strategy.state_dict(), {"seed": cfg.seed})
            gm.export(glob, run_dir / "adapter")
            row["wall_s"] = time.time() - t0
            metrics.append(row)
    if rank == 0:
        gm.export(glob, run_dir / "adapter")
        if not quiet:
            print("\n" + metrics.summary(), file=sys.stderr)
        return metrics.rows
    return []
