"""Progress of a long command (rebuild, replica, export): folded / target, rate, ETA.

On a terminal it is a `rich.progress` bar; otherwise (a pipe, a log file, `--json`) one
plain line at the start, about every `every_s` seconds, on reaching the target and at the
end, so a log shows the
command moving and where it stopped. Both go to stderr: stdout stays the command's answer
(the one JSON document with `--json`).
"""

from __future__ import annotations

import sys
import time
from types import TracebackType

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
)
from rich.text import Text

__all__ = ["FoldProgress"]


class _Rate(ProgressColumn):
    """Events folded per second (rich's speed columns are for bytes)."""

    def render(self, task: Task) -> Text:
        return Text(f"{task.speed:.0f}/s" if task.speed else "?/s")


class FoldProgress:
    """`update(folded, target)` as often as you like; it draws or prints at its own pace."""

    def __init__(self, label: str, *, as_json: bool = False, every_s: float = 2.0,
                 tty: bool | None = None) -> None:
        self.label = label
        self.every_s = every_s
        self._tty = (sys.stderr.isatty() if tty is None else tty) and not as_json
        self._bar: Progress | None = None
        self._task: TaskID | None = None
        self._started = time.monotonic()
        self._printed_at: float | None = None
        self._last: tuple[int, int] | None = None
        self._printed: tuple[int, int] | None = None

    def __enter__(self) -> FoldProgress:
        if self._tty:
            self._bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 _Rate(), TimeRemainingColumn(),
                                 console=Console(stderr=True), transient=True)
            self._bar.__enter__()
            self._task = self._bar.add_task(self.label, total=None)
        return self

    def update(self, folded: int, target: int) -> None:
        self._last = (folded, target)
        if self._bar is not None and self._task is not None:
            self._bar.update(self._task, completed=folded, total=max(target, 1))
            return
        now = time.monotonic()
        caught_up = target > 0 and folded >= target and self._last != self._printed
        if self._printed_at is None or now - self._printed_at >= self.every_s or caught_up:
            self._print(now)

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self._bar is not None:
            self._bar.__exit__(exc_type, exc, tb)
        elif self._last is not None and self._last != self._printed:
            self._print(time.monotonic())  # where it stopped, even when it took under every_s

    def _print(self, now: float) -> None:
        assert self._last is not None
        folded, target = self._last
        elapsed = max(now - self._started, 1e-9)
        rate = folded / elapsed
        left = max(target - folded, 0)
        eta = f"{left / rate:.0f}s" if rate > 0 and left else ("0s" if not left else "?")
        print(f"{self.label}: folded {folded}/{target} ({rate:.0f}/s, ETA {eta})", file=sys.stderr, flush=True)
        self._printed_at = now
        self._printed = self._last
