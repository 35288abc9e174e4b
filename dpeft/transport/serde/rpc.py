"""How each Coordinator RPC's messages are (de)serialized, for both ends.

The same protobuf bytes as the generated ``coordinator_pb2_grpc`` code, except that the bulk
streams (FetchBlob responses, PushUpdate requests) use :mod:`.chunks`' zero-copy path.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from dpeft._proto.dpeft.v1 import coordinator_pb2 as pb
from dpeft.transport.serde.chunks import decode_blob_chunk, decode_update_part, encode_blob_chunk, encode_update_part

SERVICE_NAME = "dpeft.v1.Coordinator"


@dataclass(frozen=True)
class RpcCodec:
    """One RPC: its shape and the (de)serializers of its request and response."""

    name: str
    request_stream: bool
    response_stream: bool
    serialize_request: Callable[[Any], bytes]
    parse_request: Callable[[bytes], Any]
    serialize_response: Callable[[Any], bytes]
    parse_response: Callable[[bytes], Any]

    @property
    def path(self) -> str:
        return f"/{SERVICE_NAME}/{self.name}"


def _plain(name: str, req: Any, resp: Any) -> RpcCodec:
    return RpcCodec(name, False, False, req.SerializeToString, req.FromString, resp.SerializeToString, resp.FromString)


COORDINATOR_RPCS: dict[str, RpcCodec] = {
    c.name: c
    for c in (
        _plain("Join", pb.JoinRequest, pb.JoinReply),
        _plain("PollTask", pb.PollRequest, pb.PollReply),
        _plain("Heartbeat", pb.HeartbeatRequest, pb.HeartbeatReply),
        _plain("Leave", pb.LeaveRequest, pb.LeaveReply),
        _plain("QueryUpload", pb.UploadQuery, pb.UploadStatus),
        _plain("Status", pb.StatusRequest, pb.StatusReply),
        RpcCodec("FetchBlob", False, True, pb.FetchRequest.SerializeToString, pb.FetchRequest.FromString, encode_blob_chunk, decode_blob_chunk),
        RpcCodec("PushUpdate", True, False, encode_update_part, decode_update_part, pb.UpdateAck.SerializeToString, pb.UpdateAck.FromString),
    )
}


def proto_rpc_names() -> set[str]:
    """The RPCs the .proto declares for the Coordinator service."""
    return {m.name for m in pb.DESCRIPTOR.services_by_name["Coordinator"].methods}
