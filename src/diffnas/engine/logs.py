"""The ``diffnas`` logger of a command: its console and ``RUN/log.txt`` handlers, set up
for a run and taken away when the command returns. No torch here (the CLI imports it)."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path

#: the format of every run's log lines (console and log.txt)
LOG_FORMAT = ("%(asctime)s %(message)s", "%H:%M:%S")
_OURS = "_diffnas_handler"  # set on the handlers setup_logging adds


def setup_logging(run_dir: Path | None, verbose: bool = True) -> None:
    """Log to ``run_dir/log.txt`` and (``verbose``) to the console, instead of any handler
    the ``diffnas`` logger had (those this module added are closed; others, e.g. a
    notebook's own, are only taken off, and :func:`logging_scope` puts them back)."""
    logger = logging.getLogger("diffnas")
    logger.setLevel(logging.INFO)
    for h in list(logger.handlers):
        logger.removeHandler(h)
        if getattr(h, _OURS, False):
            h.close()
    fmt = logging.Formatter(*LOG_FORMAT)
    handlers: list[logging.Handler] = []
    if verbose:
        handlers.append(logging.StreamHandler())
    if run_dir is not None:
        handlers.append(logging.FileHandler(Path(run_dir) / "log.txt"))
    for h in handlers:
        h.setFormatter(fmt)
        setattr(h, _OURS, True)
        logger.addHandler(h)
    logger.propagate = False


@contextlib.contextmanager
def logging_scope() -> Iterator[None]:
    """Put the ``diffnas`` logger back as it was on leaving the block, closing the handlers
    :func:`setup_logging` added inside it (``diffnas.cli.main``): a command called
    in-process (a notebook, a test) leaves no handler writing into its run's log.txt, or
    to a console stream that is gone, after it returns."""
    logger = logging.getLogger("diffnas")
    handlers, level, propagate = list(logger.handlers), logger.level, logger.propagate
    try:
        yield
    except KeyboardInterrupt as exc:  # the run's log.txt records the stop (the console
        # gets its own line, with the resume command: diffnas.cli)
        how = f" by {exc.args[0]}" if exc.args else ""
        record = logger.makeRecord(logger.name, logging.WARNING, __file__, 0,
                                   f"interrupted{how}", (), None)
        for h in logger.handlers:
            if h not in handlers and isinstance(h, logging.FileHandler):
                h.handle(record)
        raise
    finally:
        for h in list(logger.handlers):
            if h not in handlers:
                logger.removeHandler(h)
                if getattr(h, _OURS, False):
                    h.close()
        for h in handlers:
            if h not in logger.handlers:
                logger.addHandler(h)
        logger.setLevel(level)
        logger.propagate = propagate
