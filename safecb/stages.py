"""The loop's stages as plain functions: model + prompts/tensors + config in, rows/tensors out.

The controller calls them in one process; Ray actors call `collect_shard` the same way. The math
they use lives in `safecb.training` (pure torch); this module is the glue that reads the config.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from safecb.config import RunConfig
from safecb.models.base import SamplingParams, UnifiedModel
from safecb.prompts import Prompt
from safecb.training.finetune import TorchAdam, adaptive_step_scale, finetune_codebook
from safecb.training.harmful_space import aligned_differences, harm_scores, harmful_space, soft_harm_scores
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
    out = []
    for start in range(0, tokens.shape[0], config.judge.batch_size):
        images = model.decode(tokens[start:start + config.judge.batch_size])
        out.append(model.judge(images, config.categories, config.judge.question).float().cpu())
    return torch.cat(out) if out else torch.zeros(0, len(config.categories))


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
                  lexicon: dict[str, str]) -> ShardResult:
    """Generate + self-judge the shard's prompts, then pair every unsafe image with a safe counterpart.

    Counterparts: the rewritten prompt with the same seed — freely resampled, or teacher-forced on the
    harmful grid (`pairing.alignment`) — kept only when judged safe;
    failing that, a safe sample of the same prompt (not aligned: used for harm scores, not the space).
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
    return result


def _pair(harmful: dict, safe: dict, counterpart: str) -> dict:
    return {"run_id": harmful["run_id"], "iteration": harmful["iteration"], "codebook_version": harmful["codebook_version"],
            "prompt_id": harmful["prompt_id"], "sample_index": harmful["sample_index"], "seed": harmful["seed"],
            "harmful_prompt": harmful["prompt"], "safe_prompt": safe["prompt"], "harmful_tokens": harmful["tokens"],
            "safe_tokens": safe["tokens"], "harmful_prob": harmful["max_unsafe_prob"],
            "safe_prob": safe["max_unsafe_prob"], "counterpart": counterpart}


@dataclass
class CodebookUpdate:
    codebook: torch.Tensor  # (K, D) the new codebook v_t
    projected: torch.Tensor  # (K, D) after the closed-form step, before fine-tuning
    report: dict


def update_codebook(model: UnifiedModel, codebook: torch.Tensor, codebook_v0: torch.Tensor,
                    harm_tokens: torch.Tensor, safe_tokens: torch.Tensor, aligned: torch.Tensor,
                    keep_tokens: torch.Tensor, config: RunConfig, judged_tokens: torch.Tensor | None = None,
                    judged_probs: torch.Tensor | None = None) -> CodebookUpdate:
    """Harmful Space → projection → fine-tuning, from one iteration's pairs.

    harm_tokens, safe_tokens: (P, N) pair grids; aligned: (P,) bool, True for same-seed rewrite pairs
    (only those define the space); keep_tokens: (S, N) grids of images judged safe (for L_keep and
    safe usage counts); judged_tokens (M, N) with judged_probs (M,): every image of the iteration and
    its self-judged P(unsafe), for `harmful_space.evidence: soft`.
    """
    hs, proj, ft = config.harmful_space, config.projection, config.finetune
    num_codes = codebook.shape[0]
    codes_h, codes_s = aligned_differences(harm_tokens[aligned], safe_tokens[aligned])
    space = harmful_space(codebook, codes_h, codes_s, energy=hs.energy, max_rank=hs.max_rank)
    if hs.evidence == "soft" and judged_tokens is not None and judged_tokens.shape[0] > 0:
        scores = soft_harm_scores(judged_tokens, judged_probs, num_codes, smoothing=hs.smoothing,
                                  score_min=hs.harm_score_min, top_q=hs.top_q, sharpness=hs.sharpness)
    else:
        safe_all = torch.cat([safe_tokens.reshape(-1), keep_tokens.reshape(-1)])
        scores = harm_scores(harm_tokens, safe_all, num_codes, smoothing=hs.smoothing, score_min=hs.harm_score_min,
                             top_q=hs.top_q)
    alphas = code_step_sizes(scores, proj.alpha, proj.safe_use_damping, proj.full_score)
    projected = codebook
    if proj.enabled:
        projected = project_codebook(codebook, space, alphas, safe_mean(codebook, scores.safe_counts))
    report = {"pairs": int(harm_tokens.shape[0]), "aligned_pairs": int(aligned.sum()), "differences": space.num_differences,
              "space_rank": space.rank, "space_energy": round(space.energy, 4), "harmful_codes": int(scores.harmful.sum()),
              "moved_codes": int((alphas > 0).sum()) if proj.enabled else 0,
              "projection_shift": _shift(codebook, projected)}
    new = projected
    if ft.enabled and ft.steps > 0 and keep_tokens.shape[0] > 0 and space.rank > 0:
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
            model.decode, projected, keep_tokens, keep_targets, harm_tokens, harm_targets, space,
            adaptive_step_scale(scores.score, scores.harmful, ft.adaptive_beta),
            steps=ft.steps, lr=ft.lr, lambda_harm=ft.lambda_harm, lambda_reg=ft.lambda_reg, batch_size=ft.batch_size,
            quality_budget=ft.quality_budget, holdout_fraction=ft.holdout_fraction, harm_fn=harm_fn, seed=config.seed,
            make_stepper=make_stepper, check_every=ft.check_every)
        new = result.codebook.detach()
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
    return torch.cat([model.decode(tokens[i:i + batch], codebook).detach() for i in range(0, tokens.shape[0], batch)])
