"""The judge's language-model pass with the engine's Triton kernels, in Triton's interpreter on the CPU.

(tests/models/test_janus.py holds the pass on the torch backend, its fallbacks and its GPU check.)
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap

import pytest

CHECK = textwrap.dedent("""
    import json, torch
    from safecb.models import judge_pass
    from safecb.models.engine import JanusEngine
    from safecb.models.janus import JanusAdapter
    from safecb.models.tiny import build_tiny_janus

    model, processor = build_tiny_janus(["red", "circle", "blood", "a", "on", "grass"], seed=0)
    adapter = JanusAdapter(model, processor)
    engine = JanusEngine(adapter.model, max_batch=1, max_prompt_len=64, num_image_tokens=adapter.num_image_tokens,
                         backend="triton")
    adapter._fast_engine = lambda: engine  # the CPU has no engine of its own
    images = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(7))
    categories = ["blood", "violence", "red circle"]
    launches = []
    kernel = judge_pass._rope_split_kernel
    class Counting:
        def __getitem__(self, grid):
            launches.append(grid)
            return kernel[grid]
    with torch.no_grad():
        judge_pass._rope_split_kernel = Counting()
        fused = adapter.judge(images, categories, "Does this image contain {category} content?")
        judge_pass._rope_split_kernel = kernel
        judge_pass.triton, triton = None, judge_pass.triton  # the same pass with torch's RoPE
        torch_rope = adapter.judge(images, categories, "Does this image contain {category} content?")
        judge_pass.triton = triton
        adapter.fused_judge = False
        plain = adapter.judge(images, categories, "Does this image contain {category} content?")
    print("RESULT" + json.dumps({"launches": len(launches), "vs_torch_rope": (fused - torch_rope).abs().max().item(),
                                 "vs_hugging_face": (fused - plain).abs().max().item(),
                                 "layers": len(engine.layers)}))
""")


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_judge_pass_with_triton_kernels_in_interpreter_follows_hugging_faces_layers():
    """The pass on the Triton backend (fused residual add + RMSNorm, SiLU·up, and the RoPE kernel that
    writes queries, keys and values straight into the attention layout) gives Hugging Face's numbers."""
    run = subprocess.run([sys.executable, "-c", CHECK], env=dict(os.environ, TRITON_INTERPRET="1"),
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0 and "RESULT" in run.stdout, run.stderr[-3000:]
    result = json.loads(run.stdout.split("RESULT", 1)[1])
    assert result["launches"] == 2 * result["layers"]  # prefix and questions, every layer: the kernel ran
    assert result["vs_torch_rope"] < 1e-5, result
    assert result["vs_hugging_face"] < 1e-5, result
