# A campaign's cases and their records. A case is one `apf-emu chaos` run, a seed on an ABI, with or without a
# scenario's switches; a campaign is the cross product of its seeds, ABIs and scenarios under settings every case
# shares. This module owns the case model (ids, the command that runs or reproduces a case) and the record of a
# case's outcome, one JSON line of DIR/results.jsonl. The local runner (apf_emu/campaign.py), the Kubernetes pods
# (apf_emu/pod.py) and the collector (apf_emu/collect.py) all go through it, so that a local DIR and a collected
# one are the same, and `apf-emu campaign report` reads either.
from __future__ import annotations

import contextlib
import shlex
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field, fields
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

import orjson

from shared.abis import ABIS
from shared.config import EXIT_FAILED, EXIT_OK, EXIT_VIOLATIONS
from shared.transports import TRANSPORTS

from .scenarios import chaos_scenario, scenario_abi

MAX_CASES: Final = 1_000_000
RESULTS: Final = "results.jsonl"
SETTINGS: Final = "campaign.json"  # the settings a DIR's cases were run with (a resume must use the same)
VERDICTS: Final = ("pass", "violations", "failed", "error")


class CampaignError(ValueError):
    """A campaign that cannot run as asked: bad seeds, a DIR of other settings, an unreadable results file."""


@dataclass(frozen=True)
class Settings:
    """What every case of a campaign shares; fixed for a DIR. The fault counts are those of one case."""

    duration: float = 10.0
    vcpus: int = 3
    transport: str = "socket"
    guest_kills: int = 3
    guest_panics: int = 1
    host_kills: int = 1
    pauses: int = 2

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: Any) -> Settings:
        if not isinstance(raw, dict) or set(raw) != {f.name for f in fields(cls)}:
            raise CampaignError(f"not a campaign's settings: {raw!r}")
        try:
            s = cls(**raw)
        except TypeError as exc:
            raise CampaignError(f"not a campaign's settings: {exc}") from None
        if not (isinstance(s.duration, (int, float)) and all(isinstance(getattr(s, k), int) for k in
                ("vcpus", "guest_kills", "guest_panics", "host_kills", "pauses")) and s.transport in TRANSPORTS):
            raise CampaignError(f"not a campaign's settings: {raw!r}")
        return s

    def chaos_args(self) -> list[str]:
        return ["--duration", f"{self.duration:g}", "--vcpus", str(self.vcpus), "--transport", self.transport,
                "--guest-kills", str(self.guest_kills), "--guest-panics", str(self.guest_panics),
                "--host-kills", str(self.host_kills), "--pauses", str(self.pauses)]


@dataclass(frozen=True)
class Case:
    seed: int
    abi: str
    scenario: str | None = None  # a `chaos --scenario` reference: NAME, NAME:buggy or NAME:fixed

    @property
    def id(self) -> str:
        """Unique in a campaign, a file name: s<seed>-<abi>[-<scenario>[-fixed]]."""
        tail = "" if self.scenario is None else "-" + self.scenario.replace(":buggy", "").replace(":", "-")
        return f"s{self.seed}-{self.abi}{tail}"

    def chaos_args(self, settings: Settings) -> list[str]:
        """The `apf-emu chaos` options of this case (every setting spelt out: defaults may change)."""
        return ["--seed", str(self.seed), "--abi", self.abi, *settings.chaos_args(),
                *(["--scenario", self.scenario] if self.scenario else [])]

    def repro(self, settings: Settings) -> str:
        """The command that runs this case again, on any machine with apf-emu."""
        return shlex.join(["apf-emu", "chaos", *self.chaos_args(settings)])


def parse_seeds(text: str) -> list[int]:
    """`1-500`, `7`, `1-20,40,100-110`: distinct seeds, in the order given."""
    seeds: list[int] = []
    for part in (p.strip() for p in text.split(",")):
        lo, dash, hi = part.partition("-")
        try:
            a, b = int(lo), int(hi) if dash else int(lo)
        except ValueError:
            raise ValueError(f"expected seeds like 1-500 or 1-20,40, got {text!r}") from None
        if a < 0 or b < a:
            raise ValueError(f"{part!r}: a range of seeds goes from a low one to a higher one, from 0")
        if len(seeds) + b - a + 1 > MAX_CASES:
            raise ValueError(f"more than {MAX_CASES} seeds")
        seeds += range(a, b + 1)
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"{text!r} names a seed twice")
    return seeds


def parse_abis(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names or any(n not in ABIS for n in names) or len(set(names)) != len(names):
        raise ValueError(f"expected distinct ABIs out of {', '.join(ABIS)}, got {text!r}")
    return names


def parse_scenarios(text: str) -> list[str | None]:
    """`none` (plain chaos), NAME, NAME:buggy, NAME:fixed, comma-separated (scenarios.chaos_scenario's rules)."""
    out: list[str | None] = []
    for part in (p.strip() for p in text.split(",") if p.strip()):
        if part == "none":
            out.append(None)
        else:
            chaos_scenario(part)  # ValueError names what is wrong
            out.append(part[:-len(":buggy")] if part.endswith(":buggy") else part)
    if not out or len(set(out)) != len(out):
        raise ValueError(f"expected distinct scenarios (or none), got {text!r}")
    return out


def make_cases(seeds: Sequence[int], abis: Sequence[str], scenarios: Sequence[str | None]) -> list[Case]:
    """Seed by seed, each scenario on each ABI; a scenario that fixes its ABI (a `pf` one) runs once per seed, on
    that ABI."""
    cases: list[Case] = []
    for seed in seeds:
        for sc in scenarios:
            fixed = scenario_abi(sc) if sc else None
            cases += [Case(seed, fixed, sc)] if fixed else [Case(seed, abi, sc) for abi in abis]
    if len(cases) > MAX_CASES:
        raise CampaignError(f"{len(cases)} cases: at most {MAX_CASES}")
    return cases


# --- the record of a case ---------------------------------------------------------------------------------------
@dataclass
class CaseResult:
    """One line of results.jsonl."""

    case: str
    seed: int
    abi: str
    scenario: str | None
    verdict: str  # pass, violations, failed (the harness saw a problem), error (no summary: see `error`)
    exit_status: int | None
    violations: dict[str, int] = field(default_factory=dict)  # invariant -> count
    first_violations: list[str] = field(default_factory=list)  # "invariant: message", the first few
    apfs: int = 0
    apf_rate: float = 0.0  # APFs per second of the logs
    latency_us: dict[str, dict[str, float]] = field(default_factory=dict)  # the summary's, as `apf-emu stats`
    faults: dict[str, int] = field(default_factory=dict)  # applied, by kind
    problems: list[str] = field(default_factory=list)
    wall_s: float = 0.0
    log_dir: str | None = None  # relative to the campaign's DIR; None once removed (--keep-logs)
    repro: str = ""
    where: str = "local"  # local, or the pod it ran in
    finished: str = ""
    error: str | None = None

    @property
    def failed(self) -> bool:
        return self.verdict != "pass"

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: Any) -> CaseResult:
        names = {f.name for f in fields(cls)}
        if not isinstance(raw, dict) or not {"case", "seed", "abi", "verdict"} <= set(raw) or set(raw) - names:
            raise ValueError("not a case record")
        r = cls(**raw)
        if not (isinstance(r.case, str) and isinstance(r.seed, int) and isinstance(r.abi, str)
                and r.verdict in VERDICTS and isinstance(r.violations, dict)
                and all(isinstance(k, str) and isinstance(v, int) for k, v in r.violations.items())
                and isinstance(r.apf_rate, (int, float)) and isinstance(r.latency_us, dict)):
            raise ValueError("a field of the wrong type")
        return r


VIOLATIONS_KEPT: Final = 3
LATENCIES_KEPT: Final = ("not_present_to_wake", "completed_to_wake")


def record(case: Case, settings: Settings, *, exit_status: int | None, summary: dict[str, Any] | None,
           wall_s: float, log_dir: str | None, error: str | None = None, where: str = "local") -> CaseResult:
    """A case's record from `apf-emu chaos --json`'s summary and exit status."""
    res = CaseResult(case.id, case.seed, case.abi, case.scenario, "error", exit_status, wall_s=round(wall_s, 2),
                     log_dir=log_dir, repro=case.repro(settings), where=where,
                     finished=datetime.now(UTC).isoformat(timespec="seconds"), error=error)
    if summary is None:
        res.error = error or "the case printed no summary"
        return res
    try:
        found = [v for v in summary["violations"] if isinstance(v, dict)]
        res.violations = dict(Counter(str(v.get("invariant")) for v in found))
        res.first_violations = [f"{v.get('invariant')}: {v.get('message')}" for v in found[:VIOLATIONS_KEPT]]
        stats = summary["stats"]
        res.apfs = int(summary["apfs"])
        seconds = float(stats.get("seconds") or 0.0)
        res.apf_rate = round(res.apfs / seconds, 1) if seconds > 0 else 0.0
        res.latency_us = {k: v for k, v in stats.get("latency_us", {}).items() if k in LATENCIES_KEPT}
        res.faults = {str(k): int(v) for k, v in summary.get("faults_applied", {}).items()}
        res.problems = [str(p) for p in [*summary.get("problems", []), *summary.get("leftovers", [])]]
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        res.error = f"the case's summary is not one of apf-emu chaos: {exc!r}"
        return res
    if res.violations:
        res.verdict = "violations"
    elif exit_status == EXIT_OK:
        res.verdict = "pass"
    elif exit_status in (EXIT_FAILED, EXIT_VIOLATIONS):
        res.verdict = "failed"
        if not res.problems:
            res.problems = ["the case checked nothing" if not res.apfs else f"exit status {exit_status}"]
    else:
        res.error = f"exit status {exit_status}"
    return res


def summary_line(out: bytes) -> dict[str, Any] | None:
    """The last line of a case's stdout that is a chaos summary (it has `schedule`)."""
    for line in reversed(out.splitlines()):
        with contextlib.suppress(orjson.JSONDecodeError):
            ev = orjson.loads(line)
            if isinstance(ev, dict) and "schedule" in ev and "violations" in ev:
                return ev
    return None


# --- results.jsonl ----------------------------------------------------------------------------------------------
def read_results(directory: Path) -> tuple[list[CaseResult], list[str]]:
    """The records in DIR/results.jsonl (the last of a case wins) and notes on the lines that are not records (a
    campaign killed while writing leaves a cut last line)."""
    path = directory / RESULTS
    by_case: dict[str, CaseResult] = {}
    notes: list[str] = []
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return [], []
    except OSError as exc:
        raise CampaignError(f"cannot read {path}: {exc.strerror}") from None
    for number, line in enumerate(data.splitlines(keepends=True), 1):
        if not line.strip():
            continue
        try:
            res = CaseResult.from_dict(orjson.loads(line))
        except (orjson.JSONDecodeError, ValueError, TypeError) as exc:
            cut = "a cut last line" if not line.endswith(b"\n") else f"not a case record ({exc})"
            notes.append(f"{path}:{number}: {cut}, skipped")
            continue
        by_case[res.case] = res
    return list(by_case.values()), notes


def append_result(directory: Path, res: CaseResult) -> None:
    """One line, written at once (O_APPEND): a campaign killed between cases loses nothing already recorded."""
    with open(directory / RESULTS, "ab") as f:
        f.write(orjson.dumps(res.as_dict()) + b"\n")


def bind_settings(directory: Path, settings: Settings) -> None:
    """DIR's cases are all run with one Settings: write them for a new DIR, refuse other ones for an old DIR."""
    path = directory / SETTINGS
    if path.exists():
        try:
            old = Settings.from_dict(orjson.loads(path.read_bytes()))
        except (orjson.JSONDecodeError, OSError) as exc:
            raise CampaignError(f"{path}: not a campaign's settings ({exc})") from None
        if old != settings:
            diff = ", ".join(f"{k} {v} (asked: {settings.as_dict()[k]})" for k, v in old.as_dict().items()
                             if settings.as_dict()[k] != v)
            raise CampaignError(f"{directory} holds a campaign run with other settings: {diff}; give those, or "
                                "another --out")
        return
    directory.mkdir(parents=True, exist_ok=True)
    path.write_bytes(orjson.dumps(settings.as_dict(), option=orjson.OPT_INDENT_2) + b"\n")


def compact(numbers: Iterable[int]) -> str:
    """3, 7-9, 12: sorted, runs as ranges."""
    runs: list[list[int]] = []
    for n in sorted(set(numbers)):
        if runs and n == runs[-1][1] + 1:
            runs[-1][1] = n
        else:
            runs.append([n, n])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)
