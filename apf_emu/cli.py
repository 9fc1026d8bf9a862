# `apf-emu`: the user's entry point. `run` (the native topology), `check` (protocol invariants over logs) and
# `stats` (counts and latencies over logs). The launcher only starts processes and reads logs: it imports neither
# the host daemon nor the guest agent.
from __future__ import annotations

import argparse
import io
import os
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import orjson
import trio

from shared import config
from shared.abis import ABIS
from shared.config import GuestOptions, HostOptions
from shared.guest_ram import check_vm_id
from shared.snapshot import DEFAULT_MSR_LIST, MSR_LISTS, parse_msr_list
from shared.transports import TRANSPORTS

from . import cli_campaign, shards
from .chaos import ChaosOptions, chaos
from .checker import DEFAULT_READY_LATENCY_LIMIT_MS, INPUT_NAMES, INVARIANTS, JUDGED, Checker, Violation, fmt_token
from .compare import AbiRun, table
from .ftrace.writer import export as ftrace_export
from .logdirs import DEFAULT_ROOT, human_size, log_dirs, prune, volume
from .logs import LogInputError, ReadReport, expand, read_merged
from .runner import CHAOS_GUEST, RUN_GUEST, RUN_HOST, RunOptions, RunResult, check_socket_room, describe_exit, run
from .scenarios import BY_NAME as SCENARIO_BY_NAME
from .scenarios import CHAOS_SCENARIOS, SCENARIOS, Verdict, chaos_scenario, run_scenario, with_scenario
from .stats import INTERLEAVINGS, LATENCIES, Stats
from .summary import chaos_json, stats_json
from .trace import build_trace
from .verdict import analyse, analyse_run, verdict_status
from .vmm import VmmError, exec_restore, snapshot

DURATION = config.Option("duration", config.float_in(0.0, 30 * 86400.0, lo_open=True), 10.0, "seconds to run")
COUNT = config.int_in(0, 100_000)
SCENARIO_NAMES = tuple(SCENARIO_BY_NAME)


def build_parser(env: dict[str, Any] | None = None) -> argparse.ArgumentParser:
    """`env`: APF_EMU_<OPTION> values (parsed), the defaults of the options `run` and `chaos` hand to the daemons."""
    env = env or {}
    p = config.UsageParser(
        prog="apf-emu",
        description="Emulate the KVM async page fault protocol (interrupt-based, Linux 5.8+) with a host daemon "
        "and one guest agent process per vCPU, and inspect the JSON logs they write.",
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=config.UsageParser)

    r = sub.add_parser("run", help="run host and guests natively, then check the logs",
                       description="Start the host daemon and N guest agents, stop them at --duration or on "
                       "SIGINT/SIGTERM, print a summary and check every protocol invariant over the logs. A process "
                       "that dies under `run` is not restarted (`chaos` restarts what it kills): the run stops and "
                       "fails. Exit status: 0 clean, 1 an invariant was violated, 2 bad usage, 3 a process failed "
                       "(or nothing was checked), 130 interrupted before anything could be checked.")
    config.add_options(r, config.HOST_OPTIONS, only=RUN_HOST, defaults=env)
    config.add_options(r, config.GUEST_OPTIONS, only=RUN_GUEST, defaults=env)
    config.add_options(r, [DURATION])
    r.add_argument("--log-dir", type=Path, default=None, metavar="DIR",
                   help="where host.jsonl and guest-<vcpu>.jsonl go (default apf-emu-logs/<vm>); earlier logs "
                   "of the same names there are replaced")
    r.add_argument("--vm", type=config.typed(check_vm_id, "vm"), default=None, help="VM id (default run<pid>)")
    r.add_argument("--json", action="store_true", help="print the summary as JSON")

    x = sub.add_parser("chaos", help="run under a seeded schedule of kills, panics and pauses, then check",
                       description="Run the native topology while a seeded, reproducible schedule SIGKILLs and "
                       "panics guests, SIGKILLs the host, and pauses both; everything that dies is brought back "
                       "(a killed guest as its next boot, a panicked one as a kdump kernel, the host with "
                       "--recover). Ends with the checker's verdict and a summary; SIGINT/SIGTERM stop it early, "
                       "judged as far as it got. Exit status: 0 clean, 1 an invariant was violated, 2 bad usage, 3 "
                       "the harness saw a problem (unexpected exit, leftovers), 130 interrupted before anything "
                       "could be checked.")
    config.add_options(x, config.HOST_OPTIONS, only=RUN_HOST, defaults={"vcpus": 3, "seed": 1, **env})
    config.add_options(x, config.GUEST_OPTIONS, only=CHAOS_GUEST, defaults=env)
    config.add_options(x, [DURATION], defaults={"duration": 60.0})
    for name, default, what in (("guest_kills", 10, "guest SIGKILLs"),
                                ("guest_panics", 3, "guest panics, each followed by a kdump boot"),
                                ("host_kills", 2, "host SIGKILLs, each followed by --recover"),
                                ("pauses", 5, "SIGSTOP/SIGCONT pauses of a guest or the host")):
        config.add_options(x, [config.Option(name, COUNT, default, f"{what}, 0..100000")])
    x.add_argument("--log-dir", type=Path, default=None, metavar="DIR", help="default apf-emu-logs/<vm>")
    x.add_argument("--vm", type=config.typed(check_vm_id, "vm"), default=None, help="VM id (default chaos<pid>)")
    x.add_argument("--scenario", type=config.typed(_chaos_scenario, "scenario"), default=None, metavar="NAME[:VARIANT]",
                   help="run with a known failure's switches (its buggy variant, or NAME:fixed for its fix): one of "
                   + ", ".join(CHAOS_SCENARIOS) + " (docs/SCENARIOS.md); its vCPU count, duration and faults are "
                   "not taken, and its switches win over the options above")
    x.add_argument("--json", action="store_true", help="print the summary as JSON")

    cm = sub.add_parser("compare", help="run the same seeded workload on each ABI and compare the designs",
                        description="Run the native topology once per ABI (shared/abis.py: " + ", ".join(ABIS) +
                        ") with the same options and seed, check each run's logs, and print one table: APFs "
                        "delivered, synchronous faults, races seen and invariant violations by kind, events lost "
                        "or misdirected, APF cycle and page-ready latency. The designs' flaws are the point, so "
                        "violations do not fail it. Exit status: 0 every ABI ran, 2 bad usage, 3 a run checked "
                        "nothing, 130 interrupted (the ABIs done so far are shown).")
    config.add_options(cm, config.HOST_OPTIONS, only=[o for o in RUN_HOST if o != "abi"],
                       defaults={"seed": 1, **env})
    config.add_options(cm, config.GUEST_OPTIONS, only=RUN_GUEST, defaults=env)
    config.add_options(cm, [DURATION], defaults={"duration": 5.0})
    cm.add_argument("--abis", type=config.typed(_abi_list, "abis"), default=list(ABIS), metavar="LIST",
                    help=f"comma-separated ABIs to run, in this order (default {','.join(ABIS)})")
    cm.add_argument("--log-dir", type=Path, default=None, metavar="DIR",
                    help="where each ABI's logs go, in DIR/<abi> (default apf-emu-logs/compare<pid>)")
    cm.add_argument("--json", action="store_true", help="print the comparison as JSON")

    c = sub.add_parser("check", help="check protocol invariants over logs",
                       description="Merge host and guest logs by mono_ns and verify every invariant. Exit status: "
                       "0 clean, 1 violations, 2 unreadable input.")
    c.add_argument("logs", nargs="*", help="log files (.jsonl, .jsonl.gz), directories of them, a real host's "
                   "ftrace text (trace-cmd report, /sys/kernel/tracing/trace), or - for stdin")
    c.add_argument("--json", action="store_true", help="print every violation as a JSON line")
    c.add_argument("--max-violations", type=config.typed(config.int_in(0, 10**9), "max_violations"), default=20,
                   metavar="N", help="print at most N violations with their context (0: all; default 20); the "
                   "text output always ends with the count per invariant")
    c.add_argument("--ready-latency-limit", type=config.typed(config.float_in(0, 86_400_000, lo_open=True), "ms"),
                   default=None, metavar="MS",
                   help="longest allowed time from a completion to its page-ready, in ms, above 0 (default: what "
                   f"the logs recorded, e.g. a chaos run's; else {DEFAULT_READY_LATENCY_LIMIT_MS:g})")
    c.add_argument("--jobs", type=config.typed(config.int_in(1, 256), "jobs"), default=None, metavar="N",
                   help="check in N processes side by side, the logs split by vCPU (default: one per CPU, as the "
                   "logs' size warrants, one per 16 MB; ftrace text and stdin are checked in one); the verdict "
                   "is the same however many")
    c.add_argument("--list", action="store_true", help="list the invariants and exit")

    t = sub.add_parser("trace", help="export logs as a timeline (Perfetto, chrome://tracing) or as ftrace text",
                       description="--format chrome (the default) writes Chrome Trace Event JSON: a track per host "
                       "vCPU and per guest task, a slice per APF from not-present to wake, arrows from the host's "
                       "page-ready to the guest's wake, instants for ACKs, synchronous faults, dropped completions, "
                       "boots and shutdowns; open it in ui.perfetto.dev or chrome://tracing. --format ftrace writes "
                       "the host's events as `trace-cmd report -t` lines of KVM's tracepoints (vCPU threads "
                       "`CPU <n>/KVM`), and the guests' as atrace markers (docs/TRACING.md). The input may be "
                       "apf-emu logs or a real host's trace (`trace-cmd report`, /sys/kernel/tracing/trace). "
                       "Exit status: 0 written, 2 bad usage or unreadable input, 3 the output could not be written.")
    t.add_argument("logs", nargs="+", help="log files (.jsonl, .jsonl.gz), directories of them, ftrace text files, "
                   "or - for stdin")
    t.add_argument("-o", "--output", required=True, type=config.typed(_output, "output"), metavar="FILE",
                   help="the file to write (- for stdout)")
    t.add_argument("--format", choices=("chrome", "ftrace"), default="chrome",
                   help="chrome: Chrome Trace Event JSON; ftrace: trace-cmd report text (default chrome)")
    t.add_argument("--no-markers", action="store_true",
                   help="with --format ftrace: only KVM's tracepoints, no atrace markers for Perfetto")

    s = sub.add_parser("stats", help="event counts and latency distributions over logs",
                       description="Count events per vCPU (the host's own lines in the `host` column), APFs "
                       "against synchronous faults, and latency percentiles of the APF cycle. Exit status: 0 done, "
                       "2 bad usage or unreadable input.")
    s.add_argument("logs", nargs="+", help="log files (.jsonl, .jsonl.gz), directories of them, ftrace text "
                   "files, or - for stdin")
    s.add_argument("--json", action="store_true", help="print JSON")

    lg = sub.add_parser("logs", help="list or prune the log directories of earlier runs",
                        description="The log directories that `run` and `chaos` write under apf-emu-logs/ (one per "
                        "VM): `list` shows each with its size; `prune --keep N` removes all but the N newest. Only "
                        "directories holding apf-emu logs are touched. Exit status: 0 done, 2 bad usage.")
    lg.add_argument("action", choices=("list", "prune"), help="list, or prune")
    lg.add_argument("--keep", type=config.typed(config.int_in(0, 10**6), "keep"), default=None, metavar="N",
                    help="with prune: how many of the newest directories to keep")
    lg.add_argument("--root", type=Path, default=DEFAULT_ROOT, metavar="DIR",
                    help=f"where the log directories are (default {DEFAULT_ROOT})")

    sc = sub.add_parser("scenario", help="reproduce a known failure of the protocol, and run its fix",
                        description="Each scenario (docs/SCENARIOS.md) is a real failure of KVM, Linux or a VMM: a "
                        "seeded native run with the switches that make it happen (the buggy variant) and one "
                        "without them (the fixed variant). `list` names them; `run NAME` runs both variants and "
                        "passes when the buggy one is flagged by the scenario's named check and the fixed one is "
                        "clean (`--buggy` or `--fixed`: one variant only); `run --all` runs every scenario, on the "
                        "signal transport too where it is about timing. Exit status: 0 every scenario passed, 1 one "
                        "did not, 2 bad usage, 130 interrupted.")
    sc.add_argument("action", choices=("list", "run"), help="list, or run")
    sc.add_argument("name", nargs="?", choices=[*SCENARIO_NAMES, None], metavar="NAME",
                    help="with run: the scenario (" + ", ".join(SCENARIO_NAMES) + ")")
    sc.add_argument("--all", action="store_true", help="with run: every scenario")
    which = sc.add_mutually_exclusive_group()
    which.add_argument("--buggy", action="store_true", help="run the buggy variant only")
    which.add_argument("--fixed", action="store_true", help="run the fixed variant only")
    sc.add_argument("--seed", type=config.typed(config.int_in(0, 2**63 - 1), "seed"), default=1,
                    help="random seed of both variants (default 1)")
    sc.add_argument("--transport", type=config.typed(config.one_of(*TRANSPORTS), "transport"), default=None,
                    help="socket or signal (default: socket; with --all, also signal where the scenario is about "
                    "timing)")
    sc.add_argument("--log-dir", type=Path, default=None, metavar="DIR",
                    help="where the runs' logs go, in DIR/<scenario>/<variant>-<transport> (default "
                    "apf-emu-logs/scenario<pid>)")
    sc.add_argument("--json", action="store_true", help="print one JSON line per scenario run")

    sn = sub.add_parser("snapshot", help="pause a running VM and save it to a directory, as a VMM snapshot does",
                        description="Ask the host on --socket to pause every vCPU (SIGSTOP its guest), save guest "
                        "RAM, the backing store and each vCPU's registers, read with RDMSR of the MSRs in --msrs, and "
                        "its interrupt state into DIR (shared/snapshot.py), then stop, leaving the guests paused for "
                        "`apf-emu restore DIR`. Exit status: 0 saved, 2 bad usage, 3 the host refused or did not "
                        "answer.")
    sn.add_argument("directory", type=Path, metavar="DIR", help="where the snapshot goes (made if missing)")
    sn.add_argument("--socket", type=Path, default=HostOptions.socket, metavar="PATH",
                    help=f"the host's socket (default {HostOptions.socket})")
    sn.add_argument("--msrs", type=config.typed(_msr_list, "msrs"), default=DEFAULT_MSR_LIST, metavar="LIST",
                    help="the MSRs the VMM saves: " + ", ".join(MSR_LISTS) + f" (default {DEFAULT_MSR_LIST}: "
                    "0x4b564d00-0x4b564dff), or names, numbers and LO-HI ranges, comma-separated; an MSR left out "
                    "comes back as 0 (docs/SCENARIOS.md)")
    rs = sub.add_parser("restore", help="start a host from a snapshot and resume its paused guests",
                        description="Become the host daemon of the VM saved in DIR (`apf-host --restore DIR` with "
                        "the options the snapshot recorded; host options given after DIR override them, e.g. "
                        "--socket, --log-dir, --log-stdout): guest RAM, the swap and the saved registers are put "
                        "back, the paused guests resumed; they reconnect as the same boots. Runs until SIGTERM, "
                        "as apf-host does. Exit status: apf-host's; 3 also for a snapshot that cannot be read.")
    rs.add_argument("directory", type=Path, metavar="DIR", help="a directory written by `apf-emu snapshot`")
    rs.add_argument("host_options", nargs=argparse.REMAINDER, metavar="HOST OPTION",
                    help="apf-host options that override the recorded ones")

    cli_campaign.add_parsers(sub)

    sub.add_parser("bench", help="run the benchmarks in bench/ (needs a source checkout); "
                   "`apf-emu bench --help` for their options", add_help=False)
    return p


def _abi_list(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in ABIS]
    if not names or unknown or len(set(names)) != len(names):
        raise ValueError(f"expected distinct ABIs out of {', '.join(ABIS)}, got {text!r}")
    return names


def _chaos_scenario(text: str) -> str:
    chaos_scenario(text)  # ValueError: a usage error naming --scenario
    return text


def _msr_list(text: str) -> str:
    parse_msr_list(text)  # ValueError: a usage error naming --msrs
    return text


def _output(text: str) -> str:
    return text if text == "-" else str(config.output_file(text))


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"]:
        return cmd_bench(argv[1:])
    try:
        env = config.env_defaults([*config.HOST_OPTIONS, *config.GUEST_OPTIONS])
    except config.ConfigError as exc:
        print(f"apf-emu: error: {exc}", file=sys.stderr)
        return config.EXIT_USAGE
    args = build_parser(env).parse_args(argv)
    try:
        if args.command == "run":
            return cmd_run(args)
        if args.command == "check":
            return cmd_check(args)
        if args.command == "trace":
            return cmd_trace(args)
        if args.command == "chaos":
            return cmd_chaos(args)
        if args.command == "logs":
            return cmd_logs(args)
        if args.command == "compare":
            return cmd_compare(args)
        if args.command == "scenario":
            return cmd_scenario(args)
        if args.command == "snapshot":
            return cmd_snapshot(args)
        if args.command == "restore":
            return cmd_restore(args)
        if args.command == "campaign":
            return cli_campaign.cmd_campaign(args)
        if args.command == "pod":
            return cli_campaign.cmd_pod(args)
        return cmd_stats(args)
    except BrokenPipeError:  # `apf-emu check ... | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except KeyboardInterrupt:  # a Ctrl-C outside a run (reading logs, printing a summary): nothing to clean up
        print(f"apf-emu {args.command}: interrupted", file=sys.stderr)
        return config.EXIT_INTERRUPTED


def cmd_bench(argv: list[str]) -> int:
    """The benchmarks live in the checkout's bench/ (they are not installed): run them from there."""
    root = Path(__file__).resolve().parents[1]
    if not (root / "bench" / "run.py").is_file():
        print(f"apf-emu bench: no bench/ next to {root / 'apf_emu'}; run it from a source checkout "
              "(pip install -e .)", file=sys.stderr)
        return 2
    # A process of its own (bench is not a dependency of apf_emu): it replaces this one, so that Ctrl-C, the exit
    # status and the output are the benchmark's. It runs in the user's directory (relative paths are theirs), with
    # the checkout on its path.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))}
    os.execve(sys.executable, [sys.executable, "-m", "bench.run", *argv], env)


# --- check and stats --------------------------------------------------------------------------------------------
def print_violations(violations: list[Violation], *, as_json: bool, out: Any = sys.stdout) -> None:
    for v in violations:
        if as_json:
            out.write(orjson.dumps(v.as_dict()).decode() + "\n")
            continue
        out.write(f"VIOLATION {v.invariant}: {v.message}\n")
        for ev in v.context:
            out.write(f"    before: {_brief(ev)}\n")
        out.write(f"    at:     {_brief(v.event)}\n")


def print_verdict(violations: list[Violation], checker: Checker) -> None:
    """The last lines of a run's or a chaos run's summary."""
    print(f"  checker             ready-latency limit {checker.ready_latency_limit_ms:g} ms ({checker.limit_source})")
    if not checker.protocol_events:
        print("  invariants: NOT CHECKED: the logs hold no protocol event")
    elif violations:
        print(f"  invariants: {len(violations)} VIOLATIONS")
        print_violations(violations[:20], as_json=False)
        if len(violations) > 20:
            print(f"  ... {len(violations) - 20} more: apf-emu check LOGS --max-violations 0")
    else:
        print(f"  invariants: all {len(INVARIANTS)} hold")


STOPPED_STARTING = -15  # -SIGTERM: the runner's SIGTERM reached a child before it had installed its handler

TOKEN_FIELDS = frozenset({"token", "released", "slot", "cr2"})  # printed in hex, as KVM's tracepoints print them


def _brief(ev: dict[str, Any]) -> str:
    skip = {"timestamp", "level", "pid", "vm"}
    return " ".join(f"{k}={fmt_token(v)}" if k in TOKEN_FIELDS else f"{k}={v}" for k, v in ev.items()
                    if k not in skip)


def cmd_check(args: argparse.Namespace) -> int:
    if args.list:
        print("invariant: what it says   [judged on: L apf-emu logs, E apf-emu's ftrace export, T a real host's "
              "trace]")
        for name, text in INVARIANTS.items():
            marks = "".join(k[0].upper() if name in JUDGED[k] else "-" for k in ("logs", "export", "trace"))
            print(f"{name} [{marks}]: {text}")
        return 0
    if not args.logs:
        print("apf-emu check: name the logs to check (files, directories, or - for stdin), or use --list",
              file=sys.stderr)
        return config.EXIT_USAGE
    try:
        violations, report, checker = shards.check(args.logs, jobs=args.jobs,
                                                   ready_latency_limit_ms=args.ready_latency_limit)
    except LogInputError as exc:
        print(f"apf-emu check: {exc}", file=sys.stderr)
        return 2
    print_notes("check", report)
    if not checker.protocol_events:
        print(f"apf-emu check: nothing to check: {report.lines} lines read, {checker.events} apf-emu events, none "
              f"of them a protocol event an invariant reads ({len(report.unreadable)} unreadable lines)",
              file=sys.stderr)
        return 2
    if args.json:
        print_violations(violations, as_json=True)
        return 1 if violations else 0
    shown = violations if not args.max_violations else violations[:args.max_violations]
    print_violations(shown, as_json=False)
    if len(shown) < len(violations):
        print(f"... {len(violations) - len(shown)} more violations not shown (--max-violations, or --json for all)")
    counts = Counter(v.invariant for v in violations)
    for name in INVARIANTS:
        if counts[name]:
            print(f"  {name:26} {counts[name]:9} violations")
    judged = len(checker.judged)
    scope = "" if checker.input == "logs" else \
        f" judged on {INPUT_NAMES[checker.input]} ({', '.join(sorted(checker.judged))})"
    print(f"{checker.events} events, {judged} invariants{scope}, {len(violations)} violations "
          f"(ready-latency limit {checker.ready_latency_limit_ms:g} ms, {checker.limit_source})")
    return 1 if violations else 0


def print_notes(command: str, report: ReadReport) -> None:
    """What the log reader tolerated, on stderr: cut last lines (killed processes), unreadable lines and damage;
    for ftrace text, what the trace held."""
    ft = report.ftrace
    if ft is not None:
        kind = "an apf-emu export" if ft.export else "a real trace"
        print(f"apf-emu {command}: note: ftrace text, {kind}: {ft.apf_events} APF events of {ft.events} "
              f"({ft.other_events} of other tracepoints skipped); formats: {'; '.join(sorted(ft.formats)) or 'none'}",
              file=sys.stderr)
        if ft.lost:
            print(f"apf-emu {command}: note: the trace lost events {ft.lost} times; the checker starts afresh after "
                  "each", file=sys.stderr)
        if not ft.export and not ft.tgid:
            print(f"apf-emu {command}: note: no tgid column: each vCPU thread counts as its own VM "
                  "(docs/TRACING.md)", file=sys.stderr)
        if ft.backwards:
            print(f"apf-emu {command}: note: {ft.backwards} lines go back in time (sorted before judging; a clock "
                  "that is not global across CPUs misorders events: record with -C mono or -C global)",
                  file=sys.stderr)
        if ft.unmatched_completions:
            print(f"apf-emu {command}: note: {ft.unmatched_completions} completions matched no not-present "
                  "(their fault came before the trace)", file=sys.stderr)
    for where in report.truncated:
        print(f"apf-emu {command}: note: cut last line tolerated at {where} (a killed process)", file=sys.stderr)
    for where in report.unreadable[:10]:
        print(f"apf-emu {command}: note: unreadable: {where}", file=sys.stderr)
    if len(report.unreadable) > 10:
        print(f"apf-emu {command}: note: {len(report.unreadable) - 10} more unreadable lines", file=sys.stderr)


def _nothing_read(command: str, report: ReadReport) -> int:
    print(f"apf-emu {command}: nothing to read: {report.lines} lines, no apf-emu event among them "
          f"({len(report.unreadable)} unreadable)", file=sys.stderr)
    return config.EXIT_USAGE


def cmd_trace(args: argparse.Namespace) -> int:
    report = ReadReport()
    if args.output != "-":
        out = Path(args.output).resolve()
        try:
            inputs = {Path(name).resolve() for name in expand(args.logs) if name != "-"}
        except LogInputError as exc:
            print(f"apf-emu trace: {exc}", file=sys.stderr)
            return config.EXIT_USAGE
        if out in inputs:
            print(f"apf-emu trace: error: -o {args.output} is one of the logs to read (see apf-emu trace --help)",
                  file=sys.stderr)
            return config.EXIT_USAGE
    try:
        if args.format == "ftrace":
            text = io.StringIO()
            written = ftrace_export(read_merged(args.logs, report), text, markers=not args.no_markers)
            data, count = text.getvalue().encode(), written.tracepoint_lines
            done = (f"{written.tracepoint_lines} tracepoint lines, {written.marker_lines} markers, "
                    f"{written.state_lines} host events without a tracepoint as `# apf-emu event` lines "
                    f"({written.skipped} others left out)")
        else:
            trace = build_trace(read_merged(args.logs, report))
            data, count = orjson.dumps(trace) + b"\n", len(trace["traceEvents"])
            done = f"{count} trace events from {report.lines} log lines"
    except LogInputError as exc:
        print(f"apf-emu trace: {exc}", file=sys.stderr)
        return config.EXIT_USAGE
    print_notes("trace", report)
    if report.lines and not count:
        return _nothing_read("trace", report)
    try:
        if args.output == "-":
            sys.stdout.buffer.write(data)
        else:
            Path(args.output).write_bytes(data)
    except OSError as exc:
        print(f"apf-emu trace: cannot write {args.output}: {exc.strerror}", file=sys.stderr)
        return config.EXIT_FAILED
    if args.output != "-":
        print(f"apf-emu trace: {done} -> {args.output}", file=sys.stderr)
    return 0


def cmd_stats(args: argparse.Namespace) -> int:
    try:
        _v, stats, report, _checker = analyse(args.logs, check=False)
    except LogInputError as exc:
        print(f"apf-emu stats: {exc}", file=sys.stderr)
        return 2
    print_notes("stats", report)
    if not stats.events:
        return _nothing_read("stats", report)
    if args.json:
        print(orjson.dumps(stats_json(stats)).decode())
    else:
        vcpus = sorted(stats.per_vcpu)
        print(f"{'event':32} {'total':>10}" + "".join(f" {v:>12}" for v in vcpus))
        for name, n in sorted(stats.events.items()):
            print(f"{name:32} {n:10}" + "".join(f" {stats.per_vcpu[v][name]:12}" for v in vcpus))
        print(f"\nAPFs {stats.apfs}, artificial halts {stats.halts} "
              f"({', '.join(f'{k} {v}' for k, v in sorted(stats.halt_reasons.items())) or 'none'}), "
              f"synchronous faults {stats.sync_faults} "
              f"({', '.join(f'{k} {v}' for k, v in sorted(stats.sync_reasons.items())) or 'none'})")
        print("outstanding APFs, high-water mark per vCPU: "
              + (", ".join(f"{k} {v}" for k, v in sorted(stats.outstanding_max.items())) or "none"))
        print(f"data checks {stats.data_checks}, failed {stats.data_check_failures}")
        if stats.races:
            print("races (pf): " + ", ".join(f"{k} {v}" for k, v in sorted(stats.races.items())))
        print()
        for lat in LATENCIES:
            print(f"{lat:32} {_pct(stats.percentiles(lat))}")
        for name in INTERLEAVINGS:
            print(f"{name:32} {stats.interleavings[name]:10}")
    return 0


def _pct(p: dict[str, float]) -> str:
    if not p.get("count"):
        return "-"
    return (f"p50 {p['p50_us']:>7} us  p90 {p['p90_us']:>7} us  p99 {p['p99_us']:>7} us  max {p['max_us']:>8} us"
            f"  (n={p['count']})")


def cmd_logs(args: argparse.Namespace) -> int:
    if args.action == "prune" and args.keep is None:
        print("apf-emu logs: error: prune needs --keep N (see apf-emu logs --help)", file=sys.stderr)
        return config.EXIT_USAGE
    if not args.root.is_dir():
        print(f"apf-emu logs: error: --root {args.root}: not a directory (see apf-emu logs --help)", file=sys.stderr)
        return config.EXIT_USAGE
    if args.action == "list":
        dirs = log_dirs(args.root)
        for d in dirs:
            print(d.line())
        print(f"{len(dirs)} log directories, {human_size(sum(d.size for d in dirs))} under {args.root}")
        return 0
    removed = prune(args.root, args.keep)
    for d in removed:
        print(f"removed {d.line()}" + ("" if not d.path.exists() else "  (other files kept there)"))
    print(f"removed {len(removed)} log directories ({human_size(sum(d.size for d in removed))}), kept the "
          f"{args.keep} newest")
    return 0


# --- chaos ------------------------------------------------------------------------------------------------------
def run_options(args: argparse.Namespace) -> tuple[HostOptions, GuestOptions]:
    """The host's and the guests' options of `run` or `chaos`, validated, and the log directory made: a usage error
    (exit 2) otherwise."""
    try:
        options = config.from_args(HostOptions, args), config.from_args(GuestOptions, args)
        check_socket_room()
        if args.log_dir is not None:
            config.make_dir(args.log_dir, "--log-dir")
        else:
            config.make_dir(Path("apf-emu-logs"), "the default log directory")
        return options
    except config.ConfigError as exc:
        print(f"apf-emu {args.command}: error: {exc}", file=sys.stderr)
        raise SystemExit(config.EXIT_USAGE) from None


def cmd_chaos(args: argparse.Namespace) -> int:
    host, guest = run_options(args)
    if args.scenario is not None:
        host, guest = with_scenario(*chaos_scenario(args.scenario), host, guest)
    opts = ChaosOptions(host=host, guest=guest, duration=args.duration, log_dir=args.log_dir, vm=args.vm,
                        guest_kills=args.guest_kills, guest_panics=args.guest_panics, host_kills=args.host_kills,
                        pauses=args.pauses)
    result = trio.run(chaos, opts)
    violations, stats, report, checker = analyse_run(result.log_dir)  # with the limit the run recorded
    summary = chaos_json(result, stats, violations, report, checker, args.scenario)
    if args.json:
        print(orjson.dumps(summary).decode())
    else:
        print_chaos(summary, violations, checker)
    interrupted = result.stopped_by != "duration"
    # What the harness had to remove is a failure, unless a stop cut a process short while it was still starting
    # (its SIGTERM came before its handler): then the host could not clean up after itself.
    failed = bool(result.problems) or (bool(result.leftovers) and not interrupted)
    return verdict_status(violations, checker, failed=failed, interrupted=interrupted)


def print_chaos(summary: dict[str, Any], violations: list[Violation], checker: Checker) -> None:
    print(f"apf-emu chaos: VM {summary['vm']}, stopped by {summary['stopped_by']}, logs in {summary['log_dir']}"
          + (f", scenario {summary['scenario']}" if summary["scenario"] else ""))
    injected, planned = summary["injected"], summary["schedule"]
    print(f"  faults injected, {len(injected)} of the {len(planned)} planned:")
    for line in injected:
        print(f"    {line}")
    applied = ", ".join(f"{k} {v}" for k, v in sorted(summary["faults_applied"].items())) or "none"
    skipped = ", ".join(f"{k} {v}" for k, v in sorted(summary["faults_skipped"].items()))
    print(f"  faults injected     {applied}" + (f" (skipped: {skipped})" if skipped else ""))
    for vcpu, kinds in summary["boots"].items():
        print(f"  vcpu {vcpu} boots       {len(kinds)}: {' '.join(kinds)}")
    print(f"  host starts         {summary['host_starts']}, guest reconnects {summary['reconnects']}")
    if summary["early_signal_deaths"]:
        print(f"  panics or reboots that hit a guest still starting (it died as if SIGKILLed): "
              f"{summary['early_signal_deaths']}")
    eaten = ", ".join(f"{k} {v}" for k, v in sorted(summary["completions_eaten"].items())) or "none"
    print(f"  completions eaten   {eaten}")
    print(f"  tasks retried after a wake-all  {summary['tasks_retried_after_wake_all']}")
    print(f"  APFs {summary['apfs']}, data checks {summary['data_checks'] - summary['data_check_failures']} of "
          f"{summary['data_checks']} passed, pages torn by killed boots {summary['torn_pages']}")
    for line in summary["problems"]:
        print(f"  ! {line}")
    print(f"  left behind: {', '.join(summary['leftovers']) if summary['leftovers'] else 'nothing'}")
    print(f"  logs                {human_size(summary['log_bytes'])} in {summary['log_files']} files")
    print_verdict(violations, checker)


# --- run --------------------------------------------------------------------------------------------------------
def cmd_run(args: argparse.Namespace) -> int:
    host, guest = run_options(args)
    opts = RunOptions(host=host, guest=guest, duration=args.duration, log_dir=args.log_dir, vm=args.vm)
    result = trio.run(run, opts)
    violations, stats, _report, checker = analyse_run(result.log_dir)
    if args.json:
        print(orjson.dumps(run_json(result, stats, violations, checker)).decode())
    else:
        print_summary(result, stats, violations, checker)
    # A child the runner stopped while Python was still starting it dies of the SIGTERM itself: not a failure.
    failed = bool(result.unexpected_exits) or any(code not in (0, STOPPED_STARTING) for code in
                                                  result.exit_codes.values())
    return verdict_status(violations, checker, failed=failed, interrupted=result.stopped_by in ("SIGINT", "SIGTERM"))


def cmd_compare(args: argparse.Namespace) -> int:
    root: Path = args.log_dir if args.log_dir is not None else Path("apf-emu-logs") / f"compare{os.getpid()}"
    runs: list[AbiRun] = []
    interrupted = False
    for abi in args.abis:
        ns = argparse.Namespace(**{**vars(args), "abi": abi, "log_dir": root / abi})
        host, guest = run_options(ns)
        opts = RunOptions(host=host, guest=guest, duration=args.duration, log_dir=root / abi,
                          vm=f"cmp{os.getpid()}-{abi}")
        if not args.json:
            print(f"apf-emu compare: {abi} ...", file=sys.stderr, flush=True)
        result = trio.run(run, opts)
        violations, stats, _report, checker = analyse_run(result.log_dir)
        runs.append(AbiRun(abi, stats, violations, dict(result.exit_codes), list(result.unexpected_exits),
                           str(result.log_dir)))
        if result.stopped_by in ("SIGINT", "SIGTERM"):
            interrupted = True
            break
        if not checker.protocol_events:
            print(f"apf-emu compare: the {abi} run checked nothing (logs in {result.log_dir})", file=sys.stderr)
            return config.EXIT_FAILED
    if args.json:
        print(orjson.dumps({"seed": args.seed, "duration": args.duration, "transport": args.transport,
                            "vcpus": args.vcpus, "log_dir": str(root), "interrupted": interrupted,
                            "abis": [r.as_dict() for r in runs]}).decode())
    else:
        print(f"apf-emu compare: seed {args.seed}, {args.duration:g} s per ABI, {args.vcpus} vCPUs, {args.transport} "
              f"transport, logs in {root}")
        print("\n".join(table(runs)))
        if interrupted:
            print("  (interrupted: the ABIs after the last column did not run)")
    return config.EXIT_INTERRUPTED if interrupted else config.EXIT_OK


def cmd_snapshot(args: argparse.Namespace) -> int:
    try:
        done = snapshot(args.socket, args.directory, args.msrs)
    except VmmError as exc:
        print(f"apf-emu snapshot: {exc}", file=sys.stderr)
        return config.EXIT_FAILED
    print(f"apf-emu snapshot: {done.vcpus} vCPUs saved in {done.directory}; their guests are paused, the host has "
          f"stopped: `apf-emu restore {done.directory}` resumes them")
    return config.EXIT_OK


def cmd_restore(args: argparse.Namespace) -> int:
    if not args.directory.is_dir():
        print(f"apf-emu restore: error: {args.directory} is not a directory", file=sys.stderr)
        return config.EXIT_USAGE
    try:
        exec_restore(args.directory, list(args.host_options))
    except VmmError as exc:
        print(f"apf-emu restore: error: {exc}", file=sys.stderr)
        return config.EXIT_FAILED  # as apf-host --restore exits for a damaged snapshot
    return config.EXIT_FAILED  # not reached: exec


def cmd_scenario(args: argparse.Namespace) -> int:
    if args.action == "list":
        if args.name or args.all:
            print("apf-emu scenario: error: list takes no scenario", file=sys.stderr)
            return config.EXIT_USAGE
        for scn in SCENARIOS:
            print(f"{scn.name:22} {scn.title}")
        return config.EXIT_OK
    if bool(args.name) == bool(args.all):
        print("apf-emu scenario: error: run takes one NAME or --all", file=sys.stderr)
        return config.EXIT_USAGE
    try:
        check_socket_room()
        root = args.log_dir if args.log_dir is not None else Path("apf-emu-logs") / f"scenario{os.getpid()}"
        config.make_dir(root, "--log-dir")
    except config.ConfigError as exc:
        print(f"apf-emu scenario: error: {exc}", file=sys.stderr)
        return config.EXIT_USAGE
    variants = ("buggy",) if args.buggy else ("fixed",) if args.fixed else ("buggy", "fixed")
    cases = [(scn, t) for scn in (SCENARIOS if args.all else [SCENARIO_BY_NAME[args.name]])
             for t in ([args.transport] if args.transport else ["socket", "signal"] if args.all and scn.timing
                       else ["socket"])]
    say = (lambda _line: None) if args.json else (lambda line: print(line, file=sys.stderr, flush=True))
    failed = 0
    for scn, transport in cases:
        verdict = run_scenario(scn, transport=transport, seed=args.seed, root=root, variants=variants, say=say)
        failed += not verdict.passed
        if args.json:
            print(orjson.dumps(verdict.as_dict()).decode(), flush=True)
        else:
            print_scenario_verdict(verdict)
        if any(r.result.stopped_by in ("SIGINT", "SIGTERM") for r in verdict.runs):
            return config.EXIT_INTERRUPTED
    if not args.json:
        print(f"apf-emu scenario: {len(cases) - failed} of {len(cases)} passed; logs in {root}")
    return config.EXIT_VIOLATIONS if failed else config.EXIT_OK


def print_scenario_verdict(verdict: Verdict) -> None:
    scn = verdict.scenario
    print(f"{'PASS' if verdict.passed else 'FAIL'} {scn.name} ({verdict.transport}): {scn.title}")
    for r in verdict.runs:
        variant = scn.buggy if r.variant == "buggy" else scn.fixed
        found = ", ".join(f"{k} {v}" for k, v in sorted(r.invariants.items())) or "clean"
        print(f"  {r.variant:5} {variant.what}: {found}")
    if verdict.flagged_by:
        print(f"  flagged by {', '.join(verdict.flagged_by)}")
    for problem in verdict.problems:
        print(f"  ! {problem}")


def run_json(result: RunResult, stats: Stats, violations: list[Violation], checker: Checker) -> dict[str, Any]:
    files, size = volume(result.log_dir)
    return {
        "log_files": files, "log_bytes": size,
        "vm": result.vm, "log_dir": str(result.log_dir), "stopped_by": result.stopped_by,
        "ready_latency_limit_ms": checker.ready_latency_limit_ms,
        "exit_codes": result.exit_codes, "unexpected_exits": result.unexpected_exits,
        "leftovers": result.leftovers, "stats": stats_json(stats),
        "violations": [v.as_dict() for v in violations],
    }


def print_summary(result: RunResult, stats: Stats, violations: list[Violation], checker: Checker) -> None:
    secs = stats.seconds or 1.0
    readies = stats.page_readies
    print(f"apf-emu run: VM {result.vm}, stopped by {result.stopped_by}, logs in {result.log_dir}")
    print(f"  APFs delivered (not-present)      {stats.apfs:9}   {stats.apfs / secs:8.0f}/s")
    kind = "#PFs (pf)      " if stats.abis == {"pf"} else "interrupts     "
    print(f"  page-ready {kind}        {readies:9}   (wake-all {stats.events['guest_apf_wake_all']})")
    reasons = ", ".join(f"{k} {v}" for k, v in sorted(stats.sync_reasons.items()))
    print(f"  artificial halts (KVM_REQ_APF_HALT) {stats.halts:7}   "
          + ", ".join(f"{k} {v}" for k, v in sorted(stats.halt_reasons.items())))
    print(f"  synchronous faults                {stats.sync_faults:9}   {reasons}")
    dropped = sum(stats.dropped_reasons.values())
    print(f"  completions eaten (APF disabled)  {dropped:9}")
    print(f"  page-ready latency                {_pct(stats.percentiles('completed_to_wake'))}")
    print(f"  APF cycle (not-present -> wake)   {_pct(stats.percentiles('not_present_to_wake'))}")
    print(f"  data checks passed                {stats.data_checks - stats.data_check_failures:9} of "
          f"{stats.data_checks}" + ("   (of the guests that shut down cleanly)" if result.unexpected_exits else ""))
    print("  interleavings seen                " + ", ".join(
        f"{k.replace('_', ' ')} {stats.interleavings[k]}" for k in list(INTERLEAVINGS)[:2]))
    print("                                    " + ", ".join(
        f"{k.replace('_', ' ')} {stats.interleavings[k]}" for k in list(INTERLEAVINGS)[2:]))
    if stats.races:
        print("  races (pf)                        " + ", ".join(f"{k.replace('_', ' ')} {v}"
                                                               for k, v in sorted(stats.races.items())))
    files, size = volume(result.log_dir)
    plain = not any(f.name.endswith(".gz") for f in result.log_dir.iterdir())
    print(f"  logs                              {human_size(size):>9}   in {files} files, {human_size(size / secs)}/s"
          + (" (--log-compress gzip writes about a seventh of it)" if plain else ""))
    for line in result.unexpected_exits + [f"left behind: {x}" for x in result.leftovers]:
        print(f"  ! {line}")
    early = {line.split(" ")[0] for line in result.unexpected_exits}
    for name, code in sorted(result.exit_codes.items()):
        if code == STOPPED_STARTING:
            print(f"  {name} was stopped while still starting")
        elif code != 0 and name not in early:
            print(f"  ! {name}: {describe_exit(code)}")
    print_verdict(violations, checker)
