"""The one exception type users see.

Every error that bad input can cause is raised as a QkitError naming the problem and the fix, so the
CLI can print one line and exit 2 while a notebook shows the same sentence.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import TypeVar

T = TypeVar("T")


class QkitError(Exception):
    def __init__(self, problem: str, fix: str) -> None:
        super().__init__(f"{problem}. Fix: {fix}")
        self.problem = problem
        self.fix = fix

    def __reduce__(self):  # so that an error raised in a worker process reaches the parent intact
        return type(self), (self.problem, self.fix)


def lookup(table: Mapping[str, T], key: str, what: str) -> T:
    """``table[key]``, or a QkitError that names the `what` asked for and lists the choices."""
    try:
        return table[key]
    except KeyError:
        raise QkitError(f"unknown {what} {key!r}", f"use one of {', '.join(table)}") from None
