"""The fallback log handler: `[lycoris] WARNING ...` while the host has no logging set up, silent after."""
from __future__ import annotations

import contextlib
import io
import logging
from typing import Iterator

import pytest

from lib_lycoris.logs import install_fallback_handler


@contextlib.contextmanager
def bare_logging() -> Iterator[logging.Logger]:
    """No handler on the root logger (pytest puts its capture handlers there during a test) nor on "lycoris",
    both at their default levels, as after a UI-only WebUI start; everything restored in place afterwards."""
    lycoris = logging.getLogger("lycoris")
    saved = [(lg, lg.handlers[:], lg.level, lg.propagate) for lg in (lycoris, logging.root)]
    for lg, level in ((lycoris, logging.NOTSET), (logging.root, logging.WARNING)):
        lg.handlers.clear()
        lg.propagate = True
        lg.setLevel(level)          # setLevel also clears the loggers' level caches
    try:
        yield lycoris
    finally:
        for lg, handlers, level, propagate in saved:
            lg.handlers[:] = handlers
            lg.propagate = propagate
            lg.setLevel(level)


def test_no_host_logging_prints_level_and_name(capsys: pytest.CaptureFixture) -> None:
    with bare_logging() as log:
        install_fallback_handler()
        log.warning("something %s", "odd")
        logging.getLogger("lycoris.sub").error("bad")
        log.info("not shown below WARNING")
    assert capsys.readouterr().err.splitlines() == ["[lycoris] WARNING something odd", "[lycoris] ERROR bad"]


def test_host_logging_gets_each_record_once(capsys: pytest.CaptureFixture) -> None:
    host = io.StringIO()
    handler = logging.StreamHandler(host)
    handler.setFormatter(logging.Formatter("HOST %(name)s %(levelname)s %(message)s"))
    with bare_logging() as log:
        install_fallback_handler()
        logging.root.addHandler(handler)        # the host configures logging after our install
        log.warning("something")
        assert capsys.readouterr().err == ""
        logging.root.removeHandler(handler)     # and takes it away again: the fallback speaks again
        log.warning("again")
    assert host.getvalue().splitlines() == ["HOST lycoris WARNING something"]
    assert capsys.readouterr().err.splitlines() == ["[lycoris] WARNING again"]


def test_install_is_idempotent_and_touches_no_other_logger() -> None:
    with bare_logging() as log:
        others = {name: lg.handlers[:] for name, lg in logging.Logger.manager.loggerDict.items()
                  if isinstance(lg, logging.Logger) and name != "lycoris"}
        first = install_fallback_handler()
        assert install_fallback_handler() is first
        assert log.handlers == [first] and log.level == logging.NOTSET
        assert logging.root.handlers == [] and logging.root.level == logging.WARNING
        assert {name: logging.getLogger(name).handlers for name in others} == others


def test_level_argument(capsys: pytest.CaptureFixture) -> None:
    with bare_logging() as log:
        install_fallback_handler(logging.INFO)
        log.setLevel(logging.INFO)
        log.info("loaded")
    assert capsys.readouterr().err.splitlines() == ["[lycoris] INFO loaded"]
