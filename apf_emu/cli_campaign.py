# The command lines of `apf-emu campaign` (run, `report`, `collect`, `--kubernetes`) and of `apf-emu pod` (what
# a campaign's pods run): their options, and the commands, which hand the work to apf_emu/campaign.py, report.py,
# kube.py, collect.py and pod.py. The case options (seeds, ABIs, scenarios, the settings) are one set, parsed the
# same way by the campaign and by every container of its pods, so that an index names the same case in both.
from __future__ import annotations

import argparse
import os
import re
import shlex
import sys
from pathlib import Path
from typing import Any

import orjson
import trio

from shared import config
from shared.transports import TRANSPORTS

from . import collect, kube, pod, report
from .campaign import KEEP_LOGS, CampaignOptions, campaign
from .cases import (
    MAX_CASES,
    CampaignError,
    Case,
    Settings,
    bind_settings,
    compact,
    make_cases,
    parse_abis,
    parse_scenarios,
    parse_seeds,
    read_results,
)
from .runner import check_socket_room
from .scenarios import CHAOS_SCENARIOS

DEFAULT_OUT = Path("apf-emu-campaign")
COUNT = config.int_in(0, 100_000)


def add_case_options(p: argparse.ArgumentParser, *, required: bool) -> None:
    d = Settings()
    p.add_argument("--seeds", type=config.typed(parse_seeds, "seeds"), required=required, default=None,
                   metavar="LIST", help="the chaos seeds: ranges and single seeds, e.g. 1-500 or 1-20,40")
    p.add_argument("--abis", type=config.typed(parse_abis, "abis"), default=["int"], metavar="LIST",
                   help="comma-separated ABIs, each seed runs on each (default int)")
    p.add_argument("--scenarios", type=config.typed(parse_scenarios, "scenarios"), default=[None], metavar="LIST",
                   help="comma-separated: none (plain chaos) or a scenario's switches (NAME, NAME:fixed) from "
                   + ", ".join(CHAOS_SCENARIOS) + "; each seed runs with each; a `pf` scenario runs once per seed, "
                   "on pf (default none)")
    p.add_argument("--duration", type=config.typed(config.float_in(0.0, 86400.0, lo_open=True), "duration"),
                   default=d.duration, metavar="S", help=f"seconds per case (default {d.duration:g})")
    p.add_argument("--vcpus", type=config.typed(config.int_in(1, 64), "vcpus"), default=d.vcpus, metavar="N",
                   help=f"vCPUs per case, 1..64 (default {d.vcpus})")
    p.add_argument("--transport", type=config.typed(config.one_of(*TRANSPORTS), "transport"), default=d.transport,
                   help=f"{' or '.join(TRANSPORTS)} (default {d.transport})")
    for name, what in (("guest_kills", "guest SIGKILLs"), ("guest_panics", "guest panics"),
                       ("host_kills", "host SIGKILLs"), ("pauses", "pauses of a guest or the host")):
        p.add_argument("--" + name.replace("_", "-"), type=config.typed(COUNT, name), default=getattr(d, name),
                       metavar="N", help=f"{what} per case (default {getattr(d, name)})")


def case_set(args: argparse.Namespace) -> tuple[list[Case], Settings]:
    settings = Settings(duration=args.duration, vcpus=args.vcpus, transport=args.transport,
                        guest_kills=args.guest_kills, guest_panics=args.guest_panics, host_kills=args.host_kills,
                        pauses=args.pauses)
    return make_cases(args.seeds, args.abis, args.scenarios), settings


def add_parsers(sub: Any) -> None:
    cp = sub.add_parser(
        "campaign", help="run many chaos seeds (locally, or as Kubernetes manifests) and report what failed",
        description="Run one `apf-emu chaos` case per seed, ABI and scenario, --parallel at a time, each an isolated "
        "VM; record each outcome as a line of DIR/results.jsonl (seed, ABI, verdict, violations by invariant, "
        "counts, duration, the command that reproduces it). A second campaign on the same DIR skips the cases "
        "recorded (resume); SIGINT stops the running cases cleanly. `campaign report DIR` prints the failures by "
        "invariant with their seeds and draws the APF rates and latencies; `--kubernetes` writes an Indexed Job "
        "instead of running, `campaign collect DIR` reads its pods back (docs/KUBERNETES.md). Exit status: 0 "
        "every case passed, 1 a case failed, 2 bad usage, 130 interrupted (run it again to resume).")
    add_case_options(cp, required=False)
    cp.add_argument("--parallel", type=config.typed(config.int_in(1, 256), "parallel"), default=None, metavar="N",
                    help="cases at a time (default: half the CPUs, at least 1; each case is vCPUs + 2 processes); "
                    "with --kubernetes, the Job's parallelism (default 10)")
    cp.add_argument("--out", type=config.typed(config.output_dir, "out"), default=DEFAULT_OUT, metavar="DIR",
                    help=f"the campaign's directory (default {DEFAULT_OUT})")
    cp.add_argument("--keep-logs", choices=KEEP_LOGS, default="failed",
                    help="whose logs stay in DIR/cases/: failed cases' (default), all, none")
    cp.add_argument("--json", action="store_true", help="print the campaign's outcome as one JSON line at the end")
    cp.add_argument("--kubernetes", action="store_true",
                    help="write DIR/job.yaml (an Indexed Job, one pod per case) instead of running")
    cp.add_argument("--image", default=kube.DEFAULT_IMAGE,
                    help=f"with --kubernetes: the image of every container (default {kube.DEFAULT_IMAGE}, the "
                    "compose image)")
    cp.add_argument("--name", type=config.typed(_k8s_name, "name"), default=None,
                    help="with --kubernetes: the Job's name (default apf-emu-<DIR's name>)")
    cp.add_argument("--pod", type=config.typed(config.int_in(0, MAX_CASES), "pod"), default=None, metavar="INDEX",
                    help="with --kubernetes: also write DIR/pod-INDEX.yaml, a Pod of that case alone (for "
                    "`podman kube play`, or a cluster without the Job)")
    acts = cp.add_subparsers(dest="campaign_action", metavar="ACTION", parser_class=config.UsageParser)
    rp = acts.add_parser("report", help="failures by invariant, and a picture of rates and latencies",
                         description="Read DIR/results.jsonl and print the failing invariants with their seeds, "
                         "each failing case with the command that reproduces it and where its logs are, and the "
                         "spread of APF rates and latencies; draw them in DIR/report.png (matplotlib). Exit "
                         "status: 0 no case failed, 1 a case failed, 2 nothing to report.")
    rp.add_argument("directory", type=Path, metavar="DIR")
    rp.add_argument("--picture", type=config.typed(config.output_file, "picture"), default=None, metavar="FILE",
                    help="where the picture goes (default DIR/report.png)")
    rp.add_argument("--no-picture", action="store_true", help="text only")
    rp.add_argument("--json", action="store_true", help="print the records of the failing cases as JSON lines")
    cl = acts.add_parser("collect", help="read a Kubernetes campaign's pods back into DIR",
                         description="Record every finished pod of DIR/job.yaml's Job (kubectl) or, with --podman, "
                         "of DIR/pod-*.yaml, into DIR/results.jsonl and DIR/cases/ as a local campaign does; pods "
                         "still running are left for a later collect. Exit status: 0 done, 2 bad usage, 3 kubectl "
                         "or podman failed.")
    cl.add_argument("directory", type=Path, metavar="DIR")
    cl.add_argument("--podman", action="store_true", help="the pods of DIR/pod-*.yaml, played with podman")
    cl.add_argument("--namespace", default=None, help="the Job's namespace (default: kubectl's)")
    cl.add_argument("--kubectl", default="kubectl", metavar="CMD",
                    help="the kubectl command, split as a shell would (default kubectl)")
    cl.add_argument("--keep-logs", choices=KEEP_LOGS, default="failed",
                    help="whose logs are written to DIR/cases/: failed cases' (default), all, none")

    pd = sub.add_parser("pod", help="one case's container of a campaign pod (what --kubernetes manifests run)",
                        description="Run the part of one campaign case that a container of its pod plays "
                        "(docs/KUBERNETES.md): `host` is the case's harness (the host daemon, the chaos schedule, "
                        "the verdict: its exit status and a last JSON line), `guest --vcpu N` boots vCPU N's guest "
                        "over and over until the harness ends the case. The case is the INDEX-th of the campaign "
                        "the case options make (--index, else JOB_COMPLETION_INDEX).")
    pd.add_argument("role", choices=("host", "guest"))
    pd.add_argument("--index", type=config.typed(config.int_in(0, MAX_CASES), "index"), default=None)
    pd.add_argument("--vcpu", type=config.typed(config.int_in(0, 63), "vcpu"), default=None)
    pd.add_argument("--run-dir", type=Path, default=pod.RUN_DIR, metavar="DIR",
                    help=f"the pod's shared run directory (default {pod.RUN_DIR})")
    pd.add_argument("--log-dir", type=Path, default=pod.LOG_DIR, metavar="DIR",
                    help=f"the pod's shared log directory (default {pod.LOG_DIR})")
    add_case_options(pd, required=True)


def _k8s_name(text: str) -> str:
    if not re.fullmatch(r"[a-z0-9]([-a-z0-9]{0,50}[a-z0-9])?", text):
        raise ValueError(f"{text!r}: a Job name is 1-52 characters of a-z, 0-9 and -, a letter or digit at each end")
    return text


def _say(text: str) -> None:
    print(f"apf-emu campaign: {text}", file=sys.stderr)


def cmd_campaign(args: argparse.Namespace) -> int:
    try:
        if args.campaign_action == "report":
            return cmd_report(args)
        if args.campaign_action == "collect":
            return cmd_collect(args)
        if args.seeds is None:
            _say("error: name the seeds (--seeds 1-500), or an action: report DIR, collect DIR (see --help)")
            return config.EXIT_USAGE
        cases, settings = case_set(args)
        if args.kubernetes:
            return write_manifests(args, cases, settings)
        if args.pod is not None or args.name is not None:
            _say("error: --pod and --name go with --kubernetes")
            return config.EXIT_USAGE
        check_socket_room()
        config.make_dir(args.out, "--out")
        parallel = args.parallel or max(1, (os.cpu_count() or 2) // 2)
        outcome = trio.run(campaign, CampaignOptions(cases, settings, args.out, parallel, args.keep_logs))
    except (CampaignError, config.ConfigError) as exc:
        _say(f"error: {exc}")
        return config.EXIT_USAGE
    results, _notes = read_results(args.out)
    ours = {c.id for c in cases}
    mine = [r for r in results if r.case in ours]
    failing = sorted((r for r in mine if r.failed), key=lambda r: (r.seed, r.case))
    if args.json:
        print(orjson.dumps({"out": str(args.out), "cases": len(cases), "recorded": len(mine),
                            "run_now": len(outcome.results), "skipped": outcome.skipped,
                            "failing": [r.case for r in failing], "interrupted": outcome.interrupted,
                            "stopped_by": outcome.stopped_by}).decode())
    else:
        print(f"apf-emu campaign: {len(mine)} of {len(cases)} cases recorded in {args.out / 'results.jsonl'} "
              f"({len(outcome.results)} run now, {outcome.skipped} earlier), {len(failing)} failing"
              + (": " + ", ".join(r.case for r in failing[:20]) if failing else ""))
        if failing:
            print(f"  apf-emu campaign report {shlex.quote(str(args.out))}   (the failures by invariant, with the "
                  "commands that reproduce them)")
        if outcome.stopped_by:
            print(f"  interrupted by {outcome.stopped_by}: {len(cases) - len(mine)} cases not recorded; the same "
                  "command resumes the campaign")
    if outcome.stopped_by:
        return config.EXIT_INTERRUPTED
    return config.EXIT_VIOLATIONS if failing else config.EXIT_OK


def write_manifests(args: argparse.Namespace, cases: list[Case], settings: Settings) -> int:
    if args.pod is not None and args.pod >= len(cases):
        _say(f"error: --pod {args.pod}: the campaign has cases 0..{len(cases) - 1}")
        return config.EXIT_USAGE
    config.make_dir(args.out, "--out")
    bind_settings(args.out, settings)
    name = args.name or _job_name(args.out)
    words = kube.case_args(_seeds_text(args.seeds), args.abis, args.scenarios, settings)
    job = kube.job(name, words, cases, settings, args.image, args.parallel or 10)
    (args.out / "job.yaml").write_text(kube.dump(job))
    print(f"apf-emu campaign: {args.out / 'job.yaml'}: Job {name}, {len(cases)} cases (completion index 0 = "
          f"{cases[0].id} ... {len(cases) - 1} = {cases[-1].id}), image {args.image}")
    if args.pod is not None:
        pod_name = f"{name[:40]}-{args.pod}"
        path = args.out / f"pod-{args.pod}.yaml"
        path.write_text(kube.dump(kube.pod(pod_name, name, words, cases[args.pod], args.pod, settings, args.image)))
        print(f"apf-emu campaign: {path}: Pod {pod_name}, case {cases[args.pod].id}")
    print(f"  kubectl apply -f {args.out / 'job.yaml'}; later: apf-emu campaign collect {args.out}")
    return config.EXIT_OK


def _seeds_text(seeds: list[int]) -> str:
    return compact(seeds).replace(" ", "") if seeds == sorted(seeds) else ",".join(map(str, seeds))


def _job_name(out: Path) -> str:
    base = re.sub(r"[^a-z0-9-]+", "-", out.resolve().name.lower()).strip("-")[:40] or "campaign"
    return f"apf-emu-{base}".rstrip("-")


def cmd_report(args: argparse.Namespace) -> int:
    results, notes = read_results(args.directory)
    for note in notes:
        _say(f"note: {note}")
    if not results:
        _say(f"error: {args.directory}: no case recorded (no {args.directory / 'results.jsonl'}, or nothing in it)")
        return config.EXIT_USAGE
    if args.json:
        for r in results:
            if r.failed:
                print(orjson.dumps(r.as_dict()).decode())
    else:
        print("\n".join(report.text(args.directory, results)))
    if not args.no_picture:
        path = args.picture or args.directory / report.PICTURE
        why = report.picture(results, path)
        _say(why if why else f"picture: {path}")
    return config.EXIT_VIOLATIONS if any(r.failed for r in results) else config.EXIT_OK


def cmd_collect(args: argparse.Namespace) -> int:
    directory: Path = args.directory
    job = collect.read_manifest(directory / "job.yaml")
    words = collect.host_args(job)
    parser = config.UsageParser(prog="apf-emu campaign collect (the Job's case options)")
    add_case_options(parser, required=True)
    cases, settings = case_set(parser.parse_args(words))
    bind_settings(directory, settings)
    source: collect.Source
    if args.podman:
        pods = {}
        for path in sorted(directory.glob("pod-*.yaml")):
            doc = collect.read_manifest(path)
            pods[int(path.stem.removeprefix("pod-"))] = str(doc["metadata"]["name"])
        if not pods:
            _say(f"error: --podman: no pod-<index>.yaml in {directory} (campaign --kubernetes --pod INDEX)")
            return config.EXIT_USAGE
        source = collect.Podman(pods)
    else:
        source = collect.Kubectl(str(job["metadata"]["name"]), args.namespace, shlex.split(args.kubectl))
    try:
        new, notes = collect.collect(directory, source, cases, settings, keep_logs=args.keep_logs)
    except CampaignError as exc:
        _say(f"error: {exc}")
        return config.EXIT_FAILED
    for note in notes:
        _say(f"note: {note}")
    for r in new:
        print(f"{r.case}: {r.verdict.upper()}" + (" - " + ", ".join(f"{k} {v}" for k, v in
                                                              sorted(r.violations.items())) if r.violations else "")
              + (f" - {r.error}" if r.error else "") + f" [{r.where}]")
    print(f"apf-emu campaign collect: {len(new)} cases recorded in {directory / 'results.jsonl'}")
    return config.EXIT_OK


def cmd_pod(args: argparse.Namespace) -> int:
    index = args.index
    if index is None:
        raw = os.environ.get("JOB_COMPLETION_INDEX", "")
        if not raw.isdigit():
            print("apf-emu pod: error: no --index and no JOB_COMPLETION_INDEX (an Indexed Job's pods have it)",
                  file=sys.stderr)
            return config.EXIT_USAGE
        index = int(raw)
    try:
        cases, settings = case_set(args)
    except CampaignError as exc:
        print(f"apf-emu pod: error: {exc}", file=sys.stderr)
        return config.EXIT_USAGE
    if index >= len(cases):
        print(f"apf-emu pod: error: index {index}: the campaign has cases 0..{len(cases) - 1}", file=sys.stderr)
        return config.EXIT_USAGE
    case = cases[index]
    if args.role == "guest":
        if args.vcpu is None or args.vcpu >= settings.vcpus:
            print(f"apf-emu pod: error: guest needs --vcpu 0..{settings.vcpus - 1}", file=sys.stderr)
            return config.EXIT_USAGE
        return trio.run(lambda: pod.pod_guest(settings, case, args.vcpu, run_dir=args.run_dir,
                                              log_dir=args.log_dir))
    where = os.environ.get("HOSTNAME") or f"pod-{index}"
    res = trio.run(lambda: pod.pod_host(case, settings, run_dir=args.run_dir, log_dir=args.log_dir, where=where))
    pod.print_record(res)
    return res.exit_status if res.exit_status is not None else config.EXIT_FAILED
