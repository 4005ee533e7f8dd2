"""The single controller: collect → pair → harmful space → project → fine-tune → evaluate → stop.

Iteration 0 evaluates the untreated codebook v0. Iteration t ≥ 1 collects with v_{t−1}, builds v_t
from its pairs, evaluates v_t and decides whether to go on. Everything lands under one run prefix:
shards and their commits first, the codebook, the metrics row, and the iteration's MANIFEST.json
last. A resumed run restarts after the last manifest and redoes only the shards without a commit,
so it produces the same artifacts as an uninterrupted run.
"""

from __future__ import annotations

import json
import subprocess
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone

import torch
import yaml
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from safecb.config import RunConfig, parse_config
from safecb.models.base import UnifiedModel
from safecb.models.registry import load_model
from safecb.prompts import Prompt, load_prompts
from safecb.schemas import (GENERATION_SCHEMA, PAIR_SCHEMA, SCHEMA_VERSION, CodebookArtifact, Manifest, ShardRecord,
                            table_from_rows)
from safecb.stages import collect_shard, judge_tokens, sample_seed, sampling_params, update_codebook
from safecb.storage import RunStore
from safecb.training.stop import stop_decision


class RunError(RuntimeError):
    """A run cannot start or continue as asked. One line."""


@dataclass
class LoopState:
    codebook_v0: torch.Tensor
    codebook: torch.Tensor
    metrics: list[dict] = field(default_factory=list)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _git_rev() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=__file__.rsplit("/", 2)[0])
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


class Controller:
    def __init__(self, config: RunConfig, console: Console | None = None):
        self.config = config
        self.console = console or Console(stderr=True)
        self.store = RunStore(config.storage.run_dir, config.storage.options)
        self.config_hash = config.config_hash()
        self.git_rev = _git_rev()
        self.timings: dict[str, float] = {}
        self._iteration_start = time.perf_counter()
        self._eval_tokens: torch.Tensor | None = None

    # ---- set-up: everything that can fail on bad input fails here, before the first write ----
    def prepare(self, resume: bool, must_exist: bool = False) -> None:
        config = self.config
        self.store.check_reachable()
        if must_exist and not self.store.manifest_iterations():
            raise RunError(f"{self.store.url}: no finished iteration here (expected a safecb run folder)")
        if config.resources.threads:
            torch.set_num_threads(config.resources.threads)
        self.train_prompts = load_prompts(config.prompts.train, "prompts.train")
        self.eval_unsafe = load_prompts(config.prompts.eval_unsafe, "prompts.eval_unsafe")
        self.eval_benign = load_prompts(config.prompts.eval_benign, "prompts.eval_benign")
        self.lexicon = dict(config.pairing.lexicon)
        if config.pairing.builtin_lexicon == "world":
            from safecb.world import world_lexicon

            self.lexicon = {**world_lexicon(), **self.lexicon}
        done = self.store.manifest_iterations()
        if done and not resume:
            raise RunError(f"{self.store.url}: already holds a run (iterations {done[0]}..{done[-1]}); "
                           "pass --resume to continue it or choose another --run-dir")
        if resume and self.store.exists("config.yaml"):
            saved = parse_config(yaml.safe_load(self.store.read_text("config.yaml")), "config.yaml")
            if saved.config_hash() != self.config_hash:
                raise RunError(f"{self.store.url}/config.yaml: differs from the given config; "
                               "resume with the run's own config.yaml")
        with self.timed("load model"):
            self.model: UnifiedModel = load_model(config.model, config.categories, config.seed,
                                                    batch_size=config.generation.batch_size)
        self.external = None
        if config.model.backend == "world" and config.eval.external_judge:
            from safecb.world.judge import ExternalJudge

            try:
                self.external = ExternalJudge.load(config.eval.external_judge_path)
            except (OSError, ValueError) as err:
                raise RunError(f"eval.external_judge_path: {err}") from None

    @contextmanager
    def timed(self, stage: str):
        start = time.perf_counter()
        yield
        self.timings[stage] = self.timings.get(stage, 0.0) + time.perf_counter() - start

    # ---- the loop ----------------------------------------------------------------------------
    def run(self, resume: bool = False, until: int | None = None) -> list[dict]:
        self.prepare(resume)
        state = self._restore() if resume else None
        if state is None:
            self.store.write_text("config.yaml", self.config.to_yaml())
            codebook = self.model.get_codebook()
            state = LoopState(codebook, codebook)
            self._start_iteration()
            self._write_codebook(codebook, 0, None, 0, {"origin": "the model's own codebook"})
            self._finish_iteration(state, 0, {}, {"pairs": 0})
        while not self._decide(state).stop and (until is None or state.metrics[-1]["iteration"] < until):
            self._start_iteration()
            self._iterate(state, state.metrics[-1]["iteration"] + 1)
        if self._decide(state).stop:
            self._choose_final(state)
        self._print_table(state.metrics)
        return state.metrics

    def _start_iteration(self) -> None:
        self.timings, self._iteration_start = {}, time.perf_counter()

    def _iterate(self, state: LoopState, iteration: int) -> None:
        self.model.set_codebook(state.codebook, iteration - 1)
        with self.timed("collect + pair"):
            gen_records, pair_records = self._collect(iteration)
        provisional = self._manifest(iteration, iteration - 1, {"generations": gen_records, "pairs": pair_records}, {})
        pairs = self.store.read_table(provisional, "pairs", PAIR_SCHEMA).to_pylist()
        generations = self.store.read_table(provisional, "generations", GENERATION_SCHEMA)
        judged = generations.select(["tokens", "unsafe", "max_unsafe_prob"]).to_pylist()
        with self.timed("update codebook"):
            update = self._update(state, pairs, judged)
        state.codebook = update.codebook
        self._write_codebook(update.codebook, iteration, iteration - 1, iteration, update.report)
        self.model.set_codebook(update.codebook, iteration)
        collect_rate = sum(generations.column("unsafe").to_pylist()) / max(1, generations.num_rows)
        self._finish_iteration(state, iteration, {"generations": gen_records, "pairs": pair_records},
                               {**update.report, "collect_unsafe_rate": round(collect_rate, 4)})

    def _collect(self, iteration: int) -> tuple[list[ShardRecord], list[ShardRecord]]:
        per_shard = self.config.generation.prompts_per_shard
        shards = [self.train_prompts[i:i + per_shard] for i in range(0, len(self.train_prompts), per_shard)]
        done_gen = self.store.committed_shards(iteration, "generations")
        done_pairs = self.store.committed_shards(iteration, "pairs")
        gen_records, pair_records = [], []
        with self._progress() as progress:
            task = progress.add_task(f"iter {iteration}: collect + pair", total=len(shards))
            for index, prompts in enumerate(shards):
                if index in done_gen and index in done_pairs:  # committed by an earlier attempt
                    gen_records.append(done_gen[index])
                    pair_records.append(done_pairs[index])
                else:
                    result = collect_shard(self.model, prompts, self.config, iteration, self.lexicon)
                    gen_records.append(self.store.write_shard(iteration, "generations", index,
                                                              table_from_rows(GENERATION_SCHEMA, result.generations)))
                    pair_records.append(self.store.write_shard(iteration, "pairs", index,
                                                               table_from_rows(PAIR_SCHEMA, result.pairs)))
                progress.advance(task)
        return gen_records, pair_records

    def _update(self, state: LoopState, pairs: list[dict], judged: list[dict]):
        num_tokens = self.model.num_image_tokens
        safe_rows = [r for r in judged if not r["unsafe"]]
        harm = torch.tensor([p["harmful_tokens"] for p in pairs], dtype=torch.long).view(-1, num_tokens)
        safe = torch.tensor([p["safe_tokens"] for p in pairs], dtype=torch.long).view(-1, num_tokens)
        aligned = torch.tensor([p["counterpart"] == "rewrite" for p in pairs], dtype=torch.bool)
        keep = torch.tensor([r["tokens"] for r in safe_rows], dtype=torch.long).view(-1, num_tokens)
        all_tokens = torch.tensor([r["tokens"] for r in judged], dtype=torch.long).view(-1, num_tokens)
        all_probs = torch.tensor([r["max_unsafe_prob"] for r in judged], dtype=torch.float32)
        return update_codebook(self.model, state.codebook, state.codebook_v0, harm, safe, aligned, keep, self.config,
                               all_tokens, all_probs)

    # ---- evaluation --------------------------------------------------------------------------
    def _eval_jobs(self) -> list[tuple[Prompt, int, int, str]]:
        jobs = []
        for split, prompts in (("unsafe", self.eval_unsafe), ("benign", self.eval_benign)):
            for p in prompts:
                for k in range(self.config.eval.samples_per_prompt):
                    jobs.append((p, k, sample_seed(self.config.generation.seed, "eval", p.prompt_id, k), split))
        return jobs

    def _evaluate(self, iteration: int, version: int) -> tuple[dict, list[dict]]:
        """Fixed eval prompts that never feed pairs. Tokens do not depend on the codebook (the
        generator never reads it), so they are drawn once per process; only decode + judge repeat."""
        jobs = self._eval_jobs()
        if self._eval_tokens is None:
            with self.timed("eval generate"):
                tokens = []
                step = self.config.generation.batch_size
                with self._progress() as progress:
                    task = progress.add_task("eval: generate (once)", total=len(jobs))
                    for start in range(0, len(jobs), step):
                        batch = jobs[start:start + step]
                        tokens.append(self.model.generate_tokens([j[0].text for j in batch], [j[2] for j in batch],
                                                                 sampling_params(self.config)))
                        progress.advance(task, len(batch))
                self._eval_tokens = torch.cat(tokens)
        with self.timed("eval judge"):
            probs = judge_tokens(self.model, self._eval_tokens, self.config)
        threshold = self.config.judge.threshold
        unsafe = probs.max(dim=-1).values >= threshold
        is_unsafe_prompt = torch.tensor([j[3] == "unsafe" for j in jobs])
        metrics = {"unsafe_rate_self": round(float(unsafe[is_unsafe_prompt].float().mean()), 4),
                   "unsafe_rate_self_benign": round(float(unsafe[~is_unsafe_prompt].float().mean()), 4)}
        if self.external is not None:
            from safecb.world.evaluate import score_images

            with self.timed("eval external"), torch.no_grad():
                images = torch.cat([self.model.decode(self._eval_tokens[i:i + 256])
                                    for i in range(0, len(jobs), 256)])
                scored = score_images([j[0].meta for j in jobs], images, self.external, threshold=0.5)
            for key in ("unsafe_rate_external", "unsafe_rate_external_separable", "unsafe_rate_external_entangled",
                        "unsafe_rate_benign", "fidelity"):
                if key in scored:
                    metrics[key] = round(float(scored[key]), 4)
        rows = []
        for i, (p, k, seed, split) in enumerate(jobs):
            top = float(probs[i].max())
            rows.append({"run_id": self.config.run_id, "iteration": iteration, "codebook_version": version,
                         "prompt_id": p.prompt_id, "prompt": p.text, "sample_index": k, "seed": seed,
                         "tokens": self._eval_tokens[i].tolist(), "unsafe_probs": probs[i].tolist(),
                         "max_unsafe_prob": top, "unsafe": top >= threshold, "role": "eval", "png": None})
        return metrics, rows

    # ---- bookkeeping -------------------------------------------------------------------------
    def _finish_iteration(self, state: LoopState, iteration: int, shards: dict, extra: dict) -> None:
        eval_metrics, eval_rows = self._evaluate(iteration, self.model.codebook_version)
        eval_records = [self.store.write_shard(iteration, "eval", 0, table_from_rows(GENERATION_SCHEMA, eval_rows))]
        row = {"iteration": iteration, "codebook_version": iteration, "pairs": extra.get("pairs", 0),
               **eval_metrics, **extra}
        state.metrics.append(row)
        decision = self._decide(state)
        row["decision"] = "stop: " + decision.reason if decision.stop else "continue"
        row["seconds"] = round(time.perf_counter() - self._iteration_start, 2)
        row["stage_seconds"] = {stage: round(sec, 2) for stage, sec in self.timings.items()}
        self.store.append_metrics(row)
        self.store.write_manifest(self._manifest(iteration, iteration, {**shards, "eval": eval_records}, row))
        self.console.print(f"[bold]iteration {iteration}[/]: " + ", ".join(
            f"{k}={row[k]}" for k in ("pairs", "unsafe_rate_self", "unsafe_rate_external", "fidelity", "decision") if k in row))

    def _target_metric(self) -> str:
        return "unsafe_rate_external" if self.external is not None else "unsafe_rate_self"

    def _decide(self, state: LoopState):
        history = [m[self._target_metric()] for m in state.metrics]
        return stop_decision(history, self.config.stop.min_improvement, self.config.stop.patience, self.config.stop.max_iters)

    def _manifest(self, iteration: int, version: int, shards: dict[str, list[ShardRecord]], extra: dict) -> Manifest:
        return Manifest(run_id=self.config.run_id, iteration=iteration, schema_version=SCHEMA_VERSION,
                        codebook_version=version, categories=self.config.categories, shards=shards, extra=extra,
                        created_at=_now(), config_hash=self.config_hash, git_rev=self.git_rev)

    def _write_codebook(self, codebook: torch.Tensor, version: int, parent: int | None, iteration: int, params: dict) -> None:
        artifact = CodebookArtifact(version=version, parent_version=parent, iteration=iteration, params=params,
                                    created_at=_now(), config_hash=self.config_hash, git_rev=self.git_rev)
        self.store.write_codebook({"codebook": codebook.detach().float().contiguous()}, artifact)

    def _restore(self) -> LoopState | None:
        done = self.store.manifest_iterations()
        if not done:
            return None
        last = done[-1]
        metrics = [m for m in self.store.read_metrics() if m["iteration"] <= last]
        self.store.write_text("metrics.jsonl", "".join(json.dumps(m) + "\n" for m in metrics))
        codebook_v0 = self.store.read_codebook(0)[0]["codebook"]
        codebook = self.store.read_codebook(last)[0]["codebook"]
        self.console.print(f"resuming {self.store.url} after iteration {last}")
        return LoopState(codebook_v0, codebook, metrics)

    def _choose_final(self, state: LoopState) -> None:
        """The best codebook whose quality stayed within budget (fidelity if known). Written down."""
        target = self._target_metric()
        base = state.metrics[0]
        budget = self.config.eval.fidelity_budget
        eligible = [m for m in state.metrics if "fidelity" not in m or m["fidelity"] >= base["fidelity"] - budget]
        best = min(eligible, key=lambda m: (m[target], -m["iteration"]))
        decision = {"chosen_version": best["codebook_version"], "by": target, "value": best[target],
                    "fidelity_budget": budget, "stop_reason": state.metrics[-1]["decision"],
                    "rejected_for_quality": [m["codebook_version"] for m in state.metrics if m not in eligible]}
        self.store.write_text("final.json", json.dumps(decision, indent=2) + "\n")
        self.console.print(f"final codebook: v{best['codebook_version']:04d} ({target}={best[target]})")

    def _progress(self) -> Progress:
        return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                        console=self.console, transient=True)

    def _print_table(self, metrics: list[dict]) -> None:
        print_metrics_table(metrics, f"safecb run {self.config.run_id} — {self.store.url}", self.console)

    def evaluate_version(self, version: int) -> dict:
        """Evaluate a stored codebook version of this run on the eval prompts. Writes nothing."""
        self.prepare(resume=True, must_exist=True)
        if version not in self.store.codebook_versions():
            raise RunError(f"{self.store.url}: no codebook v{version:04d} (have {self.store.codebook_versions()})")
        self.model.set_codebook(self.store.read_codebook(version)[0]["codebook"], version)
        return {"codebook_version": version, **self._evaluate(version, version)[0]}


# metrics key → short header, so the table fits an 80-column terminal ("sep"/"ent": the external
# judge's unsafe rate on separable / entangled harm categories; "fid": benign fidelity)
TABLE_COLUMNS = {
    "iteration": "iter", "codebook_version": "cb", "pairs": "pairs", "unsafe_rate_self": "unsafe(self)",
    "unsafe_rate_external": "unsafe(ext)", "unsafe_rate_external_separable": "sep", "unsafe_rate_external_entangled": "ent",
    "fidelity": "fid", "seconds": "s",
}


def print_metrics_table(metrics: list[dict], title: str, console: Console) -> None:
    table = Table(title=title)
    columns = [key for key in TABLE_COLUMNS if any(key in m for m in metrics)]
    for key in columns:
        table.add_column(TABLE_COLUMNS[key], justify="right")
    for m in metrics:
        table.add_row(*(f"{m[k]:.3g}" if isinstance(m.get(k), float) else str(m.get(k, "")) for k in columns))
    console.print(table)


def run(config: RunConfig, resume: bool = False, until: int | None = None, console: Console | None = None) -> list[dict]:
    return Controller(config, console).run(resume=resume, until=until)
