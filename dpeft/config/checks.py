"""Checks of the core config sections (model, adapter shape, data, train, simulate, transport, ray, split).

The sections whose meaning depends on a registered implementation (strategy, sync policy,
codecs, adapter method) are checked by their families (:mod:`dpeft.validate`).
"""

from __future__ import annotations

import os
from collections.abc import Iterable

from dpeft.config.data_checks import check_data
from dpeft.config.quantization import check_quantization
from dpeft.config.schema import MAX_CHUNK_BYTES, MIN_CHUNK_BYTES, RayConfig, RunConfig, SplitConfig, TransportConfig
from dpeft.config.tracking_checks import check_tracking
from dpeft.config.train_checks import check_train_hardware
from dpeft.errors import ConfigError


def check_chunk_bytes(key: str, value: int) -> None:
    """A chunk size in bytes between :data:`MIN_CHUNK_BYTES` and :data:`MAX_CHUNK_BYTES`."""
    if value > MAX_CHUNK_BYTES:
        raise ConfigError(key, f"must be at most {MAX_CHUNK_BYTES} (64 MiB; gRPC messages stay small), got {value}")
    if value < MIN_CHUNK_BYTES:
        raise ConfigError(key, f"must be at least {MIN_CHUNK_BYTES} bytes (the value is in bytes: 4 MiB is 4194304), got {value}")


def positive(key: str, value: float, allow_zero: bool = False) -> None:
    """ConfigError(key) unless ``value`` > 0 (>= 0 with ``allow_zero``)."""
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(key, f"must be {'>= 0' if allow_zero else '> 0'}, got {value}")


def one_of(key: str, value: str, allowed: Iterable[str]) -> None:
    """ConfigError(key) unless ``value`` is one of ``allowed``."""
    allowed = list(allowed)
    if value not in allowed:
        raise ConfigError(key, f"must be one of {', '.join(allowed)}; got {value!r}")


def check_core(cfg: RunConfig) -> None:
    """Cross-field checks of the core sections that types alone cannot express."""
    for key, value in [
        ("rounds", cfg.rounds),
        ("clients", cfg.clients),
        ("clients_per_round", cfg.clients_per_round),
        ("train.local_steps", cfg.train.local_steps),
        ("train.batch_size", cfg.train.batch_size),
        ("train.lr", cfg.train.lr),
        ("train.eval_batch_size", cfg.train.eval_batch_size),
        ("train.eval_every", cfg.train.eval_every),
        ("train.lockstep_clients", cfg.train.lockstep_clients),
        ("adapter.r", cfg.adapter.r),
        ("model.max_length", cfg.model.max_length),
        ("simulate.processes", cfg.simulate.processes),
        ("simulate.threads_per_process", cfg.simulate.threads_per_process),
        ("simulate.coordinator_threads", cfg.simulate.coordinator_threads),
        ("transport.max_update_bytes", cfg.transport.max_update_bytes),
        ("transport.spool_bytes", cfg.transport.spool_bytes),
        ("sync.round_timeout_s", cfg.sync.round_timeout_s),
        ("sync.min_workers", cfg.sync.min_workers),
    ]:
        positive(key, value)
    if cfg.strategy.server_lr is not None:
        positive("strategy.server_lr", cfg.strategy.server_lr)
    positive("train.weight_decay", cfg.train.weight_decay, allow_zero=True)
    positive("simulate.cores", cfg.simulate.cores, allow_zero=True)
    positive("adapter.dropout", cfg.adapter.dropout, allow_zero=True)
    if cfg.model.dropout is not None and not 0 <= cfg.model.dropout < 1:
        raise ConfigError("model.dropout", f"must be in [0, 1) or null, got {cfg.model.dropout}")
    if cfg.train.lockstep:
        validate_lockstep(cfg)
    if cfg.clients_per_round > cfg.clients:
        raise ConfigError(
            "clients_per_round", f"{cfg.clients_per_round} clients per round but only {cfg.clients} clients"
        )
    check_chunk_bytes("transport.chunk_bytes", cfg.transport.chunk_bytes)
    if cfg.transport.max_update_norm is not None and not cfg.transport.max_update_norm > 0:
        raise ConfigError("transport.max_update_norm", f"must be > 0 or null, got {cfg.transport.max_update_norm}")
    one_of("model.task", cfg.model.task, ["seq_cls", "causal_lm"])
    one_of("simulate.start", cfg.simulate.start, ["auto", "fork", "spawn"])
    one_of("aggregation", cfg.aggregation, ["coordinator", "allreduce"])
    if cfg.simulate.start == "fork" and not hasattr(os, "fork"):
        raise ConfigError("simulate.start", "fork is not available on this platform; use spawn or auto")
    if cfg.model.path is None:
        one_of("model.name", cfg.model.name, ["minilm", "smollm2"])
    check_data(cfg)
    one_of("train.optimizer", cfg.train.optimizer, ["adamw", "sgd"])
    if cfg.train.worker_mmap_threshold_kib is not None:
        positive("train.worker_mmap_threshold_kib", cfg.train.worker_mmap_threshold_kib)
    if cfg.model.layers is not None:
        positive("model.layers", cfg.model.layers)
    check_quantization(cfg.model)
    check_eval(cfg)
    check_train_hardware(cfg)
    check_transport(cfg.transport)
    validate_ray(cfg.ray)
    validate_split(cfg.split)
    check_tracking(cfg)


def check_eval(cfg: RunConfig) -> None:
    """Checks of the ``eval:`` section."""
    e = cfg.eval
    if e.generate not in (True, False, "auto"):
        raise ConfigError("eval.generate", f"expected auto, true or false, got {e.generate!r}")
    one_of("eval.match", e.match, ["exact", "contains"])
    if e.clients is not None:
        positive("eval.clients", e.clients)
        if e.clients > cfg.clients:
            raise ConfigError("eval.clients", f"{e.clients} clients but only {cfg.clients} exist")
    if not 0.0 < e.client_test_fraction < 1.0:
        raise ConfigError("eval.client_test_fraction", f"must be between 0 and 1 (exclusive), got {e.client_test_fraction}")
    positive("eval.generate_examples", e.generate_examples, allow_zero=True)
    positive("eval.max_new_tokens", e.max_new_tokens)
    positive("eval.samples", e.samples, allow_zero=True)


def check_transport(t: TransportConfig) -> None:
    """Limits of the ``transport:`` section that a coordinator and its workers rely on."""
    for key, value in [
        ("transport.heartbeat_s", t.heartbeat_s),
        ("transport.dead_after_s", t.dead_after_s),
        ("transport.max_tensor_bytes", t.max_tensor_bytes),
        ("transport.max_concurrent_uploads", t.max_concurrent_uploads),
        ("transport.resume_window_s", t.resume_window_s),
        ("transport.server_threads", t.server_threads),
        ("transport.poll_timeout_s", t.poll_timeout_s),
    ]:
        positive(key, value)
    if t.dead_after_s <= t.heartbeat_s:
        raise ConfigError("transport.dead_after_s", f"must exceed transport.heartbeat_s ({t.heartbeat_s}) or live workers are declared dead")


def validate_lockstep(cfg: RunConfig) -> None:
    """``train.lockstep: true`` needs what multi-LoRA training can route (errors name the key to change)."""
    if cfg.model.task not in ("seq_cls", "causal_lm"):
        raise ConfigError("train.lockstep", f"supports model.task=seq_cls or causal_lm, not {cfg.model.task!r}; set train.lockstep=false")
    if cfg.adapter.method != "lora":
        raise ConfigError("train.lockstep", f"supports adapter.method=lora, not {cfg.adapter.method!r}; set train.lockstep=false")
    if cfg.adapter.dropout > 0:
        raise ConfigError(
            "adapter.dropout", f"train.lockstep needs 0 (one joint pass cannot replay each client's dropout masks), got {cfg.adapter.dropout}"
        )
    if cfg.model.dropout != 0:
        raise ConfigError(
            "model.dropout",
            f"train.lockstep needs the base model's dropout off: set model.dropout=0 (got {cfg.model.dropout}; null keeps the checkpoint's, 0.1 for MiniLM)",
        )


def validate_ray(r: RayConfig) -> None:
    """Checks of the ``ray:`` section (errors name ``ray.<key>``)."""
    if r.actors is not None:
        positive("ray.actors", r.actors)
    positive("ray.num_cpus", r.num_cpus, allow_zero=True)
    positive("ray.num_gpus", r.num_gpus, allow_zero=True)
    if r.num_gpus > 1 and r.num_gpus != int(r.num_gpus):
        raise ConfigError("ray.num_gpus", f"fractions are for sharing one GPU; got {r.num_gpus}")
    for k, v in r.resources.items():
        if not isinstance(v, (int, float)) or isinstance(v, bool) or v < 0:
            raise ConfigError(f"ray.resources.{k}", f"expected a non-negative number, got {v!r}")
    if r.threads is not None:
        positive("ray.threads", r.threads)
    if r.placement_strategy is not None:
        one_of("ray.placement_strategy", r.placement_strategy, ["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"])
    for key, value in (("ray.max_restarts", r.max_restarts), ("ray.max_task_retries", r.max_task_retries)):
        if value < -1:
            raise ConfigError(key, f"must be >= -1, got {value}")
    positive("ray.max_attempts", r.max_attempts)
    positive("ray.startup_timeout_s", r.startup_timeout_s)
    if r.backend is not None:
        one_of("ray.backend", r.backend, ["gloo", "nccl"])
    if r.local_num_cpus is not None:
        positive("ray.local_num_cpus", r.local_num_cpus)


WIRE_DTYPES = ("fp32", "fp16", "bf16")


def validate_split(cfg: SplitConfig) -> None:
    """Checks of the ``split:`` section (errors name ``split.<key>``)."""
    for key, value in [
        ("split.edges", cfg.edges),
        ("split.steps", cfg.steps),
        ("split.cloud_threads", cfg.cloud_threads),
        ("split.edge_threads", cfg.edge_threads),
        ("split.kr.window", cfg.kr.window),
        ("split.max_batch_edges", cfg.max_batch_edges),
    ]:
        if value < 1:
            raise ConfigError(key, f"must be >= 1, got {value}")
    if not 0.0 <= cfg.batch_window_ms <= 10_000.0:
        raise ConfigError("split.batch_window_ms", f"must be in [0, 10000], got {cfg.batch_window_ms}")
    if cfg.eval_examples < 0:
        raise ConfigError("split.eval_examples", f"must be >= 0, got {cfg.eval_examples}")
    if cfg.layers is not None and cfg.layers < 1:
        raise ConfigError("split.layers", f"must be >= 1 or null, got {cfg.layers}")
    if cfg.wire_dtype not in WIRE_DTYPES:
        raise ConfigError("split.wire_dtype", f"must be one of {', '.join(WIRE_DTYPES)}; got {cfg.wire_dtype!r}")
    check_chunk_bytes("split.chunk_bytes", cfg.chunk_bytes)
    if not 0.0 < cfg.kr.budget <= 1.0:
        raise ConfigError("split.kr.budget", f"must be in (0, 1], got {cfg.kr.budget}")
    if cfg.kr.warmup < 0:
        raise ConfigError("split.kr.warmup", f"must be >= 0, got {cfg.kr.warmup}")
    if cfg.kr.revive_every < 0:
        raise ConfigError("split.kr.revive_every", f"must be >= 0, got {cfg.kr.revive_every}")
    if cfg.kr.revive_count < 0:
        raise ConfigError("split.kr.revive_count", f"must be >= 0, got {cfg.kr.revive_count}")
    if cfg.kr.revive_order not in ("score", "oldest"):
        raise ConfigError("split.kr.revive_order", f"must be score or oldest, got {cfg.kr.revive_order!r}")
    if cfg.kr.score not in ("change", "relative", "loss_drop"):
        raise ConfigError("split.kr.score", f"must be change, relative or loss_drop, got {cfg.kr.score!r}")
    if not 0.0 <= cfg.kr.ema < 1.0:
        raise ConfigError("split.kr.ema", f"must be in [0, 1), got {cfg.kr.ema}")
    if cfg.kr.revive_every and cfg.kr.revive_every % cfg.kr.window:
        raise ConfigError("split.kr.revive_every", f"must be a multiple of split.kr.window ({cfg.kr.window}), got {cfg.kr.revive_every}")
