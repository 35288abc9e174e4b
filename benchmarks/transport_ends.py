"""The two ends of ``transport_throughput.py``: payloads, the bare-grpcio ceiling, and the
coordinator end run in a process of its own (``--mode process``).

In process mode the coordinator side of every path (the raw TCP receiver, the bare grpcio
server, dpeft's :class:`GrpcCoordinatorTransport`) lives in a child process started with
``spawn``, driven over a pipe by :func:`serve`; the worker side stays in the benchmark's own
process. That is how the transport runs for users (a coordinator and its workers are separate
processes), and neither end waits on the other's GIL. Times are taken on the worker side: a
download ends when the payload sits checked in the worker's buffer, an upload when the
coordinator has acknowledged it, which it does only after checking and decoding it. CPU time is
the sum of both processes'.
"""

from __future__ import annotations

import hashlib
import os
import resource
import socket
import threading
import time
import zlib
from collections import OrderedDict
from collections.abc import Callable, Iterator
from typing import Any

MiB = 1 << 20


def cpu_s() -> float:
    """CPU seconds (user + system) this process has used so far, all threads."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def peak_rss_mib() -> float:
    """This process's peak resident set so far (MiB; Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def tensor_payload(size: int) -> tuple[bytearray, Any]:
    """An encoded adapter payload of one float32 tensor of ``size`` bytes (dpeft's wire format;
    uint8 where ``size`` is not a multiple of 4) and its schema, built in place: the payload is the
    only copy this makes (peak RSS stays the transport's, not the payload generator's). Float
    values, as an adapter's are, so the coordinator's finiteness and norm checks run on them."""
    import torch

    from dpeft.codec.tensors import iter_encoded
    from dpeft.state import AdapterState

    dtype = torch.float32 if size % 4 == 0 else torch.uint8
    width = 4 if dtype == torch.float32 else 1
    state = AdapterState(OrderedDict([("w", torch.empty((size // width,), dtype=dtype))]), {})  # pages never touched
    head = bytes(next(iter_encoded(state)))
    payload = bytearray(len(head) + size)
    payload[: len(head)] = head
    n_block = min(size, 64 * MiB)
    if dtype == torch.float32:
        block = torch.randn(n_block // 4, generator=torch.Generator().manual_seed(0)).numpy().tobytes()
    else:
        block = os.urandom(n_block)
    for pos in range(0, size, len(block) or 1):
        n = min(len(block), size - pos)
        payload[len(head) + pos : len(head) + pos + n] = block[:n]
    return payload, state.schema()


def tcp_payload(size: int) -> memoryview:
    return memoryview(bytearray(os.urandom(1 << 20)) * (size >> 20)) if size >= MiB else memoryview(os.urandom(size))


def tcp_receiver(size: int, ack: bool) -> tuple[int, threading.Thread]:
    """A listening socket on loopback whose thread receives ``size`` bytes into a preallocated
    buffer (``recv_into``), then answers one byte when ``ack``. Returns (port, thread)."""
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    buf = bytearray(size)

    def receive() -> None:
        conn, _ = srv.accept()
        view = memoryview(buf)
        got = 0
        while got < size:
            n = conn.recv_into(view[got:], min(size - got, 4 * MiB))
            if n == 0:
                break
            got += n
        if ack:
            conn.sendall(b"k")
        conn.close()
        srv.close()

    th = threading.Thread(target=receive, daemon=True)
    th.start()
    return srv.getsockname()[1], th


class BareServer:
    """grpcio alone, as a ceiling: streams of ready-made ``chunk_bytes`` messages each way with
    identity (de)serializers, nothing done with them (no checksum, no copy into a buffer)."""

    def __init__(self, chunk_bytes: int, options: list[tuple[str, Any]]) -> None:
        from concurrent import futures

        import grpc

        frame = os.urandom(chunk_bytes)

        def down(request: bytes, context: object) -> Iterator[bytes]:
            for _ in range(int.from_bytes(request, "little")):
                yield frame

        def up(messages: Iterator[bytes], context: object) -> bytes:
            return sum(len(m) for m in messages).to_bytes(8, "little")

        same = lambda b: b  # noqa: E731
        handlers = {
            "Down": grpc.unary_stream_rpc_method_handler(down, request_deserializer=same, response_serializer=same),
            "Up": grpc.stream_unary_rpc_method_handler(up, request_deserializer=same, response_serializer=same),
        }
        self.server = grpc.server(futures.ThreadPoolExecutor(4), options=options)
        self.server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("bench.Bare", handlers),))
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()

    def close(self) -> None:
        self.server.stop(0)


class BareClient:
    def __init__(self, port: int, chunk_bytes: int, options: list[tuple[str, Any]]) -> None:
        import grpc

        same = lambda b: b  # noqa: E731
        self.chunk = chunk_bytes
        self.frame = os.urandom(chunk_bytes)
        self.channel = grpc.insecure_channel(f"127.0.0.1:{port}", options=options)
        self.down = self.channel.unary_stream("/bench.Bare/Down", request_serializer=same, response_deserializer=same)
        self.up = self.channel.stream_unary("/bench.Bare/Up", request_serializer=same, response_deserializer=same)

    def round(self, size: int, cpu: Callable[[], float] = lambda: 0.0) -> tuple[float, float, float, float]:
        """(download s, upload s, download CPU s, upload CPU s) of ``size`` bytes (whole messages);
        CPU is what ``cpu`` reads (both ends' CPU seconds)."""
        n = max(1, size // self.chunk)
        c0, t0 = cpu(), time.perf_counter()
        got = sum(len(m) for m in self.down(n.to_bytes(8, "little")))
        down, down_cpu = time.perf_counter() - t0, cpu() - c0
        c0, t0 = cpu(), time.perf_counter()
        self.up(self.frame for _ in range(n))
        up, up_cpu = time.perf_counter() - t0, cpu() - c0
        assert got == n * self.chunk
        return down, up, down_cpu, up_cpu

    def close(self) -> None:
        self.channel.close()


class CoordinatorEnd:
    """The coordinator side: dpeft's gRPC coordinator transport, a bare grpcio server and raw
    TCP receivers. Its methods are the commands :func:`serve` runs for the worker process."""

    def __init__(self, chunk_bytes: int, max_bytes: int, spool_bytes: int | None) -> None:
        from dpeft.codec.spool import SpoolPolicy
        from dpeft.codec.tensors import Limits, StateDecoder
        from dpeft.config import TransportConfig
        from dpeft.transport.grpc.channel import channel_options
        from dpeft.transport.grpc.server import GrpcCoordinatorTransport

        self.schemas: dict[str, Any] = {}
        self.spool = SpoolPolicy(spool_bytes) if spool_bytes is not None else None

        def decoder(task_id: str, client_id: int) -> StateDecoder:
            return StateDecoder(self.schemas[task_id], Limits(max_total_bytes=max_bytes), spool=self.spool)

        settings = TransportConfig(
            chunk_bytes=chunk_bytes,
            max_update_bytes=max_bytes,
            max_tensor_bytes=max_bytes,
            poll_timeout_s=0.2,
            dead_after_s=3600.0,
        )
        self.t = GrpcCoordinatorTransport(
            "127.0.0.1:0", settings, run_id="bench", config_yaml="{}", num_clients=1, decoder_factory=decoder
        )
        self.address = self.t.start()
        self.bare = BareServer(chunk_bytes, channel_options(chunk_bytes))
        self._tcp: threading.Thread | None = None

    def addresses(self) -> tuple[str, int]:
        return self.address, self.bare.port

    def cpu(self) -> float:
        return cpu_s()

    def peak_rss(self) -> float:
        return peak_rss_mib()

    def tcp_listen(self, size: int) -> int:
        port, self._tcp = tcp_receiver(size, ack=True)
        return port

    def tcp_join(self) -> None:
        assert self._tcp is not None
        self._tcp.join()

    def publish(self, size: int, tag: str) -> str:
        """Publish a payload of ``size`` tensor bytes and submit a task for it (as a round does); its task id."""
        from dpeft.codec.spool import SpooledBlob
        from dpeft.transport.base import TrainTask

        payload, schema = tensor_payload(size)
        digest = hashlib.sha256(payload).digest()  # computed once at publish, as the round engine does
        task = TrainTask(f"{tag}-task", 1, 0, f"{tag}-blob", len(payload), digest, blob_crc32=zlib.crc32(payload))
        self.schemas[task.task_id] = schema
        blob: Any = payload
        if self.spool is not None and self.spool.applies(len(payload)):  # as the engine publishes a large global
            blob = SpooledBlob.write([memoryview(payload)], self.spool)
        del payload
        self.t.publish_blob(task.blob_id, blob)
        self.t.submit([task], {})
        return task.task_id

    def drop(self, tag: str) -> None:
        self.t.payloads.drop([f"{tag}-blob"])

    def collect(self, size: int) -> None:
        """The accepted upload's event (checked), then let go of it."""
        from dpeft.transport.base import TaskResult

        ev = self.t.next_event(60)
        assert isinstance(ev, TaskResult), ev
        assert ev.delta["w"].numel() * ev.delta["w"].element_size() == size

    def close(self) -> None:
        self.t.shutdown("done", grace_s=0.5)
        self.bare.close()


def serve(pipe: Any, chunk_bytes: int, max_bytes: int, spool_bytes: int | None) -> None:
    """Child process: run :class:`CoordinatorEnd` commands received as (name, *args) until "close"."""
    end = CoordinatorEnd(chunk_bytes, max_bytes, spool_bytes)
    pipe.send(end.addresses())
    while True:
        name, *args = pipe.recv()
        try:
            out = getattr(end, name)(*args)
        except Exception as exc:  # sent back, raised in the worker process
            out = RuntimeError(f"coordinator end: {name}: {exc!r}")
        pipe.send(out)
        if name == "close":
            return


class RemoteEnd:
    """The worker process's handle on the coordinator end (:func:`serve` in a spawned process)."""

    def __init__(self, chunk_bytes: int, max_bytes: int, spool_bytes: int | None) -> None:
        import multiprocessing as mp

        ctx = mp.get_context("spawn")
        self.pipe, child = ctx.Pipe()
        self.proc = ctx.Process(target=serve, args=(child, chunk_bytes, max_bytes, spool_bytes), daemon=True)
        self.proc.start()
        self.address, self.bare_port = self.pipe.recv()

    def __call__(self, name: str, *args: Any) -> Any:
        self.pipe.send((name, *args))
        out = self.pipe.recv()
        if isinstance(out, Exception):
            raise out
        return out

    def close(self) -> None:
        try:
            self("close")
        finally:
            self.proc.join(10)


def raw_tcp_remote(end: RemoteEnd, size: int) -> tuple[float, float]:
    """(seconds, CPU seconds of both processes) to move ``size`` bytes over loopback TCP to the
    coordinator process, until its one-byte answer says they all arrived."""
    payload = tcp_payload(size)
    port = end("tcp_listen", size)
    cli = socket.create_connection(("127.0.0.1", port))
    other0 = end("cpu")
    c0, t0 = cpu_s(), time.perf_counter()
    cli.sendall(payload)
    cli.recv(1)
    dt, dc = time.perf_counter() - t0, cpu_s() - c0
    cli.close()
    end("tcp_join")
    return dt, dc + end("cpu") - other0
