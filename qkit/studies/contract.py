"""The contract every study keeps, so that a notebook, the CLI and the report index read each one alike.

A study is one module under `qkit/studies/` with

- ``Config``: a frozen dataclass of everything the run depends on, and ``PROFILES``: named configs
  (``quick``: minutes on a laptop CPU; ``full``: the study as it is meant, for a GPU or a long night);
- ``run(config, *, store=None) -> Result``, every step cached in the store, so a rerun resumes;
- a ``Result`` with ``tables()``, ``findings()`` (sentences worded from the CIs, never from the claim
  under test), ``figures()``, ``provenance()`` and ``summary()``: the few fields the report index shows.

Notebook N calls study module N and nothing else of substance; :data:`STUDIES` registers them in
notebook order.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar, runtime_checkable

import pandas as pd
from matplotlib.figure import Figure

from qkit.core.errors import QkitError, lookup

C = TypeVar("C")


@dataclass(frozen=True)
class Summary:
    """What the report index shows of a study: one headline sentence, the best variant (if the study ranks
    variants), a status (``ok``, ``no effect resolved`` where the run could not tell variants apart,
    ``alert`` for drift, or what failed) and its headline figure."""

    study: str
    headline: str
    best: str | None = None
    status: str = "ok"
    figure: str | None = None  # the name, among the result's figures, of the one the index shows

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@runtime_checkable
class Result(Protocol):
    config: Any

    def tables(self) -> dict[str, pd.DataFrame]: ...

    def findings(self) -> list[str]: ...

    def figures(self) -> dict[str, Figure]: ...

    def provenance(self) -> pd.DataFrame: ...

    def summary(self) -> Summary: ...


def config(profiles: Mapping[str, C], profile: str | C = "quick", **overrides: Any) -> C:
    """A study's config: a profile by name (or a config as it is) with the overrides that are not None;
    lists become tuples and dicts tuples of (key, value), so configs stay hashable. An unknown field is a
    QkitError naming the fields."""
    base = lookup(profiles, profile, "profile") if isinstance(profile, str) else profile
    fields = {f.name for f in dataclasses.fields(base)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise QkitError(f"{type(base).__qualname__} has no field {', '.join(unknown)}",
                        f"use one of {', '.join(sorted(fields))}")
    given = {k: tuple(v.items()) if isinstance(v, dict) else tuple(v) if isinstance(v, list) else v
             for k, v in overrides.items() if v is not None}
    return dataclasses.replace(base, **given)
