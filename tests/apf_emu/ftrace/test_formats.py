# The tracepoint formats (apf_emu/ftrace/formats.py) against the kernel's TP_printk strings, printed as C prints
# them: include/trace/events/kvm.h (kvm_async_pf_nopresent_ready, kvm_async_get_page_class,
# kvm_async_pf_completed, and their 2010 forms) and arch/x86/kvm/trace.h (kvm_msr).
from __future__ import annotations

import pytest

from apf_emu.ftrace.formats import llx, parse_printk, printk

CASES = [
    # (tracepoint, text, event, fields)
    ("kvm_async_pf_not_present", "token 0x1000 gva 0x7a000", "kvm_async_pf_not_present",
     {"token": 0x1000, "gva": 0x7A000}),
    ("kvm_async_pf_ready", "token 0xffffffff gva 0", "kvm_async_pf_ready", {"token": 0xFFFFFFFF, "gva": 0}),
    ("kvm_async_pf_ready", "token 0xffffffff gva 0x0", "kvm_async_pf_ready", {"token": 0xFFFFFFFF, "gva": 0}),
    ("kvm_async_pf_not_present", "token 0x2001 gva 0x9000 not present", "kvm_async_pf_not_present",
     {"token": 0x2001, "gva": 0x9000}),
    ("kvm_async_pf_ready", "token 0x2001 gva 0x9000 ready", "kvm_async_pf_ready", {"token": 0x2001, "gva": 0x9000}),
    ("kvm_async_pf_not_present", "gva 0x8000 not present", "kvm_async_pf_not_present", {"gva": 0x8000}),
    ("kvm_async_pf_ready", "gva 0x8000 ready", "kvm_async_pf_ready", {"gva": 0x8000}),
    ("kvm_async_pf_completed", "gva 0x5000 address 0x7f0000005000", "kvm_async_pf_completed",
     {"gva": 0x5000, "address": 0x7F0000005000}),
    ("kvm_async_pf_completed", "gva 0 address 0x7f00 pfn 0x1a2b3", "kvm_async_pf_completed",
     {"gva": 0, "address": 0x7F00, "pfn": 0x1A2B3}),
    ("kvm_async_pf_completed", "gva 0x1 address 0x2 pfn 1a2b3", "kvm_async_pf_completed",
     {"gva": 1, "address": 2, "pfn": 0x1A2B3}),
    ("kvm_try_async_get_page", "gva = 0x7a010, gfn = 0x7a", "kvm_try_async_get_page", {"gva": 0x7A010, "gfn": 0x7A}),
    ("kvm_try_async_get_page", "pfn 0x1234", "kvm_try_async_get_page", {"pfn": 0x1234}),
    ("kvm_async_pf_repeated_fault", "gva = 0x7a010, gfn = 0x7a", "kvm_async_pf_repeated_fault",
     {"gva": 0x7A010, "gfn": 0x7A}),
    ("kvm_async_pf_doublefault", "gva = 0, gfn = 0", "kvm_async_pf_repeated_fault", {"gva": 0, "gfn": 0}),
    ("kvm_msr", "msr_write 4b564d02 = 0x2b2040009", "kvm_msr",
     {"direction": "write", "msr": 0x4B564D02, "value": 0x2B2040009, "gp": None}),
    ("kvm_msr", "msr_write 4b564d02 = 0x39 (#GP)", "kvm_msr",
     {"direction": "write", "msr": 0x4B564D02, "value": 0x39, "gp": " (#GP)"}),
    ("kvm_msr", "msr_read 4b564d07 = 0x0", "kvm_msr", {"direction": "read", "msr": 0x4B564D07, "value": 0, "gp": None}),
]


@pytest.mark.parametrize("tracepoint,text,event,fields", CASES)
def test_every_kernel_format_parses(tracepoint, text, event, fields):
    fmt, got = parse_printk(tracepoint, text)
    assert fmt.event == event
    assert got == fields


@pytest.mark.parametrize("tracepoint,text", [
    ("kvm_async_pf_ready", "token 0x"),  # cut
    ("kvm_async_pf_ready", "token 0x10 gva"),
    ("kvm_async_pf_not_present", "token 0x1000 gva 0x2000 extra"),
    ("kvm_async_pf_completed", "address 0x1 gva 0x2"),
    ("kvm_msr", "msr_write 4b564d02 = 2"),  # data is printed 0x%llx: always 0x
    ("sched_switch", "prev_comm=x"),
])
def test_other_text_is_not_a_format(tracepoint, text):
    assert parse_printk(tracepoint, text) is None


def test_written_text_is_todays_format_and_reads_back():
    """printk writes what today's TP_printk prints through trace-cmd (user-space printf: %#llx of 0 is "0")."""
    assert llx(0) == "0" and llx(0x1000) == "0x1000"
    assert printk("kvm_async_pf_ready", token=0xFFFFFFFF, gva=0) == "token 0xffffffff gva 0"
    assert printk("kvm_async_pf_completed", gva=0x5000, address=0x7F00) == "gva 0x5000 address 0x7f00"
    assert printk("kvm_try_async_get_page", gva=0x7A010, gfn=0x7A) == "gva = 0x7a010, gfn = 0x7a"
    assert printk("kvm_msr", write=1, msr=0x4B564D02, value=0, gp=1) == "msr_write 4b564d02 = 0x0 (#GP)"
    for tp, values in [("kvm_async_pf_not_present", {"token": 0x3001, "gva": 0x44000}),
                       ("kvm_async_pf_completed", {"gva": 0, "address": 0x7F0000000000}),
                       ("kvm_async_pf_repeated_fault", {"gva": 0x5008, "gfn": 5})]:
        fmt, got = parse_printk(tp, printk(tp, **values))
        assert got == values and fmt.kernels.endswith("to now")
