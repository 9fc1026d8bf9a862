# `apf-emu check` on several cores: the logs split by vCPU, one checker per shard, one process per shard.
#
# Every invariant is judged per (vm, vcpu) (and per guest boot of it); what a VM shares, its ABI (host_ready) and
# the settings the harness recorded, comes in lines of no vCPU. So shard i of n reads every input, parses only the
# lines of its own vCPUs (routed by the bytes of their "vm" and "vcpu", without parsing the others) and every line
# of no vCPU, and judges them with a checker of its own; together the shards give exactly what one checker gives
# (Violation.order makes the order the same). A line whose routing its bytes cannot tell for sure (a "vcpu" that
# is not plain digits or null, a "vm" with escapes, a parsed key that is not what the bytes said) stops the split:
# the whole check is done again in one process, so an odd log costs time, never correctness.
#
# The shards are forked (they inherit what plan() found, stdin's lines too) and send back their results through a
# pipe; a shard dies with the check (PR_SET_PDEATHSIG) and the check ends its shards however it ends.
from __future__ import annotations

import contextlib
import dataclasses
import multiprocessing
import os
import signal
import traceback
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any, Final

from .checker import VM_WIDE_EVENTS, Checker, Violation
from .logs import Event, Input, LogInputError, OutOfOrder, ReadReport, merged, plan, sort_notes
from .pdeath import die_with_parent

BROADCAST: Final = -1  # the route of a line of no vCPU: every shard reads it
ROUTES_CACHED: Final = 4096  # distinct line starts and keys remembered per shard (one per process and vCPU)
MIN_BYTES_PER_SHARD: Final = 16 << 20  # below this much log per shard, forking costs more than it saves


class Unroutable(Exception):
    """A line whose vCPU its bytes do not tell for sure: the split is off."""


@dataclass
class Shard:
    index: int
    count: int
    uncounted: ReadReport = field(default_factory=ReadReport)  # where lines of no vCPU go in shards but the first
    _routes: dict[bytes, int] = field(default_factory=dict)  # a line's bytes up to its vcpu -> its route
    _verified: dict[tuple[Any, Any], int] = field(default_factory=dict)  # (vm, vcpu) -> its route

    def route_cached(self, raw: bytes) -> int:
        """route(), remembered by the line's bytes up to the end of its vcpu when they hold its vm too: the lines
        of one process and vCPU start alike ({"role":..,"vm":..,"vcpu":..,)."""
        i = raw.find(b'"vcpu":')
        if i < 0:
            return BROADCAST
        prefix = raw[:raw.find(b",", i)]
        route = self._routes.get(prefix)
        if route is None:
            route = self.route(raw)
            if b'"vm":"' in prefix and len(self._routes) < ROUTES_CACHED:
                self._routes[prefix] = route
        return route

    def route(self, raw: bytes) -> int:
        """The shard of a raw log line: from its "vm" and "vcpu" as apf-emu's logger writes them (no spaces, the vm
        a plain string), BROADCAST for a line of no vCPU."""
        i = raw.find(b'"vcpu":')
        if i < 0:
            return BROADCAST
        i += 7
        end = raw.find(b",", i)
        if end < 0:
            end = raw.find(b"}", i)
            if end < 0:
                return BROADCAST  # a line cut by a kill right after its vcpu: it cannot parse, the first shard notes it
        value = raw[i:end]
        if value == b"null":
            return BROADCAST
        if not value.isdigit() or len(value) > 18:  # (a longer one is no vCPU id, nor one int() takes at once)
            raise Unroutable(value[:20].decode("ascii", "replace"))
        return self._shard_of(self._vm(raw), int(value))

    def _shard_of(self, vm: bytes, vcpu: int) -> int:
        return (zlib.crc32(vm) + vcpu) % self.count

    @staticmethod
    def _vm(raw: bytes) -> bytes:
        i = raw.find(b'"vm":"')
        if i < 0:
            return b""  # no vm, or one that is not a string: all such lines route alike
        i += 6
        vm = raw[i:raw.find(b'"', i)]
        if b"\\" in vm:
            raise Unroutable("a vm with escapes")
        return vm

    def verify(self, ev: Event, route: int) -> None:
        """The parsed line has the key its bytes said (else the split would be wrong: Unroutable)."""
        vcpu = ev.get("vcpu")
        key = (ev.get("vm"), vcpu)
        if self._verified.get(key) == route:
            return
        self._check(ev, vcpu, route)
        if len(self._verified) < ROUTES_CACHED:
            self._verified[key] = route

    def _check(self, ev: Event, vcpu: Any, route: int) -> None:
        if vcpu is None:
            if route == BROADCAST:
                return
            raise Unroutable("a vcpu the bytes saw and the parse did not")
        vm = ev.get("vm")
        if type(vcpu) is not int or route != self._shard_of(vm.encode() if isinstance(vm, str) else b"", vcpu):
            raise Unroutable(f"vcpu {vcpu!r} of vm {vm!r}")


@dataclass
class ShardResult:
    violations: list[Violation]
    events: int  # the events this shard owns (every shard feeds the lines of no vCPU; the first owns them)
    protocol_events: int
    report: ReadReport
    limit_source: str
    ready_latency_limit_ns: int
    input: str = "logs"  # what was read (Checker.input, Checker.judged)
    judged: frozenset[str] = frozenset()
    unroutable: str | None = None  # why the split is off, if it is


def judge(inputs: list[Input], shard: Shard | None, checker_options: dict[str, Any]) -> ShardResult:
    """Shard `shard`'s part of the check (None: all of it). An input assumed in order that is not is read again,
    sorted, and the part judged again from the start."""
    while True:
        try:
            return _judge(inputs, shard, checker_options)
        except OutOfOrder as exc:
            inputs = [dataclasses.replace(i, ordered=False) if i.name == exc.name else i for i in inputs]


def _judge(inputs: list[Input], shard: Shard | None, checker_options: dict[str, Any]) -> ShardResult:
    report = ReadReport()
    checker = Checker(**checker_options)
    shared_events = shared_protocol = 0
    try:
        for ev in merged(inputs, report, shard):
            if shard is not None and ev.get("vcpu") is not None and (ev["event"] in VM_WIDE_EVENTS
                                                                      or ev.get("role") == "harness"):
                raise Unroutable(f"{ev['event']} of a vCPU: what a whole VM is judged by must be in every shard")
            if shard is not None and shard.index and ev.get("vcpu") is None:  # of no vCPU: the first shard owns it
                before, found = checker.protocol_events, len(checker.violations)
                checker.feed(ev)
                shared_events += 1
                shared_protocol += checker.protocol_events - before
                del checker.violations[found:]
            else:
                checker.feed(ev)
    except Unroutable as exc:
        return ShardResult([], 0, 0, report, "", 0, unroutable=str(exc))
    violations = checker.finish()
    if shard is not None and shard.index:  # every shard replays the lines of no vCPU: the first reports them
        violations = [v for v in violations if v.key[1] is not None]
    return ShardResult(violations, checker.events - shared_events, checker.protocol_events - shared_protocol,
                       report, checker.limit_source, checker.ready_latency_limit_ns, checker.input, checker.judged)


def jobs_for(inputs: Sequence[Input], jobs: int | None) -> int:
    """How many shards: `jobs` if given, else one per CPU this process may run on, as the logs' size warrants.
    One for ftrace text (read whole, judged across its VMs) and for stdin."""
    if any(i.ftrace or i.lines is not None for i in inputs):
        return 1
    if jobs is not None:
        return max(1, jobs)
    size = 0
    for i in inputs:
        with contextlib.suppress(OSError):  # gone since: the read says so
            size += os.path.getsize(i.name)
    return max(1, min(len(os.sched_getaffinity(0)), size // MIN_BYTES_PER_SHARD))


def check(paths: Sequence[str], jobs: int | None = None,
          **checker_options: Any) -> tuple[list[Violation], ReadReport, Checker]:
    """Check `paths` as one Checker would, in shards run side by side (`jobs`: how many; None: as many as pay).
    The Checker returned holds the totals (events, protocol_events, the latency limit) and the violations."""
    report = ReadReport()
    inputs = plan(paths, report, scan=False)
    n = jobs_for(inputs, jobs)
    results = _run(inputs, n, checker_options) if n > 1 else None
    if results is None:  # one process, or the split is off
        results = [judge(inputs, None, checker_options)]
    violations, checker = _combine(results, report, checker_options)
    sort_notes(report, inputs)
    return violations, report, checker


def _run(inputs: list[Input], n: int, checker_options: dict[str, Any]) -> list[ShardResult] | None:
    """The shards' results, the first computed here, or None if the split is off."""
    ctx = multiprocessing.get_context("fork")
    children: list[tuple[Any, Connection]] = []  # (a fork context's Process, its result pipe)
    try:
        for index in range(1, n):
            recv, send = ctx.Pipe(duplex=False)
            child = ctx.Process(target=_child, args=(inputs, Shard(index, n), checker_options, send, os.getpid()),
                                daemon=True)
            child.start()
            send.close()
            children.append((child, recv))
        results = [judge(inputs, Shard(0, n), checker_options)]
        for child, recv in children:
            try:
                outcome = recv.recv()
            except EOFError:
                raise RuntimeError(f"check shard {child.name} ended without a result (exit {child.exitcode})") \
                    from None
            if isinstance(outcome, BaseException):
                raise outcome
            results.append(outcome)
    finally:
        for child, recv in children:
            recv.close()
            if child.is_alive():
                child.terminate()
            child.join()
    return None if any(r.unroutable for r in results) else results


def _child(inputs: list[Input], shard: Shard, checker_options: dict[str, Any], send: Connection,
           parent: int) -> None:
    die_with_parent(parent)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the check's own SIGINT handling ends its shards
    try:
        outcome: ShardResult | BaseException = judge(inputs, shard, checker_options)
    except LogInputError as exc:  # a file that went away meanwhile: the check says so as it would alone
        outcome = exc
    except Exception as exc:  # sent back whole: the check reports it as its own
        outcome = RuntimeError(f"check shard {shard.index}: {exc!r}\n{traceback.format_exc()}")
    send.send(outcome)
    send.close()


def _combine(results: list[ShardResult], report: ReadReport,
             checker_options: dict[str, Any]) -> tuple[list[Violation], Checker]:
    checker = Checker(**checker_options)
    first = results[0]
    checker.limit_source, checker.ready_latency_limit_ns = first.limit_source, first.ready_latency_limit_ns
    checker.input, checker.judged = first.input, first.judged
    for r in results:
        checker.events += r.events
        checker.protocol_events += r.protocol_events
        checker.violations.extend(r.violations)
        report.lines += r.report.lines
        report.truncated.extend(r.report.truncated)
        report.unreadable.extend(r.report.unreadable)
        if r.report.ftrace is not None:  # (ftrace text is read in one part)
            report.ftrace = r.report.ftrace
    checker.violations.sort(key=lambda v: v.order)  # stable: each vCPU's in its shard's order
    return checker.violations, checker
