"""Update codecs on the default task: bytes per round and accuracy after R rounds.

Runs ``dpeft simulate`` once per codec setting (same seed, so the same client samples and
batches; only the codec differs) and reads ``metrics.jsonl``: bytes up/down are what crossed the
wire. Compression is against the fp32 run's upload bytes (adapter-only deltas) and against
sending the full model (every parameter of the base model plus the adapter, fp32) per client.

    python benchmarks/codecs.py [--rounds 5] [--quick] [key=value ...]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from results import machine_note, write_section  # noqa: E402

SETTINGS = [
    ("fp32", ["codec.up=fp32"]),
    ("fp16", ["codec.up=fp16"]),
    ("bf16", ["codec.up=bf16"]),
    ("int8", ["codec.up=int8"]),
    ("topk 5% + EF", ["codec.up=topk", "codec.options={fraction: 0.05}"]),
    ("topk 5% + int8 + EF", ["codec.up=topk+int8", "codec.options={fraction: 0.05}"]),
    ("topk 5%, no EF", ["codec.up=topk", "codec.options={fraction: 0.05}", "codec.error_feedback=false"]),
    ("int8 up + int8 down", ["codec.up=int8", "codec.down=int8"]),
]


def full_model_bytes() -> int:
    """fp32 bytes of every parameter of the default model with its adapter (what FedAvg of the full model sends)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from dpeft.adapters import build_model
    from dpeft.config import AdapterConfig, ModelConfig

    model = build_model(ModelConfig(), AdapterConfig(), 2, 0).model
    return sum(p.numel() * 4 for p in model.parameters())


def run(overrides: list[str], run_dir: str) -> tuple[list[dict], float]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    t0 = time.time()
    proc = subprocess.run(
        [sys.executable, "-m", "dpeft_launch.cli", "simulate", "--fresh", f"run_dir={run_dir}", *overrides],
        capture_output=True,
        text=True,
        timeout=3600,
        env=env,
        stdin=subprocess.DEVNULL,
    )
    if proc.returncode != 0:
        raise SystemExit(f"dpeft simulate {' '.join(overrides)} failed:\n{proc.stderr[-3000:]}")
    rows = [json.loads(line) for line in Path(run_dir, "metrics.jsonl").read_text().splitlines()]
    return rows, time.time() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="2 rounds on 600 examples (a smoke run)")
    parser.add_argument("--only", help="comma-separated setting names to run")
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    base = [f"rounds={args.rounds}", *args.overrides]
    if args.quick:
        base = ["rounds=2", "data.max_train_examples=600", "data.test_examples=100", "train.local_steps=5", *args.overrides]
    settings = [s for s in SETTINGS if not args.only or s[0] in args.only.split(",")]
    full = full_model_bytes()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, extra) in enumerate(settings):
            rows, wall = run([*base, *extra], os.path.join(tmp, f"run{i}"))
            trained = [r for r in rows if r["round"] > 0]
            up = sum(r["bytes_up"] for r in trained) / len(trained)
            down = sum(r["bytes_down"] for r in trained) / len(trained)
            clients = sum(r["clients"] for r in trained) / len(trained)
            acc = [r.get("eval_accuracy") for r in rows]
            results.append((name, up, down, clients, acc, wall))
            print(f"{name}: up {up:,.0f} B/round, down {down:,.0f} B/round, acc {acc[-1]:.4f}, {wall:.0f}s", flush=True)
    fp32 = next((r for r in results if r[0] == "fp32"), results[0])
    table = [
        "| codec (up) | bytes up / round | per client update | vs fp32 adapter | vs full model | bytes down / round | final accuracy | Δ vs fp32 (points) | accuracy per round |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, up, down, clients, acc, _wall in results:
        per_client = up / clients
        delta = (acc[-1] - fp32[4][-1]) * 100
        table.append(
            f"| {name} | {up:,.0f} | {per_client:,.0f} | **{fp32[1] / up:.2f}x** | {full / per_client:,.0f}x | {down:,.0f} | "
            f"{acc[-1]:.4f} | {delta:+.1f} | {' '.join(f'{a:.3f}' for a in acc)} |"
        )
    text = "\n".join(
        [
            f"`python benchmarks/codecs.py {' '.join(sys.argv[1:])}`".replace(" `", "`"),
            "",
            machine_note() + f" 1-min load average at the end {os.getloadavg()[0]:.1f}.",
            "",
            f"Task: `dpeft simulate {' '.join(base)}` (the default task otherwise: MiniLM + LoRA r=8 q/v + classifier, "
            "Rotten Tomatoes, Dirichlet(1.0) over 10 clients, 4 per round, 20 local steps). Every run has the same seed, "
            "so the same clients and batches; only the codec differs. Bytes are measured on the wire (metrics.jsonl); "
            f"'full model' = {full:,} bytes (every fp32 parameter of MiniLM with the adapter) per client.",
            "",
            *table,
            "",
            "EF = error feedback (each client's residual kept on the worker's disk and added to its next update). "
            "Uploads of a lossy codec travel packed (one flat tensor per dtype; names and shapes follow from the "
            "receiver's schema, checked by a layout digest), so the per-tensor header does not eat the savings. "
            "'int8 down' quantizes the global adapter sent to workers (a full state, not a delta).",
        ]
    )
    if not args.no_write:
        write_section("codecs", "Update codecs: bytes per round and accuracy", text)
    print(text)


if __name__ == "__main__":
    main()
