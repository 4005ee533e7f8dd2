"""The single controller: collect → pair → harmful space → project → fine-tune → evaluate → stop.

Iteration 0 evaluates the untreated codebook v0. Iteration t ≥ 1 collects with v_{t−1}, builds v_t
from its pairs, evaluates v_t and decides whether to go on. The driver holds no model and no rows:
prompts live in Parquet snapshots in the run folder, collector actors (`safecb.actors`) read their
own row ranges, write their shards and return small records, and the driver commits them, sums
their statistics and writes the manifest last. A resumed run rebuilds its state from the manifests
and redoes only the shards without a valid commit, so it produces the same artifacts as an
uninterrupted run.
"""

from __future__ import annotations

import json
import math
import subprocess
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Iterator

import yaml
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from safecb.config import RunConfig, parse_config
from safecb.prompts import prompt_content_hash, snapshot_prompts
from safecb.stats import rate_entry
from safecb.schemas import SCHEMA_VERSION, CodebookArtifact, Manifest, ShardRecord
from safecb.storage import CURRENT_CODEBOOK, RunStore, StorageError
from safecb.training.stop import stop_decision


class RunError(RuntimeError):
    """A run cannot start or continue as asked. One line."""


@dataclass
class LoopState:
    version: int  # the codebook version the loop stands on (that of the last finished iteration)
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


def _ranges(rows: int, per_shard: int) -> Iterator[tuple[int, int, int]]:
    """(shard index, start, stop) over `rows` rows: shard i is a pure function of i."""
    for index, start in enumerate(range(0, rows, per_shard)):
        yield index, start, min(rows, start + per_shard)


class Controller:
    def __init__(self, config: RunConfig, console: Console | None = None):
        config = config.model_copy(update={"storage": config.storage.absolute()})  # what every worker is sent
        self.config = config
        self.console = console or Console(stderr=True)
        self.store = RunStore(config.storage.run_dir, config.storage.options)
        self.config_hash = config.config_hash()
        self.git_rev = _git_rev()
        self.timings: dict[str, float] = {}
        self.actor_timings: dict[str, dict[str, float]] = {}  # stage → step → seconds summed over the actors
        self._iteration_start = time.perf_counter()
        self.pool = None

    # ---- set-up: everything that can fail on bad input fails here, before the first write ----
    def _sources(self) -> dict[str, list]:
        prompts = self.config.prompts
        return {"train": [("prompts.train", "train", prompts.train)],
                "val": [("prompts.val_unsafe", "unsafe", prompts.val_unsafe),
                        ("prompts.val_benign", "benign", prompts.val_benign)],
                "eval": [("prompts.eval_unsafe", "unsafe", prompts.eval_unsafe),
                         ("prompts.eval_benign", "benign", prompts.eval_benign)]}

    def prepare(self, resume: bool, must_exist: bool = False) -> list[Manifest]:
        """Check storage, config, prompts and model; returns the run's finished manifests."""
        from safecb.models.registry import model_fingerprint, prompt_token_counter

        config = self.config
        self.store.check_reachable()
        manifests = self.store.valid_manifests()
        if must_exist and not manifests:
            raise RunError(f"{self.store.url}: no finished iteration here (expected a safecb run folder)")
        if manifests and not resume:
            raise RunError(f"{self.store.url}: already holds a run (iterations 0..{manifests[-1].iteration}); "
                           "pass --resume to continue it or choose another --run-dir")
        if resume and self.store.exists("config.yaml"):
            saved = parse_config(yaml.safe_load(self.store.read_text("config.yaml")), "config.yaml")
            if saved.config_hash() != self.config_hash:
                raise RunError(f"{self.store.url}/config.yaml: differs from the given config; "
                               "resume with the run's own config.yaml")
        with self.timed("check inputs"):
            counter = prompt_token_counter(config.model, config.categories)
            limits = dict(token_counter=counter, max_tokens=config.model.engine.max_prompt_len,
                          too_long=config.prompts.too_long, storage_options=config.storage.options)
            # One streaming pass over every source first: a bad prompt anywhere fails before anything is written.
            hashes = {name: prompt_content_hash(sources, **limits) for name, sources in self._sources().items()}
            if prompt_content_hash(self._sources()["val"][:1], **limits)[1] == 0:
                raise RunError("prompts.val_unsafe: no prompts; the loop decides by the self-judge's unsafe rate on them")
            fingerprint = model_fingerprint(config.model, config.categories, config.seed)
        if manifests:
            recorded = manifests[0].inputs
            for name, (sha, _) in hashes.items():
                if recorded.get("prompts", {}).get(name, {}).get("sha256") != sha:
                    raise RunError(f"{self.store.url}: the {name} prompts changed since the run started "
                                   f"(content sha256 {sha[:12]}.. vs {recorded.get('prompts', {}).get(name, {}).get('sha256', '?')[:12]}..); "
                                   "resume with the prompts it started with")
            if recorded.get("model") != fingerprint:
                raise RunError(f"{self.store.url}: model.path content changed since the run started; "
                               "resume with the model it started with")
            self.inputs = recorded
        else:
            self.inputs = {"model": fingerprint, "prompts": {name: {"sha256": sha, "rows": rows}
                                                            for name, (sha, rows) in hashes.items()}}
            self._limits = limits
        return manifests

    def _write_snapshots(self) -> None:
        with self.timed("snapshot prompts"):
            for name, sources in self._sources().items():
                info = snapshot_prompts(sources, self.store, name, **self._limits)
                self.inputs["prompts"][name] = info.to_dict()

    @contextmanager
    def timed(self, stage: str):
        start = time.perf_counter()
        yield
        self.timings[stage] = self.timings.get(stage, 0.0) + time.perf_counter() - start

    @contextmanager
    def _cluster(self):
        from safecb.actors.pool import CollectorPool
        from safecb.cluster.ray_connect import ray_session

        with ray_session(self.config):
            with self.timed("start actors"):
                self.console.print(f"starting {self.config.resources.num_workers} collector actor(s)")
                self.pool = CollectorPool(self.config, self.config.storage.run_dir, self.config.storage.options)
            try:
                yield self.pool
            finally:
                self.pool.shutdown()
                self.pool = None

    # ---- the loop ----------------------------------------------------------------------------
    def run(self, resume: bool = False, until: int | None = None) -> list[dict]:
        manifests = self.prepare(resume)
        with self._cluster():
            state = self._restore(manifests)
            if state is None:
                self._start_iteration()
                self.store.write_text("config.yaml", self.config.to_yaml())
                self._write_snapshots()
                self._codebook_v0()
                state = LoopState(0)
                self._finish_iteration(state, 0, {}, {"pairs": 0})
            while not self._decide(state).stop and (until is None or state.metrics[-1]["iteration"] < until):
                self._start_iteration()
                self._iterate(state, state.metrics[-1]["iteration"] + 1)
        if self._decide(state).stop:
            self._choose_final(state)
        self._print_table(state.metrics)
        return state.metrics

    def _start_iteration(self) -> None:
        self.timings, self.actor_timings, self._iteration_start = {}, {}, time.perf_counter()

    def _codebook_v0(self) -> None:
        """v0 is the model's own codebook, written once (a resumed start reuses a complete one)."""
        if 0 not in self.store.codebook_versions():
            codebook = self.pool.call("own_codebook")
            self._write_artifact_v0(codebook)
        self._broadcast(0)

    def _write_artifact_v0(self, codebook) -> None:
        artifact = CodebookArtifact(version=0, parent_version=None, iteration=0,
                                    params={"origin": "the model's own codebook"}, created_at=_now(),
                                    config_hash=self.config_hash, git_rev=self.git_rev)
        self.store.write_codebook({"codebook": codebook.detach().float().contiguous()}, artifact)

    def _broadcast(self, version: int) -> None:
        """Verify v's artifact, name it current (what a restarted actor loads), send it to every actor."""
        with self.timed("broadcast"):
            blob, artifact = self._mark_current(version)
            self.pool.broadcast(blob, version, artifact.sha256)
            self.current = (version, artifact.sha256)

    def _iterate(self, state: LoopState, iteration: int) -> None:
        self._broadcast(iteration - 1)
        with self.timed("collect + pair"):
            shards = self._run_shards(iteration, "collect", ("generations", "pairs"))
        with self.timed("update codebook"):
            artifact = self._build_codebook(iteration, shards)
        self._broadcast(iteration)
        state.version = iteration
        # Only the prompts' own draws count (role "collect"): counterparts are drawn to be safe.
        collected = [sum(r.stats.get("collect", [0, 0])[i] for r in shards["generations"]) for i in (0, 1)]
        # How the trainer ran (workers, a resume) is execution, not result: it stays in the artifact.
        made = {k: v for k, v in artifact.params.items() if k not in ("trainer_workers", "resumed_from_step")}
        self._finish_iteration(state, iteration, shards, {
            **made, "collect_unsafe_rate": rate_entry(*collected)["rate"], "collect_images": collected[1],
            "collect_interval": rate_entry(*collected)})

    def _tasks(self, iteration: int, kind: str, rows: int, skip: set[int], eval_tokens: dict[int, ShardRecord] | None):
        from safecb.actors.collector import ShardTask

        version, sha = self.current
        for index, start, stop in _ranges(rows, self.config.generation.prompts_per_shard):
            if index not in skip:
                yield ShardTask(kind, iteration, index, start, stop, version, sha,
                                eval_tokens=(eval_tokens or {}).get(index))

    def _run_shards(self, iteration: int, work: str, kinds: tuple[str, ...],
                    eval_tokens: dict[int, ShardRecord] | None = None) -> dict[str, list[ShardRecord]]:
        """Every shard of one kind of work: committed ones are kept, the rest run on the pool.

        A shard counts as done when all its kinds are committed; a kind already committed is never
        redone (its commit stays; a redo commits only what is missing). Results of a shard that is
        already complete (a zombie attempt) are dropped.
        """
        name = "train" if work == "collect" else work
        rows = self.inputs["prompts"][name]["rows"]
        committed = {kind: self.store.committed_shards(iteration, kind) for kind in kinds}
        complete = set.intersection(*(set(c) for c in committed.values()))
        total = -(-rows // self.config.generation.prompts_per_shard)

        steps = self.actor_timings.setdefault(work, {})

        def commit(result) -> None:
            for step, seconds in result.seconds.items():
                steps[step] = steps.get(step, 0.0) + seconds
            for kind, record in result.records.items():
                if result.task.index not in committed[kind]:
                    committed[kind][result.task.index] = self.store.commit_shard(iteration, record)

        with self._progress() as progress:
            bar = progress.add_task(f"iter {iteration}: {work} ({self.config.resources.num_workers} actors)",
                                    total=total, completed=len(complete))
            self.pool.run(self._tasks(iteration, work, rows, complete, eval_tokens),
                          "collect" if work == "collect" else "evaluate", commit,
                          lambda n: progress.advance(bar, n))
        missing = [i for i in range(total) if not all(i in committed[k] for k in kinds)]
        if missing:
            raise RunError(f"iteration {iteration}: {work} shards {missing[:5]} have no commit after the pool finished")
        return {kind: [committed[kind][i] for i in range(total)] for kind in kinds}

    def _build_codebook(self, iteration: int, shards: dict[str, list[ShardRecord]]) -> CodebookArtifact:
        """v(iteration) from the iteration's shards, built by the trainer; a complete artifact of an
        interrupted attempt is reused (the update is deterministic)."""
        if iteration in self.store.codebook_versions():
            try:
                _, artifact = self.store.read_codebook_bytes(iteration)
                if artifact.parent_version == iteration - 1 and artifact.config_hash == self.config_hash:
                    return artifact
            except Exception:  # noqa: BLE001 - a torn artifact is rebuilt
                pass
        from safecb.training.trainer import train_codebook

        template = CodebookArtifact(version=iteration, parent_version=iteration - 1, iteration=iteration,
                                    created_at=_now(), config_hash=self.config_hash, git_rev=self.git_rev)
        train_codebook(self.config, self.store, iteration, shards["generations"], shards["pairs"], template)
        try:  # the artifact must verify (sha256, embedded version) and be the child of v(t-1) of this run
            _, artifact = self.store.read_codebook_bytes(iteration)
        except StorageError as err:
            raise RunError(f"trainer result refused: {err}") from None
        if (artifact.parent_version, artifact.iteration, artifact.config_hash) != (iteration - 1, iteration, self.config_hash):
            raise RunError(f"codebooks/v{iteration:04d}: parent {artifact.parent_version}, iteration {artifact.iteration}, "
                           f"config {artifact.config_hash}: expected {iteration - 1}, {iteration}, {self.config_hash}")
        return artifact

    # ---- evaluation --------------------------------------------------------------------------
    def _evaluate(self, iteration: int) -> tuple[dict, dict[str, list[ShardRecord]]]:
        """Decode + judge the fixed validation and test images with the served codebook, on the actors.
        Their tokens are drawn once, in iteration 0; later iterations decode the tokens stored there.
        Validation rates get the prefix `val_`; test rates keep the plain names."""
        metrics, shards = {}, {}
        for kind, prefix in (("val", "val_"), ("eval", "")):
            eval_tokens = None
            if iteration > 0:
                eval_tokens = {r.index: r for r in self.store.read_manifest(0).shards[kind]}
            with self.timed(kind):
                shards[kind] = self._run_shards(iteration, kind, (kind,), eval_tokens)[kind]
            part = eval_metrics([r.stats for r in shards[kind]], prefix)
            intervals = {**metrics.pop("intervals", {}), **part.pop("intervals")}
            metrics.update(part, intervals=intervals)
        return metrics, shards

    # ---- bookkeeping -------------------------------------------------------------------------
    def _finish_iteration(self, state: LoopState, iteration: int, shards: dict, extra: dict) -> None:
        metrics, eval_shards = self._evaluate(iteration)
        row = {"iteration": iteration, "codebook_version": iteration, "pairs": extra.get("pairs", 0),
               **metrics, **extra}
        state.metrics.append(row)
        decision = self._decide(state)
        row["decision"] = "stop: " + decision.reason if decision.stop else "continue"
        row["seconds"] = round(time.perf_counter() - self._iteration_start, 2)
        row["stage_seconds"] = {stage: round(sec, 2) for stage, sec in self.timings.items()}
        # The actors' side of each stage, step by step, summed over the calls (the driver sees only the whole).
        row["actor_seconds"] = {stage: {step: round(sec, 2) for step, sec in steps.items()}
                                for stage, steps in self.actor_timings.items() if steps}
        self.store.append_metrics(row)
        self.store.write_manifest(self._manifest(iteration, iteration, {**shards, **eval_shards}, row))
        self.console.print(f"[bold]iteration {iteration}[/]: " + ", ".join(
            f"{k}={row[k]}" for k in ("pairs", DECISION_METRIC, "val_psnr_vs_v0", "unsafe_rate_self",
                                      "unsafe_rate_external", "fidelity", "decision") if row.get(k) is not None))

    def _decide(self, state: LoopState):
        """Stop or go on, from the self-judge on the validation split only (never test, never an external judge)."""
        stop = self.config.stop
        history = [m["intervals"][DECISION_METRIC] for m in state.metrics]
        return stop_decision(history, stop.min_improvement, stop.patience, stop.max_iters, stop.min_improvement_se)

    def _manifest(self, iteration: int, version: int, shards: dict[str, list[ShardRecord]], extra: dict) -> Manifest:
        return Manifest(run_id=self.config.run_id, iteration=iteration, schema_version=SCHEMA_VERSION,
                        codebook_version=version, categories=self.config.categories, shards=shards, extra=extra,
                        inputs=self.inputs, created_at=_now(), config_hash=self.config_hash, git_rev=self.git_rev)

    def _restore(self, manifests: list[Manifest]) -> LoopState | None:
        """The loop's state from the manifests alone (metrics.jsonl is rewritten from them)."""
        if not manifests:
            return None
        metrics = [m.extra for m in manifests]
        self.store.write_text("metrics.jsonl", "".join(json.dumps(m) + "\n" for m in metrics))
        last = manifests[-1].iteration
        self.console.print(f"resuming {self.store.url} after iteration {last}")
        return LoopState(last, metrics)

    def _choose_final(self, state: LoopState) -> None:
        """The codebook with the lowest validation unsafe rate (self-judge) among those whose validation
        images stayed within the quality floor (PSNR against v0). Test numbers are copied in, not used."""
        floor = self.config.eval.min_val_psnr
        eligible = [m for m in state.metrics if floor is None or m.get("val_psnr_vs_v0") is None
                    or m["val_psnr_vs_v0"] >= floor]
        best = min(eligible, key=lambda m: (m[DECISION_METRIC], -m["iteration"]))
        reported = {k: best[k] for k in ("unsafe_rate_self", "unsafe_rate_external", "unsafe_rate_external_separable",
                                         "unsafe_rate_external_entangled", "fidelity") if best.get(k) is not None}
        decision = {"chosen_version": best["codebook_version"], "by": DECISION_METRIC, "split": "val", "judge": "self",
                    "value": best[DECISION_METRIC], "interval": best["intervals"][DECISION_METRIC],
                    "quality_guard": {"metric": "val_psnr_vs_v0", "min": floor,
                                      "value": best.get("val_psnr_vs_v0")},
                    "stop_reason": state.metrics[-1]["decision"],
                    "rejected_for_quality": [m["codebook_version"] for m in state.metrics if m not in eligible],
                    "test_reported_only": reported}
        self.store.write_text("final.json", json.dumps(decision, indent=2) + "\n")
        self.console.print(f"final codebook: v{best['codebook_version']:04d} (chosen by {DECISION_METRIC}="
                           f"{best[DECISION_METRIC]} on validation)")

    def _progress(self) -> Progress:
        return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                        console=self.console, transient=True)

    def _print_table(self, metrics: list[dict]) -> None:
        print_metrics_table(metrics, f"safecb run {self.config.run_id} — {self.store.url}", self.console)

    def evaluate_version(self, version: int) -> dict:
        """Evaluate a stored codebook version of this run on the eval prompts. Commits nothing:
        the eval shards go to a scratch iteration folder that is removed afterwards."""
        manifests = self.prepare(resume=True, must_exist=True)
        if version not in self.store.codebook_versions():
            raise RunError(f"{self.store.url}: no codebook v{version:04d} (have {self.store.codebook_versions()})")
        with self._cluster():
            self.inputs = manifests[0].inputs
            self._broadcast(version)
            scratch = 9000 + version  # never a loop iteration; removed below
            try:
                metrics, _ = self._evaluate(scratch)
            finally:
                self.store.remove_iteration(scratch)
                self._mark_current(manifests[-1].iteration)  # what the run stands on, not the one-off eval's version
        return {"codebook_version": version, **metrics}

    def _mark_current(self, version: int) -> tuple[bytes, CodebookArtifact]:
        """Verify v's artifact (sha256 against its sidecar) and name it current: what a restarted actor loads."""
        blob, artifact = self.store.read_codebook_bytes(version)
        self.store.write_text(CURRENT_CODEBOOK, json.dumps({"version": version, "sha256": artifact.sha256}))
        return blob, artifact


# The one number the loop decides by (stop rule, final choice): the self-judge on the validation split.
DECISION_METRIC = "val_unsafe_rate_self"


def eval_metrics(stats: list[dict], prefix: str = "") -> dict:
    """Sum the eval shards' counts into the metrics row's rates (4 decimals), each rate with its
    counts and 95% interval under "intervals" (same key). `prefix`: "val_" for the validation split.
    A rate with no images behind it is absent (None), never 0."""
    def total(key: str) -> list[float]:
        return [sum(s.get(key, [0, 0])[i] for s in stats) for i in (0, 1)]

    self_unsafe, self_benign = total("self_unsafe"), total("self_benign")
    intervals = {"unsafe_rate_self": rate_entry(*self_unsafe), "unsafe_rate_self_benign": rate_entry(*self_benign)}
    row = {"eval_images_unsafe": int(self_unsafe[1]), "eval_images_benign": int(self_benign[1])}
    drift = total("drift_benign")
    if drift[1]:
        mse = drift[0] / drift[1]
        row["psnr_vs_v0"] = round(min(99.0, 10 * math.log10(1.0 / mse)) if mse > 0 else 99.0, 2)
    if any("external" in s for s in stats):
        from safecb.world.evaluate import rates_from_counts

        counts: dict[str, list[float]] = {}
        for s in stats:
            for key, (hits, n) in s.get("external", {}).items():
                counts[key] = [counts.get(key, [0, 0])[0] + hits, counts.get(key, [0, 0])[1] + n]
        rates = rates_from_counts(counts)  # fidelity: a mean score, not a rate
        for key in ("unsafe_rate_external", "unsafe_rate_external_separable", "unsafe_rate_external_entangled",
                    "unsafe_rate_benign"):
            intervals[key] = rate_entry(*counts.get(key, [0, 0]))
        if rates.get("fidelity") is not None:
            row["fidelity"] = round(float(rates["fidelity"]), 4)
    for key, entry in intervals.items():
        if entry["n"]:
            row[key] = entry["rate"]
    row = {prefix + k: v for k, v in row.items()}
    row["intervals"] = {prefix + k: v for k, v in intervals.items() if v["n"]}
    from safecb.judges.evaluate import judge_metrics_from_stats

    # Per judge and category, with the self-judge audit: "judges", "unsafe_by_judge", "self_audit" (test split).
    row.update(judge_metrics_from_stats(stats))
    return row


# metrics key → short header, so the table fits an 80-column terminal ("sep"/"ent": the external
# judge's unsafe rate on separable / entangled harm categories; "fid": benign fidelity)
TABLE_COLUMNS = {
    "iteration": "iter", "codebook_version": "cb", "pairs": "pairs", "val_unsafe_rate_self": "val(self)",
    "val_psnr_vs_v0": "val psnr", "unsafe_rate_self": "unsafe(self)",
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
