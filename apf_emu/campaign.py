# `apf-emu campaign`, locally: the cases (apf_emu/cases.py) run as `apf-emu chaos` processes, N at a time, each an
# isolated VM (its own VM id, hence its own shm names, a socket in its own temporary directory, its own log
# directory DIR/cases/<case>), and each outcome appended to DIR/results.jsonl as soon as it is known.
#
# A case is a process of its own so that whatever goes wrong in it (a crash, a hang, a traceback) is that case's
# record, not the campaign's end. A second campaign on the same DIR skips the cases already recorded: an interrupted
# campaign resumes where it stopped. SIGINT or SIGTERM stops the campaign: no new case starts, the running ones get
# SIGINT and stop as `apf-emu chaos` stops on it (their processes, shm and sockets removed by chaos itself); they
# are not recorded (a resume runs them again) and their partial logs are removed.
from __future__ import annotations

import math
import os
import shutil
import signal
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

import trio

from shared.config import daemon_env

from .cases import Case, CaseResult, Settings, append_result, bind_settings, read_results, record, summary_line
from .pdeath import sigint_ignored
from .progress import StatusLine, status_line
from .runner import stop_signals_absorbed

KEEP_LOGS: Final = ("failed", "all", "none")
STOP_GRACE_S: Final = 90.0  # a case's chaos stop takes up to about 45 s (guests 20 s, the host 10 s, the check)
STDERR: Final = "chaos-stderr.txt"  # in a case's log directory: what its `apf-emu chaos` said on stderr


@dataclass(frozen=True)
class CampaignOptions:
    cases: list[Case]
    settings: Settings
    out: Path
    parallel: int = 1
    keep_logs: str = "failed"


@dataclass
class Outcome:
    total: int
    skipped: int  # recorded by an earlier campaign on the same DIR
    results: list[CaseResult] = field(default_factory=list)  # this campaign's
    interrupted: list[str] = field(default_factory=list)  # cases stopped by SIGINT/SIGTERM, to run on resume
    stopped_by: str | None = None

    @property
    def failing(self) -> list[CaseResult]:
        return [r for r in self.results if r.failed]


class Campaign:
    def __init__(self, opts: CampaignOptions, line: StatusLine) -> None:
        self.opts = opts
        self.line = line
        bind_settings(opts.out, opts.settings)
        earlier, self.notes = read_results(opts.out)
        done = {r.case for r in earlier}
        self.todo = [c for c in opts.cases if c.id not in done]
        self.outcome = Outcome(len(opts.cases), len(opts.cases) - len(self.todo))
        self.earlier_failing = sum(r.failed for r in earlier if r.case in {c.id for c in opts.cases})
        self.running: dict[str, trio.Process] = {}
        self.stopping = False
        self.started = time.monotonic()
        self._queue: Iterator[Case] = iter(self.todo)

    # --- the run -------------------------------------------------------------------------------------------------
    async def run(self) -> Outcome:
        for note in self.notes:
            self.line.say(f"apf-emu campaign: note: {note}")
        if self.outcome.skipped:
            self.line.say(f"apf-emu campaign: {self.outcome.skipped} of {self.outcome.total} cases already in "
                          f"{self.opts.out / 'results.jsonl'}: resuming with the {len(self.todo)} left")
        with stop_signals_absorbed(), trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._on_signal, signals)
                nursery.start_soon(self._ticker)
                async with trio.open_nursery() as workers:
                    for _ in range(min(self.opts.parallel, len(self.todo))):
                        workers.start_soon(self._worker)
                nursery.cancel_scope.cancel()
        return self.outcome

    async def _on_signal(self, signals: AsyncIterator[int]) -> None:
        async for signum in signals:
            if self.stopping:
                continue  # a second Ctrl-C: the stop is under way, and it must run to its end
            self.stopping = True
            self.outcome.stopped_by = signal.Signals(signum).name
            self.line.say(f"apf-emu campaign: {self.outcome.stopped_by}: stopping the {len(self.running)} running "
                          "cases (no new one starts)")
            while self.running:
                # Again every second: a case that was still starting ignored it (pdeath.sigint_ignored); one that
                # has it already ignores the repeats (runner.stop_signals_absorbed).
                for proc in list(self.running.values()):
                    if proc.returncode is None:
                        proc.send_signal(signal.SIGINT)
                await trio.sleep(1.0)

    async def _ticker(self) -> None:
        while True:
            self.line.show(self.status())
            await trio.sleep(1.0)

    async def _worker(self) -> None:
        for case in self._queue:
            if self.stopping:
                return
            await self._run_case(case)

    async def _run_case(self, case: Case) -> None:
        out = self.opts.out
        rel = Path("cases") / case.id
        log_dir = out / rel
        log_dir.mkdir(parents=True, exist_ok=True)
        vm = f"cp{os.getpid()}-{self.opts.cases.index(case)}"
        argv = [sys.executable, "-m", "apf_emu", "chaos", *case.chaos_args(self.opts.settings), "--json",
                "--log-dir", str(log_dir), "--vm", vm]
        t0 = time.monotonic()
        with open(log_dir / STDERR, "wb") as stderr:
            # Its own session: a terminal's Ctrl-C reaches the campaign only, which stops each case in turn.
            proc = await trio.lowlevel.open_process(argv, stdout=-1, stderr=stderr, stdin=-3,  # -3: DEVNULL
                                                    start_new_session=True, env=daemon_env(),
                                                    preexec_fn=sigint_ignored)
        self.running[case.id] = proc
        try:
            stdout = await self._drain(proc)
        finally:
            del self.running[case.id]
        summary = summary_line(stdout)
        # A case the stop cut short is not a result, whether it judged what it had run or was still starting (its
        # Python not yet holding SIGINT, it printed nothing).
        if self.stopping and (summary is None or summary.get("stopped_by") != "duration"):
            self.outcome.interrupted.append(case.id)
            shutil.rmtree(log_dir, ignore_errors=True)  # a resume runs it again, from the start
            return
        error = None if summary is not None else _tail(log_dir / STDERR)
        res = record(case, self.opts.settings, exit_status=proc.returncode, summary=summary,
                     wall_s=time.monotonic() - t0, log_dir=str(rel), error=error)
        if self.opts.keep_logs == "none" or (self.opts.keep_logs == "failed" and not res.failed):
            shutil.rmtree(log_dir, ignore_errors=True)
            res.log_dir = None
        append_result(out, res)
        self.outcome.results.append(res)
        self.line.say(self.case_line(res))

    async def _drain(self, proc: trio.Process) -> bytes:
        """The case's stdout until it exits; one that outlives the stop's grace period is killed."""
        assert proc.stdout is not None
        chunks: list[bytes] = []
        with trio.CancelScope(shield=True):  # the campaign's stop waits for its cases' own
            async with proc.stdout:
                while chunk := await proc.stdout.receive_some(1 << 16):
                    chunks.append(bytes(chunk))
            with trio.move_on_after(STOP_GRACE_S if self.stopping else math.inf) as waited:
                await proc.wait()
            if waited.cancelled_caught:
                proc.kill()
                await proc.wait()
        return b"".join(chunks)

    # --- what a person sees --------------------------------------------------------------------------------------
    def case_line(self, res: CaseResult) -> str:
        n = self.outcome.skipped + len(self.outcome.results)
        head = f"[{n}/{self.outcome.total}] {res.case}: {res.verdict.upper()} in {res.wall_s:.1f} s, {res.apfs} APFs"
        if res.violations:
            head += " - " + ", ".join(f"{k} {v}" for k, v in sorted(res.violations.items()))
        for problem in [*res.problems, *([res.error] if res.error else [])][:2]:
            head += f" - {problem.splitlines()[-1] if problem.strip() else problem}"
        head += f"; {self.status(brief=True)}"
        if res.failed:
            head += f"\n    repro: {res.repro}" + (f"\n    logs: {self.opts.out / res.log_dir}" if res.log_dir else "")
        return head

    def status(self, *, brief: bool = False) -> str:
        """The status line; `brief`: its tail, for the end of a case's line."""
        done = self.outcome.skipped + len(self.outcome.results)
        failing = self.earlier_failing + len(self.outcome.failing)
        text = f"{failing} failing, {len(self.running)} running, {_clock(time.monotonic() - self.started)} elapsed"
        if not brief:
            text = f"apf-emu campaign: {done}/{self.outcome.total} done, " + text
        if self.stopping:
            return text + ", stopping"
        ran = [r.wall_s for r in self.outcome.results]
        left = self.outcome.total - done
        if ran and left:
            eta = sum(ran) / len(ran) * left / max(1, min(self.opts.parallel, left))
            text += f", ETA {_clock(eta)}"
        return text


def _clock(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}:{s // 60 % 60:02}:{s % 60:02}" if s >= 3600 else f"{s // 60}:{s % 60:02}"


def _tail(path: Path, lines: int = 5) -> str:
    try:
        text = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return "the case printed no summary and its stderr cannot be read"
    return "the case printed no summary; its stderr ends: " + " | ".join(text[-lines:]) if text else \
        "the case printed no summary and nothing on stderr"


async def campaign(opts: CampaignOptions) -> Outcome:
    with status_line() as line:
        return await Campaign(opts, line).run()
