"""The protocol floor: the least an APF cycle needs in this stack, to measure the emulator's cycle against.

A minimal host, in trio as the host daemon is, and the same blocking guest as bench/apf_cycle.py (its `Guest`: the
handshake, the guest RAM in POSIX shm with `struct kvm_vcpu_pv_apf_data` at gpa 0, the control block, the same
waits) run the cycle's frames and nothing else:

  exit_mem                 -> flags = KVM_PV_REASON_PAGE_NOT_PRESENT in the area, #PF with CR2 = token
                              (a frame, or CR2 and pf_seq in the control block and SIGRTMIN)
  (the page is "in" at once: no page-in, no EPT, no eviction)
                           -> the token slot read (it must be free), the token written, the page-ready interrupt
                              (a frame, or the vector's raise counter and its signal)
  wrmsr MSR_KVM_ASYNC_PF_ACK -> msr_result

The host writes one JSON line per host event of the cycle (kvm_try_async_get_page, kvm_async_pf_not_present,
kvm_async_pf_completed, kvm_async_pf_ready, apf_ack) with the fields and stamps of the emulator's lines, rendered by
orjson and written with one unbuffered os.write each, as the emulator's host does, so that a SIGKILL loses none.
What the emulator does beyond this (the MSR and fault state machine of host_daemon/vcpu.py, the page-in and EPT,
structlog's bound loggers) is what its cycle costs over the floor.

Usage: python -m bench.protocol_floor [--cycles N] [--transport socket|signal]
"""
from __future__ import annotations

import argparse
import contextlib
import mmap
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


# --- the host (a child process) ---------------------------------------------------------------------------------
async def _serve(path: str, vm: str, transport: str, log_path: str) -> None:
    import orjson
    import trio

    from shared.abi import (
        KVM_APF_WAKE_ALL_TOKEN,
        KVM_PV_REASON_PAGE_NOT_PRESENT,
        MSR_KVM_ASYNC_PF_ACK,
        MSR_KVM_ASYNC_PF_EN,
        MSR_KVM_ASYNC_PF_INT,
        AsyncPfEn,
        alloc_apf_token,
    )
    from shared.apf_data import KvmVcpuPvApfData
    from shared.channel import MessageChannel
    from shared.guest_ram import PAGE_SIZE, GuestRam, RamLayout
    from shared.log import add_stamps
    from shared.signals import SIG_PF, vector_signal
    from shared.views import CTL_CR2, CTL_EXC_VECTOR, CTL_IRR, CTL_PF_SEQ, CTL_SIZE, ept_size
    from shared.wire import (
        GUEST_TO_HOST,
        PROTOCOL_VERSION,
        ExitMem,
        Hello,
        InjectException,
        Interrupt,
        MsrResult,
        MsrWrite,
        Welcome,
    )

    from .apf_cycle import PAGES

    ram = GuestRam.create(vm, RamLayout(PAGES))
    ept_fd, ctl_fd = os.memfd_create("floor-ept"), os.memfd_create("floor-ctl")
    os.ftruncate(ept_fd, ept_size(PAGES))
    os.ftruncate(ctl_fd, CTL_SIZE)
    ctl_map = mmap.mmap(ctl_fd, CTL_SIZE)
    ctl = memoryview(ctl_map).cast("I")
    log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    pid = os.getpid()

    def log(event: str, **fields: int | bool | None) -> None:
        """A line as the emulator's host writes it: its context, fields, event and stamps (shared/log.py)."""
        line = {"role": "host", "vm": vm, "vcpu": 0, "boot": 1, "pid": pid, **fields, "event": event}
        os.write(log_fd, orjson.dumps(add_stamps(None, "info", line)) + b"\n")

    listener = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
    await listener.bind(path)
    listener.listen(1)
    sock, _ = await listener.accept()
    chan = MessageChannel(trio.SocketStream(sock), GUEST_TO_HOST)
    pidfd = -1
    area: KvmVcpuPvApfData | None = None
    vector, apf_id, pf_seq, irr = 0, 0, 0, 0
    try:
        hello = await chan.receive()
        assert isinstance(hello, Hello), hello
        if transport == "signal":
            pidfd = os.pidfd_open(hello.pid)
        await chan.send_with_fds([ept_fd, ctl_fd], Welcome(PROTOCOL_VERSION, vm, 0, 1, 1, PAGES, PAGE_SIZE,
                                                           ram.name, 0))

        async def interrupt() -> None:
            nonlocal irr
            if transport == "socket":
                await chan.send(Interrupt(vector))
            else:
                irr = (irr + 1) & 0xFFFFFFFF
                ctl[CTL_IRR + vector] = irr
                signal.pidfd_send_signal(pidfd, vector_signal(vector))

        while (msg := await chan.receive()) is not None:
            if isinstance(msg, ExitMem):
                gfn = msg.gpa // PAGE_SIZE
                assert area is not None
                log("kvm_try_async_get_page", gva=msg.gpa, gfn=gfn)
                apf_id, token = alloc_apf_token(apf_id, 0)
                area.flags = KVM_PV_REASON_PAGE_NOT_PRESENT
                log("kvm_async_pf_not_present", token=token, gva=msg.gpa, gfn=gfn, injected=True)
                if transport == "socket":
                    await chan.send(InjectException(14, token))
                else:
                    ctl[CTL_CR2] = token
                    ctl[CTL_EXC_VECTOR] = 14
                    pf_seq = (pf_seq + 1) & 0xFFFFFFFF
                    ctl[CTL_PF_SEQ] = pf_seq
                    signal.pidfd_send_signal(pidfd, SIG_PF)
                log("kvm_async_pf_completed", address=ram.hva_base + gfn * PAGE_SIZE, gva=msg.gpa, token=token, gfn=gfn)
                if area.token == 0:  # the slot is free: the page-ready goes now (else at the guest's ACK)
                    area.token = token
                    log("kvm_async_pf_ready", token=token, gva=msg.gpa, gfn=gfn, injected=True, vector=vector,
                        released=None)
                    await interrupt()
            elif isinstance(msg, MsrWrite):
                if msg.msr == MSR_KVM_ASYNC_PF_ACK:
                    log("apf_ack", value=msg.value)
                elif msg.msr == MSR_KVM_ASYNC_PF_INT:
                    vector = msg.value & 0xFF
                elif msg.msr == MSR_KVM_ASYNC_PF_EN:
                    area = KvmVcpuPvApfData(ram.u32, AsyncPfEn(msg.value).gpa)
                    area.token = KVM_APF_WAKE_ALL_TOKEN  # the wake-all that enabling queues
                    await interrupt()
                await chan.send(MsrResult(msg.msr, True, None))
    finally:
        if area is not None:
            area.release()
        ctl.release()
        ctl_map.close()
        for fd in (ept_fd, ctl_fd, log_fd, *([pidfd] if pidfd >= 0 else [])):
            os.close(fd)
        ram.close()  # unlinks the object: the guest keeps its own mapping until it closes


def serve_main(path: str, vm: str, transport: str, log_path: str) -> None:
    import trio

    with contextlib.suppress(KeyboardInterrupt):
        trio.run(_serve, path, vm, transport, log_path)


# --- the guest (this process) -----------------------------------------------------------------------------------
def measure(transport: str, cycles: int = 2000) -> dict[str, Any]:
    """The floor's cycle on `transport`: p50 of each step and of the whole cycle (µs), as bench.apf_cycle reports
    the emulator's."""
    from shared.guest_ram import shm_name, unlink

    from .apf_cycle import STEPS, cycles_against

    vm = f"floor{os.getpid()}{transport[:3]}"
    with tempfile.TemporaryDirectory(prefix="apf-floor-") as tmp:
        sock, log_path = Path(tmp) / "floor.sock", Path(tmp) / "host.jsonl"
        server = subprocess.Popen([sys.executable, "-m", "bench.protocol_floor", "--serve", transport, str(sock), vm,
                                   str(log_path)], cwd=ROOT)
        try:
            result = cycles_against(server, sock, vm, transport, cycles, log_path, "the protocol floor's host")
        finally:
            try:
                server.wait(10)  # it ends with our connection
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()
            unlink(shm_name(vm))  # gone already unless its host was killed
    assert set(STEPS) <= set(result.hist)
    return result.summary()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--serve", nargs=4, metavar=("TRANSPORT", "PATH", "VM", "LOG"), help=argparse.SUPPRESS)
    p.add_argument("--cycles", type=int, default=2000)
    p.add_argument("--transport", choices=["socket", "signal"], default=None, help="default: both")
    args = p.parse_args()
    if args.serve:
        transport, path, vm, log_path = args.serve
        serve_main(path, vm, transport, log_path)
        return
    for transport in [args.transport] if args.transport else ["socket", "signal"]:
        r = measure(transport, args.cycles)
        print(f"{transport:7} " + "  ".join(f"{step} p50 {v['p50_us']:6.1f} us" for step, v in r.items()))


if __name__ == "__main__":
    main()
