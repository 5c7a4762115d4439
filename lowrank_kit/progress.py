"""Progress reporting that library code can call without printing anything itself.

Library functions take a :class:`Reporter`; the default does nothing. The CLI passes a
:class:`RichReporter`, which shows one rich progress bar per stage.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn


@dataclass
class Stage:
    name: str
    total: int | None
    _reporter: Reporter
    completed: int = 0
    started: float = field(default_factory=time.perf_counter)

    def advance(self, n: int = 1) -> None:
        self.completed += n
        self._reporter._update(self)


class Reporter:
    """No-op reporter; subclasses display stages."""

    @contextlib.contextmanager
    def stage(self, name: str, total: int | None = None) -> Iterator[Stage]:
        st = Stage(name, total, self)
        self._start(st)
        try:
            yield st
        finally:
            self._finish(st)

    def _start(self, stage: Stage) -> None:
        pass

    def _update(self, stage: Stage) -> None:
        pass

    def _finish(self, stage: Stage) -> None:
        pass


class RichReporter(Reporter):
    """One rich progress bar per stage, on stderr so ``--json`` output stays clean on stdout."""

    def __init__(self, console=None) -> None:

        self.console = console or Console(stderr=True)
        self._progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=self.console,
            transient=False,
        )
        self._tasks: dict[int, int] = {}
        self._depth = 0

    def _start(self, stage: Stage) -> None:
        if self._depth == 0:
            self._progress.start()
        self._depth += 1
        self._tasks[id(stage)] = self._progress.add_task(stage.name, total=stage.total)

    def _update(self, stage: Stage) -> None:
        self._progress.update(self._tasks[id(stage)], completed=stage.completed)

    def _finish(self, stage: Stage) -> None:
        task = self._tasks.pop(id(stage))
        total = stage.total if stage.total is not None else max(stage.completed, 1)
        self._progress.update(task, completed=total, total=total)
        self._depth -= 1
        if self._depth == 0:
            self._progress.stop()


NULL_REPORTER = Reporter()
