# The signal transport: coalescing is real and harmless, only verified PIDs are signalled, and under stress the
# interleavings the seed thread worries about all happen while every invariant holds.
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import orjson
import pytest

from apf_emu.stats import INTERLEAVINGS
from host_daemon.guest_views import ControlBlock
from shared.signals import SIG_PF, interrupt_signals, signal_vectors, vector_signal
from shared.views import CTL_IRR
from shared.wire import ErrorReply, Welcome

from .helpers import ROOT, HostProcess, WireClient, wait_until

CHILD = textwrap.dedent(
    """
    import signal, sys
    from guest_agent.transports.signal import IrrReader
    from shared.signals import vector_signal
    from shared.views import CTL_IRR, CTL_SIZE, MappedFd
    fd, vector = int(sys.argv[1]), int(sys.argv[2])
    ctl = MappedFd(fd, CTL_SIZE, writable=True, what="control block")
    irr = IrrReader(ctl.u32, CTL_IRR, baseline=0)
    sig = vector_signal(vector)
    runs, raised = [], []
    signal.signal(sig, lambda s, f: (runs.append(s), raised.extend(irr.raised(s))))
    signal.pthread_sigmask(signal.SIG_BLOCK, {sig})
    print("blocked", flush=True)
    sys.stdin.readline()
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {sig})
    print(len(runs), raised, flush=True)
    del irr
    ctl.close()
    """
)


def test_signal_mapping_orders_pf_first_and_higher_vector_classes_next():
    assert SIG_PF == signal.SIGRTMIN
    assert vector_signal(0xF3) < vector_signal(0x20) < vector_signal(0x0F)
    assert all(SIG_PF < s <= signal.SIGRTMAX for s in interrupt_signals())
    assert 0xF3 in signal_vectors(vector_signal(0xF3))
    assert {v for s in interrupt_signals() for v in signal_vectors(s)} == set(range(256))


def test_fifty_signals_can_arrive_as_one_and_the_vector_is_still_seen(vm_id):
    """Real coalescing: 50 queued signals, one Python handler run; the raise counter, not the signal count,
    tells the guest the vector was raised."""
    ctl = ControlBlock(vm_id, 0)
    try:
        child = subprocess.Popen([sys.executable, "-c", CHILD, str(ctl.fd), str(0xF3)], cwd=ROOT, stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, text=True, pass_fds=[ctl.fd])
        assert child.stdout.readline().strip() == "blocked"
        for _ in range(50):  # what the host's SignalNotifier does per raise
            ctl.u32[CTL_IRR + 0xF3] += 1
            os.kill(child.pid, vector_signal(0xF3))
        out, _ = child.communicate("go\n", timeout=30)
        runs, raised = out.split(" ", 1)
        assert child.returncode == 0
        assert 1 <= int(runs) < 50  # the signals merged
        assert raised.strip() == "[243]"  # and the vector was seen, once, as an IRR bit would be
    finally:
        ctl.close()


def test_host_signals_only_the_pid_the_kernel_vouches_for(tmp_path, vm_id):
    host = HostProcess(tmp_path, vm_id, "--vcpus", "2", "--pages", "16", "--resident", "8")
    try:
        liar = WireClient(host.socket)
        reply = liar.hello(vm_id, vcpu=0, pid=1, transport="signal")
        assert isinstance(reply, ErrorReply) and reply.code == "bad_pid" and reply.fatal
        liar.close()
        honest = WireClient(host.socket)
        assert isinstance(honest.hello(vm_id, vcpu=0, transport="signal"), Welcome)
        honest.close()
        wait_until(lambda: any(e["event"] == "vcpu_disconnect" for e in host.events()), 5, "the disconnect")
    finally:
        assert host.stop() == 0


def test_a_dead_guest_is_not_signalled_and_the_host_carries_on(tmp_path, vm_id):
    """A signal-transport guest killed with page-ins in flight: the host's page-ready finds no process (the pidfd
    refers to the dead one, never to a PID reuser), it resets the vCPU and keeps serving."""
    host = HostProcess(tmp_path, vm_id, "--vcpus", "2", "--page-in-latency", "fixed:200ms")
    guest = subprocess.Popen(
        [sys.executable, "-m", "guest_agent", "--vm", vm_id, "--socket", str(host.socket), "--log-dir", str(tmp_path),
         "--vcpu", "0", "--transport", "signal", "--tasks", "8"], cwd=ROOT)
    try:
        wait_until(lambda: any(e["event"] == "kvm_async_pf_not_present" for e in host.events()), 30, "an APF")
        guest.kill()
        guest.wait()
        wait_until(lambda: any(e["event"] == "vcpu_disconnect" for e in host.events()), 10, "the disconnect")
        events = host.events()
        assert not [e for e in events if e["event"] == "vcpu_crash"]
        # every APF of the dead guest was either delivered (a signal to a process that was gone) or eaten
        injected = {e["token"] for e in events if e["event"] == "kvm_async_pf_not_present"}
        settled = {e["token"] for e in events if e["event"] in ("kvm_async_pf_ready", "apf_ready_dropped")}
        assert injected and injected <= settled
        assert all(e["reason"] == "vcpu_reset" for e in events if e["event"] == "apf_ready_dropped")
        c = WireClient(host.socket)
        assert isinstance(c.hello(vm_id, vcpu=0), Welcome)  # the slot is free again
        c.close()
    finally:
        if guest.poll() is None:
            guest.kill()
        assert host.stop() == 0


# The re-init tests run a guest that clears its token slot on CPU online: Linux does not, and a page-ready taken
# while APF was off then blocks the vCPU's page-readies for good (the stale-slot race, docs/PROTOCOL.md section 10;
# tests/test_cores_together.py shows it on the exact cores).
def test_stress_provokes_every_interleaving_and_breaks_no_invariant(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "apf_emu", "run", "--json", "--transport", "signal", "--vcpus", "3", "--tasks", "6",
         "--duration", "6", "--apf-reinit-every", "0.4", "--online-clears-token", "--log-dir", str(tmp_path)],
        cwd=ROOT, capture_output=True, timeout=120,
    )
    summary = orjson.loads(proc.stdout)
    seen = summary["stats"]["interleavings"]
    print("interleavings:", ", ".join(f"{k}={seen[k]}" for k in INTERLEAVINGS))
    assert summary["violations"] == []
    assert proc.returncode == 0
    for name in ("ready_between_pf_and_flags", "ready_while_irqs_off", "back_to_back_readies",
                 "wake_all_raced_not_present"):
        assert seen[name] > 0, f"{name} never happened: {seen}"
    assert summary["stats"]["dropped"].get("apf_disabled", 0) > 0  # the re-inits really ate completions


@pytest.mark.parametrize("transport", ["socket", "signal"])
def test_apf_reinit_under_load_keeps_every_invariant(tmp_path, transport):
    proc = subprocess.run(
        [sys.executable, "-m", "apf_emu", "run", "--json", "--transport", transport, "--vcpus", "2",
         "--duration", "3", "--apf-reinit-every", "0.3", "--online-clears-token", "--log-dir", str(tmp_path)],
        cwd=ROOT, capture_output=True, timeout=120,
    )
    summary = orjson.loads(proc.stdout)
    assert proc.returncode == 0, summary["violations"][:3]
    assert summary["stats"]["events"]["guest_apf_reinit"] > 0
