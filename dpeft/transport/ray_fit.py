"""Will the actors' placement group ever fit? Checked before Ray is asked to reserve it.

A placement group the cluster can never hold would otherwise wait the whole
``ray.startup_timeout_s`` (600 s by default) before failing. The bundles of a pool are all alike, so
a node holds ``min over resources of floor(node's / bundle's)`` of them, and the group fits when
the nodes together hold ``ray.actors`` (PACK, SPREAD), one node holds them all (STRICT_PACK) or
that many nodes hold one each (STRICT_SPREAD).

Only a cluster that cannot grow is refused up front: one with an autoscaler (a cluster config
in the GCS, as autoscaler v2 and KubeRay publish, or ``~/ray_bootstrap_config.yaml`` on a head
started by ``ray up``) may still add the nodes; there the wait and its timeout stay as they were.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

from dpeft.errors import ConfigError

EPS = 1e-9


def capacity(node: dict[str, float], bundle: dict[str, float]) -> int:
    """How many ``bundle``s fit into ``node``'s total resources."""
    fits = [math.floor(node.get(k, 0.0) / v + EPS) for k, v in bundle.items() if v > 0]
    return min(fits) if fits else 1 << 30


def placement_problem(bundle: dict[str, float], actors: int, strategy: str, nodes: list[dict[str, float]]) -> str | None:
    """Why ``actors`` bundles can never be placed on ``nodes`` (their total resources), or None."""
    counts = [capacity(n, bundle) for n in nodes]
    strategy = (strategy or "PACK").upper()
    if strategy == "STRICT_PACK":
        ok, need = max(counts, default=0) >= actors, f"one node with room for all {actors}"
    elif strategy == "STRICT_SPREAD":
        ok, need = sum(c >= 1 for c in counts) >= actors, f"{actors} nodes with room for one each"
    else:
        ok, need = sum(counts) >= actors, f"room for {actors}"
    if ok:
        return None
    missing = sorted(k for k in bundle if not any(k in n for n in nodes))
    why = (
        f"no node has the resource {', '.join(missing)}"
        if missing
        else f"the nodes hold {sum(counts)} in all ({max(counts, default=0)} at most on one)"
    )
    return f"{strategy} placement needs {need} of {bundle}; {why}"


def cluster_can_grow(ray: Any) -> bool:
    """True when an autoscaler may add nodes (see the module docstring)."""
    try:
        from ray._private.state import state

        if state.get_cluster_config() is not None:
            return True
    except Exception:  # an older or newer Ray without this call: look for the other signs
        pass
    return (Path.home() / "ray_bootstrap_config.yaml").is_file() or "KUBERNETES_SERVICE_HOST" in os.environ


def node_totals(ray: Any) -> list[dict[str, float]]:
    """The total resources of each live node."""
    return [dict(n.get("Resources") or {}) for n in ray.nodes() if n.get("Alive")]


def check_fits(ray: Any, bundle: dict[str, float], actors: int, strategy: str) -> None:
    """A ConfigError naming ray.actors and the per-actor resources when a fixed cluster can never hold the group."""
    nodes = node_totals(ray)
    if not nodes:
        return
    problem = placement_problem(bundle, actors, strategy, nodes)
    if problem is None or cluster_can_grow(ray):
        return
    summary = "; ".join(
        ", ".join(
            f"{k}={v:g}" for k, v in sorted(n.items()) if not k.startswith("node:") and k not in ("memory", "object_store_memory")
        )
        for n in nodes
    )
    raise ConfigError(
        "ray.actors",
        f"this Ray cluster can never hold {actors} actors: {problem} (nodes: {summary}); "
        "lower ray.actors, or ray.num_cpus / ray.num_gpus / ray.resources per actor, or use ray.placement_strategy=PACK",
    )
