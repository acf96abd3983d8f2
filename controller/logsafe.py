"""Log lines the job cannot forge: a message holding a newline, a carriage return or an escape
sequence (from a run id, a domain name, a request path) is written on one line, escaped."""

from __future__ import annotations

import logging

from trainwarden.controller.httpserve import printable


class OneLineFormatter(logging.Formatter):
    """A Formatter whose message is one line of printable characters (a traceback still follows
    on its own lines: that is the controller's, not a client's)."""

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        safe = printable(message, limit=4000)
        if safe != message:
            record = logging.makeLogRecord({**record.__dict__, "msg": safe, "args": None})
        return super().format(record)
