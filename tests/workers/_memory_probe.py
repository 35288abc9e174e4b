"""Helper for test_worker_memory.py (run as a subprocess): RSS of one worker process vs. clients.

Prints one JSON line: {"rss_after_warmup": .., "rss_after_5": .., "rss_after_50": .., "clients": ..}.
With ``allocator KIB`` (KIB: a number or null) instead: how many bytes of 3 MiB blocks allocated
after a task are served by their own mmap (glibc's mallinfo2), once glibc's dynamic threshold was
pushed to 32 MiB before the task: {"mmapped_delta": bytes, ...}.
"""

from __future__ import annotations

import ctypes
import gc
import hashlib
import json
import sys

import psutil
import torch

from dpeft.adapters import extract_state
from dpeft.codec import encode_state
from dpeft.transport.base import TrainTask
from dpeft.validate import load_config
from dpeft_workers.runtime import WorkerRuntime, set_threads


def rss() -> int:
    gc.collect()
    return psutil.Process().memory_info().rss


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (n, ctypes.c_size_t)
        for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")
    ]


def info() -> _MallInfo2:
    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = _MallInfo2
    return libc.mallinfo2()


def allocator(threshold_kib: str) -> int:
    set_threads(1)
    cfg = load_config(
        None,
        [
            "clients=4",
            "data.max_train_examples=64",
            "data.test_examples=8",
            "train.local_steps=1",
            "train.batch_size=4",
            "model.max_length=32",
            f"train.worker_mmap_threshold_kib={threshold_kib}",
            "run_dir=/nonexistent-not-written",
        ],
    )
    runtime = WorkerRuntime(cfg)
    payload = encode_state(extract_state(runtime.model, {"round": 0}))
    big = torch.ones(32 << 20, dtype=torch.uint8)
    del big  # an mmapped block freed: glibc's dynamic threshold rises to 32 MiB
    task = TrainTask("r1-c0", 1, 0, "blob", len(payload), hashlib.sha256(payload).digest(), {})
    runtime.train_task(task, payload)
    # 3 MiB blocks adding up to 12 MiB more than all the heap's free space: once that free space is
    # used, a fixed threshold serves the rest by mmap; glibc's grown threshold extends the heap
    free = info().fordblks
    before = info().hblkhd
    blocks = [torch.ones(3 << 20, dtype=torch.uint8) for _ in range((free + (12 << 20)) // (3 << 20) + 1)]
    print(json.dumps({"mmapped_delta": info().hblkhd - before, "heap_free": free, "blocks": len(blocks)}))
    return 0


def main() -> int:
    if len(sys.argv) > 2 and sys.argv[1] == "allocator":
        return allocator(sys.argv[2])
    clients = int(sys.argv[1]) if len(sys.argv) > 1 else 50
    set_threads(1)
    cfg = load_config(
        None,
        [
            f"clients={clients}",
            "clients_per_round=1",
            "data.partition=iid",
            "data.max_train_examples=800",
            "data.test_examples=32",
            "train.local_steps=1",
            "train.batch_size=4",
            "model.max_length=32",
            "run_dir=/nonexistent-not-written",
        ],
    )
    runtime = WorkerRuntime(cfg)
    # the seeded initial adapter, as the coordinator would encode it
    payload = encode_state(extract_state(runtime.model, {"round": 0}))
    sha = hashlib.sha256(payload).digest()

    def run(client: int, round_num: int = 1) -> None:
        task = TrainTask(f"r{round_num}-c{client}", round_num, client, "blob", len(payload), sha, {})
        update, n, metrics = runtime.train_task(task, payload)
        assert n == len(runtime.client_indices(client)) and update and metrics["train_loss"] > 0

    # warm-up: first tasks allocate optimizer/autograd buffers and allocator pools
    run(0, round_num=99)
    run(1, round_num=99)
    warm = rss()
    for c in range(5):
        run(c)
    after_5 = rss()
    for c in range(5, clients):
        run(c)
    after_all = rss()
    print(
        json.dumps(
            {
                "rss_after_warmup": warm,
                "rss_after_5": after_5,
                "rss_after_50": after_all,
                "clients": clients,
                "torch_threads": torch.get_num_threads(),
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
