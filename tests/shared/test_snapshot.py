# The snapshot contract (shared/snapshot.py): MSR lists parse as documented and are bounded, and a manifest or an
# image is input: a FIFO, a symlink, a wrong size or a value KVM_SET_MSRS would refuse is a clear ValueError.
from __future__ import annotations

import json
import os

import pytest

from shared.abi import MSR_KVM_ASYNC_PF_EN, MSR_KVM_ASYNC_PF_INT
from shared.snapshot import MANIFEST, MAX_MSRS, Manifest, VcpuState, parse_msr_list, read_manifest, read_regular


def test_msr_lists():
    assert parse_msr_list("kvm") == tuple(range(0x4B564D00, 0x4B564E00))
    assert MSR_KVM_ASYNC_PF_INT not in parse_msr_list("firecracker-1.1")
    assert MSR_KVM_ASYNC_PF_INT in parse_msr_list("firecracker-1.2")
    assert parse_msr_list("MSR_KVM_ASYNC_PF_EN, 0x10-0x11") == (0x10, 0x11, MSR_KVM_ASYNC_PF_EN)
    for bad, words in (("", "empty"), ("MSR_NOPE", "bad MSR"), ("0x20-0x10", "bad MSR range"),
                       (",".join(f"{i << 16:#x}-{(i << 16) + 0xFFFF:#x}" for i in range(2)), f"more than {MAX_MSRS}")):
        with pytest.raises(ValueError, match=words):
            parse_msr_list(bad)


def test_a_manifest_round_trips_and_bad_values_are_refused(tmp_path):
    state = VcpuState(0, 1, 42, {MSR_KVM_ASYNC_PF_EN: 9, MSR_KVM_ASYNC_PF_INT: 0xF3}, 0x1FF, False, 1234)
    manifest = Manifest("vm0", 512, 2, "int", parse_msr_list("kvm"), (state,), ("--vm", "vm0"))
    (tmp_path / MANIFEST).write_text(manifest.text())
    assert read_manifest(tmp_path) == manifest
    raw = json.loads(manifest.text())
    for key, value, words in (("MSR_KVM_ASYNC_PF_INT", 0x1F3, "cannot hold"), ("MSR_KVM_ASYNC_PF_EN", -1,
                                                                                 "cannot hold")):
        broken = json.loads(json.dumps(raw))
        broken["vcpu_states"][0]["msrs"][key] = value
        (tmp_path / MANIFEST).write_text(json.dumps(broken))
        with pytest.raises(ValueError, match=words):
            read_manifest(tmp_path)
    (tmp_path / MANIFEST).write_text("[" * 100_000)
    with pytest.raises(ValueError, match=MANIFEST):
        read_manifest(tmp_path)


def test_read_regular_refuses_what_is_not_a_regular_file_of_its_size(tmp_path):
    good = tmp_path / "ram.bin"
    good.write_bytes(b"x" * 8)
    assert read_regular(good, 8) == b"x" * 8
    with pytest.raises(ValueError, match="is 8 bytes, not the 16"):
        read_regular(good, 16)
    link = tmp_path / "link"
    link.symlink_to(good)
    with pytest.raises(ValueError, match="link"):
        read_regular(link, 8)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(ValueError, match="not a regular file"):
        read_regular(fifo, 8)
