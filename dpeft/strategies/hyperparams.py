"""The task hyperparameters strategies hand to clients, and what an update then contains.

:class:`TaskHyperparams` is the typed contract; on the wire (``TrainTask.hyperparams``, JSON)
it is a dict holding only the fields that are set (:meth:`~TaskHyperparams.to_dict`,
:meth:`~TaskHyperparams.from_dict`, which ignores keys it does not know).
``Strategy.configure_train`` returns that dict; the round engine adds ``attempt`` and
``task_seq``. The fields:

- ``prox_mu`` (float): FedProx proximal weight.
- ``freeze`` (list of path components): parameters whose structural name has one of them as
  a dot-separated part are not trained (ffa_lora: ``lora_A``) and are left out of the update.
- ``personal`` (list of path components): those parameters are the client's own (fedsa_lora:
  ``lora_B``): the worker restores the client's saved value instead of the global's, saves it
  after training, and leaves it out of the update.
- ``full_factors`` (list of path components): the update carries the local value of those
  parameters, not local minus start (flexlora's factors of the client's own rank).
- ``rank_prune`` (list ``[lam, keep, threshold, min_rank]``, plus a rule code for the
  ``decrease`` rule): hetlora's rank self-pruning; the
  client adds a penalty on its tail ranks to the loss and zeroes them in the update once they
  fade, reporting the rank it keeps as the metric ``hetlora_rank``
  (:mod:`dpeft.strategies.rank_prune`).
- ``task_seq`` (int): the async engine's sequence number of the task.
- ``attempt`` (int): how many times the task was re-assigned after it was lost (0 = first try).

Both sides use :func:`update_schema` so the coordinator validates an update against exactly
the names and shapes the worker sends.
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from dpeft.strategies.lora import has_component


@dataclass(frozen=True, kw_only=True)
class TaskHyperparams:
    """What a task tells its client beyond the adapter to start from; None = not set (not sent)."""

    prox_mu: float | None = None
    freeze: tuple[str, ...] | None = None
    personal: tuple[str, ...] | None = None
    full_factors: tuple[str, ...] | None = None
    rank_prune: tuple[float, ...] | None = None
    task_seq: int | None = None
    attempt: int | None = None

    def to_dict(self) -> dict[str, Any]:
        """The wire form: the fields that are set, path-component tuples as lists."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is not None:
                out[f.name] = list(value) if isinstance(value, tuple) else value
        return out

    @classmethod
    def from_dict(cls, hp: Mapping[str, Any]) -> TaskHyperparams:
        """Read the wire form (keys this version does not know are ignored)."""
        lists: dict[str, Any] = {
            k: tuple(str(v) for v in hp[k]) for k in ("freeze", "personal", "full_factors") if hp.get(k) is not None
        }
        numbers: dict[str, Any] = {}
        if hp.get("rank_prune") is not None:
            numbers["rank_prune"] = tuple(float(v) for v in hp["rank_prune"])
        if hp.get("prox_mu") is not None:
            numbers["prox_mu"] = float(hp["prox_mu"])
        for key in ("task_seq", "attempt"):
            if hp.get(key) is not None:
                numbers[key] = int(hp[key])
        return cls(**lists, **numbers)

    @property
    def omitted(self) -> list[str]:
        """Path components whose tensors a client leaves out of its update (frozen or personal)."""
        return [*(self.freeze or ()), *(self.personal or ())]


def omitted_components(hp: Mapping[str, Any]) -> list[str]:
    """Path components whose tensors a client leaves out of its update."""
    return TaskHyperparams.from_dict(hp).omitted


def sent_names(names: Iterable[str], hp: Mapping[str, Any]) -> list[str]:
    """The tensor names an update for a task with hyperparameters ``hp`` contains (in order)."""
    omit = omitted_components(hp)
    return [n for n in names if not (omit and has_component(n, omit))]


def is_full_factor(name: str, hp: Mapping[str, Any]) -> bool:
    """Whether the update carries the local value (not a delta) of ``name``."""
    parts = TaskHyperparams.from_dict(hp).full_factors
    return bool(parts) and has_component(name, list(parts or ()))


def update_schema(schema: Mapping[str, Any], hp: Mapping[str, Any]) -> OrderedDict[str, Any]:
    """The schema of an update, given the schema of the state the client was sent."""
    keep = set(sent_names(schema, hp))
    return OrderedDict((k, v) for k, v in schema.items() if k in keep)
