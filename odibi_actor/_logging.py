"""structlog setup: readable console lines by default, JSON lines on request.

structlog is imported when the first line is logged, not before: it brings in rich, a
tenth of a second of every worker's start otherwise, and a worker seldom logs at all.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

_wanted: tuple[bool, str] | None = None  # asked for before structlog was imported


def configure_logging(json: bool = False, level: str = "info") -> None:
    """Log to stderr, keeping stdout for results and progress."""
    global _wanted
    _wanted = (json, level)
    if "structlog" in sys.modules:
        _apply_wanted()


def get_logger(name: str) -> Any:
    """A structlog logger that imports structlog on its first use."""
    return _LazyLogger(name)


class _LazyLogger:
    __slots__ = ("_logger", "_name")

    def __init__(self, name: str) -> None:
        self._name = name
        self._logger: Any = None

    def __getattr__(self, attr: str) -> Any:
        logger = self._logger
        if logger is None:
            if "structlog" not in sys.modules and _LEVELS.get(attr, 99) < _threshold():
                return _drop  # below the level asked for: no need to import anything
            import structlog

            if _wanted is not None:
                _apply_wanted()
            elif not structlog.is_configured():
                _apply(False, "warning")  # a library stays quiet unless asked
            logger = self._logger = structlog.get_logger(self._name)
        return getattr(logger, attr)


_LEVELS = {"debug": 10, "info": 20, "msg": 20, "warning": 30, "warn": 30, "error": 40}


def _threshold() -> int:
    """The level lines must reach while nobody else imported structlog: ours."""
    level = _wanted[1] if _wanted is not None else "warning"
    return logging.getLevelNamesMapping().get(level.upper(), logging.INFO)


def _drop(*args: Any, **kwargs: Any) -> None:
    return None


def _apply_wanted() -> None:
    global _wanted
    if _wanted is not None:
        json, level = _wanted
        _wanted = None
        _apply(json, level)


def _apply(json: bool, level: str) -> None:
    import structlog

    lvl = logging.getLevelNamesMapping().get(level.upper(), logging.INFO)
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer()
        if json
        else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(lvl),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=False,
    )
