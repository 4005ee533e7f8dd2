// Decode attention over an fp8 (e4m3) KV cache, one warp per (row, head[, split]), head_dim 128.
//
// Why CUDA and not Triton: with one query per head the work is a stream of K/V bytes, a dot product
// and a weighted sum per key. Triton only software-pipelines loads that feed tl.dot, and fp8 tiles into
// tl.dot pay a layout conversion; its best CUDA-core tile read the cache at ~3 TB/s. Here each lane
// holds 16 bytes of a key (8 lanes a key, 4 keys per warp load), converts e4m3 pairs with one
// instruction each and reduces with warp shuffles.
//
// Two ways to keep bytes in flight (`stages`):
//   1   loads straight into registers, U loads of K and V per lane per iteration; between iterations
//       the warp has nothing in flight, so the bandwidth rests on other warps covering the latency;
//   S>1 cp.async into a per-warp ring of S tiles in shared memory: tile t+S-1 is requested before tile
//       t is used, so each warp always has S-1 tiles on the way (what Triton's pipeline does for tl.dot).
//
// Layouts (as `safecb.models.engine.JanusEngine` keeps them): q (R, H, 128) bf16; caches (R', KVH, L, 128)
// e4m3; scales (R', KVH, L) fp32 (value = e4m3 * scale); start (R,) int32 first valid slot; slot () int32
// last valid slot; prompt_row (R,) int32 and prompt_end () int32, optional: row r's slots [0, prompt_end)
// are read from row prompt_row[r] (the same values: the prefill computed each unconditional prompt once,
// so hundreds of rows read one row's prompt, from L2). Scores are in the log2 domain (qk_scale includes
// log2 e), as in the Triton kernels, so the split partials (op, lse) combine with `_combine_kernel`.
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

// Online softmax over one tile of 4U keys: lane (dpart, kpart) holds 16 dims of keys 4u + kpart.
template <int U>
__device__ __forceinline__ void attend_tile(const float (&qv)[16], const uint4 (&kraw)[U], const uint4 (&vraw)[U],
                                            const float (&ksc)[U], const float (&vsc)[U], int valid, int kpart,
                                            float& m, float& l, float (&acc)[16]) {
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
        score[u] = (4 * u + kpart < valid) ? dot * ksc[u] : -CUDART_INF_F;
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

// Where one warp works: its (row, head, split), key range [lo, hi), and its lane's 16 dims of q.
struct WarpTask {
    int row, head, kvh, split, lo, hi, dpart, kpart;
    int prompt_row, prompt_end;  // keys < prompt_end are read from row prompt_row
};

__device__ __forceinline__ WarpTask warp_task(int warp, int lane, int heads, int group, int splits, int keys,
                                              const int* __restrict__ start, const int* __restrict__ slot,
                                              const int* __restrict__ prompt_row, const int* __restrict__ prompt_end) {
    WarpTask t;
    t.split = warp % splits;
    t.row = warp / splits / heads;
    t.head = (warp / splits) % heads;
    t.kvh = t.head / group;
    const int first = start[t.row];
    const int end = *slot + 1;
    const int chunk = ((end - first + splits - 1) / splits + keys - 1) / keys * keys;
    t.lo = first + t.split * chunk;
    t.hi = min(t.lo + chunk, end);
    t.dpart = lane & 7;   // this lane's 16 of the 128 dims
    t.kpart = lane >> 3;  // this lane's key among the 4 of a warp load
    t.prompt_row = prompt_row ? prompt_row[t.row] : t.row;
    t.prompt_end = prompt_row ? *prompt_end : 0;
    return t;
}

// A warp's cache rows: its own, and the one its prompt slots are read from (keys < prompt_end).
struct KvRows {
    const uint8_t *k, *v, *k_prompt, *v_prompt;
    const float *ks, *vs, *ks_prompt, *vs_prompt;
    // Selects, not an indexed array: an array indexed at run time would live in local memory.
    __device__ __forceinline__ const uint8_t* kp(bool prompt) const { return prompt ? k_prompt : k; }
    __device__ __forceinline__ const uint8_t* vp(bool prompt) const { return prompt ? v_prompt : v; }
    __device__ __forceinline__ const float* ksp(bool prompt) const { return prompt ? ks_prompt : ks; }
    __device__ __forceinline__ const float* vsp(bool prompt) const { return prompt ? vs_prompt : vs; }
};

__device__ __forceinline__ KvRows kv_rows(const WarpTask& t, const uint8_t* kc, const uint8_t* vc, const float* ks,
                                          const float* vs, int64_t stride_cr, int64_t stride_ch, int64_t stride_sr,
                                          int64_t stride_sh) {
    const int64_t own = t.row * stride_cr + t.kvh * stride_ch, shared = t.prompt_row * stride_cr + t.kvh * stride_ch;
    const int64_t own_s = t.row * stride_sr + t.kvh * stride_sh, shared_s = t.prompt_row * stride_sr + t.kvh * stride_sh;
    return {kc + own, vc + own, kc + shared, vc + shared, ks + own_s, vs + own_s, ks + shared_s, vs + shared_s};
}

__device__ __forceinline__ void load_query(const __nv_bfloat16* __restrict__ q, const WarpTask& t, int heads,
                                           float qk_scale, float (&qv)[16]) {
    const __nv_bfloat16* qp = q + (static_cast<int64_t>(t.row) * heads + t.head) * D + t.dpart * 16;
#pragma unroll
    for (int i = 0; i < 16; ++i) qv[i] = __bfloat162float(qp[i]) * qk_scale;
}

// Reduce the 4 key groups of the warp and write out (splits == 1) or the split partial and its lse.
__device__ __forceinline__ void write_result(const WarpTask& t, int heads, int splits, float m, float l,
                                             float (&acc)[16], __nv_bfloat16* __restrict__ out,
                                             float* __restrict__ op, float* __restrict__ lse) {
#pragma unroll
    for (int i = 0; i < 16; ++i) {
        acc[i] += __shfl_xor_sync(0xffffffff, acc[i], 8);
        acc[i] += __shfl_xor_sync(0xffffffff, acc[i], 16);
    }
    if (t.kpart != 0) return;
    const int64_t rh = static_cast<int64_t>(t.row) * heads + t.head;
    if (splits == 1) {
        const float inv = 1.f / l;
#pragma unroll
        for (int i = 0; i < 16; ++i) out[rh * D + t.dpart * 16 + i] = __float2bfloat16(acc[i] * inv);
    } else {
        const int64_t base = rh * splits + t.split;
        const float inv = l > 0.f ? 1.f / l : 0.f;
#pragma unroll
        for (int i = 0; i < 16; ++i) op[base * D + t.dpart * 16 + i] = acc[i] * inv;
        if (t.dpart == 0) lse[base] = l > 0.f ? m + log2f(l) : -CUDART_INF_F;
    }
}

#define KERNEL_ARGS                                                                                              \
    const __nv_bfloat16 *__restrict__ q, const uint8_t *__restrict__ kc, const uint8_t *__restrict__ vc,      \
        const float *__restrict__ ks, const float *__restrict__ vs, const int *__restrict__ start,             \
        const int *__restrict__ slot, const int *__restrict__ prompt_row, const int *__restrict__ prompt_end,   \
        __nv_bfloat16 *__restrict__ out, float *__restrict__ op,                                                \
        float *__restrict__ lse, int rows, int heads, int group, int splits, int64_t stride_cr,                \
        int64_t stride_ch, int64_t stride_sr, int64_t stride_sh, float qk_scale

// stages == 1. U: warp loads of 4 keys each that a lane keeps in flight per iteration (32 U bytes a lane).
template <int U>
__global__ void __launch_bounds__(256) fp8_decode_attention_kernel(KERNEL_ARGS) {
    constexpr int KEYS = 4 * U;
    const int warp = (blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    if (warp >= rows * heads * splits) return;
    const WarpTask t = warp_task(warp, threadIdx.x & 31, heads, group, splits, KEYS, start, slot, prompt_row, prompt_end);
    float qv[16];
    load_query(q, t, heads, qk_scale, qv);
    const KvRows p = kv_rows(t, kc, vc, ks, vs, stride_cr, stride_ch, stride_sr, stride_sh);

    float m = -CUDART_INF_F, l = 0.f, acc[16];
#pragma unroll
    for (int i = 0; i < 16; ++i) acc[i] = 0.f;
    for (int n0 = t.lo; n0 < t.hi; n0 += KEYS) {
        uint4 kraw[U], vraw[U];
        float ksc[U], vsc[U];
#pragma unroll
        for (int u = 0; u < U; ++u) {  // all loads first: U x 2 x 16 bytes in flight per lane
            const int key = n0 + 4 * u + t.kpart;
            const bool ok = key < t.hi;
            const bool in_prompt = key < t.prompt_end;
            const int64_t off = static_cast<int64_t>(key) * D + t.dpart * 16;
            kraw[u] = ok ? __ldg(reinterpret_cast<const uint4*>(p.kp(in_prompt) + off)) : make_uint4(0, 0, 0, 0);
            vraw[u] = ok ? __ldg(reinterpret_cast<const uint4*>(p.vp(in_prompt) + off)) : make_uint4(0, 0, 0, 0);
            ksc[u] = ok ? __ldg(p.ksp(in_prompt) + key) : 0.f;
            vsc[u] = ok ? __ldg(p.vsp(in_prompt) + key) : 0.f;
        }
        attend_tile<U>(qv, kraw, vraw, ksc, vsc, t.hi - n0, t.kpart, m, l, acc);
    }
    write_result(t, heads, splits, m, l, acc, out, op, lse);
}

__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, bool ok) {
    // src-size 0 fills the 16 bytes with zeros: keys past the end cost no memory traffic.
    const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem));
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(gmem), "r"(ok ? 16 : 0));
}

__device__ __forceinline__ void cp_async4(void* smem, const void* gmem, bool ok) {
    const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem));
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(dst), "l"(gmem), "r"(ok ? 4 : 0));
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }

template <int N>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N)); }

// One pipeline tile in shared memory: KEYS keys of K and of V (128 bytes each) and their scales.
template <int KEYS>
struct Tile {
    uint4 k[KEYS * D / 16];
    uint4 v[KEYS * D / 16];
    float ks[KEYS];
    float vs[KEYS];
};

// stages > 1: each warp streams its keys through a ring of STAGES tiles of its own (no block barriers).
template <int U, int STAGES>
__global__ void __launch_bounds__(256) fp8_decode_attention_pipelined_kernel(KERNEL_ARGS) {
    constexpr int KEYS = 4 * U;
    extern __shared__ uint4 smem_raw[];
    const int lane = threadIdx.x & 31;
    const int warp = (blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    if (warp >= rows * heads * splits) return;  // a whole warp leaves: no barrier below spans warps
    Tile<KEYS>* ring = reinterpret_cast<Tile<KEYS>*>(smem_raw) + (threadIdx.x >> 5) * STAGES;
    const WarpTask t = warp_task(warp, lane, heads, group, splits, KEYS, start, slot, prompt_row, prompt_end);
    float qv[16];
    load_query(q, t, heads, qk_scale, qv);
    const KvRows p = kv_rows(t, kc, vc, ks, vs, stride_cr, stride_ch, stride_sr, stride_sh);
    const int tiles = t.hi > t.lo ? (t.hi - t.lo + KEYS - 1) / KEYS : 0;

    // Lane l copies 16-byte chunks l, l+32, ... of a tile's K and V (8 chunks a key: coalesced rows),
    // and one scale per KEYS lanes.
    auto request = [&](int tile) {
        Tile<KEYS>& dst = ring[tile % STAGES];
        const int n0 = t.lo + tile * KEYS;
#pragma unroll
        for (int j = 0; j < KEYS / 4; ++j) {
            const int c = lane + 32 * j;
            const int key = n0 + (c >> 3);
            const bool ok = key < t.hi;
            const bool in_prompt = key < t.prompt_end;
            const int64_t off = static_cast<int64_t>(ok ? key : t.lo) * D + (c & 7) * 16;
            cp_async16(&dst.k[c], p.kp(in_prompt) + off, ok);
            cp_async16(&dst.v[c], p.vp(in_prompt) + off, ok);
        }
#pragma unroll
        for (int c = lane; c < 2 * KEYS; c += 32) {
            const int i = c % KEYS;
            const int key = n0 + i;
            const bool ok = key < t.hi;
            const bool in_prompt = key < t.prompt_end;
            const float* src = (c < KEYS ? p.ksp(in_prompt) : p.vsp(in_prompt)) + (ok ? key : t.lo);
            cp_async4(c < KEYS ? &dst.ks[i] : &dst.vs[i], src, ok);
        }
    };

#pragma unroll
    for (int s = 0; s < STAGES - 1; ++s) {
        if (s < tiles) request(s);
        cp_async_commit();  // empty groups too: the wait count below stays a constant
    }
    float m = -CUDART_INF_F, l = 0.f, acc[16];
#pragma unroll
    for (int i = 0; i < 16; ++i) acc[i] = 0.f;
    for (int tile = 0; tile < tiles; ++tile) {
        cp_async_wait<STAGES - 2>();  // this lane's copies of `tile` have landed ...
        __syncwarp();                 // ... and every lane's; and all lanes are done with tile - 1's slot
        if (tile + STAGES - 1 < tiles) request(tile + STAGES - 1);
        cp_async_commit();
        const Tile<KEYS>& cur = ring[tile % STAGES];
        uint4 kraw[U], vraw[U];
        float ksc[U], vsc[U];
#pragma unroll
        for (int u = 0; u < U; ++u) {
            const int key = 4 * u + t.kpart;
            kraw[u] = cur.k[key * 8 + t.dpart];
            vraw[u] = cur.v[key * 8 + t.dpart];
            ksc[u] = cur.ks[key];
            vsc[u] = cur.vs[key];
        }
        attend_tile<U>(qv, kraw, vraw, ksc, vsc, t.hi - (t.lo + tile * KEYS), t.kpart, m, l, acc);
    }
    write_result(t, heads, splits, m, l, acc, out, op, lse);
}

}  // namespace

void fp8_decode_attention(torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache, torch::Tensor k_scale,
                          torch::Tensor v_scale, torch::Tensor start, torch::Tensor slot, torch::Tensor prompt_row,
                          torch::Tensor prompt_end, torch::Tensor out,
                          torch::Tensor partial, torch::Tensor lse, int64_t splits, double qk_scale,
                          int64_t keys_per_iter, int64_t warps_per_block, int64_t stages) {
    TORCH_CHECK(q.scalar_type() == at::kBFloat16 && q.size(2) == D && q.is_contiguous(), "q: (R, H, 128) bf16");
    TORCH_CHECK(k_cache.element_size() == 1 && k_cache.stride(3) == 1 && k_cache.stride(2) == D, "k cache: e4m3 (R, KVH, L, 128)");
    TORCH_CHECK(v_cache.strides() == k_cache.strides(), "v cache: the layout of the k cache");
    TORCH_CHECK(k_scale.strides() == v_scale.strides() && k_scale.stride(2) == 1, "scales: (R, KVH, L) fp32");
    const bool shared_prompt = prompt_row.numel() > 0;
    TORCH_CHECK(!shared_prompt || (prompt_row.scalar_type() == at::kInt && prompt_row.numel() >= q.size(0) &&
                                   prompt_end.scalar_type() == at::kInt && prompt_end.numel() == 1),
                "prompt_row: (>= R,) int32 with prompt_end: () int32, or both empty");
    TORCH_CHECK(warps_per_block >= 1 && warps_per_block <= 8, "warps_per_block must be 1..8");
    const int rows = q.size(0), heads = q.size(1), kv_heads = k_cache.size(1);
    const int warps = rows * heads * static_cast<int>(splits);
    const int threads = 32 * static_cast<int>(warps_per_block);
    const int blocks = (warps * 32 + threads - 1) / threads;
    auto launch = [&](auto kernel, size_t smem) {
        int device = 0, smem_max = 0;
        C10_CUDA_CHECK(cudaGetDevice(&device));
        C10_CUDA_CHECK(cudaDeviceGetAttribute(&smem_max, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
        TORCH_CHECK(smem <= static_cast<size_t>(smem_max), "fp8 attention: ", keys_per_iter, " keys x ", stages,
                    " stages x ", warps_per_block, " warps need ", smem, " bytes of shared memory a block; this GPU has ",
                    smem_max, ": use fewer warps a block or stages");
        if (smem > 48 * 1024)
            C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
        kernel<<<blocks, threads, smem, c10::cuda::getCurrentCUDAStream()>>>(
            reinterpret_cast<const __nv_bfloat16*>(q.data_ptr()), reinterpret_cast<const uint8_t*>(k_cache.data_ptr()),
            reinterpret_cast<const uint8_t*>(v_cache.data_ptr()), k_scale.data_ptr<float>(), v_scale.data_ptr<float>(),
            start.data_ptr<int>(), slot.data_ptr<int>(), shared_prompt ? prompt_row.data_ptr<int>() : nullptr,
            shared_prompt ? prompt_end.data_ptr<int>() : nullptr, reinterpret_cast<__nv_bfloat16*>(out.data_ptr()),
            partial.data_ptr<float>(), lse.data_ptr<float>(), rows, heads, heads / kv_heads, static_cast<int>(splits),
            k_cache.stride(0), k_cache.stride(1), k_scale.stride(0), k_scale.stride(1), static_cast<float>(qk_scale));
    };
    auto pipelined = [&](auto kernel, int keys, int n_stages) {
        const size_t tile = 2 * static_cast<size_t>(keys) * (D + 4);  // K, V and their scales
        launch(kernel, tile * n_stages * warps_per_block);
    };
    const int64_t key = keys_per_iter * 10 + stages;
    switch (key) {
        case 81: launch(fp8_decode_attention_kernel<2>, 0); break;
        case 161: launch(fp8_decode_attention_kernel<4>, 0); break;
        case 321: launch(fp8_decode_attention_kernel<8>, 0); break;
        case 162: pipelined(fp8_decode_attention_pipelined_kernel<4, 2>, 16, 2); break;
        case 163: pipelined(fp8_decode_attention_pipelined_kernel<4, 3>, 16, 3); break;
        case 164: pipelined(fp8_decode_attention_pipelined_kernel<4, 4>, 16, 4); break;
        case 322: pipelined(fp8_decode_attention_pipelined_kernel<8, 2>, 32, 2); break;
        case 323: pipelined(fp8_decode_attention_pipelined_kernel<8, 3>, 32, 3); break;
        case 324: pipelined(fp8_decode_attention_pipelined_kernel<8, 4>, 32, 4); break;
        default: TORCH_CHECK(false, "(keys_per_iter, stages) must be (8|16|32, 1) or (16|32, 2..4), got (",
                             keys_per_iter, ", ", stages, ")");
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
}
