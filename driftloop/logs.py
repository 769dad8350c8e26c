"""Console logging for the ``driftloop`` command line."""

from __future__ import annotations

import logging

from prefect.logging.handlers import PrefectConsoleHandler

_OURS = ("driftloop", "tasks", "flows", "prefect.flow_runs", "prefect.task_runs")


class CliConsoleHandler(PrefectConsoleHandler):
    """Prefect's console handler cut down for the CLI: warnings from driftloop's own
    steps, nothing from server internals, and no run failures (the CLI prints their
    cause as one line). The Prefect API and UI still get every record, tracebacks too.
    ``driftloop --verbose`` shows everything."""

    def emit(self, record: logging.LogRecord) -> None:
        if not record.name.startswith(_OURS):
            return
        if record.levelno >= logging.ERROR and record.name.startswith("prefect."):
            return
        super().emit(record)
