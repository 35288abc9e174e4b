"""Per-round overhead on the default task: gRPC simulate vs Ray actors vs torch.distributed all-reduce.

Where ``benchmarks/transports.py`` replaces training by a precomputed update (pure transport
cost on a large synthetic adapter), this one runs the real default task (MiniLM + LoRA r=8,
Rotten Tomatoes, 20 local steps, the default strategy) through the three user-facing launchers:

- ``dpeft simulate`` (coordinator + N worker processes over loopback gRPC),
- ``dpeft ray`` (the engine in the Ray driver, N actors, a local Ray),
- ``dpeft simulate aggregation=allreduce`` (N gloo ranks, no coordinator),

with ``clients_per_round`` fixed (8 by default) so the training work per round is the same
for every N, and only the last round evaluated. Per round, from ``metrics.jsonl``:

- star transports: overhead = ``wall_s - eval_s - client_compute_s / N`` (the sum of the
  clients' training time spread over N workers: what is left is sampling, publishing, moving,
  decoding, validating, aggregating, checkpointing, and waiting on the slowest worker);
- all-reduce: overhead = ``wall_s - eval_s - rank0_train_s`` (the all-reduce, the server step,
  the checkpoint, and waiting for the slowest rank).

With more workers than cores the clients' own compute slows down too (it is measured, so it is
subtracted), but the imbalance between workers shows up as overhead. Writes the
``transports_task`` section of benchmarks/RESULTS.md.

    python benchmarks/transports_task.py [--workers 2 4 8] [--rounds 2] [--clients-per-round 8]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from results import machine_note, write_section  # noqa: E402

LAUNCHERS = ("grpc", "ray", "allreduce")


def command(transport: str, workers: int, args: argparse.Namespace, run_dir: Path) -> list[str]:
    common = [
        "--fresh", f"run_dir={run_dir}", f"rounds={args.rounds}", f"clients_per_round={args.clients_per_round}",
        f"train.eval_every={args.rounds}", f"simulate.processes={workers}",
    ]  # fmt: skip
    cli = [sys.executable, "-m", "dpeft_launch.cli"]
    if transport == "grpc":
        return [*cli, "simulate", *common]
    if transport == "allreduce":
        return [*cli, "simulate", *common, "aggregation=allreduce"]
    return [
        *cli,
        "ray",
        *common,
        f"ray.actors={workers}",
        f"ray.local_num_cpus={max(2, workers)}",
        "ray.num_cpus=1",
        "ray.threads=1",
    ]


def run_cell(transport: str, workers: int, args: argparse.Namespace, out: Path) -> dict:
    run_dir = out / f"{transport}-{workers}"
    with tempfile.TemporaryDirectory(prefix="ray-bench-") as ray_tmp:
        env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", RAY_AUTH_MODE="disabled", RAY_TMPDIR=ray_tmp)
        t0 = time.time()
        proc = subprocess.run(command(transport, workers, args, run_dir), env=env, capture_output=True, text=True)
        total = time.time() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{transport} x{workers} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    per_round = []
    for r in rows:
        if r["round"] < 1:
            continue
        busy = r.get("eval_s", 0.0)
        if transport == "allreduce":
            train = r["rank0_train_s"]
        else:
            train = r["client_compute_s"] / workers
        per_round.append(
            {
                "wall": r["wall_s"],
                "train": train,
                "overhead": r["wall_s"] - busy - train,
                "bytes": r["bytes_up"] + r["bytes_down"],
            }
        )
    cell = {
        "transport": transport,
        "workers": workers,
        "overhead": statistics.median(p["overhead"] for p in per_round),
        "wall": statistics.median(p["wall"] for p in per_round),
        "train": statistics.median(p["train"] for p in per_round),
        "bytes": statistics.median(p["bytes"] for p in per_round),
        "total": total,
        "accuracy": rows[-1].get("eval_accuracy"),
    }
    print(
        f"{transport:9s} N={workers}: overhead {cell['overhead']:.2f}s/round, training {cell['train']:.1f}s, wall {cell['wall']:.1f}s, "
        f"{cell['bytes'] / 2**20:.2f} MiB/round, process total {total:.0f}s, final acc {cell['accuracy']}",
        file=sys.stderr,
        flush=True,
    )
    return cell


def section(cells: list[dict], args: argparse.Namespace) -> str:
    lines = [
        f"The default task (MiniLM + LoRA r=8 on query/value, Rotten Tomatoes, 20 local steps), {args.clients_per_round} clients "
        f"per round whatever the number of workers, {args.rounds} rounds, the last one evaluated; the real launchers "
        "(`dpeft simulate`, `dpeft ray`, `dpeft simulate aggregation=allreduce`). Overhead per round is the round's wall time "
        "minus evaluation minus training (star: the clients' summed training time / N; all-reduce: rank 0's training time), "
        "median over rounds. Bytes are those `metrics.jsonl` reports per round (up + down; all-reduce: the ring formula, float64).",
        "",
        "| transport | workers | overhead s / round | training s / round | round wall s | MiB / round | process wall s | final acc |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for c in cells:
        acc = "-" if c["accuracy"] is None else f"{c['accuracy']:.3f}"
        lines.append(
            f"| {c['transport']} | {c['workers']} | {c['overhead']:.2f} | {c['train']:.1f} | {c['wall']:.1f} | "
            f"{c['bytes'] / 2**20:.2f} | {c['total']:.0f} | {acc} |"
        )
    lines += [
        "",
        "The adapter of the default task is small (LoRA factors and the head: a few hundred KiB), so the transports differ by their fixed "
        "costs, not by bandwidth: the gRPC star pays task polling and the upload handshake per client, Ray pays actor calls "
        "and object-store puts, all-reduce pays one collective per round plus the wait for the slowest rank (ranks train a "
        "fixed share of the sample, the star transports hand tasks to whichever worker is free). With more workers than "
        "the machine's cores, contention inflates both training and overhead; the synthetic-adapter table above isolates "
        "the transport cost.",
        "",
        machine_note() + f" Load average at the end: {os.getloadavg()[0]:.1f}.",
    ]
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workers", type=int, nargs="+", default=[2, 4, 8])
    p.add_argument("--transports", nargs="+", default=list(LAUNCHERS), choices=LAUNCHERS)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--clients-per-round", type=int, default=8)
    p.add_argument("--out", default=str(HERE / "runs" / "transports_task"))
    p.add_argument("--no-write", action="store_true", help="print the section instead of updating RESULTS.md")
    args = p.parse_args()
    out = Path(args.out)
    cells = [run_cell(t, n, args, out) for n in args.workers for t in args.transports]
    text = section(cells, args)
    if args.no_write:
        print(text)
    else:
        write_section("transports_task", "Transport overhead per round on the default task, 2..8 workers", text)
        print(f"wrote the transports_task section of {HERE / 'RESULTS.md'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
