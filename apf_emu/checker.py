# The protocol checker: replays merged host and guest logs per VM, vCPU and guest boot, and reports every broken
# invariant with the event that broke it and the events just before it on that vCPU.
#
# This is the one implementation of each invariant: `apf-emu run` uses it for its exit status, the tests use it on
# the logs of real runs. INVARIANTS documents them (docs/LOGGING.md lists the events they read).
#
# The ABI of each VM comes from the host's `host_ready` (shared/abis.py): on `pf` there is no token slot and no
# ACK, so a guest wake must match a page-ready #PF the host delivered and that no wake consumed yet, and
# one_unacked_ready does not apply.
from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Final

from shared.abi import (
    ASYNC_PF_PER_VCPU,
    KVM_APF_WAKE_ALL_TOKEN,
    MSR_KVM_ASYNC_PF_EN,
    MSR_KVM_ASYNC_PF_INT,
    MSR_NAMES,
    TOKEN_VCPU_BITS,
    AsyncPfEn,
    token_is_well_formed,
)

from .idset import TokenMap, TokenSet
from .logs import Event

RETRY_LOOP_LIMIT: Final = 32
APF_ID_MAX: Final = (1 << (32 - TOKEN_VCPU_BITS)) - 1  # a u32 token holds 20 bits of id

INVARIANTS: Final = {
    "token_format": "a not-present token is (id << 12) | vcpu, nonzero and not 0xffffffff; a ready token is that "
    "or 0xffffffff",
    "token_unique": "no token is handed out twice on one vCPU",
    "ready_after_not_present": "every page-ready (except wake-all) follows the not-present of its token on its vCPU",
    "ready_for_injected_only": "a page-ready interrupt is injected only for a not-present that was injected, or a "
    "wake-all (kvm_arch_async_page_present; a halted fault's ready is traced but not injected: bugzilla 208081)",
    "ready_once": "a token gets at most one page-ready",
    "one_unacked_ready": "a vCPU gets no page-ready while the guest has not released the previous one (its "
    "guest_apf_ack; for a guest that does not log, the host's own view: the `released` token of the next page-ready)",
    "delivered_while_disabled": "no not-present or page-ready is injected into a vCPU whose APF is not enabled "
    "(with DELIVERY_AS_INT) in the current boot",
    "outstanding_limit": f"at most {ASYNC_PF_PER_VCPU} async page faults (injected or halted) are outstanding per "
    "vCPU",
    "wake_matches_ready": "every guest wake (and wake-all) reads a token the host delivered as page-ready; an "
    "interrupt that finds the slot empty makes Linux insert a dummy for token 0",
    "wait_woken": "every task that sleeps on a token is woken before its boot shuts down cleanly or the log ends",
    "dummy_leak": "no dummy sleep-table entry is left when a boot shuts down cleanly (bugzilla 208081)",
    "data_check": "every verification of guest page contents passes",
    "guest_panic": "the guest never hits a condition on which Linux panics (async #PF with interrupts off, or in "
    "kernel mode)",
    "ready_latency": "a completed page-in is delivered as page-ready within the configured limit (default 1 s; "
    "`apf-emu check --ready-latency-limit MS`), counted from the prefault if its page had to be faulted in again",
    "stale_token": "no not-present or page-ready of an earlier boot reaches a later boot of the vCPU",
    "wait_matches_not_present": "every task that sleeps on a token sleeps on a not-present the host injected into "
    "its vCPU (a genuine #PF taken for an APF sleeps on a token nobody will wake)",
    "apf_as_genuine": "no APF #PF is taken for an ordinary page fault: no SIGSEGV or oops at an address that is a "
    "token the host delivered",
    "double_fault": "the host never queues a second #PF while one is pending (kvm_multiple_exception makes it a "
    "double fault; `pf` without its historical fixes)",
    "halt_spin": "a halted vCPU is not woken again and again with nothing to deliver (the host's kvm_hlt_spin: HLTs "
    "in a row that return at once because kvm_vcpu_has_events sees a done list that cannot be dequeued)",
    "retry_loop": f"no vCPU faults on one gfn more than {RETRY_LOOP_LIMIT} times in a row without completing an "
    "access to it (the endless retry of a page-in that keeps failing, Vivek Goyal 2020); judged for guests that log",
    "repeated_fault_outstanding": "kvm_async_pf_repeated_fault is traced only for a gfn whose page-in is "
    "outstanding on that vCPU (__kvm_faultin_pfn: kvm_find_async_pf_gfn; kvm_arch_async_page_present removes the "
    "gfn at page-ready); on a real trace, judged for gfns whose earlier fault the trace saw end",
    "completed_before_ready": "a page-ready (but a wake-all's) follows its page-in's kvm_async_pf_completed: apf-emu's "
    "host logs the completion before any exit can take it; KVM traces it in async_pf_execute after the kick, so a "
    "real trace may show it after the page-ready, and is not judged",
    "msr_order": "MSR_KVM_ASYNC_PF_INT is written before MSR_KVM_ASYNC_PF_EN enables delivery as an interrupt "
    "(Documentation/virt/kvm/x86/msr.rst; kvm_pv_enable_async_pf takes the vector as it is, 0 after reset); Linux "
    "writes it just before every enable (kvm_guest_cpu_init)",
}
# Which invariants each kind of input supports (apf_emu/ftrace/reader.py reads traces; docs/TRACING.md says why):
# apf-emu's own logs all; an apf-emu export of them as ftrace text what the host's tracepoints carry; a real
# host's trace (recorded mid-flight, without the guest's side, not_present traced on the halt path too) less.
TRACE_JUDGED: Final = frozenset({"token_format", "token_unique", "ready_after_not_present", "ready_once",
                                 "outstanding_limit", "repeated_fault_outstanding", "msr_order"})
JUDGED: Final = {
    "logs": frozenset(INVARIANTS),
    "export": TRACE_JUDGED | {"completed_before_ready"},
    "trace": TRACE_JUDGED,
}
INPUT_NAMES: Final = {"logs": "apf-emu logs", "export": "apf-emu's ftrace export", "trace": "a real host's trace"}
DEFAULT_READY_LATENCY_LIMIT_MS: Final = 1000.0

# Events that set what a whole VM is judged by (its ABI, the latency limit, the input kind, a trace's losses), as
# opposed to the state of one vCPU; apf-emu writes them with no vCPU (apf_emu/shards.py relies on it).
VM_WIDE_EVENTS: Final = frozenset({"host_ready", "harness_settings", "ftrace_start", "ftrace_lost"})

CONTEXT_EVENTS: Final = 6
EN_NAME: Final = MSR_NAMES[MSR_KVM_ASYNC_PF_EN]
INT_NAME: Final = MSR_NAMES[MSR_KVM_ASYNC_PF_INT]


@dataclass
class Violation:
    invariant: str
    message: str
    event: Event
    context: list[Event]
    # Where the replay was when it broke: (0, mono_ns of the event fed, vm, vcpu), or (1, 0, vm, vcpu) at the end
    # of the log, vm and vcpu each as (type name, str) so that only one key sorts the same. Checker.finish orders
    # by it, stably, so that a check split by vCPU (apf_emu/shards.py) gives the same list in the same order.
    order: tuple[int, int, str, str, str, str] = field(default=(0, 0, "", "", "", ""), compare=False, repr=False)
    key: tuple[Any, Any] = field(default=(None, None), compare=False, repr=False)  # (vm, vcpu) of the replay

    def as_dict(self) -> dict[str, Any]:
        return {"invariant": self.invariant, "message": self.message, "event": self.event, "context": self.context}


@dataclass
class _HostVcpu:
    vcpu: Any  # its id: the token sets hold (id << 12) | vcpu as runs of ids (apf_emu/idset.py)
    enabled: bool = False
    outstanding: dict[int, bool] = field(default_factory=dict)  # token -> its not-present was injected
    completed: dict[int, int] = field(default_factory=dict)  # token -> mono_ns of its completion
    seen: TokenSet = field(init=False)  # every token handed out (since the apf id last wrapped)
    readied: TokenSet = field(init=False)  # every token that got its page-ready
    unacked: int | None = None
    issued_boot: TokenMap[Any] = field(init=False)  # token -> the guest boot it was issued to
    faults_in_a_row: dict[int, int] = field(default_factory=dict)  # gfn -> not-presents since an access completed
    injected_np: set[int] = field(default_factory=set)  # not-presents injected and not yet slept on
    pf_ready: set[int] = field(default_factory=set)  # `pf`: page-ready #PFs delivered and not yet seen consumed
    gfns: dict[int, int] = field(default_factory=dict)  # outstanding token -> its gfn, where known
    done_gfns: set[int] = field(default_factory=set)  # gfns whose page-in the log saw end, not faulted since
    first_id: int | None = None  # a real trace: the apf id of the first not-present it holds for this vCPU
    last_id: int = 0  # the apf id of the last not-present
    int_written: bool = False  # MSR_KVM_ASYNC_PF_INT was written (or restored) since the vCPU's reset

    def __post_init__(self) -> None:
        self.seen = TokenSet(self.vcpu)
        self.readied = TokenSet(self.vcpu)
        self.issued_boot = TokenMap(self.vcpu)


@dataclass
class _GuestBoot:
    waits: dict[int, tuple[int, Event]] = field(default_factory=dict)  # task -> (token, wait event)
    dummies: set[int] = field(default_factory=set)
    ended: bool = False
    ended_by_disconnect: bool = False  # its connection ended first: a restored reconnect of the same boot reopens it


class Checker:
    def __init__(self, ready_latency_limit_ms: float | None = None) -> None:
        """`ready_latency_limit_ms`: None takes the limit the logs recorded (`harness_settings`, written by
        `apf-emu run` and `chaos` before they start anything), else DEFAULT_READY_LATENCY_LIMIT_MS."""
        self.limit_given = ready_latency_limit_ms is not None
        limit = ready_latency_limit_ms if ready_latency_limit_ms is not None else DEFAULT_READY_LATENCY_LIMIT_MS
        self.ready_latency_limit_ns = int(limit * 1e6)
        self.limit_source = "command line" if self.limit_given else "default"
        self.violations: list[Violation] = []
        self.events = 0
        self.protocol_events = 0  # events an invariant reads: 0 means nothing was checked at all
        self._host: dict[tuple[Any, Any], _HostVcpu] = {}
        self._boots: dict[tuple[Any, Any, Any], _GuestBoot] = {}
        self._current_boot: dict[tuple[Any, Any], Any] = {}
        self._context: dict[tuple[Any, Any], deque[Event]] = {}
        self._abi: dict[Any, str] = {}  # vm -> the ABI its host runs (host_ready)
        self._at: tuple[int, int, tuple[Any, Any]] = (0, 0, (None, None))  # see Violation.order
        self.input = "logs"  # what is read: "logs", or ftrace text, "export" or "trace" (ftrace_start says)
        self.judged: frozenset[str] = JUDGED["logs"]

    # --- driving -------------------------------------------------------------------------------------------------
    def check(self, events: Iterable[Event]) -> list[Violation]:
        for ev in events:
            self.feed(ev)
        return self.finish()

    def feed(self, ev: Event) -> None:
        self.events += 1
        key = (ev.get("vm"), ev.get("vcpu"))
        ns = ev.get("mono_ns")
        self._at = (0, ns if type(ns) is int else 0, key)
        ctx = self._context.get(key)
        if ctx is None:
            ctx = self._context[key] = deque(maxlen=CONTEXT_EVENTS)
        self._ev_ctx = ctx
        if ev.get("role") == "harness":
            self._harness(ev)
            return
        handler = (_HOST if ev.get("role") == "host" else _GUEST).get(ev["event"])
        if handler is not None:
            if not ev["event"].startswith("ftrace_"):  # a trace's own markers judge nothing
                self.protocol_events += 1
            handler(self, ev, key)
        ctx.append(ev)

    def finish(self) -> list[Violation]:
        """The violations, in the order of the replay: by the event fed when each broke (then by vCPU, stably),
        then those found at the end of the log."""
        for (vm, vcpu, _boot), st in self._boots.items():
            if not st.ended:
                self._at = (1, 0, (vm, vcpu))
                self._end_boot(st, (vm, vcpu), clean=True, at_end_of_log=True)
        self.violations.sort(key=lambda v: v.order)
        return self.violations

    def _harness(self, ev: Event) -> None:
        """The settings `apf-emu run` or `chaos` judged these logs with: the same verdict from `apf-emu check`."""
        limit = ev.get("ready_latency_limit_ms")
        if ev["event"] == "harness_settings" and not self.limit_given and isinstance(limit, (int, float)) \
                and limit > 0:
            self.ready_latency_limit_ns = int(limit * 1e6)
            self.limit_source = f"recorded by apf-emu {ev.get('command', '?')}"

    @property
    def ready_latency_limit_ms(self) -> float:
        return self.ready_latency_limit_ns / 1e6

    def _violate(self, invariant: str, message: str, ev: Event) -> None:
        if invariant not in self.judged:
            return
        phase, ns, (vm, vcpu) = self._at
        order = (phase, ns, type(vm).__name__, str(vm), type(vcpu).__name__, str(vcpu))
        self.violations.append(Violation(invariant, message, ev, list(self._ev_ctx), order, (vm, vcpu)))

    # --- host events ---------------------------------------------------------------------------------------------
    def _pf(self, key: tuple[Any, Any]) -> bool:
        return self._abi.get(key[0]) == "pf"

    def _host_ready(self, ev: Event, key: tuple[Any, Any]) -> None:
        abi = ev.get("abi")
        self._abi[key[0]] = abi if isinstance(abi, str) else "int"

    def _cancel(self, ev: Event, key: tuple[Any, Any]) -> None:
        """`pf`: 5.7's cancel dropped a page-ready and the not-present still pending: neither reached the guest."""
        st = self._h(key)
        st.pf_ready.discard(ev.get("token"))
        cancelled = ev.get("cancelled")
        if isinstance(cancelled, int):
            st.injected_np.discard(cancelled)
            if cancelled in st.outstanding:
                st.outstanding[cancelled] = False

    def _multiple_exception(self, ev: Event, key: tuple[Any, Any]) -> None:
        self._violate("double_fault", f"#PF {fmt_token(ev.get('cr2'))} queued while #PF "
                      f"{fmt_token(ev.get('prev_cr2'))} is pending: {ev.get('result')}", ev)

    def _hlt_spin(self, ev: Event, key: tuple[Any, Any]) -> None:
        self._violate("halt_spin", f"vCPU {key[1]} spins: {ev.get('count')} HLTs in a row returned at once with "
                      f"nothing injected ({ev.get('done')} page-ready events queued that cannot be delivered)", ev)

    def _ftrace_start(self, ev: Event, key: tuple[Any, Any]) -> None:
        self.input = "export" if ev.get("export") else "trace"
        self.judged = JUDGED[self.input]

    def _ftrace_lost(self, ev: Event, key: tuple[Any, Any]) -> None:
        """The trace lost events here: what was known of its VMs' vCPUs no longer holds (as at a trace's start).
        Other traces read with it lost nothing."""
        vms = ev.get("vms")
        if not isinstance(vms, list):
            self._host.clear()
            return
        for key in [k for k in self._host if k[0] in vms]:
            del self._host[key]

    @property
    def _mid_flight(self) -> bool:
        """A real trace: recorded from some moment on, so events of faults from before it may come."""
        return self.input == "trace"

    def _repeated_fault(self, ev: Event, key: tuple[Any, Any]) -> None:
        gfn = ev.get("gfn")
        if not isinstance(gfn, int):
            return  # the 2010 postings' doublefault printed only rip
        st = self._h(key)
        if gfn in st.gfns.values():
            return
        if not self._mid_flight or gfn in st.done_gfns:
            self._violate("repeated_fault_outstanding", f"repeated fault on gfn {gfn:#x}, which has no page-in "
                          "outstanding on this vCPU", ev)

    def _h(self, key: tuple[Any, Any]) -> _HostVcpu:
        st = self._host.get(key)
        if st is None:
            st = self._host[key] = _HostVcpu(key[1])
        return st

    def _host_reset(self, ev: Event, key: tuple[Any, Any]) -> None:
        if ev["event"] == "vcpu_disconnect":
            # The connection of a boot ended. A guest that stops cleanly logs guest_shutdown first; one that did
            # not (killed, or gone with its host's SIGTERM) ended there: its sleeping tasks died with it.
            boot = self._boots.get((key[0], key[1], ev.get("boot")))
            if boot is not None and not boot.ended:
                self._end_boot(boot, key, clean=False)
                boot.ended_by_disconnect = True
        elif ev.get("restored"):  # the same boot back on a new host (after a host that stopped with it attached)
            boot = self._boots.get((key[0], key[1], ev.get("boot")))
            if boot is not None and boot.ended_by_disconnect:
                boot.ended = boot.ended_by_disconnect = False
        old = self._host.get(key)
        if old is not None and ev["event"] == "vcpu_connect" and ev.get("restored"):
            # A restarted host took the vCPU back (same boot): registers and the token slot carry over; the events
            # that were in flight died with the old host, and a wake-all replaces them.
            old.outstanding.clear()
            old.completed.clear()
            old.gfns.clear()
            return
        st = self._host[key] = _HostVcpu(key[1])
        if old is not None:
            st.seen = old.seen  # tokens stay unique for the vCPU across boots
            st.issued_boot = old.issued_boot

    def _msr_write(self, ev: Event, key: tuple[Any, Any]) -> None:
        if ev.get("msr") == INT_NAME and ev.get("ok"):
            self._h(key).int_written = True
        if ev.get("msr") == EN_NAME and ev.get("ok"):
            st = self._h(key)
            en = AsyncPfEn(int(ev["value"]))
            if en.apf_enabled and not st.int_written and not self._pf(key):
                self._violate("msr_order", f"MSR_KVM_ASYNC_PF_EN = {en.raw:#x} enables delivery as an interrupt "
                              "before MSR_KVM_ASYNC_PF_INT was written: the vector is 0", ev)
            st.enabled = en.enabled_bit if self._pf(key) else en.apf_enabled
            if not st.enabled:
                # Outstanding events are eaten. A page-ready already delivered is not: its token stays in the
                # slot until the guest clears it, and a guest that re-enables may still take it (the host delivers
                # nothing new, not even the wake-all, until it does). Their completions go with them
                # (kvm_pv_enable_async_pf: kvm_clear_async_pf_completion_queue frees the done items too).
                for token in st.outstanding:
                    st.completed.pop(token, None)
                st.outstanding.clear()
                st.gfns.clear()  # kvm_async_pf_hash_reset

    def _not_present(self, ev: Event, key: tuple[Any, Any]) -> None:
        st = self._h(key)
        token = ev.get("token")
        vcpu = key[1]
        if token is None and self.input != "logs":  # af585b921e5d's "gva %#llx not present": no token to judge
            return
        if not isinstance(token, int) or not isinstance(vcpu, int) or not token_is_well_formed(token, vcpu):
            self._violate("token_format", f"not-present token {fmt_token(token)} is not (id << 12) | {vcpu}", ev)
            return
        injected = ev.get("injected", True) is not False
        if injected and not st.enabled:
            self._violate("delivered_while_disabled", f"not-present {token:#x} while APF is disabled", ev)
        apf_id = token >> TOKEN_VCPU_BITS
        if st.first_id is None:
            st.first_id = apf_id
        if apf_id < st.last_id and st.last_id > APF_ID_MAX - 1024:
            st.seen.clear()  # the 20-bit apf id wrapped (alloc_apf_token skips 0): tokens come round again
            st.readied.clear()
        st.last_id = apf_id
        if token in st.seen:
            self._violate("token_unique", f"token {token:#x} handed out again", ev)
        st.seen.add(token)
        st.issued_boot.set(token, ev.get("boot"))
        self._check_boot(ev, key, "not-present")
        st.outstanding[token] = injected
        if injected:
            st.injected_np.add(token)
        gfn = ev.get("gfn")
        if isinstance(gfn, int):
            st.gfns[token] = gfn
            st.done_gfns.discard(gfn)
        if isinstance(gfn, int) and key in self._current_boot:  # only where the guest logs its completed accesses
            n = st.faults_in_a_row[gfn] = st.faults_in_a_row.get(gfn, 0) + 1
            if n == RETRY_LOOP_LIMIT + 1:
                self._violate("retry_loop", f"gfn {gfn} faulted {n} times in a row, no access to it completed", ev)
        if len(st.outstanding) > ASYNC_PF_PER_VCPU:
            self._violate("outstanding_limit", f"{len(st.outstanding)} async page faults outstanding", ev)

    def _ready(self, ev: Event, key: tuple[Any, Any]) -> None:
        st = self._h(key)
        token = ev.get("token")
        if token is None and self.input != "logs":  # af585b921e5d's "gva %#llx ready": no token to judge
            return
        if ev.get("injected", True) is False:
            self._ready_not_injected(ev, st, token, key[1])
            return
        if not st.enabled:
            self._violate("delivered_while_disabled", f"page-ready {fmt_token(token)} while APF is disabled", ev)
        if self._pf(key):  # a #PF, no slot, no ACK
            st.pf_ready.add(token)  # type: ignore[arg-type]
        elif st.unacked is not None and key not in self._current_boot and ev.get("released") == st.unacked:
            st.unacked = None  # a guest that does not log: the host found the slot cleared
        if st.unacked is not None:
            self._violate("one_unacked_ready",
                          f"page-ready {fmt_token(token)} while {st.unacked:#x} is not released", ev)
        if not self._pf(key):
            st.unacked = token if isinstance(token, int) else None
        self._check_boot(ev, key, "page-ready")
        if token == KVM_APF_WAKE_ALL_TOKEN:
            return
        issued = st.issued_boot.get(token) if isinstance(token, int) else None
        if issued is not None and issued != ev.get("boot"):
            self._violate("stale_token", f"page-ready {token:#x} of boot {issued} sent in boot {ev.get('boot')}", ev)
        if not isinstance(token, int) or not isinstance(key[1], int) or not token_is_well_formed(token, key[1]):
            self._violate("token_format", f"page-ready token {fmt_token(token)} is malformed", ev)
        elif token in st.readied:
            self._violate("ready_once", f"second page-ready for {token:#x}", ev)
        elif token not in st.outstanding:
            if not self._before_trace(st, token):
                self._violate("ready_after_not_present", f"page-ready {token:#x} without a not-present", ev)
        elif not st.outstanding[token]:
            self._violate("ready_for_injected_only", f"page-ready {token:#x} injected for a not-present that was not",
                          ev)
        if isinstance(token, int):
            self._retire(ev, st, token)

    def _ready_not_injected(self, ev: Event, st: _HostVcpu, token: Any, vcpu: Any) -> None:
        """kvm_async_pf_ready of an item whose not-present was not injected (the halt path, or APF off): the item
        is done, nothing reached the guest. Judged as `_ready` judges a token (a trace cannot tell the two)."""
        if token == KVM_APF_WAKE_ALL_TOKEN:
            return
        if not isinstance(token, int) or not isinstance(vcpu, int) or not token_is_well_formed(token, vcpu):
            self._violate("token_format", f"page-ready token {fmt_token(token)} is malformed", ev)
        elif token in st.readied:
            self._violate("ready_once", f"second page-ready for {token:#x}", ev)
        elif token not in st.outstanding and not self._before_trace(st, token):
            self._violate("ready_after_not_present", f"page-ready {token:#x} without a not-present", ev)
        if isinstance(token, int):
            self._retire(ev, st, token)

    def _before_trace(self, st: _HostVcpu, token: int) -> bool:
        """A real trace: the fault of this token came before the trace started (its apf id is below the first one
        the trace holds for the vCPU, or the trace holds none yet). Token ids grow per vCPU (alloc_apf_token)."""
        return self._mid_flight and (st.first_id is None or token >> TOKEN_VCPU_BITS < st.first_id)

    def _retire(self, ev: Event, st: _HostVcpu, token: int) -> None:
        if token in st.outstanding and token not in st.completed:
            self._violate("completed_before_ready", f"page-ready {token:#x} before its page-in completed", ev)
        st.outstanding.pop(token, None)
        gfn = st.gfns.pop(token, None)
        if gfn is not None:
            st.done_gfns.add(gfn)
        st.readied.add(token)
        done = st.completed.pop(token, None)
        if done is not None and ev["mono_ns"] - done > self.ready_latency_limit_ns:
            self._violate("ready_latency", f"page-ready {token:#x} came {(ev['mono_ns'] - done) / 1e6:.1f} ms after "
                          f"its completion (limit {self.ready_latency_limit_ns / 1e6:g} ms)", ev)

    def _check_boot(self, ev: Event, key: tuple[Any, Any], what: str) -> None:
        current = self._current_boot.get(key)
        if current is not None and ev.get("boot") is not None and ev.get("boot") != current:
            self._violate("stale_token", f"{what} {fmt_token(ev.get('token'))} for boot {ev.get('boot')} while boot "
                          f"{current} runs", ev)

    def _completed(self, ev: Event, key: tuple[Any, Any]) -> None:
        token = ev.get("token")
        if isinstance(token, int):
            self._h(key).completed[token] = ev["mono_ns"]

    def _sync_fault(self, ev: Event, key: tuple[Any, Any]) -> None:
        """A prefault (kvm_arch_async_page_ready) paged a completed event's page in again: its page-ready is due from
        now on, as the page-in that had completed no longer counts."""
        token = ev.get("token")
        if ev.get("reason") == "prefault" and isinstance(token, int):
            st = self._h(key)
            if token in st.completed:
                st.completed[token] = ev["mono_ns"]

    def _dropped(self, ev: Event, key: tuple[Any, Any]) -> None:
        st = self._h(key)
        st.outstanding.pop(ev.get("token"), None)  # type: ignore[arg-type]
        st.completed.pop(ev.get("token"), None)  # type: ignore[arg-type]

    # --- guest events --------------------------------------------------------------------------------------------
    def _g(self, ev: Event, key: tuple[Any, Any]) -> _GuestBoot:
        bkey = (key[0], key[1], ev.get("boot"))
        st = self._boots.get(bkey)
        if st is None:
            st = self._boots[bkey] = _GuestBoot()
        return st

    def _boot(self, ev: Event, key: tuple[Any, Any]) -> None:
        prev = self._current_boot.get(key)
        if prev is not None and prev != ev.get("boot"):
            old = self._boots.get((key[0], key[1], prev))
            if old is not None and not old.ended:
                self._end_boot(old, key, clean=False)  # the previous boot died (crash, kill): its waits are moot
        self._current_boot[key] = ev.get("boot")
        self._g(ev, key)

    def _shutdown(self, ev: Event, key: tuple[Any, Any]) -> None:
        self._end_boot(self._g(ev, key), key, clean=True, ev=ev)

    def _abrupt_end(self, ev: Event, key: tuple[Any, Any]) -> None:
        # A crash or reboot: the kernel's sleeping tasks and its sleep table die with it.
        self._end_boot(self._g(ev, key), key, clean=False, ev=ev)

    def _end_boot(self, st: _GuestBoot, key: tuple[Any, Any], *, clean: bool, ev: Event | None = None,
                  at_end_of_log: bool = False) -> None:
        st.ended = True
        if not clean:
            return
        where = "at the end of the log" if at_end_of_log else "at shutdown"
        self._ev_ctx = self._context.get(key, deque())  # (at the end of the log, no event set it)
        for task, (token, wait_ev) in st.waits.items():
            self._violate("wait_woken", f"task {task} still sleeps on {token:#x} {where}", wait_ev)
        for token in st.dummies:
            self._violate("dummy_leak", f"dummy entry for {token:#x} left {where}", ev or {"event": "end_of_log"})

    def _wait(self, ev: Event, key: tuple[Any, Any]) -> None:
        st = self._g(ev, key)
        task = ev.get("task", -1)
        if task in st.waits:
            self._violate("wait_woken", f"task {task} sleeps again while still asleep on {st.waits[task][0]:#x}", ev)
        token = ev.get("token", -1)
        st.waits[task] = (token, ev)
        host = self._host.get(key)
        if host is not None and host.seen:  # judged where the host's log is there
            if token in host.injected_np:
                host.injected_np.discard(token)
            else:
                self._violate("wait_matches_not_present",
                              f"task {task} sleeps on {fmt_token(token)}, which the host did not inject as not-present",
                              ev)

    def _wake(self, ev: Event, key: tuple[Any, Any]) -> None:
        st = self._g(ev, key)
        token, task = ev.get("token"), ev.get("task", -1)
        if not ev.get("all"):
            self._check_slot(ev, key, token)
            host = self._host.get(key)
            issued = host.issued_boot.get(token) if host is not None and isinstance(token, int) else None
            if issued is not None and issued != ev.get("boot"):
                self._violate("stale_token", f"boot {ev.get('boot')} woke for {token:#x} of boot {issued}", ev)
        waited = st.waits.pop(task, None)
        if waited is not None and waited[0] != token:
            self._violate("wake_matches_ready",
                          f"task {task} slept on {waited[0]:#x} but woke for {fmt_token(token)}", ev)

    def _wake_all(self, ev: Event, key: tuple[Any, Any]) -> None:
        if ev.get("reason", "wake_all") == "wake_all":  # not the guest's own (CPU offline: apf_task_wake_all)
            self._check_slot(ev, key, KVM_APF_WAKE_ALL_TOKEN)
        self._g(ev, key).dummies.clear()

    def _check_slot(self, ev: Event, key: tuple[Any, Any], token: Any) -> None:
        host = self._host.get(key)
        if self._pf(key):  # `pf`: the wake's token is CR2 of a page-ready #PF
            if host is None or token not in host.pf_ready:
                self._violate("wake_matches_ready", f"guest woke for {fmt_token(token)}, which the host did not "
                              "deliver as page-ready (its #PF read a page-ready's reason)", ev)
            else:
                host.pf_ready.discard(token)
            return
        if host is None or host.unacked != token:
            slot = None if host is None else host.unacked
            if token == 0:
                self._violate("wake_matches_ready", f"the page-ready interrupt found the slot empty (the host's last "
                              f"page-ready is {fmt_token(slot)}): Linux inserts a dummy for token 0", ev)
                return
            self._violate("wake_matches_ready",
                          f"guest woke for {fmt_token(token)}; the host's last page-ready is {fmt_token(slot)}", ev)

    def _dummy(self, ev: Event, key: tuple[Any, Any]) -> None:
        st = self._g(ev, key)
        token = ev.get("token")
        action = ev.get("action")
        if action == "created":
            self._check_slot(ev, key, token)
            st.dummies.add(token)  # type: ignore[arg-type]
        else:
            if action == "removed":
                self._check_slot(ev, key, token)
            elif action == "consumed":  # kvm_async_pf_task_wait_schedule found the wake first: the #PF sleeps not
                host = self._host.get(key)
                if host is not None:
                    host.injected_np.discard(token)
            st.dummies.discard(token)

    def _ack(self, ev: Event, key: tuple[Any, Any]) -> None:
        host = self._host.get(key)
        if host is not None and host.unacked == ev.get("token"):
            host.unacked = None

    def _slot_cleared(self, ev: Event, key: tuple[Any, Any]) -> None:
        """--online-clears-token: the guest wrote 0 to its slot while APF was off, releasing whatever it held."""
        host = self._host.get(key)
        if host is not None:
            host.unacked = None

    def _restore(self, ev: Event, key: tuple[Any, Any]) -> None:
        # A restarted host found the token slot empty: whatever was delivered before has been released.
        if ev.get("slot") == 0:
            self._h(key).unacked = None
        if ev.get("msr_int"):
            self._h(key).int_written = True  # the registers came back with the vector

    def _access_done(self, ev: Event, key: tuple[Any, Any]) -> None:
        """An access to `gfn` completed (or its task died of it): the faults on it are no longer in a row."""
        host = self._host.get(key)
        if host is not None and isinstance(ev.get("gfn"), int):
            host.faults_in_a_row.pop(ev["gfn"], None)

    def _data_check(self, ev: Event, key: tuple[Any, Any]) -> None:
        self._access_done(ev, key)
        if not ev.get("ok"):
            self._violate("data_check", f"page {ev.get('gfn')} did not hold what task {ev.get('task')} wrote", ev)

    def _bad_address(self, ev: Event, key: tuple[Any, Any]) -> None:
        """A SIGSEGV or an oops: the access is over; at a token the host delivered, an APF taken for a fault."""
        self._access_done(ev, key)
        host = self._host.get(key)
        token = ev.get("token")
        if host is not None and (token in host.seen or token in host.pf_ready):  # pf_ready: a wake-all's ~0 too
            self._violate("apf_as_genuine", f"task {ev.get('task')} got {ev['event'].removeprefix('guest_')} at "
                          f"{fmt_token(ev.get('address'))}: token {fmt_token(token)} taken for an address", ev)

    def _panic(self, ev: Event, key: tuple[Any, Any]) -> None:
        self._violate("guest_panic", str(ev.get("reason")), ev)


_HOST = {
    "host_ready": Checker._host_ready,
    "apf_cancel": Checker._cancel,
    "kvm_multiple_exception": Checker._multiple_exception,
    "kvm_hlt_spin": Checker._hlt_spin,
    "vcpu_connect": Checker._host_reset,
    "vcpu_disconnect": Checker._host_reset,
    "msr_write": Checker._msr_write,
    "kvm_async_pf_not_present": Checker._not_present,
    "kvm_async_pf_ready": Checker._ready,
    "kvm_async_pf_completed": Checker._completed,
    "kvm_async_pf_repeated_fault": Checker._repeated_fault,
    "ftrace_start": Checker._ftrace_start,
    "ftrace_lost": Checker._ftrace_lost,
    "apf_ready_dropped": Checker._dropped,
    "apf_sync_fault": Checker._sync_fault,
    "vcpu_restore": Checker._restore,
}
_GUEST = {
    "guest_boot": Checker._boot,
    "guest_shutdown": Checker._shutdown,
    "guest_crash": Checker._abrupt_end,
    "guest_reboot": Checker._abrupt_end,
    "guest_abort": Checker._abrupt_end,
    "guest_apf_wait": Checker._wait,
    "guest_apf_wake": Checker._wake,
    "guest_apf_wake_all": Checker._wake_all,
    "guest_apf_dummy": Checker._dummy,
    "guest_apf_ack": Checker._ack,
    "guest_apf_slot_cleared": Checker._slot_cleared,
    "guest_data_check": Checker._data_check,
    "guest_data_torn": Checker._access_done,
    "guest_sigbus": Checker._access_done,
    "guest_mce_fixup": Checker._access_done,
    "guest_sigsegv": Checker._bad_address,
    "guest_oops": Checker._bad_address,
    "guest_panic": Checker._panic,
}


def fmt_token(value: Any) -> str:
    """A token in a message: hex with 0x, as KVM's tracepoints print it (anything else as it came)."""
    return f"{value:#x}" if isinstance(value, int) and not isinstance(value, bool) else repr(value)


def check_events(events: Iterable[Event], **options: Any) -> list[Violation]:
    return Checker(**options).check(events)
