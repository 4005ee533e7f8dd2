"""The collection pipeline at scale: the driver's memory, the framework's throughput, its overhead.

Three measurements, each from real `safecb run` processes (a local Ray, actors, shards, commits):
  * driver_rss_mb: peak RSS of the driver process alone (its own getrusage(RUSAGE_SELF).ru_maxrss,
    written at exit) for a `.txt` prompt file of N synthetic prompts (default 10k, 100k, 1M), one
    subprocess per N, on the load generator (`model.backend: load-generator`, a stand-in for scale
    tests: its numbers say nothing about whether Safe-CB works), 2 actors of 1 CPU, 1024 prompts a
    shard. Ray's own processes (GCS, raylet, actors, Ray Train) are NOT the driver: their summed RSS
    is sampled and shown beside it;
  * prompts_per_s: the load generator's prompts through the collect phase ("collect + pair" in the
    run's metrics.jsonl): the framework's own ceiling (snapshot reads, rows to Arrow, Parquet writes,
    commits, Ray), and prompts_per_actor_cpu_s, the same per CPU second the actors got;
  * overhead_ratio: the world model (configs/tiny.yaml) on CPU, the collect phase of a pipeline run
    with 1 actor of T threads ÷ `safecb.stages.collect_shard` called in a plain loop in a fresh
    process of T threads on the same prompts, shards and batch size, after one untimed warm-up
    shard; best of `--world-repeats` each, for T = 1 (the headline) and 2; and the same as a ratio
    of CPU seconds (driver + actor + Ray's processes ÷ the plain loop's).

The machine may be shared: before each timed part the benchmark waits (up to `--quiet-wait` s) for
processes outside it to use under 0.3 cores, and records the cores each role used meanwhile (the
driver, the actors, Ray's processes, everything else: "other load").

    PYTHONPATH=. python benchmarks/collect_scale.py --sizes 2000,20000 --world-repeats 1  # ~5 min
    PYTHONPATH=. python benchmarks/collect_scale.py --json --save   # 10k, 100k, 1M + world: ~20-30 min
                                                                    # on 2 cores; results/collect-scale.json
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

RESULT = Path(__file__).parent / "results" / "collect-scale.json"
CATEGORIES = ["blood", "fire", "weapon", "drugs"]
WORDS = ["red", "blue", "green", "circle", "square", "grass", "sand", "river", "tower", "cloud", "night", "street"]


def log(*args) -> None:
    print(*args, flush=True)


# ---- the driver, in its own process -------------------------------------------------------------

def driver_main(config: str, report: str) -> None:
    """`safecb run --config CONFIG` in this process; at exit, write this process's own peak RSS and
    the stage marks (stage, epoch time at its end, RSS then) to REPORT."""
    import psutil

    marks: list[dict] = []
    proc = psutil.Process()

    def mark(stage: str) -> None:  # `at`: epoch seconds, so the parent can line marks up with its samples
        marks.append({"stage": stage, "at": round(time.time(), 3), "rss_mb": round(proc.memory_info().rss / 2**20, 1)})

    def dump() -> None:
        mark("exit")
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
        Path(report).write_text(json.dumps({"peak_rss_mb": round(peak, 1), "marks": marks}))

    atexit.register(dump)
    from contextlib import contextmanager

    from safecb.controller import Controller

    timed = Controller.timed

    @contextmanager
    def marked(self, stage):
        with timed(self, stage):
            yield
        mark(stage)

    Controller.timed = marked
    mark("imports")
    from safecb.cli import app

    app(["run", "--config", config], standalone_mode=True)


def busy_cpu_s() -> float:
    """CPU seconds this machine's cores have been busy since boot (user, system, interrupts)."""
    import psutil

    t = psutil.cpu_times()
    return t.user + t.nice + t.system + getattr(t, "irq", 0.0) + getattr(t, "softirq", 0.0)


class Load:
    """Samples of the machine's busy CPU time against our own, to tell how much OTHER work ran meanwhile.

    The machine may be shared (other people's tests): `foreign_cores(t0, t1)` is the average number
    of cores busy with processes outside our tree between two epoch times. Our tree: this process
    and the driver with all its descendants, each process's CPU time as last sampled (so at most one
    sampling interval of a process's end is missed), split by role (`cores(t0, t1)`): "driver" (the
    `safecb run` process), "actors" (the Collector actors), "ray" (Ray's GCS, raylet, agents, idle
    workers, Ray Train) and "bench" (this process).
    """

    ROLES = ("driver", "actors", "ray", "bench")

    def __init__(self) -> None:
        self.samples: list[tuple[float, float, dict[str, float]]] = []  # (epoch, busy cpu s, role → cpu s)
        self._procs: dict[tuple[int, float], tuple[str, float]] = {}  # (pid, start) → (role, cpu s)

    @staticmethod
    def _role(proc, root) -> str:
        if root is not None and proc.pid == root.pid:
            return "driver"
        if proc.pid == os.getpid():
            return "bench"
        try:
            title = " ".join(proc.cmdline()[:1]) or proc.name()
        except Exception:  # noqa: BLE001 - gone or hidden
            title = ""
        return "actors" if title.startswith("ray::Collector") else "ray"

    def sample(self, root=None) -> None:
        import psutil

        me = psutil.Process()
        for proc in [me, *([root, *self._children(root)] if root is not None else [])]:
            try:
                with proc.oneshot():
                    times, key = proc.cpu_times(), (proc.pid, proc.create_time())
                    role = self._procs[key][0] if key in self._procs and self._procs[key][0] == "actors" else \
                        self._role(proc, root)  # an actor keeps its role (its title changes between calls)
                    self._procs[key] = (role, times.user + times.system)
            except psutil.Error:
                pass
        by_role = {r: 0.0 for r in self.ROLES}
        for role, cpu in self._procs.values():
            by_role[role] += cpu
        self.samples.append((time.time(), busy_cpu_s(), by_role))

    @staticmethod
    def _children(root) -> list:
        import psutil

        try:
            return root.children(recursive=True)
        except psutil.Error:
            return []

    def _at(self, t: float):
        """The sample at epoch `t`, interpolated linearly between the two samples around it."""
        before = [s for s in self.samples if s[0] <= t]
        after = [s for s in self.samples if s[0] >= t]
        if not before or not after:
            return None
        (a, busy_a, roles_a), (b, busy_b, roles_b) = before[-1], after[0]
        w = 0.0 if b == a else (t - a) / (b - a)
        return (t, busy_a + w * (busy_b - busy_a), {r: roles_a[r] + w * (roles_b[r] - roles_a[r]) for r in roles_a})

    def _ends(self, t0: float | None, t1: float | None):
        if len(self.samples) < 2:
            return None
        first = self.samples[0] if t0 is None else self._at(t0)
        last = self.samples[-1] if t1 is None else self._at(t1)
        if first is None or last is None or last[0] - first[0] < 0.2:
            return None
        return first, last

    def cpu_s(self, role: str, t0: float | None = None, t1: float | None = None) -> float | None:
        """CPU seconds the processes of `role` used between two epoch times."""
        ends = self._ends(t0, t1)
        return round(ends[1][2][role] - ends[0][2][role], 2) if ends else None

    def cores(self, t0: float | None = None, t1: float | None = None) -> dict[str, float] | None:
        """Average cores busy per role between two epoch times, and "other" (outside our tree)."""
        ends = self._ends(t0, t1)
        if not ends:
            return None
        (a, busy_a, ours_a), (b, busy_b, ours_b) = ends
        out = {r: round((ours_b[r] - ours_a[r]) / (b - a), 2) for r in self.ROLES}
        ours = sum(ours_b.values()) - sum(ours_a.values())
        out["other"] = round(max(0.0, (busy_b - busy_a) - ours) / (b - a), 2)
        return out

    def foreign_cores(self, t0: float | None = None, t1: float | None = None) -> float | None:
        cores = self.cores(t0, t1)
        return cores["other"] if cores else None


def wait_for_quiet(max_wait_s: float, threshold: float = 0.3) -> float:
    """Wait (at most `max_wait_s`) until other processes use under `threshold` cores for 3 s; the seconds waited."""
    load, start, said = Load(), time.time(), False
    while True:
        load.sample()
        time.sleep(3.0)
        load.sample()
        foreign = load.foreign_cores(load.samples[-2][0], load.samples[-1][0]) or 0.0
        waited = time.time() - start
        if foreign < threshold or waited >= max_wait_s:
            if said:
                log(f"    (waited {waited:.0f} s for the machine to be quiet; other load now {foreign:.2f} cores)")
            return waited
        if not said:
            log(f"    other processes use {foreign:.2f} cores: waiting up to {max_wait_s:.0f} s for a quiet machine ...")
            said = True


def _ray_rss_mb(driver) -> float:
    """Summed RSS of the driver's descendants (Ray's GCS, raylet, workers, actors)."""
    import psutil

    total = 0
    for child in Load._children(driver):
        try:
            total += child.memory_info().rss
        except psutil.Error:
            pass
    return total / 2**20


def run_driver(config: Path, report: Path, log_path: Path, args) -> dict:
    """One `safecb run` in a subprocess; its wall time, peak RSS (driver vs Ray) and stage marks."""
    import psutil

    wait_for_quiet(args.quiet_wait)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--_driver", str(config), str(report)]
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}".rstrip(os.pathsep)}
    load = Load()
    start = time.perf_counter()
    with open(log_path, "w") as out:
        child = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        driver = psutil.Process(child.pid)
        ray_peak = sampled_driver_peak = 0.0
        while child.poll() is None:
            try:
                sampled_driver_peak = max(sampled_driver_peak, driver.memory_info().rss / 2**20)
            except psutil.Error:
                pass
            ray_peak = max(ray_peak, _ray_rss_mb(driver))
            load.sample(driver)
            if time.perf_counter() - start > args.timeout:
                child.kill()
                child.wait()
                raise RuntimeError(f"safecb run ({config}) took more than {args.timeout:.0f} s; see {log_path}")
            time.sleep(0.5)
    wall = time.perf_counter() - start
    load.sample()
    if child.returncode != 0:
        tail = log_path.read_text()[-3000:]
        raise RuntimeError(f"safecb run ({config}) exited {child.returncode}:\n{tail}")
    info = json.loads(report.read_text())
    marks = info["marks"]
    # The collect phase: from the broadcast that precedes it to its own mark.
    names = [m["stage"] for m in marks]
    end = len(names) - 1 - names[::-1].index("collect + pair")
    collect_window = (marks[end - 1]["at"], marks[end]["at"])
    t0 = marks[0]["at"]
    return {"wall_s": round(wall, 2), "driver_peak_rss_mb": info["peak_rss_mb"],
            "driver_sampled_peak_rss_mb": round(sampled_driver_peak, 1), "ray_procs_peak_rss_mb": round(ray_peak, 1),
            "other_load_cores": load.foreign_cores(), "other_load_cores_collect": load.foreign_cores(*collect_window),
            "driver_cpu_s": load.cpu_s("driver"), "driver_cpu_s_collect": load.cpu_s("driver", *collect_window),
            "cores_collect": load.cores(*collect_window),
            "cpu_s_collect": {role: load.cpu_s(role, *collect_window) for role in ("driver", "actors", "ray")},
            "marks": [{"stage": m["stage"], "t": round(m["at"] - t0, 2), "rss_mb": m["rss_mb"]} for m in marks]}


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


# ---- scale: the load generator ------------------------------------------------------------------

def write_prompts(path: Path, n: int, prefix: str, unsafe_every: int = 2) -> None:
    """N synthetic prompts, one a line; every `unsafe_every`-th (0: none) holds the word the load generator drops."""
    with open(path, "w") as f:
        for i in range(n):
            words = [WORDS[(i * 7 + k * 3) % len(WORDS)] for k in range(5)]
            tag = "unsafe " if unsafe_every and i % unsafe_every == 0 else ""
            f.write(f"{prefix} {i} {tag}{' '.join(words)}\n")


def scale_config(folder: Path, args) -> dict:
    return {
        "run_id": "collect-scale",
        "categories": CATEGORIES,
        "model": {"backend": "load-generator", "device": "cpu"},
        "prompts": {"train": {"path": str(folder / "train.txt")},
                    "eval_unsafe": {"path": str(folder.parent / "eval_unsafe.txt")},
                    "eval_benign": {"path": str(folder.parent / "eval_benign.txt")},
                    # validation: the same small files (the load generator's rates measure nothing)
                    "val_unsafe": {"path": str(folder.parent / "eval_unsafe.txt")},
                    "val_benign": {"path": str(folder.parent / "eval_benign.txt")}},
        "generation": {"samples_per_prompt": 1, "batch_size": args.batch_size,
                       "prompts_per_shard": args.prompts_per_shard},
        "judge": {"batch_size": args.batch_size},
        "pairing": {"rewrite": "model"},
        "finetune": {"steps": args.finetune_steps, "backend": "torch"},
        "stop": {"max_iters": 1},
        "storage": {"run_dir": str(folder / "run")},
        "resources": {"num_workers": args.workers, "cpus_per_worker": 1, "threads": 1},
        "cluster": {"num_cpus": args.ray_cpus},
    }


def measure_scale(n: int, work: Path, args) -> dict:
    folder = work / f"n{n}"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    write_prompts(folder / "train.txt", n, "scene")
    config = folder / "config.yaml"
    config.write_text(yaml.safe_dump(scale_config(folder, args), sort_keys=False))
    log(f"  {n:,} prompts: safecb run (load generator, {args.workers} actors) ...")
    res = run_driver(config, folder / "driver.json", folder / "driver.log", args)
    rows = read_metrics(folder / "run")
    stages = rows[-1]["stage_seconds"]
    collect = stages["collect + pair"]
    shards = -(-n // args.prompts_per_shard)
    cpu, actors_cpu = res["driver_cpu_s_collect"], res["cpu_s_collect"]["actors"]
    res.update({"prompts": n, "shards": shards, "collect_s": collect,
                # throughput per CPU second the actors got: what other people's load on the machine does not change
                "prompts_per_actor_cpu_s": round(n / actors_cpu, 1) if actors_cpu else None,
                "driver_ms_per_shard": round(1000 * cpu / shards, 1) if cpu is not None else None,
                "prompts_per_s": round(n / collect, 1), "run_prompts_per_s": round(n / res["wall_s"], 1),
                "stage_seconds": {"iteration 0": rows[0]["stage_seconds"], "iteration 1": stages},
                "collect_images": rows[-1].get("collect_images"), "pairs": rows[-1].get("pairs")})
    log(f"    wall {res['wall_s']} s, collect {collect} s ({res['prompts_per_s']:,.0f} prompts/s), "
        f"driver peak RSS {res['driver_peak_rss_mb']} MB, Ray processes {res['ray_procs_peak_rss_mb']} MB, "
        f"other load {res['other_load_cores']} cores ({res['other_load_cores_collect']} while collecting)")
    if not args.keep:
        shutil.rmtree(folder / "run", ignore_errors=True)
        (folder / "train.txt").unlink()
    return res


# ---- overhead: the world model ------------------------------------------------------------------

def world_config(folder: Path, threads: int, ray_cpus: int) -> dict:
    data = yaml.safe_load((ROOT / "configs" / "tiny.yaml").read_text())
    data["stop"] = {**data.get("stop", {}), "max_iters": 1}
    data["finetune"] = {**data.get("finetune", {}), "steps": 5, "backend": "torch"}  # the update is not timed
    data["storage"] = {"run_dir": str(folder / "run")}
    data["resources"] = {"num_workers": 1, "cpus_per_worker": threads, "threads": threads}
    data["cluster"] = {"num_cpus": max(ray_cpus, threads)}
    return data


def plain_loop(config_path: Path, threads: int, quiet_wait: float) -> dict:
    """The collect phase's work without the framework: collect_shard over the same shards, in process."""
    import torch

    from safecb.config import load_config
    from safecb.models.registry import load_model
    from safecb.prompts import load_prompts
    from safecb.stages import collect_shard
    from safecb.world import world_lexicon

    torch.set_num_threads(threads)
    cfg = load_config(config_path)
    model = load_model(cfg.model, cfg.categories, cfg.seed, batch_size=cfg.generation.batch_size)
    prompts = load_prompts(cfg.prompts.train, "prompts.train", cfg.storage.options)
    lexicon = dict(cfg.pairing.lexicon)
    if cfg.pairing.builtin_lexicon == "world":
        lexicon = {**world_lexicon(), **lexicon}
    per_shard = cfg.generation.prompts_per_shard
    shards = [prompts[i:i + per_shard] for i in range(0, len(prompts), per_shard)]
    collect_shard(model, shards[0], cfg, 0, lexicon)  # warm-up (iteration 0's seeds: other images), untimed
    wait_for_quiet(quiet_wait)
    load = Load()
    load.sample()
    usage = resource.getrusage(resource.RUSAGE_SELF)
    start = time.perf_counter()
    images = pairs = 0
    for shard in shards:  # iteration 1: the seeds the pipeline's collect phase draws
        result = collect_shard(model, shard, cfg, 1, lexicon)
        images += sum(r["role"] == "collect" for r in result.generations)
        pairs += len(result.pairs)
    seconds = time.perf_counter() - start
    done = resource.getrusage(resource.RUSAGE_SELF)
    load.sample()
    cpu = done.ru_utime + done.ru_stime - usage.ru_utime - usage.ru_stime
    return {"seconds": seconds, "cpu_s": round(cpu, 2), "images": images, "pairs": pairs, "prompts": len(prompts),
            "shards": len(shards), "other_load_cores": load.foreign_cores()}


def run_plain_loop(config: Path, threads: int, quiet_wait: float, report: Path) -> dict:
    """`plain_loop` in a fresh process, set up as Ray sets up an actor of `threads` CPUs (OMP_NUM_THREADS)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads),
           "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}".rstrip(os.pathsep)}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--_plain", str(config), str(threads), str(quiet_wait),
           str(report)]
    done = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"the plain loop exited {done.returncode}:\n{done.stderr[-3000:]}")
    for line in done.stdout.splitlines():
        log(line)
    return json.loads(report.read_text())


def measure_overhead(work: Path, args, threads: int) -> dict:
    """Pipeline and plain loop at `threads` threads, alternately, `world_repeats` times; the best time of each."""
    folder = work / f"world-t{threads}"
    pipelines, plains = [], []
    for repeat in range(args.world_repeats):
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        config = folder / "config.yaml"
        config.write_text(yaml.safe_dump(world_config(folder, threads, args.ray_cpus), sort_keys=False))
        log(f"  world model, 1 actor x {threads} thread(s): safecb run ({repeat + 1}/{args.world_repeats}) ...")
        res = run_driver(config, folder / "driver.json", folder / "driver.log", args)
        row = read_metrics(folder / "run")[-1]
        cpu = res["cpu_s_collect"]
        pipeline = {"seconds": row["stage_seconds"]["collect + pair"], "images": row.get("collect_images"),
                    "pairs": row.get("pairs"), "cores": res["cores_collect"],
                    "cpu_s": round(sum(v or 0.0 for v in cpu.values()), 2), "cpu_s_by_role": cpu}
        log(f"    collect phase {pipeline['seconds']} s (pairs {pipeline['pairs']}, images {pipeline['images']}; "
            f"cores busy meanwhile: {pipeline['cores']})")
        log(f"  world model, plain loop of collect_shard, {threads} thread(s) ({repeat + 1}/{args.world_repeats}) ...")
        plain = run_plain_loop(config, threads, args.quiet_wait, folder / "plain.json")
        log(f"    plain loop {plain['seconds']:.2f} s, {plain['cpu_s']} CPU s (pairs {plain['pairs']}, images "
            f"{plain['images']}, other load {plain['other_load_cores']} cores); pipeline CPU s {pipeline['cpu_s_by_role']}")
        if (pipeline["pairs"], pipeline["images"]) != (plain["pairs"], plain["images"]):
            raise RuntimeError(f"the plain loop did other work than the pipeline: pairs {plain['pairs']} vs "
                               f"{pipeline['pairs']}, images {plain['images']} vs {pipeline['images']}")
        pipelines.append(pipeline)
        plains.append(plain)
    best_pipeline = min(pipelines, key=lambda r: r["seconds"])
    best_plain = min(plains, key=lambda r: r["seconds"])
    return {"threads": threads, "pipeline_s": round(best_pipeline["seconds"], 2),
            "plain_loop_s": round(best_plain["seconds"], 2),
            "overhead_ratio": round(best_pipeline["seconds"] / best_plain["seconds"], 3),
            # CPU seconds of the pipeline's collect phase (driver + actor + Ray's processes) ÷ the plain loop's:
            # insensitive to other people's load on a shared machine (at 1 thread; OpenMP spin-waits inflate both at 2)
            "cpu_overhead_ratio": round(min(r["cpu_s"] for r in pipelines) / min(r["cpu_s"] for r in plains), 3),
            "pipeline_cpu_s": [r["cpu_s"] for r in pipelines], "plain_loop_cpu_s": [r["cpu_s"] for r in plains],
            "prompts": best_plain["prompts"], "shards": best_plain["shards"], "images": best_plain["images"],
            "pairs": best_plain["pairs"], "pipeline_runs_s": [r["seconds"] for r in pipelines],
            "plain_loop_runs_s": [round(r["seconds"], 2) for r in plains],
            "pipeline_cores_during_collect": [r["cores"] for r in pipelines],
            "plain_loop_other_load_cores": [r["other_load_cores"] for r in plains]}


# ---- report -------------------------------------------------------------------------------------

def print_table(scale: list[dict], overhead: list[dict]) -> None:
    if scale:
        log("\nload generator (a stand-in model: throughput and memory only), one `safecb run` per size; driver = "
            "the `safecb run` process alone, Ray's GCS/raylet/actors are the next column:")
        log("| prompts | shards | wall s | collect s | prompts/s (collect) | prompts/s (whole run) | driver peak RSS MB "
            "| Ray processes peak RSS MB | driver CPU ms/shard (collect) | prompts per actor CPU s "
            "| other load, cores (collect) |")
        log("|---|---|---|---|---|---|---|---|---|---|---|")
        for r in scale:
            log(f"| {r['prompts']:,} | {r['shards']} | {r['wall_s']:.1f} | {r['collect_s']:.2f} | {r['prompts_per_s']:,.0f} "
                f"| {r['run_prompts_per_s']:,.0f} | {r['driver_peak_rss_mb']:.0f} | {r['ray_procs_peak_rss_mb']:.0f} "
                f"| {r['driver_ms_per_shard']} | {r['prompts_per_actor_cpu_s']:,.0f} "
                f"| {r['other_load_cores']} ({r['other_load_cores_collect']}) |")
    if overhead:
        log("\nworld model on CPU, collect phase (generate + decode + self-judge + rewrite + counterpart), best of "
            f"{len(overhead[0]['pipeline_runs_s'])} each; cores = average busy cores of each role during the "
            "pipeline's collect phase (driver / Collector actor / Ray's own processes / outside this benchmark):")
        log("| threads | pipeline (1 actor) s | plain loop s | overhead ratio | CPU-time ratio | prompts | shards | images "
            "| pairs | runs: pipeline / plain s | cores (best pipeline run) |")
        log("|---|---|---|---|---|---|---|---|---|---|---|")
        for o in overhead:
            cores = o["pipeline_cores_during_collect"][o["pipeline_runs_s"].index(min(o["pipeline_runs_s"]))] or {}
            shown = " / ".join(str(cores.get(k)) for k in ("driver", "actors", "ray", "other"))
            log(f"| {o['threads']} | {o['pipeline_s']:.2f} | {o['plain_loop_s']:.2f} | {o['overhead_ratio']:.3f} | "
                f"{o['cpu_overhead_ratio']:.3f} | "
                f"{o['prompts']} | {o['shards']} | {o['images']} | {o['pairs']} | {o['pipeline_runs_s']} / "
                f"{o['plain_loop_runs_s']} | {shown} |")


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--_driver"]:
        driver_main(argv[1], argv[2])
        return 0
    if argv[:1] == ["--_plain"]:
        Path(argv[4]).write_text(json.dumps(plain_loop(Path(argv[1]), int(argv[2]), float(argv[3]))))
        return 0
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="10000,100000,1000000", help="prompt counts, one `safecb run` each")
    ap.add_argument("--workers", type=int, default=2, help="collector actors of the scale runs (1 CPU each)")
    ap.add_argument("--prompts-per-shard", type=int, default=1024)
    ap.add_argument("--batch-size", type=int, default=256, help="generation and judge batch of the scale runs")
    ap.add_argument("--finetune-steps", type=int, default=5)
    ap.add_argument("--eval-prompts", type=int, default=200, help="unsafe and as many benign eval prompts")
    ap.add_argument("--ray-cpus", type=int, default=2, help="cluster.num_cpus of the local Ray")
    ap.add_argument("--world-threads", default="1,2",
                    help="torch threads of the world actor and of the plain loop, one comparison each; the first is "
                         "the headline (1 leaves a core to the driver and Ray on 2 cores; 2 is configs/tiny.yaml's)")
    ap.add_argument("--world-repeats", type=int, default=3, help="world pipeline + plain loop pairs; the best of each")
    ap.add_argument("--quiet-wait", type=float, default=120,
                    help="before each timed part, wait up to this many seconds for other processes to go quiet")
    ap.add_argument("--skip-scale", action="store_true")
    ap.add_argument("--skip-world", action="store_true")
    ap.add_argument("--timeout", type=float, default=3600, help="seconds one `safecb run` may take")
    ap.add_argument("--workdir", default=None, help="where runs and prompt files go (default: a temp folder)")
    ap.add_argument("--keep", action="store_true", help="keep the run folders and prompt files")
    ap.add_argument("--json", action="store_true", help="print one JSON line last")
    ap.add_argument("--save", action="store_true", help=f"with --json: also write it to {RESULT.relative_to(ROOT)}")
    args = ap.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    world_threads = [int(s) for s in args.world_threads.split(",") if s.strip()]
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="safecb-collect-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    settings = {"sizes": sizes, "workers": args.workers, "cpus_per_worker": 1, "threads_per_worker": 1,
                "prompts_per_shard": args.prompts_per_shard, "batch_size": args.batch_size, "samples_per_prompt": 1,
                "finetune_steps": args.finetune_steps, "finetune_backend": "torch", "pairing_rewrite": "model",
                "eval_prompts": [args.eval_prompts, args.eval_prompts],
                "ray_cpus": args.ray_cpus, "world_config": "configs/tiny.yaml", "world_threads": world_threads,
                "world_repeats": args.world_repeats, "cpu_count": os.cpu_count(),
                "driver_rss": "getrusage(RUSAGE_SELF).ru_maxrss of the driver process at exit (Ray's processes excluded)"}
    scale: list[dict] = []
    overhead: list[dict] = []
    try:
        if not args.skip_scale:
            log(f"scale runs in {work}")
            write_prompts(work / "eval_unsafe.txt", args.eval_prompts, "eval unsafe")
            write_prompts(work / "eval_benign.txt", args.eval_prompts, "eval benign", unsafe_every=0)
            for n in sizes:
                scale.append(measure_scale(n, work, args))
        if not args.skip_world:
            overhead = [measure_overhead(work, args, threads) for threads in world_threads]
    finally:
        if not args.workdir and not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print_table(scale, overhead)
    by_size = {str(r["prompts"]): r for r in sorted(scale, key=lambda r: r["prompts"])}
    smallest, largest = (min(scale, key=lambda r: r["prompts"]), max(scale, key=lambda r: r["prompts"])) if scale else ({}, {})
    result = {
        "driver_rss_mb": {k: r["driver_peak_rss_mb"] for k, r in by_size.items()},
        "driver_rss_growth_mb": (round(largest["driver_peak_rss_mb"] - smallest["driver_peak_rss_mb"], 1)
                                 if len(scale) > 1 else None),
        "prompts_per_s": largest["prompts_per_s"] if scale else None,
        "prompts_per_actor_cpu_s": largest["prompts_per_actor_cpu_s"] if scale else None,
        "overhead_ratio": overhead[0]["overhead_ratio"] if overhead else None,
        "world_pipeline_s": overhead[0]["pipeline_s"] if overhead else None,
        "world_plain_loop_s": overhead[0]["plain_loop_s"] if overhead else None,
        "world_threads": overhead[0]["threads"] if overhead else None,
        "overhead_ratio_by_threads": {str(o["threads"]): o["overhead_ratio"] for o in overhead},
        "cpu_overhead_ratio_by_threads": {str(o["threads"]): o["cpu_overhead_ratio"] for o in overhead},
        "settings": settings,
        "scale": by_size,
        "world": {str(o["threads"]): o for o in overhead},
    }
    if args.json:
        line = json.dumps(result)
        if args.save:
            RESULT.parent.mkdir(parents=True, exist_ok=True)
            # keep the gpu_* keys that benchmarks/collect_gpu.py measured on a GPU machine
            kept = {k: v for k, v in json.loads(RESULT.read_text()).items() if k.startswith("gpu")} \
                if RESULT.exists() else {}
            RESULT.write_text(json.dumps({**result, **kept}) + "\n")
            log(f"wrote {RESULT.relative_to(ROOT)}")
        print(line, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
