# The ftrace export (apf_emu/ftrace/writer.py): trace-cmd's exact line layout (trace_show_data in
# tracecmd/trace-read.c, libtraceevent's print_event_time, print_event_name), and what Perfetto's ftrace text import
# needs, with its tokenizer's own regex and sniffing rules (google/perfetto
# src/trace_processor/importers/systrace/systrace_line_tokenizer.cc and systrace_trace_parser.cc), since its
# trace_processor binary cannot be fetched here.
from __future__ import annotations

import io
import re

from apf_emu.ftrace.reader import FtraceReader
from apf_emu.ftrace.writer import PID_MAX_LIMIT, export, line
from apf_emu.logs import read_merged

PERFETTO_LINE = re.compile(
    r"-(\d+)\s+\(?\s*(\d+|-+)?\)?\s?\[(\d+)\]\s*([a-zA-Z.]{3}[0-9a-f.]{1,2}\s*)?(\d+\.\d+):\s+(\S+):")
ATRACE = re.compile(r"^(?:[SF]\|\d+\|[^|]+\|\d+|I\|\d+\|.+)$")


def test_line_is_trace_cmd_report_t():
    # trace-cmd `report -t` (before 3.3, or 3.3+ without its latency flags): "%16s-%-5d [%03d]", " %5llu.%09llu:",
    # " %s: " padded to 20
    assert line("CPU 0/KVM", 1234, 3, 12345_678901234, "kvm_async_pf_ready", "token 0 gva 0x7f1234560000") == \
        "       CPU 0/KVM-1234  [003] 12345.678901234: kvm_async_pf_ready:   token 0 gva 0x7f1234560000"
    long = line("CPU 1/KVM", 99, 1, 5_000000001, "kvm_async_pf_not_present", "token 0x1001 gva 0x1000")
    assert long == ("       CPU 1/KVM-99    [001]     5.000000001: kvm_async_pf_not_present: "
                    "token 0x1001 gva 0x1000")


def exported(clean_logs) -> str:
    out = io.StringIO()
    stats = export(read_merged([str(clean_logs)]), out)
    assert stats.tracepoint_lines > 100 and stats.marker_lines > 100
    return out.getvalue()


def test_export_opens_in_perfetto_and_in_the_reader(clean_logs):
    text = exported(clean_logs)
    assert text.startswith("cpus=") and text.endswith("\n")  # Perfetto: sniffed by "cpus=", no last line lost
    events = 0
    for raw in text.splitlines()[1:]:
        if raw.startswith("#"):
            continue  # Perfetto skips '#' lines
        m = PERFETTO_LINE.search(raw)
        assert m, raw
        events += 1
        task = raw[:m.start()].strip()
        assert int(m[1]) > 0 and task
        if m[6] == "tracing_mark_write":
            assert ATRACE.match(raw[m.end():].strip()), raw
        else:
            assert task.startswith(("CPU ", "kworker/")) and int(m[1]) > PID_MAX_LIMIT
    assert events > 200
    reader = FtraceReader("export")
    evs = list(reader.events(enumerate(text.splitlines(), 1)))
    assert reader.report.export and reader.report.bad == []
    assert {e["vm"] for e in evs if e["vm"] is not None} == {next(iter(reader._export_threads.values()))[0]}


def test_markers_can_be_left_out(clean_logs):
    out = io.StringIO()
    stats = export(read_merged([str(clean_logs)]), out, markers=False)
    assert stats.marker_lines == 0 and "tracing_mark_write" not in out.getvalue()
