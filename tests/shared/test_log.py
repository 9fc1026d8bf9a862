# shared/log.py's stamps: `level` as structlog's add_log_level names it, `mono_ns`, and `timestamp` in the form
# structlog's TimeStamper(fmt="iso", utc=True) writes, with the second's text cached.
from __future__ import annotations

import datetime
import re

import pytest
import structlog

from shared.log import _add_stamps


@pytest.mark.parametrize("method", ["debug", "info", "warning", "warn", "error", "exception", "critical"])
def test_levels_are_add_log_levels(method):
    ours = _add_stamps(None, method, {})
    theirs = structlog.processors.add_log_level(None, method, {})
    assert ours["level"] == theirs["level"]


def test_timestamp_has_timestampers_form_and_the_time_of_now():
    theirs = structlog.processors.TimeStamper(fmt="iso", utc=True)(None, "info", {})["timestamp"]
    for _ in range(3):  # the first call formats the second, the next ones take it from the cache
        ours = _add_stamps(None, "info", {})
        pattern = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z"
        assert re.fullmatch(pattern, ours["timestamp"]) and re.fullmatch(pattern, theirs)
        at = datetime.datetime.fromisoformat(ours["timestamp"].replace("Z", "+00:00"))
        assert abs((at - datetime.datetime.fromisoformat(theirs.replace("Z", "+00:00"))).total_seconds()) < 5
        assert isinstance(ours["mono_ns"], int) and ours["mono_ns"] > 0
