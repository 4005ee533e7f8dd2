"""The self-judge's language-model pass on the engine's fused weights: an image prefix, then the questions.

`JanusAdapter.judge` runs an image's hundreds of tokens once and the C category questions after it,
side by side in one sequence under a block mask. Through Hugging Face's Llama layers, half of that
pass on an H200 is outside the matrix products: RMSNorm in five kernels, two and three products where
one would do, and the cache grown by `cat` for the questions (`benchmarks/decode_judge.py --profile`).
This is the same arithmetic on the weights the generation engine already holds (one QKV and one
gate-up product per layer, RMSNorm with the residual add and SiLU·up fused where Triton runs), with
the prefix's keys and values written straight into buffers that have room for the questions.

Pure tensor code: no autograd (the judge's differentiable form stays Hugging Face's), no Ray.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from safecb.models.engine import JanusEngine, _add_rmsnorm, _rms_norm, _rotate_half, _silu_mul

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None

ROPE_ROWS = 16  # tokens per program of the RoPE kernel

if triton is not None:

    @triton.jit
    def _rope_split_kernel(QKV, COS, SIN, Q, K, V, rows, L, lo, sq_b, sq_h, sq_l, sk_b, sk_h, sk_l,
                           HEADS: tl.constexpr, KV_HEADS: tl.constexpr, D: tl.constexpr, ROWS: tl.constexpr):
        """One head of the QKV product (B·L, (HEADS + 2 KV_HEADS) D) for ROWS tokens: the query rotated into
        Q (B, HEADS, L, D); the key rotated and the value as is into K, V (B, KV_HEADS, ·, D) at slot lo + l.
        Replaces a RoPE in four elementwise kernels and three copies into the attention layout."""
        r = tl.program_id(0) * ROWS + tl.arange(0, ROWS)[:, None]  # (ROWS, 1) token = b · L + l
        head = tl.program_id(1)  # queries, then keys, then values
        HALF: tl.constexpr = D // 2
        j = tl.arange(0, HALF)[None, :]
        m = (r < rows) & (j < HALF)
        b = r // L
        pos = r % L
        src = QKV + r * ((HEADS + 2 * KV_HEADS) * D) + head * D
        x1 = tl.load(src + j, mask=m, other=0.0).to(tl.float32)
        x2 = tl.load(src + HALF + j, mask=m, other=0.0).to(tl.float32)
        if head < HEADS + KV_HEADS:  # HF's rotate-half RoPE, in fp32, rounded once
            c1 = tl.load(COS + pos * D + j, mask=m, other=0.0).to(tl.float32)
            c2 = tl.load(COS + pos * D + HALF + j, mask=m, other=0.0).to(tl.float32)
            s1 = tl.load(SIN + pos * D + j, mask=m, other=0.0).to(tl.float32)
            s2 = tl.load(SIN + pos * D + HALF + j, mask=m, other=0.0).to(tl.float32)
            y1 = x1 * c1 - x2 * s1
            y2 = x2 * c2 + x1 * s2
        else:
            y1 = x1
            y2 = x2
        if head < HEADS:
            dst = Q + b * sq_b + head * sq_h + pos * sq_l
        elif head < HEADS + KV_HEADS:
            dst = K + b * sk_b + (head - HEADS) * sk_h + (lo + pos) * sk_l
        else:
            dst = V + b * sk_b + (head - HEADS - KV_HEADS) * sk_h + (lo + pos) * sk_l
        tl.store(dst + j, y1.to(Q.dtype.element_ty), mask=m)
        tl.store(dst + HALF + j, y2.to(Q.dtype.element_ty), mask=m)


def fits(engine: JanusEngine, prefix_len: int, suffix_len: int) -> bool:
    """Whether the engine's RoPE table covers a prefix and questions of these lengths."""
    return prefix_len + suffix_len <= engine.max_len


@torch.no_grad()
def question_states(engine: JanusEngine, prefix: torch.Tensor, questions: torch.Tensor, positions: torch.Tensor,
                    visible: torch.Tensor) -> torch.Tensor:
    """Final-normed hidden states (B, S, H) of the questions.

    prefix (B, P, H): input embeddings of the shared prefix (the image's features in place), at
    positions 0..P-1, causal; questions (B, S, H): the questions' embeddings, at `positions` (S,);
    visible (S, P + S) bool: which keys each question token sees (the prefix, and its own question
    up to itself).
    """
    if engine._signature() != engine._sig:  # the module's weights changed since the engine read them
        engine.refresh()
    batch, p, _ = prefix.shape
    s = questions.shape[1]
    if not fits(engine, p, s):
        raise ValueError(f"judge sequence of {p + s} tokens > the engine's {engine.max_len}")
    heads, kv_heads, dim = engine.heads, engine.kv_heads, engine.head_dim
    fused = engine.backend == "triton"
    keys = torch.empty(batch, kv_heads, p + s, dim, device=prefix.device, dtype=engine.dtype)
    values = torch.empty_like(keys)
    gqa = kv_heads != heads
    rope_prefix = (engine.cos[:p], engine.sin[:p])  # (P, D)
    rope_questions = (engine.cos[positions], engine.sin[positions])  # (S, D), gathered: contiguous
    rope_fused = fused and triton is not None and (dim & (dim - 1)) == 0  # tl.arange: powers of 2
    mask = visible.to(prefix.device)

    def norm(x: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x + delta (rounded as HF's residual add) and its RMSNorm."""
        if fused:
            flat = x.view(-1, x.shape[-1])
            out = torch.empty_like(flat)
            _add_rmsnorm(flat, None if delta is None else delta.reshape(flat.shape), weight, out, engine.eps)
            return x, out.view(x.shape)
        x = x if delta is None else x + delta
        return x, _rms_norm(x, weight, engine.eps)

    def mlp(layer, h: torch.Tensor) -> torch.Tensor:
        gu = F.linear(h, layer.wgu, layer.bgu)
        if fused and engine._silu_fused:
            return F.linear(_silu_mul(gu.view(-1, gu.shape[-1])).view(*gu.shape[:-1], -1), layer.wd, layer.bd)
        gate, up = gu.chunk(2, dim=-1)
        return F.linear(engine.mlp_act(gate) * up, layer.wd, layer.bd)

    def project(layer, h: torch.Tensor, rope, lo: int, hi: int) -> torch.Tensor:
        """Queries (B, heads, L, D); keys and values of slots [lo, hi) written into the buffers."""
        qkv = F.linear(h, layer.wqkv, layer.bqkv)  # (B, L, (heads + 2 kv_heads) D)
        length = qkv.shape[1]
        cos, sin = rope
        if rope_fused:
            q = torch.empty(batch, heads, length, dim, device=qkv.device, dtype=qkv.dtype)
            grid = (triton.cdiv(batch * length, ROPE_ROWS), heads + 2 * kv_heads)
            _rope_split_kernel[grid](qkv, cos, sin, q, keys, values, batch * length, length, lo,
                                     *q.stride()[:3], *keys.stride()[:3], HEADS=heads, KV_HEADS=kv_heads, D=dim,
                                     ROWS=ROPE_ROWS, num_warps=2)
            return q
        qk = qkv[..., :(heads + kv_heads) * dim].view(batch, length, heads + kv_heads, dim)
        qk = (qk * cos[:, None]) + (_rotate_half(qk) * sin[:, None])  # HF's RoPE, on queries and keys at once
        keys[:, :, lo:hi] = qk[:, :, heads:].transpose(1, 2)
        values[:, :, lo:hi] = qkv[..., (heads + kv_heads) * dim:].view(batch, length, kv_heads, dim).transpose(1, 2)
        return qk[:, :, :heads].transpose(1, 2)

    # Copies: the fused residual add writes into them.
    x_p = prefix.to(engine.dtype, copy=True).contiguous()
    x_q = questions.to(engine.dtype, copy=True).contiguous()
    delta_p = delta_q = None
    last = len(engine.layers) - 1
    for index, layer in enumerate(engine.layers):
        x_p, h_p = norm(x_p, delta_p, layer.ln1)
        q_p = project(layer, h_p, rope_prefix, 0, p)
        x_q, h_q = norm(x_q, delta_q, layer.ln1)
        q_q = project(layer, h_q, rope_questions, p, p + s)
        o_q = F.scaled_dot_product_attention(q_q, keys, values, attn_mask=mask, scale=engine.scaling, enable_gqa=gqa)
        x_q, h_q = norm(x_q, F.linear(o_q.transpose(1, 2).reshape(batch, s, -1), layer.wo, layer.bo), layer.ln2)
        delta_q = mlp(layer, h_q)
        if index < last:  # the prefix's own outputs feed only the next layer's keys and values
            o_p = F.scaled_dot_product_attention(q_p, keys[:, :, :p], values[:, :, :p], is_causal=True,
                                                 scale=engine.scaling, enable_gqa=gqa)
            x_p, h_p = norm(x_p, F.linear(o_p.transpose(1, 2).reshape(batch, p, -1), layer.wo, layer.bo), layer.ln2)
            delta_p = mlp(layer, h_p)
    return norm(x_q, delta_q, engine.norm)[1]
