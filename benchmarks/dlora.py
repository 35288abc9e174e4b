"""DLoRA split mode: edge cost and accuracy of DLoRA without and with Kill-and-Revive, trained to a plateau.

Every method trains the same LoRA adapter (r=8 on the default targets, classifier head) on the
same batch sequence (Rotten Tomatoes) and is evaluated on the same held-out examples. The base
runs in eval mode (no dropout), which is what split mode does, so edge-only, cloud-only and
DLoRA without KR compute the same training up to float summation order; edge-only and
cloud-only rows give per-step costs only.

- Plateau: each DLoRA configuration trains until ``--patience`` evaluations in a row (one every
  ``--eval-every`` steps) did not beat its best held-out accuracy, or until the step cap. Its
  *plateau* is the first evaluation with the best accuracy; costs "to plateau" are the edge's
  totals up to that step. "To reach no-KR" is the cost up to the first evaluation at or above
  no-KR's plateau accuracy (and "within 1 pt": at or above it minus 0.01); the comparison is
  with no-KR's cost to its plateau.
- Edge FLOPs: counted analytically per step for DLoRA (checked against torch's flop counter in
  the tests): per active LoRA module with N = batch x tokens, rank r, input d_in, output d_out,
  forward 2 N r (d_in + d_out), backward 2 N r (2 d_out + d_in) + 2 N r d_in (input gradient,
  only when an active module lies below); head 6 B H C; embedding lookup 0; optimizer not
  counted. edge-only: torch.utils.flop_counter over forward + backward.
- Bytes: every protobuf message on the stream, both directions (serialized size), frozen-factor
  uploads included. cloud-only uploads the batch (ids, mask, labels) in dpeft's tensor format.

    python benchmarks/dlora.py [--quick] [--skip-minilm] [--skip-smollm2] [--kr NAME:key=value,...]
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
from dlora_plateau import Curve, evaluate, train_to_plateau  # noqa: E402
from results import machine_note, write_section  # noqa: E402

#: the original rule (budget 0.125 was its cheapest measured setting) and the low-budget rule (short warmup, one module revived at a time)
PAPER_RULE = {
    "enabled": True,
    "budget": 0.125,
    "window": 10,
    "warmup": 10,
    "revive_every": 50,
    "revive_count": 0,
    "score": "change",
    "ema": 0.0,
}
NEW_RULE = {
    "enabled": True,
    "budget": 0.05,
    "window": 5,
    "warmup": 5,
    "revive_every": 50,
    "revive_count": 1,
    "score": "change",
    "ema": 0.0,
}


def _fmt_flops(f: float) -> str:
    if f >= 1e12:
        return f"{f / 1e12:.2f} T"
    return f"{f / 1e9:.2f} G" if f >= 1e8 else f"{f / 1e6:.1f} M"


def _fmt_bytes(b: float) -> str:
    if b >= 2**30:
        return f"{b / 2**30:.2f} GiB"
    return f"{b / 2**20:.1f} MiB" if b >= 2**20 else f"{b / 1024:.1f} KiB"


def _pct(x: float, base: float) -> str:
    return f"{100 * (x / base - 1):+.1f}%" if base else "-"


def edge_only_flops(model, data, schedule, train_cfg) -> float:
    """torch's flop count of forward + backward of the whole peft model, mean over the given batches."""
    from torch.utils.flop_counter import FlopCounterMode

    from dpeft.adapters import adapter_parameters

    model = copy.deepcopy(model)
    model.eval()
    params = adapter_parameters(model)
    flops = []
    for idx in schedule:
        b = data.batch(idx)
        with FlopCounterMode(display=False) as counter:
            logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
            torch.nn.functional.cross_entropy(logits, b["labels"]).backward()
        flops.append(counter.get_total_flops())
        for p in params.values():
            p.grad = None
    return sum(flops) / len(flops)


def cloud_only_bytes(data, schedule) -> float:
    from dpeft.codec.tensors import encoded_size
    from dpeft.state import AdapterState

    total = 0
    for idx in schedule:
        b = data.batch(idx)
        total += encoded_size(
            AdapterState({"input_ids": b["input_ids"], "attention_mask": b["attention_mask"], "labels": b["labels"]})
        )
    return total / len(schedule)


def parse_variant(spec: str) -> tuple[str, dict]:
    """'NAME:key=value,key=value' -> (NAME, KillReviveConfig kwargs)."""
    name, _, rest = spec.partition(":")
    kw: dict = {"enabled": True}
    for item in filter(None, rest.split(",")):
        key, _, value = item.partition("=")
        kw[key] = (
            value
            if key in ("score", "revive_order")
            else (value.lower() == "true" if key == "enabled" else float(value) if "." in value else int(value))
        )
    return name, kw


def bench_model(
    name: str,
    model_cfg,
    batch_size: int,
    layers: int | None,
    train_examples: int,
    test_examples: int,
    lr: float,
    plateau: tuple[int, int, int],
    variants: list[tuple[str, dict]],
    no_baseline: bool = False,
) -> str:
    from dpeft.adapters import build_model
    from dpeft.config import AdapterConfig, DataConfig, RunConfig, TrainConfig
    from dpeft.data import load_dataset, tokenize
    from dpeft.split.config import KillReviveConfig, SplitConfig
    from dpeft.split.spec import slice_layers
    from dpeft.train.loop import batch_schedule

    eval_every, patience, cap = plateau
    adapter = AdapterConfig()  # query/value on MiniLM, q_proj/v_proj on SmolLM2
    bundle = build_model(model_cfg, adapter, 2, 0)
    if layers:
        slice_layers(bundle.model, layers)
    train, test = load_dataset(DataConfig(max_train_examples=train_examples, test_examples=test_examples), 0)
    data = tokenize(bundle.tokenizer, train.texts, train.labels, model_cfg.max_length)
    test_data = tokenize(bundle.tokenizer, test.texts, test.labels, model_cfg.max_length)
    schedule = batch_schedule(list(range(len(train))), cap, batch_size, 1234)
    train_cfg = TrainConfig(loss="cross_entropy", lr=lr, batch_size=batch_size)
    run = RunConfig(model=model_cfg, adapter=adapter, train=train_cfg)
    acc0 = evaluate(bundle.model, test_data)
    t0 = time.time()
    eo_flops = edge_only_flops(bundle.model, data, schedule[:2], train_cfg)
    co_bytes = cloud_only_bytes(data, schedule)
    curves: list[tuple[str, dict, Curve]] = []

    def _render() -> str:
        base = curves[0][2].best
        m = curves[0][2].modules
        lines = [
            f"**{name}** ({m} LoRA modules): batch {batch_size}, lr {lr:g}, AdamW, max_length {model_cfg.max_length}; {len(train)} training examples; "
            f"accuracy on {len(test)} held-out examples (before training: {acc0:.3f}), evaluated every {eval_every} steps, patience {patience}, cap {cap} steps.",
            "",
            "| method | plateau step (stopped) | plateau accuracy | vs no-KR | active modules (mean/step) | edge FLOPs to plateau | vs no-KR | bytes to plateau | vs no-KR | to reach no-KR's accuracy: step, FLOPs, bytes (vs no-KR) | within 1 pt: step, FLOPs, bytes (vs no-KR) |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for label, _kw, c in curves:
            p = c.best
            cells = []
            for target in (base.acc, base.acc - 0.01):
                r = c.first_reaching(target)
                cells.append(
                    "not reached" if r is None else f"{r.step}, {_pct(r.flops, base.flops)}, {_pct(r.bytes, base.bytes)}"
                )
            lines.append(
                f"| {label} | {p.step} ({c.stop_step}) | {p.acc:.3f} | {100 * (p.acc - base.acc):+.1f} pt | {p.active:.2f} / {c.modules} | {_fmt_flops(p.flops)} | {_pct(p.flops, base.flops)} "
                f"| {_fmt_bytes(p.bytes)} | {_pct(p.bytes, base.bytes)} | {cells[0]} | {cells[1]} |"
            )
        nk = curves[0][2]
        lines += [
            "",
            "Per step (over each whole run):",
            "",
            "| method | edge FLOPs/step | bytes/step (up+down) | edge CPU s/step | wall s (whole run, evaluations included) |",
            "| --- | --- | --- | --- | --- |",
            f"| edge-only (whole model on device) | {_fmt_flops(eo_flops)} | 0 | - | - |",
            f"| cloud-only (batch sent to cloud) | 0 | {_fmt_bytes(co_bytes)} | - | - |",
        ]
        for label, _kw, c in curves:
            last = c.last
            lines.append(
                f"| {label} | {_fmt_flops(last.flops / last.step)} | {_fmt_bytes(last.bytes / last.step)} | {c.compute_s:.4f} | {c.wall_s:.0f} |"
            )
        lines += ["", "Settings and final active set:", ""]
        for label, kw, c in curves[1:]:
            kills = sum(len(k) for _s, k, _r in c.history)
            revives = sum(len(r) for _s, _k, r in c.history)
            settings = ", ".join(f"{k}={v}" for k, v in kw.items() if k != "enabled") or "defaults"
            lines.append(
                f"- {label}: {settings}; {kills} kills, {revives} revives; no-KR reached {nk.best.acc:.3f} at step {nk.best.step}."
            )
        return "\n".join(lines)

    for label, kw in ([] if no_baseline else [("DLoRA, no KR", {"enabled": False})]) + variants:
        curve = train_to_plateau(
            bundle.model,
            data,
            test_data,
            schedule,
            run,
            SplitConfig(federated=False, kr=KillReviveConfig(**kw)),
            eval_every,
            patience,
            label,
        )
        curves.append((label, kw, curve))
        print(
            f"  {name}: {label}: plateau {curve.best.acc:.4f} at step {curve.best.step}, stopped {curve.stop_step} ({time.time() - t0:.0f} s)",
            file=sys.stderr,
            flush=True,
        )
        print(f"<!-- partial after {label} -->\n" + _render(), flush=True)
    return _render()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a few steps, for a smoke run (does not write RESULTS.md)")
    ap.add_argument("--skip-minilm", action="store_true")
    ap.add_argument("--skip-smollm2", action="store_true")
    ap.add_argument("--smollm2-layers", type=int, default=0, help="keep the first L decoder layers of SmolLM2 (0 = all 30)")
    ap.add_argument("--smollm2-cap", type=int, default=120, help="step cap of the SmolLM2 runs")
    ap.add_argument("--minilm-plateau", default="25,2,500", help="MiniLM: evaluate every, patience, step cap")
    ap.add_argument("--no-baseline", action="store_true", help="skip DLoRA without KR (its numbers come from another invocation)")
    ap.add_argument("--smollm2-all", action="store_true", help="also run the rule before on SmolLM2 (slow)")
    ap.add_argument("--kr", action="append", default=[], help="extra KR variant NAME:key=value,... (MiniLM and SmolLM2)")
    ap.add_argument("--only-kr", action="store_true", help="run only the --kr variants (not the two standard rules)")
    ap.add_argument("--no-write", action="store_true", help="print only")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: edge CPU time is the edge thread's CPU time)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from dpeft.config import ModelConfig

    variants = [
        ("DLoRA + KR, low budget (0.05), partial revive", NEW_RULE),
        ("DLoRA + KR, original rule, budget 0.125", PAPER_RULE),
    ]
    if args.only_kr:
        variants = []
    variants += [parse_variant(s) for s in args.kr]
    sections = []
    t0 = time.time()
    if not args.skip_minilm:
        plateau = (4, 2, 12) if args.quick else tuple(int(x) for x in args.minilm_plateau.split(","))
        table = bench_model(
            "all-MiniLM-L6-v2 (6 layers, query/value), Rotten Tomatoes",
            ModelConfig(max_length=48),
            16,
            None,
            4000,
            400 if not args.quick else 50,
            2e-3,
            plateau,
            variants,
            args.no_baseline,
        )
        sections.append(table)
        print(table, flush=True)
    if not args.skip_smollm2:
        layers = args.smollm2_layers or None
        title = (
            f"SmolLM2-135M-Instruct, first {layers} of 30 decoder layers (q_proj/v_proj), Rotten Tomatoes"
            if layers
            else "SmolLM2-135M-Instruct, all 30 decoder layers (q_proj/v_proj), Rotten Tomatoes"
        )
        plateau = (3, 2, 6) if args.quick else (15, 2, args.smollm2_cap)
        sm_variants = variants if args.quick or args.smollm2_all or args.only_kr else variants[:1] + variants[2:]
        table = bench_model(
            title,
            ModelConfig(name="smollm2", max_length=32),
            8,
            layers,
            2000,
            100 if not args.quick else 20,
            1e-3,
            plateau,
            sm_variants,
            args.no_baseline,
        )
        sections.append(table)
        print(table, flush=True)
    elapsed = time.time() - t0
    if args.quick or args.no_write:
        return 0
    body = "\n\n".join(
        [
            "Written by `python benchmarks/dlora.py`. "
            + machine_note()
            + f" Total {elapsed / 60:.1f} min; load average at the end {os.getloadavg()[0]:.1f} "
            "(other jobs share this machine: wall times are noisy; FLOPs, bytes and accuracies are not).",
            "Cloud and edge run in one process over a real loopback gRPC stream (fp32 on the wire); every configuration is trained to a plateau of held-out accuracy "
            "(see the script's docstring) on the same batch sequence; 'vs no-KR' compares with DLoRA without Kill-and-Revive trained to its own plateau. "
            "Killed modules' frozen factors are applied by the cloud (their one-off uploads are included in the bytes).",
            *sections,
        ]
    )
    write_section("dlora", "DLoRA split mode: edge cost vs accuracy", body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
