"""fp8 KV cache against the bf16 cache on the shipped world model (GPU): do the tokens change?

For the world's eval prompts (unsafe + benign, 2 samples each) and every fp8 attention kernel named:
  * greedy, free-running: share of tokens equal to the bf16 engine's (one flip changes the rest of an image);
  * greedy, teacher-forced: the bf16 tokens fed back to both, so each step is compared on the same history;
  * sampling (the loop's setting, guidance 3, T = 1): share of tokens and of whole images equal.
The effect on the external judge and on fidelity is measured by `safecb world eval --kv-dtype fp8`.

    python benchmarks/world_kv_agreement.py [--attn 16,1,1,sum2p --attn 128,4,1,sum]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from safecb.models.base import SamplingParams  # noqa: E402
from safecb.models.engine import DEFAULT_ATTN_CONFIG, JanusEngine  # noqa: E402
from safecb.models.janus import JanusAdapter  # noqa: E402
from safecb.world import WORLD_MODEL_DIR  # noqa: E402
from safecb.world.prompts import builtin_prompts  # noqa: E402


def agreement(a: torch.Tensor, b: torch.Tensor) -> dict:
    same = a == b
    return {"token_agreement": float(same.float().mean()), "images_identical": float(same.all(1).float().mean())}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--attn", action="append", default=None,
                    help="fp8 attention config 'block_n,warps,stages,variant' (repeatable; default the engine's)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "world-kv-agreement-h200.json"))
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("world_kv_agreement.py needs a CUDA GPU")
        return 2
    configs = [tuple(int(x) if x.isdigit() else x for x in a.split(",")) for a in (args.attn or [])] or \
        [DEFAULT_ATTN_CONFIG["fp8"]]
    adapter = JanusAdapter.from_folder(WORLD_MODEL_DIR, device="cuda", dtype="bfloat16", engine="off")
    records = builtin_prompts("world:eval_unsafe") + builtin_prompts("world:eval_benign")
    texts = [r.text for r in records for _ in range(2)]
    seeds = torch.arange(len(texts), device="cuda") + 7
    ids, mask = adapter.generation_inputs(texts)
    special = (adapter.bos_id, adapter.boi_id, adapter.pad_id)
    greedy, sample = SamplingParams(guidance=3.0, temperature=0.0), SamplingParams(guidance=3.0, temperature=1.0)

    def engine(kv: str, config=None) -> JanusEngine:
        return JanusEngine(adapter.model, max_batch=len(texts), max_prompt_len=ids.shape[1],
                           num_image_tokens=adapter.num_image_tokens, kv_dtype=kv, attn_config=config)

    ref = engine("bf16")
    ref_greedy = ref.generate(ids, mask, seeds, greedy, *special)
    ref_sample = ref.generate(ids, mask, seeds, sample, *special)
    res = {"images": len(texts), "tokens_per_image": adapter.num_image_tokens, "fp8": {}}
    for config in configs:
        e = engine("fp8", config)
        row = {"greedy_free_running": agreement(e.generate(ids, mask, seeds, greedy, *special), ref_greedy),
               "greedy_teacher_forced": agreement(
                   e.generate(ids, mask, seeds, greedy, *special, forced_tokens=ref_greedy), ref_greedy),
               "sampling": agreement(e.generate(ids, mask, seeds, sample, *special), ref_sample)}
        res["fp8"][",".join(map(str, e.attn_config))] = row
        print(f"fp8 {e.attn_config}: " + "; ".join(f"{k} tokens {v['token_agreement']:.3f} images "
                                                   f"{v['images_identical']:.3f}" for k, v in row.items()), flush=True)
    text = json.dumps(res, indent=1)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], Path(args.out).name).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
