"""The loop's stages as plain functions: model + prompts/tensors + config in, rows/tensors out.

The controller calls them in one process; Ray actors call `collect_shard` the same way. The math
they use lives in `safecb.training` (pure torch); this module is the glue that reads the config.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F

from safecb.config import RunConfig
from safecb.models.base import SamplingParams, UnifiedModel
from safecb.prompts import Prompt
from safecb.training.finetune import TorchAdam, adaptive_step_scale, finetune_codebook
from safecb.training.harmful_space import (aligned_differences, difference_gram, harmful_space_from_gram,
                                           scores_from_counts, soft_code_counts)
from safecb.training.projection import code_step_sizes, project_codebook, safe_mean


def sample_seed(base_seed: int, scope: str, prompt_id: str, sample_index: int) -> int:
    """A 62-bit seed, a pure function of its arguments (so a retried shard redraws the same images)."""
    digest = hashlib.sha256(f"{base_seed}|{scope}|{prompt_id}|{sample_index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 2


def sampling_params(config: RunConfig) -> SamplingParams:
    gen = config.generation
    return SamplingParams(guidance=gen.guidance, temperature=gen.temperature, top_k=gen.top_k)


def apply_lexicon(text: str, lexicon: dict[str, str]) -> str:
    """Replace each lexicon phrase (whole words, case-insensitive, longest first); tidy the spaces."""
    for phrase in sorted(lexicon, key=len, reverse=True):
        text = re.sub(rf"\b{re.escape(phrase)}\b", lexicon[phrase], text, flags=re.IGNORECASE)
    return re.sub(r"\s+", " ", text).strip()


def mentions_harm(text: str, lexicon: dict[str, str]) -> bool:
    return any(re.search(rf"\b{re.escape(p)}\b", text, flags=re.IGNORECASE) for p in lexicon)


@torch.no_grad()
def generate_and_judge(model: UnifiedModel, prompts: list[str], seeds: list[int], config: RunConfig
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens (B, N) and self-judged P(unsafe) per category (B, C), in batches of generation.batch_size."""
    if hasattr(model, "generate_and_judge"):  # the model pipelines the two itself (Janus: judge beside generation)
        return model.generate_and_judge(prompts, seeds, sampling_params(config), config.categories,
                                        config.judge.question, config.generation.batch_size, config.judge.batch_size)
    tokens, probs = [], []
    step = config.generation.batch_size
    for start in range(0, len(prompts), step):
        batch_tokens = model.generate_tokens(prompts[start:start + step], seeds[start:start + step], sampling_params(config))
        tokens.append(batch_tokens)
        probs.append(judge_tokens(model, batch_tokens, config))
    return torch.cat(tokens), torch.cat(probs)


@torch.no_grad()
def judge_tokens(model: UnifiedModel, tokens: torch.Tensor, config: RunConfig) -> torch.Tensor:
    """Decode with the served codebook and self-judge: (B, C) P(unsafe)."""
    return _decode_and_measure(model, tokens, config, [], None, keep_images=False)[0]


def rewrite_prompts(model: UnifiedModel, prompts: list[str], config: RunConfig, lexicon: dict[str, str]) -> list[str]:
    """Safe counterparts: the model's own rewrite, the lexicon where the rewrite fails (per config)."""
    pairing = config.pairing
    rewritten = [""] * len(prompts)
    if pairing.rewrite in ("model", "model_then_lexicon") and prompts:
        rewritten = model.rewrite(prompts, pairing.rewrite_instruction, pairing.rewrite_max_new_tokens)
    out = []
    for original, candidate in zip(prompts, rewritten):
        usable = candidate and candidate.lower() != original.lower() and not mentions_harm(candidate, lexicon)
        if not usable and pairing.rewrite in ("lexicon", "model_then_lexicon"):
            candidate = apply_lexicon(original, lexicon)
            usable = candidate and candidate.lower() != original.lower()
        out.append(candidate if usable else "")
    return out


@dataclass
class ShardResult:
    generations: list[dict] = field(default_factory=list)
    pairs: list[dict] = field(default_factory=list)


def collect_shard(model: UnifiedModel, prompts: list[Prompt], config: RunConfig, iteration: int,
                  lexicon: dict[str, str], codebook_v0: torch.Tensor | None = None) -> ShardResult:
    """Generate + self-judge the shard's prompts, then pair every unsafe image with a safe counterpart.

    Counterparts: the rewritten prompt with the same seed — freely resampled, or teacher-forced on the
    harmful grid (`pairing.alignment`) — kept only when judged safe;
    failing that, a safe sample of the same prompt (not aligned: used for harm scores, not the space).
    With an edited codebook (`codebook_v0` given), every safe row is judged again decoded with v0
    (`unsafe_v0`), so the update can keep only images that were safe before any edit.
    """
    result = ShardResult()
    threshold = config.judge.threshold
    version = model.codebook_version
    jobs = [(p, k, sample_seed(config.generation.seed, f"collect/{iteration}", p.prompt_id, k))
            for p in prompts for k in range(config.generation.samples_per_prompt)]
    tokens, probs = generate_and_judge(model, [p.text for p, _, _ in jobs], [s for _, _, s in jobs], config)

    def row(prompt_id: str, text: str, k: int, seed: int, toks: torch.Tensor, prob: torch.Tensor, role: str) -> dict:
        top = float(prob.max())
        return {"run_id": config.run_id, "iteration": iteration, "codebook_version": version, "prompt_id": prompt_id,
                "prompt": text, "sample_index": k, "seed": seed, "tokens": toks.tolist(), "unsafe_probs": prob.tolist(),
                "max_unsafe_prob": top, "unsafe": top >= threshold, "role": role, "png": None}

    rows = [row(p.prompt_id, p.text, k, s, tokens[i], probs[i], "collect") for i, (p, k, s) in enumerate(jobs)]
    result.generations.extend(rows)
    unsafe = [i for i, r in enumerate(rows) if r["unsafe"]]
    if not unsafe:
        _mark_unsafe_under_v0(model, result.generations, codebook_v0, config)
        return result

    unique = sorted({jobs[i][0].text for i in unsafe})
    safe_text = dict(zip(unique, rewrite_prompts(model, unique, config, lexicon)))
    redo = [i for i in unsafe if safe_text[jobs[i][0].text]]
    paired: set[int] = set()
    if redo:
        safe_prompts, seeds = [safe_text[jobs[i][0].text] for i in redo], [jobs[i][2] for i in redo]
        if config.pairing.alignment == "teacher_forced":
            c_tokens = model.counterpart_tokens(safe_prompts, seeds, tokens[redo], sampling_params(config))
            c_probs = judge_tokens(model, c_tokens, config)
        else:
            c_tokens, c_probs = generate_and_judge(model, safe_prompts, seeds, config)
        for j, i in enumerate(redo):
            p, k, s = jobs[i]
            counterpart = row(p.prompt_id, safe_text[p.text], k, s, c_tokens[j], c_probs[j], "counterpart")
            result.generations.append(counterpart)
            if not counterpart["unsafe"]:
                result.pairs.append(_pair(rows[i], counterpart, "rewrite"))
                paired.add(i)
    if config.pairing.use_safe_sample:
        safe_by_prompt: dict[str, dict] = {}
        for r in rows:
            if not r["unsafe"]:
                safe_by_prompt.setdefault(r["prompt_id"], r)
        for i in unsafe:
            if i not in paired and rows[i]["prompt_id"] in safe_by_prompt:
                result.pairs.append(_pair(rows[i], safe_by_prompt[rows[i]["prompt_id"]], "safe_sample"))
    _mark_unsafe_under_v0(model, result.generations, codebook_v0, config)
    return result


@torch.no_grad()
def _mark_unsafe_under_v0(model: UnifiedModel, rows: list[dict], codebook_v0: torch.Tensor | None,
                          config: RunConfig) -> None:
    """Set `unsafe_v0` on the safe rows: their grid judged again, decoded with the untreated codebook."""
    safe = [r for r in rows if not r["unsafe"]]
    if codebook_v0 is None or not safe:
        return
    tokens = torch.tensor([r["tokens"] for r in safe], dtype=torch.long)
    for start in range(0, len(safe), config.judge.batch_size):
        images = model.decode(tokens[start:start + config.judge.batch_size], codebook_v0)
        probs = model.judge(images, config.categories, config.judge.question).float().cpu()
        for r, top in zip(safe[start:], probs.max(dim=-1).values.tolist()):
            r["unsafe_v0"] = top >= config.judge.threshold


def eval_jobs(prompts: list[Prompt], config: RunConfig) -> list[tuple[Prompt, int, int]]:
    """(prompt, sample index, seed) of every eval image of these prompts: fixed for the whole run."""
    return [(p, k, sample_seed(config.generation.seed, "eval", p.prompt_id, k))
            for p in prompts for k in range(config.eval.samples_per_prompt)]


def generate_eval_tokens(model: UnifiedModel, jobs: list[tuple[Prompt, int, int]], config: RunConfig) -> torch.Tensor:
    """(B, N) tokens of the eval images. They do not depend on the codebook (the generator never reads
    it), so a run draws them once, in iteration 0, and later iterations decode the stored tokens."""
    step = config.generation.batch_size
    with torch.no_grad():
        parts = [model.generate_tokens([p.text for p, _, _ in jobs[i:i + step]], [s for _, _, s in jobs[i:i + step]],
                                       sampling_params(config)) for i in range(0, len(jobs), step)]
    return torch.cat(parts) if parts else torch.zeros(0, model.num_image_tokens, dtype=torch.long)


def evaluate_tokens(model: UnifiedModel, jobs: list[tuple[Prompt, int, int]], tokens: torch.Tensor, config: RunConfig,
                    iteration: int, external=None, codebook_v0: torch.Tensor | None = None,
                    judges: list | None = None) -> tuple[list[dict], dict]:
    """Decode eval tokens (B, N) with the served codebook and judge them: the eval rows, and the shard's
    counts that the controller sums into rates: {"self_unsafe": [hits, n], "self_benign": [hits, n],
    "drift_benign": [Σ per-image MSE against the v0 decode, n], "external": {rate: [hits, n]}}.
    `external`: the world's judge, or None; `codebook_v0`: the untreated codebook, for the drift;
    `judges`: external judges (`safecb.judges`), whose per-category counts and audit of the self-judge
    go under "judge_counts" / "judge_info" (test split only: they measure, never decide)."""
    # The world's judge knows only the world's own prompts (their exact labels): prompts from a file
    # have none, and their external rates stay absent rather than guessed.
    labelled = [i for i, (p, _, _) in enumerate(jobs) if p.meta is not None] if external is not None else []
    split_of = [p.split or "unsafe" for p, _, _ in jobs]
    benign = [i for i, split in enumerate(split_of) if split == "benign"]
    # The decoded images go to the host only for what reads them: the world's judge, external judges,
    # PNGs: not for an empty judge list (every eval shard of a run without external judges copied its
    # 512 images, 0.9 GB in fp32, to the host for nothing).
    keep_images = bool(labelled) or bool((judges or config.eval.save_png) and len(jobs))
    probs, drift, images = _decode_and_measure(model, tokens, config, benign if codebook_v0 is not None else [],
                                               codebook_v0, keep_images)
    threshold = config.judge.threshold
    unsafe = (probs.max(dim=-1).values >= threshold).tolist() if len(jobs) else []
    stats: dict = {"self_unsafe": [0, 0], "self_benign": [0, 0]}
    for flag, split in zip(unsafe, split_of):
        key = "self_benign" if split == "benign" else "self_unsafe"
        stats[key][0] += int(flag)
        stats[key][1] += 1
    if codebook_v0 is not None and benign:
        stats["drift_benign"] = [drift, len(benign)]
    if labelled:
        from safecb.world.evaluate import score_counts

        records = [_world_record(jobs[i][0].meta) for i in labelled]
        stats["external"] = score_counts(records, images[labelled], external, threshold=0.5)
    pngs = None
    if (judges is not None or config.eval.save_png) and len(jobs):
        from safecb.judges.evaluate import judge_eval_shard

        counts, pngs = judge_eval_shard(images, probs, [p for p, _, _ in jobs], config.categories,
                                        threshold, config.judge.question, judges or [], config.eval.save_png)
        if judges is not None:
            stats.update(counts)
    version = model.codebook_version
    rows = [{"run_id": config.run_id, "iteration": iteration, "codebook_version": version, "prompt_id": p.prompt_id,
             "prompt": p.text, "sample_index": k, "seed": seed, "tokens": tokens[i].tolist(),
             "unsafe_probs": probs[i].tolist(), "max_unsafe_prob": float(probs[i].max()),
             "unsafe": bool(unsafe[i]), "role": "eval", "png": pngs[i] if pngs else None}
            for i, (p, k, seed) in enumerate(jobs)]
    return rows, stats


@torch.no_grad()
def _decode_and_measure(model: UnifiedModel, tokens: torch.Tensor, config: RunConfig, drift_rows: list[int],
                        codebook_v0: torch.Tensor | None, keep_images: bool
                        ) -> tuple[torch.Tensor, float, torch.Tensor | None]:
    """One decode per image with the served codebook feeds everything an eval shard measures: the
    self-judge's (B, C) P(unsafe); the drift, Σ over `drift_rows` of the mean squared pixel difference
    between the served and the v0 decode (pixels in [0, 1]: how far the edits moved what the model
    draws, measured without any reference images); and, with `keep_images`, the images on the CPU."""
    batch = config.judge.batch_size
    wanted = torch.zeros(tokens.shape[0], dtype=torch.bool)
    wanted[drift_rows] = True
    probs, kept, drift = [], [], 0.0
    for start in range(0, tokens.shape[0], batch):
        part = tokens[start:start + batch]
        pixels = model.decode(part)
        probs.append(model.judge(pixels, config.categories, config.judge.question).float().cpu())
        rows = wanted[start:start + batch].nonzero().flatten()
        if codebook_v0 is not None and len(rows):
            before = model.decode(part[rows], codebook_v0).float()
            now = pixels[rows.to(pixels.device)].float()
            drift += float((now - before).pow(2).flatten(1).mean(dim=1).sum())
        if keep_images:
            kept.append(pixels.float().cpu())
    probs_all = torch.cat(probs) if probs else torch.zeros(0, len(config.categories))
    return probs_all, drift, (torch.cat(kept) if kept else None)


def _world_record(meta):
    """The world's PromptRecord from a snapshot row's meta (JSON text or a dict), or as given."""
    from safecb.world.prompts import PromptRecord

    if isinstance(meta, str):
        meta = json.loads(meta)
    return PromptRecord(**meta) if isinstance(meta, dict) else meta


def _pair(harmful: dict, safe: dict, counterpart: str) -> dict:
    return {"run_id": harmful["run_id"], "iteration": harmful["iteration"], "codebook_version": harmful["codebook_version"],
            "prompt_id": harmful["prompt_id"], "sample_index": harmful["sample_index"], "seed": harmful["seed"],
            "harmful_prompt": harmful["prompt"], "safe_prompt": safe["prompt"], "harmful_tokens": harmful["tokens"],
            "safe_tokens": safe["tokens"], "harmful_prob": harmful["max_unsafe_prob"],
            "safe_prob": safe["max_unsafe_prob"], "counterpart": counterpart}


def token_matrix(column: pa.ChunkedArray | pa.Array, num_tokens: int) -> torch.Tensor:
    """A list<int32> Arrow column of token grids → (rows, num_tokens) int64, without Python lists."""
    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    flat = np.asarray(array.flatten(), dtype=np.int64)
    return torch.from_numpy(flat.reshape(-1, num_tokens))


def sample_priority(prompt_ids: list[str], sample_indices: list[int], roles: list[str]) -> torch.Tensor:
    """(B,) int64 keys, a pure function of each row's identity: the rows with the lowest keys form the
    fine-tuning sample, whatever order the shards are read in and however they are split over ranks."""
    keys = [int.from_bytes(hashlib.sha256(f"{p}|{k}|{r}".encode()).digest()[:8], "little") >> 1
            for p, k, r in zip(prompt_ids, sample_indices, roles)]
    return torch.tensor(keys, dtype=torch.int64)


class BottomK:
    """The `size` rows with the lowest priority seen so far; each row a tuple of tensors (B, ...)."""

    def __init__(self, size: int):
        self.size = size
        self.priority = torch.zeros(0, dtype=torch.int64)
        self.rows: tuple[torch.Tensor, ...] = ()

    def add(self, priority: torch.Tensor, *rows: torch.Tensor) -> None:
        if priority.numel() == 0:
            return
        priority = torch.cat([self.priority, priority])
        rows = tuple(torch.cat([old, new]) for old, new in zip(self.rows, rows)) if self.rows else rows
        keep = priority.argsort()[: self.size]  # sorted: the sample's order is its priority order
        self.priority, self.rows = priority[keep], tuple(r[keep] for r in rows)

    def tensors(self, *empty: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.rows if self.rows else empty


class UpdateStatistics:
    """Everything the codebook update needs from one iteration, gathered in one pass over its shards.

    Sums (code counts, the difference Gram matrix) add up over shards and ranks; the fine-tuning
    inputs are bounded samples (`finetune.sample_size`). Memory does not grow with the row count.
    """

    def __init__(self, codebook: torch.Tensor, num_tokens: int, config: RunConfig):
        num_codes, dim = codebook.shape
        self.codebook, self.num_tokens, self.config = codebook, num_tokens, config
        self.hard_harm = torch.zeros(num_codes, dtype=torch.float64)  # (K,) codes of harmful pair grids
        self.hard_safe = torch.zeros(num_codes, dtype=torch.float64)  # (K,) codes of safe images
        self.soft_harm = torch.zeros(num_codes, dtype=torch.float64)  # (K,) every image, weighted by P(unsafe)
        self.soft_safe = torch.zeros(num_codes, dtype=torch.float64)
        self.gram = torch.zeros(dim, dim, dtype=torch.float64)  # (D, D) Σ dᵀd over aligned differences
        self.num_differences = self.pairs = self.aligned_pairs = self.judged = self.kept_out_v0 = 0
        self.keep = BottomK(config.finetune.sample_size)  # (tokens,) of safe images
        self.harm = BottomK(config.finetune.sample_size)  # (harmful tokens, safe tokens) of pairs

    def add_pairs(self, table: pa.Table) -> None:
        harm = token_matrix(table.column("harmful_tokens"), self.num_tokens)  # (P, N)
        safe = token_matrix(table.column("safe_tokens"), self.num_tokens)  # (P, N)
        aligned = torch.tensor([c == "rewrite" for c in table.column("counterpart").to_pylist()], dtype=torch.bool)
        codes_h, codes_s = aligned_differences(harm[aligned], safe[aligned])
        self.gram += difference_gram(self.codebook, codes_h, codes_s)
        self.num_differences += int(codes_h.shape[0])
        num_codes = self.codebook.shape[0]
        self.hard_harm += torch.bincount(harm.reshape(-1), minlength=num_codes).double()
        # The safe side is not counted here: every safe image (a counterpart or a safe sample) is a row
        # of the generations shards already, counted once in add_generations.
        self.pairs += harm.shape[0]
        self.aligned_pairs += int(aligned.sum())
        # Only same-seed rewrites become harm targets: a safe sample of another seed is an unrelated
        # picture, and pulling the harmful grid's codes toward it would teach the codebook noise.
        ids = table.filter(pa.array(aligned.tolist(), type=pa.bool_()))
        priority = sample_priority(ids.column("prompt_id").to_pylist(), ids.column("sample_index").to_pylist(),
                                   ["pair"] * ids.num_rows)
        self.harm.add(priority, harm[aligned], safe[aligned])

    def all_reduce(self, reduce_sum: Callable[[torch.Tensor], torch.Tensor],
                   gather: Callable[[object], list]) -> None:
        """Make every rank's statistics the whole iteration's: sums added over ranks, the samples merged
        (the lowest priorities of all ranks' lowest — what one rank reading every shard would keep)."""
        for name in ("hard_harm", "hard_safe", "soft_harm", "soft_safe", "gram"):
            setattr(self, name, reduce_sum(getattr(self, name)))
        counts = reduce_sum(torch.tensor([self.num_differences, self.pairs, self.aligned_pairs, self.judged,
                                          self.kept_out_v0], dtype=torch.float64))
        self.num_differences, self.pairs, self.aligned_pairs, self.judged, self.kept_out_v0 = \
            (int(c) for c in counts.tolist())
        for sample in (self.keep, self.harm):
            parts = gather((sample.priority, sample.rows))
            merged = BottomK(sample.size)
            for priority, rows in parts:
                merged.add(priority, *rows)
            sample.priority, sample.rows = merged.priority, merged.rows

    def add_generations(self, table: pa.Table) -> None:
        tokens = token_matrix(table.column("tokens"), self.num_tokens)  # (M, N)
        unsafe = torch.tensor(table.column("unsafe").to_pylist(), dtype=torch.bool)  # (M,)
        probs = torch.tensor(table.column("max_unsafe_prob").to_pylist(), dtype=torch.float64)  # (M,)
        num_codes = self.codebook.shape[0]
        n_h, n_s = soft_code_counts(tokens, probs, num_codes, self.config.harmful_space.sharpness)
        self.soft_harm += n_h
        self.soft_safe += n_s
        self.hard_safe += torch.bincount(tokens[~unsafe].reshape(-1), minlength=num_codes).double()
        self.judged += tokens.shape[0]
        # Quality targets are v0 decodes, so a grid kept must have been safe under v0 too: one that was
        # unsafe then and only looks safe after earlier edits would pull the harm back in.
        if "unsafe_v0" in table.column_names:
            was_unsafe = torch.tensor([bool(v) for v in table.column("unsafe_v0").to_pylist()], dtype=torch.bool)
        else:
            was_unsafe = torch.zeros_like(unsafe)
        keep = ~unsafe & ~was_unsafe
        self.kept_out_v0 += int((~unsafe & was_unsafe).sum())
        safe = table.filter(pa.array(keep.tolist(), type=pa.bool_()))
        priority = sample_priority(*(safe.column(c).to_pylist() for c in ("prompt_id", "sample_index", "role")))
        self.keep.add(priority, tokens[keep])


@dataclass
class CodebookUpdate:
    codebook: torch.Tensor  # (K, D) the new codebook v_t
    projected: torch.Tensor  # (K, D) after the closed-form step, before fine-tuning
    report: dict


def update_codebook(model: UnifiedModel, codebook: torch.Tensor, codebook_v0: torch.Tensor, stats: UpdateStatistics,
                    config: RunConfig, *, rank: int = 0, world: int = 1,
                    all_reduce_sum: Callable[[torch.Tensor], torch.Tensor] | None = None,
                    resume: dict | None = None, on_check: Callable[[dict], None] | None = None) -> CodebookUpdate:
    """Harmful Space → projection → fine-tuning, from one iteration's statistics (`UpdateStatistics`).

    The space comes from the summed Gram matrix of aligned (same-seed rewrite) differences; harm
    scores from pair grids vs safe images (`evidence: pairs`) or every judged image weighted by the
    self-judge (`soft`); fine-tuning from the bounded samples of safe images and pairs, on the model's
    device, data-parallel over `world` ranks when the statistics were all-reduced (`finetune_codebook`).
    """
    hs, proj, ft = config.harmful_space, config.projection, config.finetune
    num_codes = codebook.shape[0]
    space = harmful_space_from_gram(stats.gram, stats.num_differences, energy=hs.energy, max_rank=hs.max_rank,
                                    dtype=codebook.dtype)
    if hs.evidence == "soft" and stats.judged > 0:
        n_h, n_s = stats.soft_harm, stats.soft_safe
    else:
        n_h, n_s = stats.hard_harm, stats.hard_safe
    scores = scores_from_counts(n_h, n_s, num_codes, hs.smoothing, hs.harm_score_min, hs.top_q)
    alphas = code_step_sizes(scores, proj.alpha, proj.safe_use_damping, proj.full_score)
    projected = codebook
    if proj.enabled:
        projected = project_codebook(codebook, space, alphas, safe_mean(codebook, scores.safe_counts))
    report = {"pairs": stats.pairs, "aligned_pairs": stats.aligned_pairs, "differences": space.num_differences,
              "space_rank": space.rank, "space_energy": round(space.energy, 4), "code_dim": int(codebook.shape[1]),
              # what fine-tuning may still change: it moves codes only inside the harmless space
              "finetune_free_fraction": round(1 - space.rank / codebook.shape[1], 4),
              "space_singular_values": [round(float(v), 4) for v in space.singular_values[:16]],
              "keep_excluded_unsafe_v0": stats.kept_out_v0, "harmful_codes": int(scores.harmful.sum()),
              "moved_codes": int((alphas > 0).sum()) if proj.enabled else 0,
              "projection_shift": _shift(codebook, projected)}
    new = projected
    no_grid = torch.zeros(0, stats.num_tokens, dtype=torch.long)
    (keep_tokens,) = stats.keep.tensors(no_grid)
    harm_tokens, safe_tokens = stats.harm.tensors(no_grid, no_grid)
    if ft.enabled and ft.steps > 0 and keep_tokens.shape[0] > 0 and space.rank > 0:
        device = getattr(model, "device", torch.device("cpu"))
        with torch.no_grad():
            keep_targets = _decode_batched(model, keep_tokens, codebook_v0)
            harm_targets = _decode_batched(model, safe_tokens, codebook_v0) if ft.harm_target == "pair" else None
        make_stepper = TorchAdam
        if ft.backend == "deepspeed":
            from safecb.training.deepspeed_engine import deepspeed_stepper

            make_stepper = deepspeed_stepper(zero_stage=ft.zero_stage)
        harm_fn = None
        if ft.harm_target == "judge":
            def harm_fn(images: torch.Tensor) -> torch.Tensor:
                return model.judge(images, config.categories, config.judge.question).max(dim=-1).values
        result = finetune_codebook(
            model.decode, projected.to(device), keep_tokens, keep_targets, harm_tokens, harm_targets, space,
            adaptive_step_scale(scores.score, scores.harmful, ft.adaptive_beta),
            steps=ft.steps, lr=ft.lr, lambda_harm=ft.lambda_harm, lambda_reg=ft.lambda_reg, batch_size=ft.batch_size,
            quality_budget=ft.quality_budget, holdout_fraction=ft.holdout_fraction, harm_fn=harm_fn, seed=config.seed,
            make_stepper=make_stepper, check_every=ft.check_every, rank=rank, world=world,
            all_reduce_sum=all_reduce_sum, resume=resume, on_check=on_check, micro_batch=ft.micro_batch)
        new = result.codebook.detach().cpu()
        last = result.history[-1] if result.history else {}
        report.update({"finetune_steps": result.steps_run, "finetune_stopped_early": result.stopped_early,
                       "finetune_holdout_drift": round(result.holdout_drift, 6),
                       "finetune_harm_loss": round(last.get("harm", 0.0), 6), "finetune_keep_loss": round(last.get("keep", 0.0), 6)})
    report["codebook_shift"] = _shift(codebook, new)
    return CodebookUpdate(new, projected, report)


def _shift(before: torch.Tensor, after: torch.Tensor) -> float:
    """Total movement of the codes as the decoder sees them (L2-normalised rows)."""
    return round(float((F.normalize(after, dim=-1) - F.normalize(before, dim=-1)).norm(dim=-1).sum()), 6)


def _decode_batched(model: UnifiedModel, tokens: torch.Tensor, codebook: torch.Tensor, batch: int = 256) -> torch.Tensor:
    """Images (B, 3, H, W) of tokens (B, N) decoded with `codebook`, in batches."""
    return torch.cat([model.decode(tokens[i:i + batch], codebook).detach() for i in range(0, tokens.shape[0], batch)])
