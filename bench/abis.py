"""What each APF design of shared/abis.py costs, as ratios against `int` (the 5.8+ ABI) measured in the same run:
the same seeded workload on one vCPU with page-in latency 0 on every ABI. Part of `apf-emu bench`; alone:

    .venv/bin/python -m bench.abis [--rounds 3] [--seconds 10] [--json]
"""
from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Callable
from typing import Any

from shared.abis import ABIS, DEFAULT_ABI

from . import topology


def measure(rounds: int, seconds: float, say: Callable[[str], object] = print) -> list[dict[str, Any]]:
    """Each ABI on the same seeded workload (1 vCPU, 4 writer tasks, page-in latency 0): APF cycles/s, the cycle
    (not-present -> task woken) and page-ready latency (completed -> task woken) percentiles, and cycles/s over
    `int`'s (DEFAULT_ABI). What the design costs, not what its races do: no #PF entry touches memory that faults
    (--entry-fault-ratio 0), since on `pf` that race soon oopses the guest kernel, as it would a real one, and ends
    the run (`apf-emu compare` counts the races). The ABIs take turns over the rounds, each gets the median of its
    rounds."""
    runs: dict[str, list[topology.TopologyResult]] = {abi: [] for abi in ABIS}
    for _ in range(rounds):
        for abi in ABIS:
            runs[abi].append(topology.run(1, seconds, pages=512, resident=384, latency="0", abi=abi,
                                          seed=1, entry_fault_ratio=0.0))
    out: list[dict[str, Any]] = []
    for abi, rs in runs.items():
        stats = [r.stats for r in rs if r.stats is not None]
        cycle = [s.percentiles("not_present_to_wake") for s in stats]
        ready = [s.percentiles("completed_to_wake") for s in stats]
        out.append({
            "abi": abi, "cycles_per_s": round(statistics.median(r.wakes / r.seconds for r in rs), 1),
            "cycle_p50_us": _median_of(cycle, "p50_us"), "cycle_p99_us": _median_of(cycle, "p99_us"),
            "ready_p50_us": _median_of(ready, "p50_us"), "ready_p99_us": _median_of(ready, "p99_us"),
            "apfs": sum(r.apfs for r in rs), "sync_faults": sum(r.sync_faults for r in rs),
            "halts": sum(r.halts for r in rs), "races": sum(sum(s.races.values()) for s in stats),
            "rounds": len(rs), "clean": all(r.clean for r in rs),
        })
    base = next(row["cycles_per_s"] for row in out if row["abi"] == DEFAULT_ABI) or 1.0
    for row in out:
        row["vs_int"] = round(row["cycles_per_s"] / base, 3)
        say(f"abi     {row['abi']:9} {row['cycles_per_s']:8.1f} APF cycles/s ({row['vs_int']:.2f}x of int), cycle "
            f"p50 {row['cycle_p50_us']} us p99 {row['cycle_p99_us']} us, page-ready p50 {row['ready_p50_us']} us, "
            f"races {row['races']}")
    return out


def _median_of(percentiles: list[dict[str, float]], key: str) -> float | None:
    values = [p[key] for p in percentiles if key in p]
    return statistics.median(values) if values else None


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.abis", description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=3, help="runs per ABI, taking turns (default 3)")
    p.add_argument("--seconds", type=float, default=10.0, help="seconds per run (default 10)")
    p.add_argument("--json", action="store_true", help="print the rows as JSON too")
    args = p.parse_args()
    rows = measure(args.rounds, args.seconds)
    if args.json:
        print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
