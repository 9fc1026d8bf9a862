# The historical host bugs apf-emu can put back: one switch per fix that KVM shipped (`apf-host --bugs a,b`), so
# that a scenario (apf_emu/scenarios.py) runs the host as it was before the fix, and the same run without the switch
# is today's KVM. This module is the registry: each bug's name, the kernel function its fix changed, the fix and
# what the bug did. Where the host code changes with a bug, it names the bug (`"bz208081" in self.bugs`).
#
# The `pf` ABI's own historical switches (--no-pending-check, --no-cancel-pending) stay separate options: they are
# 5.7-era host behaviours that only make sense with that ABI.
from __future__ import annotations

from dataclasses import dataclass
from typing import Final


@dataclass(frozen=True, slots=True)
class Bug:
    function: str  # the kernel function the fix changed
    fix: str  # the fix: commit, author, year
    what: str  # what the host did before it


BUGS: Final = {
    "bz208081": Bug(
        "kvm_arch_async_page_present", "Vitaly Kuznetsov, 2020 (Linux 5.8): `kvm_arch_async_page_not_present` "
        "returns whether it injected (work->notpresent_injected) and page-ready goes out only for those",
        "page-ready for every completed fault with APF on, also for a not-present that was never injected (the "
        "vCPU halted instead): the guest finds no sleeper and keeps a dummy node that nothing consumes (kernel "
        "bugzilla 208081)"),
    "token-zero": Bug(
        "alloc_apf_token", "Liang Zhang, 2022 (Cc stable): \"make apf token non-zero to fix bug\"",
        "token = (id++ << 12) | vcpu_id from id 0: vCPU 0's first token is 0, the value that also means \"slot "
        "free\", so the host can write the next page-ready over it before the guest read it"),
    "lapic-disabled": Bug(
        "kvm_arch_can_dequeue_async_page_present", "Vitaly Kuznetsov, 2021, commit 2f15d027c05f \"KVM: x86: "
        "Properly handle APF vs disabled LAPIC situation\"",
        "page-ready dequeued while the guest's LAPIC is software-disabled: the token goes into the slot, the "
        "interrupt is dropped (__apic_accept_irq), the slot is never freed and nothing after it is delivered; "
        "HLT returns at once while the done list is not empty (kvm_vcpu_has_events), so the vCPU spins "
        "(cloud-hypervisor #2277, libkrun PR 28, Firecracker #3043)"),
    "no-disable-eat": Bug(
        "kvm_pv_enable_async_pf", "none shipped: KVM has eaten the completions on disable since APF was merged "
        "(2010, kvm_clear_async_pf_completion_queue); the seed thread asks what a host that did not would do",
        "completions outstanding when the guest disables APF stay queued; a kexec keeps the vCPU, so the kdump "
        "kernel that enables APF again receives the page-readies of the kernel that crashed"),
}
NAMES: Final = tuple(BUGS)


def parse(spec: str) -> frozenset[str]:
    """`none` or a comma-separated list of BUGS' names."""
    text = spec.strip().lower()
    if text in ("", "none"):
        return frozenset()
    names = [name.strip() for name in text.split(",")]
    unknown = [name for name in names if name not in BUGS]
    if unknown:
        raise ValueError(f"unknown host bug {', '.join(map(repr, unknown))}: known are {', '.join(NAMES)}")
    return frozenset(names)


def spec(bugs: frozenset[str]) -> str:
    """The command-line form of a set of bugs (`parse(spec(b)) == b`)."""
    return ",".join(name for name in NAMES if name in bugs) or "none"
