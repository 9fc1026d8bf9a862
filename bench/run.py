"""apf-emu's benchmarks, all in one run: `apf-emu bench [--quick] [--json FILE] [--plots DIR]`.

1. transport floor, protocol floor and the APF cycle's costs over them (bench/floor.py, bench/protocol_floor.py,
   bench/apf_cycle.py);
2. throughput and memory from 1 to 64 vCPUs with page-in latency 0 (bench/topology.py), and what shared pages
   cost (the same run with 0, 20% and 50% of the accesses on pages all vCPUs share);
3. Natapov's 2010 benchmark shape: writers faulting over guest RAM 4x the host's resident limit and counting tasks,
   with APF and without (synchronous halt), the speedup of the counting work, and the ideal speedup derived from
   the measured fault rate and page-in latency (bench/natapov below);
4. what each APF design of shared/abis.py costs: the same seeded workload on one vCPU with page-in latency 0 on
   every ABI, its cycles/s over `int`'s in the same run (bench/abis.py);
5. `apf-emu check` lines per second (bench/check_speed.py).
Every key of the JSON it writes is documented in bench/README.md. Output paths are checked before anything runs.
Ctrl-C (or SIGTERM) stops it cleanly: the benchmark running then is cut, its processes are stopped, what was
measured before is written (`"interrupted": true`) and it exits 130.
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import signal
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from shared import config

from . import abis, apf_cycle, check_speed, floor, protocol_floor, topology

SHARED_RATIOS = (0.0, 0.2, 0.5)
SHARED_VCPUS = 2
QUICK: dict[str, Any] = {
    "floor_round_trips": 2000, "cycles": 800, "scale_vcpus": [1, 4, 16], "scale_seconds": 4.0,
    "natapov_seconds": 6.0, "natapov_sweep": [(1.0, 1)], "check_lines": 200_000,
    "shared_rounds": 1, "shared_seconds": 4.0, "abi_rounds": 1, "abi_seconds": 3.0,
}
FULL: dict[str, Any] = {
    "floor_round_trips": 20000, "cycles": 5000, "scale_vcpus": [1, 2, 4, 8, 16, 32, 64], "scale_seconds": 15.0,
    "natapov_seconds": 60.0, "natapov_sweep": [(lat, t) for lat in (0.1, 1.0, 10.0) for t in (1, 2, 4)],
    "sweep_seconds": 15.0, "check_lines": 1_000_000, "shared_rounds": 3, "shared_seconds": 10.0,
    "abi_rounds": 3, "abi_seconds": 10.0,
}
NATAPOV_VCPUS = 4
# Natapov's fault threads write at random over memory far larger than the host keeps resident, so that every write
# faults; the guest agent's shared pages are few and hot (resident), so his shape runs without them.
NATAPOV_SHARED_RATIO = 0.0
NATAPOV_PAGES, NATAPOV_RESIDENT = 2048, 512  # guest RAM 4x the host's limit, as 2 GB in a 512 MB cgroup


def machine() -> dict[str, Any]:
    return {
        "cores": os.cpu_count(), "python": platform.python_version(), "kernel": platform.release(),
        "date": datetime.date.today().isoformat(), "cpu": _cpu_model(),
    }


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def bench_costs(cfg: dict[str, Any], say: Any) -> tuple[dict[str, float], dict[str, Any], dict[str, Any],
                                                        dict[str, Any]]:
    floor_us: dict[str, float] = {}
    ratio: dict[str, Any] = {}
    costs: dict[str, Any] = {}
    protocol: dict[str, Any] = {}
    for transport in ("socket", "signal"):
        h = floor.measure(transport, cfg["floor_round_trips"])
        floor_us[transport] = h.get_value_at_percentile(50) / 1000
        protocol[transport] = protocol_floor.measure(transport, cfg["cycles"])
        cyc = apf_cycle.measure(transport, cfg["cycles"])
        costs[transport] = cyc.summary()
        ratio[transport] = {step: round(cyc.p50_us(step) / floor_us[transport], 2) for step in apf_cycle.STEPS}
        ratio[transport]["cycle"] = round(cyc.p50_us("cycle") / protocol[transport]["cycle"]["p50_us"], 2)
        say(f"{transport:7} floor {floor_us[transport]:6.1f} us | " + "  ".join(
            f"{s} {cyc.p50_us(s):6.1f} us ({ratio[transport][s]:.2f}x)" for s in apf_cycle.STEPS)
            + f" | cycle {cyc.p50_us('cycle'):6.1f} us, protocol floor {protocol[transport]['cycle']['p50_us']:6.1f}"
            f" us ({ratio[transport]['cycle']:.2f}x)")
    return floor_us, ratio, costs, protocol


def bench_scale(cfg: dict[str, Any], say: Any) -> list[dict[str, Any]]:
    out = []
    for vcpus in cfg["scale_vcpus"]:
        pages = max(512, 128 * vcpus)
        r = topology.run(vcpus, cfg["scale_seconds"], pages=pages, resident=pages * 3 // 4, latency="0")
        row = {
            "vcpus": vcpus, "cycles_per_s": round(r.wakes / r.seconds, 1), "apfs": r.apfs,
            "sync_faults": r.sync_faults, "host_rss_mb": round(r.host_rss_kb / 1024, 1),
            "guest_rss_mb": round(sum(r.guest_rss_kb) / max(1, len(r.guest_rss_kb)) / 1024, 1),
            "clean": r.clean,
        }
        out.append(row)
        say(f"scale   {vcpus:3} vCPUs  {row['cycles_per_s']:8.1f} APF cycles/s  host RSS {row['host_rss_mb']} MB, "
            f"guest RSS {row['guest_rss_mb']} MB each")
    return out


def scale_summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """What the scale rows say against issue 16's goals: the share of the peak kept at the most vCPUs, and the
    host's RSS per vCPU beyond the first row's."""
    peak = max(rows, key=lambda r: r["cycles_per_s"])
    first, last = rows[0], rows[-1]
    extra = last["vcpus"] - first["vcpus"]
    return {
        "peak_cycles_per_s": peak["cycles_per_s"], "peak_vcpus": peak["vcpus"], "most_vcpus": last["vcpus"],
        "share_of_peak_at_most_vcpus": round(last["cycles_per_s"] / peak["cycles_per_s"], 3),
        "host_rss_mb_per_extra_vcpu": round((last["host_rss_mb"] - first["host_rss_mb"]) / extra, 3) if extra else None,
    }


# Issue 16's goals (bench/RESULTS.md says how each was met or missed): (key, what, target, at most or at least).
GOALS: list[tuple[str, str, float, str]] = [
    *[(f"ratio.{t}.cycle", f"{t}: whole cycle over the protocol floor", 1.3, "max") for t in ("socket", "signal")],
    *[(f"ratio.{t}.{step}", f"{t}: {step} over the raw round trip", 1.5, "max")
      for t in ("socket", "signal") for step in ("not_present", "ready", "ack")],
    ("natapov_efficiency", "Natapov's efficiency, one vCPU per core (else the headline's)", 0.8, "min"),
    ("scale_summary.share_of_peak_at_most_vcpus", "cycles/s at the most vCPUs over the peak", 0.8, "min"),
    ("scale_summary.host_rss_mb_per_extra_vcpu", "host RSS per extra vCPU, MB (half of 2026-11-25's 1.5)", 0.75,
     "max"),
    ("check_lines_per_s", "apf-emu check, lines/s", 500_000, "min"),
]


def goals(result: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Each goal's value in this run, its target and whether it is met (None: not measured in this run)."""
    def value(key: str) -> Any:
        if key == "natapov_efficiency":
            at_cores = result.get("natapov_at_cores") or result.get("natapov") or {}
            return at_cores.get("efficiency")
        node: Any = result
        for part in key.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        return node

    out = {}
    for key, what, target, kind in GOALS:
        v = value(key)
        met = None if not isinstance(v, (int, float)) else (v <= target if kind == "max" else v >= target)
        out[key] = {"what": what, "value": v, "target": target, "at": "most" if kind == "max" else "least",
                    "met": met}
    return out


def bench_shared(cfg: dict[str, Any], say: Any) -> list[dict[str, Any]]:
    """APF cycles/s with 0, 20% and 50% of the accesses on the shared pages, 2 vCPUs, page-in latency 0. The ratios
    take turns over several rounds and each gets the median of its rounds: the machine drifts within a run."""
    runs: dict[float, list[topology.TopologyResult]] = {ratio: [] for ratio in SHARED_RATIOS}
    for _ in range(cfg["shared_rounds"]):
        for ratio in SHARED_RATIOS:
            runs[ratio].append(topology.run(SHARED_VCPUS, cfg["shared_seconds"], pages=512, resident=384,
                                            latency="0", shared_ratio=ratio))
    out = []
    for ratio, rs in runs.items():
        out.append({"shared_ratio": ratio,
                    "cycles_per_s": round(statistics.median(r.wakes / r.seconds for r in rs), 1),
                    "accesses_per_s": round(statistics.median(r.accesses / r.seconds for r in rs), 1),
                    "rounds": len(rs), "clean": all(r.clean for r in rs)})
    base = out[0]["cycles_per_s"] or 1.0
    for row in out:
        row["vs_private"] = round(row["cycles_per_s"] / base, 3)
        say(f"shared  {row['shared_ratio']:.0%} of accesses  {row['cycles_per_s']:8.1f} APF cycles/s "
            f"({row['vs_private']:.2f}x of none), {row['accesses_per_s']:,.0f} accesses/s")
    return out


def natapov_pair(seconds: float, latency_ms: float, writers: int, vcpus: int = NATAPOV_VCPUS) -> dict[str, Any]:
    """Work with APF and without, one writer and one counting task per `writers` per vCPU."""
    runs = {}
    for mode in ("apf", "sync"):
        runs[mode] = topology.run(
            vcpus, seconds, pages=NATAPOV_PAGES, resident=NATAPOV_RESIDENT, latency=f"fixed:{latency_ms}ms",
            tasks=writers, counting_tasks=writers, apf=mode == "apf", shared_ratio=NATAPOV_SHARED_RATIO)
    apf, sync = runs["apf"], runs["sync"]
    # Without APF each fault halts its vCPU for the page-in: KVM's artificial halt (interrupts on) or, with
    # interrupts off, the synchronous fault. At best APF gives all of that time to the counting
    # tasks, so the ideal speedup of the counting work is (counting time + halted time) / counting time, both
    # measured in the synchronous run: halted time from the guests' clocks around their exits, and also from the
    # fault count times the configured page-in latency (the lower bound the issue asks for).
    halted_s = sync.exit_ns / 1e9
    halted_model_s = (sync.sync_faults + sync.halts) * latency_ms / 1000
    count_s = max(sync.count_ns / 1e9, 1e-9)
    ideal = (count_s + halted_s) / count_s
    ideal_model = (count_s + halted_model_s) / count_s
    speedup = apf.count_work / sync.count_work if sync.count_work else float("nan")
    return {
        "vcpus": vcpus, "latency_ms": latency_ms, "writers_per_vcpu": writers, "counters_per_vcpu": writers,
        "seconds": seconds, "work_apf": apf.count_work, "work_sync": sync.count_work,
        "accesses_apf": apf.accesses, "accesses_sync": sync.accesses,
        "apfs": apf.apfs, "faults_sync": sync.sync_faults + sync.halts, "halts_sync": sync.halts,
        "halted_share_sync": round(halted_s / (vcpus * sync.seconds), 3),
        "counting_share_sync": round(count_s / (vcpus * sync.seconds), 3),
        "counting_share_apf": round(apf.count_ns / 1e9 / (vcpus * apf.seconds), 3),
        "speedup": round(speedup, 3), "ideal_speedup": round(ideal, 3), "efficiency": round(speedup / ideal, 3),
        "ideal_speedup_from_latency": round(ideal_model, 3),
        "clean": apf.clean and sync.clean,
    }


def bench_natapov(cfg: dict[str, Any], say: Any) -> tuple[dict[str, Any], list[dict[str, Any]], Any]:
    head = natapov_pair(cfg["natapov_seconds"], 1.0, 1)
    say(f"natapov {NATAPOV_VCPUS} vCPUs, 1 ms page-in: work {head['work_apf']:,} with APF vs {head['work_sync']:,} "
        f"without: {head['speedup']:.2f}x (ideal {head['ideal_speedup']:.2f}x, efficiency {head['efficiency']:.2f})")
    sweep = []
    for latency_ms, writers in cfg["natapov_sweep"]:
        if cfg is QUICK:
            sweep.append(head)
            continue
        row = natapov_pair(cfg["sweep_seconds"], latency_ms, writers)
        sweep.append(row)
        say(f"  sweep {latency_ms:5.1f} ms, {writers} writer(s)/vCPU: {row['speedup']:.2f}x "
            f"(ideal {row['ideal_speedup']:.2f}x)")
    at_cores = None
    cores = os.cpu_count() or 1
    if cfg is not QUICK and cores < NATAPOV_VCPUS:
        # With fewer cores than vCPUs the synchronous run loses less: a halted vCPU's core runs another vCPU.
        at_cores = natapov_pair(cfg["sweep_seconds"], 1.0, 1, vcpus=cores)
        say(f"  with {cores} vCPUs (one per core): {at_cores['speedup']:.2f}x (ideal {at_cores['ideal_speedup']:.2f}x)")
    return head, sweep, at_cores


def run_all(quick: bool, say: Any = print, result: dict[str, Any] | None = None) -> dict[str, Any]:
    """Every benchmark, filling `result` as each ends (so that an interrupted run keeps what it measured)."""
    cfg = QUICK if quick else FULL
    start = time.monotonic()
    result = {} if result is None else result
    result.update({"variant": "quick" if quick else "full", "machine": machine()})
    result["floor_us"], result["ratio"], result["costs_us"], result["protocol_floor_us"] = bench_costs(cfg, say)
    result["scale"] = bench_scale(cfg, say)
    result["scale_summary"] = scale_summary(result["scale"])
    result["shared_pages"] = bench_shared(cfg, say)
    result["natapov"], result["natapov_sweep"], result["natapov_at_cores"] = bench_natapov(cfg, say)
    result["abis"] = abis.measure(cfg["abi_rounds"], cfg["abi_seconds"], say)
    check = check_speed.measure(cfg["check_lines"])
    result["check_lines_per_s"] = check["check_lines_per_s"]
    say(f"check   {result['check_lines_per_s']:,} lines/s")
    result["goals"] = goals(result)
    for key, g in result["goals"].items():
        say(f"goal    {key}: {g['value']} (at {g['at']} {g['target']:g}): {'met' if g['met'] else 'missed'}")
    result["seconds"] = round(time.monotonic() - start, 1)
    return result


def plot(result: dict[str, Any], out: Path) -> list[Path]:
    """PNG plots of the curves, if matplotlib is installed (pip install -e '.[bench]')."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("bench: matplotlib is not installed: no plots (pip install -e '.[bench]')", file=sys.stderr)
        return []
    out.mkdir(parents=True, exist_ok=True)
    written = []
    fig, ax = plt.subplots(figsize=(6, 4))
    xs = [r["vcpus"] for r in result["scale"]]
    ax.plot(xs, [r["cycles_per_s"] for r in result["scale"]], marker="o")
    ax.set_xscale("log", base=2)
    ax.set_ylim(bottom=0)
    ax.set_xlabel("vCPUs (guest agent processes)")
    ax.set_ylabel("APF cycles per second (all vCPUs)")
    ax.set_title(f"Throughput, page-in latency 0, {result['machine']['cores']} cores")
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    written.append(out / "scale.png")
    fig.savefig(written[-1], dpi=100)
    plt.close(fig)
    sweep = result["natapov_sweep"]
    if len({r["latency_ms"] for r in sweep}) > 1:
        fig, ax = plt.subplots(figsize=(6, 4))
        for i, writers in enumerate(sorted({r["writers_per_vcpu"] for r in sweep})):
            rows = sorted((r for r in sweep if r["writers_per_vcpu"] == writers), key=lambda r: r["latency_ms"])
            color = f"C{i}"
            ax.plot([r["latency_ms"] for r in rows], [r["speedup"] for r in rows], marker="o", color=color,
                    label=f"{writers} writer(s) + {writers} counter(s) per vCPU")
            ax.plot([r["latency_ms"] for r in rows], [r["ideal_speedup"] for r in rows], linestyle="--",
                    color=color, alpha=0.6, label=f"ideal, {writers} writer(s)")
        ax.axhline(1, color="grey", linewidth=0.8)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("page-in latency (ms)")
        ax.set_ylabel("counting work, APF / synchronous")
        ax.set_title(f"Natapov's benchmark shape, {NATAPOV_VCPUS} vCPUs")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        written.append(out / "natapov_speedup.png")
        fig.savefig(written[-1], dpi=100)
        plt.close(fig)
    return written


def _stop(_signum: int, _frame: Any) -> None:
    """The first SIGINT or SIGTERM stops the benchmark (each one's `finally` stops its processes); later ones are
    ignored, so that those `finally` blocks run to their end."""
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, signal.SIG_IGN)
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    p = config.UsageParser(prog="apf-emu bench", description=__doc__.split("\n\n")[0] + " Exit status: 0 done, "
                           "2 bad usage, 130 interrupted (what was measured is kept).")
    p.add_argument("--quick", action="store_true", help="the quick variant of every benchmark (about a minute; "
                   "the full run takes about 14)")
    p.add_argument("--json", type=config.typed(config.output_file, "json"), default=None, metavar="FILE",
                   help="write the results as one JSON object")
    p.add_argument("--plots", type=config.typed(config.output_dir, "plots"), default=None, metavar="DIR",
                   help="write PNG plots here (needs matplotlib; made when they are written)")
    p.add_argument("--replot", type=config.typed(config.input_file, "replot"), default=None, metavar="FILE",
                   help="run nothing: draw the plots of an earlier --json FILE into --plots DIR")
    args = p.parse_args(argv)
    earlier = None
    if args.replot:
        if not args.plots:
            p.error("--replot needs --plots DIR")
        try:
            earlier = json.loads(args.replot.read_text())
            if not isinstance(earlier, dict) or not {"scale", "natapov_sweep", "machine"} <= earlier.keys():
                raise ValueError("no scale, natapov_sweep or machine")
        except ValueError as exc:
            p.error(f"--replot {args.replot}: not the JSON of an apf-emu bench run ({exc})")
    if earlier is not None:
        try:
            paths = plot(earlier, args.plots)
        except (KeyError, TypeError) as exc:
            p.error(f"--replot {args.replot}: not the JSON of an apf-emu bench run (missing {exc})")
        for path in paths:
            print(f"bench: wrote {path}")
        return 0
    signal.signal(signal.SIGINT, _stop)
    signal.signal(signal.SIGTERM, _stop)
    result: dict[str, Any] = {}
    status = config.EXIT_OK
    try:
        run_all(args.quick, result=result)
        print(f"bench: {result['variant']} run took {result['seconds']} s")
    except KeyboardInterrupt:
        result["interrupted"] = True
        done = [k for k in ("floor_us", "scale", "shared_pages", "natapov", "abis", "check_lines_per_s") if k in result]
        print(f"bench: interrupted; measured before that: {', '.join(done) or 'nothing'}", file=sys.stderr)
        status = config.EXIT_INTERRUPTED
    if args.json and result.get("floor_us") is not None:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
        print(f"bench: wrote {args.json}" + (" (partial)" if status else ""))
    if args.plots and status == config.EXIT_OK:
        for path in plot(result, args.plots):
            print(f"bench: wrote {path}")
    return status


if __name__ == "__main__":
    sys.exit(main())
