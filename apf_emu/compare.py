# `apf-emu compare`: the same seeded workload on each ABI of shared/abis.py, one native run after another, judged by
# the same checker, and one table of what each design did with it (docs/PROTOCOL.md section 11 says what the
# designs are; README.md shows a table from a real machine).
#
# This module owns the comparison only: each run is `apf-emu run`'s (apf_emu/runner.py), each verdict the checker's
# (apf_emu/checker.py), each number a Stats field (apf_emu/stats.py). What counts as "lost" and "misdirected" is
# decided here, from the invariants that name such events.
from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final

from .checker import Violation
from .stats import Stats

# Events that never reached the task they were for: a sleeper nobody woke.
LOST: Final = ("wait_woken",)
# Events that reached the wrong handler: a wake of a token no page-ready carried, a sleep on a token no not-present
# carried, an APF #PF taken for an ordinary fault, a page-ready for a fault the guest was never told about.
MISDIRECTED: Final = ("wake_matches_ready", "wait_matches_not_present", "apf_as_genuine", "ready_for_injected_only")


@dataclass
class AbiRun:
    """One ABI's run and its verdict."""

    abi: str
    stats: Stats
    violations: list[Violation]
    exit_codes: dict[str, int | None] = field(default_factory=dict)
    unexpected_exits: list[str] = field(default_factory=list)
    log_dir: str = ""

    @property
    def by_invariant(self) -> Counter[str]:
        return Counter(v.invariant for v in self.violations)

    @property
    def lost(self) -> int:
        return sum(self.by_invariant[name] for name in LOST)

    @property
    def misdirected(self) -> int:
        return sum(self.by_invariant[name] for name in MISDIRECTED)

    def as_dict(self) -> dict[str, Any]:
        s = self.stats
        return {
            "abi": self.abi, "log_dir": self.log_dir,
            "apfs": s.apfs, "page_readies": s.page_readies, "sync_faults": s.sync_faults, "halts": s.halts,
            "races": dict(s.races), "violations": dict(self.by_invariant),
            "lost": self.lost, "misdirected": self.misdirected, "guest_panics": s.events["guest_panic"],
            "apf_cycle_us": _p50_p99(s, "not_present_to_wake"), "ready_latency_us": _p50_p99(s, "completed_to_wake"),
            "data_checks": s.data_checks, "data_check_failures": s.data_check_failures, "seconds": s.seconds,
            "exit_codes": self.exit_codes, "unexpected_exits": self.unexpected_exits,
        }


def _p50_p99(stats: Stats, latency: str) -> dict[str, int | None]:
    p = stats.percentiles(latency)
    return {"p50": p.get("p50_us"), "p99": p.get("p99_us"), "count": p.get("count", 0)}  # type: ignore[dict-item]


def table(runs: list[AbiRun]) -> list[str]:
    """The comparison as text lines: a row per measure, a column per ABI; races and violations a row per kind
    seen in any run (0 elsewhere)."""
    rows: list[tuple[str, Callable[[AbiRun], str]]] = [
        ("APFs delivered (not-present)", lambda r: str(r.stats.apfs)),
        ("page-readies delivered", lambda r: str(r.stats.page_readies)),
        ("synchronous faults", lambda r: str(r.stats.sync_faults)),
        ("artificial halts", lambda r: str(r.stats.halts)),
    ]
    for kind in sorted({k for r in runs for k in r.stats.races}):
        rows.append((f"race: {kind.replace('_', ' ')}", lambda r, k=kind: str(r.stats.races[k])))  # type: ignore[misc]
    for name in sorted({k for r in runs for k in r.by_invariant}):
        rows.append((f"violation: {name}", lambda r, n=name: str(r.by_invariant[n])))  # type: ignore[misc]
    rows += [
        ("events lost", lambda r: str(r.lost)),
        ("events misdirected", lambda r: str(r.misdirected)),
        ("guest panics", lambda r: str(r.stats.events["guest_panic"])),
        ("APF cycle p50 / p99 (us)", lambda r: _pair(r.stats, "not_present_to_wake")),
        ("page-ready latency p50 / p99 (us)", lambda r: _pair(r.stats, "completed_to_wake")),
        ("data checks failed / made", lambda r: f"{r.stats.data_check_failures} / {r.stats.data_checks}"),
    ]
    width = max(12, *(len(r.abi) + 2 for r in runs), *(len(f(r)) + 2 for _, f in rows for r in runs))
    label_width = max(len(label) for label, _ in rows) + 1
    lines = [f"  {'':{label_width}}" + "".join(f"{r.abi:>{width}}" for r in runs)]
    lines += [f"  {label:{label_width}}" + "".join(f"{f(r):>{width}}" for r in runs) for label, f in rows]
    return lines


def _pair(stats: Stats, latency: str) -> str:
    p = stats.percentiles(latency)
    return f"{p['p50_us']} / {p['p99_us']}" if p.get("count") else "-"
