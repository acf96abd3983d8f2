"""Append-only JSON-lines logs of a run: the decision log and the telemetry.

Each record is one line, written and flushed at once, so a crash loses at most the line
being written; readers skip a torn last line. Later issues replay these files to tune
policies, so every line carries the format version `v`.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from trainwarden.controller.protocol import dumps
from trainwarden.controller.rundir import open_private

LOG_VERSION = 1
DECISIONS_FILE = "decisions.jsonl"
TELEMETRY_FILE = "telemetry.jsonl"

log = logging.getLogger(__name__)


class JsonlWriter:
    """Appends records to a file, one flushed line each; a write error is reported once, not raised.

    Training must go on when the disk is full: the controller keeps deciding and serving
    metrics, it only loses the record.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._failed = False
        # Never through a symlink planted in the run directory; created 0600 (rundir.py).
        self._fh = open_private(path, "a")

    def write(self, record: dict[str, Any]) -> bool:
        return self.write_many((record,))

    def write_many(self, records: Iterable[dict[str, Any]]) -> bool:
        """Append the records and flush once (an exchange's step records: one write, not one each)."""
        # Strict JSON: a NaN loss is written "NaN" (what the channel's readers take back).
        text = "".join(dumps({"v": LOG_VERSION, **r}, default=str) + "\n" for r in records)
        if not text:
            return True
        with self._lock:
            try:
                self._fh.write(text)
                self._fh.flush()
            except (OSError, ValueError) as exc:  # ValueError: written after close()
                if not self._failed:
                    log.error("cannot write %s (%s); training goes on, records are lost", self.path, exc)
                self._failed = True
                return False
        if self._failed:
            log.warning("writing %s works again", self.path)
            self._failed = False
        return True

    def close(self) -> None:
        with self._lock:
            try:
                self._fh.close()
            except OSError:
                pass


def read_jsonl(path: Path) -> Iterator[dict[str, Any]]:
    """Records of a JSON-lines log; a torn or garbled line (a crash mid-write) is skipped."""
    with open(path, encoding="utf-8", errors="replace") as fh:
        for line in fh:
            line = line.strip()
            if not line:
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(rec, dict):
                yield rec
