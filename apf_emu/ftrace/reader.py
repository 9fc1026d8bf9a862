# Reading a real host's ftrace text: `trace-cmd report` output and the kernel's /sys/kernel/tracing/trace, of the
# kvm APF tracepoints (and kvm_msr), turned into host events of apf-emu's log schema so that the one checker and
# the statistics judge them (docs/TRACING.md says what is and is not judged, and why).
#
# A line is `<comm>-<tid> [(<tgid>)] [<cpu>] [<flags>] <secs>.<fraction>: <event>: <printk text>`, the layout
# both tools print (latency flags with `report -l` and in the kernel's file; the tgid column with the record-tgid
# option), and `perf script`'s `<comm> [<pid>/]<tid> [<cpu>] <secs>.<fraction>: kvm:<event>: <text>`. Lines that
# are neither such a line nor a header or comment are reported with their number and skipped; the read goes on.
#
# Who is who: the vCPU of a thread comes from the low 12 bits of the first token it traces (alloc_apf_token:
# `(id << 12) | vcpu_id`); until then from QEMU's comm `CPU <n>/KVM`, its cpu_index, not always the vcpu_id. The VM
# is the thread's tgid where the line has one, else what an apf-emu export's header says, else the thread itself
# ("tid <n>"). `kvm_async_pf_completed` comes from a kworker (async_pf_execute) and names no vCPU: it is given to the
# oldest not-present of its gva that has no completion yet (any VM: under TDP the gva is a GPA, which two VMs may
# share). The gfn of a not-present is that of the `kvm_try_async_get_page` its thread traced just before it
# (__kvm_faultin_pfn traces one before each kvm_arch_setup_async_pf).
from __future__ import annotations

import re
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Final

import orjson

from shared.abi import KVM_APF_WAKE_ALL_TOKEN, MSR_KVM_ASYNC_PF_ACK, MSR_NAMES, TOKEN_VCPU_MASK

from .formats import parse_printk

Event = dict[str, Any]

_FLAGS: Final = r"[a-zA-Z.]{3}[0-9a-fA-F.]{1,3}"  # irqs-off, need-resched, hardirq/softirq, preempt, migrate...
_TAIL: Final = r"(?P<ts>\d+)\.(?P<frac>\d+):\s+(?P<event>[\w:]+?):\s*(?P<text>.*)$"
LINE: Final = re.compile(
    # trace-cmd report ("%16s-%-5d [%03d]", flags by default since 3.3) and the kernel's file ("%16s-%-7d ",
    # "(%7d) " with record-tgid, flags with irq-info)
    rf"^\s*(?P<comm>.*?)-(?P<tid>\d+)\s+(?:\(\s*(?P<tgid>\d+|-+)\s*\)\s*)?\[(?P<cpu>\d+)\]\s+(?:(?P<flags>{_FLAGS})\s+)?"
    + _TAIL
    # trace-cmd report -l ("%8.8s-%-5d %3d" and the flags right after the CPU: the comm cut to 8 characters)
    + rf"|^\s*(?P<lcomm>.{{1,8}}?)-(?P<ltid>\d+)\s+(?P<lcpu>\d+)(?P<lflags>{_FLAGS})\s+" + _TAIL.replace("?P<", "?P<l")
    # perf script ("comm tid [cpu] time: sys:event: trace", or "comm pid/tid" with -F +pid)
    + r"|^\s*(?P<pcomm>.+?)\s+(?:(?P<ptgid>\d+)/)?(?P<ptid>\d+)\s+\[(?P<pcpu>\d+)\]\s+(?P<pts>\d+)\.(?P<pfrac>\d+):"
    r"\s+(?P<pevent>\w+:\w+):\s*(?P<ptext>.*)$")
VCPU_COMM: Final = re.compile(r"^CPU (\d+)/KVM$")
UNKNOWN_COMM: Final = "<...>"  # trace_find_cmdline: the pid is not in saved_cmdlines (the cache is small)
# Lines of the formats that are not events: headers, comments, per-CPU notes.
HEADER: Final = re.compile(r"^(#.*|cpus=\d+|version = \d+|CPU \d+ is empty|\s*)$")
# trace-cmd: "CPU:%d [%lld EVENTS DROPPED]" (or without the count); the kernel: "CPU:%d [LOST %lu EVENTS]" (or
# without the count), "##### CPU %u buffer started ####" after an overrun.
LOST: Final = re.compile(r"^\s*(?:CPU:\s*\d+ \[(?:LOST (?:\d+ )?EVENTS|(?:\d+ )?EVENTS DROPPED)\]"
                         r"|##### CPU \d+ buffer started ####)\s*$")
# The header an apf-emu export writes (apf_emu/ftrace/writer.py): which VM each thread is, and that this trace is
# whole (written from logs, not recorded mid-flight).
EXPORT_HEADER: Final = re.compile(r"^# apf-emu ftrace export(?: (?P<version>\d+))?\s*$")
EXPORT_THREAD: Final = re.compile(r"^# apf-emu thread (?P<tid>\d+) vm (?P<vm>\S+) vcpu (?P<vcpu>\d+)\s*$")
# ... and the host events that have no tracepoint but change what may follow (a vCPU's reset, the host's ABI), as
# their JSON log lines (apf_emu/ftrace/writer.py STATE_EVENTS).
EXPORT_EVENT: Final = "# apf-emu event "
STATE_EVENTS: Final = frozenset({"host_ready", "vcpu_connect", "vcpu_disconnect", "apf_ready_dropped", "apf_cancel",
                                 "vcpu_restore"})
COUNT_FIELDS: Final = ("token", "cancelled", "boot", "slot", "gfn")  # what the checker and statistics key on
APF_TRACEPOINTS: Final = frozenset({"kvm_async_pf_not_present", "kvm_async_pf_ready", "kvm_async_pf_completed",
                                    "kvm_try_async_get_page", "kvm_async_pf_repeated_fault",
                                    "kvm_async_pf_doublefault", "kvm_msr"})
APF_MSRS: Final = frozenset(n for n in MSR_NAMES if 0x4B564D00 <= n <= 0x4B564DFF)
SNIFF_BYTES: Final = 8192


def looks_like_ftrace(head: bytes) -> bool:
    """Whether the start of a file is ftrace text rather than apf-emu's JSON lines: a tracer header, trace-cmd's
    `cpus=` line, or a first event line."""
    text = head.decode("utf-8", "replace")
    for line in text.splitlines()[:50]:
        stripped = line.strip()
        if not stripped:
            continue
        if stripped.startswith("{") or ("{" in stripped[:80] and '"event"' in stripped):
            return False
        if stripped.startswith("# tracer:") or EXPORT_HEADER.match(stripped) or re.match(r"^cpus=\d+$", stripped):
            return True
        if LINE.match(line):
            return True
        if not HEADER.match(line):
            return False
    return False


def _count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def timestamp_ns(secs: str, fraction: str) -> int:
    """A line's time: seconds and a fraction of 6 (microseconds) or 9 (nanoseconds) digits. libtraceevent's
    pevent_print_event rounded microseconds as (nsecs + 500) / NSECS_PER_USEC with no carry into the seconds
    (later versions carry), so that its traces can say `X.1000000` for X + 1 s."""
    if fraction == "1000000":
        return (int(secs) + 1) * 1_000_000_000
    return int(secs) * 1_000_000_000 + int(fraction.ljust(9, "0")[:9])


def _groups(m: re.Match[str]) -> dict[str, str | None]:
    """A line's fields, whichever layout matched."""
    names = ("comm", "tid", "tgid", "cpu", "flags", "ts", "frac", "event", "text")
    if m["tid"] is not None:
        return {k: m[k] for k in names}
    if m["ltid"] is not None:
        return {k: (m["l" + k] if k != "tgid" else None) for k in names}
    return {k: (m["p" + k] if k != "flags" else None) for k in names}


@dataclass
class FtraceReport:
    """What the reader saw, beyond the events: for the notes of check, stats and trace."""

    export: bool = False  # an apf-emu export (whole from its start), not a real recording
    lines: int = 0
    events: int = 0  # lines that were events of any tracepoint
    apf_events: int = 0  # ... of the APF tracepoints and kvm_msr
    other_events: int = 0  # events of other tracepoints (sched_switch, print markers, ...): skipped
    lost: int = 0  # LOST EVENTS / buffer-started notes: the trace has holes there
    formats: set[str] = field(default_factory=set)  # "tracepoint: kernels" of the formats met
    bad: list[str] = field(default_factory=list)  # "name:line: why"
    tgid: bool = False  # some line had a tgid column
    unmatched_completions: int = 0
    backwards: int = 0  # lines earlier than the line before them: sorted by time before they are judged


@dataclass
class _Thread:
    comm: str
    vm: str
    vcpu: int | None
    tgid: str | None = None  # its process, where the trace has a tgid column
    pending_try: tuple[int, int] | None = None  # (gva, gfn) of its last kvm_try_async_get_page
    from_token: bool = False  # its vCPU was taken from a token (not from the comm)


class FtraceReader:
    """Turns the lines of one trace file into apf-emu host events, in the file's order."""

    def __init__(self, name: str, report: FtraceReport | None = None, *, scoped: bool = False) -> None:
        self.name = name
        # One of several traces read together: its pids name VMs of its own host (another trace's pid 2201 is
        # another process), so its VMs are "<name>:<pid>". An export's VMs keep their names (they are apf-emu's).
        self._scope = f"{name}:" if scoped else ""
        self.report = report if report is not None else FtraceReport()
        self._threads: dict[int, _Thread] = {}
        self._export_threads: dict[int, tuple[str, int]] = {}
        self._awaiting_completion: dict[int, deque[tuple[str, int | None, int | None]]] = {}  # gva -> (vm, vcpu, token)
        self._last_ns = 0
        self._started = False
        self.export = False  # this file is an apf-emu export (its header said so)

    def _bad(self, number: int, why: str) -> None:
        self.report.bad.append(f"{self.name}:{number}: {why}")

    def events(self, lines: Iterable[tuple[int, str]]) -> Iterator[Event]:
        for number, raw in lines:
            self.report.lines += 1
            line = raw.rstrip("\n")
            m = LINE.match(line)
            if m is None:
                found = list(self._not_an_event(number, line))
            else:
                self.report.events += 1
                ev = self._event(number, _groups(m))
                found = [] if ev is None else [ev]
            if found and not self._started:
                self._started = True
                # What the checker judges depends on the input: a real trace or apf-emu's own export.
                yield {"event": "ftrace_start", "role": "host", "vm": None, "vcpu": None, "boot": None,
                       "mono_ns": -1, "source": "ftrace", "line": number,  # before any line, sorted
                       "export": self.export}
            yield from found

    def _not_an_event(self, number: int, line: str) -> Iterator[Event]:
        if EXPORT_HEADER.match(line):
            self.export = self.report.export = True
        elif line.startswith(EXPORT_EVENT):
            ev = self._state_event(number, line.removeprefix(EXPORT_EVENT))
            if ev is not None:
                yield ev
        elif (t := EXPORT_THREAD.match(line)) is not None:
            self._export_threads[int(t["tid"])] = (t["vm"], int(t["vcpu"]))
        elif LOST.match(line):
            self.report.lost += 1
            self._awaiting_completion.clear()
            # Events are missing from here: the checker forgets what it knew of this trace's VMs (as at its start).
            vms = {th.vm for th in self._threads.values()} | {vm for vm, _ in self._export_threads.values()}
            yield {"event": "ftrace_lost", "role": "host", "vm": None, "vcpu": None, "boot": None,
                   "mono_ns": self._last_ns, "source": "ftrace", "line": number, "note": line.strip(),
                   "vms": sorted(vms)}
        elif not HEADER.match(line):
            self._bad(number, f"not an ftrace line: {line[:80]!r}")

    def _state_event(self, number: int, text: str) -> Event | None:
        """An export's `# apf-emu event` line: a host event of STATE_EVENTS, with the fields the checker reads typed
        as its logs have them (anything else in the line is bad input, reported and skipped)."""
        try:
            ev = orjson.loads(text)
        except orjson.JSONDecodeError as e:
            self._bad(number, f"apf-emu event: not JSON ({e})")
            return None
        if not isinstance(ev, dict) or not isinstance(ev.get("event"), str) or ev["event"] not in STATE_EVENTS:
            self._bad(number, f"apf-emu event: not one of {', '.join(sorted(STATE_EVENTS))}: {text[:80]!r}")
            return None
        ns, vcpu = ev.get("mono_ns"), ev.get("vcpu")
        wrong = [k for k in COUNT_FIELDS if ev.get(k) is not None and not _count(ev[k])]
        if not _count(ns) or not (vcpu is None or (_count(vcpu) and vcpu <= TOKEN_VCPU_MASK)) or wrong:
            self._bad(number, f"apf-emu event {ev['event']}: {', '.join(wrong) or 'mono_ns or vcpu'} is not a "
                      f"count: {text[:80]!r}")
            return None
        self._last_ns = max(self._last_ns, ev["mono_ns"])
        ev.update(role="host", source="ftrace", line=number)
        if ev.get("vm") is not None:
            ev["vm"] = str(ev["vm"])
        return ev

    def _thread(self, m: dict[str, str | None], tid: int) -> _Thread:
        comm = (m["comm"] or "").strip()
        tgid = m["tgid"] if m["tgid"] is not None and m["tgid"].isdigit() else None
        th = self._threads.get(tid)
        if th is not None and UNKNOWN_COMM in (comm, th.comm) and th.comm != comm \
                and (tgid is None or th.tgid is None or tgid == th.tgid):
            # The same thread, its name missed by the saved_cmdlines cache (__trace_find_cmdline) here or earlier
            # (a tgid column that names another process says it is a pid reused).
            if th.comm == UNKNOWN_COMM:
                th.comm = comm
                vcpu_m = VCPU_COMM.match(comm)
                if vcpu_m and th.vcpu is None:
                    th.vcpu = int(vcpu_m[1])
            return th
        if th is None or th.comm != comm or (tgid is not None and th.tgid is not None and tgid != th.tgid):
            # a new thread (or a pid reused by another comm or process)
            vcpu_m = VCPU_COMM.match(comm)
            vcpu = int(vcpu_m[1]) if vcpu_m else None
            if tgid is not None:
                self.report.tgid = True
                vm = self._scope + tgid
            elif tid in self._export_threads:
                vm, vcpu = self._export_threads[tid]
            else:
                vm = f"{self._scope}tid{tid}"
            th = self._threads[tid] = _Thread(comm, vm, vcpu, tgid)
        return th

    def _event(self, number: int, m: dict[str, str | None]) -> Event | None:
        tracepoint = (m["event"] or "").removeprefix("kvm:")
        if tracepoint not in APF_TRACEPOINTS:
            self.report.other_events += 1
            return None
        text = m["text"] or ""
        parsed = parse_printk(tracepoint, text)
        if parsed is None:
            self._bad(number, f"{tracepoint}: no known format matches {text[:80]!r}")
            return None
        fmt, fields = parsed
        self.report.apf_events += 1
        self.report.formats.add(f"{fmt.tracepoint} ({fmt.kernels})")
        tid = int(m["tid"] or 0)
        ns = timestamp_ns(m["ts"] or "0", m["frac"] or "0")
        if ns < self._last_ns:
            self.report.backwards += 1  # per-CPU buffers not merged by time, or a clock not global across CPUs
        self._last_ns = max(self._last_ns, ns)
        th = self._thread(m, tid)
        ev: Event = {"event": fmt.event, "mono_ns": ns, "role": "host", "vm": th.vm, "vcpu": th.vcpu, "boot": None,
                     "pid": tid, "source": "ftrace", "line": number, "comm": th.comm, "cpu": int(m["cpu"] or 0)}
        if fmt.event == "kvm_msr":
            return self._msr(ev, fields)
        if fmt.event == "kvm_async_pf_completed":
            return self._completed(ev, fields)
        ev.update({k: v for k, v in fields.items() if v is not None})
        token = fields.get("token")
        if fmt.event in ("kvm_async_pf_not_present", "kvm_async_pf_ready") and isinstance(token, int) \
                and token != KVM_APF_WAKE_ALL_TOKEN and th.vcpu is None:
            th.vcpu = ev["vcpu"] = token & TOKEN_VCPU_MASK  # a VMM whose vCPU threads are not "CPU n/KVM"
            th.from_token = True
        elif isinstance(token, int) and token != KVM_APF_WAKE_ALL_TOKEN and not th.from_token:
            # QEMU's "CPU n/KVM" is its cpu_index; tokens carry KVM's vcpu_id (the APIC ID): the first token wins
            th.vcpu = ev["vcpu"] = token & TOKEN_VCPU_MASK
            th.from_token = True
        if fmt.event == "kvm_try_async_get_page" and "gfn" in fields:
            th.pending_try = (int(ev["gva"]), int(ev["gfn"]))
        elif fmt.event == "kvm_async_pf_not_present":
            gva = int(ev["gva"])
            if th.pending_try is not None and th.pending_try[0] == gva:
                ev["gfn"] = th.pending_try[1]
            th.pending_try = None
            # One item per gfn and vCPU at a time (kvm_find_async_pf_gfn): an older one of this vCPU is over.
            waiting = self._awaiting_completion.setdefault(gva, deque())
            for entry in [e for e in waiting if e[:2] == (th.vm, th.vcpu)]:
                waiting.remove(entry)
            waiting.append((th.vm, th.vcpu, ev.get("token")))
        elif fmt.event == "kvm_async_pf_repeated_fault":
            th.pending_try = None
        return ev

    def _completed(self, ev: Event, fields: dict[str, int | str | None]) -> Event:
        """A kworker's completion: given to the oldest not-present of its gva still without one."""
        gva = int(fields["gva"] or 0)
        ev.update({k: v for k, v in fields.items() if v is not None})
        waiting = self._awaiting_completion.get(gva)
        owner = self._export_threads.get(int(ev["pid"]))  # an export's kworker says whose completion it is
        if waiting and owner is not None:
            mine = [e for e in waiting if e[:2] == owner]
            waiting = deque(mine[:1]) if mine else None
            if mine:
                self._awaiting_completion[gva].remove(mine[0])
        elif waiting:
            waiting = deque([waiting.popleft()])
        if waiting:
            vm, vcpu, token = waiting.popleft()
            ev.update(vm=vm, vcpu=vcpu, worker=ev["comm"])
            if token is not None:
                ev["token"] = token
        else:
            self.report.unmatched_completions += 1
            ev.update(vm=None, vcpu=None)
        return ev

    def _msr(self, ev: Event, fields: dict[str, int | str | None]) -> Event | None:
        msr = int(fields["msr"] or 0)
        if msr not in APF_MSRS:
            self.report.apf_events -= 1
            self.report.other_events += 1
            return None
        value = int(fields["value"] or 0)
        if fields["direction"] != "write":
            return None  # a read changes nothing
        gp = fields["gp"] is not None
        if msr == MSR_KVM_ASYNC_PF_ACK and not gp:
            if not value & 1:
                return None  # kvm_set_msr_common: only bit 0 does anything
            ev.update(event="apf_ack", value=value)
            return ev
        ev.update(event="msr_write", msr=MSR_NAMES[msr], value=value, ok=not gp)
        if gp:
            ev["error"] = "#GP"
        return ev
