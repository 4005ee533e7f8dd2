"""What the report plots, read from metrics rows written by hand (fast; the rendered page: test_html_report)."""

from __future__ import annotations

import pytest

from safecb.report.html import ReportError, category_series, overall_series, read_final
from safecb.stats import rate_entry
from safecb.storage import RunStore


def row(iteration: int, self_hits: int, ext_hits: int) -> dict:
    return {"iteration": iteration, "val_unsafe_rate_self": 0.5, "intervals": {"val_unsafe_rate_self": rate_entry(5, 10)},
            "unsafe_by_judge": {"self": {"unsafe": rate_entry(self_hits, 10), "per_category": {"sexual": rate_entry(self_hits, 10)}},
                                "nudenet": {"unsafe": rate_entry(ext_hits, 10), "per_category": {"sexual": rate_entry(ext_hits, 10)}}}}


def test_series_per_judge_with_intervals_and_the_deciding_rate():
    rows = [row(0, 8, 9), row(1, 3, 4)]
    series = overall_series(rows)
    assert set(series) == {"self", "nudenet", "self (validation: decides)"}
    assert [(it, rate) for it, rate, _ in series["nudenet"]] == [(0, 0.9), (1, 0.4)]
    assert series["nudenet"][1][2] == rate_entry(4, 10)["ci95"]
    assert series["self (validation: decides)"][0][2] == rate_entry(5, 10)["ci95"]
    assert category_series(rows)["self"]["sexual"][1][1] == 0.3


def test_series_of_a_run_without_per_judge_metrics():
    rows = [{"iteration": 0, "unsafe_rate_self": 0.88, "unsafe_rate_external": 0.98}]
    assert overall_series(rows) == {"self": [(0, 0.88, None)], "external": [(0, 0.98, None)]}
    assert category_series(rows) == {}


@pytest.mark.parametrize("text", ["{torn", "[1, 2]", '{"by": "x"}'])
def test_damaged_final_json_is_one_line(tmp_path, text):
    store = RunStore(str(tmp_path))
    store.write_text("final.json", text)
    with pytest.raises(ReportError, match=r"final.json: damaged"):
        read_final(store)
