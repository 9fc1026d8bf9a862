# The JSON summaries of `apf-emu chaos` and `apf-emu stats`: one place for their keys, which campaigns read back
# (apf_emu/cases.py's record of a case) from a local `chaos --json` and from a Kubernetes pod's last line alike.
from __future__ import annotations

from typing import Any

from .chaos import ChaosResult
from .checker import Checker, Violation
from .logdirs import volume
from .logs import ReadReport
from .stats import INTERLEAVINGS, LATENCIES, Stats


def chaos_json(result: ChaosResult, stats: Stats, violations: list[Violation], report: ReadReport,
               checker: Checker, scenario: str | None = None) -> dict[str, Any]:
    wake_all_retries = stats.interleavings["wake_all_raced_not_present"]
    files, size = volume(result.log_dir)
    return {
        "log_files": files, "log_bytes": size,
        "vm": result.vm, "log_dir": str(result.log_dir), "stopped_by": result.stopped_by, "scenario": scenario,
        "schedule": [str(f) for f in result.schedule], "injected": [str(f) for f in result.injected],
        "ready_latency_limit_ms": checker.ready_latency_limit_ms,
        "faults_applied": dict(result.applied), "faults_skipped": dict(result.skipped),
        "boots": {str(k): v for k, v in result.boots.items()}, "host_starts": result.host_starts,
        "early_signal_deaths": result.early_signal_deaths,
        "completions_eaten": dict(stats.dropped_reasons),
        "tasks_retried_after_wake_all": wake_all_retries,
        "data_checks": stats.data_checks, "data_check_failures": stats.data_check_failures,
        "torn_pages": stats.events["guest_data_torn"],
        "apfs": stats.apfs, "reconnects": stats.events["guest_reconnect"],
        "truncated_lines": report.truncated, "problems": result.problems, "leftovers": result.leftovers,
        "violations": [v.as_dict() for v in violations], "stats": stats_json(stats),
    }


def stats_json(stats: Stats) -> dict[str, Any]:
    return {
        "events": dict(stats.events),
        "per_vcpu": {k: dict(v) for k, v in stats.per_vcpu.items()},
        "apfs": stats.apfs,
        "sync_faults": stats.sync_faults,
        "sync_reasons": dict(stats.sync_reasons),
        "halts": stats.halts,
        "halt_reasons": dict(stats.halt_reasons),
        "dropped": dict(stats.dropped_reasons),
        "data_checks": stats.data_checks,
        "data_check_failures": stats.data_check_failures,
        "latency_us": {lat: stats.percentiles(lat) for lat in LATENCIES},
        "interleavings": {name: stats.interleavings[name] for name in INTERLEAVINGS},
        "races": dict(stats.races),
        "abis": sorted(stats.abis),
        "outstanding_max": dict(stats.outstanding_max),
        "seconds": stats.seconds,
    }
