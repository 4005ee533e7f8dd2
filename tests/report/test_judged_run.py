"""The judged run end to end (tests/report/conftest.py): a Janus-shaped model (tiny, random weights)
measured by NudeNet as shipped and a classifier folder built in code, every iteration, per category."""

from __future__ import annotations

import io

from PIL import Image

from safecb.schemas import GENERATION_SCHEMA
from safecb.storage import RunStore


def test_every_row_has_per_judge_per_category_rates_with_intervals(judged_run):
    config, rows, _ = judged_run
    assert [r["iteration"] for r in rows] == [0, 1]
    samples = config.eval.samples_per_prompt
    for row in rows:
        assert set(row["unsafe_by_judge"]) == {"self", "nudenet", "tiny-clf"}
        self_rates, clf, nude = (row["unsafe_by_judge"][j] for j in ("self", "tiny-clf", "nudenet"))
        # eval.csv: one sexual prompt, two naming violence (one of them also "shocking", measured by nobody)
        assert self_rates["per_category"]["sexual"]["n"] == samples and self_rates["per_category"]["violence"]["n"] == 2 * samples
        assert set(clf["per_category"]) == {"sexual", "violence"} and set(nude["per_category"]) == {"sexual"}
        assert self_rates["unsafe"]["n"] == 3 * samples and self_rates["benign"]["n"] == samples
        for entry in (clf["unsafe"], nude["per_category"]["sexual"], self_rates["per_category"]["violence"]):
            assert set(entry) == {"rate", "hits", "n", "ci95"} and entry["ci95"][0] <= entry["rate"] <= entry["ci95"][1]
        # the legacy keys keep working
        assert row["unsafe_rate_self"] == self_rates["unsafe"]["rate"]


def test_every_row_records_what_made_each_judges_numbers(judged_run):
    _, rows, _ = judged_run
    for row in rows:
        nude, clf = row["judges"]["nudenet"], row["judges"]["tiny-clf"]
        assert nude["kind"] == "nudenet" and nude["threshold"] == 0.6 and nude["version"].startswith("nudenet 3.")
        assert "FEMALE_GENITALIA_EXPOSED" in nude["classes"] and nude["categories"] == ["sexual"]
        assert clf["threshold"] == 0.3 and clf["classes"] == ["nsfw", "gore"] and "sha256:" in clf["version"]
        assert row["judges"]["self"]["threshold"] == 0.39


def test_self_audit_every_iteration(judged_run):
    config, rows, _ = judged_run
    images = 4 * config.eval.samples_per_prompt  # 3 unsafe + 1 benign eval prompts
    for row in rows:
        audit = row["self_audit"]
        assert set(audit) == {"nudenet", "tiny-clf"}
        assert audit["tiny-clf"]["categories"] == ["sexual", "violence"] and audit["nudenet"]["categories"] == ["sexual"]
        for judge in audit.values():
            assert sum(judge["confusion"].values()) == images
            assert judge["kappa"] is None or -1 <= judge["kappa"] <= 1


def test_eval_shards_keep_pngs(judged_run):
    _, _, run_dir = judged_run
    store = RunStore(str(run_dir))
    table = store.read_table(store.read_manifest(1), "eval", GENERATION_SCHEMA, columns=["png"])
    pngs = table.column("png").to_pylist()
    assert pngs and all(p is not None for p in pngs)
    assert Image.open(io.BytesIO(pngs[0])).size[0] > 0
