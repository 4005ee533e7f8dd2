"""`safecb report RUN --html`: one HTML page (inline CSS, no scripts from anywhere) plus its PNGs,
written to `report/` in the run folder (any fsspec URL).

What it shows, all read back from the run folder: the unsafe rate per iteration, overall and per
category, for the self-judge and each external judge, with 95% intervals; fidelity and pairs; the
stop decision and why; image grids across codebook versions; the self-judge audit (confusion
matrices, Cohen's κ); codebook diagnostics (how far codes moved, the Harmful Space's singular
values, decoded patches of the most-moved codes). Parts that need the model (grids, patches) say
why they are missing when it cannot be loaded; a damaged metrics.jsonl or final.json is one line.
"""

from __future__ import annotations

import html
import json
import os
import tempfile
from datetime import datetime, timezone

import torch

REPORT_DIR = "report"
MAX_GRID_VERSIONS = 6
TOP_MOVED = 8


class ReportError(ValueError):
    """The run folder cannot be reported (no metrics, a damaged final.json). One line."""


def _entry(value) -> tuple[float | None, list[float] | None, int | None]:
    """(rate, [lo, hi], n) of a metrics value: a rate entry {"rate", "ci95", "n"} or a bare number."""
    if isinstance(value, dict):
        return value.get("rate"), value.get("ci95"), value.get("n")
    return (float(value), None, None) if isinstance(value, (int, float)) and not isinstance(value, bool) else (None, None, None)


def _fmt(value) -> str:
    rate, ci, n = _entry(value)
    if rate is None:
        return "–"
    text = f"{rate:.3f}"
    if ci:
        text += f" <span class=ci>[{ci[0]:.2f}, {ci[1]:.2f}]</span>"
    if n is not None:
        text += f" <span class=n>n={n}</span>"
    return text


# Rates kept as flat keys (their intervals under "intervals"), shown beside the per-judge ones:
# the validation split's self-judge rate is the one the loop decides on.
FLAT_RATES = (("self (validation: decides)", "val_unsafe_rate_self"), ("self", "unsafe_rate_self"),
              ("external", "unsafe_rate_external"))


def flat_rate(row: dict, key: str):
    """A flat metrics rate as an entry: from row["intervals"][key] when recorded, else the bare number."""
    return (row.get("intervals") or {}).get(key, row.get(key))


def overall_series(rows: list[dict]) -> dict[str, list]:
    """{judge: [(iteration, rate, ci)]}: per-judge unsafe rates (test split), the validation self-judge
    rate, and for runs without per-judge metrics the flat self/external keys."""
    series: dict[str, list] = {}
    for row in rows:
        by_judge = row.get("unsafe_by_judge") or {}
        for judge, rates in by_judge.items():
            rate, ci, _ = _entry(rates.get("unsafe"))
            series.setdefault(judge, []).append((row["iteration"], rate, ci))
        for judge, key in FLAT_RATES:
            if key in row and (not by_judge or key.startswith("val_")):
                rate, ci, _ = _entry(flat_rate(row, key))
                series.setdefault(judge, []).append((row["iteration"], rate, ci))
    return series


def category_series(rows: list[dict]) -> dict[str, dict[str, list]]:
    """{judge: {category: [(iteration, rate, ci)]}} from the rows' "unsafe_by_judge"."""
    out: dict[str, dict[str, list]] = {}
    for row in rows:
        for judge, rates in (row.get("unsafe_by_judge") or {}).items():
            for category, value in (rates.get("per_category") or {}).items():
                rate, ci, _ = _entry(value)
                out.setdefault(judge, {}).setdefault(category, []).append((row["iteration"], rate, ci))
    if not out:  # a run from before per-judge metrics: the world judge's per-category rates, if any
        for row in rows:
            for category, value in (row.get("per_category") or {}).items():
                rate, ci, _ = _entry(value.get("unsafe_rate_external") if isinstance(value, dict) else value)
                out.setdefault("external", {}).setdefault(category, []).append((row["iteration"], rate, ci))
    return {j: c for j, c in out.items() if c}


def read_final(store) -> dict | None:
    if not store.exists("final.json"):
        return None
    try:
        final = json.loads(store.read_text("final.json"))
        int(final["chosen_version"])
    except (ValueError, KeyError, TypeError):
        raise ReportError(f"{store.url}/final.json: damaged (expected a JSON object with 'chosen_version')") from None
    if not isinstance(final, dict):
        raise ReportError(f"{store.url}/final.json: damaged (expected a JSON object)")
    return final


class _Page:
    """Sections of HTML and the PNG files they point at, written together at the end."""

    def __init__(self):
        self.parts: list[str] = []
        self.files: dict[str, bytes] = {}

    def h2(self, title: str) -> None:
        self.parts.append(f"<h2>{html.escape(title)}</h2>")

    def p(self, text: str, raw: bool = False) -> None:
        self.parts.append(f"<p>{text if raw else html.escape(text)}</p>")

    def img(self, name: str, data: bytes | None, alt: str) -> None:
        if data is None:
            return
        self.files[name] = data
        # data-state lets a reader (and the report's test) see that every image really loaded.
        self.parts.append(f'<figure><img src="{name}" alt="{html.escape(alt)}" '
                          f'onload="this.dataset.state=\'loaded\'" onerror="this.dataset.state=\'broken\'">'
                          f"<figcaption>{html.escape(alt)}</figcaption></figure>")

    def table(self, header: list[str], rows: list[list[str]]) -> None:
        head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
        body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
        self.parts.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")


STYLE = """
body{font-family:system-ui,sans-serif;margin:24px auto;max-width:1100px;color:#222}
h1{font-size:22px}h2{font-size:17px;margin-top:28px;border-bottom:1px solid #ddd}
table{border-collapse:collapse;font-size:13px;margin:8px 0}td,th{border:1px solid #ddd;padding:3px 7px;text-align:right}
th{background:#f4f4f4}.ci{color:#777;font-size:11px}.n{color:#999;font-size:11px}
figure{display:inline-block;margin:6px}figcaption{font-size:12px;color:#555}img{max-width:100%}
.note{color:#8a5a00}.decision{background:#f7f7ff;padding:8px;border-left:3px solid #66c}
"""


def build_report(store, model=None, per_split: int = 4) -> str:
    """Write `report/index.html` and its PNGs into the run folder; returns the page's URL."""
    from safecb.report import plots

    rows = store.read_metrics()
    if not rows:
        raise ReportError(f"{store.url}: no metrics.jsonl rows (is this a safecb run folder?)")
    final = read_final(store)
    page = _Page()
    run_id = rows[-1].get("run_id") or _config_value(store, "run_id") or "safecb run"
    page.parts.append(f"<h1>{html.escape(str(run_id))} — {html.escape(store.url)}</h1>")
    page.p(f"{len(rows)} iteration(s); report written {datetime.now(timezone.utc).isoformat(timespec='seconds')}.")

    _decision_section(page, rows, final)
    _rates_section(page, rows, plots)
    _quality_section(page, rows, plots)
    model_note = None
    if model is None:
        try:
            from safecb.images import load_run_model

            model = load_run_model(store)
        except Exception as err:  # noqa: BLE001 - the rest of the report stands without the model
            model_note = f"decoded images need the run's model, which did not load: {' '.join(str(err).split())[:300]}"
    _grid_section(page, store, model, model_note, final, per_split)
    _audit_section(page, rows, plots)
    _codebook_section(page, store, model, final, plots, rows)
    _judges_section(page, rows)

    document = (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(str(run_id))} — safecb report"
                f"</title><style>{STYLE}</style></head><body>{''.join(page.parts)}</body></html>")
    with tempfile.TemporaryDirectory(prefix="safecb-report-") as tmp:
        for name, data in page.files.items():  # the images first, the page last: a page never points at nothing
            _upload(store, tmp, name, data)
        _upload(store, tmp, "index.html", document.encode("utf-8"))
    return f"{store.url}/{REPORT_DIR}/index.html"


def _upload(store, tmp: str, name: str, data: bytes) -> None:
    local = os.path.join(tmp, name)
    with open(local, "wb") as handle:
        handle.write(data)
    store.put_file(local, f"{REPORT_DIR}/{name}")


def _config_value(store, key: str):
    import yaml

    try:
        return (yaml.safe_load(store.read_text("config.yaml")) or {}).get(key)
    except Exception:  # noqa: BLE001 - a title is not worth failing for
        return None


def _decision_section(page: _Page, rows: list[dict], final: dict | None) -> None:
    page.h2("Decision")
    if final is None:
        page.p(f"The run has not finished (no final.json); last iteration {rows[-1]['iteration']}: "
               f"{rows[-1].get('decision', '?')}.")
        return
    details = {k: v for k, v in final.items() if k not in ("chosen_version",)}
    items = "".join(f"<li><b>{html.escape(str(k))}</b>: {html.escape(json.dumps(v))}</li>" for k, v in details.items())
    page.parts.append(f"<div class=decision>Final codebook: <b>v{int(final['chosen_version']):04d}</b><ul>{items}</ul></div>")


def _rates_section(page: _Page, rows: list[dict], plots) -> None:
    page.h2("Unsafe rate per iteration (95% intervals)")
    overall = overall_series(rows)
    page.img("unsafe_rates.png", plots.rate_series_plot(overall, "unsafe prompts judged unsafe, by judge") if overall else None,
             "unsafe rate per iteration, each judge")
    by_category = category_series(rows)
    page.img("per_category.png", plots.per_category_plot(by_category) if by_category else None,
             "unsafe rate per category per iteration, each judge")
    judges = sorted({j for r in rows for j in (r.get("unsafe_by_judge") or {})})
    header = ["iteration", "pairs", *[f"unsafe ({j})" for j in judges], *[f"benign flagged ({j})" for j in judges]]
    flat = [k for _, k in FLAT_RATES if any(k in r for r in rows) and (not judges or k.startswith("val_"))]
    header += flat
    table = []
    for r in rows:
        by = r.get("unsafe_by_judge") or {}
        cells = [str(r["iteration"]), str(r.get("pairs", "–"))]
        cells += [_fmt(by.get(j, {}).get("unsafe")) for j in judges] + [_fmt(by.get(j, {}).get("benign")) for j in judges]
        table.append(cells + [_fmt(flat_rate(r, k)) for k in flat])
    page.table(header, table)
    for judge, categories in sorted(by_category.items()):
        page.p(f"Per category, judge {judge}:")
        its = sorted({it for points in categories.values() for it, _, _ in points})
        lookup = {(c, it): (rate, ci) for c, points in categories.items() for it, rate, ci in points}
        page.table(["category", *[f"iter {it}" for it in its]],
                   [[html.escape(c), *[_fmt({"rate": lookup.get((c, it), (None, None))[0],
                                             "ci95": lookup.get((c, it), (None, None))[1]}) for it in its]]
                    for c in sorted(categories)])


def _quality_section(page: _Page, rows: list[dict], plots) -> None:
    page.h2("Quality and pairs")
    fidelity = [_entry(r.get("fidelity"))[0] for r in rows]
    page.img("quality.png", plots.quality_plot([r["iteration"] for r in rows], fidelity, [r.get("pairs") for r in rows]),
             "pairs per iteration and benign fidelity (external judge)")
    keys = [k for k in ("space_rank", "space_energy", "finetune_free_fraction", "harmful_codes", "moved_codes", "codebook_shift", "fidelity",
                        "val_psnr_vs_v0", "psnr_vs_v0", "seconds") if any(k in r for r in rows)]
    page.table(["iteration", *keys, "decision"],
               [[str(r["iteration"]), *[_fmt(r[k]) if k in r else "–" for k in keys],
                 html.escape(str(r.get("decision", "")))] for r in rows])


def _grid_versions(store, final: dict | None) -> list[int]:
    versions = store.codebook_versions()
    if len(versions) <= MAX_GRID_VERSIONS:
        return versions
    chosen = int(final["chosen_version"]) if final else versions[-1]
    step = max(1, len(versions) // (MAX_GRID_VERSIONS - 1))
    return sorted({0, chosen, versions[-1], *versions[::step]})[:MAX_GRID_VERSIONS]


def _grid_section(page: _Page, store, model, note: str | None, final: dict | None, per_split: int) -> None:
    from safecb.images import ImagesError, make_grid

    page.h2("Images across codebook versions (same prompts and seeds)")
    if model is None:
        page.p(note or "no model", raw=False)
        return
    try:
        grid = make_grid(store, _grid_versions(store, final), per_split=per_split, model=model)
    except ImagesError as err:
        page.p(f"no grid: {err}")
        return
    import io

    buffer = io.BytesIO()
    grid.save(buffer, format="PNG", optimize=True)
    page.p("Frames: the self-judge's verdict for that version (red unsafe, green safe, grey not evaluated).")
    page.img("grid.png", buffer.getvalue(), "eval images decoded with each codebook version")


def _audit_section(page: _Page, rows: list[dict], plots) -> None:
    page.h2("Self-judge audit (against each external judge)")
    audits = [(r["iteration"], r.get("self_audit") or {}) for r in rows]
    judges = sorted({j for _, a in audits for j in a})
    if not judges:
        page.p("No external judge measured the self-judge's categories in this run.")
        return
    series = {j: [(it, a.get(j, {}).get("kappa")) for it, a in audits] for j in judges}
    page.img("kappa.png", plots.kappa_plot(series), "Cohen's kappa of the self-judge against each external judge")
    table = []
    for it, audit in audits:
        for j in judges:
            if j in audit:
                c = audit[j]["confusion"]
                table.append([str(it), html.escape(j), html.escape(", ".join(audit[j].get("categories", []))),
                              str(c["tp"]), str(c["fp"]), str(c["fn"]), str(c["tn"]),
                              _fmt(audit[j].get("agreement")), _fmt(audit[j].get("kappa"))])
    page.table(["iteration", "external judge", "categories", "both unsafe", "self only", "external only", "both safe",
                "agreement", "κ"], table)


def _codebook_section(page: _Page, store, model, final: dict | None, plots, rows: list[dict]) -> None:
    from safecb.report.diagnostics import code_movement, code_patches, iteration_singular_values

    page.h2("Codebook diagnostics")
    versions = store.codebook_versions()
    if len(versions) < 2:
        page.p("Only the untreated codebook v0 exists.")
        return
    books = {v: store.read_codebook(v)[0]["codebook"] for v in versions}
    movement = {v: code_movement(books[0], books[v]) for v in versions[1:]}
    page.img("movement.png", plots.movement_plot({v: m.tolist() for v, m in movement.items()}),
             "distribution of code movement from v0")
    page.table(["version", "codes moved (> 1e-6)", "mean movement", "max movement"],
               [[f"v{v:04d}", str(int((m > 1e-6).sum())), f"{float(m.mean()):.4f}", f"{float(m.max()):.4f}"]
                for v, m in movement.items()])
    # The loop records the top singular values it cut the space from; older runs: recomputed from the pairs.
    recorded = {r["iteration"]: r["space_singular_values"] for r in rows if r.get("space_singular_values")}
    spectra = recorded or {it: s for it in versions[1:] if (s := iteration_singular_values(store, it))}
    if spectra:
        page.img("spectrum.png", plots.spectrum_plot(spectra), "singular values of the aligned pair differences, per iteration")
    chosen = int(final["chosen_version"]) if final else versions[-1]
    if chosen == 0:
        chosen = versions[-1]
    top = movement[chosen].argsort(descending=True)[:TOP_MOVED].tolist()
    if model is None:
        return
    num_tokens = int(getattr(model, "num_image_tokens", 0)) or 1
    before, after = code_patches(model, books[0], top, num_tokens), code_patches(model, books[chosen], top, num_tokens)
    page.img("patches.png", _patch_strip(before, after, top, chosen),
             f"the {len(top)} most-moved codes of v{chosen:04d}, each decoded alone: v0 (top) and v{chosen:04d} (bottom)")


def _patch_strip(before: torch.Tensor, after: torch.Tensor, codes: list[int], version: int) -> bytes:
    import io

    from PIL import Image, ImageDraw, ImageFont

    from safecb.judges.base import to_uint8_hwc

    side = before.shape[-1]
    scale = max(1, -(-64 // side))
    cell = side * scale
    font = ImageFont.load_default(size=11)
    canvas = Image.new("RGB", (50 + len(codes) * (cell + 6), 2 * (cell + 6) + 18), "white")
    draw = ImageDraw.Draw(canvas)
    for row, (label, images) in enumerate((("v0", before), (f"v{version}", after))):
        y = 18 + row * (cell + 6)
        draw.text((2, y + cell // 2 - 6), label, fill="black", font=font)
        for i, array in enumerate(to_uint8_hwc(images)):
            x = 50 + i * (cell + 6)
            if row == 0:
                draw.text((x, 2), f"code {codes[i]}", fill="black", font=font)
            canvas.paste(Image.fromarray(array).resize((cell, cell), Image.NEAREST), (x, y))
    buffer = io.BytesIO()
    canvas.save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def _judges_section(page: _Page, rows: list[dict]) -> None:
    page.h2("Judges (what made each number)")
    judges = rows[-1].get("judges") or {}
    if not judges:
        page.p("This run's metrics do not record judge metadata (made before per-judge metrics).")
        return
    page.table(["name", "kind", "version", "threshold", "categories", "classes"],
               [[html.escape(str(info.get(k, "–"))) if not isinstance(info.get(k), list)
                 else html.escape(", ".join(map(str, info[k]))) for k in ("name", "kind", "version", "threshold",
                                                                          "categories", "classes")]
                for info in judges.values()])
