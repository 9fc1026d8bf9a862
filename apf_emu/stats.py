# Statistics over merged logs: event counts, APF versus synchronous faults, data checks, and latency histograms
# (hdrhistogram, microseconds) of the APF cycle, joined across processes by (vm, vcpu, token).
from __future__ import annotations

from collections import Counter, deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from hdrh.histogram import HdrHistogram

from shared.abi import KVM_APF_WAKE_ALL_TOKEN

from .logs import Event

# (from event, to event): each a (role, event name)
LATENCIES = {
    "not_present_to_completed": ("kvm_async_pf_not_present", "kvm_async_pf_completed"),
    "completed_to_ready": ("kvm_async_pf_completed", "kvm_async_pf_ready"),
    "ready_to_wake": ("kvm_async_pf_ready", "guest_apf_wake"),
    "ready_to_ack": ("kvm_async_pf_ready", "apf_ack"),
    "completed_to_wake": ("kvm_async_pf_completed", "guest_apf_wake"),
    "not_present_to_wake": ("kvm_async_pf_not_present", "guest_apf_wake"),
}


# The interleavings the seed thread worries about, recognised in the logs (guest_agent/cpu.py names the contexts).
INTERLEAVINGS = {
    "ready_between_pf_and_flags": "a page-ready arrived after a not-present #PF was injected and before the guest "
    "read `flags`",
    "ready_while_irqs_off": "a page-ready arrived while the guest had interrupts off",
    "back_to_back_readies": "a page-ready arrived while the handler of the previous one was still running",
    "wake_all_raced_not_present": "a wake-all woke a task whose own page-ready had not come (its completion was "
    "eaten by a disable)",
    "signals_coalesced": "a vector was raised again while still pending and taken once",
}


# The `pf` ABI's races, as the logs name them: the guest's ground truth (guest_pf_race, by kind) and what the host
# itself did with an unread `reason` (docs/LOGGING.md).
RACE_EVENTS = ("reason_overwritten", "apf_cancel", "kvm_multiple_exception")


# Lookups of feed, made once: the events each latency ends at (with the event it starts at), the events stamped for
# a later one (latency starts), those with more to them than a count, and the ACKs.
_ENDING: dict[str, list[tuple[str, str]]] = {
    end: [(lat, start) for lat, (start, b) in LATENCIES.items() if b == end] for _a, end in LATENCIES.values()}
_STARTS = frozenset(a for a, _b in LATENCIES.values())
_STAMPED = _STARTS | frozenset(_ENDING)
_SPECIAL = frozenset({"guest_irq_pending", "guest_apf_wake", "kvm_async_pf_not_present", "kvm_async_pf_ready",
                      "apf_ready_dropped", "vcpu_connect", "vcpu_disconnect", "guest_pf_race", *RACE_EVENTS,
                      "host_ready", "apf_sync_fault", "apf_halt", "guest_shutdown"})
_ACKS = frozenset({"apf_ack", "guest_apf_irq_ignored", "guest_apf_slot_cleared"})


def _histogram() -> HdrHistogram:
    return HdrHistogram(1, 60_000_000, 3)  # 1 µs .. 60 s


@dataclass
class Stats:
    events: Counter[str] = field(default_factory=Counter)
    per_vcpu: dict[str, Counter[str]] = field(default_factory=dict)
    _histograms: dict[str, HdrHistogram] = field(default_factory=lambda: {k: _histogram() for k in LATENCIES})
    _pending: dict[str, Counter[int]] = field(default_factory=lambda: {k: Counter() for k in LATENCIES})  # µs -> n
    sync_reasons: Counter[str] = field(default_factory=Counter)
    halt_reasons: Counter[str] = field(default_factory=Counter)  # the artificial halt: kernel_mode, repeated_fault..
    not_injected: int = 0  # not-presents of the halt path (traced by KVM, never injected)
    readies_not_injected: int = 0  # their kvm_async_pf_ready (and those of events whose APF was turned off)
    dropped_reasons: Counter[str] = field(default_factory=Counter)
    data_checks: int = 0
    data_check_failures: int = 0
    interleavings: Counter[str] = field(default_factory=Counter)
    races: Counter[str] = field(default_factory=Counter)  # `pf`: guest_pf_race kinds and the host's RACE_EVENTS
    abis: set[str] = field(default_factory=set)  # the ABIs of the hosts whose logs these are (host_ready)
    outstanding: Counter[str] = field(default_factory=Counter)  # vCPU -> not-present events not yet settled
    outstanding_max: Counter[str] = field(default_factory=Counter)  # vCPU -> high-water mark
    first_ns: int | None = None
    last_ns: int | None = None
    _stamps: dict[tuple[Any, Any, Any, str], int] = field(default_factory=dict)
    _unacked: dict[tuple[Any, Any], deque[int]] = field(default_factory=dict)  # vCPU -> ready times, oldest first
    _columns: dict[tuple[Any, Any], tuple[str, Counter[str]]] = field(default_factory=dict)  # (vm, vcpu) -> column

    def feed(self, ev: Event) -> None:
        if ev.get("role") == "harness":  # the settings line of run or chaos: not an event of the VM
            return
        name = ev["event"]
        if name.startswith("ftrace_"):  # a trace's own markers (ftrace_start comes at -1, before every line)
            return
        t = ev["mono_ns"]
        if self.first_ns is None:
            self.first_ns = t
        self.last_ns = t
        self.events[name] += 1
        key = (ev.get("vm"), ev.get("vcpu"))
        column = self._columns.get(key)
        if column is None:  # the host's lines of no vCPU: column "host"
            vkey = f"{key[0]}/{'host' if key[1] is None else key[1]}"
            column = self._columns[key] = (vkey, self.per_vcpu.setdefault(vkey, Counter()))
        vkey, counts = column
        counts[name] += 1
        token = ev.get("token")
        if name in _SPECIAL:
            self._special(ev, name, key, vkey, token)
        if ev.get("source") == "ftrace":
            if self._ftrace_ack(name, key, t, token):
                return
        elif name in _ACKS:
            readies = self._unacked.get(key)
            if readies:  # ACKs answer injected page-readies in order
                ready_ns = readies.popleft()
                if name == "apf_ack":
                    self._record("ready_to_ack", t - ready_ns)
                elif name == "guest_apf_slot_cleared":
                    readies.clear()  # released without an ACK (--online-clears-token)
            return  # (a handler that ran with APF off took its page-ready and ACKs nothing)
        if name == "kvm_async_pf_ready" and ev.get("injected") is not False and ev.get("source") != "ftrace":
            unacked = self._unacked.get(key)
            if unacked is None:
                unacked = self._unacked[key] = deque()
            unacked.append(t)
        if token is None or token == KVM_APF_WAKE_ALL_TOKEN or name not in _STAMPED:
            return
        stamps = self._stamps
        for lat, start_name in _ENDING.get(name, ()):
            start = stamps.get((key[0], key[1], token, start_name))
            if start is not None:
                self._record(lat, t - start)
        if name == "guest_apf_wake":
            for a in _STARTS:
                stamps.pop((key[0], key[1], token, a), None)
        else:
            stamps[(key[0], key[1], token, name)] = t

    def _special(self, ev: Event, name: str, key: tuple[Any, Any], vkey: str, token: Any) -> None:
        """What the counts, interleavings, races and outstanding APFs take from the events of _SPECIAL."""
        if name == "guest_irq_pending":
            context = str(ev.get("context"))
            if "pf_injected" in context or "pf_entry" in context:
                self.interleavings["ready_between_pf_and_flags"] += 1
            if "irq_off" in context or "if=0" in context:
                self.interleavings["ready_while_irqs_off"] += 1
            if "irq_handler" in context:
                self.interleavings["back_to_back_readies"] += 1
        elif name == "guest_apf_wake" and ev.get("all") and token != KVM_APF_WAKE_ALL_TOKEN:
            self.interleavings["wake_all_raced_not_present"] += 1
        if name == "kvm_async_pf_not_present":
            self.outstanding[vkey] += 1
            if self.outstanding[vkey] > self.outstanding_max[vkey]:
                self.outstanding_max[vkey] = self.outstanding[vkey]
        elif name in ("kvm_async_pf_ready", "apf_ready_dropped") and token != KVM_APF_WAKE_ALL_TOKEN:
            self.outstanding[vkey] = max(0, self.outstanding[vkey] - 1)
        elif name in ("vcpu_connect", "vcpu_disconnect"):
            self.outstanding[vkey] = 0
            self._unacked.pop(key, None)
        if name == "guest_pf_race":
            self.races[str(ev.get("kind"))] += 1
        elif name in RACE_EVENTS:
            self.races[name] += 1
        elif name == "host_ready" and isinstance(ev.get("abi"), str):
            self.abis.add(ev["abi"])
        if name == "apf_sync_fault":
            self.sync_reasons[str(ev.get("reason"))] += 1
        elif name == "apf_halt":
            self.halt_reasons[str(ev.get("reason"))] += 1
        elif name == "kvm_async_pf_not_present" and ev.get("injected") is False:
            self.not_injected += 1
        elif name == "kvm_async_pf_ready" and ev.get("injected") is False:
            self.readies_not_injected += 1
        elif name == "apf_ready_dropped":
            self.dropped_reasons[str(ev.get("reason"))] += 1
        if name == "guest_shutdown":
            self.data_checks += int(ev.get("data_checks", 0))
            self.data_check_failures += int(ev.get("data_check_failures", 0))
            self.interleavings["signals_coalesced"] += int(ev.get("coalesced", 0))

    def _ftrace_ack(self, name: str, key: tuple[Any, Any], t: int, token: Any) -> bool:
        """ready_to_ack on ftrace text, which cannot tell an injected page-ready from the halt path's (traced, not
        injected): an ACK answers the latest page-ready of its vCPU before it (one is delivered at a time). True
        for the ACK, which is done with here."""
        if name == "kvm_async_pf_ready":
            self._unacked[key] = deque([t])
        elif name == "apf_ack":
            readies = self._unacked.pop(key, None)
            if readies:
                self._record("ready_to_ack", t - readies[0])
            return True
        return False

    def _record(self, lat: str, ns: int) -> None:
        # counted here, put into the histogram when it is read: one record_value per distinct µs value
        self._pending[lat][max(1, min(ns // 1000, 60_000_000))] += 1

    @property
    def latency(self) -> dict[str, HdrHistogram]:
        """The latency histograms (µs), with everything fed so far."""
        for lat, pending in self._pending.items():
            if pending:
                h = self._histograms[lat]
                for us, n in pending.items():
                    h.record_value(us, n)
                pending.clear()
        return self._histograms

    @property
    def apfs(self) -> int:
        """Async page faults whose not-present #PF was injected."""
        return self.events["kvm_async_pf_not_present"] - self.not_injected

    @property
    def page_readies(self) -> int:
        """Page-readies injected (wake-alls included): interrupts, or #PFs on `pf`."""
        return self.events["kvm_async_pf_ready"] - self.readies_not_injected

    @property
    def halts(self) -> int:
        """Artificial halts (KVM_REQ_APF_HALT): a fault the guest could not be told about, or a repeated one."""
        return self.events["apf_halt"]

    @property
    def sync_faults(self) -> int:
        return self.events["apf_sync_fault"]

    @property
    def seconds(self) -> float:
        if self.first_ns is None or self.last_ns is None:
            return 0.0
        return (self.last_ns - self.first_ns) / 1e9

    def percentiles(self, lat: str) -> dict[str, float]:
        h = self.latency[lat]
        if h.get_total_count() == 0:
            return {"count": 0}
        return {
            "count": h.get_total_count(),
            "p50_us": h.get_value_at_percentile(50),
            "p90_us": h.get_value_at_percentile(90),
            "p99_us": h.get_value_at_percentile(99),
            "max_us": h.get_max_value(),
        }


def collect(events: Iterable[Event]) -> Stats:
    stats = Stats()
    for ev in events:
        stats.feed(ev)
    return stats
