"""`dpeft ray`: the round engine in the Ray driver, workers as Ray actors.

    ray start --head
    ray job submit --working-dir . -- dpeft ray --config run.yaml rounds=5
    dpeft ray --config run.yaml                 # no cluster: starts a local Ray
    dpeft ray --address HOST:6379 --config run.yaml ray.actors=8 ray.num_gpus=0.5

Ray settings live in a ``ray:`` section of the config file or in ``ray.*`` overrides (see
:class:`RayConfig`); everything else is the ordinary run config, so the same coordinator,
strategies, sync policies and worker code run as under ``dpeft simulate``.

``ray.mode: allreduce`` instead forms a torch.distributed group out of the actors (rank 0's
address, as Ray Train's torch backend does) and aggregates by all-reduce, without the engine.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from dpeft.config import RunConfig, config_from_dict, config_to_dict, parse_override
from dpeft.errors import ConfigError, DpeftError

log = logging.getLogger("dpeft.launch.ray")


def _f(default: Any, help: str) -> Any:  # noqa: A002
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass(kw_only=True)
class RayConfig:
    """The ``ray:`` section: where the cluster is and what each worker actor reserves."""

    address: str | None = _f(None, "Ray cluster address (auto: RAY_ADDRESS, e.g. under `ray job submit`); null and unset = start a local Ray")
    mode: str = _f("actors", "actors: the round engine in the driver, workers as actors; allreduce: actors form a torch.distributed group")
    actors: int | None = _f(None, "worker actors (null = simulate.processes)")
    num_cpus: float = _f(1.0, "CPUs reserved per actor (also its torch threads unless threads is set)")
    num_gpus: float = _f(0.0, "GPUs reserved per actor; fractions share a GPU (0.5 = two actors per GPU)")
    resources: dict[str, Any] = _f({}, "custom resources per actor, e.g. {edge: 1} to land on nodes started with --resources '{\"edge\": 4}'")
    threads: int | None = _f(None, "torch threads per actor (null = max(1, num_cpus))")
    placement_strategy: str | None = _f("PACK", "placement group strategy: PACK, SPREAD, STRICT_PACK, STRICT_SPREAD; null = no placement group")
    max_restarts: int = _f(2, "times Ray restarts a dead actor (-1 = forever)")
    max_task_retries: int = _f(0, "times Ray itself retries a task on a restarted actor (the transport also re-queues it)")
    max_attempts: int = _f(3, "tries of one task across actor failures before it is reported failed to the sync policy")
    startup_timeout_s: float = _f(600.0, "seconds to wait for the placement group and the actors to come up")
    backend: str | None = _f(None, "allreduce mode: gloo or nccl (null = nccl when actors have GPUs, else gloo)")
    local_num_cpus: int | None = _f(None, "CPUs of a local Ray started by dpeft (null = all)")
    runtime_env: dict[str, Any] = _f({}, "extra ray.init runtime_env (e.g. env_vars, pip); working_dir comes from `ray job submit`")

    def validate(self) -> None:
        from dpeft.config import _one_of, _positive

        _one_of("ray.mode", self.mode, ["actors", "allreduce"])
        if self.actors is not None:
            _positive("ray.actors", self.actors)
        _positive("ray.num_cpus", self.num_cpus, allow_zero=True)
        _positive("ray.num_gpus", self.num_gpus, allow_zero=True)
        if self.num_gpus > 1 and self.num_gpus != int(self.num_gpus):
            raise ConfigError("ray.num_gpus", f"fractions are for sharing one GPU; got {self.num_gpus}")
        for k, v in self.resources.items():
            if not isinstance(v, (int, float)) or isinstance(v, bool) or v < 0:
                raise ConfigError(f"ray.resources.{k}", f"expected a non-negative number, got {v!r}")
        if self.threads is not None:
            _positive("ray.threads", self.threads)
        if self.placement_strategy is not None:
            _one_of("ray.placement_strategy", self.placement_strategy, ["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"])
        if self.max_restarts < -1:
            raise ConfigError("ray.max_restarts", f"must be >= -1, got {self.max_restarts}")
        if self.max_task_retries < -1:
            raise ConfigError("ray.max_task_retries", f"must be >= -1, got {self.max_task_retries}")
        _positive("ray.max_attempts", self.max_attempts)
        _positive("ray.startup_timeout_s", self.startup_timeout_s)
        if self.backend is not None:
            _one_of("ray.backend", self.backend, ["gloo", "nccl"])
        if self.local_num_cpus is not None:
            _positive("ray.local_num_cpus", self.local_num_cpus)

    def spec(self, cfg: RunConfig) -> Any:
        from dpeft.transport.ray_transport import RayActorSpec

        return RayActorSpec(
            actors=self.actors or cfg.simulate.processes,
            num_cpus=self.num_cpus,
            num_gpus=self.num_gpus,
            resources={k: float(v) for k, v in self.resources.items()},
            threads=self.threads,
            placement_strategy=self.placement_strategy,
            max_restarts=self.max_restarts,
            max_task_retries=self.max_task_retries,
            max_attempts=self.max_attempts,
            startup_timeout_s=self.startup_timeout_s,
        )


def load_run_config(path: str | None, overrides: list[str] | tuple[str, ...] = ()) -> tuple[RunConfig, RayConfig]:
    """Like :func:`dpeft.config.load_config`, plus the ``ray:`` section / ``ray.*`` overrides."""
    from dpeft.config import _build, _merge_override

    tree: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError("--config", f"no such file: {p}")
        try:
            loaded = yaml.safe_load(p.read_text())
        except yaml.YAMLError as exc:
            raise ConfigError("--config", f"{p} is not valid YAML: {exc}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError("--config", f"{p} must hold a mapping at the top level")
        tree = loaded
    ray_tree = tree.pop("ray", None) or {}
    if not isinstance(ray_tree, dict):
        raise ConfigError("ray", f"expected a mapping, got {ray_tree!r}")
    for text in overrides:
        keys, value = parse_override(text)
        if keys[0] == "ray":
            if len(keys) == 1:
                raise ConfigError("ray", "override a key inside the section, e.g. ray.actors=4")
            _merge_override(ray_tree, keys[1:], value)
        else:
            _merge_override(tree, keys, value)
    cfg = config_from_dict(tree)
    rcfg = _build(RayConfig, ray_tree, "ray.")
    rcfg.validate()
    return cfg, rcfg


# ---------------------------------------------------------------- CLI hook


def add_parser(subparsers: Any) -> None:
    r = subparsers.add_parser("ray", help="coordinator in the Ray driver, workers as Ray actors (cluster or local)")
    r.add_argument("--config", help="YAML run config; Ray settings under a ray: section")
    r.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS or ray.address, else a local Ray)")
    r.add_argument("--fresh", action="store_true", help="ignore checkpoints already in run_dir")
    r.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. rounds=10 ray.actors=4 ray.num_gpus=0.5")
    r.set_defaults(extension="dpeft.launch.ray_cli")


def run(args: argparse.Namespace) -> int:
    cfg, rcfg = load_run_config(args.config, args.overrides)
    if args.address:
        rcfg.address = args.address
    run_ray(cfg, rcfg, resume=not args.fresh)
    return 0


# ---------------------------------------------------------------- driver


def init_ray(rcfg: RayConfig) -> bool:
    """Connect to (or start) Ray; True when this call started it (the caller shuts it down)."""
    try:
        import ray
    except ModuleNotFoundError:
        raise DpeftError('`dpeft ray` needs Ray: pip install "ray[default]"') from None
    if ray.is_initialized():
        return False
    address = rcfg.address or os.environ.get("RAY_ADDRESS") or None
    kwargs: dict[str, Any] = {"logging_level": logging.WARNING, "log_to_driver": True}
    if rcfg.runtime_env:
        kwargs["runtime_env"] = dict(rcfg.runtime_env)
    if address is None:
        kwargs.update(include_dashboard=False)
        if rcfg.local_num_cpus:
            kwargs["num_cpus"] = rcfg.local_num_cpus
    try:
        ray.init(address=address, **kwargs)
    except ConnectionError as exc:
        raise DpeftError(f"cannot reach the Ray cluster at {address}: {exc}") from None
    return True


def run_ray(cfg: RunConfig, rcfg: RayConfig, resume: bool = True, quiet: bool = False) -> list[dict[str, Any]]:
    """One run on Ray (actors or allreduce mode); returns the metrics rows."""
    started = init_ray(rcfg)
    try:
        if rcfg.mode == "allreduce":
            return _run_allreduce(cfg, rcfg, resume, quiet)
        return _run_actors(cfg, rcfg, resume, quiet)
    finally:
        if started:
            import ray

            ray.shutdown()


def _run_actors(cfg: RunConfig, rcfg: RayConfig, resume: bool, quiet: bool) -> list[dict[str, Any]]:
    from dpeft.coordinator.engine import RoundEngine
    from dpeft.coordinator.global_model import GlobalModel
    from dpeft.transport.ray_transport import RayCoordinatorTransport
    from dpeft.workers.runtime import set_threads

    set_threads(cfg.simulate.coordinator_threads)
    t_start = time.time()
    run_dir = Path(cfg.run_dir)
    gm = GlobalModel(cfg)
    engine = RoundEngine(cfg, gm, run_dir, resume=resume)
    transport = RayCoordinatorTransport(
        config_tree=config_to_dict(cfg),
        decoder_factory=engine.decoder_for,
        spec=rcfg.spec(cfg),
        max_update_bytes=cfg.transport.max_update_bytes,
    )
    interrupted = threading.Event()

    def on_signal(signum: int, frame: Any) -> None:
        interrupted.set()
        engine.stop_event.set()

    old = {}
    if threading.current_thread() is threading.main_thread():
        old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        address = transport.start()
        if not quiet:
            print(f"dpeft ray: {len(transport.workers())} actors on {address}; run directory {run_dir}", file=sys.stderr, flush=True)
        rows = engine.run(transport)
    finally:
        transport.shutdown("run complete" if not interrupted.is_set() else "coordinator stopping")
        engine.stop_event.set()
        for s, h in old.items():
            signal.signal(s, h)
    if interrupted.is_set():
        raise KeyboardInterrupt
    if not quiet:
        _print_summary(engine.metrics, rows, run_dir, t_start)
    return rows


def _print_summary(metrics: Any, rows: list[dict[str, Any]], run_dir: Path, t_start: float) -> None:
    metrics.progress_done()
    print("\n" + metrics.summary(), file=sys.stderr)
    plots = metrics.plot()
    final = [r for r in rows if r.get("eval_accuracy") is not None]
    acc = f"final eval accuracy {final[-1]['eval_accuracy']:.4f}; " if final else ""
    print(
        f"\n{acc}{len(rows) - 1} rounds in {time.time() - t_start:.1f}s; adapter: {run_dir / 'adapter'}; "
        f"metrics: {run_dir / 'metrics.jsonl'}; plots: {', '.join(p.name for p in plots)}",
        file=sys.stderr,
    )


def _run_allreduce(cfg: RunConfig, rcfg: RayConfig, resume: bool, quiet: bool) -> list[dict[str, Any]]:
    """Actors form a torch.distributed group (rank 0's address) and run the all-reduce rounds."""
    import dataclasses

    from dpeft.coordinator.metrics import MetricsLog

    t_start = time.time()
    # rank 0 writes the run directory: make the path absolute so it does not depend on the actor's cwd
    cfg = dataclasses.replace(cfg, run_dir=str(Path(cfg.run_dir).resolve()))
    group = RayAllReduceGroup(rcfg.spec(cfg), backend=rcfg.backend or ("nccl" if rcfg.num_gpus else "gloo"))
    try:
        group.start()
        rows = group.run(config_to_dict(cfg), resume)
    finally:
        group.shutdown()
    if not quiet:
        _print_summary(MetricsLog(Path(cfg.run_dir), total_rounds=cfg.rounds), rows, Path(cfg.run_dir), t_start)
    return rows


class RayAllReduceGroup:
    """N Ray actors forming one torch.distributed process group (placement group, rank 0's address)."""

    def __init__(self, spec: Any, backend: str = "gloo") -> None:
        import ray

        self.ray = ray
        self.spec = spec
        self.backend = backend
        self.actors: list[Any] = []
        self._pg: Any = None

    def start(self) -> None:
        ray = self.ray
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        from dpeft.workers.ray_actor import AllReduceActor

        n = self.spec.actors
        self._pg = placement_group([self.spec.bundle() for _ in range(n)], strategy=self.spec.placement_strategy or "PACK")
        if not ray.wait([self._pg.ready()], timeout=self.spec.startup_timeout_s)[0]:
            raise DpeftError(f"Ray could not reserve {n} x {self.spec.bundle()} (cluster: {ray.cluster_resources()})")
        threads = self.spec.torch_threads()
        remote = ray.remote(AllReduceActor)
        env = {"env_vars": {"OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}}
        self.actors = [
            remote.options(
                num_cpus=self.spec.num_cpus,
                num_gpus=self.spec.num_gpus,
                resources=dict(self.spec.resources) or None,
                runtime_env=env,
                scheduling_strategy=PlacementGroupSchedulingStrategy(placement_group=self._pg, placement_group_bundle_index=i),
            ).remote(threads)
            for i in range(n)
        ]
        addr, port = ray.get(self.actors[0].address.remote(), timeout=self.spec.startup_timeout_s)
        ray.get([a.setup.remote(addr, port, i, n, self.backend) for i, a in enumerate(self.actors)], timeout=self.spec.startup_timeout_s)

    def run(self, config_tree: dict[str, Any], resume: bool = True) -> list[dict[str, Any]]:
        try:
            results = self.ray.get([a.run.remote(config_tree, resume) for a in self.actors])
        except self.ray.exceptions.RayTaskError as exc:
            cause = exc.cause if hasattr(exc, "cause") else None
            if isinstance(cause, DpeftError):
                raise cause from None
            raise
        return results[0]

    def reduce(self, per_rank: list[tuple[list[Any], float]]) -> list[tuple[list[Any], float]]:
        """Test/benchmark hook: each rank all-reduces its (arrays, weight)."""
        return self.ray.get([a.reduce.remote(arrs, w) for a, (arrs, w) in zip(self.actors, per_rank, strict=True)])

    def shutdown(self) -> None:
        for a in self.actors:
            try:
                self.ray.kill(a, no_restart=True)
            except Exception:  # noqa: BLE001
                pass
        self.actors = []
        if self._pg is not None:
            from ray.util.placement_group import remove_placement_group

            try:
                remove_placement_group(self._pg)
            except Exception:  # noqa: BLE001
                pass
            self._pg = None
