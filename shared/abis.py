# The ABIs: the designs of the APF protocol apf-emu runs side by side (the seed thread's). This module is the axis:
# the registry of names, and what the host advertises for each in CPUID 0x40000001 EAX. The host runs one ABI
# (`apf-host --abi`), and so does each guest (`apf-guest --abi`); a guest uses its design only if the host advertises
# its feature bit, and otherwise falls back as a real guest of that design would (docs/PROTOCOL.md, section 11).
#
# - `int`: Linux 5.8+ and current KVM: not-present as #PF with `flags` = 1 and CR2 = token, page-ready as an
#   interrupt with the token in the slot and an ACK.
# - `pf`: Linux and KVM before 5.8 (5.7's code): one u32 `reason` at offset 0 for both events, both delivered as
#   #PF with CR2 = token (not-present: reason 1; page-ready: reason 2; wake-all: CR2 = ~0); page-ready only when the
#   guest can take an exception now (kvm_can_do_async_pf), no interrupt, no ACK. CPUID bit 4 only.
# - `ve`: not-present as #VE (vector 20) through a virtualization-exception information area that the guest places
#   with MSR_APF_EMU_VE_INFO (shared/ve_info.py), as Vitaly Kuznetsov's "Grand Plan" and Paolo Bonzini proposed in
#   2020; page-ready as in `int`. Never merged: the delivery rules are apf-emu's design, after the SDM's.
# - `int-error`: `int` with Vivek Goyal's RFC "kvm,x86: Report async page fault error" (June 2020): CPUID bit 15,
#   MSR_KVM_ASYNC_PF_EN bit 4 SEND_ERROR, `ready_flags` @8 with PAGE_ERROR written with the token; a failed page-in
#   that was not reported makes the next fault on its gfn synchronous (`error_gfn`), and that fault exits to the
#   VMM. Never merged.
#
# Adding an ABI: its name and CPUID here, its delivery in host_daemon/vcpu.py (`_async_page_not_present`, and
# page-ready where it differs), its handler in guest_agent/apf.py and its vector in guest_agent/kernel.py.
from __future__ import annotations

from typing import Final

from .abi import APF_EMU_CPUID_FEATURES, KVM_FEATURE_ASYNC_PF, KVM_FEATURE_ASYNC_PF_ERROR, KVM_FEATURE_ASYNC_PF_VE

ABIS: Final = ("int", "pf", "ve", "int-error")
DEFAULT_ABI: Final = "int"
CPUID: Final = {
    "int": APF_EMU_CPUID_FEATURES,
    "pf": KVM_FEATURE_ASYNC_PF,  # a 5.7 host knows nothing of KVM_FEATURE_ASYNC_PF_INT
    "ve": APF_EMU_CPUID_FEATURES | KVM_FEATURE_ASYNC_PF_VE,
    "int-error": APF_EMU_CPUID_FEATURES | KVM_FEATURE_ASYNC_PF_ERROR,
}
DESCRIPTIONS: Final = {
    "int": "Linux 5.8+ and KVM today: not-present #PF (flags, CR2 = token), page-ready interrupt with ACK",
    "pf": "Linux and KVM 5.7: both events as #PF with CR2 = token and one `reason` field, page-ready when the "
          "guest can take an exception, no ACK (the ABI the seed thread replaced)",
    "ve": "not-present as #VE through an information area (apf-emu's design of the unmerged proposal), page-ready "
          "as an interrupt",
    "int-error": "int, and a failed page-in reported with its page-ready (Vivek Goyal's RFC, June 2020), or else "
                 "the next fault on it synchronous and an exit to the VMM",
}
