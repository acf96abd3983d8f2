"""JSON-lines run logs: flushed per record, torn lines skipped, a full disk never raises."""

from __future__ import annotations

import json
import logging
import threading
from pathlib import Path

import pytest

from trainwarden.controller.runlog import LOG_VERSION, JsonlWriter, read_jsonl

LOGGER = "trainwarden.controller.runlog"


def test_each_record_is_readable_before_close(tmp_path: Path) -> None:
    path = tmp_path / "decisions.jsonl"
    writer = JsonlWriter(path)
    try:
        assert writer.write({"kind": "micro_batch_size", "params": {"value": 4}})
        # Another reader, while the writer still holds the file open.
        with open(path, encoding="utf-8") as other:
            assert json.loads(other.readline()) == {
                "v": LOG_VERSION,
                "kind": "micro_batch_size",
                "params": {"value": 4},
            }
        assert writer.write({"step": 2})
        assert [r["step"] for r in read_jsonl(path) if "step" in r] == [2]
        assert path.read_text(encoding="utf-8").count("\n") == 2
    finally:
        writer.close()


def test_records_are_compact_single_lines_and_odd_values_become_text(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    writer = JsonlWriter(path)
    writer.write({"reason": "line one\nline two", "where": path})
    writer.close()
    [line] = path.read_text(encoding="utf-8").splitlines()
    assert ", " not in line and ": " not in line
    assert json.loads(line) == {"v": LOG_VERSION, "reason": "line one\nline two", "where": str(path)}


def test_writer_appends_to_an_existing_log(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    for n in (1, 2):
        w = JsonlWriter(path)
        w.write({"n": n})
        w.close()
    assert [r["n"] for r in read_jsonl(path)] == [1, 2]


def test_read_skips_a_torn_last_line_and_garbage(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    path.write_bytes(
        b'{"v":1,"step":1}\n'
        b"\n"
        b"not json at all\n"
        b'{"v":1,"step":2}\n'
        b"[1,2,3]\n"  # valid JSON, not a record
        b'"text"\n'
        b"\xff\xfe\x00garbled bytes\n"
        b'   {"v":1,"step":3}   \n'
        b'{"v":1,"step":4,"reason":"cut mid-wr'  # the writer crashed here
    )
    assert [r["step"] for r in read_jsonl(path)] == [1, 2, 3]


def test_read_of_an_empty_log(tmp_path: Path) -> None:
    path = tmp_path / "empty.jsonl"
    path.write_text("")
    assert list(read_jsonl(path)) == []


def test_concurrent_writers_never_interleave_lines(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    writer = JsonlWriter(path)

    def work(k: int) -> None:
        for i in range(200):
            writer.write({"thread": k, "i": i, "pad": "x" * 200})

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    writer.close()
    records = list(read_jsonl(path))
    assert len(records) == 800 == path.read_text().count("\n")
    for k in range(4):
        assert [r["i"] for r in records if r["thread"] == k] == list(range(200))


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
def test_a_full_disk_returns_false_and_logs_once(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger=LOGGER)
    writer = JsonlWriter(Path("/dev/full"))
    assert writer.write({"step": 1}) is False
    assert writer.write({"step": 2}) is False
    assert writer.write({"step": 3}) is False
    errors = [r for r in caplog.records if r.name == LOGGER and r.levelno == logging.ERROR]
    assert len(errors) == 1
    assert "/dev/full" in errors[0].getMessage() and "training goes on" in errors[0].getMessage()
    assert not [r for r in caplog.records if "works again" in r.getMessage()]
    writer.close()  # the unwritable buffer is dropped, not raised
    writer.close()
