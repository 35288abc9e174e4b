"""Per-worker bearer tokens: a tokens file, re-read when it changes, checked on every RPC.

The tokens file (YAML or JSON) maps worker ids to tokens::

    laptop-alice: 3q2+7w...          # plaintext token
    laptop-bob: sha256:9f86d08...    # or the hex sha256 of the token (the file then holds no secret)

A token is bound to the worker id it was issued for: the pair (worker id, token) must match.
Comparison is constant-time (``hmac.compare_digest`` on sha256 digests, so neither the token's
length nor its content leaks through timing; unknown ids cost the same as known ones). The
file is re-read whenever its mtime, size or inode change, so deleting a line revokes that
worker without restarting the coordinator. A tokens file that cannot be read or parsed fails
closed: every call is refused until it is fixed.

On the wire the token travels as call metadata, on every RPC (see :data:`TOKEN_KEY`,
:data:`WORKER_KEY`); :class:`AuthInterceptor` refuses bad calls with UNAUTHENTICATED before the
handler runs, so not a byte of an upload is read for them.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc

log = logging.getLogger("dpeft.auth")

TOKEN_KEY = "authorization"
WORKER_KEY = "x-dpeft-worker-id"
SERVICE_PREFIX = "/dpeft.v1.Coordinator/"
_DUMMY = hashlib.sha256(b"dpeft-no-such-worker").digest()


def new_token() -> str:
    """A fresh random token (256 bits, URL-safe)."""
    return secrets.token_urlsafe(32)


def token_digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8")).digest()


def call_metadata(worker_id: str, token: str) -> tuple[tuple[str, str], ...]:
    """The metadata a client sends on every call."""
    md: list[tuple[str, str]] = [(WORKER_KEY, worker_id)]
    if token:
        md.append((TOKEN_KEY, f"Bearer {token}"))
    return tuple(md)


def metadata_identity(metadata: Any) -> tuple[str, str]:
    """(worker id, token) from call metadata ('' where absent)."""
    worker_id, token = "", ""
    for key, value in metadata or ():
        if key == WORKER_KEY:
            worker_id = value if isinstance(value, str) else value.decode("utf-8", "replace")
        elif key == TOKEN_KEY:
            text = value if isinstance(value, str) else value.decode("utf-8", "replace")
            token = text[7:] if text[:7].lower() == "bearer " else text
    return worker_id, token


class TokenStore:
    """worker id -> sha256(token), from a YAML/JSON file that is re-read when it changes."""

    def __init__(self, path: str | os.PathLike[str], check_every_s: float = 0.5) -> None:
        self.path = Path(path)
        self.check_every_s = check_every_s
        self._lock = threading.Lock()
        self._digests: dict[str, bytes] = {}
        self._stamp: tuple[int, int, int] | None = None
        self._checked = 0.0
        self._error: str | None = None
        self._load(force=True)
        if self._error:
            from dpeft.errors import ConfigError

            raise ConfigError("auth.tokens_file", self._error)

    @staticmethod
    def parse(text: str, where: str = "tokens file") -> dict[str, bytes]:
        import yaml

        try:
            data = yaml.safe_load(text) if text.strip() else {}
        except yaml.YAMLError as exc:
            raise ValueError(f"{where} is not YAML/JSON: {exc}") from None
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise ValueError(f"{where} must map worker ids to tokens")
        if isinstance(data.get("workers"), dict) and len(data) == 1:
            data = data["workers"]
        out: dict[str, bytes] = {}
        for wid, tok in data.items():
            if not isinstance(wid, str) or not wid or not isinstance(tok, str) or not tok:
                raise ValueError(f"{where}: entry {wid!r} must be a non-empty worker id mapped to a non-empty token string")
            if tok.startswith("sha256:"):
                try:
                    digest = bytes.fromhex(tok[7:])
                except ValueError:
                    raise ValueError(f"{where}: entry {wid!r}: sha256: must be followed by 64 hex digits") from None
                if len(digest) != 32:
                    raise ValueError(f"{where}: entry {wid!r}: sha256: must be followed by 64 hex digits")
                out[wid] = digest
            else:
                if len(tok) < 16:
                    log.warning("tokens file: the token of %r is shorter than 16 characters", wid)
                out[wid] = token_digest(tok)
        return out

    def _load(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._checked < self.check_every_s:
            return
        self._checked = now
        try:
            st = self.path.stat()
            stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
        except OSError as exc:
            if self._error is None:
                log.error("event=tokens_unreadable path=%s error=%r (refusing every worker until fixed)", self.path, str(exc))
            self._error, self._digests, self._stamp = f"cannot read {self.path}: {exc.strerror}", {}, None
            return
        if stamp == self._stamp and not force:
            return
        try:
            digests = self.parse(self.path.read_text(encoding="utf-8"), str(self.path))
        except (OSError, ValueError) as exc:
            log.error("event=tokens_invalid path=%s error=%r (refusing every worker until fixed)", self.path, str(exc))
            self._error, self._digests, self._stamp = str(exc), {}, stamp
            return
        if self._stamp is not None:
            log.warning("event=tokens_reloaded path=%s workers=%d", self.path, len(digests))
        self._error, self._digests, self._stamp = None, digests, stamp

    def check(self, worker_id: str, token: str) -> bool:
        """True when ``token`` is the current token of ``worker_id`` (constant-time)."""
        with self._lock:
            self._load()
            want = self._digests.get(worker_id)
        got = token_digest(token or "")
        ok = hmac.compare_digest(got, want if want is not None else _DUMMY)
        return ok and want is not None and bool(token)

    def knows(self, worker_id: str) -> bool:
        """Whether ``worker_id`` has a token in the current file (False once its line is removed: revoked)."""
        with self._lock:
            self._load()
            return worker_id in self._digests

    def __len__(self) -> int:
        with self._lock:
            self._load()
            return len(self._digests)


def _abort_handler(handler: grpc.RpcMethodHandler | None, code: grpc.StatusCode, message: str) -> grpc.RpcMethodHandler:
    """A handler of the same shape as ``handler`` that refuses the call without reading requests."""

    def refuse(request_or_iterator: Any, context: grpc.ServicerContext) -> Any:
        context.abort(code, message)

    if handler is None or (not handler.request_streaming and not handler.response_streaming):
        return grpc.unary_unary_rpc_method_handler(refuse)
    if handler.request_streaming and not handler.response_streaming:
        return grpc.stream_unary_rpc_method_handler(refuse)
    if not handler.request_streaming:
        return grpc.unary_stream_rpc_method_handler(refuse)
    return grpc.stream_stream_rpc_method_handler(refuse)


class AuthInterceptor(grpc.ServerInterceptor):
    """Checks (worker id, token) metadata on every call of the Coordinator service."""

    def __init__(self, check: Callable[[str, str], bool], on_refused: Callable[[str, str, str], None] | None = None) -> None:
        self.check = check
        self.on_refused = on_refused

    def intercept_service(self, continuation: Callable, handler_call_details: grpc.HandlerCallDetails) -> Any:
        method = handler_call_details.method
        if not method.startswith(SERVICE_PREFIX):
            return continuation(handler_call_details)  # health checks stay open
        worker_id, token = metadata_identity(handler_call_details.invocation_metadata)
        if worker_id and token and self.check(worker_id, token):
            return continuation(handler_call_details)
        if not token:
            message = "missing bearer token (send metadata 'authorization: Bearer <token>' and 'x-dpeft-worker-id')"
        elif not worker_id:
            message = "missing worker id metadata 'x-dpeft-worker-id'"
        else:
            message = f"invalid or revoked token for worker {worker_id!r}"
        if self.on_refused is not None:
            self.on_refused(method[len(SERVICE_PREFIX) :], worker_id, message)
        return _abort_handler(continuation(handler_call_details), grpc.StatusCode.UNAUTHENTICATED, message)
