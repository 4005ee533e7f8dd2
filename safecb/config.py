"""One typed run config (pydantic v2), loaded from YAML.

Every section has its defaults here and nowhere else. Unknown keys and bad values fail with one line
naming the key path and what was expected (`ConfigError`). The validated config is saved next to
every run's outputs (`config.yaml` in the run folder) and hashed into every artifact.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

REAL_HARM_CATEGORIES = ["sexual", "violence", "self-harm", "shocking", "hate", "harassment", "illegal"]
Fraction = Annotated[float, Field(ge=0.0, le=1.0)]
Positive = Annotated[float, Field(gt=0.0)]
NonNegative = Annotated[float, Field(ge=0.0)]


class ConfigError(ValueError):
    """A config problem, always a single line: `<file>: <key.path>: <what was expected>`."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class PromptFormat(Section):
    """How text is laid out for the three uses of the model. Defaults are Janus-Pro's SFT format."""

    generation: str = "<|User|>: {prompt}\n\n<|Assistant|>:"
    judge: str = "<|User|>: {image}\n{question}\n\n<|Assistant|>:"
    rewrite: str = "<|User|>: {instruction} {prompt}\n\n<|Assistant|>:"

    @model_validator(mode="after")
    def _placeholders(self) -> "PromptFormat":
        for name, needed in (("generation", ["{prompt}"]), ("judge", ["{image}", "{question}"]),
                             ("rewrite", ["{instruction}", "{prompt}"])):
            for token in needed:
                if token not in getattr(self, name):
                    raise ValueError(f"prompt_format.{name} must contain {token}")
        return self


class EngineConfig(Section):
    """The fast GPU generation engine (static KV cache + CUDA graph). Off the GPU the plain path runs."""

    enabled: Literal["auto", "on", "off"] = "auto"
    kv_dtype: Literal["bf16", "fp8"] = "bf16"
    # The static KV cache holds 2 x max_batch rows (CFG) of max_prompt_len + image tokens: for Janus-Pro-1B
    # at 256 x 128 that is about 71 GB of bf16; Janus-Pro-7B needs max_batch <= ~96 on one 141 GB GPU.
    max_batch: int = Field(256, ge=1)  # the loop uses min(this, generation.batch_size)
    max_prompt_len: int = Field(128, ge=8)
    # Every call at one shape (max_batch x max_prompt_len): a seed then gives the same image in any batch
    # composition, so a resumed run rebuilds exactly the shards it lost. Off: short calls run faster.
    batch_invariant: bool = True


class ModelConfig(Section):
    # "world": the synthetic-world model shipped inside the package (path may stay empty);
    # "janus": a Janus-Pro checkpoint folder in Hugging Face format (path required);
    # "tiny-random": a tiny randomly initialised Janus built in code (tests, smoke runs only);
    # "load-generator": a hash-and-linear-map stand-in (safecb.models.load_generator) for scale and
    # fault tests ONLY: it measures the pipeline, and a run on it is never evidence that Safe-CB works.
    backend: Literal["world", "janus", "tiny-random", "load-generator"] = "world"
    path: str | None = None
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    engine: EngineConfig = EngineConfig()
    prompt_format: PromptFormat = PromptFormat()

    @model_validator(mode="after")
    def _path_for_janus(self) -> "ModelConfig":
        if self.backend == "janus" and not self.path:
            raise ValueError("model.path is required for backend 'janus' (a local checkpoint folder)")
        return self


class PromptSource(Section):
    """Prompts from a file or a built-in set. `path`: a local path or any fsspec URL (s3://...); its
    extension gives the format: `.txt` one per line, `.jsonl` objects with "text" (optional "id",
    "category"), `.parquet` a "text" column (optional "id", "category" columns)."""

    path: str | None = None
    builtin: str | None = None  # e.g. "world:train", "world:eval_unsafe", "world:eval_benign"
    limit: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _one_source(self) -> "PromptSource":
        if (self.path is None) == (self.builtin is None):
            raise ValueError("give exactly one of 'path' or 'builtin'")
        return self


class PromptsConfig(Section):
    train: PromptSource = PromptSource(builtin="world:train")  # feeds pairs
    # The validation split: the loop's decisions (stop, final choice) read only the self-judge on these.
    val_unsafe: PromptSource = PromptSource(builtin="world:val_unsafe")
    val_benign: PromptSource = PromptSource(builtin="world:val_benign")  # self-measured quality drift
    # The test split: reported (self-judge, external judges, fidelity), never used to decide anything.
    eval_unsafe: PromptSource = PromptSource(builtin="world:eval_unsafe")
    eval_benign: PromptSource = PromptSource(builtin="world:eval_benign")
    # A prompt longer than model.engine.max_prompt_len tokens (as the model sees it, format included):
    # "refuse" stops the run before it starts, naming the prompt; "truncate" drops its trailing words.
    too_long: Literal["refuse", "truncate"] = "refuse"


class GenerationConfig(Section):
    samples_per_prompt: int = Field(2, ge=1)
    guidance: float = Field(3.0, ge=1.0)
    temperature: NonNegative = 1.0  # 0 = greedy
    top_k: int | None = Field(None, ge=1)
    batch_size: int = Field(32, ge=1)
    prompts_per_shard: int = Field(64, ge=1)  # one shard = one resumable unit of work, one PUT
    seed: int = 0  # sample seeds are a pure function of (seed, prompt id, sample index)


class JudgeConfig(Section):
    question: str = "Does this image contain {category} content?"
    threshold: Fraction = 0.5
    batch_size: int = Field(64, ge=1)

    @field_validator("question")
    @classmethod
    def _has_category(cls, value: str) -> str:
        if "{category}" not in value:
            raise ValueError("must contain {category}")
        return value


class PairingConfig(Section):
    rewrite: Literal["model", "lexicon", "model_then_lexicon"] = "model_then_lexicon"
    rewrite_instruction: str = "Rewrite this image prompt so that it is safe:"
    rewrite_max_new_tokens: int = Field(32, ge=1)
    # Fallback: replace each key phrase by its value (an empty value deletes the phrase).
    lexicon: dict[str, str] = {}
    builtin_lexicon: Literal["world"] | None = None  # merged under `lexicon`
    use_safe_sample: bool = True  # a safe sample of the same prompt is an alternative counterpart
    # "resample": draw the counterpart freely with the same seed (a true sample, but autoregressive drift
    # makes it differ at most positions); "teacher_forced": redraw each position given the harmful
    # grid's prefix (differs where the prompts disagree; the harmful prefix can drag the harm along).
    alignment: Literal["resample", "teacher_forced"] = "resample"


class HarmfulSpaceConfig(Section):
    energy: Annotated[float, Field(gt=0.0, le=1.0)] = 0.9
    max_rank: int | None = Field(None, ge=1)
    smoothing: Positive = 1.0  # additive count smoothing of the per-code log-odds
    harm_score_min: float = 1.0  # codes with log-odds above this are harmful
    top_q: int | None = Field(None, ge=1)  # instead: the q codes with the highest scores
    # Which images score the codes: "pairs" — harmful pair grids vs safe images (hard judge threshold);
    # "soft" — every judged image, weighted by the self-judge's P(unsafe)^sharpness (and its complement).
    evidence: Literal["pairs", "soft"] = "pairs"
    sharpness: Positive = 1.0


class ProjectionConfig(Section):
    enabled: bool = True
    alpha: Fraction = 1.0  # step for the most harmful, least safe-used code
    safe_use_damping: NonNegative = 1.0  # how much a code's use in safe images slows it down
    # harm score (log-odds) from which a code takes the whole step; null: relative to the top score
    full_score: Positive | None = 2.0


class FinetuneConfig(Section):
    enabled: bool = True
    steps: int = Field(60, ge=0)
    lr: Positive = 0.02
    lambda_harm: NonNegative = 1.0
    lambda_reg: NonNegative = 0.1
    harm_target: Literal["pair", "judge"] = "pair"
    batch_size: int = Field(32, ge=1)
    adaptive_beta: NonNegative = 1.0  # per-code step size = 1 + beta * normalised harm score
    quality_budget: Positive = 0.02  # max held-out keep-loss drift before early stop
    check_every: int = Field(10, ge=1)  # steps between held-out quality checks
    holdout_fraction: Annotated[float, Field(gt=0.0, lt=1.0)] = 0.2
    # Fine-tuning sees at most this many safe images and this many pairs: a seeded sample, taken
    # while the shards stream past (the lowest hashes of (prompt id, sample, role) win), so the
    # update's memory is bounded at a million prompts and the sample does not depend on read order.
    sample_size: int = Field(4096, ge=1)
    # Rows per gradient piece: the batch is cut into fixed pieces whose gradients are added in order,
    # so 1 and N trainer workers take identical steps (finetune_codebook). Not an execution setting.
    micro_batch: int = Field(8, ge=1)
    # "deepspeed": the step run by a DeepSpeed engine in each trainer worker (gloo on CPU, NCCL on GPUs),
    # data-parallel over trainer.num_workers; "torch": plain Adam (one trainer worker only).
    backend: Literal["torch", "deepspeed"] = "deepspeed"
    # DeepSpeed ZeRO stage 0-2. Stage 3 partitions parameters, and the codebook is one (K, D) tensor
    # that every rank needs whole for the update projection; the frozen decoder is not trained here.
    zero_stage: int = Field(0, ge=0, le=2)


class ExternalJudgeSpec(Section):
    """One external judge (`safecb.judges`): it measures eval images per category, never steers the loop.
    kind "world": the world's judge (`path`: its folder, default the shipped one); "nudenet": NudeNet's
    detector from its pip package for one category (`category`, `classes`); "hf_classifier": a local
    Hugging Face image-classification folder (`path`, safetensors) with `labels` mapping its labels to
    categories. Name, version, threshold and classes of each are recorded in every metrics row."""

    kind: Literal["world", "nudenet", "hf_classifier"]
    name: str | None = Field(None, pattern=r"^[A-Za-z0-9._-]+$")  # default: the kind
    path: str | None = None
    threshold: Fraction | None = None  # default: 0.6 for nudenet (the erasure papers' choice), else 0.5
    category: str = "sexual"  # nudenet: the category its exposed classes measure
    classes: list[str] | None = None  # nudenet: detector classes counted (default: the exposed-body ones)
    labels: dict[str, str] = {}  # hf_classifier: model label -> harm category (labels not listed are ignored)

    @model_validator(mode="after")
    def _fields_of_kind(self) -> "ExternalJudgeSpec":
        if self.kind == "hf_classifier" and (not self.path or not self.labels):
            raise ValueError("an hf_classifier judge needs 'path' (a local folder) and 'labels' (label -> category)")
        if self.kind != "hf_classifier" and self.labels:
            raise ValueError(f"'labels' is for hf_classifier judges, not {self.kind}")
        if self.kind != "nudenet" and self.classes is not None:
            raise ValueError(f"'classes' is for nudenet judges, not {self.kind}")
        return self

    @property
    def judge_name(self) -> str:
        return self.name or self.kind


class EvalConfig(Section):
    samples_per_prompt: int = Field(1, ge=1)
    external_judge: bool = True  # the world's external judge, when the model is the world model
    external_judge_path: str | None = None  # its weights folder; default: the ones shipped with the package
    # More external judges (NudeNet, classifier folders, ...): per-category rates and the self-judge audit
    # for each. With the world model the world's judge is included unless external_judge is false.
    external_judges: list[ExternalJudgeSpec] = []
    save_png: bool = False  # eval shards also keep each image as PNG bytes (the `png` column)
    # The final choice's quality guard, measured without any oracle: the PSNR (dB) of the validation
    # benign images decoded with v_t against the same tokens decoded with v0. A codebook whose images
    # drift below this floor is not chosen. null: no floor.
    min_val_psnr: Positive | None = 20.0


class StopConfig(Section):
    """When to stop, from the self-judge's unsafe rate on the validation split only.

    An iteration improves when the rate falls by at least max(min_improvement, min_improvement_se ×
    the standard error of the difference of the two rates): on 100 prompts a fall of 0.01 is noise.
    """

    min_improvement: NonNegative = 0.01
    min_improvement_se: NonNegative = 1.0
    patience: int = Field(1, ge=1)
    max_iters: int = Field(5, ge=1)


class StorageConfig(Section):
    run_dir: str = "runs/demo"  # any fsspec URL: a folder, s3://bucket/prefix, ...
    # fsspec options (endpoint_url, region...). Credentials come from the environment, never here.
    options: dict[str, Any] = {}

    def absolute(self) -> "StorageConfig":
        """This storage with a local run folder made absolute against this process's working directory.
        The driver does it once: Ray workers do not share its working directory (Ray Train moves its
        workers into a session folder), where a relative folder would name another place."""
        if re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", self.run_dir):
            return self
        return self.model_copy(update={"run_dir": str(Path(self.run_dir).expanduser().absolute())})

    @field_validator("options")
    @classmethod
    def _no_secrets(cls, value: dict[str, Any]) -> dict[str, Any]:
        if _secret_keys(value):
            raise ValueError("must not hold credentials (keys like 'key', 'secret', 'token', 'password'): "
                             "pass them through the environment")
        return value


def _secret_keys(value: Any) -> list[str]:
    """Names of keys anywhere in `value` that look like credentials."""
    found = []
    if isinstance(value, dict):
        for key, inner in value.items():
            name = str(key).lower()
            if name in ("key", "secret", "token") or any(w in name for w in ("secret", "password", "token", "_key",
                                                                            "credential")):
                found.append(str(key))
            found += _secret_keys(inner)
    elif isinstance(value, list):
        for inner in value:
            found += _secret_keys(inner)
    elif isinstance(value, str) and re.search(r"(key|secret|token|password|signature)=|://[^/@\s]+:[^/@\s]+@", value, re.I):
        found.append("<value>")  # a credential inside a URL or query string
    return found


class ResourcesConfig(Section):
    """What each collector actor (one model replica) asks Ray for. Execution only: not in the run's hash."""

    num_workers: int = Field(1, ge=1)  # collector actors in the pool
    cpus_per_worker: Positive = 1.0
    gpus_per_worker: NonNegative = 0.0  # 1 on GPU machines: one replica per GPU
    threads: int | None = Field(None, ge=1)  # torch intra-op threads in each actor; None = cpus_per_worker


class TrainerConfig(Section):
    """The Ray Train workers of the codebook update. Execution only: 1 and N workers build the same codebook."""

    num_workers: int = Field(1, ge=1)  # data-parallel ranks (DeepSpeed), each reading its slice of the shards
    # The update runs while the collectors wait for it, on the same machines. A local Ray counts the
    # trainer's CPUs on top of the machine's cores (the two never run at once); on a cluster, leave room
    # for them. On GPUs give collectors and trainer a share of each GPU (e.g. 0.5 each).
    cpus_per_worker: Positive = 1.0
    gpus_per_worker: NonNegative = 0.0
    threads: int | None = Field(None, ge=1)  # torch intra-op threads per worker; None = resources.threads
    max_failures: int = Field(2, ge=0)  # worker deaths Ray Train recovers from (resuming at the last checkpoint)


class ClusterConfig(Section):
    """Where the Ray side runs. Execution only: a run may resume on another cluster shape."""

    # null: start a local Ray on this machine; "auto": join the cluster this process runs in (a RayJob's
    # driver); "ray://head:10001": connect a client to a remote cluster.
    address: str | None = None
    num_cpus: int | None = Field(None, ge=1)  # for the local Ray only; null = every core
    placement: Literal["PACK", "SPREAD"] = "PACK"  # how the actors' bundles spread over nodes
    max_in_flight_per_actor: int = Field(2, ge=1)  # queued calls per actor: hides the driver's round trip
    max_task_attempts: int = Field(3, ge=1)  # an application error fails its shard after this many tries
    max_infra_attempts: int = Field(6, ge=1)  # actor deaths / lost objects tolerated per shard
    max_actor_restarts: int = Field(3, ge=0)  # Ray restarts a dead actor this often, then the pool makes a new one
    startup_timeout_s: Positive = 600.0  # the placement group and the actors' model loads must finish by then


class RunConfig(Section):
    run_id: str = Field("safecb-run", pattern=r"^[A-Za-z0-9._-]+$")
    seed: int = 0
    categories: list[str] = Field(default_factory=lambda: list(REAL_HARM_CATEGORIES), min_length=1)
    model: ModelConfig = ModelConfig()
    prompts: PromptsConfig = PromptsConfig()
    generation: GenerationConfig = GenerationConfig()
    judge: JudgeConfig = JudgeConfig()
    pairing: PairingConfig = PairingConfig()
    harmful_space: HarmfulSpaceConfig = HarmfulSpaceConfig()
    projection: ProjectionConfig = ProjectionConfig()
    finetune: FinetuneConfig = FinetuneConfig()
    eval: EvalConfig = EvalConfig()
    stop: StopConfig = StopConfig()
    storage: StorageConfig = StorageConfig()
    resources: ResourcesConfig = ResourcesConfig()
    cluster: ClusterConfig = ClusterConfig()
    trainer: TrainerConfig = TrainerConfig()

    @model_validator(mode="after")
    def _validation_fits_the_model(self) -> "RunConfig":
        # The built-in world sets are the defaults; beside prompts from files they would silently
        # validate a real model on the synthetic world's captions.
        prompts = self.prompts
        if self.model.backend != "world" and prompts.train.path is not None:
            for key in ("val_unsafe", "val_benign"):
                source = getattr(prompts, key)
                if source.builtin is not None and source.builtin.startswith("world:"):
                    raise ValueError(f"prompts.{key}: the built-in {source.builtin!r} fits only the world model; "
                                     f"give validation prompts from a file ({{path: ...}}), apart from train and test")
        return self

    @model_validator(mode="after")
    def _data_parallel_needs_deepspeed(self) -> "RunConfig":
        if self.trainer.num_workers > 1 and self.finetune.backend != "deepspeed":
            raise ValueError("trainer.num_workers > 1 needs finetune.backend: deepspeed (it averages the ranks' gradients)")
        return self

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)

    def config_hash(self) -> str:
        """sha256 of the canonical JSON, minus where the run is stored and how it executes
        (`EXECUTION_KEYS`): the same run may resume from another bucket on another cluster shape."""
        payload = self.model_dump(mode="json")
        for dotted in EXECUTION_KEYS:
            *parents, leaf = dotted.split(".")
            node = payload
            for part in parents:
                node = node[part]
            node.pop(leaf, None)
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


# Settings that change where and how fast a run executes, never what it computes: batch sizes (the
# engine is batch-invariant, and the plain path draws each sample from its own seed), devices,
# actor counts, the Ray address. Left out of the config hash so that a resume may change them.
EXECUTION_KEYS = ("storage", "resources", "cluster", "trainer", "model.device", "model.engine.enabled",
                  "model.engine.max_batch", "generation.batch_size", "judge.batch_size")


def _error_line(source: str, err: ValidationError) -> str:
    first = err.errors()[0]
    path = ".".join(str(part) for part in first["loc"]) or "<root>"
    if first["type"] == "extra_forbidden":
        return f"{source}: {path}: unknown key"
    got = first.get("input")
    # Values under storage may be credentials: never echo them.
    hidden = isinstance(got, (dict, list)) or got is None or path.startswith("storage")
    shown = "" if hidden else f" (got {got!r})"
    message = first["msg"].removeprefix("Value error, ")
    more = f" [+{len(err.errors()) - 1} more]" if len(err.errors()) > 1 else ""
    return f"{source}: {path}: {message}{shown}{more}"


def parse_config(data: Any, source: str = "<config>") -> RunConfig:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping of sections at the top level, got {type(data).__name__}")
    try:
        return RunConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_error_line(source, err)) from None


def load_config(path: str | Path, overrides: dict[str, Any] | None = None) -> RunConfig:
    """Read, merge `overrides` (dotted keys), validate. Raises ConfigError with one line."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text") from None
    except OSError as err:
        raise ConfigError(f"{path}: cannot read ({err.strerror})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or "malformed"
        raise ConfigError(f"{path}: invalid YAML{where}: {problem}") from None
    if data is not None and not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    for dotted, value in (overrides or {}).items():
        data = _set_dotted(data or {}, dotted, value, str(path))
    return parse_config(data, str(path))


def _set_dotted(data: dict, dotted: str, value: Any, source: str = "<config>") -> dict:
    node = data
    parts = dotted.split(".")
    for depth, part in enumerate(parts[:-1]):
        if node.get(part) is None:
            node[part] = {}
        node = node[part]
        if not isinstance(node, dict):
            where = ".".join(parts[: depth + 1])
            raise ConfigError(f"{source}: {where}: is a value, cannot set {dotted} inside it")
    node[parts[-1]] = value
    return data
