"""The VQ decoder's forward with GroupNorm and SiLU fused into one Triton pass (inference only).

Hugging Face's decoder (`JanusVQVAEDecoder`) runs each `GroupNorm → x * sigmoid(x)` as four kernels
that read and write the full activation: at the decoder's last level, 128 channels at 384 × 384,
that is 38 MB per image and pass, and about 30% of the decode time on an H200 went to GroupNorm and
elementwise kernels (benchmarks/decode_judge.py --profile). Here one pass reads the activation for
the group statistics and one more reads it again and writes the normalised, activated result.

Three kernels, all deterministic and batch-invariant (an image's statistics never depend on the
other images of its batch, nor on the batch size):
1. partial: per image, per tile of pixels × all channels, each group's count, mean and centred sum
   of squares (Chan's parallel form: no cancellation of E[x²] - E[x]²);
2. finalize: per image, the tiles combined into each group's mean and 1/std;
3. apply: the tile again, `(x - mean) · rstd · w + b`, then SiLU, rounded to the activation's dtype
   after each step as PyTorch's GroupNorm, sigmoid and multiply round.
A tile spans every channel, so it reads whole rows of memory in NCHW (contiguous along pixels) and
in channels-last (contiguous along channels) alike.

The convolutions run without their bias: PyTorch adds a bias in a broadcasting kernel of its own,
which in channels-last took as long as the convolutions themselves. The bias of a resnet block's
first convolution is added as the next GroupNorm reads its input; the second's, with the residual
add, in one pass (`add_bias`).

Optionally (`subpixel`, off by default until timed on a GPU) each nearest ×2 upsample and the 3×3
convolution after it run as one 2×2 convolution over the input with four times the output channels,
then one pass that puts each output phase in place and adds the bias: 16 products per weight instead
of 36 (the upsampling convolutions are a fifth of the decoder's products) and no upsampled tensor.

The weights are Hugging Face's modules, read in place; the layer order is `JanusVQVAEDecoder.forward`'s.
Gradients do not flow through the Triton kernels: a decode that must reach the codebook (fine-tuning)
takes Hugging Face's forward (see `JanusAdapter.decode`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from safecb.models.engine import _INTERPRET

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the decoder keeps Hugging Face's forward
    triton = None

TILE_ELEMENTS = 8192  # channels × pixels per program: 64 pixels of 128 channels, 16 of 512


if triton is not None:

    @triton.jit
    def _load_shifted(X, SHIFT, b, c, p, m, sxb, sxc, sxp, HAS_SHIFT: tl.constexpr):
        """X's tile in fp32; with HAS_SHIFT plus the channel's SHIFT (a convolution's bias), rounded to
        X's dtype as PyTorch's in-place bias add rounds it."""
        x = tl.load(X + b * sxb + c * sxc + p * sxp, mask=m, other=0.0)
        if HAS_SHIFT:
            shift = tl.load(SHIFT + c, mask=m, other=0.0).to(tl.float32)
            x = (x.to(tl.float32) + shift).to(X.dtype.element_ty)
        return x.to(tl.float32)

    @triton.jit
    def _gn_partial_kernel(X, SHIFT, MEAN_T, M2_T, P, T, sxb, sxc, sxp,
                           G: tl.constexpr, CG: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_CG: tl.constexpr,
                           BLOCK_P: tl.constexpr, HAS_SHIFT: tl.constexpr):
        """Per image b and pixel tile t: each group's mean and centred sum of squares over the tile."""
        b = tl.program_id(0)
        t = tl.program_id(1)
        g = tl.arange(0, BLOCK_G)[:, None, None]
        j = tl.arange(0, BLOCK_CG)[None, :, None]
        p = t * BLOCK_P + tl.arange(0, BLOCK_P)[None, None, :]
        m = (g < G) & (j < CG) & (p < P)
        x = _load_shifted(X, SHIFT, b, g * CG + j, p, m, sxb, sxc, sxp, HAS_SHIFT)
        count = CG * tl.minimum(P - t * BLOCK_P, BLOCK_P)
        mean = tl.sum(tl.sum(x, 2), 1) / count  # (BLOCK_G,)
        d = tl.where(m, x - mean[:, None, None], 0.0)
        m2 = tl.sum(tl.sum(d * d, 2), 1)
        gs = tl.arange(0, BLOCK_G)
        tl.store(MEAN_T + (b * T + t) * G + gs, mean, mask=gs < G)
        tl.store(M2_T + (b * T + t) * G + gs, m2, mask=gs < G)

    @triton.jit
    def _gn_finalize_kernel(MEAN_T, M2_T, MEAN, RSTD, P, T, eps,
                            G: tl.constexpr, CG: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_T: tl.constexpr,
                            TILE_P: tl.constexpr):
        """Per image b: the tiles' (count, mean, M2) combined into each group's mean and 1/std."""
        b = tl.program_id(0)
        gs = tl.arange(0, BLOCK_G)[None, :]
        total = tl.zeros([BLOCK_G], dtype=tl.float32)
        for start in range(0, T, BLOCK_T):  # pass 1: the mean
            t = start + tl.arange(0, BLOCK_T)[:, None]
            m = (t < T) & (gs < G)
            n = (CG * tl.minimum(P - t * TILE_P, TILE_P)).to(tl.float32)
            mean_t = tl.load(MEAN_T + (b * T + t) * G + gs, mask=m, other=0.0)
            total += tl.sum(tl.where(m, n * mean_t, 0.0), 0)
        mean = total / (CG * P)
        m2 = tl.zeros([BLOCK_G], dtype=tl.float32)
        for start in range(0, T, BLOCK_T):  # pass 2: the centred sum of squares
            t = start + tl.arange(0, BLOCK_T)[:, None]
            m = (t < T) & (gs < G)
            n = (CG * tl.minimum(P - t * TILE_P, TILE_P)).to(tl.float32)
            mean_t = tl.load(MEAN_T + (b * T + t) * G + gs, mask=m, other=0.0)
            m2_t = tl.load(M2_T + (b * T + t) * G + gs, mask=m, other=0.0)
            shift = mean_t - mean[None, :]
            m2 += tl.sum(tl.where(m, m2_t + n * shift * shift, 0.0), 0)
        g = tl.arange(0, BLOCK_G)
        tl.store(MEAN + b * G + g, mean, mask=g < G)
        tl.store(RSTD + b * G + g, 1.0 / tl.sqrt(m2 / (CG * P) + eps), mask=g < G)

    @triton.jit
    def _gn_apply_kernel(X, SHIFT, OUT, W, BIAS, MEAN, RSTD, P, sxb, sxc, sxp, sob, soc, sop,
                         G: tl.constexpr, CG: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_CG: tl.constexpr,
                         BLOCK_P: tl.constexpr, SILU: tl.constexpr, HAS_SHIFT: tl.constexpr):
        """OUT = (X - mean) · rstd · w + b, then x · sigmoid(x) with SILU; rounded as PyTorch's kernels."""
        b = tl.program_id(0)
        t = tl.program_id(1)
        g = tl.arange(0, BLOCK_G)[:, None, None]
        j = tl.arange(0, BLOCK_CG)[None, :, None]
        p = t * BLOCK_P + tl.arange(0, BLOCK_P)[None, None, :]
        m = (g < G) & (j < CG) & (p < P)
        c = g * CG + j
        x = _load_shifted(X, SHIFT, b, c, p, m, sxb, sxc, sxp, HAS_SHIFT)
        mean = tl.load(MEAN + b * G + g, mask=g < G, other=0.0)
        rstd = tl.load(RSTD + b * G + g, mask=g < G, other=0.0)
        w = tl.load(W + c, mask=(g < G) & (j < CG), other=0.0).to(tl.float32)
        bias = tl.load(BIAS + c, mask=(g < G) & (j < CG), other=0.0).to(tl.float32)
        scale = rstd * w
        y = (x * scale + (bias - mean * scale)).to(OUT.dtype.element_ty)  # PyTorch's GroupNorm, fp32 inside
        if SILU:
            yf = y.to(tl.float32)
            s = (1.0 / (1.0 + tl.exp(-yf))).to(OUT.dtype.element_ty).to(tl.float32)  # torch.sigmoid's rounding
            y = (yf * s).to(OUT.dtype.element_ty)
        tl.store(OUT + b * sob + c * soc + p * sop, y, mask=m)

    @triton.jit
    def _bias_residual_kernel(H, BIAS, RES, OUT, C, P, shb, shc, shp, srb, src, srp, sob, soc, sop,
                              BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr, HAS_RES: tl.constexpr):
        """OUT = RES + (H + bias): a convolution's bias and the residual add in one pass, rounded as
        PyTorch's two adds round."""
        b = tl.program_id(0)
        c = tl.arange(0, BLOCK_C)[:, None]
        p = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)[None, :]
        m = (c < C) & (p < P)
        h = tl.load(H + b * shb + c * shc + p * shp, mask=m, other=0.0).to(tl.float32)
        bias = tl.load(BIAS + c, mask=c < C, other=0.0).to(tl.float32)
        y = (h + bias).to(OUT.dtype.element_ty)
        if HAS_RES:
            r = tl.load(RES + b * srb + c * src + p * srp, mask=m, other=0.0).to(tl.float32)
            y = (r + y.to(tl.float32)).to(OUT.dtype.element_ty)
        tl.store(OUT + b * sob + c * soc + p * sop, y, mask=m)

    @triton.jit
    def _subpixel_bias_kernel(Y, BIAS, OUT, C, W, P, syb, syc, syp, sob, soc, sop,
                              BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
        """OUT (B, C, 2H, 2W) pixel (2i + a, 2j + e) = Y (B, 4C, H + 1, W + 1) channel (2a + e) C + c at
        (i + a, j + e), plus the bias: the phases of `subpixel_upsample`'s convolution put in place."""
        b = tl.program_id(0)
        c = tl.arange(0, BLOCK_C)[:, None]
        q = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)[None, :]  # output pixel, row-major
        m = (c < C) & (q < P)
        row, col = q // (2 * W), q % (2 * W)
        a, e = row % 2, col % 2
        src = (row // 2 + a) * (W + 1) + col // 2 + e  # pixel of Y
        y = tl.load(Y + b * syb + ((2 * a + e) * C + c) * syc + src * syp, mask=m, other=0.0).to(tl.float32)
        bias = tl.load(BIAS + c, mask=c < C, other=0.0).to(tl.float32)
        tl.store(OUT + b * sob + c * soc + q * sop, (y + bias).to(OUT.dtype.element_ty), mask=m)


def _triton_runs(x: torch.Tensor) -> bool:
    return triton is not None and (x.is_cuda or _INTERPRET) and x.numel() > 0


def _flat_pixel_strides(x: torch.Tensor) -> tuple[int, int, int]:
    """(batch, channel, pixel) strides of (B, C, H, W) in NCHW or channels-last: (H, W) as one axis."""
    if x.stride(2) != x.shape[3] * x.stride(3):
        raise ValueError(f"vq_decoder: pixels must be one flat axis, got strides {tuple(x.stride())}")
    return x.stride(0), x.stride(1), x.stride(3)


def group_norm_silu(x: torch.Tensor, norm: torch.nn.GroupNorm, silu: bool = True,
                    shift: torch.Tensor | None = None) -> torch.Tensor:
    """`norm(x + shift)`, then `x * sigmoid(x)` where `silu`, for (B, C, H, W) in NCHW or channels-last;
    `shift` (C,) is the bias of the convolution that made x, added here instead of in a pass of its
    own. The output keeps the input's layout. Triton where it runs, PyTorch's ops elsewhere."""
    if not _triton_runs(x):
        x = x if shift is None else x + shift.view(1, -1, 1, 1)
        y = F.group_norm(x, norm.num_groups, norm.weight, norm.bias, norm.eps)
        return y * torch.sigmoid(y) if silu else y
    batch, channels, height, width = x.shape
    groups = norm.num_groups
    per_group, pixels = channels // groups, height * width
    block_g, block_cg = triton.next_power_of_2(groups), triton.next_power_of_2(per_group)
    block_p = max(1, min(triton.next_power_of_2(pixels), TILE_ELEMENTS // (block_g * block_cg)))
    tiles = triton.cdiv(pixels, block_p)
    out = torch.empty_like(x)  # same layout as x
    (sxb, sxc, sxp), (sob, soc, sop) = _flat_pixel_strides(x), _flat_pixel_strides(out)
    has_shift = shift is not None
    shift = shift if has_shift else norm.weight  # any pointer: not read
    mean_t = torch.empty(batch, tiles, groups, dtype=torch.float32, device=x.device)
    m2_t = torch.empty_like(mean_t)
    mean = torch.empty(batch, groups, dtype=torch.float32, device=x.device)
    rstd = torch.empty_like(mean)
    shape = dict(G=groups, CG=per_group, BLOCK_G=block_g)
    _gn_partial_kernel[(batch, tiles)](x, shift, mean_t, m2_t, pixels, tiles, sxb, sxc, sxp, **shape,
                                       BLOCK_CG=block_cg, BLOCK_P=block_p, HAS_SHIFT=has_shift, num_warps=8)
    _gn_finalize_kernel[(batch,)](mean_t, m2_t, mean, rstd, pixels, tiles, float(norm.eps), **shape,
                                  BLOCK_T=min(256, triton.next_power_of_2(tiles)), TILE_P=block_p, num_warps=4)
    _gn_apply_kernel[(batch, tiles)](x, shift, out, norm.weight, norm.bias, mean, rstd, pixels, sxb, sxc, sxp,
                                     sob, soc, sop, **shape, BLOCK_CG=block_cg, BLOCK_P=block_p, SILU=silu,
                                     HAS_SHIFT=has_shift, num_warps=8)
    return out


def add_bias(h: torch.Tensor, bias: torch.Tensor | None, residual: torch.Tensor | None = None) -> torch.Tensor:
    """`residual + (h + bias)` for (B, C, H, W) in NCHW or channels-last, `bias` (C,) over the channels:
    one pass where Triton runs. PyTorch adds a convolution's bias in a broadcasting kernel of its own,
    which in channels-last took as long as the convolutions (benchmarks/decode_judge.py --profile)."""
    if bias is None or not _triton_runs(h):  # (a convolution made with bias=False has nothing to add)
        h = h if bias is None else h + bias.view(1, -1, 1, 1)
        return h if residual is None else residual + h
    batch, channels, height, width = h.shape
    block_c = triton.next_power_of_2(channels)
    block_p = max(1, min(triton.next_power_of_2(height * width), TILE_ELEMENTS // block_c))
    out = torch.empty_like(h)
    res = residual if residual is not None else h
    _bias_residual_kernel[(batch, triton.cdiv(height * width, block_p))](
        h, bias, res, out, channels, height * width, *_flat_pixel_strides(h), *_flat_pixel_strides(res),
        *_flat_pixel_strides(out), BLOCK_C=block_c, BLOCK_P=block_p, HAS_RES=residual is not None, num_warps=8)
    return out


def _conv_without_bias(conv: torch.nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """The convolution alone: its bias is added by the next fused step."""
    return F.conv2d(x, conv.weight, None, conv.stride, conv.padding, conv.dilation, conv.groups)


def _resnet_block(block, x: torch.Tensor) -> torch.Tensor:
    """`JanusVQVAEResnetBlock.forward` (dropout is the identity at inference); conv1's bias goes into
    norm2's passes, conv2's into the residual add."""
    h = _conv_without_bias(block.conv1, group_norm_silu(x, block.norm1))
    h = _conv_without_bias(block.conv2, group_norm_silu(h, block.norm2, shift=block.conv1.bias))
    if block.in_channels != block.out_channels:
        x = block.conv_shortcut(x) if block.use_conv_shortcut else block.nin_shortcut(x)
    return add_bias(h, block.conv2.bias, residual=x)


# Nearest ×2 then a 3×3 convolution (padding 1), per output phase: pixel (2i + a, 2j + e) sees input rows
# i - 1 + a and i + a (a = 0: kernel row 0, then rows 1 + 2; a = 1: rows 0 + 1, then row 2), and the same
# for columns. So the four phases are 2×2 kernels over the input: 16 products per weight, not 36.
_PHASE_TAPS = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 1.0, 1.0]],   # a = 0: (2 taps, 3 kernel rows)
                            [[1.0, 1.0, 0.0], [0.0, 0.0, 1.0]]])  # a = 1


def subpixel_weight(weight: torch.Tensor) -> torch.Tensor:
    """A 3×3 kernel (O, I, 3, 3) applied after a nearest ×2 upsample, as one 2×2 kernel (4 O, I, 2, 2) over
    the input with padding 1: output channel (2a + e) O + o is phase (a, e) of channel o, at pixel
    (i + a, j + e) for upsampled pixel (2i + a, 2j + e). Summed in fp32, then rounded to the weight's dtype."""
    taps = _PHASE_TAPS.to(weight.device)
    phases = torch.einsum("ary,oiyx,esx->aeoirs", taps, weight.float(), taps)  # (2, 2, O, I, 2, 2)
    return phases.reshape(-1, *weight.shape[1:2], 2, 2).to(weight.dtype)


def subpixel_upsample(conv: torch.nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """`conv(F.interpolate(x, scale_factor=2, mode="nearest"))` for a 3×3 convolution with padding 1,
    without the upsampled tensor: one 2×2 convolution with four times the output channels over x (less
    than half the products: 16 a weight instead of 36), then one pass that puts each phase in place and
    adds the bias. The output keeps x's layout."""
    batch, _, height, width = x.shape
    channels = conv.out_channels
    fmt = torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous() \
        else torch.contiguous_format
    y = F.conv2d(x, subpixel_weight(conv.weight).contiguous(memory_format=fmt), None, padding=1)
    bias = conv.bias if conv.bias is not None else y.new_zeros(channels)
    if not _triton_runs(y):
        y = y.view(batch, 2, 2, channels, height + 1, width + 1)
        out = torch.stack([torch.stack([y[:, a, e, :, a:a + height, e:e + width] for e in (0, 1)], -1)
                           for a in (0, 1)], 3).reshape(batch, channels, 2 * height, 2 * width)
        return (out + bias.view(1, -1, 1, 1)).contiguous(memory_format=fmt)
    out = torch.empty(batch, channels, 2 * height, 2 * width, device=x.device, dtype=y.dtype, memory_format=fmt)
    block_c = triton.next_power_of_2(channels)
    pixels = 4 * height * width
    block_p = max(1, min(triton.next_power_of_2(pixels), TILE_ELEMENTS // block_c))
    _subpixel_bias_kernel[(batch, triton.cdiv(pixels, block_p))](
        y, bias, out, channels, width, pixels, *_flat_pixel_strides(y), *_flat_pixel_strides(out),
        BLOCK_C=block_c, BLOCK_P=block_p, num_warps=8)
    return out


def _upsample(upsample, x: torch.Tensor, subpixel: bool) -> torch.Tensor:
    """`JanusVQVAEConvUpsample.forward`: nearest ×2, then the convolution, its bias in a fused pass; with
    `subpixel` (and a 3×3 convolution of padding 1) as `subpixel_upsample`."""
    conv = upsample.conv
    if subpixel and conv.kernel_size == (3, 3) and conv.padding == (1, 1) and conv.stride == (1, 1) \
            and conv.groups == 1 and conv.dilation == (1, 1):
        return subpixel_upsample(conv, x)
    return add_bias(_conv_without_bias(conv, F.interpolate(x, scale_factor=2.0, mode="nearest")), conv.bias)


@torch.no_grad()
def decode_latents(decoder, latents: torch.Tensor, subpixel: bool = False) -> torch.Tensor:
    """`JanusVQVAEDecoder.forward(latents)` with the fused GroupNorm + SiLU: (B, 3, H, W). `subpixel`
    runs the upsampling convolutions as `subpixel_upsample` (checked on the CPU; not yet timed on a GPU,
    hence off by default)."""
    h = decoder.conv_in(latents)
    h = _resnet_block(decoder.mid.block_1, h)
    h = decoder.mid.attn_1(h)  # one attention over 24 x 24 pixels: its GroupNorm is not worth a kernel
    h = _resnet_block(decoder.mid.block_2, h)
    for level, up in enumerate(decoder.up):
        for i, block in enumerate(up.block):
            h = _resnet_block(block, h)
            if len(up.attn) > 0:
                h = up.attn[i](h)
        if level != len(decoder.up) - 1:
            h = _upsample(up.upsample, h, subpixel)
    return decoder.conv_out(group_norm_silu(h, decoder.norm_out))
