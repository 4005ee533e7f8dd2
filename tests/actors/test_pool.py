"""The collector pool under failure: more actors, a killed actor, a killed driver, damaged storage.

Every run here is the tiny random model's 2-iteration loop (CPU, one thread per actor) and is held
to the session's uninterrupted 1-actor run (`tiny_run`, the `baseline`): what it wrote (`comparable`,
and the shards' rows) must not depend on how many actors ran, on what died, or on how often it resumed.
A failure inside iteration 2 is staged on a copy of the baseline rewound to the end of iteration 1
(`rewound`): only iteration 2 runs again, and its codebook v2, a deterministic function of iteration
2's shards, is reused as an interrupted run's complete artifact is — so the check is on the shards
themselves (their rows and sha256), which is what a kill can change.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from rich.console import Console

from safecb.actors.collector import ShardTask
from safecb.actors.pool import CollectorPool, PoolError
from safecb.config import parse_config
from safecb.controller import RunError, run
from safecb.prompts import PromptError, read_prompt_range
from safecb.schemas import GENERATION_SCHEMA, PAIR_SCHEMA
from safecb.storage import RunStore
from tests_support import VOLATILE, cmdline, comparable, config_for, copy_run, rewound, tiny_config, wait_for

pytestmark = pytest.mark.usefixtures("ray_cluster")  # one local Ray for every in-process run here

WAIT_S = 300  # generous bound for any one run on a loaded 2-core CI machine
TABLES = {"generations": GENERATION_SCHEMA, "pairs": PAIR_SCHEMA, "eval": GENERATION_SCHEMA}


@pytest.fixture(scope="module")
def baseline(tiny_run):
    """The uninterrupted 1-actor run: 6 train prompts in 3 shards, 3 eval prompts in 2, 2 iterations."""
    return tiny_run


def rows(store: RunStore) -> dict:
    """Every row of every table the manifests list, per (iteration, kind), in a canonical order."""
    out = {}
    for iteration in store.manifest_iterations():
        manifest = store.read_manifest(iteration)
        for kind, schema in TABLES.items():
            table = store.read_table(manifest, kind, schema).to_pylist()
            out[(iteration, kind)] = sorted(table, key=lambda r: (r["prompt_id"], r["sample_index"],
                                                                  r.get("role") or r["counterpart"]))
    return out


def assert_served_versions(table_rows: dict) -> None:
    """Iteration t collects with v(t-1) and evaluates v(t)."""
    for (iteration, kind), table in table_rows.items():
        if iteration == 0 and kind != "eval":
            continue  # iteration 0 only evaluates v0
        expected = iteration if kind == "eval" else iteration - 1
        assert table and {r["codebook_version"] for r in table} == {expected}, (iteration, kind)


def listing(root: Path) -> dict:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*") if p.is_file()}


def processes_of(session: int, marker: str) -> list[int]:
    """Live processes in `session`, or whose command line names `marker` (the Ray temp dir)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        state, _, _, sid = stat[stat.rindex(")") + 2:].split()[:4]
        if state != "Z" and (int(sid) == session or marker in cmdline(int(entry))):
            found.append(int(entry))
    return found


# ---- 1. scale-out ------------------------------------------------------------------------------
def test_two_actors_write_what_one_actor_writes_row_for_row(baseline, tmp_path):
    config = config_for(baseline, tmp_path / "run", resources={"num_workers": 2, "cpus_per_worker": 1, "threads": 1})
    run(config)
    store = RunStore(str(tmp_path / "run"))
    manifests = [store.read_manifest(i) for i in store.manifest_iterations()]
    assert [len(m.shards["generations"]) for m in manifests[1:]] == [3, 3], "expected several shards per iteration"
    assert {r.actor for m in manifests for records in m.shards.values() for r in records} == \
        {"collector-0", "collector-1"}, "both actors should have written shards"
    assert rows(store) == rows(baseline.store)
    assert comparable(store) == comparable(baseline.store)


# ---- 2. an actor dies ----------------------------------------------------------------------------
def test_an_actor_killed_mid_shard_is_restarted_with_the_current_codebook(baseline, tmp_path, monkeypatch):
    pools: list[CollectorPool] = []
    start_pool = CollectorPool.__init__

    def remember(self, *args, **kwargs):  # the driver side of the pool, to learn its actors' pids
        start_pool(self, *args, **kwargs)
        pools.append(self)

    monkeypatch.setattr(CollectorPool, "__init__", remember)
    config, store, root = rewound(baseline, tmp_path)
    outcome: dict = {}

    def loop():
        try:
            outcome["metrics"] = run(config, resume=True)
        except BaseException as err:  # noqa: BLE001 - reported by the assertions below
            outcome["error"] = err

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    # The first shard object of iteration 2: that shard's pairs and the next shard are still in flight.
    # Iteration 2, not 1: there the current codebook (v1) is not the model's own, so an actor that came
    # back serving what it loaded would draw other rows, or tag them with another version.
    wait_for(lambda: any((root / "iter=0002" / "generations").glob("shard-*.parquet")), thread.is_alive,
             "iteration 2's first shard", WAIT_S)
    assert not (root / "iter=0002" / "MANIFEST.json").exists()
    pid = pools[0].info[0]["pid"]
    assert cmdline(pid).startswith("ray::Collector"), cmdline(pid)
    os.kill(pid, signal.SIGKILL)
    thread.join(WAIT_S)
    assert not thread.is_alive() and "error" not in outcome, outcome

    attempts = [r.attempt for records in store.read_manifest(2).shards.values() for r in records]
    assert any(a.startswith("a1-") for a in attempts), f"no shard was re-queued after the kill: {attempts}"
    table_rows = rows(store)
    assert {key: len(t) for key, t in table_rows.items()} == {key: len(t) for key, t in rows(baseline.store).items()}
    assert table_rows == rows(baseline.store)  # no row lost, none doubled, none different
    assert_served_versions(table_rows)
    assert comparable(store) == comparable(baseline.store)


# ---- 3. the driver dies --------------------------------------------------------------------------
def test_a_driver_killed_mid_iteration_resumes_to_the_same_run(baseline, tmp_path):
    config, store, root = rewound(baseline, tmp_path, cluster={"num_cpus": 1})
    config_file = tmp_path / "config.yaml"
    config_file.write_text(config.to_yaml())
    commits, manifest = root / "iter=0002" / "_commits", root / "iter=0002" / "MANIFEST.json"
    # Its own local Ray (never the session's: no RAY_ADDRESS), under a temp dir of its own so that
    # every process of it can be found afterwards; short, as Ray's socket paths must stay < 108 chars.
    ray_tmp = tempfile.mkdtemp(prefix="rk", dir="/tmp")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["RAY_TMPDIR"] = ray_tmp
    with open(tmp_path / "driver.log", "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "safecb.cli", "run", "--config", str(config_file), "--resume"],
                                env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for(lambda: any(commits.glob("*.json")), lambda: proc.poll() is None, "iteration 2's first commit",
                 WAIT_S, lambda: (tmp_path / "driver.log").read_text()[-2000:])
        os.killpg(proc.pid, signal.SIGKILL)  # the driver, its GCS and raylet
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)
        # Ray gives each worker (our Collector) a process group of its own, so killpg misses it; it
        # stays in the driver's session (and Ray's own processes name ray_tmp): end those by pid.
        deadline = time.monotonic() + 30
        while (left := processes_of(proc.pid, ray_tmp)) and time.monotonic() < deadline:
            for pid in left:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.1)
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert proc.returncode == -signal.SIGKILL
    assert left == [], f"the killed driver's Ray processes outlived SIGKILL: {[cmdline(p)[:80] for p in left]}"
    assert not manifest.exists(), "the driver finished iteration 2 before it was killed"
    kept = {(r.kind, r.index): r for kind in ("generations", "pairs") for r in store.committed_shards(2, kind).values()}
    assert kept

    run(config, resume=True)
    resumed = store.read_manifest(2).shards
    for (kind, index), record in kept.items():  # a committed shard is never redone
        assert resumed[kind][index] == record
    assert comparable(store) == comparable(baseline.store)


# ---- 4-6. resume after damage ------------------------------------------------------------------
@dataclass
class Damaged:
    store: RunStore
    before: dict  # iteration 2's commits before the damage, per kind
    valid_before: list[int]  # the iterations `valid_manifests` saw before the resume
    output: str  # what the resume printed


@pytest.fixture(scope="module")
def damaged(baseline, tmp_path_factory) -> Damaged:
    """One resume of a copy whose iteration 2 was left with every kind of damage at once (each test
    below checks one of them): a torn manifest, a stale and a bit-flipped shard object, an empty
    metrics file. One pool start and one iteration-2 redo instead of one per kind of damage."""
    config, store, root = copy_run(baseline, tmp_path_factory.mktemp("damaged"))
    manifest = root / "iter=0002" / "MANIFEST.json"
    manifest.write_bytes(manifest.read_bytes()[: manifest.stat().st_size // 2])
    before = {kind: store.committed_shards(2, kind) for kind in ("generations", "pairs")}
    # (a) a stale commit: its object was rewritten with other bytes of the same size
    stale = root / before["generations"][0].path
    stale.write_bytes(bytes(b ^ 0xFF for b in stale.read_bytes()))
    # (b) one flipped bit in another shard's committed pairs object
    flipped = root / before["pairs"][1].path
    data = bytearray(flipped.read_bytes())
    data[len(data) // 2] ^= 0x01
    flipped.write_bytes(bytes(data))
    (root / "metrics.jsonl").write_text("")
    valid_before = [m.iteration for m in store.valid_manifests()]
    out = io.StringIO()
    run(config, resume=True, console=Console(file=out, width=200))
    return Damaged(store, before, valid_before, out.getvalue())


def test_resume_redoes_exactly_the_damaged_shards_of_an_unfinished_iteration(baseline, damaged):
    generations, pairs = damaged.before["generations"], damaged.before["pairs"]
    shards = damaged.store.read_manifest(2).shards
    assert shards["generations"][0].path != generations[0].path and shards["pairs"][1].path != pairs[1].path
    assert shards["pairs"][0] == pairs[0] and shards["generations"][1] == generations[1], \
        "a kind whose commit is valid must not be redone"
    assert shards["generations"][2] == generations[2] and shards["pairs"][2] == pairs[2]
    assert comparable(damaged.store) == comparable(baseline.store)


def test_a_torn_manifest_is_not_a_finished_iteration(baseline, damaged):
    assert damaged.valid_before == [0, 1]
    assert "after iteration 1" in damaged.output
    assert damaged.store.has_manifest(2)
    assert comparable(damaged.store) == comparable(baseline.store)


def test_an_empty_metrics_file_does_not_break_resume(baseline, damaged):
    strip = lambda rows_: [{k: v for k, v in row.items() if k not in VOLATILE} for row in rows_]  # noqa: E731
    assert [r["iteration"] for r in damaged.store.read_metrics()] == [0, 1, 2]
    assert strip(damaged.store.read_metrics()) == strip(baseline.store.read_metrics())


# ---- 7. refusals: one line, nothing written -----------------------------------------------------
def test_resume_with_changed_prompt_content_is_refused(baseline, tmp_path):
    config, _, root = copy_run(baseline, tmp_path)
    train = baseline.tmp / "prompts" / "train.txt"
    original = train.read_text()
    before = listing(root)
    try:
        train.write_text(original.replace("red grass", "green grass"))  # same path, same config hash
        with pytest.raises(RunError, match="train prompts changed") as err:
            run(config, resume=True)
    finally:
        train.write_text(original)
    assert "\n" not in str(err.value)
    assert listing(root) == before


def test_a_prompt_file_of_unknown_format_is_refused_at_start(tmp_path):
    data = tiny_config(tmp_path, tmp_path / "run")
    sheet = tmp_path / "prompts" / "train.xlsx"  # (.csv is a prompt format since I2P/CoProV2 support)
    sheet.write_text("text\na blood circle\n")
    data["prompts"]["train"] = {"path": str(sheet)}
    with pytest.raises(PromptError, match=r"prompts\.train\.path: .*unknown prompt file extension '\.xlsx'") as err:
        run(parse_config(data))
    assert "\n" not in str(err.value)
    assert not (tmp_path / "run").exists()


def test_a_prompt_over_the_engine_length_is_refused_or_truncated(tmp_path):
    # the tiny model sees a prompt as its words + 4 tokens (format, begin-of-image): 4 words fit in 8
    data = tiny_config(tmp_path, tmp_path / "run", model={"engine": {"max_prompt_len": 8}})
    train = tmp_path / "prompts" / "train.txt"
    train.write_text(train.read_text() + "blood on red grass in a circle\n")  # line 7: 11 tokens
    with pytest.raises(PromptError, match=r"prompt 'train:7' is 11 tokens .*model\.engine\.max_prompt_len") as err:
        run(parse_config(data))
    assert "\n" not in str(err.value)
    assert not (tmp_path / "run").exists()

    data["prompts"]["too_long"] = "truncate"
    run(parse_config(data), until=0)
    store = RunStore(str(tmp_path / "run"))
    assert store.read_manifest(0).inputs["prompts"]["train"]["truncated"] == 1
    assert read_prompt_range(store, "train", 6, 7)[0].text == "blood on red grass"


# ---- 8. an application error ends its shard, not the world --------------------------------------
def test_an_application_error_fails_its_shard_after_max_task_attempts(baseline, tmp_path):
    config, store, root = copy_run(baseline, tmp_path, cluster={"max_task_attempts": 2})
    current = json.loads(store.read_text("codebooks/CURRENT.json"))
    # rows 100-102 of a 6-row snapshot: the collector raises ValueError on every try
    task = ShardTask("collect", 7, 0, 100, 102, current["version"], current["sha256"])
    pool = CollectorPool(config, str(root))
    results, outcome = [], {}

    def work():
        try:
            pool.run([task], "collect", results.append)
        except BaseException as err:  # noqa: BLE001 - reported by the assertions below
            outcome["error"] = err

    try:
        started = time.monotonic()
        thread = threading.Thread(target=work, daemon=True)
        thread.start()
        thread.join(120)
        elapsed = time.monotonic() - started
        assert not thread.is_alive(), "the pool kept retrying an application error"
    finally:
        pool.shutdown()
    err = outcome.get("error")
    assert isinstance(err, PoolError), outcome
    message = str(err)
    assert "collect shard 0 (rows 100-102) failed 2 times" in message and "ValueError" in message, message
    assert "outside snapshot" in message and "\n" not in message, message
    assert results == [] and elapsed < 60
    assert not (root / "iter=0007").exists()
