"""A pool of Ray actors: creation on a placement group, readiness, restart bookkeeping, teardown.

Shared by the Ray transport (training actors, restarted by Ray up to ``max_restarts`` and
probed back into service) and ``dpeft ray``'s all-reduce mode (ranks of one
``torch.distributed`` group, never restarted), much like Ray Train's worker group: one bundle
per actor holding its CPUs, GPUs and custom resources, thread counts pinned through the
actor's environment.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from dpeft.errors import DpeftError

log = logging.getLogger("dpeft.transport.ray")


@dataclass(kw_only=True)
class RayActorSpec:
    """How many actors and what each one reserves."""

    actors: int = 2
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    resources: dict[str, float] = field(default_factory=dict)
    threads: int | None = None
    placement_strategy: str | None = "PACK"
    max_restarts: int = 2
    max_task_retries: int = 0
    max_attempts: int = 3
    startup_timeout_s: float = 600.0

    def bundle(self) -> dict[str, float]:
        out = {"CPU": float(self.num_cpus), "GPU": float(self.num_gpus), **{k: float(v) for k, v in self.resources.items()}}
        return {k: v for k, v in out.items() if v > 0}

    def torch_threads(self) -> int:
        return int(self.threads) if self.threads else max(1, int(self.num_cpus))


@dataclass
class PoolMember:
    """One actor of the pool."""

    index: int
    worker_id: str
    handle: Any
    alive: bool = True
    restarts: int = 0  # failures seen while it ran a task (each restart of the actor shows up as one)
    deaths: int = 0
    probe_failures: int = 0  # in a row
    info: dict[str, Any] = field(default_factory=dict)


def short_error(exc: BaseException) -> str:
    """The first line of an error (Ray's are long), at most 300 characters."""
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else type(exc).__name__


class RayActorPool:
    """``spec.actors`` actors of ``actor_cls``, each on its own placement-group bundle.

    ``restartable``: Ray restarts a dead actor up to ``spec.max_restarts`` times (re-running its
    constructor) and retries its calls ``spec.max_task_retries`` times; otherwise never.
    ``always_place``: reserve a placement group even without ``spec.placement_strategy`` (PACK).
    """

    def __init__(self, spec: RayActorSpec, actor_cls: type, *, restartable: bool = True, always_place: bool = False, id_prefix: str = "ray-") -> None:
        import ray

        self.ray = ray
        self.spec = spec
        self.actor_cls = actor_cls
        self.restartable = restartable
        self.always_place = always_place
        self.id_prefix = id_prefix
        self.members: list[PoolMember] = []
        self._pg: Any = None

    def _placement(self) -> list[Any]:
        """One scheduling strategy per actor (None: Ray places it), reserving the bundles first."""
        spec = self.spec
        strategy = spec.placement_strategy or ("PACK" if self.always_place else None)
        if not strategy or not (spec.bundle() or self.always_place):
            return [None] * spec.actors
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        from dpeft.transport.ray_fit import check_fits

        check_fits(self.ray, spec.bundle(), spec.actors, strategy)  # a group that can never fit: fail now, not after the timeout
        self._pg = placement_group([spec.bundle() for _ in range(spec.actors)], strategy=strategy)
        ready, _ = self.ray.wait([self._pg.ready()], timeout=spec.startup_timeout_s)
        if not ready:
            raise DpeftError(
                f"Ray could not reserve {spec.actors} x {spec.bundle()} within {spec.startup_timeout_s:.0f}s "
                f"(cluster resources: {self.ray.cluster_resources()}); lower ray.actors or the per-actor resources"
            )
        return [PlacementGroupSchedulingStrategy(placement_group=self._pg, placement_group_bundle_index=i) for i in range(spec.actors)]

    def start(self, actor_args: Callable[[str, int], tuple[Any, ...]]) -> list[PoolMember]:
        """Create the actors; ``actor_args(worker_id, threads)`` gives each one's constructor arguments."""
        spec = self.spec
        if spec.actors < 1:
            raise DpeftError("a Ray actor pool needs at least one actor")
        strategies = self._placement()
        remote_cls: Any = self.ray.remote(self.actor_cls)
        threads = spec.torch_threads()
        env = {"env_vars": {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}}
        for i in range(spec.actors):
            worker_id = f"{self.id_prefix}{i}"
            options: dict[str, Any] = dict(
                num_cpus=spec.num_cpus,
                num_gpus=spec.num_gpus,
                resources=dict(spec.resources) or None,
                max_restarts=spec.max_restarts if self.restartable else 0,
                max_task_retries=spec.max_task_retries if self.restartable else 0,
                runtime_env=env,
            )
            if strategies[i] is not None:
                options["scheduling_strategy"] = strategies[i]
            handle = remote_cls.options(**options).remote(*actor_args(worker_id, threads))
            self.members.append(PoolMember(i, worker_id, handle))
        return self.members

    def wait_ready(self, method: str = "ready") -> None:
        """Call ``method`` on every actor and wait (``spec.startup_timeout_s``); its answer is the member's ``info``."""
        ray = self.ray
        refs = {getattr(m.handle, method).remote(): m for m in self.members}
        ready, not_ready = ray.wait(list(refs), num_returns=len(refs), timeout=self.spec.startup_timeout_s)
        if not_ready:
            raise DpeftError(f"{len(not_ready)} of {len(refs)} Ray actors did not start within {self.spec.startup_timeout_s:.0f}s")
        for ref in ready:
            try:
                refs[ref].info = ray.get(ref)
            except ray.exceptions.RayError as exc:
                raise DpeftError(f"Ray actor {refs[ref].worker_id} failed to start: {short_error(exc)}") from None

    def call_failed(self, member: PoolMember, exc: Exception, probing: bool) -> bool:
        """A call on ``member`` failed because the actor died or is unreachable. True when Ray may
        still bring it back (probe it with ``ready``); False when it is dead for good."""
        if probing:
            member.probe_failures += 1
        else:
            member.restarts += 1
        if isinstance(exc, self.ray.exceptions.ActorDiedError):
            member.deaths += 1
            if not self.restartable or 0 <= self.spec.max_restarts < member.deaths or member.probe_failures > 3:
                log.warning("Ray actor %s is dead (out of restarts): %s", member.worker_id, short_error(exc))
                member.alive = False
                return False
        return True

    def back(self, member: PoolMember, info: dict[str, Any]) -> None:
        """A (restarted) actor answered its probe."""
        member.alive = True
        member.probe_failures = 0
        member.info = info
        log.info("Ray actor %s is back (pid %s)", member.worker_id, info.get("pid"))

    def shutdown(self) -> None:
        """Kill every actor (no restart) and release the placement group."""
        for m in self.members:
            try:
                self.ray.kill(m.handle, no_restart=True)
            except Exception:  # noqa: BLE001 - already gone
                pass
            m.alive = False
        if self._pg is not None:
            from ray.util.placement_group import remove_placement_group

            try:
                remove_placement_group(self._pg)
            except Exception:  # noqa: BLE001
                pass
            self._pg = None
