# A misbehaving client on its own vCPU while two normal guests run: whatever it writes into the memory it was given
# (the EPT it may only read, its control block, its APF area) or holds (an access to a shared page it never ends)
# reaches at most itself. For each kind: the normal guests' data checks all pass, `apf-emu check` passes on the logs,
# and their page-ready rate stays at least half of what it was before the client started (measured by the host's
# log, same window length before and during). Also: `hello` with any value in any field never crashes a connection
# handler and never keeps a real guest from claiming the vCPU.
from __future__ import annotations

import mmap
import os
import random
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import msgpack
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from guest_agent.memory import SLOT_PATTERNS, Access, GuestMemoryAccess, SlotCheck, shared_pages, slot_pattern_byte
from shared.abi import (
    KVM_APF_WAKE_ALL_TOKEN,
    MSR_KVM_ASYNC_PF_ACK,
)
from shared.apf_data import KvmVcpuPvApfData
from shared.guest_ram import PAGE_SIZE, GuestRam, RamLayout, vm_shm_names
from shared.views import CTL_CR2, CTL_IN_ACCESS, CTL_IRR, CTL_PF_SEQ, GuestViews, ept_size
from shared.wire import HEADER, PROTOCOL_VERSION, ErrorReply, Hello, Resume, Welcome

from .helpers import ROOT, GuestProcess, HostProcess, WireClient, read_events, wait_for_events, wait_until

PAGES, RESIDENT = 256, 160
WINDOW_S = 2.0
PACE_S = 0.0005  # the client misbehaves about 2,000 times a second, not as fast as it can: its CPU is not the point


class Client:
    """vCPU 2, scripted. Its interrupts (socket frames) are read and dropped by `drain`."""

    def __init__(self, host: HostProcess, vm_id: str) -> None:
        self.c = WireClient(host.socket)
        reply = self.c.request(Hello(PROTOCOL_VERSION, vm_id, 2, 1, "normal", os.getpid(), "socket"))
        assert isinstance(reply, Welcome)
        fds = self.c.chan.take_fds()
        self.ept_fd = os.dup(fds[0])  # what a guest keeps of welcome's EPT descriptor
        self.views = self.c.views = GuestViews(fds, PAGES)
        self.ram = GuestRam.open(vm_id, RamLayout(PAGES))
        self.rng = random.Random(7)

    def fault(self, gfn: int, *, user: bool = True, irq: bool = True) -> object:
        return self.c.exit_mem(gfn, user=user, irq=irq)

    def close(self) -> None:
        os.close(self.ept_fd)
        self.ram.close()
        self.c.close()


def garbage_in_the_ept(client: Client, stop: threading.Event) -> None:
    """Try every way to write the EPT a guest has; then act on a garbage private copy of it (touching what it says
    is out), which only changes what this vCPU asks for."""
    ept = client.views.ept
    with pytest.raises(PermissionError):
        mmap.mmap(client.ept_fd, ept_size(PAGES))  # a shared writable mapping
    with pytest.raises(PermissionError):
        os.pwrite(client.ept_fd, b"\xff" * 64, 0)
    path = f"/proc/self/fd/{client.ept_fd}"
    wfd = os.open(path, os.O_RDWR)  # opening the memfd afresh for writing succeeds, writing through it does not
    try:
        with pytest.raises(PermissionError):
            os.pwrite(wfd, b"\xff" * 64, 0)
        with pytest.raises(PermissionError):
            mmap.mmap(wfd, ept_size(PAGES))
    finally:
        os.close(wfd)
    private = mmap.mmap(client.ept_fd, ept_size(PAGES), flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    view = memoryview(private).cast("I")
    while not stop.is_set():
        g = client.rng.randrange(PAGES)
        view[g] = client.rng.getrandbits(32)
        if not view[g] & 1:
            client.fault(g, irq=False)  # a synchronous fault on whatever its garbage says is out
        time.sleep(PACE_S)
    assert ept.u32[0] == ept.u32[0]  # still mapped and readable
    view.release()
    private.close()


def garbage_in_its_control_block(client: Client, stop: threading.Event) -> None:
    """Its own block is the only one it can reach (no object a guest can name holds another vCPU's block, or a
    block of a vCPU that does not exist); it fills it with garbage, in_access included: markers of pages the normal
    guests use, of pages that do not exist, anything."""
    u32 = client.views.ctl.u32
    shared = shared_pages(PAGES)
    while not stop.is_set():
        r = client.rng.random()
        u32[CTL_IN_ACCESS] = (client.rng.choice(shared) + 1 if r < 0.5 else client.rng.getrandbits(32))
        u32[CTL_CR2] = client.rng.getrandbits(32)
        u32[CTL_PF_SEQ] = client.rng.getrandbits(32)
        u32[CTL_IRR + client.rng.randrange(256)] = client.rng.getrandbits(32)
        time.sleep(PACE_S)
    u32[CTL_IN_ACCESS] = client.rng.choice(shared) + 1  # and leaves a marker behind


def garbage_in_its_apf_area(client: Client, stop: threading.Event) -> None:
    """APF enabled, then its area scribbled over while it takes async page faults and ACKs at random."""
    area = KvmVcpuPvApfData(client.ram.u32, 2 * 64)
    client.c.enable_apf(None, gpa=2 * 64)
    try:
        while not stop.is_set():
            area.flags = client.rng.getrandbits(32)
            area.token = client.rng.choice([0, KVM_APF_WAKE_ALL_TOKEN, client.rng.getrandbits(32)])
            client.fault(client.rng.randrange(PAGES))
            client.c.wrmsr(MSR_KVM_ASYNC_PF_ACK, client.rng.getrandbits(64))
            time.sleep(PACE_S)
    finally:
        area.release()


def stopped_inside_a_shared_page(client: Client, stop: threading.Event) -> None:
    """Inside an access to a shared page every normal guest uses, having written its slot, and never leaving it (a
    SIGSTOPped vCPU). The page must not be evicted under it: what it wrote is still there at the end."""
    gfn = shared_pages(PAGES)[0]
    mem = GuestMemoryAccess(client.ram, client.views, vcpus=3)
    while (status := mem.update_shared(gfn, 2, None, 1 << 16 | 2 << 8, SlotCheck())[0]) is not Access.DONE:
        if status is Access.EXIT:
            assert client.fault(gfn, irq=False) == Resume(gfn * PAGE_SIZE)
    client.views.ctl.u32[CTL_IN_ACCESS] = gfn + 1  # enters again, and stays
    base = (gfn * PAGE_SIZE + 2 * 64) >> 2
    seq = int(client.ram.u32[base]) + 1
    client.ram.u32[base] = seq
    client.ram.mem[(base + 3) * 4 : (base + 15) * 4] = SLOT_PATTERNS[slot_pattern_byte(gfn, 2, seq)]
    client.ram.u32[base + 15] = seq
    stop.wait()
    assert mem.present(gfn)
    assert (client.ram.u32[base], client.ram.u32[base + 15]) == (seq, seq)
    del mem


MISBEHAVIOURS: dict[str, Callable[[Client, threading.Event], None]] = {
    "ept": garbage_in_the_ept,
    "control_block": garbage_in_its_control_block,
    "apf_area": garbage_in_its_apf_area,
    "stopped_in_shared_page": stopped_inside_a_shared_page,
}


def readies(host: HostProcess, start_ns: int, end_ns: int) -> int:
    return sum(1 for e in host.events() if e["event"] == "kvm_async_pf_ready" and e["vcpu"] in (0, 1)
               and e["token"] != KVM_APF_WAKE_ALL_TOKEN and start_ns <= e["mono_ns"] < end_ns)


def window() -> tuple[int, int]:
    start = time.monotonic_ns()
    time.sleep(WINDOW_S)  # a measurement window, not a synchronisation
    return start, time.monotonic_ns()


@pytest.mark.parametrize("kind", sorted(MISBEHAVIOURS))
def test_a_misbehaving_client_hurts_only_itself(tmp_path, vm_id, kind):
    host = HostProcess(tmp_path, vm_id, "--vcpus", "3", "--pages", str(PAGES), "--resident", str(RESIDENT),
                       "--page-in-latency", "exp:1ms")
    guests = [GuestProcess(host, v, "--tasks", "4", "--shared-ratio", "0.3") for v in (0, 1)]
    client = None
    try:
        for g in guests:
            wait_for_events(g.log, "guest_apf_wait", 30)
        before = readies(host, *window())
        client = Client(host, vm_id)
        names = {f"/{n}" for n in os.listdir("/dev/shm") if vm_id in n}
        assert names == set(vm_shm_names(vm_id))  # nothing else a guest could open by name
        assert os.stat(f"/dev/shm{vm_shm_names(vm_id)[0]}").st_size == PAGES * PAGE_SIZE  # RAM, and only RAM
        stop = threading.Event()
        errors: list[BaseException] = []

        def misbehave() -> None:
            try:
                MISBEHAVIOURS[kind](client, stop)  # type: ignore[arg-type]
            except BaseException as exc:  # reported below
                errors.append(exc)

        thread = threading.Thread(target=misbehave)
        thread.start()
        during = readies(host, *window())
        stop.set()
        thread.join(10)
        assert not errors, errors
        for g in guests:
            assert g.stop() == 0
    finally:
        if client is not None:
            client.close()
        for g in guests:
            if g.proc.poll() is None:
                g.proc.kill()
        assert host.stop() == 0
    print(f"{kind}: page-ready of the normal guests in {WINDOW_S} s: {before} before, {during} during")
    assert during >= before / 2, (before, during)
    for v in (0, 1):
        shutdown = next(e for e in read_events(tmp_path / f"guest-{v}.jsonl") if e["event"] == "guest_shutdown")
        assert shutdown["data_check_failures"] == 0 and shutdown["data_checks"] > 100
        assert shutdown["shared_accesses"] > 10
    proc = subprocess.run([sys.executable, "-m", "apf_emu", "check", "--json", str(tmp_path)], cwd=ROOT,
                          capture_output=True, text=True)
    assert proc.returncode in (0, 1), proc.stderr[-2000:]
    # the client's own page-readies may wait long behind the garbage it keeps in its own slot: that hurts only it
    others = [v for v in map(orjson.loads, proc.stdout.splitlines())
              if not (v["invariant"] == "ready_latency" and v["event"].get("vcpu") == 2)]
    assert others == [], others[:3]
    assert not [e for e in read_events(tmp_path / "host.jsonl") if e["event"] == "vcpu_crash"]


# --- hello, with anything in any field --------------------------------------------------------------------------
ANY_VALUE = st.one_of(
    st.integers(min_value=-(1 << 63), max_value=(1 << 64) - 1),
    st.sampled_from([0, 1, -1, 2, 63, 64, 1 << 31, (1 << 32) - 1, 1 << 32, (1 << 63) - 1, (1 << 64) - 1, 1 << 22,
                     (1 << 22) + 1]),
    st.none(), st.booleans(), st.text(max_size=60), st.binary(max_size=20), st.floats(allow_nan=True),
    st.lists(st.integers(0, 3), max_size=3),
)
HELLO_FIELDS = ["proto", "vm", "vcpu", "boot", "kind", "pid", "transport"]


@pytest.fixture
def hello_host(tmp_path, vm_id):
    host = HostProcess(tmp_path, vm_id, "--vcpus", "2", "--pages", "64", "--resident", "32", "--page-in-latency", "0")
    yield host
    assert host.stop() == 0
    assert not [e for e in host.events() if e["event"] == "vcpu_crash"]


def send_hello(host: HostProcess, **fields: object) -> Welcome | ErrorReply:
    """One hello with whatever values, on a connection of its own; the reply. A refused connection is closed by the
    host; a welcomed one is closed here, and the host has let its vCPU go when this returns."""
    hello = dict(proto=PROTOCOL_VERSION, vm=host.vm, vcpu=0, boot=0, kind="normal", pid=os.getpid(),
                 transport="socket")
    hello.update(fields)
    c = WireClient(host.socket)
    try:
        payload = msgpack.packb({"t": "hello", **hello})
        c.send_raw(HEADER.pack(len(payload)) + payload)
        reply = c.receive()
        assert isinstance(reply, Welcome | ErrorReply), reply
        if isinstance(reply, ErrorReply):
            assert reply.fatal and reply.code in (
                "bad_version", "wrong_vm", "bad_field", "bad_pid", "bad_vcpu", "vcpu_busy", "no_vcpu", "malformed")
            assert c.receive() is None  # and closed
    finally:
        for fd in c.chan.take_fds():
            os.close(fd)
        c.close()
    if isinstance(reply, Welcome):
        wait_until(lambda: not _holds(host, reply.vcpu, reply.boot), 5, "the host to let the vCPU go")
    return reply


def _holds(host: HostProcess, vcpu: int, boot: int) -> bool:
    """Whether the host log shows vCPU `vcpu` connected as `boot` and not disconnected since."""
    held = False
    for e in host.events():
        if e.get("vcpu") == vcpu and e["event"] in ("vcpu_connect", "vcpu_disconnect"):
            held = e["event"] == "vcpu_connect" and e["boot"] == boot
    return held


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture], deadline=None)
@given(field=st.sampled_from(HELLO_FIELDS), value=ANY_VALUE, vcpu=st.sampled_from([0, 1, None]))
def test_any_hello_then_a_claim(hello_host, field, value, vcpu):
    host = hello_host
    send_hello(host, **{"vcpu": vcpu, field: value})
    # the vCPU it named (or 0) is claimed next, by a guest that asks the host to number its boot: whatever the hello
    # was, the vCPU is free again (a refusal claims nothing; a welcomed connection was closed and let go)
    target = value if field == "vcpu" and type(value) is int and value in (0, 1) else (vcpu if vcpu is not None else 0)
    claim = WireClient(host.socket)
    try:
        welcome = claim.hello(host.vm, vcpu=target, boot=0)
        assert isinstance(welcome, Welcome) and welcome.vcpu == target, welcome
        assert 1 <= welcome.boot <= (1 << 32) - 1
    finally:
        claim.close()


def test_after_the_worst_hellos_a_real_guest_claims_the_vcpu_and_runs(hello_host, tmp_path):
    """The report's case (vcpu 0, boot 2^64-1, then gone) and its neighbours, then the real apf-guest asking the host
    to number its boot: it gets vCPU 0, runs APF traffic and stops cleanly; no handler crashed."""
    host = hello_host
    for boot in ((1 << 64) - 1, 1 << 32, (1 << 32) - 1, -1):
        send_hello(host, boot=boot)
    for pid in (0, -5, 1 << 40, "1"):
        send_hello(host, pid=pid)
    guest = subprocess.Popen([sys.executable, "-m", "guest_agent", "--vm", host.vm, "--socket", str(host.socket),
                              "--log-dir", str(tmp_path), "--vcpu", "0", "--duration", "2"], cwd=ROOT)
    assert guest.wait(60) == 0
    events = read_events(Path(tmp_path) / "guest-0.jsonl")
    assert next(e for e in events if e["event"] == "guest_boot")["boot"] == 1  # after 2^32-1, numbering wraps
    shutdown = next(e for e in events if e["event"] == "guest_shutdown")
    assert shutdown["apf_waits"] > 0 and shutdown["data_check_failures"] == 0
    assert any(e["event"] == "boot_numbers_wrapped" for e in host.events())
