"""The extension's log lines when the host has not set up logging: `[lycoris] WARNING message`.

Every engine module logs to the "lycoris" logger. A WebUI started without a logging setup leaves the root
logger bare, and Python's `logging.lastResort` then prints the message alone, with no level and no name.
`install_fallback_handler()` adds one handler to the "lycoris" logger that prints `[lycoris] LEVEL message`
to stderr only while no other handler would get the record (checked at every record): once the host
configures logging, records go through the host's handlers alone and nothing is printed twice. The root
logger and every other logger are left as they are.
"""
from __future__ import annotations

import logging
import sys
from typing import TextIO

__all__ = ["FALLBACK_FORMAT", "LOGGER_NAME", "install_fallback_handler"]

LOGGER_NAME = "lycoris"
FALLBACK_FORMAT = "[lycoris] %(levelname)s %(message)s"
# Set on our handler, so that a second install (also after a reload of this module) finds it.
_MARK = "_lycoris_fallback"


class _FallbackHandler(logging.StreamHandler):
    """Writes to the current `sys.stderr` (as `logging.lastResort` does) while nobody else handles logs."""

    def __init__(self, level: int) -> None:
        logging.Handler.__init__(self, level)
        setattr(self, _MARK, True)
        self.setFormatter(logging.Formatter(FALLBACK_FORMAT))

    @property
    def stream(self) -> TextIO:     # looked up per record: follows a redirected stderr
        return sys.stderr

    def filter(self, record: logging.LogRecord) -> bool:
        return not _other_handlers(record.name, self) and super().filter(record)


def _other_handlers(name: str, own: logging.Handler) -> bool:
    """Whether a record of logger `name` reaches any handler but `own` (the walk `Logger.callHandlers` does)."""
    logger: logging.Logger | None = logging.getLogger(name)
    while logger is not None:
        if any(h is not own for h in logger.handlers):
            return True
        logger = logger.parent if logger.propagate else None
    return False


def install_fallback_handler(level: int = logging.WARNING) -> logging.Handler:
    """Add the fallback handler to the "lycoris" logger, once; return it (the one already there if any).

    Args:
        level: the least level printed while the host has no logging set up.
    """
    logger = logging.getLogger(LOGGER_NAME)
    for h in logger.handlers:
        if getattr(h, _MARK, False):
            return h
    handler = _FallbackHandler(level)
    logger.addHandler(handler)
    return handler
