"""Work done once per scheduler pass, by a task of its own
(docs/architecture.md "The tasks of one worker").

Owns: `PassSignal`, which wakes one task after each scheduler pass in which
work was queued for it.
Must not: know what the work is.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NoReturn

import trio

if TYPE_CHECKING:
    from collections.abc import Callable


class PassSignal:
    """Wakes its task once after each scheduler pass in which `set` was
    called: work queued by any task during the pass is done all at once,
    after it."""

    __slots__ = ("_event",)

    def __init__(self) -> None:
        self._event = trio.Event()

    def set(self) -> None:
        """Work was queued: the task runs after this pass."""
        self._event.set()

    async def each_pass(self, work: Callable[[], object]) -> NoReturn:
        """Call `work()` once after each pass in which `set` was called, until
        cancelled."""
        while True:
            await self._event.wait()
            self._event = trio.Event()
            work()
