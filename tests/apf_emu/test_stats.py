# apf_emu/stats.py over synthetic event sequences: what it pairs, and what it counts.
from __future__ import annotations

from apf_emu.stats import Stats


def ev(name: str, t_us: int, **fields: object) -> dict[str, object]:
    return {"event": name, "mono_ns": t_us * 1000, "vm": "vm", "vcpu": 0, "boot": 1,
            "role": "guest" if name.startswith("guest_") else "host", **fields}


def test_ready_to_ack_pairs_each_ack_with_the_oldest_injected_page_ready():
    """A halted fault's ready (injected false) reaches no guest and gets no ACK; a page-ready taken with APF off
    (guest_apf_irq_ignored) is never ACKed either: neither may shift the pairing of the ACKs that follow."""
    stats = Stats()
    for e in [ev("kvm_async_pf_ready", 0, token=0x1000, injected=True),
              ev("kvm_async_pf_ready", 5, token=0x2000, injected=False),
              ev("apf_ack", 20),
              ev("kvm_async_pf_ready", 30, token=0x3000, injected=True),
              ev("guest_apf_irq_ignored", 35),
              ev("kvm_async_pf_ready", 100, token=0x4000, injected=True),
              ev("apf_ack", 110)]:
        stats.feed(e)
    p = stats.percentiles("ready_to_ack")
    assert p["count"] == 2 and p["max_us"] <= 21 and p["p50_us"] >= 9

