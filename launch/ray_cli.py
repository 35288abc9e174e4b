"""`dpeft ray`: the round engine in the Ray driver, workers as Ray actors.

    ray start --head
    ray job submit --working-dir . -- python -m dpeft_launch ray --config run.yaml rounds=5
    dpeft ray --config run.yaml                 # no cluster: starts a local Ray
    dpeft ray --address HOST:6379 --config run.yaml ray.actors=8 ray.num_gpus=0.5

Ray settings live in the ``ray:`` section of the run config (:class:`dpeft.config.RayConfig`,
also ``ray.*`` overrides; the other commands accept and ignore it, so one YAML file serves
``dpeft simulate`` and ``dpeft ray``); everything else is the ordinary run config, so the same
coordinator, strategies, sync policies and worker code run as under ``dpeft simulate``,
simulated heterogeneity included (``simulate.speed_factors``, ``simulate.dropout`` and
``simulate.byzantine_clients``, see :mod:`dpeft.transport.ray_transport`).

``aggregation: allreduce`` instead forms a torch.distributed group out of the actors (rank 0's
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
from pathlib import Path
from typing import Any

from dpeft.config import RayConfig, RunConfig, config_to_dict
from dpeft.errors import DpeftError
from dpeft.plugins import plugin_dirs
from dpeft.rounds.plots import prewarm as prewarm_plots
from dpeft.validate import load_config

log = logging.getLogger("dpeft.launch.ray")


def actor_spec(cfg: RunConfig) -> Any:
    """The :class:`RayActorSpec` of ``cfg.ray`` (``ray.actors`` defaults to ``simulate.processes``)."""
    from dpeft.transport.ray_pool import RayActorSpec

    r = cfg.ray
    return RayActorSpec(
        actors=r.actors or cfg.simulate.processes,
        num_cpus=r.num_cpus,
        num_gpus=r.num_gpus,
        resources={k: float(v) for k, v in r.resources.items()},
        threads=r.threads,
        placement_strategy=r.placement_strategy,
        max_restarts=r.max_restarts,
        max_task_retries=r.max_task_retries,
        max_attempts=r.max_attempts,
        startup_timeout_s=r.startup_timeout_s,
    )


# ---------------------------------------------------------------- CLI hook


def add_parser(subparsers: Any) -> None:
    r = subparsers.add_parser("ray", help="coordinator in the Ray driver, workers as Ray actors (cluster or local)")
    r.add_argument("--config", help="YAML run config; Ray settings under a ray: section")
    r.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS or ray.address, else a local Ray)")
    r.add_argument("--fresh", action="store_true", help="ignore checkpoints already in run_dir")
    r.add_argument("--plugin", action="append", default=None, metavar="MODULE", help="import this plug-in module first (repeatable; = plugins: [MODULE]; actors import it too)")
    r.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. rounds=10 ray.actors=4 ray.num_gpus=0.5")
    r.set_defaults(extension="dpeft_launch.ray_cli")


def run(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides, plugins=args.plugin or ())  # the ray: section is part of RunConfig (errors name ray.<key>)
    from dpeft.privacy.secagg.checks import refuse_command

    refuse_command(cfg, "ray")
    if args.address:
        cfg.ray.address = args.address
    warn_simulate_only(cfg)
    run_ray(cfg, resume=not args.fresh)
    return 0


def warn_simulate_only(cfg: RunConfig) -> list[str]:
    """Print a warning for simulated-heterogeneity keys this run cannot honour; returns them.

    ``aggregation: coordinator`` honours all of them (the transport drops and delays tasks, the worker
    runtime corrupts byzantine updates). ``allreduce`` rounds are synchronous with no
    coordinator to miss a reply, so slow and dropped clients cannot be simulated there.
    """
    if cfg.aggregation != "allreduce":
        return []
    from dpeft.rounds.allreduce import warn_collective_ignores

    return warn_collective_ignores(cfg, "dpeft ray", "aggregation=allreduce")


# ---------------------------------------------------------------- driver


def init_ray(rcfg: RayConfig, plugins: list[str] | None = None) -> bool:
    """Connect to (or start) Ray; True when this call started it (the caller shuts it down).

    ``plugins``: the run's plug-in modules; the directories they were imported from go on the
    actors' PYTHONPATH (on a cluster, ship them with ``ray.runtime_env``: ``py_modules`` or a working_dir)."""
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
    dirs = plugin_dirs(plugins or [])
    if dirs:
        runtime_env = dict(kwargs.get("runtime_env") or {})
        env_vars = dict(runtime_env.get("env_vars") or {})
        env_vars["PYTHONPATH"] = os.pathsep.join([*dirs, *filter(None, [env_vars.get("PYTHONPATH") or os.environ.get("PYTHONPATH")])])
        kwargs["runtime_env"] = {**runtime_env, "env_vars": env_vars}
    if address is None:
        kwargs.update(include_dashboard=False)
        if rcfg.local_num_cpus:
            kwargs["num_cpus"] = rcfg.local_num_cpus
    try:
        ray.init(address=address, **kwargs)
    except ConnectionError as exc:
        raise DpeftError(f"cannot reach the Ray cluster at {address}: {exc}") from None
    return True


def run_ray(cfg: RunConfig, resume: bool = True, quiet: bool = False) -> list[dict[str, Any]]:
    """One run on Ray (``cfg.aggregation``: coordinator or allreduce); returns the metrics rows."""
    started = init_ray(cfg.ray, cfg.plugins)
    try:
        if cfg.aggregation == "allreduce":
            return _run_allreduce(cfg, resume, quiet)
        return _run_actors(cfg, resume, quiet)
    finally:
        if started:
            import ray

            ray.shutdown()


def _core_budget(cfg: RunConfig, run_dir: Path, engine: Any, gm: Any) -> str | None:
    """``simulate.work_conserving`` on a local Ray (started here, no cluster address): a core budget
    the actors and the coordinator's evaluation share, as `dpeft simulate`'s processes do; None otherwise."""
    if not cfg.simulate.work_conserving or cfg.ray.address or os.environ.get("RAY_ADDRESS") or cfg.ray.num_gpus:
        return None
    from dpeft.train.cores import CoreBudget, budgeted_evaluation, usable_cpus

    spec = actor_spec(cfg)
    path = run_dir / "cores.budget"
    CoreBudget.create(path, cfg.simulate.cores or min(spec.actors * spec.torch_threads(), usable_cpus()), spec.actors + 1)
    engine.evaluate = budgeted_evaluation(gm.evaluate, gm.bundle.model, CoreBudget(path, spec.actors, priority=1))
    return str(path)


def _run_actors(cfg: RunConfig, resume: bool, quiet: bool) -> list[dict[str, Any]]:
    from dpeft.rounds.global_model import GlobalModel
    from dpeft.transport.ray_transport import RayCoordinatorTransport
    from dpeft_coordinator.engine import RoundEngine
    from dpeft_workers.ray_actor import TrainActor
    from dpeft_workers.runtime import set_threads
    from dpeft_workers.simulate import Heterogeneity

    set_threads(cfg.simulate.coordinator_threads)
    t_start = time.time()
    run_dir = Path(cfg.run_dir)
    gm = GlobalModel(cfg)
    engine = RoundEngine(cfg, gm, run_dir, resume=resume)
    cores = _core_budget(cfg, run_dir, engine, gm)
    transport = RayCoordinatorTransport(
        cores=cores,
        config_tree=config_to_dict(cfg),
        decoder_factory=engine.decoder_for,
        spec=actor_spec(cfg),
        settings=cfg.transport,
        actor_cls=TrainActor,
        heterogeneity=Heterogeneity(cfg),
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
            prewarm_plots()
        rows = engine.run(transport)
    finally:
        transport.shutdown("run complete" if not interrupted.is_set() else "coordinator stopping")
        engine.stop_event.set()
        for s, h in old.items():
            signal.signal(s, h)
    if interrupted.is_set():
        raise KeyboardInterrupt
    if not quiet:
        engine.metrics.print_summary(rows, t_start)
    return rows


def _run_allreduce(cfg: RunConfig, resume: bool, quiet: bool) -> list[dict[str, Any]]:
    """Actors form a torch.distributed group (rank 0's address) and run the all-reduce rounds."""
    import dataclasses

    from dpeft.rounds.metrics import MetricsLog

    t_start = time.time()
    # rank 0 writes the run directory: make the path absolute so it does not depend on the actor's cwd
    cfg = dataclasses.replace(cfg, run_dir=str(Path(cfg.run_dir).resolve()))
    group = RayAllReduceGroup(actor_spec(cfg), backend=cfg.ray.backend or ("nccl" if cfg.ray.num_gpus else "gloo"))
    try:
        group.start()
        rows = group.run(config_to_dict(cfg), resume)
    finally:
        group.shutdown()
    if not quiet:
        MetricsLog(Path(cfg.run_dir), total_rounds=cfg.rounds).print_summary(rows, t_start)
    return rows


class RayAllReduceGroup:
    """N Ray actors forming one torch.distributed process group (a :class:`RayActorPool` that is
    never restarted, on a placement group; rank 0's address is the rendezvous)."""

    def __init__(self, spec: Any, backend: str = "gloo") -> None:
        import ray

        from dpeft.transport.ray_pool import RayActorPool
        from dpeft_workers.ray_actor import AllReduceActor

        self.ray = ray
        self.spec = spec
        self.backend = backend
        self.pool = RayActorPool(spec, AllReduceActor, restartable=False, always_place=True, id_prefix="rank-")

    @property
    def actors(self) -> list[Any]:
        """The ranks' actor handles, rank order."""
        return [m.handle for m in self.pool.members]

    def start(self) -> None:
        ray = self.ray
        self.pool.start(lambda worker_id, threads: (threads,))
        actors, n, timeout = self.actors, self.spec.actors, self.spec.startup_timeout_s
        addr, port = ray.get(actors[0].address.remote(), timeout=timeout)
        ray.get([a.setup.remote(addr, port, i, n, self.backend) for i, a in enumerate(actors)], timeout=timeout)

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
        self.pool.shutdown()
        self.pool.members.clear()
