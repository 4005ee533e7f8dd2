"""Eval images of a run, decoded with any codebook version, as one labelled grid PNG.

The eval tokens are drawn once, in iteration 0 (the generator never reads the codebook), so the
same prompt and seed can be decoded with v0 and with any later version: the grid shows exactly what
the codebook changed. Unsafe prompts on the left, benign ones on the right; one column per version;
each image framed by the self-judge's verdict for that version when the run evaluated it (red:
unsafe, green: safe, grey: not evaluated).
"""

from __future__ import annotations

import io
import json
import textwrap
from dataclasses import dataclass

import torch


EVAL_KIND = "eval"  # the test split's eval shards (reported, never used to decide)
CELL_MIN = 96  # pixels: small world images are enlarged (nearest neighbour) to at least this
FRAME = 3
COLOURS = {"unsafe": (200, 40, 40), "safe": (40, 150, 60), None: (170, 170, 170)}


class ImagesError(ValueError):
    """The grid cannot be made as asked (no eval images, an unknown prompt id or version). One line."""


@dataclass
class EvalSamples:
    """The first sample of each selected eval prompt: ids, texts, categories, splits, tokens (P, N)."""

    prompt_ids: list[str]
    texts: list[str]
    categories: list[str | None]
    splits: list[str]  # "unsafe" | "benign"
    tokens: torch.Tensor



def default_versions(store) -> list[int]:
    """v0 beside the run's final choice (final.json), else its latest codebook version."""
    versions = store.codebook_versions()
    if not versions:
        raise ImagesError(f"{store.url}: no codebooks (is this a safecb run folder?)")
    chosen = versions[-1]
    if store.exists("final.json"):
        try:
            chosen = int(json.loads(store.read_text("final.json"))["chosen_version"])
        except (ValueError, KeyError, TypeError):
            raise ImagesError(f"{store.url}/final.json: damaged (expected a JSON object with 'chosen_version')") from None
    return sorted({0, chosen})


def eval_samples(store, prompt_ids: list[str] | None = None, per_split: int = 4) -> EvalSamples:
    """Sample 0 of the chosen eval prompts (`prompt_ids`, else the first `per_split` unsafe and benign)."""
    from safecb.prompts import read_prompt_range, snapshot_rows
    from safecb.schemas import GENERATION_SCHEMA

    if not store.has_manifest(0):
        raise ImagesError(f"{store.url}: no finished iteration 0 (expected a safecb run folder)")
    manifest = store.read_manifest(0)
    table = store.read_table(manifest, EVAL_KIND, GENERATION_SCHEMA, columns=["prompt_id", "prompt", "sample_index",
                                                                               "tokens"]) if manifest.shards.get(EVAL_KIND) else None
    if table is None or table.num_rows == 0:
        raise ImagesError(f"{store.url}/iter=0000: no eval images")
    snapshot = read_prompt_range(store, EVAL_KIND, 0, snapshot_rows(store, EVAL_KIND))
    split_of = {p.prompt_id: ("benign" if "benign" in (p.split or "") else "unsafe") for p in snapshot}
    category_of = {p.prompt_id: p.category for p in snapshot}
    first = {}
    columns = {c: table.column(c).to_pylist() for c in ("prompt_id", "prompt", "sample_index")}
    for row, (pid, k) in enumerate(zip(columns["prompt_id"], columns["sample_index"])):
        if k == 0 and pid not in first:
            first[pid] = row
    if prompt_ids:
        unknown = [p for p in prompt_ids if p not in first]
        if unknown:
            raise ImagesError(f"{store.url}: eval prompt ids {unknown[:5]} not in the run (e.g. {list(first)[:3]})")
        chosen = list(prompt_ids)
    else:
        ordered = list(first)
        chosen = (_spread([p for p in ordered if split_of.get(p) == "unsafe"], category_of, per_split)
                  + [p for p in ordered if split_of.get(p) == "benign"][:per_split])
    from safecb.stages import token_matrix

    tokens = token_matrix(table.column("tokens"), len(table.column("tokens")[0]))  # (R, N)
    rows = [first[p] for p in chosen]
    return EvalSamples(chosen, [columns["prompt"][r] for r in rows], [category_of.get(p) for p in chosen],
                       [split_of.get(p, "unsafe") for p in chosen], tokens[rows])


def _spread(prompt_ids: list[str], category_of: dict[str, str | None], count: int) -> list[str]:
    """`count` ids taking each category in turn (first of each, then second of each ...), in run order."""
    by_category: dict[str | None, list[str]] = {}
    for pid in prompt_ids:
        by_category.setdefault(category_of.get(pid), []).append(pid)
    picked: list[str] = []
    for depth in range(max((len(v) for v in by_category.values()), default=0)):
        picked += [ids[depth] for ids in by_category.values() if depth < len(ids)]
    return [pid for pid in prompt_ids if pid in set(picked[:count])]


def self_verdicts(store, version: int, prompt_ids: list[str]) -> dict[str, bool]:
    """The self-judge's verdict on sample 0 of each prompt, from the eval shards of the iteration that
    evaluated `version` (iteration t evaluates v_t); {} when no finished iteration did."""
    from safecb.schemas import GENERATION_SCHEMA

    if not store.has_manifest(version):
        return {}
    manifest = store.read_manifest(version)
    if manifest.codebook_version != version or not manifest.shards.get(EVAL_KIND):
        return {}
    table = store.read_table(manifest, EVAL_KIND, GENERATION_SCHEMA, columns=["prompt_id", "sample_index", "unsafe"])
    wanted = set(prompt_ids)
    return {p: bool(u) for p, k, u in zip(*(table.column(c).to_pylist() for c in ("prompt_id", "sample_index", "unsafe")))
            if k == 0 and p in wanted}


def load_run_model(store):
    """The model that made the run, from the `model`, `categories` and `seed` of its config.yaml (only
    those: a run folder written by an older safecb still decodes)."""
    import yaml
    from pydantic import ValidationError

    from safecb.config import ModelConfig, RunConfig
    from safecb.models.registry import load_model

    where = f"{store.url}/config.yaml"
    try:
        data = yaml.safe_load(store.read_text("config.yaml")) or {}
        defaults = RunConfig()
        model = ModelConfig.model_validate(data.get("model") or {})
        categories = list(data.get("categories") or defaults.categories)
        seed = int(data.get("seed", defaults.seed))
    except (yaml.YAMLError, ValidationError, AttributeError, TypeError, ValueError) as err:
        raise ImagesError(f"{where}: cannot read the run's model section ({type(err).__name__})") from None
    return load_model(model, categories, seed)


@torch.no_grad()
def decode_with(model, store, tokens: torch.Tensor, version: int) -> torch.Tensor:
    """tokens (P, N) decoded with codebook `version` of the run → (P, 3, H, W) in [0, 1] on the CPU."""
    if version not in store.codebook_versions():
        raise ImagesError(f"{store.url}: no codebook v{version:04d} (have {store.codebook_versions()})")
    tensors, _ = store.read_codebook(version)
    return torch.cat([model.decode(tokens[i:i + 64], tensors["codebook"]).float().cpu()
                      for i in range(0, tokens.shape[0], 64)]) if tokens.shape[0] else torch.zeros(0, 3, 1, 1)


def grid_image(samples: EvalSamples, images: dict[int, torch.Tensor], verdicts: dict[int, dict[str, bool]],
               version_names: dict[int, str] | None = None):
    """A labelled PIL image: unsafe prompts | benign prompts, one column per version, one row per prompt."""
    from PIL import Image, ImageDraw, ImageFont

    from safecb.judges.base import to_uint8_hwc

    versions = sorted(images)
    side = next(iter(images.values())).shape[-1]
    scale = max(1, -(-CELL_MIN // side))
    cell = side * scale + 2 * FRAME
    font = ImageFont.load_default(size=12)
    label_w, head_h, gap = 190, 34, 24
    panels = [[i for i, s in enumerate(samples.splits) if s == split] for split in ("unsafe", "benign")]
    panels = [(name, rows) for name, rows in zip(("unsafe prompts", "benign prompts"), panels) if rows]
    rows_max = max(len(rows) for _, rows in panels)
    panel_w = label_w + len(versions) * (cell + 4)
    canvas = Image.new("RGB", (len(panels) * panel_w + (len(panels) - 1) * gap + 8, head_h + rows_max * (cell + 4) + 8),
                       "white")
    draw = ImageDraw.Draw(canvas)
    pictures = {v: to_uint8_hwc(images[v]) for v in versions}
    for p, (title, rows) in enumerate(panels):
        x0 = 4 + p * (panel_w + gap)
        draw.text((x0, 2), title, fill="black", font=font)
        for c, v in enumerate(versions):
            name = (version_names or {}).get(v, f"v{v:04d}")
            draw.text((x0 + label_w + c * (cell + 4), 18), name, fill="black", font=font)
        for r, i in enumerate(rows):
            y = head_h + r * (cell + 4)
            lines = textwrap.wrap(samples.texts[i], 28, max_lines=3, placeholder=" ...")
            if samples.categories[i]:
                lines.append(f"[{samples.categories[i]}]")
            draw.multiline_text((x0, y + 4), "\n".join(lines), fill="black", font=font, spacing=2)
            for c, v in enumerate(versions):
                verdict = verdicts.get(v, {}).get(samples.prompt_ids[i])
                colour = COLOURS[None if verdict is None else ("unsafe" if verdict else "safe")]
                x = x0 + label_w + c * (cell + 4)
                draw.rectangle([x, y, x + cell - 1, y + cell - 1], fill=colour)
                picture = Image.fromarray(pictures[v][i]).resize((side * scale, side * scale), Image.NEAREST)
                canvas.paste(picture, (x + FRAME, y + FRAME))
    return canvas


def make_grid(store, versions: list[int] | None = None, prompt_ids: list[str] | None = None, per_split: int = 4,
              model=None):
    """The grid of a run (PIL image): `versions` default to v0 and the final choice (else the latest)."""
    versions = sorted(set(versions)) if versions else default_versions(store)
    missing = [v for v in versions if v not in store.codebook_versions()]
    if missing:
        raise ImagesError(f"{store.url}: no codebook version(s) {missing} (have {store.codebook_versions()})")
    samples = eval_samples(store, prompt_ids, per_split)
    model = model if model is not None else load_run_model(store)
    images = {v: decode_with(model, store, samples.tokens, v) for v in versions}
    verdicts = {v: self_verdicts(store, v, samples.prompt_ids) for v in versions}
    names = _version_names(store, versions)
    return grid_image(samples, images, verdicts, names)


def _version_names(store, versions: list[int]) -> dict[int, str]:
    chosen = None
    if store.exists("final.json"):
        try:
            chosen = json.loads(store.read_text("final.json")).get("chosen_version")
        except (ValueError, AttributeError):
            chosen = None
    return {v: f"v{v:04d}" + (" (untreated)" if v == 0 else " (final)" if v == chosen else "") for v in versions}


def write_png(image, out: str, storage_options: dict | None = None) -> None:
    """Save a PIL image to a local path or fsspec URL in one write (nothing half-written on failure)."""
    import fsspec

    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=True)
    # The run's storage options are for object stores: a plain local path takes none.
    fs, path = fsspec.core.url_to_fs(out, **(storage_options or {} if "://" in out else {}))
    if "file" in (fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,)):
        import os
        import tempfile

        folder = os.path.dirname(os.path.abspath(path)) or "."
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, suffix=".png.tmp")
        with os.fdopen(fd, "wb") as handle:
            handle.write(buffer.getvalue())
        os.replace(tmp, path)
    else:
        fs.pipe_file(path, buffer.getvalue())
