# shared/log.py's stamps: `level` as structlog's add_log_level names it, `mono_ns`, and `timestamp` in the form
# structlog's TimeStamper(fmt="iso", utc=True) writes, with the second's text cached.
from __future__ import annotations

import datetime
import re

import pytest
import structlog

from shared.log import add_stamps


@pytest.mark.parametrize("method", ["debug", "info", "warning", "warn", "error", "exception", "critical"])
def test_levels_are_add_log_levels(method):
    ours = add_stamps(None, method, {})
    theirs = structlog.processors.add_log_level(None, method, {})
    assert ours["level"] == theirs["level"]


def test_timestamp_has_timestampers_form_and_the_time_of_now():
    theirs = structlog.processors.TimeStamper(fmt="iso", utc=True)(None, "info", {})["timestamp"]
    for _ in range(3):  # the first call formats the second, the next ones take it from the cache
        ours = add_stamps(None, "info", {})
        pattern = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{6})?Z"
        assert re.fullmatch(pattern, ours["timestamp"]) and re.fullmatch(pattern, theirs)
        at = datetime.datetime.fromisoformat(ours["timestamp"].replace("Z", "+00:00"))
        assert abs((at - datetime.datetime.fromisoformat(theirs.replace("Z", "+00:00"))).total_seconds()) < 5
        assert isinstance(ours["mono_ns"], int) and ours["mono_ns"] > 0


def test_lines_are_rendered_as_structlogs_chain_would(tmp_path):
    """FastBoundLogger: context, fields, event and stamps, in that order; a value orjson cannot render as its repr
    (JSONRenderer's fallback); log.exception with its traceback as `exception`; debug dropped; one line each."""
    import orjson

    from shared import log

    path = tmp_path / "x.jsonl"
    log.configure(path)
    try:
        logger = log.get_logger("host", "vm1", vcpu=2, boot=3).bind(extra=1)
        logger.debug("dropped")
        logger.info("kvm_async_pf_ready", token=0x1000, where=tmp_path)
        try:
            raise ValueError("boom")
        except ValueError:
            logger.exception("failed", gfn=5)
        logger.warn("old_name")
    finally:
        log.close()
    lines = [orjson.loads(line) for line in path.read_bytes().splitlines()]
    assert [e["event"] for e in lines] == ["kvm_async_pf_ready", "failed", "old_name"]
    first = lines[0]
    assert list(first)[:7] == ["role", "vm", "vcpu", "boot", "pid", "extra", "token"]
    assert list(first)[-4:] == ["event", "level", "mono_ns", "timestamp"]
    assert first["where"] == repr(tmp_path) and first["level"] == "info" and first["vcpu"] == 2
    assert lines[1]["level"] == "error" and "ValueError: boom" in lines[1]["exception"] and "exc_info" not in lines[1]
    assert lines[2]["level"] == "warning"
