"""The JSON event lines every stage writes (app/logs.py)."""

from __future__ import annotations

import json

import pytest

from app.logs import event, events


def test_an_event_is_one_json_line_on_stderr_with_its_fields(capfd: pytest.CaptureFixture) -> None:
    log = events("unit-test")
    assert events("unit-test") is log  # configured once: one line per event, not two
    event(log, "ingest.run", workload="digits", version="v1", rows_in=3)
    lines = capfd.readouterr().err.splitlines()
    assert len(lines) == 1
    line = json.loads(lines[0])
    assert line["event"] == line["message"] == "ingest.run"
    assert (line["workload"], line["version"], line["rows_in"]) == ("digits", "v1", 3)
    assert line["levelname"] == "INFO" and "asctime" in line


def test_lines_follow_stderr_redirected_after_the_logger_was_made(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import io

    log = events("unit-test-redirect")
    later = io.StringIO()
    monkeypatch.setattr("sys.stderr", later)
    event(log, "train.epoch", epoch=2)
    assert json.loads(later.getvalue())["epoch"] == 2
