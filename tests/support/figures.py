"""Figures a test measured: printed as a FIGURES line for `pytest -s`, and appended to the file RELIABILITY_FIGURES
names (docs/reliability.md is written from them)."""

from __future__ import annotations

import json
import os
import statistics


def report(name: str, **figures: object) -> None:
    """Figures a test measured, printed for `pytest -s` and kept for docs/reliability.md."""
    line = json.dumps({"test": name, **figures})
    print(f"\nFIGURES {line}")
    out = os.environ.get("RELIABILITY_FIGURES")
    if out:
        with open(out, "a", encoding="utf-8") as file:
            file.write(line + "\n")


def seconds(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    ordered = sorted(values)
    return {
        "p50": round(statistics.median(ordered), 3),
        "p99": round(ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))], 3),
        "max": round(ordered[-1], 3),
    }
