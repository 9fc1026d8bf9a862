# The wire: how a guest agent and the host daemon talk over a Unix stream socket, and the typed messages they send.
#
# A frame is a 4-byte big-endian payload length followed by that many bytes of msgpack, which must decode to a map
# with a string key "t" (the message type) and exactly the fields of that type's dataclass below, each of its type.
# The length prefix keeps framing independent of payload validity: a frame whose msgpack is garbage, whose type is
# unknown or whose fields are wrong is rejected on its own and the stream stays in sync; only a length over
# MAX_FRAME (or a stream that ends mid-frame) makes the connection unusable.
#
# Messages are frozen dataclasses, decoded and validated once, here: the rest of the code matches on their classes
# and never sees a dict. docs/PROTOCOL.md is the human version of this file; keep them in step.
from __future__ import annotations

import struct
import types
import typing
from dataclasses import dataclass, fields
from typing import Any, ClassVar, Final, TypeAlias

import msgpack

from .abi import PF_VECTOR as _PF_VECTOR

# 2: EPT and control block with welcome; 3: `exception`, `msr_read`; 4: a restored vCPU's interrupts before welcome;
# 5: `exit_hlt` (the idle HLT of every ABI) and `exit_timer` (the `pf` ABI's tick, at which a page-ready #PF can be
#    injected); 6: `vmm_snapshot` and `vmm_done` (a VMM's snapshot request, on a connection of its own)
PROTOCOL_VERSION: Final = 6
MAX_FRAME: Final = 64 * 1024
HEADER: Final = struct.Struct(">I")

# The range of each integer of `hello`; the host refuses a value outside it (docs/PROTOCOL.md, section 3).
BOOT_MAX: Final = 0xFFFF_FFFF  # a boot number is a u32 (the host saves it in a u32 register slot)
PID_MAX: Final = 1 << 22  # Linux's PID_MAX_LIMIT: no pid is larger
HELLO_RANGES: Final = {"proto": (0, 0xFFFF_FFFF), "boot": (0, BOOT_MAX), "pid": (1, PID_MAX)}


# --- guest to host --------------------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Hello:
    """First message on a connection, and only there (a second one is fatal). vcpu=None asks the host to assign a
    free vCPU, boot=0 to number this boot; `welcome` says what was assigned. The host checks each value's range."""

    TYPE: ClassVar[str] = "hello"
    proto: int
    vm: str
    vcpu: int | None
    boot: int
    kind: str
    pid: int
    transport: str


@dataclass(frozen=True, slots=True)
class VmmSnapshot:
    """A VMM's request, first and only message on its connection (instead of hello): pause every vCPU (SIGSTOP its
    guest), save the VM into `directory` (shared/snapshot.py) with the MSRs of `msrs` (a list in that module's
    syntax), answer vmm_done, and stop, leaving guest RAM and the swap for the host that restores it."""

    TYPE: ClassVar[str] = "vmm_snapshot"
    proto: int
    directory: str
    msrs: str


@dataclass(frozen=True, slots=True)
class MsrWrite:
    """wrmsr: answered by msr_result (ok=False is a #GP)."""

    TYPE: ClassVar[str] = "msr_write"
    msr: int
    value: int


@dataclass(frozen=True, slots=True)
class MsrRead:
    """rdmsr: answered by msr_result with the value (ok=False is a #GP)."""

    TYPE: ClassVar[str] = "msr_read"
    msr: int


@dataclass(frozen=True, slots=True)
class ExitMem:
    """A guest access found its gfn not present in the EPT: the VM exit. Answered by exception or resume."""

    TYPE: ClassVar[str] = "exit_mem"
    gpa: int
    write: bool
    user: bool
    irq: bool


@dataclass(frozen=True, slots=True)
class ExitHlt:
    """HLT with interrupts on (safe_halt): the vCPU blocks in the host until it has an event (a completed page-in)
    or `timeout_us` passes (the guest's own timer; 0: none). Answered by exception (the `pf` ABI's page-ready #PF)
    or resume (gpa 0)."""

    TYPE: ClassVar[str] = "exit_hlt"
    timeout_us: int


@dataclass(frozen=True, slots=True)
class ExitTimer:
    """An external-interrupt exit (the host's timer tick) while the guest runs: `user` and `irq` are the guest's
    CPL and RFLAGS.IF at that moment. Answered by exception (the `pf` ABI's page-ready #PF) or resume (gpa 0)."""

    TYPE: ClassVar[str] = "exit_timer"
    user: bool
    irq: bool


# --- host to guest --------------------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Welcome:
    """Handshake accepted. Sent with two file descriptors (SCM_RIGHTS): the EPT and this vCPU's control block
    (shared/views.py)."""

    TYPE: ClassVar[str] = "welcome"
    proto: int
    vm: str
    vcpu: int
    boot: int
    vcpus: int
    pages: int
    page_size: int
    shm: str
    cpuid: int


@dataclass(frozen=True, slots=True)
class MsrResult:
    """The result of msr_write (value None) or msr_read (the value). ok=False is a #GP; error says why."""

    TYPE: ClassVar[str] = "msr_result"
    msr: int
    ok: bool
    error: str | None
    value: int | None = None


@dataclass(frozen=True, slots=True)
class InjectException:
    """Exception injection at the vCPU's next entry: vector 14 (#PF) with CR2, 20 (#VE, `ve`) or 8 (#DF, `pf` with
    the historical fixes off). For an APF "page not present", CR2 is the token and `flags` = 1 is already in the APF
    area; on `pf` a page-ready is a #PF too (`reason` = 2)."""

    TYPE: ClassVar[str] = "exception"
    vector: int
    cr2: int


@dataclass(frozen=True, slots=True)
class Resume:
    """The exit ended without an exception (the page is in, or the vCPU was halted and woke): re-enter, take any
    pending interrupt, and retry the access."""

    TYPE: ClassVar[str] = "resume"
    gpa: int


@dataclass(frozen=True, slots=True)
class Interrupt:
    """An interrupt on `vector`. For page-ready the token is already in the APF area."""

    TYPE: ClassVar[str] = "interrupt"
    vector: int


@dataclass(frozen=True, slots=True)
class VmmDone:
    """The snapshot of `vcpus` paused vCPUs is in `directory`; the host stops now (the guests stay paused)."""

    TYPE: ClassVar[str] = "vmm_done"
    directory: str
    vcpus: int


@dataclass(frozen=True, slots=True)
class ErrorReply:
    """The host rejected a message. fatal=True: the host closes the connection after sending this."""

    TYPE: ClassVar[str] = "error"
    code: str
    message: str
    fatal: bool


GuestMessage: TypeAlias = Hello | VmmSnapshot | MsrWrite | MsrRead | ExitMem | ExitHlt | ExitTimer
HostMessage: TypeAlias = Welcome | MsrResult | InjectException | Resume | Interrupt | VmmDone | ErrorReply
Message: TypeAlias = GuestMessage | HostMessage
Schema: TypeAlias = dict[str, type]

GUEST_TO_HOST: Final[Schema] = {c.TYPE: c for c in (Hello, VmmSnapshot, MsrWrite, MsrRead, ExitMem, ExitHlt,
                                                    ExitTimer)}
HOST_TO_GUEST: Final[Schema] = {c.TYPE: c for c in (Welcome, MsrResult, InjectException, Resume, Interrupt, VmmDone,
                                                    ErrorReply)}
PF_VECTOR: Final = _PF_VECTOR  # (shared/abi.py has the vectors)


def _field_types(cls: type) -> dict[str, tuple[type, ...]]:
    """Each field's accepted Python types, from the dataclass annotations (int | None -> (int, NoneType))."""
    hints = typing.get_type_hints(cls)
    out: dict[str, tuple[type, ...]] = {}
    for f in fields(cls):
        hint = hints[f.name]
        out[f.name] = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    return out


_TYPES: Final = {cls: _field_types(cls) for cls in (*GUEST_TO_HOST.values(), *HOST_TO_GUEST.values())}


class WireError(Exception):
    """A frame or message that breaks the protocol. `fatal` means the stream can no longer be trusted."""

    def __init__(self, code: str, message: str, *, fatal: bool = False) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.fatal = fatal


_FIELDS: Final = {cls: tuple(_TYPES[cls]) for cls in _TYPES}  # every field is a scalar: no asdict's deep copy


def encode(msg: Message) -> bytes:
    payload: bytes = msgpack.packb({"t": msg.TYPE, **{name: getattr(msg, name) for name in _FIELDS[type(msg)]}})
    if len(payload) > MAX_FRAME:
        raise WireError("frame_too_large", f"{msg.TYPE} message of {len(payload)} bytes exceeds {MAX_FRAME}")
    return HEADER.pack(len(payload)) + payload


def decode(payload: bytes, schema: Schema) -> Any:
    """Decode and validate one frame's payload against `schema` (GUEST_TO_HOST or HOST_TO_GUEST): a message of
    one of the schema's classes, or WireError."""
    try:
        raw = msgpack.unpackb(payload, use_list=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises ValueError subclasses, StackError, ExtraData, ...
        raise WireError("malformed", f"undecodable msgpack: {type(exc).__name__}: {exc}") from None
    if not isinstance(raw, dict):
        raise WireError("malformed", f"message is a {type(raw).__name__}, not a map")
    msg_type = raw.get("t")
    if not isinstance(msg_type, str):
        raise WireError("malformed", "message has no string field 't'")
    cls = schema.get(msg_type)
    if cls is None:
        raise WireError("unknown_type", f"unknown message type {msg_type[:64]!r}")
    wanted = _TYPES[cls]
    for name, accepted in wanted.items():
        if name not in raw:
            raise WireError("bad_field", f"{msg_type}: missing field {name!r}")
        value = raw[name]
        # bool is an int subclass: an int field must not accept True/False.
        if not isinstance(value, accepted) or (isinstance(value, bool) and bool not in accepted):
            raise WireError("bad_field", f"{msg_type}: field {name!r} has type {type(value).__name__}")
    extra = raw.keys() - wanted.keys() - {"t"}
    if extra:
        raise WireError("bad_field", f"{msg_type}: unknown fields {sorted(map(str, extra))[:8]}")
    return cls(**{name: raw[name] for name in wanted})


def make(schema: Schema, msg_type: str, **values: Any) -> Message:
    """A message from its type name and fields (for scripted clients and tests)."""
    msg: Message = schema[msg_type](**values)
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
