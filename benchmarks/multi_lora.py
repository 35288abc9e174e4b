"""Multi-LoRA lockstep batching vs training the same clients one after another.

K clients of one worker process (K = 2, 4, 8) each run S local steps (batch 16) on the
default task (MiniLM + LoRA r=8 on query/value + classifier head, Rotten Tomatoes, max_length
64). Sequential: swap each client's adapter into the shared model and run
``dpeft.train.loop.local_train`` (what a worker does today). Lockstep:
``dpeft.train.multi_lora.lockstep_train``, one forward/backward of the base per step for all K
clients. Both with dropout off (lockstep needs it; sequential gets the same so the work is
identical) and the same batches; the largest weight difference between the two is reported.

    python benchmarks/multi_lora.py [--threads 1] [--steps 10] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections import OrderedDict
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from results import machine_note, write_section  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (a simulate worker uses 1)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--clients", default="2,4,8")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()

    import torch

    from dpeft.adapters import adapter_parameters, build_model, extract_state, load_state
    from dpeft.config import AdapterConfig, DataConfig, ModelConfig, TrainConfig
    from dpeft.data import load_dataset, partition, tokenize
    from dpeft.state import AdapterState
    from dpeft.train.loop import local_train, task_seed
    from dpeft.train.multi_lora import ClientJob, disable_dropout, lockstep_train

    torch.set_num_threads(args.threads)
    load_start = os.getloadavg()[0]
    ks = [int(k) for k in args.clients.split(",")]
    train, _ = load_dataset(DataConfig(max_train_examples=4000, test_examples=64), seed=0)
    bundle = build_model(ModelConfig(), AdapterConfig(), 2, 0)
    model = bundle.model
    disable_dropout(model)
    data = tokenize(bundle.tokenizer, train.texts, train.labels, 64)
    parts = partition(train.labels, max(ks), "iid", 0)
    cfg = TrainConfig(local_steps=args.steps, batch_size=args.batch_size)
    g = torch.Generator().manual_seed(0)
    start = AdapterState(OrderedDict((k, v + 0.01 * torch.randn(v.shape, generator=g)) for k, v in extract_state(model).items()))

    def jobs_for(k: int) -> list[ClientJob]:
        return [ClientJob(c, start, parts[c], task_seed(0, 1, c)) for c in range(k)]

    def sequential(jobs: list[ClientJob]) -> list[AdapterState]:
        out = []
        for job in jobs:
            load_state(model, job.start)
            params = list(adapter_parameters(model).values())
            local_train(model, params, data, job.indices, cfg, "seq_cls", job.seed, num_labels=2)
            out.append(extract_state(model))
        return out

    def lockstep(jobs: list[ClientJob]) -> list[AdapterState]:
        return [o.state for o in lockstep_train(model, data, jobs, cfg, num_labels=2)]

    sequential(jobs_for(2))  # warm-up
    lockstep(jobs_for(2))
    rows = []
    for k in ks:
        jobs = jobs_for(k)
        t_seq, t_lock = [], []
        diff = 0.0
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            a = sequential(jobs)
            t_seq.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            b = lockstep(jobs)
            t_lock.append(time.perf_counter() - t0)
            diff = max(diff, max(float((x[n] - y[n]).abs().max()) for x, y in zip(a, b, strict=True) for n in x.tensors))
        s, lk = statistics.median(t_seq), statistics.median(t_lock)
        rows.append((k, s, lk, diff))
        print(f"K={k}: sequential {s:.2f}s lockstep {lk:.2f}s speedup {s / lk:.2f}x maxdiff {diff:.1e}", flush=True)

    load = os.getloadavg()[0]
    table = [
        "| clients per process | sequential | lockstep | speedup | steps/s sequential | steps/s lockstep | max weight difference |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for k, s, lk, diff in rows:
        n = k * args.steps
        table.append(f"| {k} | {s:.2f} s | {lk:.2f} s | **{s / lk:.2f}x** | {n / s:.1f} | {n / lk:.1f} | {diff:.1e} |")
    text = "\n".join(
        [
            f"`python benchmarks/multi_lora.py --threads {args.threads} --steps {args.steps} --repeats {args.repeats}`",
            "",
            machine_note()
            + f" torch threads {args.threads}; 1-min load average {load_start:.1f} at the start, {load:.1f} at the end"
            + (
                f" (high: other work shared the {os.cpu_count()} cores, so absolute times are inflated; both sides of each ratio ran interleaved in this process)."
                if max(load_start, load) > (os.cpu_count() or 1)
                else "."
            ),
            "",
            *table,
            "",
            f"Each client: {args.steps} local steps of batch {args.batch_size} (AdamW, clip 1.0, prior-calibrated loss), "
            "MiniLM + LoRA r=8 q/v + classifier, max_length 64, dropout off on both sides. Times are medians of "
            f"{args.repeats} repeats in the same process. The max weight difference is fp32 rounding amplified by "
            "Adam's 1/eps sensitivity for near-zero gradients (with SGD the two agree to ~1e-9; see tests/train/test_multi_lora.py).",
        ]
    )
    if not args.no_write:
        write_section("multi_lora", "Multi-LoRA lockstep batching vs sequential clients", text)
    print(text)


if __name__ == "__main__":
    main()
