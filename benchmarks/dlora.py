"""DLoRA split mode: edge cost and accuracy of edge-only, cloud-only, DLoRA (no KR) and DLoRA + KR.

Every method trains the same LoRA adapter (r=8 on the default targets, classifier head) for
the same number of steps on the same batches (Rotten Tomatoes, one edge's shard) and is
evaluated on the same held-out examples. The base runs in eval mode (no dropout) in every
method, which is what split mode does, so edge-only / cloud-only / DLoRA no-KR compute the
same training up to float summation order.

- edge-only: the whole peft model on the device. Edge FLOPs: torch.utils.flop_counter over
  a forward + backward step (every 5th step counted, mean reported); bytes 0.
- cloud-only: the device uploads its batch (token ids, attention mask and labels in dpeft's
  tensor format) and the cloud trains; edge FLOPs 0. Its accuracy is the edge-only run's
  (same training, different machine).
- DLoRA: cloud and edge in this process over a real loopback gRPC stream (fp32 wire). Edge
  FLOPs are counted analytically per step (checked against torch's flop counter in the
  tests): per active LoRA module with N = batch x tokens, rank r, input d_in, output d_out,
  forward 2 N r (d_in + d_out), backward 2 N r (2 d_out + d_in) + 2 N r d_in (input
  gradient, not needed at the first layer); head 6 B H C; embedding lookup 0; optimizer not
  counted. Bytes: every protobuf message on the stream, both directions (serialized size).
  Edge CPU s/step: CPU seconds of the edge's own computation (one torch thread, measured with
  time.thread_time, so it is robust to other load on the machine); step wall s: the whole
  step as the edge sees it (cloud compute, serialization and loopback gRPC included; cloud
  and edge share this machine's cores, so it is sensitive to other load).
- DLoRA + KR: Kill-and-Revive at several active budgets (window 10, warmup 10, revive every
  50 steps).

    python benchmarks/dlora.py [--quick] [--steps N] [--smollm2-layers L]
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import torch  # noqa: E402
from results import machine_note, write_section  # noqa: E402


def _evaluate(model, data, batch_size=64) -> float:
    from dpeft.train.loop import evaluate

    return evaluate(model, data, "seq_cls", batch_size)["eval_accuracy"]


def _fmt_flops(f: float) -> str:
    return f"{f / 1e9:.2f} G" if f >= 1e8 else f"{f / 1e6:.1f} M"


def _fmt_bytes(b: float) -> str:
    return f"{b / 2**20:.2f} MiB" if b >= 2**20 else f"{b / 1024:.1f} KiB"


def edge_only(model, data, schedule, train_cfg) -> dict:
    from torch.utils.flop_counter import FlopCounterMode

    from dpeft.adapters import adapter_parameters
    from dpeft.train.loop import make_optimizer

    model = copy.deepcopy(model)
    model.eval()
    params = adapter_parameters(model)
    opt = make_optimizer(params.values(), train_cfg)
    flops, walls, cpus = [], [], []
    for i, idx in enumerate(schedule):
        b = data.batch(idx)
        counter = FlopCounterMode(display=False) if i % 5 == 0 else None
        t0 = time.perf_counter()
        c0 = time.thread_time()
        if counter is not None:
            counter.__enter__()
        opt.zero_grad(set_to_none=True)
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        loss = torch.nn.functional.cross_entropy(logits, b["labels"])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(params.values()), train_cfg.max_grad_norm)
        opt.step()
        if counter is not None:
            counter.__exit__(None, None, None)
            flops.append(counter.get_total_flops())
        else:
            walls.append(time.perf_counter() - t0)
            cpus.append(time.thread_time() - c0)
    return {"model": model, "flops": sum(flops) / len(flops), "bytes": 0.0, "compute_s": sum(cpus) / max(len(cpus), 1), "wall_s": sum(walls) / max(len(walls), 1)}


def cloud_only_bytes(data, schedule) -> float:
    from dpeft.codec.tensors import encoded_size
    from dpeft.state import AdapterState

    total = 0
    for idx in schedule:
        b = data.batch(idx)
        total += encoded_size(AdapterState({"input_ids": b["input_ids"], "attention_mask": b["attention_mask"], "labels": b["labels"]}))
    return total / len(schedule)


def dlora(model, data, schedule, run, split) -> dict:
    from dpeft.adapters import load_state
    from dpeft.split.local import loopback

    stats = []
    with loopback(model, run, split) as (edge, channel, welcome, _service):
        welcome.tensors({})

        def on_frozen(killed, revived):
            edge.sync_frozen(channel, killed, revived)

        up0, down0 = channel.bytes_sent, channel.bytes_received
        for idx in schedule:
            b = data.batch(idx)
            st, _ = edge.step(channel, b["input_ids"], b["attention_mask"], b["labels"], True, on_frozen=on_frozen)
            stats.append(st)
        total_bytes = channel.bytes_sent - up0 + channel.bytes_received - down0  # includes frozen-factor uploads
        state = edge.state()
        n_sites = len(edge.sites)
    trained = copy.deepcopy(model)
    load_state(trained, state)
    trained.eval()
    n = len(stats)
    return {
        "model": trained,
        "flops": sum(s.flops for s in stats) / n,
        "bytes": total_bytes / n,
        "compute_s": sum(s.compute_s for s in stats[1:]) / max(n - 1, 1),
        "wall_s": sum(s.wall_s for s in stats[1:]) / max(n - 1, 1),
        "active": f"{sum(s.active_modules for s in stats) / len(stats):.1f} / {n_sites}",
    }


def bench_model(name: str, model_cfg, steps: int, batch_size: int, budgets: list[float], layers: int | None, train_examples: int, test_examples: int, lr: float) -> tuple[list[dict], str]:
    from dpeft.adapters import build_model
    from dpeft.config import AdapterConfig, DataConfig, RunConfig, TrainConfig
    from dpeft.data import load_dataset, tokenize
    from dpeft.split.config import KillReviveConfig, SplitConfig
    from dpeft.split.spec import slice_layers
    from dpeft.train.loop import batch_schedule

    bundle = build_model(model_cfg, AdapterConfig(), 2, 0)
    if layers:
        slice_layers(bundle.model, layers)
    train, test = load_dataset(DataConfig(max_train_examples=train_examples, test_examples=test_examples), 0)
    data = tokenize(bundle.tokenizer, train.texts, train.labels, model_cfg.max_length)
    test_data = tokenize(bundle.tokenizer, test.texts, test.labels, model_cfg.max_length)
    schedule = batch_schedule(list(range(len(train))), steps, batch_size, 1234)
    train_cfg = TrainConfig(loss="cross_entropy", lr=lr, batch_size=batch_size)
    run = RunConfig(model=model_cfg, train=train_cfg)
    acc0 = _evaluate(bundle.model, test_data)
    rows = []
    t0 = time.time()
    eo = edge_only(bundle.model, data, schedule, train_cfg)
    eo_acc = _evaluate(eo.pop("model"), test_data)
    rows.append({"method": "edge-only (whole model on device)", **eo, "acc": eo_acc, "active": "-"})
    rows.append({"method": "cloud-only (data sent to cloud)", "flops": 0.0, "bytes": cloud_only_bytes(data, schedule), "compute_s": None, "wall_s": None, "acc": eo_acc, "active": "-"})
    variants = [("DLoRA, no KR", KillReviveConfig(enabled=False))] + [
        (f"DLoRA + KR, budget {b:g}", KillReviveConfig(enabled=True, budget=b, window=10, warmup=10, revive_every=50)) for b in budgets
    ]
    for label, kr in variants:
        split = SplitConfig(federated=False, kr=kr)
        res = dlora(bundle.model, data, schedule, run, split)
        acc = _evaluate(res.pop("model"), test_data)
        rows.append({"method": label, **res, "acc": acc})
        print(f"  {name}: {label}: acc {acc:.3f} ({time.time() - t0:.0f} s)", file=sys.stderr, flush=True)
    base = next(r for r in rows if r["method"] == "DLoRA, no KR")
    lines = [
        f"**{name}**: {steps} steps x batch {batch_size}, lr {lr:g}, AdamW, max_length {model_cfg.max_length}; accuracy on {len(test)} held-out examples (before training: {acc0:.3f}).",
        "",
        "| method | active LoRA modules (mean/step) | edge FLOPs/step | vs no-KR | bytes/step (up+down) | vs no-KR | edge CPU s/step | step wall s | accuracy | vs no-KR |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        dflops = f"{100 * (r['flops'] / base['flops'] - 1):+.0f}%" if base["flops"] else "-"
        dbytes = f"{100 * (r['bytes'] / base['bytes'] - 1):+.1f}%" if base["bytes"] else "-"
        comp = "-" if r["compute_s"] is None else f"{r['compute_s']:.3f}"
        wall = "-" if r["wall_s"] is None else f"{r['wall_s']:.3f}"
        lines.append(
            f"| {r['method']} | {r['active']} | {_fmt_flops(r['flops'])} | {dflops} | {_fmt_bytes(r['bytes'])} | {dbytes} | {comp} | {wall} | {r['acc']:.3f} | {r['acc'] - base['acc']:+.3f} |"
        )
    return rows, "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a few steps, for a smoke run (does not write RESULTS.md)")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--smollm2-steps", type=int, default=40)
    ap.add_argument("--smollm2-layers", type=int, default=4, help="keep the first L decoder layers of SmolLM2 (0 = all 30)")
    ap.add_argument("--skip-smollm2", action="store_true")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: edge CPU time is the edge thread's CPU time)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from dpeft.config import ModelConfig

    steps = 12 if args.quick else args.steps
    sm_steps = 6 if args.quick else args.smollm2_steps
    sections = []
    t0 = time.time()
    _, table = bench_model("all-MiniLM-L6-v2 (6 layers, 12 LoRA modules: query/value), Rotten Tomatoes", ModelConfig(max_length=48), steps, 16, [0.5, 0.25, 0.125], None, 2000, 300, 2e-3)
    sections.append(table)
    print(table, flush=True)
    if not args.skip_smollm2:
        layers = args.smollm2_layers or None
        title = f"SmolLM2-135M-Instruct, first {layers} of 30 decoder layers ({2 * layers} LoRA modules: q_proj/v_proj), Rotten Tomatoes" if layers else "SmolLM2-135M-Instruct (30 layers, 60 LoRA modules), Rotten Tomatoes"
        _, table = bench_model(title, ModelConfig(name="smollm2", max_length=40), sm_steps, 8, [0.5, 0.25], layers, 1000, 200, 1e-3)
        sections.append(table)
        print(table, flush=True)
    elapsed = time.time() - t0
    if args.quick:
        return 0
    body = "\n\n".join(
        [
            "Written by `python benchmarks/dlora.py`. " + machine_note() + f" Total {elapsed / 60:.1f} min; load average at the end {os.getloadavg()[0]:.1f} "
            "(other jobs share this machine: wall times are noisy; FLOPs, bytes, edge CPU seconds and accuracies are not).",
            "Cloud and edge run in one process over a real loopback gRPC stream (fp32 on the wire); 'vs no-KR' compares with DLoRA without Kill-and-Revive at equal steps. "
            "KR: window 10 steps, warmup 10, revive every 50; killed modules' frozen factors are applied by the cloud (their one-off upload is included in bytes/step). "
            "Edge FLOPs: analytic per-step count for DLoRA (formula in the script's docstring), torch.utils.flop_counter for edge-only. "
            "cloud-only uploads the batch (ids, mask, labels) and trains exactly what edge-only trains, so it shares its accuracy.",
            *sections,
        ]
    )
    write_section("dlora", "DLoRA split mode: edge cost vs accuracy", body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
