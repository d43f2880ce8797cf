"""The node's and the switch's log lines: one line per record, whatever the message quotes.

A log message often quotes what came from outside: a peer's reason, an mDNS instance name, a
certificate's subject, a value in a refused entry, an acquirer's answer. A newline there would
forge a log line of its own ("... INFO sale approved"); an escape sequence would act on the
terminal of whoever follows the log. :class:`OneLineFormatter` writes the message's control,
bidirectional and other non-printable characters as escapes (``domain.text.shown``, as the CLI's
tables do). A traceback that follows a message stays as Python writes it, and so do the frames a
record carries as ``extra={"frames": text}`` (a traceback's lines without the exception's message,
which might quote a peer: ``infra.netguard``'s report of a failed connection).
"""

from __future__ import annotations

import logging
from typing import TextIO

from meshpos.domain.text import shown

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class OneLineFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__(LOG_FORMAT)

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = shown(record.message)
        text = super().formatMessage(record)
        frames = getattr(record, "frames", None)
        return f"{text}\n{frames}" if isinstance(frames, str) and frames else text


def console_handler(stream: TextIO | None = None) -> logging.Handler:
    handler = logging.StreamHandler(stream)
    handler.setFormatter(OneLineFormatter())
    return handler


def configure_logging(level: int) -> None:
    """The root logger at ``level``, to standard error, one line per record (once per process, as
    ``logging.basicConfig``)."""
    logging.basicConfig(level=level, handlers=[console_handler()])
