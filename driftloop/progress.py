"""Progress listeners: long steps report (done, total) here; the CLI draws a bar."""

from __future__ import annotations

from collections.abc import Callable

Listener = Callable[[str, int, int | None], None]
_listeners: list[Listener] = []


def add_listener(listener: Listener) -> None:
    _listeners.append(listener)


def notify(step: str, done: int, total: int | None) -> None:
    for listener in list(_listeners):  # noqa: PERF101 - a listener may remove itself
        listener(step, done, total)
