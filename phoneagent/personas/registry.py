"""The persona set an instance serves, reloaded when its directory changes."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from phoneagent.logs import get_logger
from phoneagent.personas.validation import (
    DirectoryReport,
    check_directory,
    load_directory,
    persona_files,
)

__all__ = ["PersonaRegistry", "RefusedReload"]

log = get_logger("phoneagent.personas")


@dataclass(frozen=True)
class RefusedReload:
    """A reload that found problems, kept so the console can show the operator what to fix
    (the log says it too, but nobody reads a log after saving a file)."""

    at: float  # Unix seconds
    report: DirectoryReport


class PersonaRegistry:
    """The persona set currently serving, reloaded when the directory changes.

    A reload that finds any problem is logged and refused; the last good set keeps serving.
    Polling (not inotify) because it also sees Kubernetes ConfigMap updates, which swap a
    symlinked directory, and it costs one ``stat`` per file per interval.
    """

    def __init__(self, directory: Path, environ: Mapping[str, str] | None = None):
        self.directory = directory
        self.environ = environ
        self._fingerprint = self._read_fingerprint()
        self.current = load_directory(directory, environ)
        # The last reload's problems while they last: None once a reload applies a set again.
        self.refused: RefusedReload | None = None

    def _read_fingerprint(self) -> tuple:
        try:
            files = persona_files(self.directory)
        except OSError:
            return ()
        stamps = []
        for path in files:
            try:
                st = path.stat()
            except OSError:
                continue
            stamps.append((path.name, st.st_mtime_ns, st.st_size, st.st_ino))
        return tuple(stamps)

    def reload_if_changed(self) -> bool:
        """Reload when the files changed. True when a new set was applied."""
        fingerprint = self._read_fingerprint()
        if fingerprint == self._fingerprint:
            return False
        self._fingerprint = fingerprint
        report = check_directory(self.directory, self.environ)
        if report.persona_set is None:
            for problem in report.problems:
                log.error("persona_reload_refused", problem=str(problem))
            log.warning("personas_unchanged", serving=sorted(self.current.personas))
            self.refused = RefusedReload(time.time(), report)
            return False
        self.current = report.persona_set
        self.refused = None
        log.info("personas_reloaded", personas=sorted(self.current.personas))
        return True

    async def watch(self, interval: float = 1.0) -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                self.reload_if_changed()
            except Exception:  # a watcher that dies silently would freeze the personas
                log.exception("persona_reload_failed")
