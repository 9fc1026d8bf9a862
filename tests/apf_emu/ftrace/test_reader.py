# Reading real hosts' ftrace text (apf_emu/ftrace/reader.py) and judging it (apf_emu/checker.py with the invariants
# a host-side trace supports): hand-made traces in tests/data/ftrace, one per layout and kernel era, each written
# from the kernel's TP_printk strings and the layouts of trace-cmd's trace_show_data and the kernel's
# trace_print_context; mutations the checker must flag and garbage lines it must skip, with their line numbers.
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from apf_emu.checker import JUDGED, Checker
from apf_emu.ftrace.reader import LINE, looks_like_ftrace, timestamp_ns
from apf_emu.logs import LogInputError, ReadReport, read_merged
from apf_emu.stats import collect

ROOT = Path(__file__).resolve().parents[3]
DATA = ROOT / "tests" / "data" / "ftrace"


def judge(path: Path) -> tuple[Checker, ReadReport, list]:
    report = ReadReport()
    evs = list(read_merged([str(path)], report))
    checker = Checker()
    checker.check(evs)
    return checker, report, evs


@pytest.mark.parametrize("name", sorted(p.name for p in DATA.glob("*.txt")))
def test_every_trace_is_recognised_as_ftrace(name):
    assert looks_like_ftrace((DATA / name).read_bytes()[:8192])


def test_json_lines_are_not_ftrace():
    assert not looks_like_ftrace(b'{"event": "host_ready", "mono_ns": 1}\n')
    assert not looks_like_ftrace(b"hello world\n")


def test_trace_cmd_3_4_with_garbage_loss_and_a_ready_of_nothing():
    checker, report, evs = judge(DATA / "trace-cmd-3.4.txt")
    ft = report.ftrace
    assert ft is not None and not ft.export and ft.lost == 1 and not ft.tgid
    assert ft.backwards == 3  # vCPU 1's first three lines are earlier than vCPU 0's: sorted before judging
    # the garbage line and the cut one, by number; the read went on past both
    assert [u.split(": ", 1)[0].rsplit(":", 1)[1] for u in report.unreadable] == ["21", "24"]
    assert "no known format" in report.unreadable[1]
    assert ft.other_events == 1  # sched_switch
    assert checker.input == "trace" and checker.judged == JUDGED["trace"]
    # token 0x7000 comes after the first not-present of vCPU 0 (id 1) and was never handed out
    assert [(v.invariant, v.event["line"]) for v in checker.violations] == [("ready_after_not_present", 23)]
    by = {e["line"]: e for e in evs if "line" in e}
    assert by[10]["vcpu"] == 0 and by[10]["gfn"] == 0x7A and by[10]["vm"] == "tid2201"  # gfn from line 9
    assert by[16]["token"] == 0x1000 and by[16]["vcpu"] == 0  # the kworker's completion, matched by gva
    assert by[20]["token"] == 0x1001 and by[20]["vcpu"] == 1  # ... after its page-ready (async_pf_execute order)
    assert by[5]["event"] == "apf_ack" and by[30]["ok"] is False
    assert 8 not in by  # a read of an MSR changes nothing


def test_trace_cmd_old_layout_nanoseconds_pfn_and_doublefault():
    checker, report, evs = judge(DATA / "trace-cmd-2.9-nsec.txt")
    assert report.unreadable == [] and checker.violations == [] and checker.protocol_events > 0
    assert {"kvm_async_pf_completed (2.6.38 to 3.12)", "kvm_async_pf_doublefault (2.6.38 to about 6.0)"} \
        <= report.ftrace.formats
    stats = collect(evs)
    assert stats.latency["not_present_to_completed"].get_max_value() == 899  # 899.5 µs, ns kept
    assert stats.percentiles("ready_to_ack")["count"] == 1
    assert stats.events["kvm_async_pf_repeated_fault"] == 1


def test_sysfs_with_tgid_two_vms_and_token_zero():
    checker, report, evs = judge(DATA / "sysfs-record-tgid.txt")
    assert report.unreadable == [] and report.ftrace.tgid and report.ftrace.lost == 1
    # both VMs hand out 0x1000 on their vCPU 0: one VM per VMM pid, no token_unique
    assert [(v.invariant, v.event["line"]) for v in checker.violations] == [("token_format", 22)]
    completions = [e for e in evs if e["event"] == "kvm_async_pf_completed"]
    assert [(e["vm"], e["token"]) for e in completions] == [("4400", 0x1000), ("5500", 0x1000)]
    assert {e["vm"] for e in evs if e.get("comm") == "CPU 1/KVM"} == {"4400"}


def test_kvm_2010_formats_without_tokens():
    checker, report, evs = judge(DATA / "kvm-2010.txt")
    assert report.unreadable == [] and checker.violations == [] and checker.protocol_events > 0
    ready = [e for e in evs if e["event"] == "kvm_async_pf_ready"]
    assert [e.get("token") for e in ready] == [None, 0x1001, 0xFFFFFFFF]
    assert ready[1]["vcpu"] == 1  # no `CPU n/KVM` comm: the vCPU from the token's low 12 bits


def test_trace_cmd_l_layout_cut_comm_and_a_foreign_token():
    checker, report, _evs = judge(DATA / "trace-cmd-l.txt")
    assert report.unreadable == []
    assert [(v.invariant, v.event["line"]) for v in checker.violations] == [("token_format", 5)]


def test_perf_script_with_pid_and_a_second_ready():
    checker, report, evs = judge(DATA / "perf-script.txt")
    assert report.unreadable == [] and report.ftrace.tgid
    assert [(v.invariant, v.event["line"]) for v in checker.violations] == [("ready_once", 7)]
    assert {e["vm"] for e in evs if e.get("comm") == "CPU 0/KVM"} == {"6001"}
    assert [e["token"] for e in evs if e["event"] == "kvm_async_pf_completed"] == [0x1000]


# --- mutations of a whole trace ------------------------------------------------------------------------------------
BASE = [
    "cpus=2",
    "       CPU 0/KVM-100   [000] ..... 1.000001: kvm_msr:              msr_write 4b564d06 = 0xf3",
    "       CPU 0/KVM-100   [000] ..... 1.000002: kvm_msr:              msr_write 4b564d02 = 0x1000009",
]


VCPU0 = "       CPU 0/KVM-100   [000]"


def fault(n: int, token: int, gfn: int, t: float) -> list[str]:
    return [f"{VCPU0} d..1. {t:.6f}: kvm_try_async_get_page: gva = {gfn << 12:#x}, gfn = {gfn:#x}",
            f"{VCPU0} d..1. {t + 1e-6:.6f}: kvm_async_pf_not_present: token {token:#x} gva {gfn << 12:#x}"]


def ready(token: int, gfn: int, t: float) -> str:
    return f"       CPU 0/KVM-100   [000] ..... {t:.6f}: kvm_async_pf_ready:   token {token:#x} gva {gfn << 12:#x}"


def repeated(gfn: int, t: float) -> str:
    return f"{VCPU0} d..1. {t:.6f}: kvm_async_pf_repeated_fault: gva = {gfn << 12:#x}, gfn = {gfn:#x}"


def violations_of(tmp_path: Path, lines: list[str]) -> list[str]:
    path = tmp_path / "t.txt"
    path.write_text("\n".join(lines) + "\n")
    checker, _report, _evs = judge(path)
    assert checker.protocol_events > 0
    return [v.invariant for v in checker.violations]


def test_clean_trace_is_clean(tmp_path):
    lines = BASE + fault(0, 0x1000, 5, 1.1) + [repeated(5, 1.2), ready(0x1000, 5, 1.3)]
    assert violations_of(tmp_path, lines) == []


@pytest.mark.parametrize("mutation,invariant", [
    (lambda: BASE + fault(0, 0x1000, 5, 1.1) + fault(0, 0x1000, 6, 1.2), "token_unique"),
    (lambda: BASE + fault(0, 0x1000, 5, 1.1) + fault(0, 0x2001, 6, 1.2), "token_format"),  # another vCPU's
    (lambda: BASE + fault(0, 0x1000, 5, 1.1) + [ready(0x1000, 5, 1.2), ready(0x1000, 5, 1.3)], "ready_once"),
    (lambda: BASE + fault(0, 0x1000, 5, 1.1) + [ready(0x3000, 5, 1.2)], "ready_after_not_present"),
    (lambda: BASE + [x for k in range(65) for x in fault(0, (k + 1) << 12, 100 + k, 1.1 + k * 1e-3)],
     "outstanding_limit"),
    (lambda: BASE + fault(0, 0x1000, 5, 1.1) + [ready(0x1000, 5, 1.2), repeated(5, 1.3)],
     "repeated_fault_outstanding"),
    (lambda: [BASE[0], BASE[2], *fault(0, 0x1000, 5, 1.1)], "msr_order"),
])
def test_mutation_is_flagged(tmp_path, mutation, invariant):
    assert invariant in JUDGED["trace"]
    assert invariant in violations_of(tmp_path, mutation())


def test_repeated_fault_on_a_gfn_from_before_the_trace_is_not_judged(tmp_path):
    assert violations_of(tmp_path, BASE + fault(0, 0x1000, 5, 1.1) + [repeated(9, 1.2)]) == []


def test_layouts_the_line_pattern_takes():
    for line in ["       CPU 0/KVM-1234  [003] ..... 12345.678901: kvm_async_pf_ready:   token 0 gva 0x7f1234560000",
                 "       CPU 0/KVM-1234  [003] ..... 12345.678901234: kvm_async_pf_ready:   token 0 gva 0x7f",
                 "       CPU 0/KVM-1234  [003] 12345.678901: kvm_async_pf_ready:   token 0 gva 0x7f",
                 "CPU 0/KV-1234    3..... 12345.678901: kvm_async_pf_ready:   token 0 gva 0x7f",
                 "       CPU 0/KVM-1234    [003] ..... 12345.678901: kvm_async_pf_ready: token 0x0 gva 0x7f",
                 "       CPU 0/KVM-1234    (   1200) [003] ..... 12345.678901: kvm_async_pf_ready: token 0x0 gva 0x7f",
                 "       CPU 0/KVM-1234    (-------) [003] d..1 12345.678901: kvm:kvm_async_pf_ready: token 0x0 gva 0"]:
        assert LINE.match(line), line


def test_check_list_says_what_applies_to_which_input():
    out = subprocess.run([sys.executable, "-m", "apf_emu", "check", "--list"], cwd=ROOT, capture_output=True,
                         text=True, check=True).stdout
    assert "token_unique [LET]" in out and "one_unacked_ready [L--]" in out
    assert "completed_before_ready [LE-]" in out


def test_check_command_on_a_real_trace(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "apf_emu", "check", str(DATA / "trace-cmd-3.4.txt")], cwd=ROOT,
                          capture_output=True, text=True)
    assert proc.returncode == 1
    assert "ready_after_not_present" in proc.stdout and "judged on a real host's trace" in proc.stdout
    assert "trace-cmd-3.4.txt:21: not an ftrace line" in proc.stderr
    assert "no tgid column" in proc.stderr


def test_traces_and_logs_are_not_mixed(clean_logs):
    from apf_emu.logs import LogInputError
    with pytest.raises(LogInputError, match="cannot be read together"):
        list(read_merged([str(clean_logs), str(DATA / "kvm-2010.txt")]))


def test_trace_command_takes_a_real_trace(tmp_path):
    out = tmp_path / "t.json"
    proc = subprocess.run([sys.executable, "-m", "apf_emu", "trace", str(DATA / "sysfs-record-tgid.txt"), "-o",
                           str(out)], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    import orjson
    names = {e["args"]["name"] for e in orjson.loads(out.read_bytes())["traceEvents"] if e["ph"] == "M"
             and e["name"] == "process_name"}
    assert names == {"host 4400", "host 5500"}


def test_qemu_cpu_index_is_not_the_vcpu_id_the_token_wins(tmp_path):
    """QEMU names a thread after its cpu_index; KVM's vcpu_id (the APIC ID) may differ: the token decides."""
    lines = [BASE[0], *(x.replace("CPU 0/KVM", "CPU 6/KVM") for x in fault(0, 0x1008, 5, 1.1))]
    assert violations_of(tmp_path, lines) == []


def test_a_trace_of_lost_events_only_checks_nothing(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("cpus=2\nCPU:2 [12 EVENTS DROPPED]\n")
    checker, _report, _evs = judge(path)
    assert checker.protocol_events == 0


def test_a_thread_whose_name_the_cmdline_cache_missed_is_the_same_thread(tmp_path):
    """__trace_find_cmdline prints `<...>` for a pid no longer in saved_cmdlines: the thread (and its vCPU) stays,
    so its MSR writes are still judged against its own (no msr_order from a thread of no vCPU)."""
    lines = [BASE[0], BASE[1], BASE[2].replace("CPU 0/KVM", "<...>"),
             *(x.replace("CPU 0/KVM", "<...>") for x in fault(0, 0x1000, 5, 1.1)), ready(0x1000, 5, 1.2)]
    assert violations_of(tmp_path, lines) == []
    _c, _r, evs = judge(tmp_path / "t.txt")
    assert {e["vcpu"] for e in evs if e["event"] != "ftrace_start"} == {0}
    # a pid reused by another real name is another thread: its first MSR write is judged on its own
    other = [BASE[0], BASE[1], BASE[2].replace("CPU 0/KVM", "CPU 1/KVM")]
    assert violations_of(tmp_path, other) == ["msr_order"]


EXPORT_HEAD = ["cpus=1", "# apf-emu ftrace export 1", "# apf-emu thread 100 vm v vcpu 0"]


def test_an_exports_resets_end_the_apfs_of_a_boot(tmp_path):
    """The writer's `# apf-emu event` lines (vcpu_disconnect, vcpu_connect: kvm_vcpu_reset of a new boot eats the
    outstanding APFs) are read back as the host events they were; without them 65 APFs over two boots are 65
    outstanding."""
    first = [x for k in range(40) for x in fault(0, (k + 1) << 12, 100 + k, 1.1 + k * 1e-3)]
    second = [x for k in range(40, 65) for x in fault(0, (k + 1) << 12, 100 + k, 2.1 + k * 1e-3)]
    resets = ['# apf-emu event {"event":"vcpu_disconnect","vm":"v","vcpu":0,"boot":1,"mono_ns":1500000000}',
              '# apf-emu event {"event":"vcpu_connect","vm":"v","vcpu":0,"boot":2,"mono_ns":1600000000}']
    assert violations_of(tmp_path, [*EXPORT_HEAD, *BASE[1:], *first, *second]) == ["outstanding_limit"]
    assert violations_of(tmp_path, [*EXPORT_HEAD, *BASE[1:], *first, *resets, *BASE[1:], *second]) == []
    _c, _r, evs = judge(tmp_path / "t.txt")
    connect = next(e for e in evs if e["event"] == "vcpu_connect")
    assert connect["role"] == "host" and connect["source"] == "ftrace" and connect["line"] == 87


@pytest.mark.parametrize("line,why", [
    ('# apf-emu event {"event":"vcpu_connect",', "not JSON"),
    ('# apf-emu event {"event":"guest_boot","vm":"v","vcpu":0,"mono_ns":5}', "not one of"),
    ('# apf-emu event [1, 2]', "not one of"),
    ('# apf-emu event {"event":"vcpu_connect","vm":"v","vcpu":"0","mono_ns":5}', "not a count"),
    ('# apf-emu event {"event":"vcpu_connect","vm":"v","vcpu":0,"mono_ns":-5}', "not a count"),
    ('# apf-emu event {"event":"vcpu_connect","vm":"v","vcpu":true,"mono_ns":5}', "not a count"),
    ('# apf-emu event {"event":"vcpu_connect","vm":"v","vcpu":-3,"mono_ns":5}', "not a count"),
    ('# apf-emu event {"event":["vcpu_connect"],"vm":"v","vcpu":0,"mono_ns":5}', "not one of"),
    ('# apf-emu event {"event":"apf_cancel","vm":"v","vcpu":0,"mono_ns":5,"token":[1]}', "token is not a count"),
    ('# apf-emu event {"event":"apf_ready_dropped","vm":"v","vcpu":0,"mono_ns":5,"token":"0x5000"}',
     "token is not a count"),
    ('# apf-emu event {"event":"vcpu_disconnect","vm":"v","vcpu":0,"mono_ns":5,"boot":{}}', "boot is not a count"),
])
def test_a_bad_event_line_is_reported_and_skipped(tmp_path, line, why):
    path = tmp_path / "t.txt"
    path.write_text("\n".join([*EXPORT_HEAD, line, *BASE[1:], *fault(0, 0x1000, 5, 1.1)]) + "\n")
    checker, report, evs = judge(path)
    assert len(report.unreadable) == 1 and ":4: " in report.unreadable[0] and why in report.unreadable[0]
    assert checker.violations == [] and [e["event"] for e in evs][-1] == "kvm_async_pf_not_present"


def test_traces_of_two_hosts_read_together_keep_their_pids_and_losses_apart(tmp_path):
    """Two hosts' traces: the same pid is two processes (no false token_unique between them), and the events one
    trace lost (its LOST line) take nothing from what the other one knows (its second page-ready is still caught)."""
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("\n".join([*BASE, *fault(0, 0x1000, 5, 1.1), ready(0x1000, 5, 1.3), ready(0x1000, 5, 1.5)]) + "\n")
    # b loses events at 1.4, between a's two page-ready events of 0x1000
    b.write_text("\n".join([*BASE, *fault(0, 0x1000, 5, 1.2), ready(0x1000, 5, 1.4), "CPU:0 [LOST 3 EVENTS]"])
                 + "\n")
    report = ReadReport()
    checker = Checker()
    evs = list(read_merged([str(a), str(b)], report))
    checker.check(evs)
    assert [(v.invariant, v.event["vm"]) for v in checker.violations] == [("ready_once", f"{a}:tid100")]
    assert {e["vm"] for e in evs if e["event"] == "kvm_async_pf_not_present"} == {f"{a}:tid100", f"{b}:tid100"}
    # one trace alone keeps its short names
    assert {e["vm"] for e in judge(a)[2] if e["event"] == "kvm_async_pf_ready"} == {"tid100"}


@pytest.mark.parametrize("secs,fraction,ns", [
    ("5", "000001", 5_000_001_000), ("5", "000000001", 5_000_000_001), ("12", "999999", 12_999_999_000),
    ("5", "1000000", 6_000_000_000),  # pevent_print_event's (nsecs + 500) / NSECS_PER_USEC without a carry
])
def test_timestamps_in_microseconds_nanoseconds_and_the_uncarried_rounding(secs, fraction, ns):
    assert timestamp_ns(secs, fraction) == ns


def test_an_export_and_a_real_trace_are_not_read_together(tmp_path, clean_logs):
    """They are judged by different invariants (JUDGED["export"] and ["trace"]): one verdict cannot cover both."""
    export, real = tmp_path / "export.txt", tmp_path / "real.txt"
    assert subprocess.run([sys.executable, "-m", "apf_emu", "trace", str(clean_logs), "--format", "ftrace", "-o",
                           str(export)], cwd=ROOT, capture_output=True).returncode == 0
    real.write_text("\n".join([*BASE, ready(0x1000, 5, 1.3)]) + "\n")
    for order in ([export, real], [real, export]):
        with pytest.raises(LogInputError, match="export and a real host's trace"):
            list(read_merged([str(p) for p in order], ReadReport()))


def test_a_pid_reused_by_another_process_is_another_thread_even_unnamed(tmp_path):
    """With a tgid column, a `<...>` line of another process is not the thread that had that pid before."""
    first = "       CPU 0/KVM-100   (    50) [000] ..... 1.000002: kvm_msr:              msr_write 4b564d06 = 0xf3"
    second = "           <...>-100   (    60) [000] ..... 1.000003: kvm_msr:              msr_write 4b564d02 = 0x9"
    assert violations_of(tmp_path, [BASE[0], first, second]) == ["msr_order"]
    assert violations_of(tmp_path, [BASE[0], first, second.replace("(    60)", "(    50)")]) == []


def test_statistics_of_a_trace_span_its_lines_only():
    _c, _r, evs = judge(DATA / "trace-cmd-3.4.txt")
    stats = collect(evs)
    lines = [e["mono_ns"] for e in evs if not e["event"].startswith("ftrace_")]
    assert stats.first_ns == min(lines) and stats.first_ns > 0
