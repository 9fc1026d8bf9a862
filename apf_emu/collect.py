# `apf-emu campaign collect DIR`: the results of a campaign that ran as pods, read back into the same DIR a local
# campaign writes (DIR/results.jsonl, DIR/cases/<case>/ with host.jsonl and guest-<vcpu>.jsonl), so that
# `apf-emu campaign report`, `check`, `stats` and `trace` work on it unchanged.
#
# The pods are DIR/job.yaml's (kubectl: the Job's pods by their job-name label, the case by the completion index
# annotation) or, with --podman, those of DIR/pod-<index>.yaml (podman names a pod's container <pod>-<container>).
# A pod's case is the one its index names in the cases every container computed from the same options; its record
# is the host container's last line (apf_emu/pod.py). A pod that ended with no record (its deadline, an OOM kill,
# a crash) is recorded as an error with the reason the runtime gives. Pods still running are left for a later
# collect; a case recorded already is not read again.
from __future__ import annotations

import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Protocol

import orjson
import yaml

from .cases import CampaignError, Case, CaseResult, Settings, append_result, read_results, record

INDEX_ANNOTATION: Final = "batch.kubernetes.io/job-completion-index"
FINISHED: Final = ("Succeeded", "Failed")


@dataclass(frozen=True)
class PodState:
    name: str
    index: int
    finished: bool
    reason: str  # why it ended, in the runtime's words


class Source(Protocol):
    def pods(self) -> list[PodState]: ...

    def logs(self, pod: str, container: str) -> bytes: ...


def _run(argv: Sequence[str]) -> bytes:
    try:
        proc = subprocess.run(list(argv), capture_output=True, stdin=subprocess.DEVNULL, timeout=300)
    except FileNotFoundError:
        raise CampaignError(f"{argv[0]}: not found") from None
    except subprocess.TimeoutExpired:
        raise CampaignError(f"{' '.join(argv)}: no answer within 300 s") from None
    if proc.returncode != 0:
        raise CampaignError(f"{' '.join(argv)}: exit status {proc.returncode}: "
                            f"{proc.stderr.decode(errors='replace').strip()[-500:]}")
    return proc.stdout


class Kubectl:
    def __init__(self, job: str, namespace: str | None, kubectl: Sequence[str] = ("kubectl",)) -> None:
        self.job = job
        self.base = [*kubectl, *(["--namespace", namespace] if namespace else [])]

    def pods(self) -> list[PodState]:
        raw = orjson.loads(_run([*self.base, "get", "pods", "--selector", f"job-name={self.job}", "--output",
                                 "json"]))
        out = []
        for item in raw.get("items", []):
            meta, status = item.get("metadata", {}), item.get("status", {})
            index = meta.get("annotations", {}).get(INDEX_ANNOTATION)
            if index is None or not str(index).isdigit():
                continue
            phase = str(status.get("phase"))
            reason = status.get("reason") or _container_reason(status.get("containerStatuses", [])) or phase
            out.append(PodState(str(meta.get("name")), int(index), phase in FINISHED, str(reason)))
        return out

    def logs(self, pod: str, container: str) -> bytes:
        return _run([*self.base, "logs", pod, "--container", container])


def _container_reason(statuses: list[dict[str, Any]]) -> str | None:
    for st in statuses:
        term = st.get("state", {}).get("terminated")
        if st.get("name") == "host" and term:
            return f"host container {term.get('reason')} (exit status {term.get('exitCode')})"
    return None


class Podman:
    """The pods of DIR/pod-<index>.yaml, run with `podman kube play`."""

    def __init__(self, manifests: dict[int, str], podman: Sequence[str] = ("podman",)) -> None:
        self.manifests = manifests  # index -> pod name
        self.podman = list(podman)

    def pods(self) -> list[PodState]:
        out = []
        for index, name in sorted(self.manifests.items()):
            try:
                state = orjson.loads(_run([*self.podman, "container", "inspect", f"{name}-host"]))[0]["State"]
            except CampaignError:
                continue  # not played (or removed)
            finished = state.get("Status") in ("exited", "stopped")
            out.append(PodState(name, index, finished, f"host container exit status {state.get('ExitCode')}"))
        return out

    def logs(self, pod: str, container: str) -> bytes:
        return _run([*self.podman, "logs", f"{pod}-{container}"])


def split_host_output(out: bytes) -> tuple[list[bytes], CaseResult | None, str | None]:
    """A host container's output: its JSON log lines (the harness's settings, the host's events; a runtime's logs
    hold stderr too, which is left out) and the record, the last `apf_emu_case` line, or why there is none."""
    lines = [line for line in out.splitlines() if line.startswith(b"{")]
    records = [i for i, line in enumerate(lines) if line.startswith(b'{"apf_emu_case"')]
    if not records:
        return lines, None, "the host container printed no record"
    raw = lines[records[-1]]
    lines = [line for i, line in enumerate(lines) if i not in records]
    try:
        return lines, CaseResult.from_dict(orjson.loads(raw)["apf_emu_case"]), None
    except (orjson.JSONDecodeError, ValueError, TypeError, KeyError) as exc:
        return lines, None, f"the host container's record is unreadable: {exc}"


def collect(directory: Path, source: Source, cases: Sequence[Case], settings: Settings, *,
            keep_logs: str = "failed") -> tuple[list[CaseResult], list[str]]:
    """Record every finished pod's case not recorded yet; returns the new records and notes."""
    done = {r.case for r in read_results(directory)[0]}
    new: list[CaseResult] = []
    notes: list[str] = []
    latest: dict[int, PodState] = {}
    pods = source.pods()
    for st in pods:
        if st.index >= len(cases):
            notes.append(f"pod {st.name}: index {st.index} is not a case of this campaign ({len(cases)} cases)")
        elif st.finished:
            latest[st.index] = st  # a pod run again after a disruption: its last run counts
    running = sum(1 for st in pods if not st.finished)
    for index, st in sorted(latest.items()):
        case = cases[index]
        if case.id in done:
            continue
        lines, res, why = split_host_output(source.logs(st.name, "host"))
        if res is not None and res.case != case.id:
            notes.append(f"pod {st.name}: its record is of case {res.case}, not {case.id}: recorded as an error")
            why = f"the pod's record names case {res.case}"
            res = None
        if res is None:
            res = record(case, settings, exit_status=None, summary=None, wall_s=0.0, log_dir=None,
                         error=f"{why} ({st.reason})", where=st.name)
        res.where = st.name
        rel = Path("cases") / case.id
        if keep_logs == "all" or (keep_logs == "failed" and res.failed):
            (directory / rel).mkdir(parents=True, exist_ok=True)
            (directory / rel / "host.jsonl").write_bytes(b"".join(line + b"\n" for line in lines))
            for vcpu in range(settings.vcpus):
                guest = source.logs(st.name, f"guest-{vcpu}")
                (directory / rel / f"guest-{vcpu}.jsonl").write_bytes(
                    b"".join(line + b"\n" for line in guest.splitlines() if line.startswith(b"{")))
            res.log_dir = str(rel)
        else:
            res.log_dir = None
        append_result(directory, res)
        new.append(res)
    if running:
        notes.append(f"{running} pods still running: collect again once they end")
    return new, notes


def read_manifest(path: Path) -> dict[str, Any]:
    try:
        doc = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise CampaignError(f"{path}: cannot read it as a manifest: {exc}") from None
    if not isinstance(doc, dict) or doc.get("kind") not in ("Job", "Pod"):
        raise CampaignError(f"{path}: not a Job or Pod manifest of apf-emu campaign --kubernetes")
    return doc


def host_args(doc: dict[str, Any]) -> list[str]:
    """The case options of a manifest's host container (after `apf-emu pod host [--index N]`)."""
    try:
        spec = doc["spec"]["template"]["spec"] if doc["kind"] == "Job" else doc["spec"]
        command = next(c["command"] for c in spec["containers"] if c["name"] == "host")
    except (KeyError, TypeError, StopIteration):
        raise CampaignError("the manifest has no host container of apf-emu campaign --kubernetes") from None
    words = [str(w) for w in command[3:]]
    if words[:1] == ["--index"]:
        words = words[2:]
    return words
