# KVM's APF tracepoints and kvm_msr as ftrace prints them: every version apf-emu reads, and the current one, which
# it writes. From include/trace/events/kvm.h and arch/x86/kvm/trace.h (the TP_printk strings are quoted per entry).
#
# `%#llx` of 0 is "0" where trace-cmd formats in user space (C's printf) and "0x0" in the kernel's own
# /sys/kernel/tracing/trace (vsprintf): both are read. kvm_msr's data is printed "0x%llx", always with 0x; its MSR
# number "%x", without. The field KVM calls `gva` is `cr2_or_gpa`: under TDP a guest-physical address.
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final

HEX: Final = r"(0x[0-9a-fA-F]+|0)"  # %#llx / %#lx: 0x-prefixed, or a bare 0 (user-space printf of zero)
HEX_ANY: Final = r"((?:0x)?[0-9a-fA-F]+)"  # %lx (the 2010 postings' pfn): no prefix


@dataclass(frozen=True)
class Format:
    tracepoint: str  # the name ftrace prints
    event: str  # the apf-emu event it becomes (docs/LOGGING.md)
    pattern: re.Pattern[str]
    fields: tuple[str, ...]  # the pattern's groups, in order
    kernels: str  # which kernels print it (docs/TRACING.md)


def _f(tracepoint: str, event: str, regex: str, fields: tuple[str, ...], kernels: str) -> Format:
    return Format(tracepoint, event, re.compile(regex + r"\s*$"), fields, kernels)


FORMATS: Final = (
    # DECLARE_EVENT_CLASS(kvm_async_pf_nopresent_ready): TP_printk("token %#llx gva %#llx")
    _f("kvm_async_pf_not_present", "kvm_async_pf_not_present", rf"token {HEX} gva {HEX}", ("token", "gva"),
       "2.6.38 to now"),
    _f("kvm_async_pf_ready", "kvm_async_pf_ready", rf"token {HEX} gva {HEX}", ("token", "gva"), "2.6.38 to now"),
    # 7c90705bf2a3 (Oct 2010): "token %#llx gva %#llx not present" / "token %#llx gva %#llx ready"
    _f("kvm_async_pf_not_present", "kvm_async_pf_not_present", rf"token {HEX} gva {HEX} not present",
       ("token", "gva"), "kvm.git, Oct 2010 (7c90705bf2a3)"),
    _f("kvm_async_pf_ready", "kvm_async_pf_ready", rf"token {HEX} gva {HEX} ready", ("token", "gva"),
       "kvm.git, Oct 2010 (7c90705bf2a3)"),
    # af585b921e5d (Oct 2010, before tokens): "gva %#llx not present" / "gva %#llx ready"
    _f("kvm_async_pf_not_present", "kvm_async_pf_not_present", rf"gva {HEX} not present", ("gva",),
       "kvm.git, Oct 2010 (af585b921e5d)"),
    _f("kvm_async_pf_ready", "kvm_async_pf_ready", rf"gva {HEX} ready", ("gva",),
       "kvm.git, Oct 2010 (af585b921e5d)"),
    # TRACE_EVENT(kvm_async_pf_completed): "gva %#llx address %#lx" since f2e106692d51 (3.13); before it
    # "gva %#llx address %#lx pfn %#llx" (2.6.38-3.12), and "pfn %lx" in the 2010 postings
    _f("kvm_async_pf_completed", "kvm_async_pf_completed", rf"gva {HEX} address {HEX}", ("gva", "address"),
       "3.13 to now"),
    _f("kvm_async_pf_completed", "kvm_async_pf_completed", rf"gva {HEX} address {HEX} pfn {HEX_ANY}",
       ("gva", "address", "pfn"), "2.6.38 to 3.12"),
    # DECLARE_EVENT_CLASS(kvm_async_get_page_class): "gva = %#llx, gfn = %#llx"
    _f("kvm_try_async_get_page", "kvm_try_async_get_page", rf"gva = {HEX}, gfn = {HEX}", ("gva", "gfn"),
       "2.6.38 to now"),
    _f("kvm_try_async_get_page", "kvm_try_async_get_page", rf"pfn {HEX}", ("pfn",),
       "kvm.git, Oct 2010 (af585b921e5d: async, pfn)"),
    _f("kvm_async_pf_repeated_fault", "kvm_async_pf_repeated_fault", rf"gva = {HEX}, gfn = {HEX}", ("gva", "gfn"),
       "about 6.1 to now"),
    _f("kvm_async_pf_doublefault", "kvm_async_pf_repeated_fault", rf"gva = {HEX}, gfn = {HEX}", ("gva", "gfn"),
       "2.6.38 to about 6.0"),
    # TRACE_EVENT(kvm_msr): "msr_%s %x = 0x%llx%s" (" (#GP)" on an exception); before ~3.0 "msr_%s %x = 0x%lx"
    _f("kvm_msr", "kvm_msr", r"msr_(read|write) ([0-9a-fA-F]+) = (0x[0-9a-fA-F]+)( \(#GP\))?",
       ("direction", "msr", "value", "gp"), "2.6.32 to now"),
)

BY_TRACEPOINT: Final[dict[str, tuple[Format, ...]]] = {}
for _fmt in FORMATS:
    BY_TRACEPOINT[_fmt.tracepoint] = (*BY_TRACEPOINT.get(_fmt.tracepoint, ()), _fmt)


def parse_printk(tracepoint: str, text: str) -> tuple[Format, dict[str, int | str | None]] | None:
    """The format of `tracepoint` that `text` is printed in, and its fields (numbers as ints); None if no known
    format of it matches (or the tracepoint is not one of these)."""
    for fmt in BY_TRACEPOINT.get(tracepoint, ()):
        m = fmt.pattern.match(text)
        if m is None:
            continue
        out: dict[str, int | str | None] = {}
        for name, value in zip(fmt.fields, m.groups(), strict=True):
            if name in ("direction", "gp"):
                out[name] = value
            elif name == "msr":
                out[name] = int(value, 16)
            else:
                out[name] = int(value, 16) if value is not None else None
        return fmt, out
    return None


# --- writing: the current formats, as `trace-cmd report` prints them ------------------------------------------------
def llx(value: int) -> str:
    """`%#llx` as trace-cmd prints it (user-space printf: 0 is "0")."""
    return f"{value:#x}" if value else "0"


def printk(tracepoint: str, **v: int) -> str:
    """The TP_printk text of today's kernels for one of these tracepoints."""
    if tracepoint in ("kvm_async_pf_not_present", "kvm_async_pf_ready"):
        return f"token {llx(v['token'])} gva {llx(v['gva'])}"
    if tracepoint == "kvm_async_pf_completed":
        return f"gva {llx(v['gva'])} address {llx(v['address'])}"
    if tracepoint in ("kvm_try_async_get_page", "kvm_async_pf_repeated_fault"):
        return f"gva = {llx(v['gva'])}, gfn = {llx(v['gfn'])}"
    if tracepoint == "kvm_msr":
        return (f"msr_{'write' if v['write'] else 'read'} {v['msr']:x} = 0x{v['value']:x}"
                + (" (#GP)" if v.get("gp") else ""))
    raise KeyError(tracepoint)
