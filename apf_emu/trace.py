# Chrome Trace Event JSON from apf-emu logs, for Perfetto UI (ui.perfetto.dev) and chrome://tracing.
#
# Layout (pids and tids are small integers; `M` metadata events give them names):
# - one process per VM host ("host <vm>"), one thread per vCPU ("vcpu N"): instants for not-present, completion,
#   ACK, synchronous faults, dropped completions, connects and disconnects, and a 1 µs slice for each page-ready
#   so that flow arrows can start from it;
# - one process per guest vCPU boot ("guest <vm> vcpu N boot B"), one thread per guest task ("task T") plus a
#   "kernel" thread: on a task's thread, a slice per APF from the host's not-present (or the guest's wait, if the
#   host's log is missing) to the guest's wake, and a 1 µs "wake" slice right after it where the flow from the
#   host's page-ready ends; boots, shutdowns and interrupts that had to wait are instants on the kernel thread.
# A task waits on one token at a time, so its slices never overlap; every slice is an `X` (complete) event with a
# duration, timestamps are microseconds since the first event (floats, so nanoseconds survive), and each flow is one
# `s` and one `f` sharing an id, a name and a category (Perfetto's v1 flow binding), the `f` binding to the
# enclosing slice ("bp": "e").
from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from shared.abi import KVM_APF_WAKE_ALL_TOKEN

from .logs import Event

HOST_INSTANTS = {
    "kvm_async_pf_not_present": "not-present",
    "kvm_async_pf_completed": "completed",
    "kvm_async_pf_repeated_fault": "repeated fault",
    "apf_ack": "ACK",
    "apf_sync_fault": "sync fault",
    "apf_ready_dropped": "completion dropped",
    "vcpu_connect": "connect",
    "vcpu_disconnect": "disconnect",
    "vcpu_restore": "restore",
    "host_ready": "host start",
    "msr_write": "wrmsr",
    "wire_error": "wire error",
}
GUEST_INSTANTS = {
    "guest_boot": "boot",
    "guest_shutdown": "shutdown",
    "guest_crash": "crash (panic)",
    "guest_reboot": "reboot",
    "guest_abort": "abort (the host went away for good)",
    "guest_reconnect": "reconnect",
    "guest_panic": "panic",
    "guest_apf_reinit": "APF re-init",
    "guest_apf_wake_all": "wake-all",
    "guest_apf_dummy": "dummy",
    "guest_irq_pending": "interrupt pending",
    "guest_data_check": "data check",
    "guest_drain_timeout": "drain timeout",
}
FLOW_CAT = "apf"
FLOW_NAME = "page-ready"
SLICE_US = 1.0


class TraceBuilder:
    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        self._pids: dict[tuple[Any, ...], int] = {}
        self._tids: dict[tuple[int, Any], int] = {}
        self._t0: int | None = None
        self._np_ns: dict[tuple[Any, Any, int], int] = {}  # (vm, vcpu, token) -> host not-present mono_ns
        self._wait: dict[tuple[Any, Any, Any, Any], tuple[int, int]] = {}  # (vm, vcpu, boot, task) -> (token, ns)
        self._flow_ids: dict[tuple[Any, Any, int], int] = {}  # (vm, vcpu, token) -> flow id of its page-ready
        self._next_flow = 1

    # --- ids -----------------------------------------------------------------------------------------------------
    def _pid(self, key: tuple[Any, ...], name: str) -> int:
        pid = self._pids.get(key)
        if pid is None:
            pid = self._pids[key] = len(self._pids) + 1
            self.events.append({"name": "process_name", "ph": "M", "pid": pid, "tid": 0, "args": {"name": name}})
            self.events.append({"name": "process_sort_index", "ph": "M", "pid": pid, "tid": 0,
                                "args": {"sort_index": pid}})
        return pid

    def _tid(self, pid: int, key: Any, name: str) -> int:
        tid = self._tids.get((pid, key))
        if tid is None:
            tid = self._tids[(pid, key)] = len([k for k in self._tids if k[0] == pid]) + 1
            self.events.append({"name": "thread_name", "ph": "M", "pid": pid, "tid": tid, "args": {"name": name}})
        return tid

    def _us(self, ns: int) -> float:
        assert self._t0 is not None
        return (ns - self._t0) / 1000.0

    # --- events --------------------------------------------------------------------------------------------------
    def feed(self, ev: Event) -> None:
        ns = ev["mono_ns"]
        if self._t0 is None:
            self._t0 = ns
        if ev.get("role") == "host":
            self._host(ev, ns)
        elif ev.get("role") == "guest":
            self._guest(ev, ns)

    def _host(self, ev: Event, ns: int) -> None:
        vm, vcpu, name = ev.get("vm"), ev.get("vcpu"), ev["event"]
        token = ev.get("token")
        if name == "kvm_async_pf_not_present" and isinstance(token, int):
            self._np_ns[(vm, vcpu, token)] = ns
        if name not in HOST_INSTANTS and name != "kvm_async_pf_ready":
            return  # nothing drawn: no track for it either (a trace's ftrace_start, say)
        pid = self._pid(("host", vm), f"host {vm}")
        tid = self._tid(pid, vcpu, f"vcpu {vcpu}" if vcpu is not None else "daemon")
        if name == "kvm_async_pf_ready" and isinstance(token, int):
            ts = self._us(ns)
            self.events.append({"name": "page-ready", "cat": "host", "ph": "X", "ts": ts, "dur": SLICE_US,
                                "pid": pid, "tid": tid, "args": _args(ev)})
            if token != KVM_APF_WAKE_ALL_TOKEN:  # a wake-all wakes many tasks: an arrow to each would be noise
                flow = self._flow_ids[(vm, vcpu, token)] = self._next_flow
                self._next_flow += 1
                self.events.append({"name": FLOW_NAME, "cat": FLOW_CAT, "ph": "s", "id": flow, "ts": ts,
                                    "pid": pid, "tid": tid})
            return
        label = HOST_INSTANTS.get(name)
        if label is not None:
            self.events.append({"name": label, "cat": "host", "ph": "i", "s": "t", "ts": self._us(ns),
                                "pid": pid, "tid": tid, "args": _args(ev)})

    def _guest(self, ev: Event, ns: int) -> None:
        vm, vcpu, boot, name = ev.get("vm"), ev.get("vcpu"), ev.get("boot"), ev["event"]
        pid = self._pid(("guest", vm, vcpu, boot), f"guest {vm} vcpu {vcpu} boot {boot}")
        task = ev.get("task")
        token = ev.get("token")
        if name == "guest_apf_wait" and isinstance(token, int):
            self._wait[(vm, vcpu, boot, task)] = (token, ns)
            return
        if name == "guest_apf_wake" and isinstance(token, int):
            tid = self._tid(pid, ("task", task), f"task {task}")
            waited = self._wait.pop((vm, vcpu, boot, task), None)
            start = self._np_ns.pop((vm, vcpu, token), None) or (waited[1] if waited else ns)
            ts = self._us(start)
            self.events.append({"name": f"APF {token:#x}", "cat": "guest", "ph": "X", "ts": ts,
                                "dur": max(0.0, self._us(ns) - ts), "pid": pid, "tid": tid, "args": _args(ev)})
            wake_ts = self._us(ns)
            self.events.append({"name": "wake", "cat": "guest", "ph": "X", "ts": wake_ts, "dur": SLICE_US,
                                "pid": pid, "tid": tid, "args": {"all": ev.get("all")}})
            flow = None if ev.get("all") else self._flow_ids.pop((vm, vcpu, token), None)
            if flow is not None:
                self.events.append({"name": FLOW_NAME, "cat": FLOW_CAT, "ph": "f", "bp": "e", "id": flow,
                                    "ts": wake_ts, "pid": pid, "tid": tid})
            return
        label = GUEST_INSTANTS.get(name)
        if label is not None:
            tid = self._tid(pid, "kernel", "kernel")
            self.events.append({"name": label, "cat": "guest", "ph": "i", "s": "t", "ts": self._us(ns),
                                "pid": pid, "tid": tid, "args": _args(ev)})

    def result(self) -> dict[str, Any]:
        # Flows whose wake is not in the logs (a killed guest) would dangle: drop their starts.
        dangling = set(self._flow_ids.values())
        events = [e for e in self.events if not (e.get("ph") == "s" and e["id"] in dangling)]
        return {"traceEvents": events, "displayTimeUnit": "ns"}


def _args(ev: Event) -> dict[str, Any]:
    skip = {"event", "mono_ns", "timestamp", "level", "role", "vm", "vcpu", "boot", "pid"}
    return {k: v for k, v in ev.items() if k not in skip}


def build_trace(events: Iterable[Event]) -> dict[str, Any]:
    builder = TraceBuilder()
    for ev in events:
        builder.feed(ev)
    return builder.result()
