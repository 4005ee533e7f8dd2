"""CUDA C++ kernels the engine compiles on first use (torch's JIT extension builder: needs nvcc + ninja).

Only where Triton cannot reach the memory bandwidth: decode attention over an fp8 cache
(`fp8_decode_attention.cu` says why). Compiled once per machine into torch's extension cache
(~1 min the first time); `load_error()` says why a machine cannot build it, and the engine then
falls back to its Triton kernel.
"""

from __future__ import annotations

import functools
from pathlib import Path

SOURCE = Path(__file__).with_name("fp8_decode_attention.cu")
_SIGNATURE = ("void fp8_decode_attention(torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache, "
              "torch::Tensor k_scale, torch::Tensor v_scale, torch::Tensor start, torch::Tensor slot, "
              "torch::Tensor prompt_row, torch::Tensor prompt_end, "
              "torch::Tensor out, torch::Tensor partial, torch::Tensor lse, int64_t splits, double qk_scale, "
              "int64_t keys_per_iter, int64_t warps_per_block, int64_t stages);")

# (keys per warp iteration, stages) pairs the .cu file instantiates; stages 1 = loads into registers,
# stages > 1 = a cp.async ring of that many tiles in shared memory.
CUDA_TILES = ((8, 1), (16, 1), (32, 1), (16, 2), (16, 3), (16, 4), (32, 2), (32, 3), (32, 4))


@functools.cache
def _build():
    from torch.utils.cpp_extension import load_inline

    return load_inline(name="safecb_fp8_decode_attention", cpp_sources=_SIGNATURE, cuda_sources=SOURCE.read_text(),
                       functions=["fp8_decode_attention"], extra_cuda_cflags=["-O3"], verbose=False)


def fp8_decode_attention_module():
    """The compiled module (built on the first call); raises RuntimeError with the reason if it cannot."""
    try:
        return _build()
    except Exception as err:  # noqa: BLE001 - compiler missing, wrong toolkit, ...: one reason
        text = str(err).strip().splitlines()
        raise RuntimeError(f"cannot build the CUDA fp8 attention kernel: {text[-1][:200] if text else err!r}") from None


def load_error() -> str | None:
    """None when the kernel builds here, else why not (one line)."""
    try:
        fp8_decode_attention_module()
    except RuntimeError as err:
        return str(err)
    return None
