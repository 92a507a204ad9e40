"""The `Prefer` request header (RFC 7240), as far as the gateway honours it. Pure."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Preferences:
    respond_async: bool = False
    wait: float | None = None  # seconds, from `wait=N`


NONE = Preferences()


def parse_prefer(values: Iterable[str]) -> Preferences:
    """Read `respond-async` and `wait=N` from every Prefer header; ignore what we don't know.

    RFC 7240 §2: preferences are comma-separated, parameters after `;` belong to the preference
    before them, names are case-insensitive, and the first occurrence of a preference wins.
    """
    respond_async = False
    wait: float | None = None
    seen: set[str] = set()
    for value in values:
        for item in value.split(","):
            token = item.split(";", 1)[0].strip()
            name, _, raw = token.partition("=")
            name = name.strip().lower()
            if not name or name in seen:
                continue
            seen.add(name)
            if name == "respond-async":
                respond_async = True
            elif name == "wait":
                try:
                    number = float(raw.strip().strip('"'))
                except ValueError:
                    continue
                if number >= 0 and number == number and number != float("inf"):
                    wait = number
    if not respond_async and wait is None:
        return NONE
    return Preferences(respond_async=respond_async, wait=wait)
