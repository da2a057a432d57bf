"""Failure reasons in words: what a behaviour expected, and what the app did instead.

`make check` prints the first line of a failure's message as its reason, so every check here fails
with one sentence ("expected a JSON 404, got a text/plain 404 `404: Not Found`"), never an assert
expression. Each one looks only at what the app does from outside: its answers, logs and exit.
"""

from __future__ import annotations

import json
import re

from tutorial.parts import waiting
from tutorial.parts.process import Running, get, listening_ports


def said(status: int, content_type: str | None, body: bytes | str) -> str:
    """An answer in a few words: a text/plain 404 `404: Not Found`."""
    text = body.decode(errors="replace") if isinstance(body, bytes) else body
    text = " ".join(text.split()) or "(empty)"
    if len(text) > 100:
        text = text[:97] + "..."
    kind = f"a {content_type} " if content_type else "a "
    return f"{kind}{status} `{text}`"


def as_json(value) -> str:
    return json.dumps(value, ensure_ascii=False)


async def json_answer(response, status: int, body=None, named: str | None = None) -> dict:
    """The answer's JSON, if it has `status` and a JSON body (equal to `body` when given; `named`
    says what that body is, where it is too long to quote)."""
    raw = await response.read()
    got = said(response.status, response.content_type, raw)
    wanted = f"a JSON {status}" + (
        f" with {named}" if named else f" {as_json(body)}" if body is not None else ""
    )
    if response.status != status or response.content_type != "application/json":
        raise AssertionError(f"expected {wanted}, got {got}")
    try:
        value = json.loads(raw)
    except ValueError:
        raise AssertionError(f"expected {wanted}, got a body that is not JSON: {got}") from None
    if body is not None and value != body:
        raise AssertionError(
            f"expected {wanted}, got {said(response.status, None, as_json(value))}"
        )
    return value


def allows_get(response) -> None:
    """A 405 names the methods that would work in its Allow header."""
    allow = response.headers.get("Allow")
    if not allow or "GET" not in allow:
        raise AssertionError(f"expected an Allow header naming GET, got {allow!r}")


def last_lines(output: str, count: int = 1) -> str:
    """The last lines a process printed, joined, for a reason that says what it said."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    return " / ".join(lines[-count:]) or "nothing"


def why(output: str) -> str:
    """The line that says why a process stopped: the first exception it printed (a chained
    traceback prints its cause first), else its last line."""
    for line in output.splitlines():
        found = re.match(r"\s*([\w.]*(?:Error|Exception|Exit|Warning)): (.+)", line)
        if found and not found.group(1).endswith("HaltServer"):
            return re.sub(
                r" at 0x[0-9a-f]+", "", f"{found.group(1).rpartition('.')[2]}: {found.group(2)}"
            )[:200]
    return last_lines(output)


def serving(running: Running, command: str, timeout: float = 30.0) -> None:
    """Wait until `command` answers GET /health, on the port PORT names or, if it listens somewhere
    else, on that port (so that PORT is judged by its own behaviour, not by every run test)."""

    def answered() -> bool:
        code = running.proc.poll()
        if code is not None:
            raise AssertionError(
                f"expected `{command}` to keep serving, it exited with code {code}: "
                f"{why(running.output())}"
            )
        try:
            running.wait_until("/health", timeout=1.0)
            return True
        except TimeoutError:
            pass
        except RuntimeError:
            return False  # it exited: the next call says so
        for port in sorted(listening_ports(running.pid) - {running.port}):
            try:
                if get(f"http://127.0.0.1:{port}/health", timeout=2)[0] == 200:
                    running.url = f"http://127.0.0.1:{port}"
                    running.workers_listening_for_signals()
                    return True
            except OSError:
                continue
        return False

    try:
        waiting.until(
            answered, timeout=timeout, every=0, waiting_for=f"`{command}` to serve /health"
        )
    except TimeoutError:
        raise AssertionError(
            f"expected `{command}` to answer GET /health within {timeout:.0f} s, it did not; "
            f"it last printed: {last_lines(running.output())}"
        ) from None
