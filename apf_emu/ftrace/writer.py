# apf-emu logs as ftrace text: the host's events as the lines `trace-cmd report -t` prints for KVM's tracepoints
# (names, fields and TP_printk formats of today's kernels, apf_emu/ftrace/formats.py), so that scripts written
# for real hosts' traces read them; optional atrace markers so that Perfetto, which ignores tracepoints it does not
# know, draws the APFs.
#
# Layout (docs/TRACING.md):
#   cpus=<n>                                   trace-cmd's first line (Perfetto recognises the format by it)
#   # apf-emu ftrace export 1                  comments: skipped by Perfetto and by apf-emu's reader, which
#   # apf-emu thread <tid> vm <vm> vcpu <n>    takes from them which VM each thread is
#   # apf-emu event {<json>}                   a host event that has no tracepoint but changes what the checker
#                                              may expect (STATE_EVENTS), as its JSON log line, where it happened
#   <comm>-<tid> [<cpu>] <secs.nsecs>: <tracepoint>: <printk text>
# Threads are those of a real host: each vCPU a thread `CPU <n>/KVM` (QEMU's name); completions come from a kworker
# (async_pf_execute runs on the system workqueue), here one per vCPU so that the header can say whose completion it
# is (a real trace's kworker says nothing: apf_emu/ftrace/reader.py then matches by gva). Their tids are made up
# from the host daemon's pid, above PID_MAX_LIMIT so that they never collide with a real process's (the guests'
# markers carry their real pids).
# Timestamps are CLOCK_MONOTONIC in seconds with nanoseconds, as `trace-cmd report -t` prints them with
# `trace-cmd record -C mono`, so that latencies survive the round trip exactly.
#
# Mapped: kvm_try_async_get_page, kvm_async_pf_repeated_fault, kvm_async_pf_not_present, kvm_async_pf_ready,
# kvm_async_pf_completed, and kvm_msr for the writes of the APF MSRs (msr_write; apf_ack is the write of
# MSR_KVM_ASYNC_PF_ACK). A vCPU's connects and disconnects (a guest boot begins or ends: kvm_vcpu_reset eats its
# outstanding APFs), the events it dropped then, the host's ABI and a restarted host's restore have no tracepoint
# either, yet without them the read-back would keep a dead boot's APFs outstanding: they go in as comment lines,
# which trace-cmd-reading scripts and Perfetto skip. The host's other events (halts, synchronous faults) are left
# out. With markers, `tracing_mark_write` lines in atrace form add, on the VMM process, an async slice per
# APF from not-present to page-ready (S/F, cookie = token) and, on each guest process, an async slice per sleep
# from wait to wake and an instant (I) per boot, shutdown, crash, reboot, wake-all and dummy.
from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Final, TextIO

import orjson

from shared.abi import KVM_APF_WAKE_ALL_TOKEN, MSR_KVM_ASYNC_PF_ACK, MSR_NAMES

from ..logs import Event
from .formats import printk
from .reader import EXPORT_EVENT, STATE_EVENTS

EXPORT_VERSION: Final = 1
PID_MAX_LIMIT: Final = 4 * 1024 * 1024  # include/linux/threads.h, 64-bit: no real pid reaches it
KWORKER_COMM: Final = "kworker/u8:1"
TRACEPOINTS: Final = ("kvm_try_async_get_page", "kvm_async_pf_repeated_fault", "kvm_async_pf_not_present",
                      "kvm_async_pf_ready", "kvm_async_pf_completed")
MSR_NUMBERS: Final = {name: number for number, name in MSR_NAMES.items()}
GUEST_INSTANTS: Final = ("guest_boot", "guest_shutdown", "guest_crash", "guest_reboot", "guest_abort",
                         "guest_apf_wake_all", "guest_apf_dummy", "guest_panic")


@dataclass
class FtraceExport:
    lines: int = 0
    tracepoint_lines: int = 0
    marker_lines: int = 0
    state_lines: int = 0  # host events without a tracepoint written as `# apf-emu event` comments (STATE_EVENTS)
    skipped: int = 0  # the other host events, which have no tracepoint either: left out
    threads: dict[int, tuple[str, int]] = field(default_factory=dict)  # tid -> (vm, vcpu)


def line(comm: str, tid: int, cpu: int, ns: int, event: str, text: str) -> str:
    """One event as `trace-cmd report -t` prints it: trace_show_data's "%16s-%-5d [%03d]", " %5llu.%09llu:" and
    print_event_name's " %s: " padded to 20. Without the latency flags that trace-cmd 3.3 and later print by default:
    the layout of every earlier trace-cmd, which the scripts written against it (TRAPpy's pattern takes no flags or
    four) read."""
    return (f"{comm:>16}-{tid:<5} [{cpu:03d}] {ns // 1_000_000_000:5d}.{ns % 1_000_000_000:09d}: {event}: "
            f"{' ' * max(0, 20 - len(event))}{text}")


def _tracepoint(ev: Event) -> tuple[str, dict[str, int]] | None:
    """The tracepoint and its values for a host event, if it has one."""
    name = ev["event"]
    if name in TRACEPOINTS:
        v = {k: int(ev[k]) for k in ("token", "gva", "gfn", "address") if isinstance(ev.get(k), int)}
        v.setdefault("gva", 0)
        if name in ("kvm_try_async_get_page", "kvm_async_pf_repeated_fault") and "gfn" not in v:
            return None
        if name in ("kvm_async_pf_not_present", "kvm_async_pf_ready") and "token" not in v:
            return None
        v.setdefault("address", 0)
        return name, v
    if name == "msr_write":
        number = MSR_NUMBERS.get(str(ev.get("msr")))
        if number is None and isinstance(ev.get("msr"), str) and str(ev["msr"]).startswith("0x"):
            number = int(str(ev["msr"]), 16)
        if number is None or not isinstance(ev.get("value"), int):
            return None
        return "kvm_msr", {"write": 1, "msr": number, "value": int(ev["value"]), "gp": int(not ev.get("ok", True))}
    if name == "apf_ack" and isinstance(ev.get("value"), int):
        return "kvm_msr", {"write": 1, "msr": MSR_KVM_ASYNC_PF_ACK, "value": int(ev["value"]), "gp": 0}
    return None


def export(events: Iterable[Event], out: TextIO, *, markers: bool = True) -> FtraceExport:
    """Write the events (merged apf-emu logs, in order) as ftrace text."""
    stats = FtraceExport()
    body: list[str] = []
    vcpus: set[int] = set()
    for text in _lines(events, stats, vcpus, markers):
        body.append(text)
    head = [f"cpus={max(1, len(vcpus))}", f"# apf-emu ftrace export {EXPORT_VERSION}",
            "# host events as KVM's tracepoints (trace-cmd report -t); "
            + ("guest events as atrace markers (tracing_mark_write)" if markers else "no markers")]
    head += [f"# apf-emu thread {tid} vm {vm} vcpu {vcpu}" for tid, (vm, vcpu) in sorted(stats.threads.items())]
    for text in (*head, *body):
        out.write(text + "\n")
    stats.lines = len(head) + len(body)
    return stats


def _lines(events: Iterable[Event], stats: FtraceExport, vcpus: set[int], markers: bool) -> Iterator[str]:
    slices: set[tuple[Any, Any, int]] = set()  # host APF slices open: (vm, vcpu, token)
    for ev in events:
        role = ev.get("role")
        if role == "host":
            yield from _host(ev, stats, vcpus, markers, slices)
        elif role == "guest" and markers:
            yield from _guest(ev, stats)


def _host(ev: Event, stats: FtraceExport, vcpus: set[int], markers: bool,
          slices: set[tuple[Any, Any, int]]) -> Iterator[str]:
    if ev["event"] in STATE_EVENTS:
        stats.state_lines += 1
        yield EXPORT_EVENT + orjson.dumps(ev).decode()
        return
    tp = _tracepoint(ev)
    vcpu, pid, ns = ev.get("vcpu"), ev.get("pid"), int(ev["mono_ns"])
    if tp is None or not isinstance(vcpu, int) or not isinstance(pid, int):
        stats.skipped += 1
        return
    name, values = tp
    vcpus.add(vcpu)
    base = PID_MAX_LIMIT + pid * 8192
    if name == "kvm_async_pf_completed":
        comm, tid, cpu = KWORKER_COMM, base + 4096 + vcpu, 0
    else:
        comm, tid, cpu = f"CPU {vcpu}/KVM", base + vcpu, vcpu
    stats.threads[tid] = (str(ev.get("vm")), vcpu)
    stats.tracepoint_lines += 1
    yield line(comm, tid, cpu, ns, name, printk(name, **values))
    token = values.get("token")
    if not markers or token is None or token == KVM_APF_WAKE_ALL_TOKEN:
        return
    key = (ev.get("vm"), vcpu, token)
    if name == "kvm_async_pf_not_present":
        slices.add(key)
        stats.marker_lines += 1
        yield line(comm, tid, cpu, ns, "tracing_mark_write", f"S|{pid}|APF vcpu {vcpu}|{token}")
    elif name == "kvm_async_pf_ready" and key in slices:
        slices.discard(key)
        stats.marker_lines += 1
        yield line(comm, tid, cpu, ns, "tracing_mark_write", f"F|{pid}|APF vcpu {vcpu}|{token}")


def _guest(ev: Event, stats: FtraceExport) -> Iterator[str]:
    pid, vcpu, name, ns = ev.get("pid"), ev.get("vcpu"), ev["event"], int(ev["mono_ns"])
    if not isinstance(pid, int) or not isinstance(vcpu, int):
        return
    comm = f"apf-guest-{vcpu}"
    token = ev.get("token")
    if name == "guest_apf_wait" and isinstance(token, int):
        text = f"S|{pid}|sleep task {ev.get('task')}|{token}"
    elif name == "guest_apf_wake" and isinstance(token, int) and not ev.get("all"):
        text = f"F|{pid}|sleep task {ev.get('task')}|{token}"
    elif name in GUEST_INSTANTS:
        detail = f" {token:#x}" if isinstance(token, int) else ""
        text = f"I|{pid}|{name.removeprefix('guest_')}{detail} (boot {ev.get('boot')})"
    else:
        return
    stats.marker_lines += 1
    yield line(comm, pid, vcpu, ns, "tracing_mark_write", text)
