# Page-ins over time (host_daemon/pager.py): latency specifications, and concurrent page-ins of one gfn.
from __future__ import annotations

import random

import pytest
import trio

from host_daemon.pager import Pager
from shared.config import PageInErrors, PageInLatency


@pytest.mark.parametrize(
    "spec,kind,a,b",
    [("0", "fixed", 0, 0), ("fixed:2ms", "fixed", 0.002, 0), ("exp:150us", "exp", 150e-6, 0),
     ("uniform:1ms:3ms", "uniform", 0.001, 0.003), ("fixed:0.5s", "fixed", 0.5, 0), ("fixed:3", "fixed", 0.003, 0)],
)
def test_latency_specs(spec, kind, a, b):
    lat = PageInLatency.parse(spec)
    assert (lat.kind, lat.a, lat.b) == (kind, pytest.approx(a), pytest.approx(b))
    s = lat.sample(random.Random(0))
    assert s >= 0 and (kind != "uniform" or a <= s <= b)


@pytest.mark.parametrize("spec", ["", "exp", "fixed:-1ms", "uniform:3ms:1ms", "gauss:1ms", "fixed:1h", "fixed:61s"])
def test_bad_latency_specs_are_refused(spec):
    with pytest.raises(ValueError, match="page-in latency"):
        PageInLatency.parse(spec)


async def test_concurrent_page_ins_of_one_gfn_share_one_copy(make_vm, nursery):
    vm = make_vm(16)
    pager = Pager(vm.memory(4), PageInLatency.parse("fixed:5ms"), random.Random(0))
    e1 = pager.start_page_in(9, nursery)
    e2 = pager.start_page_in(9, nursery)
    assert e1 is e2 and pager.paging_in(9)
    await e1.wait()
    assert pager.memory.stats.page_ins == 1 and pager.memory.present(9) and not pager.paging_in(9)


async def test_fault_in_waits_for_the_latency_only_when_the_page_is_out(make_vm, nursery, autojump_clock):
    vm = make_vm(16)
    pager = Pager(vm.memory(4), PageInLatency.parse("fixed:50s"), random.Random(0))
    start = trio.current_time()  # virtual time (autojump clock): nothing here waits for real
    await pager.fault_in(1, nursery)  # resident at boot
    assert trio.current_time() == start and pager.memory.stats.page_ins == 0
    await pager.fault_in(9, nursery)
    assert trio.current_time() - start == pytest.approx(50) and pager.memory.present(9)


@pytest.mark.parametrize("spec,bad", [("gfns:9-10", True), ("gfns:3", False), ("rate:1", True), ("none", False)])
async def test_a_failed_page_in_leaves_the_page_out_and_says_so(make_vm, nursery, spec, bad):
    vm = make_vm(16)
    pager = Pager(vm.memory(4), PageInLatency.parse("0"), random.Random(0), PageInErrors.parse(spec))
    page_in = pager.start_page_in(9, nursery)
    await page_in.wait()
    assert page_in.failed is bad and pager.memory.present(9) is not bad
    assert await pager.fault_in(9, nursery) is not bad


@pytest.mark.parametrize("spec", ["gfns:", "gfns:9-3", "rate:2", "sometimes", "rate:-0.1"])
def test_bad_page_in_error_specs_are_refused(spec):
    with pytest.raises(ValueError, match="page-in errors"):
        PageInErrors.parse(spec)
