"""VQ decode and self-judge on one GPU, Janus-Pro-1B shapes: options side by side, and where the time goes.

The loop decodes and self-judges every image it generates (and every counterpart), so their rate
bounds collection beside generation. This times, on the same images:
  * the VQ decoder: the fused GroupNorm + SiLU forward (safecb/models/vq_decoder.py) in channels-last
    and contiguous layout (and, as an A/B, channels-last with the upsampling convolutions as 2x2 kernels
    over the input: `decoder_subpixel_upsample`), against Hugging Face's forward; and how far each bf16
    forward draws from the fp32 decode of the same tokens (mean and largest pixel difference). cuDNN autotuning
    (`torch.backends.cudnn.benchmark`) was timed here before and changed nothing (278.1 against 278.3
    images/s on an H200);
  * the self-judge (vision encoder + language model over the image and the category questions) at
    several batch sizes, its language-model pass on the engine's fused weights and on Hugging Face's
    layers, and its vision encoder alone;
  * with `--profile`, the top CUDA kernels of one decode batch and one judge batch.
Weights are random with the real shapes (throughput does not depend on the values); the images are
decodes of random tokens.

    PYTHONPATH=. python benchmarks/decode_judge.py [--images 512] [--profile] [--json]
    PYTHONPATH=. python benchmarks/decode_judge.py --tiny     # CPU smoke run at toy shapes
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

QUESTION = "Does this image contain {category} content?"


def top_kernels(fn, device: torch.device, count: int = 12) -> list[dict]:
    """The `count` kernels with the most device time in one call of fn (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
    attr = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    events = sorted(prof.key_averages(), key=lambda e: getattr(e, attr, 0), reverse=True)
    total = sum(getattr(e, attr, 0) for e in events) or 1
    return [{"name": e.key[:90], "ms": round(getattr(e, attr, 0) / 1e3, 2), "share": round(getattr(e, attr, 0) / total, 3),
             "calls": e.count} for e in events[:count]]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--batch", type=int, default=64, help="decode batch, and the judge's for the profile")
    parser.add_argument("--judge-batches", default="32,64,128")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--tiny", action="store_true", help="toy shapes on the CPU: a smoke run of this script")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--out", default=None, help="also write the result to this JSON file")
    args = parser.parse_args(argv)

    from collect_gpu import CATEGORIES, build_folder
    from generation import timed

    from safecb.models.janus import JanusAdapter

    folder = Path(tempfile.mkdtemp(prefix="safecb-decode-judge-")) / "model"
    build_folder(folder, args.tiny)
    # The engine (a small cache: only its fused weights serve the judge) for the judge's fused pass.
    model = JanusAdapter.from_folder(folder, device="cpu" if args.tiny else "cuda",
                                     dtype="float32" if args.tiny else "bfloat16", engine="auto", max_batch=8)
    device = model.device
    codes = model.model.model.vqmodel.quantize.embedding.weight.shape[0]
    images, batch = (16, 8) if args.tiny else (args.images, args.batch)
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, codes, (images, model.num_image_tokens), generator=generator)
    result: dict = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                    "torch": torch.__version__, "images": images, "categories": len(CATEGORIES)}
    rows = []

    def decode_all():
        return [model.decode(tokens[i:i + batch]) for i in range(0, images, batch)]

    with torch.no_grad():
        decode, outputs = {}, {}
        variants = (("fused, channels-last", True, True, False), ("fused, contiguous", True, False, False),
                    ("hugging face, contiguous", False, False, False),
                    ("fused, channels-last, sub-pixel", True, True, True))  # the A/B of the 2x2 upsampling (off by default)
        for name, fused, nhwc, subpixel in variants:
            model.fused_decoder, model.decoder_channels_last, model.decoder_subpixel_upsample = fused, nhwc, subpixel
            outputs[name] = decode_all()[0].float()  # warm-up: layout conversion, kernel compilation
            _, seconds = timed(decode_all, device)
            decode[name] = round(images / seconds, 1)
            rows.append(("VQ decode, " + name, images / seconds))
        model.fused_decoder, model.decoder_channels_last, model.decoder_subpixel_upsample = True, True, False
        result["decode_img_per_s"] = decode
        # Each bf16 forward against the fp32 decode (Hugging Face's forward, the same weights in fp32).
        vq, dtype = model.model.model.vqmodel, model.dtype
        vq.float()
        model.dtype, model.fused_decoder = torch.float32, False
        exact = model.decode(tokens[:batch]).float()
        vq.to(dtype)
        model.dtype, model.fused_decoder = dtype, True
        result["decode_pixel_error_vs_fp32"] = {
            name: {"mean": round(float((out - exact).abs().mean()), 6), "max": round(float((out - exact).abs().max()), 5)}
            for name, out in outputs.items()}
        pixels = torch.cat([p.to(torch.bfloat16 if device.type == "cuda" else torch.float32) for p in decode_all()])

        judge = {}
        sizes = [8] if args.tiny else [int(x) for x in args.judge_batches.split(",")]
        passes = ("fused", "hugging face") if model.uses_engine else ("hugging face",)
        for name in passes:
            model.fused_judge = name == "fused"
            for size in sizes:
                def judge_all(size=size):
                    return [model.judge(pixels[i:i + size], CATEGORIES, QUESTION) for i in range(0, images, size)]
                judge_all()
                _, seconds = timed(judge_all, device)
                judge[f"{name}, batch {size}"] = round(images / seconds, 1)
                rows.append((f"self-judge ({name} layers), batch {size}", images / seconds))
        model.fused_judge = True
        result["judge_img_per_s"] = judge

        def vision_all():
            for i in range(0, images, batch):
                model.model.model.get_image_features(model._judge_pixels(pixels[i:i + batch]))
        vision_all()
        _, seconds = timed(vision_all, device)
        result["judge_vision_img_per_s"] = round(images / seconds, 1)
        rows.append(("self-judge: vision encoder alone", images / seconds))

        if args.profile:
            result["profile_decode"] = top_kernels(lambda: model.decode(tokens[:batch]), device)
            result["profile_judge"] = top_kernels(
                lambda: model.judge(pixels[:batch], CATEGORIES, QUESTION), device)
            if model.uses_engine:
                model.fused_judge = False
                result["profile_judge_hugging_face"] = top_kernels(
                    lambda: model.judge(pixels[:batch], CATEGORIES, QUESTION), device)
                model.fused_judge = True

    print(f"{'images/s (' + str(images) + ' images)':44} {'rate':>8}")
    for name, rate in rows:
        print(f"{name:44} {rate:>8.1f}")
    for name, error in result["decode_pixel_error_vs_fp32"].items():
        print(f"VQ decode, {name}: pixels against fp32, mean {error['mean']:.5f}, max {error['max']:.4f}")
    for key in ("profile_decode", "profile_judge", "profile_judge_hugging_face"):
        if key in result:
            print(f"\n{key.removeprefix('profile_')}, one batch of {batch}: kernels by device time")
            for k in result[key]:
                print(f"  {k['ms']:8.2f} ms {k['share']:6.1%} x{k['calls']:<5} {k['name']}")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    if args.json:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
