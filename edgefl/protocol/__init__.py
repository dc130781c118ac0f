"""Protocol v1: topics, CBOR messages, the tensor codec and chunked transfer.

Pure Python on cbor2 and numpy, so the device agent can import it on small devices.
See docs/protocol.md for the wire-level description.
"""

from __future__ import annotations

from edgefl.protocol.chunking import ChunkError, Reassembler, split_payload
from edgefl.protocol.messages import MessageError, decode, encode
from edgefl.protocol.tensors import CodecError, dumps_tensors, loads_tensors
from edgefl.protocol.topics import PROTOCOL_VERSION, TopicError, Topics

__all__ = [
    "PROTOCOL_VERSION",
    "ChunkError",
    "CodecError",
    "MessageError",
    "Reassembler",
    "TopicError",
    "Topics",
    "decode",
    "dumps_tensors",
    "encode",
    "loads_tensors",
    "split_payload",
]
