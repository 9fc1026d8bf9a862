# The wire: how a guest agent and the host daemon talk over a Unix stream socket.
#
# A frame is a 4-byte big-endian payload length followed by that many bytes of msgpack, which must decode to a map
# with a string key "t" (the message type) and the fields the schema below lists for that type. The length prefix
# keeps framing independent of payload validity: a frame whose msgpack is garbage, whose type is unknown or whose
# fields are wrong is rejected on its own and the stream stays in sync; only a length over MAX_FRAME (or a stream
# that ends mid-frame) makes the connection unusable. docs/PROTOCOL.md is the human version of this file; keep them
# in step.
from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any, Final

import msgpack

PROTOCOL_VERSION: Final = 2  # 2: EPT and control block passed as fds with welcome
MAX_FRAME: Final = 64 * 1024
HEADER: Final = struct.Struct(">I")

Message = dict[str, Any]

_INT = (int,)
_OPT_INT = (int, type(None))
_STR = (str,)
_OPT_STR = (str, type(None))
_BOOL = (bool,)

# type -> {field: accepted Python types}. Every field is required; a None must be sent explicitly.
GUEST_TO_HOST: Final[dict[str, dict[str, tuple[type, ...]]]] = {
    # First message on a connection, and only there (a second one is fatal). vcpu=None asks the host to assign a
    # free vCPU, boot=0 to number this boot (one more than the last boot it saw of that vCPU); welcome says what was
    # assigned. transport: "socket" or "signal". The host checks each value's range (HELLO_RANGES).
    "hello": {
        "proto": _INT, "vm": _STR, "vcpu": _OPT_INT, "boot": _INT, "kind": _STR, "pid": _INT, "transport": _STR,
    },
    # wrmsr: answered by msr_result (ok=False is a #GP).
    "msr_write": {"msr": _INT, "value": _INT},
    # A guest access found its gfn not present in the EPT: the VM exit. Answered by inject_pf or resume.
    "exit_mem": {"gpa": _INT, "write": _BOOL, "user": _BOOL, "irq": _BOOL},
}
# The range of each integer of `hello`; the host refuses a value outside it (docs/PROTOCOL.md, section 3).
BOOT_MAX: Final = 0xFFFF_FFFF  # a boot number is a u32 (the host saves it in a u32 register slot)
PID_MAX: Final = 1 << 22  # Linux's PID_MAX_LIMIT: no pid is larger
HELLO_RANGES: Final = {"proto": (0, 0xFFFF_FFFF), "boot": (0, BOOT_MAX), "pid": (1, PID_MAX)}
HOST_TO_GUEST: Final[dict[str, dict[str, tuple[type, ...]]]] = {
    # Sent with two file descriptors (SCM_RIGHTS): the EPT and this vCPU's control block (shared/views.py).
    "welcome": {
        "proto": _INT, "vm": _STR, "vcpu": _INT, "boot": _INT, "vcpus": _INT, "pages": _INT, "page_size": _INT,
        "shm": _STR, "cpuid": _INT,
    },
    "msr_result": {"msr": _INT, "ok": _BOOL, "error": _OPT_STR},
    # Exception injection: vector 14 with CR2. For an APF "page not present", flags=1 is already in the APF area.
    "inject_pf": {"cr2": _INT},
    # The exit was handled synchronously (the vCPU was halted until the page came in): re-enter and retry.
    "resume": {"gpa": _INT},
    # An interrupt on `vector`. For page-ready the token is already in the APF area.
    "interrupt": {"vector": _INT},
    # The host rejected a message. fatal=True: the host closes the connection after sending this.
    "error": {"code": _STR, "message": _STR, "fatal": _BOOL},
}


class WireError(Exception):
    """A frame or message that breaks the protocol. `fatal` means the stream can no longer be trusted."""

    def __init__(self, code: str, message: str, *, fatal: bool = False) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.fatal = fatal


def encode(msg_type: str, **fields: Any) -> bytes:
    payload: bytes = msgpack.packb({"t": msg_type, **fields})
    if len(payload) > MAX_FRAME:
        raise WireError("frame_too_large", f"{msg_type} message of {len(payload)} bytes exceeds {MAX_FRAME}")
    return HEADER.pack(len(payload)) + payload


def decode(payload: bytes, schema: dict[str, dict[str, tuple[type, ...]]]) -> Message:
    """Decode and validate one frame's payload against `schema` (GUEST_TO_HOST or HOST_TO_GUEST)."""
    try:
        msg = msgpack.unpackb(payload, use_list=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises ValueError subclasses, StackError, ExtraData, ...
        raise WireError("malformed", f"undecodable msgpack: {type(exc).__name__}: {exc}") from None
    if not isinstance(msg, dict):
        raise WireError("malformed", f"message is a {type(msg).__name__}, not a map")
    msg_type = msg.get("t")
    if not isinstance(msg_type, str):
        raise WireError("malformed", "message has no string field 't'")
    fields = schema.get(msg_type)
    if fields is None:
        raise WireError("unknown_type", f"unknown message type {msg_type[:64]!r}")
    for name, types in fields.items():
        if name not in msg:
            raise WireError("bad_field", f"{msg_type}: missing field {name!r}")
        value = msg[name]
        # bool is an int subclass: an int field must not accept True/False.
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            raise WireError("bad_field", f"{msg_type}: field {name!r} has type {type(value).__name__}")
    extra = msg.keys() - fields.keys() - {"t"}
    if extra:
        raise WireError("bad_field", f"{msg_type}: unknown fields {sorted(map(str, extra))[:8]}")
    return msg


@dataclass(slots=True)
class FrameReader:
    """Incremental splitter of a byte stream into frame payloads."""

    max_frame: int = MAX_FRAME
    _buf: bytearray | None = None

    def feed(self, data: bytes | bytearray) -> list[bytes]:
        buf = self._buf
        if buf is None:
            buf = self._buf = bytearray()
        buf += data
        out: list[bytes] = []
        pos = 0
        n = len(buf)
        while n - pos >= 4:
            (length,) = HEADER.unpack_from(buf, pos)
            if length > self.max_frame:
                raise WireError(
                    "frame_too_large", f"frame of {length} bytes exceeds the limit of {self.max_frame}", fatal=True
                )
            if n - pos - 4 < length:
                break
            out.append(bytes(buf[pos + 4 : pos + 4 + length]))
            pos += 4 + length
        if pos:
            del buf[:pos]
        return out

    @property
    def pending(self) -> int:
        """Bytes of an incomplete frame held back."""
        return len(self._buf) if self._buf else 0
