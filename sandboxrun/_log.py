"""Loggers for the modules a zygote and its tasks import: ``logging`` is imported only once a
record could be shown.

A zygote is a fresh interpreter. Unless a task's module imported logging there (configured or
not), nobody did: the root logger has no handler and the level WARNING, so debug and info records
go nowhere -- and importing logging (it imports threading) only to drop them made every task
slower, its at-fork hooks run in each child (see ``_transport._posix.Channel``). Warnings and
errors import it and come out as they always did (logging's last resort: stderr). In the
manager, where logging is imported, these are plain ``logging.getLogger(name)`` calls.
"""

from __future__ import annotations

import sys
from typing import Any


class Logger:
    """``debug``/``info``/``warning``/``error`` of ``logging.getLogger(name)``, deferred."""

    __slots__ = ("_logger", "name")

    def __init__(self, name: str) -> None:
        self.name = name
        self._logger: Any = None

    def _get(self) -> Any:
        if self._logger is None:
            import logging

            self._logger = logging.getLogger(self.name)
        return self._logger

    def debug(self, msg: str, *args: object) -> None:
        if "logging" in sys.modules:  # else: no handler, level WARNING -- dropped anyway
            self._get().debug(msg, *args, stacklevel=2)

    def info(self, msg: str, *args: object) -> None:
        if "logging" in sys.modules:
            self._get().info(msg, *args, stacklevel=2)

    def warning(self, msg: str, *args: object) -> None:
        self._get().warning(msg, *args, stacklevel=2)

    def error(self, msg: str, *args: object) -> None:
        self._get().error(msg, *args, stacklevel=2)


def get(name: str) -> Logger:
    return Logger(name)
