"""A fast image-token generation engine for Janus: static KV cache, CUDA graph, Triton decode kernels.

Same contract as `safecb.models.generation.generate_image_tokens` (the adapter swaps them):
conditional and unconditional rows in one 2B batch (unconditional = every token but BOS/BOI padded),
positions = cumsum(mask) - 1 (left padding is safe), CFG `uncond + w (cond - uncond)` on float logits,
tokens from `safecb.models.sampling.sample_tokens` (per-sample seeds, batch-independent).

How it is fast (decoding is bound by reading the KV cache, then by the step's matrix products):
  * its own compact Llama decode forward over the HF module's weights: q/k/v fused into one matrix,
    gate/up into one, so a layer is 4 GEMMs (cuBLAS) + 4 small fused Triton kernels
    (residual add + RMSNorm, RoPE + cache write (+ fp8 quantisation), decode attention, SiLU x up);
  * a preallocated static KV cache (layers, 2*max_batch, kv_heads, max_len, head_dim); the attention
    kernel reads only each row's valid slots [first real prompt token, current slot], split along the
    sequence when the batch is too small to fill the GPU (flash-decoding), one pass over the bytes;
  * optional fp8 (e4m3) cache with one fp32 scale per (row, head, slot): half the bytes to read, by a
    CUDA C++ kernel (`fp8_decode_attention.cu`) that streams tiles through a cp.async ring;
  * the unconditional prompts (BOS, pads, BOI) differ only by length: the prefill runs each distinct one
    once, and the attention kernels read those prompt slots from that one row (L2), not from a copy per
    row (the same values, in the same order: the result does not change);
  * the whole decode step (embed -> 24 layers -> head -> CFG -> sampling -> token bookkeeping) captured
    once per (batch size, sampling params) in a CUDA graph and replayed N-1 times; step counters live
    on the device, so one graph serves every step and every prompt length.

On CPU (or with `backend="torch"`) the same engine runs with plain torch ops and no graph: CI checks
its tokens against `generate_image_tokens` and HF `generate` there. With `backend="triton"` on CPU and
TRITON_INTERPRET=1 the Triton kernels run in Triton's interpreter (a local check of the kernels).

Weights are read from the HF module when the engine is built (bf16 on CUDA). Matrices that need no
fusion or cast are shared, not copied. If the module's parameters change afterwards (in-place update
or replacement), the next `generate` notices (data pointer / version counter) and rebuilds.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch
import torch.nn.functional as F

from safecb.models.base import SamplingParams
from safecb.models.generation import cfg_batch
from safecb.models.sampling import cfg_logits, sample_tokens

try:  # Triton is optional: absent on CPU-only machines, where the torch backend runs.
    import triton
    import triton.language as tl
except Exception:  # noqa: BLE001 - any import failure means "no Triton"
    triton = None
    tl = None

FP8_MAX = 448.0  # largest finite float8_e4m3fn
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
KV_DTYPES = ("bf16", "fp8")
# Decode attention: keys per tile, warps per program, pipeline stages, kernel variant; by cache type.
# Measured on an H200 (benchmarks/results/decode-step-h200.json, 512 / 1280 rows): bf16 Triton "dot" 4.3 /
# 4.5 TB/s; over the fp8 cache the CUDA C++ kernel with a 3-tile cp.async ring of 32 keys, 2 warps a block,
# 3.9 / 4.25, Triton's best ("sum2p") 3.0 / 3.2.
DEFAULT_ATTN_CONFIG = {"bf16": (64, 4, 3, "dot"), "fp8": (32, 2, 3, "cuda")}
FALLBACK_ATTN_CONFIG = (16, 1, 1, "sum2p")  # fp8 when the CUDA kernel cannot be built or used
log = logging.getLogger(__name__)


def engine_available(device: torch.device | str) -> tuple[bool, str]:
    """Whether the fast engine can run on `device`: (True, what it runs on) or (False, why not)."""
    device = torch.device(device)
    if device.type != "cuda":
        return False, f"the fast engine needs a CUDA device (got '{device.type}'); the plain loop runs instead"
    if not torch.cuda.is_available():
        return False, "CUDA is not available to torch"
    if triton is None:
        return False, "triton is not installed"
    index = device.index if device.index is not None else torch.cuda.current_device()
    major, minor = torch.cuda.get_device_capability(index)
    if major < 8:
        return False, f"compute capability {major}.{minor} < 8.0 (no bf16)"
    return True, f"{torch.cuda.get_device_name(index)} (sm_{major}{minor}), triton {triton.__version__}"


def quantize_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(..., D) -> (float8_e4m3fn (..., D), fp32 scale (...)): x ~= q * scale, one scale per vector."""
    xf = x.float()
    scale = xf.abs().amax(-1).clamp_min(1e-12) / FP8_MAX
    q = (xf / scale[..., None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q, scale


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """LlamaRMSNorm exactly as HF computes it."""
    dtype = x.dtype
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


# ------------------------------------------------------------------------------------------------
# Triton kernels (defined only where Triton imports)
# ------------------------------------------------------------------------------------------------
if triton is not None:

    @triton.jit
    def _add_rmsnorm_kernel(X, DELTA, W, OUT, eps, N, BLOCK: tl.constexpr, HAS_DELTA: tl.constexpr):
        """X[row] += DELTA[row] (rounded to X's dtype, as HF's residual add); OUT[row] = RMSNorm(X[row]) * W."""
        row = tl.program_id(0)
        cols = tl.arange(0, BLOCK)
        m = cols < N
        x = tl.load(X + row * N + cols, mask=m, other=0.0)
        if HAS_DELTA:
            d = tl.load(DELTA + row * N + cols, mask=m, other=0.0)
            x = (x.to(tl.float32) + d.to(tl.float32)).to(X.dtype.element_ty)
            tl.store(X + row * N + cols, x, mask=m)
        xf = x.to(tl.float32)
        var = tl.sum(xf * xf, 0) / N
        n = (xf * (1.0 / tl.sqrt(var + eps))).to(X.dtype.element_ty).to(tl.float32)
        w = tl.load(W + cols, mask=m, other=0.0).to(tl.float32)
        tl.store(OUT + row * N + cols, (w * n).to(OUT.dtype.element_ty), mask=m)

    @triton.jit
    def _silu_mul_kernel(GU, OUT, I, BLOCK: tl.constexpr):
        """OUT[row] = silu(GU[row, :I]) * GU[row, I:], rounded like HF's two bf16 ops."""
        row = tl.program_id(0)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        m = cols < I
        g = tl.load(GU + row * 2 * I + cols, mask=m, other=0.0).to(tl.float32)
        u = tl.load(GU + row * 2 * I + I + cols, mask=m, other=0.0).to(tl.float32)
        s = (g / (1.0 + tl.exp(-g))).to(OUT.dtype.element_ty).to(tl.float32)
        tl.store(OUT + row * I + cols, (s * u).to(OUT.dtype.element_ty), mask=m)

    @triton.jit
    def _rope_cache_kernel(QKV, COS, SIN, POS, SLOT, QO, KC, VC, KS, VS,
                           stride_qkv, stride_cr, stride_ch, stride_sr, stride_sh,
                           HEADS: tl.constexpr, KV_HEADS: tl.constexpr, D: tl.constexpr, FP8: tl.constexpr):
        """RoPE on q and k of one new token; q to QO (R, HEADS, D); k, v into the cache at slot *SLOT."""
        row = tl.program_id(0)
        head = tl.program_id(1)
        HALF: tl.constexpr = D // 2
        j = tl.arange(0, HALF)
        pos = tl.load(POS + row)
        c1 = tl.load(COS + pos * D + j)
        c2 = tl.load(COS + pos * D + HALF + j)
        s1 = tl.load(SIN + pos * D + j)
        s2 = tl.load(SIN + pos * D + HALF + j)
        qb = QKV + row * stride_qkv + head * D
        q1 = tl.load(qb + j).to(tl.float32)
        q2 = tl.load(qb + HALF + j).to(tl.float32)
        ob = QO + (row * HEADS + head) * D
        tl.store(ob + j, (q1 * c1 - q2 * s1).to(QO.dtype.element_ty))
        tl.store(ob + HALF + j, (q2 * c2 + q1 * s2).to(QO.dtype.element_ty))
        if head < KV_HEADS:
            kb = QKV + row * stride_qkv + (HEADS + head) * D
            vb = QKV + row * stride_qkv + (HEADS + KV_HEADS + head) * D
            k1 = tl.load(kb + j).to(tl.float32)
            k2 = tl.load(kb + HALF + j).to(tl.float32)
            r1 = (k1 * c1 - k2 * s1).to(QO.dtype.element_ty).to(tl.float32)  # k as the model dtype holds it
            r2 = (k2 * c2 + k1 * s2).to(QO.dtype.element_ty).to(tl.float32)
            v1 = tl.load(vb + j).to(tl.float32)
            v2 = tl.load(vb + HALF + j).to(tl.float32)
            slot = tl.load(SLOT)
            dst = row * stride_cr + head * stride_ch + slot * D
            if FP8:
                ks = tl.maximum(tl.maximum(tl.max(tl.abs(r1), 0), tl.max(tl.abs(r2), 0)), 1e-12) / 448.0
                vs = tl.maximum(tl.maximum(tl.max(tl.abs(v1), 0), tl.max(tl.abs(v2), 0)), 1e-12) / 448.0
                tl.store(KC + dst + j, tl.minimum(tl.maximum(r1 / ks, -448.0), 448.0).to(KC.dtype.element_ty))
                tl.store(KC + dst + HALF + j, tl.minimum(tl.maximum(r2 / ks, -448.0), 448.0).to(KC.dtype.element_ty))
                tl.store(VC + dst + j, tl.minimum(tl.maximum(v1 / vs, -448.0), 448.0).to(VC.dtype.element_ty))
                tl.store(VC + dst + HALF + j, tl.minimum(tl.maximum(v2 / vs, -448.0), 448.0).to(VC.dtype.element_ty))
                sdst = row * stride_sr + head * stride_sh + slot
                tl.store(KS + sdst, ks)
                tl.store(VS + sdst, vs)
            else:
                tl.store(KC + dst + j, r1.to(KC.dtype.element_ty))
                tl.store(KC + dst + HALF + j, r2.to(KC.dtype.element_ty))
                tl.store(VC + dst + j, v1.to(VC.dtype.element_ty))
                tl.store(VC + dst + HALF + j, v2.to(VC.dtype.element_ty))

    @triton.jit
    def _split_bounds(START, SLOT, row, split, SPLITS: tl.constexpr, BLOCK_N: tl.constexpr):
        """Cache slots [lo, hi) that split `split` of SPLITS reads for `row`: its range
        [START[row], *SLOT] cut into SPLITS chunks of whole BLOCK_N tiles."""
        start = tl.load(START + row)
        end = tl.load(SLOT) + 1
        chunk = tl.cdiv(tl.cdiv(end - start, SPLITS), BLOCK_N) * BLOCK_N
        lo = start + split * chunk
        return lo, tl.minimum(lo + chunk, end)

    @triton.jit
    def _key_ptrs(base, offs, shift, pend, SHARED: tl.constexpr):
        """Addresses of keys `offs` (elements past `base`); prompt keys (< pend) `shift` elements away, in
        the row that holds the same values."""
        ptrs = base + offs
        if SHARED:
            ptrs += tl.where(offs < pend, shift, 0)
        return ptrs

    @triton.jit
    def _tile_ptrs(base, offs, shift, pend, D: tl.constexpr, SHARED: tl.constexpr):
        """Addresses of a (keys `offs`, D) tile of K or V, as `_key_ptrs` places each key."""
        return _key_ptrs(base, offs * D, shift, pend * D, SHARED)[:, None] + tl.arange(0, D)[None, :]

    @triton.jit
    def _attn_tile(n0, hi, q, kb, vb, KS, VS, sb, m_i, l_i, acc, qk_scale, shift, shift_s, pend, D: tl.constexpr,
                   BLOCK_N: tl.constexpr, FP8: tl.constexpr, F32: tl.constexpr, SHARED: tl.constexpr):
        """One BLOCK_N-key tile of online softmax on the tensor cores (q replicated to 16 rows, as tl.dot
        needs M >= 16; the rows are identical). Returns the updated (max, sum, weighted V sum).
        Prompt keys (< pend) are read `shift` elements away (`shift_s` for scales): the same values, in
        the row every unconditional row of that prompt length shares, so the tile order is unchanged."""
        d = tl.arange(0, D)
        offs = n0 + tl.arange(0, BLOCK_N)
        valid = offs < hi
        k = tl.load(_tile_ptrs(kb, offs, shift, pend, D, SHARED), mask=valid[:, None], other=0.0)
        v = tl.load(_tile_ptrs(vb, offs, shift, pend, D, SHARED), mask=valid[:, None], other=0.0)
        if FP8:  # e4m3 -> fp16 is one packed convert; q arrives as fp16
            k = k.to(tl.float16)
            v = v.to(tl.float16)
            qk = tl.dot(q, tl.trans(k))
        elif F32:
            qk = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            qk = tl.dot(q, tl.trans(k))
        qk = qk * qk_scale
        if FP8:
            qk = qk * tl.load(_key_ptrs(KS + sb, offs, shift_s, pend, SHARED), mask=valid, other=0.0)[None, :]
        qk = tl.where(valid[None, :], qk, -float("inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(qk - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if FP8:  # fold the per-key V scales into p, normalised by the tile's largest so fp16 keeps them
            vsc = tl.load(_key_ptrs(VS + sb, offs, shift_s, pend, SHARED), mask=valid, other=0.0)
            top = tl.max(vsc, 0)
            pv = tl.dot((p * (vsc / top)[None, :]).to(tl.float16), v) * top
        elif F32:
            pv = tl.dot(p, v, input_precision="ieee")
        else:
            pv = tl.dot(p.to(v.dtype), v)
        acc = acc * alpha[:, None] + pv
        return m_new, l_i, acc

    @triton.jit
    def _decode_attn_kernel(Q, KC, VC, KS, VS, START, SLOT, PROMPT_ROW, PROMPT_END, O, OP, LSE,
                            stride_cr, stride_ch, stride_sr, stride_sh, sm_scale,
                            HEADS: tl.constexpr, GROUP: tl.constexpr, D: tl.constexpr,
                            BLOCK_N: tl.constexpr, SPLITS: tl.constexpr, FP8: tl.constexpr,
                            SHARED: tl.constexpr, F32: tl.constexpr, INTERPRET: tl.constexpr):
        """One query per (row, head) over cache slots [START[row], *SLOT]; split `split` of SPLITS.
        The K/V tile loads feed tl.dot, so Triton software-pipelines them (num_stages deep)."""
        row = tl.program_id(0)
        head = tl.program_id(1)
        split = tl.program_id(2)
        kvh = head // GROUP
        lo, hi = _split_bounds(START, SLOT, row, split, SPLITS, BLOCK_N)
        d = tl.arange(0, D)
        r = tl.arange(0, 16)
        qbase = (row * HEADS + head) * D
        q = tl.load(Q + qbase + r[:, None] * 0 + d[None, :])  # (16, D), every row the query
        if FP8:
            q = q.to(tl.float16)
        qk_scale = sm_scale * 1.4426950408889634
        kb = KC + row * stride_cr + kvh * stride_ch
        vb = VC + row * stride_cr + kvh * stride_ch
        sb = row * stride_sr + kvh * stride_sh
        if SHARED:  # how far this row's prompt slots are from the row that holds the same values
            other = (tl.load(PROMPT_ROW + row) - row).to(tl.int64)
            shift, shift_s, pend = other * stride_cr, other * stride_sr, tl.load(PROMPT_END)
        else:
            shift, shift_s, pend = 0, 0, 0
        m_i = tl.full([16], -float("inf"), tl.float32)
        l_i = tl.zeros([16], dtype=tl.float32)
        acc = tl.zeros([16, D], dtype=tl.float32)
        if INTERPRET:  # Triton's interpreter cannot take loop bounds from loaded values; a while loop it can
            n0 = lo
            while n0 < hi:
                m_i, l_i, acc = _attn_tile(n0, hi, q, kb, vb, KS, VS, sb, m_i, l_i, acc, qk_scale, shift, shift_s,
                                           pend, D, BLOCK_N, FP8, F32, SHARED)
                n0 += BLOCK_N
        else:
            for n0 in range(lo, hi, BLOCK_N):
                m_i, l_i, acc = _attn_tile(n0, hi, q, kb, vb, KS, VS, sb, m_i, l_i, acc, qk_scale, shift, shift_s,
                                           pend, D, BLOCK_N, FP8, F32, SHARED)
        first = r[:, None] == 0
        if SPLITS == 1:
            out = acc / l_i[:, None]
            tl.store(O + qbase + r[:, None] * 0 + d[None, :], out.to(O.dtype.element_ty), mask=first)
        else:
            safe_l = tl.where(l_i > 0, l_i, 1.0)
            base = (row * HEADS + head) * SPLITS + split
            tl.store(OP + base * D + r[:, None] * 0 + d[None, :], acc / safe_l[:, None], mask=first)
            lse = tl.where(l_i > 0, m_i + tl.log2(safe_l), -float("inf"))
            tl.store(LSE + base + r * 0, lse, mask=r == 0)

    @triton.jit
    def _load_tile_sum(kb, vb, KS, VS, sb, n0, hi, shift, shift_s, pend, D: tl.constexpr, BLOCK_N: tl.constexpr,
                       FP8: tl.constexpr, SHARED: tl.constexpr):
        """K and V tiles (BLOCK_N, D) of slots [n0, n0 + BLOCK_N) below hi, and their fp8 scales (else 1);
        prompt keys from the shared row, as in `_attn_tile`."""
        d = tl.arange(0, D)
        offs = n0 + tl.arange(0, BLOCK_N)
        valid = offs < hi
        k = tl.load(_tile_ptrs(kb, offs, shift, pend, D, SHARED), mask=valid[:, None], other=0.0)
        v = tl.load(_tile_ptrs(vb, offs, shift, pend, D, SHARED), mask=valid[:, None], other=0.0)
        if FP8:
            ksc = tl.load(_key_ptrs(KS + sb, offs, shift_s, pend, SHARED), mask=valid, other=0.0)
            vsc = tl.load(_key_ptrs(VS + sb, offs, shift_s, pend, SHARED), mask=valid, other=0.0)
        else:
            ksc = tl.full([BLOCK_N], 1.0, tl.float32)
            vsc = ksc
        return k, v, ksc, vsc

    @triton.jit
    def _attn_tile_sum(k, v, ksc, vsc, n0, hi, q, m_i, l_i, acc, BLOCK_N: tl.constexpr, WIDE: tl.constexpr):
        """One tile on the CUDA cores (q a vector, reductions with tl.sum): the 'sum' variants. WIDE keeps a
        (BLOCK_N, D) accumulator for p @ V and reduces it over keys once, after the last tile (no
        cross-warp reduction per tile)."""
        valid = n0 + tl.arange(0, BLOCK_N) < hi
        qk = tl.sum(k.to(tl.float32) * q[None, :], 1) * ksc
        qk = tl.where(valid, qk, -float("inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 0))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(qk - m_new)
        l_i = l_i * alpha + tl.sum(p, 0)
        p = p * vsc
        if WIDE:
            acc = acc * alpha + p[:, None] * v.to(tl.float32)
        else:
            acc = acc * alpha + tl.sum(p[:, None] * v.to(tl.float32), 0)
        return m_new, l_i, acc

    @triton.jit
    def _decode_attn_sum_kernel(Q, KC, VC, KS, VS, START, SLOT, PROMPT_ROW, PROMPT_END, O, OP, LSE,
                                stride_cr, stride_ch, stride_sr, stride_sh, sm_scale,
                                HEADS: tl.constexpr, GROUP: tl.constexpr, D: tl.constexpr,
                                BLOCK_N: tl.constexpr, SPLITS: tl.constexpr, FP8: tl.constexpr,
                                SHARED: tl.constexpr, WIDE: tl.constexpr, INTERPRET: tl.constexpr):
        """`_decode_attn_kernel` with CUDA-core tiles. WIDE ('sum2p') also issues the next tile's loads
        before the current tile's arithmetic (Triton does not pipeline loads that feed no tl.dot), so a
        program always has a tile in flight."""
        row = tl.program_id(0)
        head = tl.program_id(1)
        split = tl.program_id(2)
        kvh = head // GROUP
        lo, hi = _split_bounds(START, SLOT, row, split, SPLITS, BLOCK_N)
        d = tl.arange(0, D)
        q = tl.load(Q + (row * HEADS + head) * D + d).to(tl.float32) * (sm_scale * 1.4426950408889634)
        kb = KC + row * stride_cr + kvh * stride_ch
        vb = VC + row * stride_cr + kvh * stride_ch
        sb = row * stride_sr + kvh * stride_sh
        if SHARED:  # how far this row's prompt slots are from the row that holds the same values
            other = (tl.load(PROMPT_ROW + row) - row).to(tl.int64)
            shift, shift_s, pend = other * stride_cr, other * stride_sr, tl.load(PROMPT_END)
        else:
            shift, shift_s, pend = 0, 0, 0
        m_i = -float("inf")
        l_i = 0.0
        if WIDE:
            acc = tl.zeros([BLOCK_N, D], dtype=tl.float32)
        else:
            acc = tl.zeros([D], dtype=tl.float32)
        k, v, ksc, vsc = _load_tile_sum(kb, vb, KS, VS, sb, lo, hi, shift, shift_s, pend, D, BLOCK_N, FP8, SHARED)
        if INTERPRET:  # Triton's interpreter cannot take loop bounds from loaded values; a while loop it can
            n0 = lo
            while n0 < hi:
                nk, nv, nks, nvs = _load_tile_sum(kb, vb, KS, VS, sb, n0 + BLOCK_N, hi, shift, shift_s, pend, D,
                                                  BLOCK_N, FP8, SHARED)
                m_i, l_i, acc = _attn_tile_sum(k, v, ksc, vsc, n0, hi, q, m_i, l_i, acc, BLOCK_N, WIDE)
                k, v, ksc, vsc = nk, nv, nks, nvs
                n0 += BLOCK_N
        elif WIDE:
            for n0 in range(lo, hi, BLOCK_N):
                nk, nv, nks, nvs = _load_tile_sum(kb, vb, KS, VS, sb, n0 + BLOCK_N, hi, shift, shift_s, pend, D,
                                                  BLOCK_N, FP8, SHARED)
                m_i, l_i, acc = _attn_tile_sum(k, v, ksc, vsc, n0, hi, q, m_i, l_i, acc, BLOCK_N, WIDE)
                k, v, ksc, vsc = nk, nv, nks, nvs
        else:
            for n0 in range(lo, hi, BLOCK_N):
                k, v, ksc, vsc = _load_tile_sum(kb, vb, KS, VS, sb, n0, hi, shift, shift_s, pend, D, BLOCK_N, FP8,
                                                SHARED)
                m_i, l_i, acc = _attn_tile_sum(k, v, ksc, vsc, n0, hi, q, m_i, l_i, acc, BLOCK_N, WIDE)
        if WIDE:
            acc = tl.sum(acc, 0)
        if SPLITS == 1:
            tl.store(O + (row * HEADS + head) * D + d, (acc / l_i).to(O.dtype.element_ty))
        else:
            safe_l = tl.where(l_i > 0, l_i, 1.0)
            base = (row * HEADS + head) * SPLITS + split
            tl.store(OP + base * D + d, acc / safe_l)
            tl.store(LSE + base, tl.where(l_i > 0, m_i + tl.log2(safe_l), -float("inf")))

    @triton.jit
    def _mix32(x):
        """`safecb.models.sampling._mix32` on uint32 (wrap-around products = the masked int64 ones)."""
        x = x ^ (x >> 16)
        x = x * 0x7FEB352D
        x = x ^ (x >> 15)
        x = x * 0x5BD1E995
        return x ^ (x >> 16)

    @triton.jit
    def _cfg_sample_kernel(LOGITS, SEEDS, STEP, OUT, batch, stride, guidance, temperature,
                           VOCAB: tl.constexpr, GREEDY: tl.constexpr, BLOCK: tl.constexpr):
        """One row of `sample_tokens(cfg_logits(cond, uncond, w), seed, step, T)` (top_k None) in one pass
        over the (2B, V) logits: the same Gumbel bits, the same float32 rounding (launched without FMA
        contraction), the first index among equal maxima."""
        b = tl.program_id(0)
        seed = tl.load(SEEDS + b)
        folded = ((seed & 0xFFFFFFFF) ^ ((seed >> 32) & 0xFFFFFFFF)).to(tl.uint32)
        step = tl.load(STEP).to(tl.uint32)
        key = _mix32(folded ^ _mix32(step * 0x27D4EB2F + 0x165667B1))
        best = -float("inf")
        best_index = 0
        for v0 in range(0, VOCAB, BLOCK):
            index = v0 + tl.arange(0, BLOCK)
            valid = index < VOCAB
            cond = tl.load(LOGITS + b * stride + index, mask=valid, other=0.0).to(tl.float32)
            uncond = tl.load(LOGITS + (b + batch) * stride + index, mask=valid, other=0.0).to(tl.float32)
            guided = uncond + guidance * (cond - uncond)
            if not GREEDY:
                bits = _mix32(key ^ _mix32(index.to(tl.uint32) + 0x3C6EF372))
                uniform = (bits.to(tl.float64) + 0.5) / 4294967296.0
                guided = guided / temperature + (-tl.log(-tl.log(uniform))).to(tl.float32)
            guided = tl.where(valid, guided, -float("inf"))
            top = tl.max(guided, 0)
            top_index = v0 + tl.argmax(guided, 0)
            best_index = tl.where(top > best, top_index, best_index)
            best = tl.maximum(best, top)
        tl.store(OUT + b, best_index)

    @triton.jit
    def _combine_kernel(OP, LSE, O, HEADS: tl.constexpr, D: tl.constexpr, SPLITS: tl.constexpr):
        """Merge the SPLITS partial softmax-weighted sums of one (row, head) (log-sum-exp weights)."""
        row = tl.program_id(0)
        head = tl.program_id(1)
        base = (row * HEADS + head) * SPLITS
        s = tl.arange(0, SPLITS)
        lse = tl.load(LSE + base + s)
        w = tl.exp2(lse - tl.max(lse, 0))
        d = tl.arange(0, D)
        parts = tl.load(OP + (base + s)[:, None] * D + d[None, :])
        out = tl.sum(parts * w[:, None], 0) / tl.sum(w, 0)
        tl.store(O + (row * HEADS + head) * D + d, out.to(O.dtype.element_ty))


ATTN_VARIANTS = ("dot", "sum", "sum2p", "cuda")


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, k_scale: torch.Tensor | None,
                     v_scale: torch.Tensor | None, start: torch.Tensor, slot: torch.Tensor, sm_scale: float,
                     splits: int = 1, block_n: int = 64, num_warps: int = 4, num_stages: int = 3,
                     variant: str = "dot", prompt_row: torch.Tensor | None = None,
                     prompt_end: torch.Tensor | None = None) -> torch.Tensor:
    """Decode attention. q (R, H, D); caches (R', KVH, L, D) (R' >= R); scales (R', KVH, L) for fp8;
    start (R,) int32 first valid slot; slot () int32 last valid slot. Returns (R, H*D) in q's dtype.

    Variants: 'dot' Triton tensor-core tiles with pipelined loads (fp8 tiles converted to fp16); 'sum'
    Triton CUDA-core tiles; 'sum2p' the same with a (BLOCK_N, D) accumulator reduced once at the end and
    the next tile's loads issued before the current tile's arithmetic; 'cuda' (fp8, head_dim 128, bf16)
    the CUDA C++ kernel of `fp8_decode_attention.cu`: block_n = keys per warp iteration, num_warps = warps
    per block, num_stages 1 = loads into registers, > 1 = a cp.async ring of that many tiles.

    prompt_row (R,) int32 and prompt_end () int32: row r's slots [0, prompt_end) hold the same values as
    row prompt_row[r]'s, and every variant reads them there: hundreds of unconditional rows then read one
    row's prompt (from L2) instead of their own copies (from HBM). The values, and so the result, are the
    same either way."""
    rows, heads, dim = q.shape
    kv_heads = k_cache.shape[1]
    fp8 = k_scale is not None
    if variant not in ATTN_VARIANTS:
        raise ValueError(f"attention variant must be one of {ATTN_VARIANTS}, got {variant!r}")
    out = torch.empty(rows, heads * dim, device=q.device, dtype=q.dtype)
    if splits > 1:
        partial = torch.empty(rows, heads, splits, dim, device=q.device, dtype=torch.float32)
        lse = torch.empty(rows, heads, splits, device=q.device, dtype=torch.float32)
    else:
        partial, lse = out, out
    ks = k_scale if fp8 else k_cache
    vs = v_scale if fp8 else v_cache
    shared = prompt_row is not None
    args = (q, k_cache, v_cache, ks, vs, start, slot, prompt_row if shared else start,
            prompt_end if shared else slot, out, partial, lse, k_cache.stride(0), k_cache.stride(1),
            ks.stride(0) if fp8 else 0, ks.stride(1) if fp8 else 0, sm_scale)
    shape = dict(HEADS=heads, GROUP=heads // kv_heads, D=dim, BLOCK_N=block_n, SPLITS=splits, FP8=fp8,
                 SHARED=shared, INTERPRET=_INTERPRET, num_warps=num_warps, num_stages=num_stages)
    if variant == "cuda":
        from safecb.models.cuda_kernels import CUDA_TILES, fp8_decode_attention_module

        if not (fp8 and dim == 128 and q.dtype == torch.bfloat16) or (block_n, num_stages) not in CUDA_TILES:
            raise ValueError("attention variant 'cuda' needs an fp8 cache, head_dim 128, bf16 queries and "
                             f"(block_n = keys per warp iteration, num_stages) in {CUDA_TILES}")
        none = start[:0]
        fp8_decode_attention_module().fp8_decode_attention(
            q, k_cache, v_cache, k_scale, v_scale, start, slot, none if prompt_row is None else prompt_row,
            none if prompt_end is None else prompt_end, out, partial if splits > 1 else k_scale[:0, 0, 0],
            lse if splits > 1 else k_scale[:0, 0, 0], splits, sm_scale * 1.4426950408889634, block_n, num_warps,
            num_stages)
    elif variant.startswith("sum"):
        _decode_attn_sum_kernel[(rows, heads, splits)](*args, **shape, WIDE=variant == "sum2p")
    else:
        _decode_attn_kernel[(rows, heads, splits)](*args, **shape, F32=q.dtype == torch.float32)
    if splits > 1:
        _combine_kernel[(rows, heads)](partial, lse, out, HEADS=heads, D=dim, SPLITS=splits, num_warps=4)
    return out


def cfg_sample(logits: torch.Tensor, seeds: torch.Tensor, step: torch.Tensor, guidance: float,
               temperature: float) -> torch.Tensor:
    """`sample_tokens(cfg_logits(logits[:B], logits[B:], guidance), seeds, step, temperature)` with no top-k,
    as one Triton kernel (B = len(seeds)): the same tokens, bit for bit. logits (2B, V); step 0-dim int64."""
    batch = seeds.shape[0]
    vocab = logits.shape[1]
    out = torch.empty(batch, device=logits.device, dtype=torch.long)
    _cfg_sample_kernel[(batch,)](logits, seeds, step, out, batch, logits.stride(0), float(guidance),
                                 float(temperature) if temperature > 0 else 1.0, VOCAB=vocab, GREEDY=temperature <= 0,
                                 BLOCK=min(2048, triton.next_power_of_2(vocab)), num_warps=8,
                                 enable_fp_fusion=False)
    return out


def _add_rmsnorm(x: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, out: torch.Tensor,
                 eps: float) -> None:
    rows, n = x.shape
    block = triton.next_power_of_2(n)
    _add_rmsnorm_kernel[(rows,)](x, delta if delta is not None else x, weight, out, eps, n, BLOCK=block,
                                 HAS_DELTA=delta is not None, num_warps=8 if block >= 2048 else 4)


def _silu_mul(gu: torch.Tensor) -> torch.Tensor:
    rows, two_i = gu.shape
    inter = two_i // 2
    out = torch.empty(rows, inter, device=gu.device, dtype=gu.dtype)
    block = 1024
    _silu_mul_kernel[(rows, triton.cdiv(inter, block))](gu, out, inter, BLOCK=block, num_warps=4)
    return out


# ------------------------------------------------------------------------------------------------
# The engine
# ------------------------------------------------------------------------------------------------
class _Layer:
    __slots__ = ("ln1", "wqkv", "bqkv", "wo", "bo", "ln2", "wgu", "bgu", "wd", "bd")


class JanusEngine:
    """Batched CFG image-token generation for one `JanusForConditionalGeneration`; built once per model.

    generate(input_ids (B, T) left-padded, attention_mask (B, T), seeds (B,), params, bos_id, boi_id, pad_id)
    -> (B, num_image_tokens) int64, the semantics of `generate_image_tokens`. Not thread-safe.

    Sampled tokens are a pure function of (prompt, seed) in the math; on a GPU the kernels' reduction
    order follows the batch shape, so the last bits of the logits (and now and then a token) depend on
    the batch. `batch_invariant=True` runs every call at one shape (max_batch x max_prompt_len, padded):
    then a seed gives the same tokens in any batch, at the cost of a full batch's time for a short call.
    """

    def __init__(self, model, max_batch: int, max_prompt_len: int, num_image_tokens: int, kv_dtype: str = "bf16",
                 use_cuda_graph: bool = True, *, dtype: torch.dtype | None = None, backend: str = "auto",
                 attn_config: tuple | None = None, max_graphs: int = 8, batch_invariant: bool = False):
        if kv_dtype not in KV_DTYPES:
            raise ValueError(f"kv_dtype must be one of {KV_DTYPES}, got {kv_dtype!r}")
        if max_batch < 1 or max_prompt_len < 1 or num_image_tokens < 1:
            raise ValueError("max_batch, max_prompt_len and num_image_tokens must be >= 1")
        self.model = model
        self.lm = model.model.language_model
        cfg = self.lm.config
        self.device = next(model.parameters()).device
        on_cuda = self.device.type == "cuda"
        self.dtype = dtype or (torch.bfloat16 if on_cuda else next(model.parameters()).dtype)
        if backend == "auto":
            backend = "triton" if (on_cuda and triton is not None) else "torch"
        if backend not in ("torch", "triton"):
            raise ValueError(f"backend must be 'auto', 'torch' or 'triton', got {backend!r}")
        if backend == "triton" and triton is None:
            raise RuntimeError("backend='triton' but triton is not installed")
        self.backend = backend
        self.use_cuda_graph = bool(use_cuda_graph and on_cuda and backend == "triton")
        if kv_dtype == "fp8" and on_cuda and torch.cuda.get_device_capability(self.device) < (8, 9):
            raise ValueError("kv_dtype='fp8' needs compute capability >= 8.9")
        self.kv_dtype = kv_dtype
        self.max_batch = int(max_batch)
        self.max_prompt_len = int(max_prompt_len)
        self.num_image_tokens = int(num_image_tokens)
        self.max_len = self.max_prompt_len + self.num_image_tokens
        self.hidden = cfg.hidden_size
        self.heads = cfg.num_attention_heads
        self.kv_heads = getattr(cfg, "num_key_value_heads", None) or self.heads
        self.head_dim = getattr(cfg, "head_dim", None) or self.hidden // self.heads
        self.num_layers = cfg.num_hidden_layers
        self.eps = cfg.rms_norm_eps
        self.scaling = self.head_dim ** -0.5
        self.mlp_act = self.lm.layers[0].mlp.act_fn
        self._silu_fused = getattr(cfg, "hidden_act", "silu") == "silu"
        self.attn_config = tuple(attn_config or DEFAULT_ATTN_CONFIG[kv_dtype])
        kernel = self.attn_config[3]
        if kernel not in ATTN_VARIANTS:
            raise ValueError(f"attention variant must be one of {ATTN_VARIANTS}, got {kernel!r}")
        if kernel == "cuda" and kv_dtype != "fp8":
            raise ValueError("attention variant 'cuda' needs kv_dtype='fp8'")
        if kernel == "cuda":  # compiled now, not inside a graph capture; Triton's kernel where it cannot be
            if backend != "triton":
                self.attn_config = FALLBACK_ATTN_CONFIG  # (unused by the torch backend)
            else:
                from safecb.models.cuda_kernels import load_error

                reason = load_error() if self.dtype == torch.bfloat16 and self.head_dim == 128 else \
                    f"it needs bf16 and head_dim 128 (have {self.dtype}, {self.head_dim})"
                if reason:
                    log.warning("fp8 attention: %s; using the Triton kernel %s", reason, FALLBACK_ATTN_CONFIG)
                    self.attn_config = FALLBACK_ATTN_CONFIG
        self.max_graphs = max_graphs
        self.batch_invariant = bool(batch_invariant)

        self._build_weights()
        self._build_rope()
        rows = 2 * self.max_batch
        dev = self.device
        cache_dtype = torch.float8_e4m3fn if kv_dtype == "fp8" else self.dtype
        shape = (self.num_layers, rows, self.kv_heads, self.max_len, self.head_dim)
        self.k_cache = torch.zeros(shape, device=dev, dtype=cache_dtype)
        self.v_cache = torch.zeros(shape, device=dev, dtype=cache_dtype)
        if kv_dtype == "fp8":
            self.k_scale = torch.zeros(shape[:-1], device=dev, dtype=torch.float32)
            self.v_scale = torch.zeros(shape[:-1], device=dev, dtype=torch.float32)
        else:
            self.k_scale = self.v_scale = None
        # Decode state, on the device so that one captured graph serves every step.
        self._tok = torch.zeros(self.max_batch, device=dev, dtype=torch.long)  # last sampled token (B,)
        self._seeds = torch.zeros(self.max_batch, device=dev, dtype=torch.long)
        self._out = torch.zeros(self.max_batch, self.num_image_tokens, device=dev, dtype=torch.long)
        self._step = torch.zeros((), device=dev, dtype=torch.long)  # index of the token the step samples
        self._slot = torch.zeros((), device=dev, dtype=torch.int32)  # cache slot the step writes
        self._pos = torch.zeros(rows, device=dev, dtype=torch.long)  # RoPE position of the step's token
        self._start = torch.zeros(rows, device=dev, dtype=torch.int32)  # first valid slot per row
        # Row whose cache holds the same prompt slots (prefill computed it once): the attention kernels read
        # the prompt there, so the unconditional rows' prompt comes from a few rows (L2) rather than HBM.
        self._prompt_row = torch.arange(rows, device=dev, dtype=torch.int32)
        self._prompt_end = torch.zeros((), device=dev, dtype=torch.int32)  # prompt slots: [0, prompt_end)
        self.shared_prompt_reads = True  # False: every row reads its own copy (benchmarks compare the two)
        self._slot_host = 0  # the same slot, for the torch backend's slicing
        self._graphs: dict[Any, Any] = {}
        self._pool = torch.cuda.graph_pool_handle() if self.use_cuda_graph else None
        self.num_sms = torch.cuda.get_device_properties(dev).multi_processor_count if on_cuda else 1

    # ---- weights -------------------------------------------------------------------------------
    def _source_params(self) -> list[torch.Tensor]:
        m = self.model.model
        params = [self.lm.embed_tokens.weight, self.lm.norm.weight, m.generation_embeddings.weight]
        params += list(m.generation_aligner.parameters()) + list(m.generation_head.parameters())
        for layer in self.lm.layers:
            params += list(layer.parameters())
        return params

    def _signature(self) -> list[tuple[int, int]]:
        return [(p.data_ptr(), p._version) for p in self._source_params()]

    def _w(self, t: torch.Tensor | None) -> torch.Tensor | None:
        """The tensor in the engine's dtype/device; shared (not copied) when it already is."""
        if t is None:
            return None
        t = t.detach()
        if t.dtype == self.dtype and t.device == self.device and t.is_contiguous():
            return t
        return t.to(self.device, self.dtype).contiguous()

    def _build_weights(self) -> None:
        def cat(*ts):
            if ts[0] is None:
                return None
            return torch.cat([t.detach() for t in ts]).to(self.device, self.dtype).contiguous()

        self.layers = []
        for src in self.lm.layers:
            a, mlp = src.self_attn, src.mlp
            layer = _Layer()
            layer.ln1 = self._w(src.input_layernorm.weight)
            layer.ln2 = self._w(src.post_attention_layernorm.weight)
            layer.wqkv = cat(a.q_proj.weight, a.k_proj.weight, a.v_proj.weight)
            layer.bqkv = cat(a.q_proj.bias, a.k_proj.bias, a.v_proj.bias)
            layer.wo, layer.bo = self._w(a.o_proj.weight), self._w(a.o_proj.bias)
            layer.wgu = cat(mlp.gate_proj.weight, mlp.up_proj.weight)
            layer.bgu = cat(mlp.gate_proj.bias, mlp.up_proj.bias)
            layer.wd, layer.bd = self._w(mlp.down_proj.weight), self._w(mlp.down_proj.bias)
            self.layers.append(layer)
        m = self.model.model
        self.embed = self._w(self.lm.embed_tokens.weight)
        self.norm = self._w(self.lm.norm.weight)
        self.gen_embed = self._w(m.generation_embeddings.weight)
        aligner = m.generation_aligner
        self.aligner = [(self._w(aligner.fc1.weight), self._w(aligner.fc1.bias))]
        self.aligner += [(self._w(lin.weight), self._w(lin.bias)) for lin in aligner.hidden_layers]
        self.aligner_act = aligner.activation_fn
        head = m.generation_head
        self.head = [(self._w(head.proj_out.weight), self._w(head.proj_out.bias)),
                     (self._w(head.vision_head.weight), self._w(head.vision_head.bias))]
        self.head_act = head.activation_fn
        self._sig = self._signature()

    def _build_rope(self) -> None:
        """cos/sin tables (max_len, D) from the HF rotary module itself (any rope type), rounded like HF."""
        rotary = self.lm.rotary_emb
        positions = torch.arange(self.max_len, device=self.device)[None]
        probe = torch.zeros(1, device=self.device, dtype=torch.float32)
        cos, sin = rotary(probe, positions)
        self.cos = cos[0].to(self.dtype)  # (L, D), HF applies them in the model dtype
        self.sin = sin[0].to(self.dtype)
        self.cos32 = self.cos.float().contiguous()
        self.sin32 = self.sin.float().contiguous()

    def refresh(self) -> None:
        """Re-read the module's weights and drop captured graphs (done automatically when they change)."""
        self._build_weights()
        self._build_rope()
        self._graphs.clear()

    # ---- pieces of the forward -----------------------------------------------------------------
    def _embed_image_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """`prepare_embeddings_for_image_generation`: generation table -> aligner MLP. (B,) -> (B, H)."""
        e = F.embedding(tokens, self.gen_embed)
        w, b = self.aligner[0]
        e = F.linear(e, w, b)
        for w, b in self.aligner[1:]:
            e = F.linear(self.aligner_act(e), w, b)
        return e

    def _raw_logits(self, h: torch.Tensor) -> torch.Tensor:
        (w1, b1), (w2, b2) = self.head
        return F.linear(self.head_act(F.linear(h, w1, b1)), w2, b2)

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        return self._raw_logits(h).float()

    def _sample(self, h: torch.Tensor, batch: int, params: SamplingParams, step) -> torch.Tensor:
        if self.backend == "triton" and params.top_k is None and isinstance(step, torch.Tensor):
            return cfg_sample(self._raw_logits(h), self._seeds[:batch], step, params.guidance, params.temperature)
        logits = self._logits(h)  # (2B, V) float
        guided = cfg_logits(logits[:batch], logits[batch:], params.guidance)
        return sample_tokens(guided, self._seeds[:batch], step, params.temperature, params.top_k)

    def _write_cache(self, layer: int, rows: int, slots: slice | int, k: torch.Tensor, v: torch.Tensor,
                     row_map: torch.Tensor | None = None) -> None:
        """k, v (R, KVH, S, D) (or (R, KVH, D) for one slot) into the cache at `slots`; with row_map (rows,),
        cache row i takes k[row_map[i]] (rows computed once, stored for several)."""
        pick = (lambda t: t) if row_map is None else (lambda t: t.index_select(0, row_map))  # noqa: E731
        if self.kv_dtype == "fp8":
            kq, ks = quantize_fp8(k)
            vq, vs = quantize_fp8(v)
            self.k_cache[layer, :rows, :, slots] = pick(kq)
            self.v_cache[layer, :rows, :, slots] = pick(vq)
            self.k_scale[layer, :rows, :, slots] = pick(ks)
            self.v_scale[layer, :rows, :, slots] = pick(vs)
        else:
            self.k_cache[layer, :rows, :, slots] = pick(k)
            self.v_cache[layer, :rows, :, slots] = pick(v)

    def _read_cache(self, layer: int, rows: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        k = self.k_cache[layer, :rows, :, :length]
        v = self.v_cache[layer, :rows, :, :length]
        if self.kv_dtype == "fp8":
            k = (k.float() * self.k_scale[layer, :rows, :, :length, None]).to(self.dtype)
            v = (v.float() * self.v_scale[layer, :rows, :, :length, None]).to(self.dtype)
        return k, v

    def _mlp(self, layer: _Layer, h: torch.Tensor) -> torch.Tensor:
        gu = F.linear(h, layer.wgu, layer.bgu)
        gate, up = gu.chunk(2, dim=-1)
        return F.linear(self.mlp_act(gate) * up, layer.wd, layer.bd)

    def _split_qkv(self, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(R, S, (H + 2 KVH) D) -> q (R, H, S, D), k, v (R, KVH, S, D)."""
        r, s, _ = qkv.shape
        qd, kd = self.heads * self.head_dim, self.kv_heads * self.head_dim
        q = qkv[..., :qd].view(r, s, self.heads, self.head_dim).transpose(1, 2)
        k = qkv[..., qd:qd + kd].view(r, s, self.kv_heads, self.head_dim).transpose(1, 2)
        v = qkv[..., qd + kd:].view(r, s, self.kv_heads, self.head_dim).transpose(1, 2)
        return q, k, v

    @staticmethod
    def _distinct_uncond_rows(ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """For a (2B, T) CFG batch: the rows to run (B conditional, then the distinct unconditional ones)
        and, for each of the 2B rows, the run row that holds its values.

        An unconditional row is BOS, pads and BOI after its left padding, so rows differ only by their
        prompt length: the prefill runs each distinct one once (about half the work) and copies its
        cache. The distinct rows are padded to min(B, T) so that the prefill's shapes depend on (B, T)
        alone (what `batch_invariant` needs); a prompt with BOS or BOI inside it can make more distinct
        rows than that, and then every row runs as before."""
        rows, length = ids.shape
        batch = rows // 2
        width = min(batch, length)
        arange = torch.arange(batch, device=ids.device)
        _, inverse = torch.unique(torch.cat([ids[batch:], mask[batch:]], 1), dim=0, return_inverse=True)
        distinct = int(inverse.max()) + 1
        if width == batch or distinct > width:
            every = torch.arange(rows, device=ids.device)
            return every, every
        first = torch.full((distinct,), batch, device=ids.device, dtype=torch.long).scatter_reduce_(
            0, inverse, arange, reduce="amin")  # the first row of each distinct prompt
        first = torch.cat([first, first[-1:].expand(width - distinct)])
        return torch.cat([arange, batch + first]), torch.cat([arange, batch + inverse])

    def _prefill(self, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Run the (2B, T) prompt batch, fill cache slots [0, T). Returns last hidden (2B, H), last
        positions (2B,), first valid slot per row (2B,)."""
        rows, length = ids.shape
        real = mask.sum(-1)  # (2B,) real tokens
        all_starts = length - real  # left padding
        run, row_map = self._distinct_uncond_rows(ids, mask)
        ids, mask, start = ids.index_select(0, run), mask.index_select(0, run), all_starts.index_select(0, run)
        positions = (mask.cumsum(-1) - 1).clamp_min(0)  # (R', T)
        x = F.embedding(ids, self.embed)  # (R', T, H)
        cos = self.cos[positions][:, None]  # (R', 1, T, D)
        sin = self.sin[positions][:, None]
        j = torch.arange(length, device=ids.device)
        causal = j[None, :] <= j[:, None]  # (T, T) [query, key]
        allowed = (causal[None] & (j[None, None, :] >= start[:, None, None])) | torch.eye(
            length, dtype=torch.bool, device=ids.device)[None]  # a pad query sees itself: no NaN
        allowed = allowed[:, None]  # (R', 1, T, T)
        gqa = self.kv_heads != self.heads
        for index, layer in enumerate(self.layers):
            h = _rms_norm(x, layer.ln1, self.eps)
            q, k, v = self._split_qkv(F.linear(h, layer.wqkv, layer.bqkv))
            q = (q * cos) + (_rotate_half(q) * sin)
            k = (k * cos) + (_rotate_half(k) * sin)
            self._write_cache(index, rows, slice(0, length), k, v, row_map)
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=self.scaling, enable_gqa=gqa)
            o = o.transpose(1, 2).reshape(len(run), length, -1)
            x = x + F.linear(o, layer.wo, layer.bo)
            x = x + self._mlp(layer, _rms_norm(x, layer.ln2, self.eps))
        h = _rms_norm(x[:, -1], self.norm, self.eps).index_select(0, row_map)
        self._prompt_row[:rows].copy_(run.index_select(0, row_map))
        self._prompt_end.fill_(length if self.shared_prompt_reads else 0)
        return h, real - 1, all_starts

    def _layers_torch(self, x: torch.Tensor, rows: int) -> torch.Tensor:
        """One-token decode through all layers with torch ops (reference / CPU). x (R, H)."""
        slot = self._slot_host
        cos = self.cos[self._pos[:rows]][:, None, None]  # (R, 1, 1, D)
        sin = self.sin[self._pos[:rows]][:, None, None]
        length = slot + 1
        valid = torch.arange(length, device=x.device)[None, :] >= self._start[:rows, None]  # (R, L)
        valid = valid[:, None, None]  # (R, 1, 1, L)
        gqa = self.kv_heads != self.heads
        x = x[:, None]  # (R, 1, H)
        for index, layer in enumerate(self.layers):
            h = _rms_norm(x, layer.ln1, self.eps)
            q, k, v = self._split_qkv(F.linear(h, layer.wqkv, layer.bqkv))  # (R, *, 1, D)
            q = (q * cos) + (_rotate_half(q) * sin)
            k = (k * cos) + (_rotate_half(k) * sin)
            self._write_cache(index, rows, slot, k[:, :, 0], v[:, :, 0])
            kc, vc = self._read_cache(index, rows, length)
            o = F.scaled_dot_product_attention(q, kc, vc, attn_mask=valid, scale=self.scaling, enable_gqa=gqa)
            x = x + F.linear(o.transpose(1, 2).reshape(rows, 1, -1), layer.wo, layer.bo)
            x = x + self._mlp(layer, _rms_norm(x, layer.ln2, self.eps))
        return _rms_norm(x[:, 0], self.norm, self.eps)

    def _layers_triton(self, x: torch.Tensor, rows: int, splits: int) -> torch.Tensor:
        """One-token decode through all layers with the fused Triton kernels. x (R, H), updated in place."""
        h = torch.empty_like(x)
        q = torch.empty(rows, self.heads, self.head_dim, device=x.device, dtype=x.dtype)
        fp8 = self.kv_dtype == "fp8"
        block_n, warps, stages, variant = self.attn_config
        delta = None
        for index, layer in enumerate(self.layers):
            _add_rmsnorm(x, delta, layer.ln1, h, self.eps)
            qkv = F.linear(h, layer.wqkv, layer.bqkv)
            kc, vc = self.k_cache[index], self.v_cache[index]
            ks = self.k_scale[index] if fp8 else None
            vs = self.v_scale[index] if fp8 else None
            _rope_cache_kernel[(rows, self.heads)](
                qkv, self.cos32, self.sin32, self._pos, self._slot, q, kc, vc,
                ks if fp8 else kc, vs if fp8 else vc,
                qkv.stride(0), kc.stride(0), kc.stride(1),
                ks.stride(0) if fp8 else 0, ks.stride(1) if fp8 else 0,
                HEADS=self.heads, KV_HEADS=self.kv_heads, D=self.head_dim, FP8=fp8, num_warps=1)
            o = decode_attention(q, kc, vc, ks, vs, self._start, self._slot, self.scaling, splits=splits,
                                 block_n=block_n, num_warps=warps, num_stages=stages, variant=variant,
                                 prompt_row=self._prompt_row, prompt_end=self._prompt_end)
            o = F.linear(o, layer.wo, layer.bo)
            _add_rmsnorm(x, o, layer.ln2, h, self.eps)
            gu = F.linear(h, layer.wgu, layer.bgu)
            if self._silu_fused:
                a = _silu_mul(gu)
            else:
                gate, up = gu.chunk(2, dim=-1)
                a = self.mlp_act(gate) * up
            delta = F.linear(a, layer.wd, layer.bd)
        _add_rmsnorm(x, delta, self.norm, h, self.eps)
        return h

    def _splits(self, rows: int) -> int:
        """Sequence splits for the attention so that small batches still fill the GPU (power of 2)."""
        programs = rows * self.heads
        target = 4 * self.num_sms
        splits = 1
        while programs * splits < target and splits < 16:
            splits *= 2
        return splits

    def _decode_step(self, batch: int, params: SamplingParams) -> None:
        """Feed the last token, sample the next one, advance the device-side counters (capturable)."""
        rows = 2 * batch
        e = self._embed_image_tokens(self._tok[:batch])
        x = torch.cat([e, e]).to(self.dtype)  # (2B, H): the same image token for cond and uncond rows
        if self.backend == "triton":
            h = self._layers_triton(x, rows, self._splits(rows))
        else:
            h = self._layers_torch(x, rows)
        nxt = self._sample(h, batch, params, self._step)
        self._out[:batch].index_copy_(1, self._step.view(1), nxt.view(batch, 1))
        self._tok[:batch].copy_(nxt)
        self._step.add_(1)
        self._slot.add_(1)
        self._pos[:rows].add_(1)

    def _graph_for(self, batch: int, params: SamplingParams):
        splits = self._splits(2 * batch) if self.backend == "triton" else 1
        key = (batch, splits, float(params.guidance), float(params.temperature), params.top_k)
        return key, self._graphs.get(key)

    def _capture(self, key, batch: int, params: SamplingParams):
        if len(self._graphs) >= self.max_graphs:
            self._graphs.pop(next(iter(self._graphs)))
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            self._decode_step(batch, params)
        self._graphs[key] = graph
        return graph

    # ---- the public call -----------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, seeds: torch.Tensor,
                 params: SamplingParams, bos_id: int, boi_id: int, pad_id: int, *,
                 num_tokens: int | None = None, forced_tokens: torch.Tensor | None = None) -> torch.Tensor:
        """Image tokens (B, N) int64 for left-padded prompts ending in BOI; seeds (B,) int64.

        num_tokens: stop after that many tokens (warm-up, timing). forced_tokens (B, N): feed these
        instead of the sampled tokens (teacher forcing; the output is still the engine's own choice at
        each step) — used to measure per-step agreement with another decoder.
        """
        batch, length = input_ids.shape
        steps = self.num_image_tokens if num_tokens is None else int(num_tokens)
        if not 1 <= steps <= self.num_image_tokens:
            raise ValueError(f"num_tokens must be in [1, {self.num_image_tokens}]")
        if seeds.shape != (batch,):
            raise ValueError(f"seeds must have shape ({batch},), got {tuple(seeds.shape)}")
        if batch > self.max_batch:  # samples are batch-independent: chunking changes nothing
            parts = []
            for lo in range(0, batch, self.max_batch):
                hi = lo + self.max_batch
                parts.append(self.generate(input_ids[lo:hi], attention_mask[lo:hi], seeds[lo:hi], params, bos_id,
                                           boi_id, pad_id, num_tokens=num_tokens,
                                           forced_tokens=None if forced_tokens is None else forced_tokens[lo:hi]))
            return torch.cat(parts)
        if length > self.max_prompt_len:
            raise ValueError(f"prompt length {length} > max_prompt_len {self.max_prompt_len}")
        if self.batch_invariant and (batch, length) != (self.max_batch, self.max_prompt_len):
            # One shape for every call: the GEMMs, the attention splits and the prefill's attention tiles
            # then do the same arithmetic for a sample whatever its neighbours, so a seed gives the same
            # tokens in any batch (on GPU, kernels pick their reduction order by shape). Padding rows repeat
            # the last sample; left padding keeps each prompt's own slots and positions.
            fill = self.max_batch - batch
            ids = F.pad(input_ids, (self.max_prompt_len - length, 0), value=pad_id)
            mask = F.pad(attention_mask, (self.max_prompt_len - length, 0), value=0)
            repeat = lambda t: torch.cat([t, t[-1:].expand(fill, *t.shape[1:])]) if fill else t  # noqa: E731
            return self.generate(repeat(ids), repeat(mask), repeat(seeds), params, bos_id, boi_id, pad_id,
                                 num_tokens=num_tokens,
                                 forced_tokens=None if forced_tokens is None else repeat(forced_tokens))[:batch]
        if self._signature() != self._sig:
            self.refresh()
        dev = self.device
        ids = input_ids.to(dev)
        mask = attention_mask.to(dev).long()
        if bool((mask[:, -1] != 1).any()) or bool((mask.diff(dim=1) < 0).any()):
            raise ValueError("attention_mask must be left padding (0…0 1…1) with the last token real")
        if forced_tokens is not None:
            forced_tokens = forced_tokens.to(dev).long()
        rows = 2 * batch
        ids2, mask2 = cfg_batch(ids, mask, bos_id, boi_id, pad_id)
        self._seeds[:batch].copy_(seeds.to(dev).long())
        h, last_pos, start = self._prefill(ids2, mask2)
        first = self._sample(h, batch, params, 0)
        self._out[:batch, 0].copy_(first)
        self._tok[:batch].copy_(first if forced_tokens is None else forced_tokens[:, 0])
        self._step.fill_(1)
        self._slot.fill_(length)
        self._slot_host = length
        self._pos[:rows].copy_(last_pos + 1)
        self._start[:rows].copy_(start.to(torch.int32))
        key, graph = self._graph_for(batch, params) if self.use_cuda_graph else (None, None)
        for step in range(1, steps):
            if graph is not None:
                graph.replay()
            elif self.use_cuda_graph and step < steps - 1:
                stream = torch.cuda.Stream(device=dev)  # eager warm step (real work), then capture
                stream.wait_stream(torch.cuda.current_stream(dev))
                with torch.cuda.stream(stream):
                    self._decode_step(batch, params)
                torch.cuda.current_stream(dev).wait_stream(stream)
                graph = self._capture(key, batch, params)
            else:
                self._decode_step(batch, params)
            self._slot_host += 1
            if forced_tokens is not None:
                self._tok[:batch].copy_(forced_tokens[:, step])
        return self._out[:batch, :steps].clone()

    # ---- accounting (benchmarks) ---------------------------------------------------------------
    def kv_bytes_per_token(self) -> int:
        """Cache bytes one token occupies over all layers (K and V, scales included)."""
        elt = 1 if self.kv_dtype == "fp8" else torch.tensor([], dtype=self.dtype).element_size()
        per = 2 * self.num_layers * self.kv_heads * self.head_dim * elt
        if self.kv_dtype == "fp8":
            per += 2 * self.num_layers * self.kv_heads * 4
        return per

    def kv_bytes_read_per_image(self, prompt_len: int) -> int:
        """Cache bytes the decode steps read for one image (cond + uncond rows), prompt of prompt_len."""
        n = self.num_image_tokens
        contexts = sum(prompt_len + s for s in range(1, n))  # decode step s attends prompt + s slots
        return 2 * contexts * self.kv_bytes_per_token()

    def cache_bytes(self) -> int:
        total = self.k_cache.numel() * self.k_cache.element_size() * 2
        if self.k_scale is not None:
            total += self.k_scale.numel() * 4 * 2
        return total


__all__ = ["JanusEngine", "engine_available", "quantize_fp8", "decode_attention", "cfg_sample", "FP8_MAX", "KV_DTYPES",
           "DEFAULT_ATTN_CONFIG"]
