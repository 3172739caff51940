"""Reading rounds out of the raw data, and typesetting figures and Markdown tables.

The raw data: ``{"runs": {key: {"params": ..., "rounds": {tool: [round, ...]}}},
"floor": {name: [round, ...]}, "skipped": {tool: why}, ...}``; a round is a case's dict, or
``{"error": ...}`` alone when the measurement failed.
"""

# ruff: noqa: RUF001 - the report is typeset: the multiplication sign is meant
from __future__ import annotations

import statistics
from typing import Any


def rounds_of(data: dict[str, Any], key: str, tool: str) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = data["runs"].get(key, {}).get("rounds", {}).get(tool, [])
    return found


def values(data: dict[str, Any], key: str, tool: str, field: str) -> list[float]:
    return [r[field] for r in rounds_of(data, key, tool) if isinstance(r.get(field), (int, float))]


def floor_values(data: dict[str, Any], name: str, field: str) -> list[float]:
    return [r[field] for r in data["floor"].get(name, []) if field in r]


def median_or_none(found: list[float]) -> float | None:
    return statistics.median(found) if found else None


def errors(data: dict[str, Any], key: str, tool: str) -> str:
    failed = [r["error"] for r in rounds_of(data, key, tool) if r.get("error") and len(r) == 1]
    return f"failed: {failed[0]}" if failed else ""


def fmt(value: float | None, digits: int | None = None) -> str:
    if value is None:
        return "n/a"
    if digits is None:
        magnitude = abs(value)
        digits = 0 if magnitude >= 100 else 1 if magnitude >= 10 else 2 if magnitude >= 1 else 3
    return f"{value:,.{digits}f}".replace(",", " ")


def tri(found: list[float], digits: int | None = None) -> str:
    """min / median / max, or the one value."""
    if not found:
        return "n/a"
    if len(found) == 1:
        return fmt(found[0], digits)
    return " / ".join(fmt(v, digits) for v in (min(found), statistics.median(found), max(found)))


def ratio(ours: float | None, theirs: float | None, inverse: bool = False) -> str:
    if not ours or not theirs:
        return "n/a"
    value = theirs / ours if inverse else ours / theirs
    return f"{value:,.1f}×".replace(",", " ")


def unit(value: float | None, name: str, digits: int | None = None) -> str:
    return "n/a" if value is None else f"{fmt(value, digits)} {name}"


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return [*lines, ""]


def section(
    heading: str,
    *text: str,
    header: list[str],
    rows: list[list[str]],
    after: list[str] | None = None,
) -> list[str]:
    """A report section: its heading, what was measured and how, the table, what follows."""
    return [heading, "", *text, "", *table(header, rows), *(after or [])]
