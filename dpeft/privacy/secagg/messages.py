"""Secure-aggregation messages as the coordinator/worker task protocol carries them.

Each protocol step is a task kind (:data:`KEYS`, :data:`SHARE`, :data:`MASK`, :data:`UNMASK`).
What the coordinator sends travels in the task's hyperparameters (JSON inside the protobuf
task message: the round context and base64 strings of public keys and sealed shares) under
``"secagg"``; what a client answers is an adapter container of raw byte tensors (``uint8``; the
masked vector as ``int32`` / ``int64`` residues), checked on arrival against an exact schema
(:func:`reply_schema`). Nothing is pickled.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import torch

from dpeft.privacy.secagg import crypto, shamir
from dpeft.privacy.secagg.context import RoundContext, b64, unb64
from dpeft.privacy.secagg.encoding import wire_dtype
from dpeft.state import AdapterState

KEYS = "secagg-keys"
SHARE = "secagg-share"
MASK = "secagg-mask"
UNMASK = "secagg-unmask"
#: the task kinds of secure aggregation, in protocol order (a worker declares them when it joins)
TASK_KINDS = (KEYS, SHARE, MASK, UNMASK)
#: bytes of one neighbour's sealed pair of shares (nonce, two shares, GCM tag)
SEALED_BYTES = crypto.NONCE_BYTES + 2 * shamir.SHARE_BYTES + 16


def request(ctx: RoundContext, **fields: Any) -> dict[str, Any]:
    """The ``"secagg"`` hyperparameter of a task."""
    return {"ctx": ctx.to_json(), **fields}


def parse_request(hp: dict[str, Any]) -> tuple[RoundContext, dict[str, Any]]:
    body = hp.get("secagg")
    if not isinstance(body, dict):
        raise ValueError("the task carries no secure-aggregation request")
    return RoundContext.from_json(body.get("ctx")), body


def ids(value: Any) -> list[int]:
    if not isinstance(value, list) or not all(isinstance(v, int) for v in value):
        raise ValueError("expected a list of client ids")
    return value


def keyed(value: Any) -> dict[int, Any]:
    if not isinstance(value, dict):
        raise ValueError("expected an object keyed by client id")
    return {int(k): v for k, v in value.items()}


# -- requests -----------------------------------------------------------------------
def share_request(peers: dict[int, tuple[bytes, bytes]]) -> dict[str, Any]:
    return {"peers": {str(v): [b64(c), b64(s)] for v, (c, s) in peers.items()}}


def read_share_request(body: dict[str, Any]) -> dict[int, tuple[bytes, bytes]]:
    out = {}
    for v, pair in keyed(body.get("peers")).items():
        if not isinstance(pair, list) or len(pair) != 2:
            raise ValueError("malformed peer keys")
        out[v] = (unb64(pair[0], crypto.KEY_BYTES), unb64(pair[1], crypto.KEY_BYTES))
    return out


def mask_request(alive: list[int], sealed: dict[int, bytes]) -> dict[str, Any]:
    return {"alive": list(alive), "sealed": {str(v): b64(s) for v, s in sealed.items()}}


def read_mask_request(body: dict[str, Any]) -> tuple[list[int], dict[int, bytes]]:
    return ids(body.get("alive")), {v: unb64(s, SEALED_BYTES) for v, s in keyed(body.get("sealed")).items()}


def unmask_request(dropped: list[int], survived: list[int]) -> dict[str, Any]:
    return {"dropped": list(dropped), "survived": list(survived)}


def read_unmask_request(body: dict[str, Any]) -> tuple[list[int], list[int]]:
    return ids(body.get("dropped")), ids(body.get("survived"))


# -- replies --------------------------------------------------------------------------
def _u8(raw: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8)


def raw(t: torch.Tensor) -> bytes:
    return t.detach().cpu().contiguous().numpy().tobytes()


def reply(parts: dict[str, bytes | torch.Tensor]) -> AdapterState:
    return AdapterState(OrderedDict((k, v if isinstance(v, torch.Tensor) else _u8(v)) for k, v in parts.items()))


def reply_schema(kind: str, **spec: Any) -> OrderedDict[str, tuple[tuple[int, ...], torch.dtype]]:
    """The exact tensors a reply of ``kind`` must have (``spec``: peers / length+bits / dropped+survived)."""
    u8 = torch.uint8
    if kind == KEYS:
        return OrderedDict([("c_pk", ((crypto.KEY_BYTES,), u8)), ("s_pk", ((crypto.KEY_BYTES,), u8))])
    if kind == SHARE:
        return OrderedDict((f"to.{v}", ((SEALED_BYTES,), u8)) for v in spec["peers"])
    if kind == MASK:
        return OrderedDict([("masked", ((spec["length"],), wire_dtype(spec["bits"]))), ("tag", ((crypto.TAG_BYTES,), u8))])
    if kind == UNMASK:
        names = [f"s.{v}" for v in spec["dropped"]] + [f"b.{v}" for v in spec["survived"]]
        return OrderedDict([*((n, ((shamir.SHARE_BYTES,), u8)) for n in names), ("tag", ((crypto.TAG_BYTES,), u8))])
    raise ValueError(f"unknown secure-aggregation step {kind!r}")


def read_shares(state: AdapterState) -> dict[int, bytes]:
    return {int(k.split(".", 1)[1]): raw(v) for k, v in state.items()}
