// Decode attention over an fp8 (e4m3) KV cache, one warp per (row, head[, split]), head_dim 128.
//
// Why CUDA and not Triton: with one query per head the work is a stream of K/V bytes, a dot product
// and a weighted sum per key. Triton only software-pipelines loads that feed tl.dot, and fp8 tiles into
// tl.dot pay a layout conversion; its best CUDA-core tile read the cache at ~3 TB/s. Here each lane
// holds 16 bytes of a key (8 lanes a key, 4 keys per warp load), keeps U loads of K and V in flight,
// converts e4m3 pairs with one instruction each and reduces with warp shuffles: no shared memory.
//
// Layouts (as `safecb.models.engine.JanusEngine` keeps them): q (R, H, 128) bf16; caches (R', KVH, L, 128)
// e4m3; scales (R', KVH, L) fp32 (value = e4m3 * scale); start (R,) int32 first valid slot; slot () int32
// last valid slot. Scores are in the log2 domain (qk_scale includes log2 e), as in the Triton kernels,
// so the split partials (op, lse) combine with the same `_combine_kernel`.
#include <cstdint>
#include <cuda_bf16.h>
#include <cuda_fp8.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <math_constants.h>
#include <torch/extension.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>

namespace {

constexpr int D = 128;

__device__ __forceinline__ void fp8x16_to_float(const uint4 raw, float (&out)[16]) {
    const uint32_t words[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
    for (int w = 0; w < 4; ++w) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const __nv_fp8x2_storage_t pair = static_cast<__nv_fp8x2_storage_t>((words[w] >> (16 * h)) & 0xFFFF);
            const __half2_raw raw2 = __nv_cvt_fp8x2_to_halfraw2(pair, __NV_E4M3);
            const float2 f = __half22float2(*reinterpret_cast<const __half2*>(&raw2));
            out[4 * w + 2 * h] = f.x;
            out[4 * w + 2 * h + 1] = f.y;
        }
    }
}

// U: warp loads of 4 keys each that a lane keeps in flight per iteration (4 U keys, 32 U bytes a lane).
template <int U>
__global__ void __launch_bounds__(128) fp8_decode_attention_kernel(
        const __nv_bfloat16* __restrict__ q, const uint8_t* __restrict__ kc, const uint8_t* __restrict__ vc,
        const float* __restrict__ ks, const float* __restrict__ vs, const int* __restrict__ start,
        const int* __restrict__ slot, __nv_bfloat16* __restrict__ out, float* __restrict__ op,
        float* __restrict__ lse, int rows, int heads, int group, int splits, int64_t stride_cr,
        int64_t stride_ch, int64_t stride_sr, int64_t stride_sh, float qk_scale) {
    constexpr int KEYS = 4 * U;
    const int warp = (blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    const int lane = threadIdx.x & 31;
    if (warp >= rows * heads * splits) return;
    const int split = warp % splits;
    const int row = warp / splits / heads;
    const int head = (warp / splits) % heads;
    const int kvh = head / group;
    const int first = start[row];
    const int end = *slot + 1;
    const int chunk = ((end - first + splits - 1) / splits + KEYS - 1) / KEYS * KEYS;
    const int lo = first + split * chunk;
    const int hi = min(lo + chunk, end);
    const int dpart = lane & 7;   // this lane's 16 of the 128 dims
    const int kpart = lane >> 3;  // this lane's key among the 4 of a warp load

    float qv[16];
    const __nv_bfloat16* qp = q + (static_cast<int64_t>(row) * heads + head) * D + dpart * 16;
#pragma unroll
    for (int i = 0; i < 16; ++i) qv[i] = __bfloat162float(qp[i]) * qk_scale;
    const uint8_t* kb = kc + row * stride_cr + kvh * stride_ch + dpart * 16;
    const uint8_t* vb = vc + row * stride_cr + kvh * stride_ch + dpart * 16;
    const float* ksb = ks + row * stride_sr + kvh * stride_sh;
    const float* vsb = vs + row * stride_sr + kvh * stride_sh;

    float m = -CUDART_INF_F, l = 0.f, acc[16];
#pragma unroll
    for (int i = 0; i < 16; ++i) acc[i] = 0.f;

    for (int n0 = lo; n0 < hi; n0 += KEYS) {
        uint4 kraw[U], vraw[U];
        float ksc[U], vsc[U];
#pragma unroll
        for (int u = 0; u < U; ++u) {  // all loads first: U x 2 x 16 bytes in flight per lane
            const int key = n0 + 4 * u + kpart;
            const bool ok = key < hi;
            kraw[u] = ok ? __ldg(reinterpret_cast<const uint4*>(kb + static_cast<int64_t>(key) * D)) : make_uint4(0, 0, 0, 0);
            vraw[u] = ok ? __ldg(reinterpret_cast<const uint4*>(vb + static_cast<int64_t>(key) * D)) : make_uint4(0, 0, 0, 0);
            ksc[u] = ok ? __ldg(ksb + key) : 0.f;
            vsc[u] = ok ? __ldg(vsb + key) : 0.f;
        }
        float score[U];
        float top = -CUDART_INF_F;
#pragma unroll
        for (int u = 0; u < U; ++u) {
            float kf[16];
            fp8x16_to_float(kraw[u], kf);
            float dot = 0.f;
#pragma unroll
            for (int i = 0; i < 16; ++i) dot = fmaf(qv[i], kf[i], dot);
            dot += __shfl_xor_sync(0xffffffff, dot, 1);
            dot += __shfl_xor_sync(0xffffffff, dot, 2);
            dot += __shfl_xor_sync(0xffffffff, dot, 4);
            score[u] = (n0 + 4 * u + kpart < hi) ? dot * ksc[u] : -CUDART_INF_F;
            top = fmaxf(top, score[u]);
        }
        top = fmaxf(top, __shfl_xor_sync(0xffffffff, top, 8));
        top = fmaxf(top, __shfl_xor_sync(0xffffffff, top, 16));
        const float m_new = fmaxf(m, top);
        const float alpha = exp2f(m - m_new);
        float psum = 0.f;
#pragma unroll
        for (int i = 0; i < 16; ++i) acc[i] *= alpha;
#pragma unroll
        for (int u = 0; u < U; ++u) {
            const float p = exp2f(score[u] - m_new);
            psum += p;
            const float w = p * vsc[u];
            float vf[16];
            fp8x16_to_float(vraw[u], vf);
#pragma unroll
            for (int i = 0; i < 16; ++i) acc[i] = fmaf(w, vf[i], acc[i]);
        }
        psum += __shfl_xor_sync(0xffffffff, psum, 8);
        psum += __shfl_xor_sync(0xffffffff, psum, 16);
        l = l * alpha + psum;
        m = m_new;
    }
#pragma unroll
    for (int i = 0; i < 16; ++i) {
        acc[i] += __shfl_xor_sync(0xffffffff, acc[i], 8);
        acc[i] += __shfl_xor_sync(0xffffffff, acc[i], 16);
    }
    if (kpart != 0) return;
    const int64_t rh = static_cast<int64_t>(row) * heads + head;
    if (splits == 1) {
        const float inv = 1.f / l;
#pragma unroll
        for (int i = 0; i < 16; ++i) out[rh * D + dpart * 16 + i] = __float2bfloat16(acc[i] * inv);
    } else {
        const int64_t base = rh * splits + split;
        const float inv = l > 0.f ? 1.f / l : 0.f;
#pragma unroll
        for (int i = 0; i < 16; ++i) op[base * D + dpart * 16 + i] = acc[i] * inv;
        if (dpart == 0) lse[base] = l > 0.f ? m + log2f(l) : -CUDART_INF_F;
    }
}

}  // namespace

void fp8_decode_attention(torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache, torch::Tensor k_scale,
                          torch::Tensor v_scale, torch::Tensor start, torch::Tensor slot, torch::Tensor out,
                          torch::Tensor partial, torch::Tensor lse, int64_t splits, double qk_scale,
                          int64_t keys_per_iter) {
    TORCH_CHECK(q.scalar_type() == at::kBFloat16 && q.size(2) == D && q.is_contiguous(), "q: (R, H, 128) bf16");
    TORCH_CHECK(k_cache.element_size() == 1 && k_cache.stride(3) == 1 && k_cache.stride(2) == D, "k cache: e4m3 (R, KVH, L, 128)");
    TORCH_CHECK(v_cache.strides() == k_cache.strides(), "v cache: the layout of the k cache");
    TORCH_CHECK(k_scale.strides() == v_scale.strides() && k_scale.stride(2) == 1, "scales: (R, KVH, L) fp32");
    const int rows = q.size(0), heads = q.size(1), kv_heads = k_cache.size(1);
    const int warps = rows * heads * static_cast<int>(splits);
    const int threads = 128;
    const int blocks = (warps * 32 + threads - 1) / threads;
    auto launch = [&](auto kernel) {
        kernel<<<blocks, threads, 0, c10::cuda::getCurrentCUDAStream()>>>(
            reinterpret_cast<const __nv_bfloat16*>(q.data_ptr()), reinterpret_cast<const uint8_t*>(k_cache.data_ptr()),
            reinterpret_cast<const uint8_t*>(v_cache.data_ptr()), k_scale.data_ptr<float>(), v_scale.data_ptr<float>(),
            start.data_ptr<int>(), slot.data_ptr<int>(), reinterpret_cast<__nv_bfloat16*>(out.data_ptr()),
            partial.data_ptr<float>(), lse.data_ptr<float>(), rows, heads, heads / kv_heads, static_cast<int>(splits),
            k_cache.stride(0), k_cache.stride(1), k_scale.stride(0), k_scale.stride(1), static_cast<float>(qk_scale));
    };
    if (keys_per_iter == 8) launch(fp8_decode_attention_kernel<2>);
    else if (keys_per_iter == 16) launch(fp8_decode_attention_kernel<4>);
    else if (keys_per_iter == 32) launch(fp8_decode_attention_kernel<8>);
    else TORCH_CHECK(false, "keys_per_iter must be 8, 16 or 32");
    C10_CUDA_KERNEL_LAUNCH_CHECK();
}
