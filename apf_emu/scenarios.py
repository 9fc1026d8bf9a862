# `apf-emu scenario`: the known failures of the APF protocol, each as one seeded native run that reproduces it and
# one that runs the fix. This module owns the catalogue (what each failure is, where it comes from, which switches
# make it happen, which check must flag it) and the verdict of a scenario; the runs are `apf-emu run`'s
# (apf_emu/runner.py), the judging the checker's and the statistics' (apf_emu/verdict.py), the host's historical
# bugs shared/bugs.py's. docs/SCENARIOS.md tells each story at length.
#
# A scenario passes when its buggy variant is flagged by one of its named checks (an invariant, or for a failure that
# is a delay rather than a wrong event, a statistic of the buggy run against the fixed run of the same invocation)
# and its fixed variant is clean: no violation, no process that died, something checked.
from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import trio

from shared.config import GuestOptions, HostOptions, PageInLatency, with_
from shared.snapshot import DEFAULT_MSR_LIST

from .chaos import ChaosOptions, chaos
from .checker import Violation
from .runner import RunOptions, RunResult, run
from .stats import Stats
from .verdict import analyse_run


@dataclass(frozen=True)
class Variant:
    """One side of a scenario: the options that differ from the scenario's common ones, and what they stand for."""

    what: str
    host: dict[str, Any] = field(default_factory=dict)
    guest: dict[str, Any] = field(default_factory=dict)
    snapshot_msrs: str = DEFAULT_MSR_LIST  # the VMM's MSR list, for a scenario with a snapshot


@dataclass(frozen=True)
class Statistic:
    """A failure that is a delay: `measure` of the buggy run must be at least `factor` times that of the fixed run."""

    name: str
    what: str
    measure: Callable[[Stats], float | None]
    factor: float


@dataclass(frozen=True)
class Scenario:
    name: str
    title: str
    source: str
    story: str  # what happened in the real world, and how apf-emu makes it happen (one paragraph)
    flags: tuple[str, ...]  # the invariants that flag the buggy variant (at least one must)
    buggy: Variant
    fixed: Variant
    host: dict[str, Any] = field(default_factory=dict)  # options both variants share
    guest: dict[str, Any] = field(default_factory=dict)
    vcpus: int = 2
    duration: float = 3.0
    timing: bool = False  # about timing: `--all` runs it on the signal transport too
    statistic: Statistic | None = None
    snapshot_at: float | None = None  # seconds in: the VMM snapshots the VM and restores it (apf_emu/vmm.py)
    faults: dict[str, int] | None = None  # a chaos run (apf_emu/chaos.py) with these fault counts, not a plain run


def _p50(latency: str) -> Callable[[Stats], float | None]:
    def measure(stats: Stats) -> float | None:
        value = stats.percentiles(latency).get("p50_us")
        return float(value) if value is not None else None

    return measure


NO_RACE: Final = {"entry_fault_ratio": 0.0}  # `pf` scenarios that are not about the reason race

SCENARIOS: Final = (
    Scenario(
        "bz208081", "page-ready for a not-present that was never injected",
        "kernel bugzilla 208081 \"Memory leak in kvm_async_pf_task_wake\" (June 2020); fixed by Vitaly Kuznetsov, "
        "\"KVM: async_pf: Inject 'page ready' event only if 'page not present' was previously injected\" "
        "(2a18b7e7cd88, Linux 5.8)",
        "A fault in kernel mode without SEND_ALWAYS is not injected: the vCPU takes KVM's artificial halt instead. "
        "Before the fix, kvm_arch_async_page_present sent the page-ready for it all the same; the guest's "
        "kvm_async_pf_task_wake found no sleeper for the token and inserted a dummy node, which no not-present will "
        "ever consume: one leaked allocation per halted fault. The buggy host is `--bugs bz208081`; the guest makes "
        "10% of its accesses in kernel mode (the default), so halted faults come every few milliseconds.",
        ("ready_for_injected_only", "dummy_leak"),
        Variant("KVM before 2a18b7e7cd88", host={"bugs": frozenset({"bz208081"})}),
        Variant("KVM since 5.8"),
        guest={"kernel_ratio": 0.3}),
    Scenario(
        "token-zero", "vCPU 0's first token is 0, which also means \"slot free\"",
        "Liang Zhang, \"KVM: x86/mmu: make apf token non-zero to fix bug\" (6f3c1fc53d86, 2022, Cc stable): a guest "
        "task \"blocked for more than 1254 seconds\" in kvm_async_pf_task_wait_schedule on 5.10",
        "alloc_apf_token made (id++ << 12) | vcpu_id from id 0, so vCPU 0's first token was 0. The host decides "
        "that the guest has taken a page-ready when the token slot reads 0 (apf_pageready_slot_free): with token 0 "
        "in the slot it delivers the next page-ready over it before the guest has read it, and the task asleep "
        "on token 0 is never woken. The buggy host is `--bugs token-zero`; one vCPU, eight tasks and a fixed "
        "page-in latency make several page-ins finish together just after the first, so that the overwrite is "
        "likely; the token itself is flagged every time (token_format), the lost wake (wait_woken, "
        "one_unacked_ready) whenever the overwrite happened.",
        ("token_format", "wait_woken"),
        Variant("KVM before 6f3c1fc53d86", host={"bugs": frozenset({"token-zero"})}),
        Variant("KVM since 6f3c1fc53d86"),
        host={"page_in_latency": PageInLatency.parse("fixed:5ms")}, guest={"tasks": 8}, vcpus=1, timing=True),
    Scenario(
        "lapic-disabled-spin", "APF-INT enabled while the LAPIC is software-disabled: the vCPU spins",
        "cloud-hypervisor #2277 (worked around by hiding KVM_FEATURE_ASYNC_PF_INT, PR #2498), libkrun PR #28 "
        "(no-kvmapf), Firecracker #3043; fixed by Vitaly Kuznetsov, \"KVM: x86: Properly handle APF vs disabled LAPIC "
        "situation\" (2f15d027c05f, 2021, Linux 5.13)",
        "Linux's boot CPU enables APF (kvm_guest_cpu_init) before setup_local_APIC software-enables its LAPIC; under "
        "a direct kernel boot nothing enabled it earlier. The enabling write queues a wake-all; before the fix KVM "
        "dequeued it at once, wrote its token into the slot and lost the interrupt (__apic_accept_irq drops it on a "
        "disabled APIC). The guest never takes it, so the slot is never freed: every later page-ready stays queued, "
        "every task that sleeps on an APF sleeps for good, and each HLT returns at once because the done list is not "
        "empty (kvm_vcpu_has_events): the vCPU spins at 100%. The buggy host is `--bugs lapic-disabled`; apf-emu's "
        "boot CPU follows Linux's order, so no guest switch is needed.",
        ("halt_spin", "wait_woken"),
        Variant("KVM before 2f15d027c05f", host={"bugs": frozenset({"lapic-disabled"})}),
        Variant("KVM since 2f15d027c05f")),
    Scenario(
        "offline-stale-slot", "a page-ready taken while the CPU goes offline leaves the slot set for good",
        "found by apf-emu's chaos runs (docs/PROTOCOL.md section 10): Linux's kvm_cpu_down_prepare and "
        "kvm_guest_cpu_init against KVM's apf_pageready_slot_free; no upstream report or fix known",
        "kvm_cpu_down_prepare turns interrupts off, then writes MSR_KVM_ASYNC_PF_EN = 0. A page-ready KVM delivered "
        "in between is taken when interrupts come back, with async_pf_enabled false: sysvec_kvm_asyncpf_interrupt "
        "then neither clears the token slot nor ACKs. On online, kvm_guest_cpu_init enables APF without clearing "
        "the slot, so KVM never dequeues again: the tasks that sleep on that CPU sleep for good and its HLTs return "
        "at once. The guest goes offline and online every 20 ms (`--apf-reinit-every`); the fixed variant is "
        "apf-emu's proposal, not Linux: clear the slot before enabling (`--online-clears-token`).",
        ("wait_woken", "halt_spin"),
        Variant("Linux and KVM today"),
        Variant("guest that clears the slot on online (apf-emu's proposal)", guest={"online_clears_token": True}),
        guest={"apf_reinit_every": 0.02}, duration=4.0, timing=True),
    Scenario(
        "firecracker-snapshot-msrs", "a snapshot without MSR_KVM_ASYNC_PF_INT: after restore the vector is 0",
        "Firecracker #3020 (2022: after loading a snapshot, processes stuck in kvm_async_pf_task_wait_schedule); "
        "MSR_KVM_ASYNC_PF_INT joined the saved MSRs in PR #3064 (v1.2, \"to preserve ASYNC PF interrupt vector\"); "
        "PR #5738 (2026) saves the whole 0x4b564d00-0x4b564dff range, as cloud-hypervisor saves KVM's whole list",
        "A VMM snapshot saves the MSRs of its list; one it leaves out comes back as a new vCPU has it, 0. Firecracker "
        "before PR 3064 saved MSR_KVM_ASYNC_PF_EN but not MSR_KVM_ASYNC_PF_INT, so on the restored vCPU APF is on "
        "with page-ready vector 0: the wake-all of the restored enabling write, which would wake the tasks whose "
        "page-ins died with the old VM, and every page-ready after it arrive on a vector Linux takes as spurious, "
        "the token slot is never released, and the tasks sleep for good. The run is snapshotted and restored "
        "1.5 s in (`apf-emu snapshot --msrs firecracker-1.1`, `apf-emu restore`); the fixed variant saves KVM's "
        "whole range.",
        ("wait_woken",),
        Variant("Firecracker before PR 3064 (`--msrs firecracker-1.1`)", snapshot_msrs="firecracker-1.1"),
        Variant("KVM's whole MSR range (`--msrs kvm`)", snapshot_msrs="kvm"),
        guest={"drain_timeout": 1.0}, duration=4.0, snapshot_at=1.5),
    Scenario(
        "stale-after-kdump", "a host that keeps delivering after the guest disabled APF reaches the kdump kernel",
        "the seed thread's question on kvm_arch_can_inject_async_page_present; KVM answered it in 2010: "
        "kvm_pv_enable_async_pf clears the queue on disable (kvm_clear_async_pf_completion_queue), and Vitaly "
        "Kuznetsov's 2021 series made the crash path disable every PV feature (kvm_crash_shutdown)",
        "The crashing kernel's crash path writes MSR_KVM_ASYNC_PF_EN = 0 and does not wait; kexec then boots the kdump "
        "kernel on the same vCPU, which KVM does not reset. A host that did not eat the outstanding completions on "
        "disable would hold them until the kdump kernel enables APF and then deliver page-readies of tokens that "
        "kernel never saw: dummies, and wakes of nothing. The buggy host is `--bugs no-disable-eat` (no KVM shipped "
        "it); one guest panics at a time the seed picks (`apf-emu chaos --guest-panics 1`) and comes back as a kdump "
        "kernel with APF on. The fixed host is KVM's.",
        ("stale_token",),
        Variant("a host that does not eat on disable", host={"bugs": frozenset({"no-disable-eat"})}),
        Variant("KVM (kvm_clear_async_pf_completion_queue on disable)"),
        host={"page_in_latency": PageInLatency.parse("fixed:100ms")},
        guest={"tasks": 16, "kernel_ratio": 0.0, "irq_off_ratio": 0.0}, duration=5.0, faults={"guest_panics": 1}),
    Scenario(
        "double-fault", "`pf`: not-present and page-ready #PFs injected together make a #DF",
        "\"KVM: async_pf: Fix #DF due to inject 'Page not Present' and 'Page Ready' exceptions simultaneously\" "
        "(9a6e7c39810e, 2017); reverted by Vitaly Kuznetsov's interrupt series (2020) as no longer needed",
        "On the ABI before 5.8 both events are #PFs. Without the fix, a page-ready could be queued at the entry that "
        "also injects a not-present still pending: kvm_multiple_exception turns two #PFs into a double fault, and the "
        "guest dies in exc_double_fault. The fix cancels both when reason still holds an unread not-present. The "
        "buggy host is `--abi pf --no-cancel-pending`; the fixed one is 5.7's.",
        ("double_fault",),
        Variant("KVM before 9a6e7c39810e", host={"no_cancel_pending": True}),
        Variant("KVM 5.7"),
        host={"abi": "pf", "page_in_latency": PageInLatency.parse("fixed:1ms")},
        guest={"abi": "pf", **NO_RACE}),
    Scenario(
        "legacy-no-ack", "`pf`: many pages ready at once and no ACK: all but the first wait",
        "Paolo Bonzini, 5 October 2023, on why #PF page-ready was dropped: with the old ABI there was no ACK when "
        "many pages were ready at once, so the notifications after the first were delayed; fixed by the ACK MSR "
        "(commit 557a961abbe0)",
        "With `pf` a page-ready is a #PF queued at an entry, and while it is pending nothing else can be injected "
        "(kvm_can_do_async_pf); 5.7 kicks no running vCPU either, so each further page-ready waits for the vCPU's "
        "next exit: a memory exit or a timer tick. With the ACK MSR (`int`) the guest's ACK write is itself the exit "
        "that delivers the next one. Both variants run the same workload (one vCPU, eight writers and a counting "
        "task, fixed 2 ms page-ins, so that completions come in bursts); the statistic is the median time from a "
        "page-in's completion to the page-ready reaching the guest, which `pf` must take at least three times as "
        "long as `int`.",
        (),
        Variant("the ABI before 5.8 (5.7)", host={"abi": "pf"}, guest={"abi": "pf"}),
        Variant("the 5.8+ ABI with MSR_KVM_ASYNC_PF_ACK"),
        host={"page_in_latency": PageInLatency.parse("fixed:2ms")},
        guest={"tasks": 8, "counting_tasks": 1, **NO_RACE}, vcpus=1, timing=True,
        statistic=Statistic("completed_to_ready p50", "median µs from kvm_async_pf_completed to the page-ready "
                            "reaching the task (completed -> wake)", _p50("completed_to_wake"), 3.0)),
)
BY_NAME: Final = {s.name: s for s in SCENARIOS}


@dataclass
class VariantRun:
    variant: str  # "buggy" or "fixed"
    transport: str
    result: RunResult
    violations: list[Violation]
    stats: Stats
    checked: bool  # the logs held protocol events

    @property
    def invariants(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for v in self.violations:
            counts[v.invariant] = counts.get(v.invariant, 0) + 1
        return counts


@dataclass
class Verdict:
    scenario: Scenario
    transport: str
    runs: list[VariantRun]
    flagged_by: list[str] = field(default_factory=list)  # the named checks that fired on the buggy run
    problems: list[str] = field(default_factory=list)  # why it did not pass

    @property
    def passed(self) -> bool:
        return not self.problems

    def as_dict(self) -> dict[str, Any]:
        return {
            "scenario": self.scenario.name, "transport": self.transport, "passed": self.passed,
            "flagged_by": self.flagged_by, "problems": self.problems,
            "runs": [{"variant": r.variant, "log_dir": str(r.result.log_dir), "violations": r.invariants,
                      "exit_codes": r.result.exit_codes, "unexpected_exits": r.result.unexpected_exits,
                      "checked": r.checked} for r in self.runs],
        }


def variant_options(sc: Scenario, which: str, *, transport: str, seed: int, log_dir: Path,
                    vm: str) -> RunOptions:
    """The run of one variant: the scenario's common options, then the variant's."""
    variant = sc.buggy if which == "buggy" else sc.fixed
    host = with_(HostOptions(), vcpus=sc.vcpus, seed=seed, **{**sc.host, **variant.host})
    guest = with_(GuestOptions(), transport=transport, seed=seed, **{**sc.guest, **variant.guest})
    return RunOptions(host=host, guest=guest, duration=sc.duration, log_dir=log_dir, vm=vm, snapshot_at=sc.snapshot_at,
                      snapshot_msrs=variant.snapshot_msrs)


def run_variant(sc: Scenario, which: str, *, transport: str, seed: int, root: Path) -> VariantRun:
    log_dir = root / sc.name / f"{which}-{transport}"
    vm = f"sc{os.getpid()}-{SCENARIOS.index(sc)}{which[0]}{transport[0]}"
    opts = variant_options(sc, which, transport=transport, seed=seed, log_dir=log_dir, vm=vm)
    if sc.faults is None:
        result = trio.run(run, opts)
    else:
        faults = {"guest_kills": 0, "guest_panics": 0, "host_kills": 0, "pauses": 0, **sc.faults}
        chaos_opts = ChaosOptions(host=opts.host, guest=opts.guest, duration=opts.duration, log_dir=log_dir, vm=vm,
                                  guest_kills=faults["guest_kills"], guest_panics=faults["guest_panics"],
                                  host_kills=faults["host_kills"], pauses=faults["pauses"])
        done = trio.run(chaos, chaos_opts)
        result = RunResult(done.vm, done.log_dir, exit_codes=done.exit_codes, stopped_by=done.stopped_by,
                           unexpected_exits=done.problems, leftovers=done.leftovers)
    violations, stats, _report, checker = analyse_run(result.log_dir)
    return VariantRun(which, transport, result, violations, stats, bool(checker.protocol_events))


def judge(sc: Scenario, transport: str, runs: list[VariantRun]) -> Verdict:
    """Buggy flagged by a named check (or its statistic against the fixed run), fixed clean."""
    verdict = Verdict(sc, transport, runs)
    by = {r.variant: r for r in runs}
    for r in runs:
        if not r.checked:
            verdict.problems.append(f"the {r.variant} run checked nothing (logs in {r.result.log_dir})")
        if r.result.stopped_by in ("SIGINT", "SIGTERM"):
            verdict.problems.append(f"the {r.variant} run was interrupted")
        if r.result.stopped_by == "snapshot failure":  # the scenario did not run its course
            verdict.problems.append(f"the {r.variant} run's snapshot failed: {'; '.join(r.result.unexpected_exits)}")
    buggy, fixed = by.get("buggy"), by.get("fixed")
    if buggy is not None:
        verdict.flagged_by = [name for name in sc.flags if name in buggy.invariants]
        stat = sc.statistic
        if stat is not None and fixed is not None:
            b, f = stat.measure(buggy.stats), stat.measure(fixed.stats)
            if b is not None and f is not None and b >= stat.factor * max(f, 1.0):
                verdict.flagged_by.append(f"{stat.name} {b:.0f} us vs {f:.0f} us ({b / max(f, 1.0):.1f}x)")
            else:
                verdict.problems.append(f"{stat.name}: buggy {b} us vs fixed {f} us, not {stat.factor:g}x")
        elif not verdict.flagged_by:
            found = ", ".join(f"{k} {v}" for k, v in sorted(buggy.invariants.items())) or "nothing"
            verdict.problems.append(f"the buggy variant was not flagged by {' or '.join(sc.flags)} (found {found})")
    if fixed is not None:
        if fixed.violations:
            found = ", ".join(f"{k} {v}" for k, v in sorted(fixed.invariants.items()))
            verdict.problems.append(f"the fixed variant is not clean: {found}")
        if fixed.result.unexpected_exits:
            verdict.problems.append(f"the fixed variant lost a process: {'; '.join(fixed.result.unexpected_exits)}")
    return verdict


def run_scenario(sc: Scenario, *, transport: str, seed: int, root: Path, variants: tuple[str, ...] = ("buggy", "fixed"),
                 say: Callable[[str], object] = print) -> Verdict:
    """Run the variants asked for (a statistic needs both: the fixed run is its baseline) and judge them."""
    if sc.statistic is not None:
        variants = ("buggy", "fixed")
    runs = []
    for which in variants:
        say(f"apf-emu scenario: {sc.name} {which} ({transport}) ...")
        runs.append(run_variant(sc, which, transport=transport, seed=seed, root=root))
        if runs[-1].result.stopped_by in ("SIGINT", "SIGTERM"):
            break
    return judge(sc, transport, runs)


# --- scenarios under chaos (`apf-emu chaos --scenario`, campaigns) ------------------------------------------------
VARIANTS: Final = ("buggy", "fixed")


def chaos_scenario(text: str) -> tuple[Scenario, str]:
    """`NAME` (its buggy variant) or `NAME:buggy` / `NAME:fixed`: a scenario whose switches a chaos run can take. A
    scenario about a snapshot or judged by a statistic against its fixed run needs `apf-emu scenario` (ValueError)."""
    name, _, which = text.partition(":")
    sc = BY_NAME.get(name)
    if sc is None:
        raise ValueError(f"unknown scenario {name!r} (apf-emu scenario list)")
    which = which or "buggy"
    if which not in VARIANTS:
        raise ValueError(f"{text!r}: the variant after ':' is buggy or fixed")
    if sc.snapshot_at is not None or sc.statistic is not None:
        why = "a snapshot" if sc.snapshot_at is not None else "a statistic against its fixed run"
        raise ValueError(f"scenario {name} needs {why}: run it with `apf-emu scenario run {name}`, not under chaos")
    return sc, which


CHAOS_SCENARIOS: Final = tuple(s.name for s in SCENARIOS if s.snapshot_at is None and s.statistic is None)


def with_scenario(sc: Scenario, which: str, host: HostOptions, guest: GuestOptions) -> tuple[HostOptions, GuestOptions]:
    """The scenario's switches (its common options, then the variant's) over `host` and `guest`: what makes the
    failure happen, not the scenario's vCPU count, duration or faults, which stay the chaos run's."""
    variant = sc.buggy if which == "buggy" else sc.fixed
    return with_(host, **{**sc.host, **variant.host}), with_(guest, **{**sc.guest, **variant.guest})


def scenario_abi(text: str) -> str | None:
    """The ABI a scenario reference fixes (a `pf` scenario's), if any."""
    sc, which = chaos_scenario(text)
    variant = sc.buggy if which == "buggy" else sc.fixed
    abi = {**sc.host, **variant.host}.get("abi")
    return str(abi) if abi is not None else None
