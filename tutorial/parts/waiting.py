"""One way to wait: run a check until it passes or the time runs out.

The waits in tutorial/ and tests/ go through `until` (or `until_async`, for a check that must be
awaited), so each one ends the same way: a TimeoutError that says what we were waiting for and
what we saw last.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

T = TypeVar("T")
Retry = tuple[type[BaseException], ...]


def until(
    check: Callable[[], T],
    *,
    timeout: float,
    waiting_for: str,
    done: Callable[[T], bool] = bool,
    retry_on: Retry = (),
    every: float = 0.05,
    seen: Callable[[Any], str] = str,
) -> T:
    """Call `check` until `done(result)`, and return that result.

    A result that is not done, or an exception named in `retry_on`, is what we saw; once `timeout`
    seconds have passed, TimeoutError says "waiting for <waiting_for>" and `seen` of the last of
    them. Any other exception from `check` ends the wait at once: a process that died is not worth
    waiting for.
    """
    deadline = time.monotonic() + timeout
    while True:
        try:
            result = check()
        except retry_on as exc:
            last: Any = exc
        else:
            if done(result):
                return result
            last = result
        if time.monotonic() >= deadline:
            raise _timed_out(timeout, waiting_for, seen(last))
        time.sleep(every)


async def until_async(
    check: Callable[[], Awaitable[T]],
    *,
    timeout: float,
    waiting_for: str,
    done: Callable[[T], bool] = bool,
    retry_on: Retry = (),
    every: float = 0.05,
    seen: Callable[[Any], str] = str,
) -> T:
    """`until` for a check that is a coroutine function; it sleeps without blocking the loop."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            result = await check()
        except retry_on as exc:
            last: Any = exc
        else:
            if done(result):
                return result
            last = result
        if time.monotonic() >= deadline:
            raise _timed_out(timeout, waiting_for, seen(last))
        await asyncio.sleep(every)


def _timed_out(timeout: float, waiting_for: str, last: str) -> TimeoutError:
    return TimeoutError(f"waited {timeout:g}s for {waiting_for}; last saw: {last}")
