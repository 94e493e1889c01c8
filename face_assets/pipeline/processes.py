"""The long-running Dagster processes of a deployment, with logs an operator reads.

``python -m face_assets.pipeline.processes daemon [ARGS]`` runs ``dagster-daemon run -w workspace.yaml
ARGS`` and ``... webserver [ARGS]`` runs ``dagster-webserver -w workspace.yaml ARGS``: Dagster's own
commands, with their logging changed in three ways.

- Plain text lines (time, level, logger, message): Dagster colours its lines with ANSI codes even
  when they go to a file or the journal.
- One INFO line per thing that happened: the daemon logs every sensor and automation tick at INFO
  (half a dozen lines per tick), so those that found nothing are left out, and a sensor's skip
  reason is logged when it changes, not at every tick ("no new images", then "2 file(s) waiting to
  settle: ...", then "no new images" again). ``--log-level debug`` shows them all.
- The daemon's first start on a fresh instance says at INFO, not WARNING, that it has no event
  cursor yet.
- The code servers the daemon and the webserver start log from ERROR up: each one the daemon
  replaces says "No heartbeat received in 20 seconds, shutting down" as a WARNING, which is
  routine, and they log in colour, in their own processes.
"""

from __future__ import annotations

import logging
import re
import sys

import dagster._daemon.controller
import dagster._utils.log
import dagster_webserver.cli

LINE_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

ROUTINE = re.compile(
    r"^(Checking for new runs for sensor|No run requests returned|Not checking for new runs|Checking \d+ assets/checks"
    r"|Prefetching asset records|Done prefetching asset records|Tick produced 0 runs|Submitting 0 runs"
    r"|Finished auto-materialization tick|Adding \d+ asset evaluations|Collected \d+ runs for monitoring|Checking run "
    r"|Priority sorting and checking tag concurrency limits|Renaming any states corresponding to the legacy)"
)
"""Daemon messages of every tick or poll, whatever it found (what it did is logged by its own lines)."""

FIRST_START = re.compile(r"^No cursor for event type \S+, ignoring older events$")
"""A daemon's first start on a fresh instance: nothing older to catch up on; a WARNING upstream, INFO here."""

SKIPPED = re.compile(r"^Sensor (?P<sensor>\S+) skipped: (?P<reason>.*)$", re.S)


class RoutineFilter(logging.Filter):
    """Leaves out the INFO lines of ticks that found nothing, and repeated skip reasons of a sensor."""

    def __init__(self) -> None:
        super().__init__()
        self._last_skip: dict[str, str] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        """True for the records to write."""
        message = record.getMessage()
        if record.levelno == logging.WARNING and FIRST_START.match(message):
            record.levelno, record.levelname = logging.INFO, "INFO"
        if record.levelno != logging.INFO:
            return True
        if ROUTINE.match(message):
            return False
        skipped = SKIPPED.match(message)
        if skipped:
            sensor, reason = skipped["sensor"], skipped["reason"]
            repeated = self._last_skip.get(sensor) == reason
            self._last_skip[sensor] = reason
            return not repeated
        if message.startswith("Sensor "):
            self._last_skip.pop(message.split()[1], None)  # it did something: its next skip is news
        return True


_dagster_configure_loggers = dagster._utils.log.configure_loggers


def configure_loggers(handler: str = "default", formatter: str = "colored", log_level: str | int = "INFO") -> None:
    """Dagster's logger set-up, then plain lines and :class:`RoutineFilter` on its handlers.

    The filter applies from INFO up only: at ``--log-level debug`` every line is written.
    """
    _dagster_configure_loggers(handler=handler, formatter=formatter, log_level=log_level)
    quiet = logging.getLevelName(log_level) if isinstance(log_level, str) else log_level
    for name in ("dagster", "dagster-webserver"):
        for h in logging.getLogger(name).handlers:
            h.setFormatter(logging.Formatter(LINE_FORMAT))
            if quiet != logging.DEBUG:
                h.addFilter(RoutineFilter())


def main(argv: list[str] | None = None) -> None:
    """``daemon [ARGS]`` or ``webserver [ARGS]``: the Dagster command with the workspace and plain, quiet logs."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in ("daemon", "webserver"):
        sys.exit("usage: python -m face_assets.pipeline.processes daemon|webserver [dagster options]")
    which, rest = argv[0], argv[1:]
    workspace = [] if "-w" in rest or "--workspace" in rest else ["-w", "workspace.yaml"]
    # Both commands bound Dagster's function by name at import: replace it there too.
    dagster._utils.log.configure_loggers = configure_loggers
    dagster._daemon.controller.configure_loggers = configure_loggers
    dagster_webserver.cli.configure_loggers = configure_loggers
    if which == "daemon":
        from dagster._daemon.cli import cli

        from ..config import load_settings
        from ..process import lower_session_share

        lower_session_share(load_settings().process.pipeline_share_nice)

        cli.main(["run", *workspace, "--code-server-log-level", "error", *rest], prog_name="dagster-daemon", obj={})
    else:
        dagster_webserver.cli.cli.main([*workspace, "--code-server-log-level", "error", *rest],
                                       prog_name="dagster-webserver")


if __name__ == "__main__":
    main()
