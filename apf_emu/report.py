# `apf-emu campaign report DIR`: what a campaign found, from DIR/results.jsonl alone (a local campaign's or one
# collected from Kubernetes). The text says which invariants failed in which seeds and how to reproduce each failing
# case; the picture (matplotlib, if installed) shows the spread of the cases' APF rates and APF cycle latencies,
# where a slow or stuck case stands out.
from __future__ import annotations

import statistics
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final

from .cases import CaseResult, compact

PICTURE: Final = "report.png"
SHOWN_FAILURES: Final = 50  # failing cases listed with their repro command (the table counts them all)


def text(directory: Path, results: Sequence[CaseResult]) -> list[str]:
    by_verdict: dict[str, int] = defaultdict(int)
    for r in results:
        by_verdict[r.verdict] += 1
    lines = [f"apf-emu campaign report: {len(results)} cases in {directory}: "
             + ", ".join(f"{n} {v}" for v, n in sorted(by_verdict.items())) + "."]
    seeds: dict[str, dict[str, list[int]]] = defaultdict(lambda: defaultdict(list))  # invariant -> ABI/scn -> seeds
    counts: dict[str, int] = defaultdict(int)
    for r in results:
        for inv, n in r.violations.items():
            seeds[inv][_where(r)].append(r.seed)
            counts[inv] += n
        if r.verdict in ("failed", "error"):
            seeds[f"({r.verdict})"][_where(r)].append(r.seed)
    if seeds:
        lines += ["", f"{'invariant':28} {'cases':>5} {'violations':>10}  seeds"]
        for inv in sorted(seeds, key=lambda k: (k.startswith("("), k)):
            cases = sum(len(s) for s in seeds[inv].values())
            where = "; ".join(f"{w}: {compact(s)}" for w, s in sorted(seeds[inv].items()))
            lines.append(f"{inv:28} {cases:5} {counts[inv] if counts[inv] else '-':>10}  {where}")
    failing = [r for r in results if r.failed]
    if failing:
        lines += ["", f"failing cases ({len(failing)}), each with the command that runs it again:"]
        for r in sorted(failing, key=lambda r: (r.seed, r.case))[:SHOWN_FAILURES]:
            found = ", ".join(f"{k} {v}" for k, v in sorted(r.violations.items())) or r.verdict
            lines.append(f"  {r.case:28} {found}" + (f" [{r.where}]" if r.where != "local" else ""))
            for detail in [*r.first_violations[:1], *r.problems[:1], *([r.error] if r.error else [])]:
                lines.append(f"      {detail[:200]}")
            lines.append(f"      {r.repro}")
            if r.log_dir:
                lines.append(f"      logs: {directory / r.log_dir}")
        if len(failing) > SHOWN_FAILURES:
            lines.append(f"  ... {len(failing) - SHOWN_FAILURES} more (results.jsonl has them all)")
    else:
        lines += ["", "no case failed"]
    rates = [r.apf_rate for r in results if r.apf_rate]
    cycle = [p["p50_us"] for p in _latencies(results, "not_present_to_wake")]
    if rates:
        lines += ["", f"APF rate per case: min {min(rates):.0f}/s, median {statistics.median(rates):.0f}/s, "
                  f"max {max(rates):.0f}/s"]
    if cycle:
        lines.append(f"APF cycle (not-present -> wake), median per case: min {min(cycle):.0f} us, median "
                     f"{statistics.median(cycle):.0f} us, max {max(cycle):.0f} us")
    return lines


def _where(r: CaseResult) -> str:
    return r.abi + (f" {r.scenario}" if r.scenario else "")


def _latencies(results: Sequence[CaseResult], name: str) -> list[dict[str, Any]]:
    out = []
    for r in results:
        p = r.latency_us.get(name)
        if isinstance(p, dict) and isinstance(p.get("p50_us"), (int, float)) and p.get("count"):
            out.append(p)
    return out


def picture(results: Sequence[CaseResult], path: Path) -> str | None:
    """Histograms of the APF rates and of the APF cycle's p50 and p99 per case, failing cases in their own colour;
    None when written, else why not."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import MaxNLocator
    except ImportError:
        return "matplotlib is not installed (pip install -e '.[bench]'): no picture"
    ok = [r for r in results if not r.failed]
    bad = [r for r in results if r.failed]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    ax1.hist([[r.apf_rate for r in ok], [r.apf_rate for r in bad]], bins=30, stacked=True,
             label=[f"pass ({len(ok)})", f"failing ({len(bad)})"], color=["tab:blue", "tab:red"])
    ax1.set_xlabel("APFs per second")
    ax1.set_ylabel("cases")
    ax1.set_title("APF rate per case")
    ax1.legend()
    p50 = [p["p50_us"] / 1000 for p in _latencies(results, "not_present_to_wake")]
    p99 = [p["p99_us"] / 1000 for p in _latencies(results, "not_present_to_wake") if "p99_us" in p]
    ax2.hist([p50, p99], bins=30, label=["p50", "p99"], color=["tab:green", "tab:orange"], alpha=0.8)
    ax2.set_xlabel("ms, not-present -> wake")
    ax2.set_ylabel("cases")
    ax2.set_title("APF cycle latency per case")
    ax2.legend()
    for ax in (ax1, ax2):
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    fig.suptitle(f"apf-emu campaign: {len(results)} cases")
    fig.tight_layout()
    try:
        fig.savefig(path, dpi=100)
    except OSError as exc:
        return f"cannot write {path}: {exc.strerror}"
    finally:
        plt.close(fig)
    return None
