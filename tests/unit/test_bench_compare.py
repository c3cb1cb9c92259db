"""bench/compare-storm's table (bench/chatbench/compare.py): each figure's mean per build over its runs, the range,
B over A, and runs that failed left out."""

from __future__ import annotations

from typing import Any

from chatbench.compare import ORDER, compare_table, summarize


def storm_result(all_live_s: float, presence_mb: float, web_cpu: tuple[float, float]) -> dict[str, Any]:
    return {
        "storm": {
            "reconnect": {"reconnected": 100, "all_live_s": all_live_s, "reconnect_ms": {"p50": 300, "p99": 500}},
            "traffic": {
                "frames": 1000,
                "bytes": 2e6,
                "by_type": {"presence": {"frames": 300, "bytes": presence_mb * 1e6}},
            },
            "cpu": {
                "containers": {
                    "web-1": {"cpu_s": web_cpu[0], "restarted": True},
                    "web-2": {"cpu_s": web_cpu[1], "restarted": False},
                    "nginx-1": {"cpu_s": 0.1, "restarted": False},
                },
                "services": {"nginx": {"cpu_s": 0.1}},
            },
            "messages": {"lost": 0, "duplicated": 0, "order": {"same_order": True}},
            "settled": True,
        }
    }


def row(table: str, figure: str) -> list[str]:
    [line] = [line for line in table.splitlines() if line.startswith(f"| {figure} |")]
    return [cell.strip() for cell in line.strip("|").split("|")]


def test_a_round_runs_each_build_twice_a_b_b_a() -> None:
    assert ORDER == (0, 1, 1, 0)


def test_means_ranges_and_the_ratio_per_figure() -> None:
    runs = {
        "main": [storm_result(2.0, 1.0, (0.6, 1.0)), storm_result(3.0, 1.0, (0.6, 1.4))],
        "delta": [storm_result(1.0, 0.1, (0.6, 0.5)), storm_result(1.0, 0.1, (0.6, 0.7))],
    }
    table = compare_table(("main", "delta"), runs)
    assert table.splitlines()[0] == "| figure | main (2 runs) | delta (2 runs) | delta / main |"
    assert row(table, "all live again, s after the restart") == [
        "all live again, s after the restart",
        "2.50 (2.00–3.00)",
        "1.00",
        "0.40",
    ]
    assert row(table, "presence MB")[1:] == ["1.00", "0.10", "0.10"]
    assert row(table, "other replicas CPU s")[1:] == ["1.20 (1.00–1.40)", "0.60 (0.50–0.70)", "0.50"]
    assert row(table, "restarted replica CPU s")[1:] == ["0.60", "0.60", "1.00"]
    assert row(table, "all replicas CPU s")[1:] == ["1.80 (1.60–2.00)", "1.20 (1.10–1.30)", "0.67"]


def test_a_failed_run_is_left_out_and_a_missing_figure_says_so() -> None:
    runs = {"A": [storm_result(2.0, 1.0, (0.5, 0.5)), {"error": "no client connected"}], "B": []}
    table = compare_table(("A", "B"), runs)
    assert table.splitlines()[0] == "| figure | A (1 runs) | B (0 runs) | B / A |"
    assert row(table, "welcome MB")[1:] == ["–", "–", "–"]
    assert summarize([1.0, None, 3.0], 1) == "2.0 (1.0–3.0) [2 of 3]"
