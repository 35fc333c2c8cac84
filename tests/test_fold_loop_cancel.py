"""A fold loop cancelled while it is not waiting for its fold (a promotion retires its
generation, the node stops) leaves no error behind unread. Found by review: a fold error the
loop never came back for was logged at GC as "Future exception was never retrieved".
(A loop cancelled while its batch waits in the fold queue: tests/test_catchup_transactions.py.)"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from fleetlog.schemas import AttemptRecorded, encode_event, new_event_id, now_iso
from fleetlog.services.node.server import Server
from fleetlog.services.projector import pipeline

from fleetlog import Fleet, FleetSettings


@pytest.fixture
def settings(settings: FleetSettings) -> FleetSettings:
    # The loop then waits in the reader after a batch (up to 2 s for the next) instead of
    # coming straight back: where a cancellation meets it.
    return settings.model_copy(update={"batch_wait_s": 2.0})


def attempt() -> bytes:
    return encode_event(AttemptRecorded(id=new_event_id(), ts=now_iso(), agent="cancel", action="act",
                                        outcome="ok", elapsed_s=1.0))


async def test_a_fold_error_the_loop_never_came_back_for_is_not_left_unretrieved(
        fleet: Fleet, server: Server, monkeypatch: pytest.MonkeyPatch) -> None:
    projector = server.projector
    js = (await fleet.nats()).jetstream()
    await fleet.attempts.query(limit=1)
    failed = asyncio.Event()
    loop = asyncio.get_running_loop()

    def failing_apply(*args: Any, **kwargs: Any) -> Any:
        loop.call_soon_threadsafe(failed.set)
        raise RuntimeError("the fold failed (injected)")

    monkeypatch.setattr(projector.folder, "apply", failing_apply)
    submitted: list[Any] = []  # the loop's batches in flight, kept past the loop's end
    submit = pipeline._InFlight.submit

    def keep(self: Any, *args: Any, **kwargs: Any) -> None:
        submitted.append(self)
        submit(self, *args, **kwargs)

    monkeypatch.setattr(pipeline._InFlight, "submit", keep)
    await js.publish("fleet.attempt.cancel.act", attempt())
    await asyncio.wait_for(failed.wait(), 10)
    await asyncio.sleep(0.2)  # the loop is back in the reader (batch_wait_s 2 s), not awaiting the fold
    running = projector.live("attempts")
    for task in running.tasks:
        task.cancel()
    await asyncio.gather(*running.tasks, return_exceptions=True)
    running.tasks.clear()
    (inflight,) = submitted
    # asyncio logs "Future exception was never retrieved" when a future whose error nobody read
    # is collected, which is exactly when this flag is set (here the log record of the loop's
    # failure keeps the future alive, so the flag is what can be checked).
    assert inflight.future.done() and not inflight.future._log_traceback
