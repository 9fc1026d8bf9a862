# The one home of apf-emu's options: every option of the host daemon and of a guest agent, with its default, its
# allowed range and its help, in one table per side; the typed options a process runs with; the command line that
# starts it; and the exit statuses. `apf-host`, `apf-guest`, `apf-emu run` and `chaos`, the tests and the benchmarks
# all parse, validate and build command lines through this module, so that a value is checked once, the same way
# everywhere, before anything starts: a bad value is a usage error (exit 2) naming the option and its range.
#
# An option is also read from the environment as APF_EMU_<NAME> (for compose) by the daemons' own parsers; a bad
# value there is a usage error naming the variable.
from __future__ import annotations

import argparse
import os
import random
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, ClassVar, Final, NoReturn, TypeVar

from . import bugs as host_bugs
from .abi import HYPERVISOR_CALLBACK_VECTOR, MAX_VCPUS
from .abis import ABIS, DEFAULT_ABI
from .abis import DESCRIPTIONS as ABI_DESCRIPTIONS
from .guest_ram import MAX_PAGES, check_vm_id
from .logfile import COMPRESSIONS
from .transports import TRANSPORTS

# --- exit statuses ------------------------------------------------------------------------------------------------
EXIT_OK: Final = 0
EXIT_VIOLATIONS: Final = 1  # an invariant was violated (apf-emu run, chaos, check)
EXIT_USAGE: Final = 2  # a bad option, a bad path, input with nothing to check
EXIT_FAILED: Final = 3  # a process failed (a guest or the host could not go on)
EXIT_INTERRUPTED: Final = 130  # stopped by SIGINT before there was anything to judge (128 + SIGINT, as shells say)
EXIT_CRASH: Final = 70  # a guest panicked: its crash path ran; boot a kdump kernel next
EXIT_REBOOT: Final = 71  # a guest rebooted: boot a normal kernel next

MAX_SOCKET_PATH: Final = 107  # sun_path, minus its NUL
MAX_TASKS: Final = 1024


class ConfigError(ValueError):
    """A value outside its range; the message names the option."""


# --- values -------------------------------------------------------------------------------------------------------
_UNITS = {"s": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "ns": 1e-9}


def _seconds(text: str) -> float:
    m = re.fullmatch(r"([0-9]*\.?[0-9]+)(s|ms|us|µs|ns)?", text)
    if not m:
        raise ValueError(text)
    value = float(m.group(1)) * _UNITS[m.group(2) or "ms"]
    if value > 60:
        raise ValueError(text)
    return value


@dataclass(frozen=True, slots=True)
class PageInLatency:
    """A page-in latency distribution: `0`, `fixed:2ms`, `exp:2ms` (mean), `uniform:0.5ms:3ms` (at most 60 s)."""

    kind: str
    a: float = 0.0
    b: float = 0.0

    @classmethod
    def parse(cls, spec: str) -> PageInLatency:
        parts = spec.strip().lower().split(":")
        try:
            if parts == ["0"]:
                return cls("fixed", 0.0)
            kind, args = parts[0], [_seconds(p) for p in parts[1:]]
            if kind == "fixed" and len(args) == 1:
                return cls("fixed", args[0])
            if kind == "exp" and len(args) == 1:
                return cls("exp", args[0])
            if kind == "uniform" and len(args) == 2 and args[0] <= args[1]:
                return cls("uniform", args[0], args[1])
        except ValueError:
            pass
        raise ValueError(
            f"bad page-in latency {spec!r}: use 0, fixed:T, exp:MEAN or uniform:LO:HI with T like 2ms, 150us, 0.01s "
            "(at most 60 s)"
        )

    def sample(self, rng: random.Random) -> float:
        if self.kind == "fixed":
            return self.a
        if self.kind == "exp":
            return rng.expovariate(1.0 / self.a) if self.a > 0 else 0.0
        return rng.uniform(self.a, self.b)

    def __str__(self) -> str:
        if self.kind == "uniform":
            return f"uniform:{self.a * 1e3:g}ms:{self.b * 1e3:g}ms"
        return f"{self.kind}:{self.a * 1e3:g}ms"

    def spec(self) -> str:
        """Exactly this distribution, for a command line (`parse(spec())` gives it back)."""
        if self.kind == "uniform":
            return f"uniform:{self.a!r}s:{self.b!r}s"
        return f"{self.kind}:{self.a!r}s"


@dataclass(frozen=True, slots=True)
class PageInErrors:
    """Which page-ins fail (a truncated file behind a virtiofs DAX window, a dead disk): `none`, `gfns:LO-HI` (every
    page-in of those gfns), or `rate:P` (each page-in with probability P, from the host's seeded generator)."""

    kind: str = "none"
    lo: int = 0
    hi: int = -1
    rate: float = 0.0

    @classmethod
    def parse(cls, spec: str) -> PageInErrors:
        text = spec.strip().lower()
        try:
            if text == "none":
                return cls()
            kind, _, arg = text.partition(":")
            if kind == "gfns":
                lo_s, _, hi_s = arg.partition("-")
                lo, hi = int(lo_s, 0), int(hi_s or lo_s, 0)
                if 0 <= lo <= hi:
                    return cls("gfns", lo, hi)
            elif kind == "rate":
                rate = float(arg)
                if 0.0 <= rate <= 1.0:
                    return cls("rate", rate=rate)
        except ValueError:
            pass
        raise ValueError(f"bad page-in errors {spec!r}: use none, gfns:LO-HI (e.g. gfns:100-119) or rate:P with P "
                         "in [0, 1]")

    def fails(self, gfn: int, rng: random.Random) -> bool:
        if self.kind == "gfns":
            return self.lo <= gfn <= self.hi
        if self.kind == "rate":
            return rng.random() < self.rate
        return False

    def spec(self) -> str:
        if self.kind == "gfns":
            return f"gfns:{self.lo}-{self.hi}"
        if self.kind == "rate":
            return f"rate:{self.rate!r}"
        return "none"

    def __str__(self) -> str:
        return self.spec()


def int_in(lo: int, hi: int, *, base: int = 10) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text, base)
        except ValueError:
            raise ValueError(f"{text!r} is not an integer (allowed: {lo}..{hi})") from None
        if not lo <= value <= hi:
            raise ValueError(f"{value} is not in {lo}..{hi}")
        return value

    return parse


def float_in(lo: float, hi: float, *, lo_open: bool = False) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise ValueError(f"{text!r} is not a number") from None
        if not (lo < value <= hi if lo_open else lo <= value <= hi):  # also refuses nan
            raise ValueError(f"{text} is not in {'(' if lo_open else '['}{lo:g}, {hi:g}]")
        return value

    return parse


def latency(text: str) -> PageInLatency:
    return PageInLatency.parse(text)


def page_in_errors(text: str) -> PageInErrors:
    return PageInErrors.parse(text)


def vm_id(text: str) -> str:
    return check_vm_id(text)


def one_of(*choices: str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        if text not in choices:
            raise ValueError(f"{text!r} is not one of {', '.join(choices)}")
        return text

    return parse


def flag(text: str) -> bool:
    """An environment flag: 1/true/yes or 0/false/no/empty."""
    low = text.strip().lower()
    if low in ("1", "true", "yes"):
        return True
    if low in ("", "0", "false", "no"):
        return False
    raise ValueError(f"{text!r} is not a flag (1 or 0)")


def _duration(text: str) -> float:
    return float_in(0.0, 365 * 86400.0, lo_open=True)(text)


# --- paths: checked before anything starts, named in every error ----------------------------------------------------
def output_file(text: str) -> Path:
    """A file to be written: its directory exists and is writable, and it is not itself a directory."""
    path = Path(text)
    parent = path.parent if str(path.parent) else Path(".")
    if path.is_dir():
        raise ValueError(f"{path} is a directory, not a file")
    if not parent.is_dir():
        raise ValueError(f"{path}: the directory {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"{path}: the directory {parent} is not writable")
    return path


def input_file(text: str) -> Path:
    """A file to be read: it exists and is readable."""
    path = Path(text)
    if not path.is_file():
        raise ValueError(f"{path}: no such file")
    if not os.access(path, os.R_OK):
        raise ValueError(f"{path}: not readable")
    return path


def output_dir(text: str) -> Path:
    """A directory to be written into, made only when there is something to write: it is a writable directory, or
    its nearest existing parent is."""
    path = Path(text)
    if path.exists():
        if not path.is_dir():
            raise ValueError(f"{path} exists and is not a directory")
        if not os.access(path, os.W_OK | os.X_OK):
            raise ValueError(f"{path}: not writable")
        return path
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"{path}: cannot be made under {parent}")
    return path


def make_dir(path: Path, what: str) -> Path:
    """Create a directory to write into (with its parents) now, or say why not: ConfigError naming `what` and the
    path."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise ConfigError(f"{what} {path}: exists and is not a directory") from None
    except OSError as exc:
        raise ConfigError(f"{what} {path}: {exc.strerror}") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise ConfigError(f"{what} {path}: not writable")
    return path


# --- the tables ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Option:
    dest: str
    parse: Callable[[str], Any]
    default: Any
    help: str
    is_flag: bool = False  # `--name` alone means True
    env: bool = True  # also APF_EMU_<DEST> for the daemons
    metavar: str | None = None

    @property
    def flag_name(self) -> str:
        return "--" + self.dest.replace("_", "-")

    def format(self, value: Any) -> list[str]:
        """The command-line words that give `value` to this option (none for the default of a flag)."""
        if self.is_flag:
            return [self.flag_name] if value else []
        if value is None:
            return []
        if isinstance(value, int) and self.dest == "vector":
            return [self.flag_name, hex(value)]
        if isinstance(value, (PageInLatency, PageInErrors)):
            return [self.flag_name, value.spec()]
        if isinstance(value, frozenset):
            return [self.flag_name, host_bugs.spec(value)] if value else []
        return [self.flag_name, str(value)]


COMMON_OPTIONS: Final = (
    Option("vm", vm_id, "vm0", "VM id: names the shm objects; 1-48 characters of [A-Za-z0-9_.-]"),
    Option("socket", Path, Path("/tmp/apf-emu-vm0.sock"), "the host daemon's Unix socket", metavar="PATH"),
    Option("seed", int_in(0, 2**63 - 1), 0, "random seed"),
    Option("log_dir", Path, None, "directory for the JSON-lines log (host.jsonl, guest-<vcpu>.jsonl)",
           metavar="DIR"),
    Option("log_stdout", flag, False, "also write the JSON log lines to stdout", is_flag=True),
    Option("abi", one_of(*ABIS), DEFAULT_ABI, "the APF design: " + "; ".join(f"{k}: {v}" for k, v in
           ABI_DESCRIPTIONS.items()) + " (docs/PROTOCOL.md, section 11)"),
    Option("log_compress", one_of(*COMPRESSIONS), "none", "compress the log file: none (<name>.jsonl) or gzip "
           "(<name>.<pid>.jsonl.gz, each line flushed so that a SIGKILL loses nothing); every log tool reads both"),
)
HOST_OPTIONS: Final = (
    *COMMON_OPTIONS,
    Option("vcpus", int_in(1, MAX_VCPUS), 2, f"vCPU slots, 1..{MAX_VCPUS}"),
    Option("pages", int_in(2, MAX_PAGES), 512, f"guest RAM in 4 KiB pages, 2..{MAX_PAGES}"),
    Option("resident", int_in(2, MAX_PAGES - 1), 384, "the host's resident limit in pages, 2 .. --pages minus 1"),
    Option("page_in_latency", latency, PageInLatency("exp", 0.002),
           "page-in latency: 0, fixed:T, exp:MEAN or uniform:LO:HI, T like 2ms or 150us", metavar="SPEC"),
    Option("page_in_errors", page_in_errors, PageInErrors(), "page-ins that fail: none, gfns:LO-HI or rate:P "
           "(on `int-error` reported with the page-ready or else the next fault exits to the VMM; on `int` the guest "
           "retries for ever, the loop Vivek Goyal reported)", metavar="SPEC"),
    Option("recover", flag, False, "take over the VM of a host that was killed: keep guest RAM, the swap and the "
           "saved vCPU registers, rebuild residency from them, and restore each vCPU when its guest reconnects",
           is_flag=True),
    Option("restore", Path, None, "start from a VMM snapshot (`apf-emu snapshot`, shared/snapshot.py): guest RAM, the "
           "swap and each vCPU's registers as its MSR list saved them; then as --recover, and the paused guests are "
           "resumed once the host listens", metavar="DIR"),
    Option("recover_if_present", flag, False, "as a supervisor's restart of the host (compose's restart policy): "
           "--recover if a killed host of this VM left guest RAM and the swap behind, else start a new VM",
           is_flag=True),
    Option("enforce_pv_cpuid", flag, False, "as a VMM that enables KVM_CAP_ENFORCE_PV_FEATURE_CPUID: an "
           "MSR_KVM_ASYNC_PF_EN write with DELIVERY_AS_PF_VMEXIT is a #GP, since KVM_FEATURE_ASYNC_PF_VMEXIT is not "
           "advertised (without it, KVM's default, the bit is accepted and stored)", is_flag=True),
    Option("no_pending_check", flag, False, "`pf` only: a host whose page-ready check ignores a pending exception "
           "(kvm_arch_can_inject_async_page_present as `!kvm_event_needs_reinjection && interrupt_allowed`, before "
           "5.7 called kvm_can_do_async_pf): a page-ready can meet a not-present still pending, which 5.7's cancel "
           "then drops with it (docs/PROTOCOL.md section 11)", is_flag=True),
    Option("no_cancel_pending", flag, False, "`pf` only: a host before commit 9a6e7c39810e (\"Fix #DF due to inject "
           "'Page not Present' and 'Page Ready' exceptions simultaneously\"), which had no pending check either "
           "(implies --no-pending-check): both #PFs are queued at one entry and kvm_multiple_exception makes a "
           "double fault", is_flag=True),
    Option("bugs", host_bugs.parse, frozenset(), "historical KVM bugs to put back, comma-separated (the scenarios "
           "use them; docs/SCENARIOS.md): " + "; ".join(f"{name}: before {bug.fix}" for name, bug in
           host_bugs.BUGS.items()), metavar="LIST"),
)
GUEST_OPTIONS: Final = (
    *COMMON_OPTIONS,
    Option("transport", one_of(*TRANSPORTS), "socket",
           "how #PF injection and interrupts reach the guest: " + ", ".join(TRANSPORTS)),
    Option("vcpu", int_in(0, MAX_VCPUS - 1), None, "vCPU to claim (default: the host assigns one)"),
    Option("boot", int_in(0, 2**32 - 1), 0, "boot number of this vCPU's kernel (0: the host numbers it)"),
    Option("kind", one_of("normal", "kdump"), "normal", "kernel kind: normal or kdump"),
    Option("tasks", int_in(1, MAX_TASKS), 4, f"guest tasks that write and verify guest RAM, 1..{MAX_TASKS}"),
    Option("counting_tasks", int_in(0, MAX_TASKS), 0, "guest tasks that only count (CPU work, no memory): what a "
           "vCPU can run while others wait for pages; their total is count_work in guest_shutdown"),
    Option("vector", int_in(0, 255, base=0), HYPERVISOR_CALLBACK_VECTOR,
           "page-ready vector written to MSR_KVM_ASYNC_PF_INT, 0..255 (0xf3 is Linux's HYPERVISOR_CALLBACK_VECTOR)"),
    Option("send_always", flag, False, "set KVM_ASYNC_PF_SEND_ALWAYS, as guests before 5.8 did (a 5.8+ guest "
           "panics on an async #PF in kernel mode either way)", is_flag=True),
    Option("no_apf", flag, False, "do not enable APF (like the no-kvmapf kernel parameter)", is_flag=True),
    Option("kernel_ratio", float_in(0, 1), 0.1, "share of accesses made in kernel mode, 0..1"),
    Option("irq_off_ratio", float_in(0, 1), 0.05, "share of accesses that open an interrupts-off section, 0..1"),
    Option("entry_fault_ratio", float_in(0, 1), 0.02, "share of #PF entries whose entry code touches kernel "
           "memory this vCPU's page table does not map yet (5.7's vmalloc fault, as tracing or an NMI on the entry "
           "can): a nested genuine #PF. On `pf` it comes before `reason` is read (5.7's do_async_page_fault), the "
           "race of the seed thread; 5.8+ reads CR2 and the flags first, so on the other ABIs it is harmless"),
    Option("guest_unmap_ratio", float_in(0, 1), 0.02, "share of completed accesses after which the guest unmaps "
           "one of the task's pages from its own page table (reclaim): the next touch is a genuine #PF that the "
           "guest's #PF path handles (demand paging, every ABI)"),
    Option("shared_ratio", float_in(0, 1), 0.2, "share of accesses to the pages every vCPU shares (a slot per "
           "vCPU in each), 0..1; 0 keeps each task on its own pages"),
    Option("apf_reinit_every", _duration, None, "take the vCPU offline and online again this often (APF disabled, "
           "sleepers woken, APF enabled), in seconds (default never)", metavar="SECONDS"),
    Option("online_clears_token", flag, False, "on CPU online, write 0 to the APF token slot before enabling APF "
           "(Linux does not: a page-ready taken while APF was off stays in the slot and blocks every later one; "
           "docs/PROTOCOL.md section 10)", is_flag=True),
    Option("kdump_no_kvmapf", flag, False, "with --kind kdump: boot the crash kernel with no-kvmapf, so that it "
           "does not enable APF (by default it does, as Linux's crash kernel is a kernel like any other)",
           is_flag=True),
    Option("reconnect_timeout", _duration, 30.0, "seconds to keep reconnecting when the host goes away"),
    Option("connect_timeout", _duration, 10.0, "seconds to wait for the host at start"),
    Option("drain_timeout", _duration, 5.0, "seconds a stopping guest waits for its sleeping tasks"),
    Option("duration", _duration, None, "stop by itself after this many seconds"),
)


def option(table: Sequence[Option], dest: str) -> Option:
    return next(o for o in table if o.dest == dest)


def vmm_socket(socket: Path) -> Path:
    """The host's VMM socket, beside the guests' (`<socket>.vmm`): `apf-emu snapshot` talks to it; no guest is
    given it."""
    return socket.with_name(socket.name + ".vmm")


# --- typed options ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ProcessOptions:
    """What the host and every guest agent share (COMMON_OPTIONS)."""

    vm: str = "vm0"
    socket: Path = Path("/tmp/apf-emu-vm0.sock")
    seed: int = 0
    log_dir: Path | None = None
    log_stdout: bool = False
    abi: str = "int"
    log_compress: str = "none"

    def prepare_paths(self) -> None:
        """Before the process starts anything: the log directory exists (created) and is writable; ConfigError
        naming the path otherwise."""
        if self.log_dir is not None:
            make_dir(self.log_dir, "--log-dir")


@dataclass(frozen=True)
class HostOptions(ProcessOptions):
    vcpus: int = 2
    pages: int = 512
    resident: int = 384
    page_in_latency: PageInLatency = PageInLatency("exp", 0.002)
    page_in_errors: PageInErrors = field(default_factory=PageInErrors)
    recover: bool = False
    recover_if_present: bool = False
    restore: Path | None = None
    enforce_pv_cpuid: bool = False
    no_pending_check: bool = False
    no_cancel_pending: bool = False
    bugs: frozenset[str] = frozenset()

    TABLE: ClassVar[tuple[Option, ...]] = HOST_OPTIONS
    MODULE: ClassVar[str] = "host_daemon"

    def validate(self) -> None:
        """What one option's range cannot say."""
        if not 2 <= self.resident < self.pages:
            raise ConfigError(f"--resident {self.resident} must be at least 2 and below --pages ({self.pages})")
        staging = self.socket.with_name(f".apf-{os.getpid()}")
        for path in (self.socket, staging, vmm_socket(self.socket)):
            if len(os.fsencode(path)) > MAX_SOCKET_PATH:
                raise ConfigError(f"--socket {path} is longer than the {MAX_SOCKET_PATH} bytes a Unix socket path "
                                  "may have")

    def prepare_paths(self) -> None:
        super().prepare_paths()
        parent = self.socket.parent
        if not parent.is_dir():
            raise ConfigError(f"--socket {self.socket}: the directory {parent} does not exist")
        if not os.access(parent, os.W_OK | os.X_OK):
            raise ConfigError(f"--socket {self.socket}: the directory {parent} is not writable")
        if self.socket.is_dir():
            raise ConfigError(f"--socket {self.socket} is a directory")

    def argv(self) -> list[str]:
        return command(self)


@dataclass(frozen=True)
class GuestOptions(ProcessOptions):
    transport: str = "socket"
    vcpu: int | None = None
    boot: int = 0
    kind: str = "normal"
    tasks: int = 4
    counting_tasks: int = 0
    vector: int = HYPERVISOR_CALLBACK_VECTOR
    send_always: bool = False
    no_apf: bool = False
    kernel_ratio: float = 0.1
    irq_off_ratio: float = 0.05
    entry_fault_ratio: float = 0.02
    guest_unmap_ratio: float = 0.02
    shared_ratio: float = 0.2
    apf_reinit_every: float | None = None
    online_clears_token: bool = False
    kdump_no_kvmapf: bool = False
    reconnect_timeout: float = 30.0
    connect_timeout: float = 10.0
    drain_timeout: float = 5.0
    duration: float | None = None

    TABLE: ClassVar[tuple[Option, ...]] = GUEST_OPTIONS
    MODULE: ClassVar[str] = "guest_agent"

    @property
    def apf(self) -> bool:
        return not self.no_apf

    def validate(self) -> None:
        return None

    def argv(self) -> list[str]:
        return command(self)


Options = HostOptions | GuestOptions
OptionsT = TypeVar("OptionsT", HostOptions, GuestOptions)


def command(opts: Options) -> list[str]:
    """`python -m <daemon> <options>`: the one place a host or guest command line is made (runner, chaos, tests,
    benchmarks). Options at their default are left out."""
    words = [sys.executable, "-m", opts.MODULE]
    defaults = type(opts)()
    for o in opts.TABLE:
        value = getattr(opts, o.dest)
        if value != getattr(defaults, o.dest):
            words += o.format(value)
    return words


# --- argparse ------------------------------------------------------------------------------------------------------
def _argparse_type(o: Option) -> Callable[[str], Any]:
    return typed(o.parse, o.dest)


def add_options(parser: argparse.ArgumentParser, table: Sequence[Option], *, only: Sequence[str] | None = None,
                defaults: dict[str, Any] | None = None) -> None:
    """Add the options of `table` (or those named in `only`) to an argparse parser, with their help and defaults.
    Values are parsed and range-checked by argparse (a usage error, exit 2, naming the option)."""
    for o in table:
        if only is not None and o.dest not in only:
            continue
        default = (defaults or {}).get(o.dest, o.default)
        shown = hex(default) if o.dest == "vector" else host_bugs.spec(default) if isinstance(default, frozenset) \
            else default
        help_text = o.help if default is None or o.is_flag else f"{o.help} (default {shown})"
        if o.is_flag:
            parser.add_argument(o.flag_name, dest=o.dest, action="store_true", default=default, help=help_text)
        else:
            parser.add_argument(o.flag_name, dest=o.dest, type=_argparse_type(o), default=default, help=help_text,
                                metavar=o.metavar or o.dest.upper())


def env_defaults(table: Sequence[Option], environ: dict[str, str] | None = None) -> dict[str, Any]:
    """APF_EMU_<DEST> values, parsed and checked: ConfigError naming the variable if one is bad."""
    environ = dict(os.environ) if environ is None else environ
    out: dict[str, Any] = {}
    for o in table:
        name = f"APF_EMU_{o.dest.upper()}"
        if o.env and name in environ:
            try:
                out[o.dest] = o.parse(environ[name])
            except ValueError as exc:
                raise ConfigError(f"environment variable {name}: {exc}") from None
    return out


def daemon_env() -> dict[str, str]:
    """The environment for a host or guest that a supervisor (run, chaos, bench) starts with every option on its
    command line: without APF_EMU_* variables, which would stand in for the options it leaves at their default."""
    return {k: v for k, v in os.environ.items() if not k.startswith("APF_EMU_")}


def from_args(cls: type[OptionsT], args: argparse.Namespace, **fixed: Any) -> OptionsT:
    """Typed options from parsed arguments (only the fields the parser has), plus fixed values; validated."""
    names = {f.name for f in fields(cls)}
    given = {k: v for k, v in vars(args).items() if k in names}
    opts = cls(**{**given, **fixed})
    opts.validate()
    return opts


def with_(opts: OptionsT, **changes: Any) -> OptionsT:
    """A copy with some options changed, validated."""
    new = replace(opts, **changes)
    new.validate()
    return new


def parse_daemon_args(prog: str, description: str, table: Sequence[Option], argv: Sequence[str] | None,
                      cls: type[OptionsT]) -> OptionsT:
    """The whole command line of `apf-host` or `apf-guest`: options, APF_EMU_* defaults, cross-checks. A bad value
    ends the process with a usage error (exit 2) that names the option or the variable."""
    parser = UsageParser(prog=prog, description=description)
    try:
        defaults = env_defaults(table)
    except ConfigError as exc:
        parser.error(str(exc))
    add_options(parser, table, defaults=defaults)
    args = parser.parse_args(argv)
    try:
        opts = from_args(cls, args)
        opts.prepare_paths()
    except ConfigError as exc:
        parser.error(str(exc))
    return opts


class UsageParser(argparse.ArgumentParser):
    """argparse with a usage error on one line (`prog: error: ...`, exit 2): the line names the option or path and
    its allowed values; `--help` has the rest."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def typed(parse: Callable[[str], Any], name: str) -> Callable[[str], Any]:
    """An argparse `type` from a parser that raises ValueError with a message: argparse shows the message (and
    never an internal function's name)."""

    def convert(text: str) -> Any:
        try:
            return parse(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    convert.__name__ = name
    return convert


class _RaisingParser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise ConfigError(message)


def parse(cls: type[OptionsT], argv: Sequence[str], **fixed: Any) -> OptionsT:
    """Typed options from command-line words (as `apf-host` or `apf-guest` would take them), without the
    environment; ConfigError for anything wrong. For supervisors and tests that build on a few options."""
    parser = _RaisingParser(add_help=False)
    add_options(parser, cls.TABLE)
    return from_args(cls, parser.parse_args(list(argv)), **fixed)
