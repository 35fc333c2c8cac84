"""Stopping asyncio tasks for certain, whatever Python 3.11's `wait_for` does.

Python 3.11's `asyncio.wait_for` (inside nats-py's request and publish) returns the inner
result instead of raising when a cancellation lands in the same loop turn as the reply:
the cancellation is swallowed and the task runs on. A `stop()` that cancels once and
awaits the task then waits forever; this hung the test suite in a projector's rejects
task (a publish acked just as the server fixture's teardown cancelled it). So every
`stop()` cancels, waits a bounded time, and cancels again.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from typing import Any

__all__ = ["stop_tasks"]

log = logging.getLogger("fleetlog.tasks")


async def stop_tasks(tasks: Iterable[asyncio.Task[Any]], *, rounds: int = 5,
                     wait_s: float = 2.0) -> list[asyncio.Task[Any]]:
    """Cancel `tasks` until they end: up to `rounds` cancellations `wait_s` apart.

    Returns the tasks that still did not end (each logged); exceptions the tasks ended
    with are logged, not raised, so one broken task cannot keep the others running.
    """
    all_tasks = list(tasks)
    pending = {t for t in all_tasks if not t.done()}
    for _ in range(rounds):
        if not pending:
            break
        for task in pending:
            task.cancel()
        _, pending = await asyncio.wait(pending, timeout=wait_s)
    for task in pending:
        log.warning("task %s did not stop after %d cancellations", task.get_name(), rounds)
    for task in all_tasks:
        if task.done() and not task.cancelled() and task.exception() is not None:
            log.warning("task %s ended with %r", task.get_name(), task.exception())
    return list(pending)
