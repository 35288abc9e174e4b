"""Cost of secure aggregation (``privacy.secure_aggregation``) per round, against the same rounds without it.

    python benchmarks/privacy_secagg.py [--quick] [--no-write] [key=value ...]

Two parts, in one invocation:

1. **10 clients per round, real processes**: `dpeft simulate` on the default task (MiniLM,
   LoRA r=8 on query/value, rotten tomatoes) with ``clients=10 clients_per_round=10``, once
   without and once with secure aggregation (the same seed, so the same clients, batches and
   steps). Per round: wall time without the global evaluation, bytes up and down per client
   (every protocol step included), the protocol's own steps (keys, shares, unmasking, the
   coordinator's unmasking) measured inside the secure run.
2. **100 clients per round, in one process**: the protocol on the real adapter size of the
   default task (the trained tensors of MiniLM with LoRA r=8), all 100 clients and the
   coordinator in this process (:func:`dpeft.privacy.secagg.inprocess.secure_sum`, messages
   encoded as they travel, no network), against the plain path (each client encodes its fp32
   update, the coordinator decodes it and folds it into the weighted mean). Also at 10 clients
   for comparison.

Targets: at most 2x the bytes of an fp32 update per client, at most 20% added to a round of
the default task at 10 clients per round. Writes the "Privacy: secure aggregation cost" section
of benchmarks/RESULTS.md (unless ``--no-write``) and prints it. ``main(argv)`` is the entry point
(``benchmarks/privacy.py --part secagg`` calls it).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from results import machine_note, write_section  # noqa: E402

DEFAULT_TASK = ["clients=10", "clients_per_round=10", "rounds=2", "simulate.processes=2", "train.eval_every=2"]
QUICK = ["train.local_steps=4", "train.batch_size=8", "model.max_length=32", "data.test_examples=64"]


def _simulate(run_dir: Path, overrides: list[str]) -> list[dict[str, Any]]:
    cmd = [sys.executable, "-m", "dpeft_launch.cli", "simulate", "--fresh", f"run_dir={run_dir}", *overrides]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=3600, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"dpeft simulate failed:\n{proc.stderr[-3000:]}")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [r for r in rows if r["round"] > 0]


def _mean(values: list[float]) -> float:
    return sum(values) / max(len(values), 1)


def processes_part(overrides: list[str]) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        plain = _simulate(Path(tmp) / "plain", overrides)
        secure = _simulate(Path(tmp) / "secure", [*overrides, "privacy.secure_aggregation=true"])
    out: dict[str, Any] = {}
    for name, rows in (("plain", plain), ("secure", secure)):
        n = rows[0]["clients"]
        out[name] = {
            "round_s": _mean([r["wall_s"] - r.get("eval_s", 0.0) for r in rows]),
            "up_per_client": _mean([r["bytes_up"] / n for r in rows]),
            "down_per_client": _mean([r["bytes_down"] / n for r in rows]),
            "clients": n,
        }
    steps = ("secagg_keys_s", "secagg_share_s", "secagg_unmask_s", "secagg_coordinator_s")
    out["secure"]["protocol_s"] = _mean([sum(r[k] for k in steps) for r in secure])
    out["secure"]["steps"] = {k: _mean([r[k] for r in secure]) for k in (*steps, "secagg_mask_s")}
    return out


def default_schema() -> Any:
    """The trained tensors of the default task's adapter (MiniLM, LoRA r=8 on query/value, 2 labels)."""
    from dpeft.adapters import build_model, extract_state
    from dpeft.config import AdapterConfig, ModelConfig

    return extract_state(build_model(ModelConfig(), AdapterConfig(), 2, 0).model).schema()


def inprocess_part(schema: Any, clients: int, dropped: int = 0, seed: int = 0) -> dict[str, Any]:
    import torch

    from dpeft.codec import decode_state, encode_state
    from dpeft.privacy.secagg.context import SecAggSettings
    from dpeft.privacy.secagg.inprocess import secure_sum
    from dpeft.state import AdapterState
    from dpeft.strategies import ClientUpdate
    from dpeft.strategies.aggregate import StreamingWeightedMean

    gen = torch.Generator().manual_seed(seed)
    deltas = {
        c: AdapterState(
            OrderedDict((k, torch.randn(shape, generator=gen, dtype=dtype) * 1e-3) for k, (shape, dtype) in schema.items())
        )
        for c in range(clients)
    }
    weights = {c: 80 + c for c in range(clients)}
    # plain: each client encodes its fp32 update, the coordinator decodes and folds it
    t = time.perf_counter()
    blobs = {c: encode_state(d) for c, d in deltas.items()}
    plain_client_s = (time.perf_counter() - t) / clients
    zero = AdapterState(OrderedDict((k, torch.zeros(shape, dtype=dtype)) for k, (shape, dtype) in schema.items()))
    t = time.perf_counter()
    agg = StreamingWeightedMean(zero)
    for c, b in blobs.items():
        agg.add(ClientUpdate(c, decode_state(b, schema), weights[c]))
    agg.result()
    plain_coord_s = time.perf_counter() - t
    settings = SecAggSettings(neighbours=None, threshold=0.5, bits=32, clip_range=1.0, max_weight=10000)
    gone = set(range(dropped))
    summed, weight, _, cost = secure_sum(deltas, weights, settings, drop_after_masking=gone)
    expected = {k: sum(weights[c] * deltas[c][k].double() for c in deltas if c not in gone) for k in schema}
    err = max((summed[k].double() - expected[k]).abs().max().item() for k in schema) / weight
    fp32 = _mean([len(b) for b in blobs.values()])
    return {
        "clients": clients,
        "dropped": dropped,
        "params": sum(v.numel() for v in zero.tensors.values()),
        "fp32_update_bytes": fp32,
        "up_per_client": _mean(list(cost.up.values())),
        "down_per_client": _mean(list(cost.down.values())),
        "client_s": _mean(list(cost.client_s.values())),
        "coordinator_s": cost.coordinator_s,
        "plain_client_s": plain_client_s,
        "plain_coordinator_s": plain_coord_s,
        "mean_error": err,
    }


def _kib(n: float) -> str:
    return f"{n / 1024:,.1f} KiB"


def report(
    proc: dict[str, Any] | None,
    inproc: list[dict[str, Any]],
    overrides: list[str],
    load: tuple[float, float],
    total_s: float,
    fp32: float,
    argv: list[str],
) -> str:
    lines = [
        f"`python benchmarks/privacy_secagg.py {' '.join(argv)}`".replace(" `", "`"),
        "",
        f"{machine_note()} 1-min load average {load[0]:.1f} at the start, {load[1]:.1f} at the end (the machine is shared with other jobs and noisy). Total {total_s / 60:.1f} min.",
        "",
        "| target | measured |",
        "| --- | --- |",
    ]
    big = inproc[1]
    if proc is not None:
        s, p = proc["secure"], proc["plain"]
        added = s["round_s"] / p["round_s"] - 1
        lines.append(
            f"| bytes up per client <= 2x an fp32 update (10 clients, processes) | {s['up_per_client'] / fp32:.3f}x ({_kib(s['up_per_client'])} vs {_kib(fp32)}) |"
        )
        lines.append(
            f"| <= 20% added to a round of the default task, 10 clients per round | {100 * added:+.1f}% (round time, two runs); "
            f"{100 * s['protocol_s'] / s['round_s']:.2f}% (the protocol's own steps within the secure run) |"
        )
    lines.append(
        f"| bytes up per client <= 2x an fp32 update ({big['clients']} clients, in process) | {big['up_per_client'] / big['fp32_update_bytes']:.3f}x |"
    )
    lines.append("")
    if proc is not None:
        s, p = proc["secure"], proc["plain"]
        lines += [
            f"**10 clients per round, `dpeft simulate` (coordinator + 2 worker processes, gRPC on loopback).** Overrides: `{' '.join(overrides)}`.",
            "",
            "| run | round s (no eval) | bytes up / client | bytes down / client | protocol steps s (keys + shares + unmask + coordinator) |",
            "| --- | --- | --- | --- | --- |",
            f"| without | {p['round_s']:.2f} | {_kib(p['up_per_client'])} | {_kib(p['down_per_client'])} | |",
            f"| secure aggregation | {s['round_s']:.2f} | {_kib(s['up_per_client'])} | {_kib(s['down_per_client'])} | {s['protocol_s']:.2f} |",
            "",
            "Secure run, mean seconds per step: "
            + ", ".join(f"{k.replace('secagg_', '').replace('_s', '')} {v:.3f}" for k, v in s["steps"].items())
            + " (mask = training + masking + upload).",
            "",
        ]
    lines += [
        f"**In process, the default task's adapter ({big['params']:,} trained parameters, fp32 update {_kib(big['fp32_update_bytes'])}):** every client and the coordinator in this process, messages encoded as they travel, no network; the plain path encodes, decodes and averages fp32 updates.",
        "",
        "| clients / round | dropped after masking | neighbours | secure: up / client | down / client (protocol only) | client s | coordinator s | plain: client s | coordinator s | max error of the weighted mean |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in inproc:
        lines.append(
            f"| {r['clients']} | {r['dropped']} | {r['neighbours']} | {_kib(r['up_per_client'])} | {_kib(r['down_per_client'])} | {r['client_s']:.3f} | {r['coordinator_s']:.2f} | "
            f"{r['plain_client_s']:.4f} | {r['plain_coordinator_s']:.3f} | {r['mean_error']:.2e} |"
        )
    lines += [
        "",
        "Bytes down per client count the protocol's messages only (the global adapter a client downloads is the same with or without). "
        "The masked vector has one 4-byte residue per parameter (`privacy.secagg_bits: 32`) plus three (weight, weighted loss, clip bit), so a client's upload is "
        "about one fp32 update plus its keys and sealed shares (O(neighbours)). Client time is key agreement, secret sharing and mask expansion "
        "(ChaCha20, one stream per neighbour); the coordinator's grows with clients x neighbours (masks of dropouts) and clients (self masks).",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer local steps and shorter sequences (a smoke run)")
    ap.add_argument("--no-processes", action="store_true", help="only the in-process part")
    ap.add_argument("--no-write", action="store_true", help="print, do not write benchmarks/RESULTS.md")
    ap.add_argument("overrides", nargs="*", help="extra key=value for the simulate runs")
    args = ap.parse_args(argv)
    t0 = time.time()
    load0 = os.getloadavg()[0]
    overrides = [*DEFAULT_TASK, *(QUICK if args.quick else []), *args.overrides]
    proc = None if args.no_processes else processes_part(overrides)
    from dpeft.privacy.secagg.graph import default_degree, graph_degree

    schema = default_schema()
    inproc = []
    for n, dropped in ((10, 0), (100, 0), (100, 5)):
        r = inprocess_part(schema, n, dropped)
        r["neighbours"] = graph_degree(n, default_degree(n))
        inproc.append(r)
    text = report(
        proc,
        inproc,
        overrides,
        (load0, os.getloadavg()[0]),
        time.time() - t0,
        inproc[0]["fp32_update_bytes"],
        list(argv if argv is not None else sys.argv[1:]),
    )
    print(text)
    if not args.no_write:
        write_section("privacy_secagg", "Privacy: secure aggregation cost", text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
