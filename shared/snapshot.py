# The VMM snapshot of an apf-emu VM: what `apf-emu snapshot` asks the host to write and `apf-emu restore` (the host's
# --restore) reads back, and the MSR lists a VMM saves. This module is the contract between the two ends and the
# command line: the directory layout, the manifest's typed form and its validation, and the MSR list's syntax.
#
# A snapshot directory holds
#   snapshot.json   the manifest (Manifest below): the VM, the MSR list used, and per vCPU the values RDMSR gave for
#                   each listed MSR, its interrupt state (the LAPIC's SPIV, a page-ready still pending) and its guest
#   ram.bin         guest RAM, every page
#   swap.bin        the host's backing store (residency, swap, saved registers: host_daemon/backing_store.py)
# What a VMM restores is only what its MSR list saved: an MSR left out comes back as a new vCPU has it, 0 (the
# Firecracker bug before PR 3064, which left out MSR_KVM_ASYNC_PF_INT).
from __future__ import annotations

import json
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from .abi import MSR_APF_EMU_VE_INFO, MSR_KVM_ASYNC_PF_EN, MSR_KVM_ASYNC_PF_INT, MSR_NAMES

MANIFEST: Final = "snapshot.json"
RAM: Final = "ram.bin"
SWAP: Final = "swap.bin"
FORMAT: Final = 1

KVM_MSR_RANGE: Final = range(0x4B564D00, 0x4B564E00)  # every KVM paravirtual MSR (Firecracker PR 5738 saves it all)
# Named lists, as VMMs keep them (the KVM MSRs of each; apf-emu's host has EN, INT, ACK and MSR_APF_EMU_VE_INFO, and
# RDMSR of the others fails, so a snapshot leaves them out). `kvm`: the whole KVM range, what Firecracker saves since
# PR 5738 (v1.16, 2026) and cloud-hypervisor always did (KVM's own index list). `firecracker-1.2`: v1.2 (PR 3064,
# 2022) to v1.15, 0x4b564d00-0x4b564d06: without MSR_KVM_ASYNC_PF_ACK, which holds no state (it reads 0), so nothing
# is lost. `firecracker-1.1`: before PR 3064, without MSR_KVM_POLL_CONTROL and MSR_KVM_ASYNC_PF_INT: the restored
# vCPU's page-ready vector is 0 (Firecracker #3020: tasks stuck in kvm_async_pf_task_wait_schedule after a restore).
MSR_LISTS: Final = {
    "kvm": tuple(KVM_MSR_RANGE),
    "firecracker-1.2": tuple(range(0x4B564D00, 0x4B564D07)),
    "firecracker-1.1": (0x4B564D00, 0x4B564D01, MSR_KVM_ASYNC_PF_EN, 0x4B564D03, 0x4B564D04),
}
DEFAULT_MSR_LIST: Final = "kvm"
MAX_MSRS: Final = 65536  # at most this many MSRs in one list
# What each MSR apf-emu's host has can hold (a snapshot is input: a restored value must be one KVM_SET_MSRS takes).
MSR_LIMITS: Final = {MSR_KVM_ASYNC_PF_INT: 0xFF}  # bits 63:8 must be zero
_BY_NAME: Final = {name: msr for msr, name in MSR_NAMES.items()}


def parse_msr_list(spec: str) -> tuple[int, ...]:
    """A named list (MSR_LISTS), or comma-separated MSRs: names (MSR_KVM_ASYNC_PF_EN), numbers (0x4b564d02) and
    ranges LO-HI of numbers. Sorted, without repeats; ValueError with the offending item otherwise."""
    text = spec.strip()
    if text in MSR_LISTS:
        return MSR_LISTS[text]
    out: set[int] = set()
    for item in filter(None, (part.strip() for part in text.split(","))):
        try:
            if item.upper() in _BY_NAME:
                out.add(_BY_NAME[item.upper()])
                continue
            lo_s, sep, hi_s = item.partition("-")
            lo, hi = int(lo_s, 0), int(hi_s, 0) if sep else int(lo_s, 0)
        except ValueError:
            raise ValueError(f"bad MSR {item!r}: use a name ({', '.join(_BY_NAME)}), a number, LO-HI, or one of "
                             f"{', '.join(MSR_LISTS)}") from None
        if not 0 <= lo <= hi <= 0xFFFF_FFFF or hi - lo >= 0x10000:
            raise ValueError(f"bad MSR range {item!r}: numbers are u32, a range at most 65536 long")
        out.update(range(lo, hi + 1))
        if len(out) > MAX_MSRS:
            raise ValueError(f"MSR list {spec[:40]!r}... names more than {MAX_MSRS} MSRs")
    if not out:
        raise ValueError(f"empty MSR list {spec!r}")
    return tuple(sorted(out))


@dataclass(frozen=True)
class VcpuState:
    """One vCPU as the VMM saved it: RDMSR of each listed MSR that the vCPU has (KVM refuses the others), and the
    interrupt state (KVM_GET_LAPIC's SPIV, the page-ready whose interrupt may still be pending)."""

    vcpu: int
    boot: int
    guest_pid: int
    msrs: dict[int, int]
    spiv: int
    pageready_pending: bool
    guest_start: int = 0  # the guest process's start time (/proc/<pid>/stat field 22): a restore resumes only it

    def msr(self, number: int) -> int:
        """What KVM_SET_MSRS gives the restored vCPU: the saved value, or 0 (a new vCPU's) if it was not saved."""
        return self.msrs.get(number, 0)

    @property
    def restored_registers(self) -> tuple[int, int, int]:
        """(MSR_KVM_ASYNC_PF_EN, MSR_KVM_ASYNC_PF_INT, MSR_APF_EMU_VE_INFO) after the restore."""
        return self.msr(MSR_KVM_ASYNC_PF_EN), self.msr(MSR_KVM_ASYNC_PF_INT), self.msr(MSR_APF_EMU_VE_INFO)


@dataclass(frozen=True)
class Manifest:
    vm: str
    pages: int
    vcpus: int
    abi: str
    msr_list: tuple[int, ...]
    vcpu_states: tuple[VcpuState, ...] = field(default_factory=tuple)
    host_args: tuple[str, ...] = ()  # the host's options (apf-host words), for the host that restores it

    def as_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT, "vm": self.vm, "pages": self.pages, "vcpus": self.vcpus, "abi": self.abi,
            "host_args": list(self.host_args),
            "msr_list": [f"{m:#x}" for m in self.msr_list],
            "vcpu_states": [{
                "vcpu": s.vcpu, "boot": s.boot, "guest_pid": s.guest_pid, "guest_start": s.guest_start, "spiv": s.spiv,
                "pageready_pending": s.pageready_pending,
                "msrs": {MSR_NAMES.get(m, f"{m:#x}"): v for m, v in sorted(s.msrs.items())},
            } for s in self.vcpu_states],
        }

    def text(self) -> str:
        return json.dumps(self.as_json(), indent=1) + "\n"


MAX_MANIFEST: Final = 16 << 20  # bytes: far more than 64 vCPUs with 65536 MSRs each need


def read_regular(path: Path, size: int, *, exact: bool = True) -> bytes:
    """The bytes of a regular file of `size` bytes (at most `size` unless `exact`), without following a symlink or
    blocking on a FIFO; ValueError naming the path otherwise."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as exc:
        raise ValueError(f"{path}: {exc.strerror or exc}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ValueError(f"{path} is not a regular file")
        if st.st_size != size if exact else st.st_size > size:
            raise ValueError(f"{path} is {st.st_size} bytes, not the {size} expected" if exact else
                             f"{path} is larger than {size} bytes")
        with os.fdopen(os.dup(fd), "rb") as f:
            data = f.read(size + 1)
    finally:
        os.close(fd)
    if (exact and len(data) != size) or len(data) > size:
        raise ValueError(f"{path} changed while it was read")
    return data


def _int(obj: dict[str, Any], key: str, lo: int, hi: int) -> int:
    value = obj.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        raise ValueError(f"{key} must be an integer in {lo}..{hi}, not {value!r}")
    return value


def _msr_number(key: str) -> int:
    if key in _BY_NAME:
        return _BY_NAME[key]
    number = int(key, 16) if key.lower().startswith("0x") else -1
    if not 0 <= number <= 0xFFFF_FFFF:
        raise ValueError(f"MSR {key!r} is neither a known name nor a u32 in hex")
    return number


def read_manifest(directory: Path) -> Manifest:
    """The manifest of a snapshot directory, validated (a snapshot is input: nothing in it is trusted); ValueError
    naming the file and the problem."""
    path = directory / MANIFEST
    try:
        raw = json.loads(read_regular(path, MAX_MANIFEST, exact=False))
        if not isinstance(raw, dict) or raw.get("format") != FORMAT:
            raise ValueError(f"not an apf-emu snapshot of format {FORMAT}")
        vm, abi = raw.get("vm"), raw.get("abi")
        if not isinstance(vm, str) or not isinstance(abi, str):
            raise ValueError("vm and abi must be strings")
        pages = _int(raw, "pages", 2, 1 << 20)
        vcpus = _int(raw, "vcpus", 1, 64)
        msr_list = raw.get("msr_list")
        if not isinstance(msr_list, list) or not all(isinstance(m, str) for m in msr_list):
            raise ValueError("msr_list must be a list of hex strings")
        states = []
        for item in raw.get("vcpu_states", []):
            if not isinstance(item, dict) or not isinstance(item.get("msrs"), dict):
                raise ValueError("each vcpu_states entry must be an object with msrs")
            msrs = {}
            for key, value in item["msrs"].items():
                number = _msr_number(key)
                limit = MSR_LIMITS.get(number, (1 << 64) - 1)
                if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= limit:
                    raise ValueError(f"MSR {key} cannot hold {value!r} (0..{limit:#x})")
                msrs[number] = value
            if not isinstance(item.get("pageready_pending"), bool):
                raise ValueError("pageready_pending must be true or false")
            states.append(VcpuState(_int(item, "vcpu", 0, vcpus - 1), _int(item, "boot", 1, 0xFFFF_FFFF),
                                    _int(item, "guest_pid", 0, 1 << 22), msrs, _int(item, "spiv", 0, 0xFFFF_FFFF),
                                    item["pageready_pending"], _int(item, "guest_start", 0, (1 << 64) - 1)))
        host_args = raw.get("host_args", [])
        if not isinstance(host_args, list) or not all(isinstance(a, str) for a in host_args):
            raise ValueError("host_args must be a list of strings")
        return Manifest(vm, pages, vcpus, abi, tuple(_msr_number(m) for m in msr_list), tuple(states),
                        tuple(host_args))
    except OSError as exc:
        raise ValueError(f"{path}: {exc.strerror or exc}") from None
    except (ValueError, TypeError, RecursionError) as exc:
        raise ValueError(f"{path}: {exc}") from None

