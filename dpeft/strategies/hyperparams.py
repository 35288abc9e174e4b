"""The task hyperparameters strategies hand to clients, and what an update then contains.

``Strategy.configure_train`` returns a dict that travels with every TrainTask. The keys a
worker understands (anything else is ignored):

- ``prox_mu`` (float): FedProx proximal weight.
- ``freeze`` (list of path components): parameters whose structural name has one of them as
  a dot-separated part are not trained (ffa_lora: ``lora_A``) and are left out of the update.
- ``personal`` (list of path components): those parameters are the client's own (fedsa_lora:
  ``lora_B``): the worker restores the client's saved value instead of the global's, saves it
  after training, and leaves it out of the update.
- ``full_factors`` (list of path components): the update carries the local value of those
  parameters, not local minus start (flexlora's factors of the client's own rank).

Both sides use :func:`update_schema` so the coordinator validates an update against exactly
the names and shapes the worker sends.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Mapping
from typing import Any

from dpeft.strategies.lora import has_component


def omitted_components(hp: Mapping[str, Any]) -> list[str]:
    """Path components whose tensors a client leaves out of its update."""
    return list(hp.get("freeze", [])) + list(hp.get("personal", []))


def sent_names(names: Iterable[str], hp: Mapping[str, Any]) -> list[str]:
    """The tensor names an update for a task with hyperparameters ``hp`` contains (in order)."""
    omit = omitted_components(hp)
    return [n for n in names if not (omit and has_component(n, omit))]


def is_full_factor(name: str, hp: Mapping[str, Any]) -> bool:
    """Whether the update carries the local value (not a delta) of ``name``."""
    parts = hp.get("full_factors", [])
    return bool(parts) and has_component(name, parts)


def update_schema(schema: Mapping[str, Any], hp: Mapping[str, Any]) -> OrderedDict[str, Any]:
    """The schema of an update, given the schema of the state the client was sent."""
    keep = set(sent_names(schema, hp))
    return OrderedDict((k, v) for k, v in schema.items() if k in keep)
