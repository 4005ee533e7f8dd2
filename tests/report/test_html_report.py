"""`safecb report RUN --html` rendered in headless Chromium: every image and plot must load.

Chromium is Debian's `chromium` (the test set-up, `make test`, installs it). Missing, the test fails:
a report nobody checked in a browser is not tested.
"""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest
from typer.testing import CliRunner

from safecb.cli import app
from tests_support import assert_one_line_failure

EXPECTED_IMAGES = {"unsafe_rates.png", "per_category.png", "quality.png", "grid.png", "kappa.png", "movement.png",
                   "patches.png"}


def chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    assert found, "headless Chromium is needed: install Debian's chromium (make test does: apt-get install -y chromium)"
    return found


def render(page: str, *args: str) -> str:
    out = subprocess.run([chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                          "--virtual-time-budget=5000", *args, f"file://{page}"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


@pytest.fixture(scope="module")
def report_page(judged_run):
    _, _, run_dir = judged_run
    result = CliRunner().invoke(app, ["report", str(run_dir), "--html"])
    assert result.exit_code == 0, result.output
    page = run_dir / "report" / "index.html"
    assert result.stdout.strip() == f"{run_dir}/report/index.html" and page.is_file()
    return page


def test_every_image_and_plot_loads_in_chromium(report_page):
    dom = render(str(report_page), "--dump-dom")
    images = re.findall(r"<img [^>]*>", dom)
    sources = {re.search(r'src="([^"]+)"', tag).group(1) for tag in images}
    assert EXPECTED_IMAGES <= sources, sources
    broken = [tag for tag in images if 'data-state="loaded"' not in tag]
    assert not broken, broken


def test_report_shows_judges_audit_and_decision(report_page, judged_run):
    text = report_page.read_text()
    for needle in ("Final codebook: <b>v000", "nudenet 3.", "tiny-clf", "Cohen", "FEMALE_BREAST_EXPOSED",
                   "Per category, judge self", "sexual", "violence", "Codebook diagnostics"):
        assert needle in text, needle


def test_screenshot_is_not_blank(report_page, tmp_path):
    from PIL import Image

    shot = tmp_path / "shot.png"
    render(str(report_page), f"--screenshot={shot}", "--window-size=1100,1600")
    import numpy as np

    image = Image.open(shot).convert("L")
    assert image.size == (1100, 1600)
    assert len(np.unique(np.array(image.resize((64, 64))))) > 10, "the page rendered as a blank screen"


def test_damaged_final_or_metrics_is_one_line(judged_run, tmp_path):
    _, _, run_dir = judged_run
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    (copy / "final.json").write_text("{not json")
    assert_one_line_failure(CliRunner().invoke(app, ["report", str(copy), "--html"]), "final.json: damaged")
    assert_one_line_failure(CliRunner().invoke(app, ["report", str(copy)]), "final.json: damaged")
    (copy / "metrics.jsonl").write_text('{"iteration": 0}\n{torn\n')
    assert_one_line_failure(CliRunner().invoke(app, ["report", str(copy), "--html"]), "metrics.jsonl", "line 2")


def test_report_of_a_run_on_s3(judged_run, s3_server, s3_bucket):
    import json

    import s3fs

    _, _, run_dir = judged_run
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_server["endpoint_url"]}, skip_instance_cache=True)
    fs.put(str(run_dir), f"{s3_bucket}/runs/r1", recursive=True)
    options = json.dumps({"client_kwargs": {"endpoint_url": s3_server["endpoint_url"]}})
    result = CliRunner().invoke(app, ["report", f"s3://{s3_bucket}/runs/r1", "--html", "--storage-options", options])
    assert result.exit_code == 0, result.output
    written = {p.rsplit("/", 1)[-1] for p in fs.ls(f"{s3_bucket}/runs/r1/report", refresh=True)}
    assert {"index.html", *EXPECTED_IMAGES} <= written


def test_images_command_writes_the_grid(judged_run, tmp_path):
    from PIL import Image

    _, rows, run_dir = judged_run
    out = tmp_path / "grid.png"
    result = CliRunner().invoke(app, ["images", str(run_dir), "--version", "1", "--out", str(out)])
    assert result.exit_code == 0, result.output
    two_versions = Image.open(out).size
    CliRunner().invoke(app, ["images", str(run_dir), "--version", "0", "--out", str(out), "--per-split", "1"])
    one_version = Image.open(out).size
    assert two_versions[0] > one_version[0] and two_versions[1] > one_version[1]
    assert_one_line_failure(CliRunner().invoke(app, ["images", str(run_dir), "--version", "9", "--out", str(out)]),
                            "no codebook version(s) [9]")
