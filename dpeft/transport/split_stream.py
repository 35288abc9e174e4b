"""gRPC plumbing of split mode: one bidirectional ``Session`` stream per edge.

The cloud runs a session handler in its own thread per stream (it must send in the middle
of a forward pass and wait for the edge's answer); the gRPC handler only relays the
handler's outbound messages. The edge dials out (NAT friendly) and reads the responses in
its own thread of control.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from concurrent import futures
from typing import Any

import grpc

from dpeft._proto.dpeft.v1 import split_pb2_grpc as pb_grpc
from dpeft.config.schema import MAX_CHUNK_BYTES
from dpeft.split.wire import Channel
from dpeft.transport.grpc import channel_options

log = logging.getLogger("dpeft.transport.split_stream")

Tap = Callable[[str, Any], None]


class _Servicer(pb_grpc.SplitCloudServicer):
    def __init__(self, owner: SplitServer) -> None:
        self.o = owner

    def Session(self, request_iterator, context):  # noqa: N802 - gRPC naming
        out: queue.Queue = queue.Queue()

        def recv() -> Any:
            try:
                return next(request_iterator)
            except StopIteration:
                return None
            except grpc.RpcError:
                return None
            except ValueError:  # iterator closed after cancellation
                return None

        channel = Channel("cloud", out.put, recv, chunk_bytes=self.o.chunk_bytes, tap=self.o.tap)

        def work() -> None:
            try:
                self.o.handler(channel)
            except ConnectionError as exc:
                log.info("edge session ended: %s", exc)
            except Exception as exc:  # noqa: BLE001 - reported to the edge, logged here
                log.warning("edge session failed: %s", exc, exc_info=log.isEnabledFor(logging.DEBUG))
                try:
                    channel.send("error", message=f"{type(exc).__name__}: {exc}")
                except Exception:  # noqa: BLE001
                    pass
            finally:
                out.put(None)

        thread = threading.Thread(target=work, daemon=True, name="split-session")
        thread.start()
        while True:
            try:
                msg = out.get(timeout=1.0)
            except queue.Empty:
                if not context.is_active():
                    return
                continue
            if msg is None:
                return
            yield msg


class SplitServer:
    """The cloud's gRPC server; ``handler(channel)`` runs once per edge stream."""

    def __init__(self, handler: Callable[[Channel], None], address: str = "127.0.0.1:0", chunk_bytes: int = 4 * 1024 * 1024, max_sessions: int = 64, tap: Tap | None = None) -> None:
        self.handler = handler
        self.chunk_bytes = chunk_bytes
        self.tap = tap
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_sessions + 2), options=channel_options(chunk_bytes))
        pb_grpc.add_SplitCloudServicer_to_server(_Servicer(self), self.server)
        host = address.rsplit(":", 1)[0]
        self.port = self.server.add_insecure_port(address)
        if self.port == 0:
            raise OSError(f"cannot listen on {address}")
        self.address = f"{host}:{self.port}"

    def start(self) -> SplitServer:
        self.server.start()
        return self

    def stop(self, grace: float = 1.0) -> None:
        self.server.stop(grace).wait()


class EdgeConnection:
    """The edge's end of one session stream."""

    def __init__(self, address: str, chunk_bytes: int = 4 * 1024 * 1024, wire_dtype: str = "fp32", patience_s: float = 60.0, tap: Tap | None = None) -> None:
        # sized for any chunk a valid config allows: the edge adopts the cloud's split.chunk_bytes
        # from its welcome (Channel.chunk_bytes), after this channel exists
        self._grpc = grpc.insecure_channel(address, options=channel_options(max(chunk_bytes, MAX_CHUNK_BYTES)))
        try:
            grpc.channel_ready_future(self._grpc).result(timeout=patience_s)
        except grpc.FutureTimeoutError:
            self._grpc.close()
            raise ConnectionError(f"cannot reach the split cloud at {address} within {patience_s:.0f} s") from None
        self._out: queue.Queue = queue.Queue()
        stub = pb_grpc.SplitCloudStub(self._grpc)
        self._responses = stub.Session(self._outgoing())
        self.channel = Channel("edge", self._out.put, self._recv, chunk_bytes=chunk_bytes, wire_dtype=wire_dtype, tap=tap)

    def _outgoing(self):
        while True:
            msg = self._out.get()
            if msg is None:
                return
            yield msg

    def _recv(self) -> Any:
        try:
            return next(self._responses)
        except StopIteration:
            return None
        except grpc.RpcError as exc:
            raise ConnectionError(f"split stream failed: {exc.code().name}: {exc.details()}") from None

    def leave(self, grace_s: float = 10.0) -> None:
        """Say goodbye to the cloud (when the stream still takes messages), then :meth:`close`."""
        try:
            self.channel.send("goodbye", reason="done")
        except Exception:  # noqa: BLE001 - the stream may already be gone
            pass
        self.close(grace_s)

    def close(self, grace_s: float = 10.0) -> None:
        """Half-close our side, let the cloud finish the stream (so queued messages arrive), then close."""
        self._out.put(None)

        def drain() -> None:
            try:
                for _ in self._responses:
                    pass
            except Exception:  # noqa: BLE001 - the stream is going away either way
                pass

        t = threading.Thread(target=drain, daemon=True)
        t.start()
        t.join(grace_s)
        try:
            self._responses.cancel()
        except Exception:  # noqa: BLE001
            pass
        self._grpc.close()
