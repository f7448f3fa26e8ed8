// Memory-bound kernels: norms, RoPE, gates, the short causal conv, KV-cache append, copies.
//
// Addressing: most tensors are viewed as [T, H, D] with a contiguous last dim and element
// strides (st, sh) for the first two, so element (t, h, d) sits at p[t*st + h*sh + d]. A plain
// [T, N] tensor is H = 1; a column slice of a wider buffer (q inside q|gate, q/k inside the
// conv output) is just other strides and an offset base pointer. Reference semantics:
// kernels/dense/ref.py, kernels/elementwise/ref.py, kernels/deltanet/ref.py (the numpy refs
// are the meaning; these kernels accumulate in float).
//
// Run-time scalars that change between CUDA-graph replays (P, n_valid) are read from device
// int32 pointers, never passed by value.
#include "pdl.cuh"
#include "common.cuh"
#include "deltanet/gates.cuh"

// ---- V-wide f32 loads, O stores (V = 1 or 4; V = 4 needs 16-byte aligned f32 and 8-byte
// aligned bf16 addresses, which the launcher checks) --------------------------------------------

template<int V> __device__ __forceinline__ void loadv(const float* p, float* v);
template<> __device__ __forceinline__ void loadv<1>(const float* p, float* v) { v[0] = *p; }
template<> __device__ __forceinline__ void loadv<4>(const float* p, float* v) {
    const float4 a = *reinterpret_cast<const float4*>(p);
    v[0] = a.x; v[1] = a.y; v[2] = a.z; v[3] = a.w;
}
template<int V> __device__ __forceinline__ void storev(float* p, const float* v);
template<> __device__ __forceinline__ void storev<1>(float* p, const float* v) { *p = v[0]; }
template<> __device__ __forceinline__ void storev<4>(float* p, const float* v) {
    *reinterpret_cast<float4*>(p) = make_float4(v[0], v[1], v[2], v[3]);
}
template<int V> __device__ __forceinline__ void storev(__nv_bfloat16* p, const float* v);
template<> __device__ __forceinline__ void storev<1>(__nv_bfloat16* p, const float* v) { *p = __float2bfloat16_rn(v[0]); }
template<> __device__ __forceinline__ void storev<4>(__nv_bfloat16* p, const float* v) {
    uint2 u;
    u.x = pack_bf16x2(v[0], v[1]);
    u.y = pack_bf16x2(v[2], v[3]);
    *reinterpret_cast<uint2*>(p) = u;
}

__device__ __forceinline__ float siluf_(float x) { return x / (1.0f + __expf(-x)); }
__device__ __forceinline__ float geluf_(float x) { return gelu_tanh(x); }   // common.cuh

// ---- row norms -----------------------------------------------------------------------------------
//
// row_norm: one row of D elements per group of G threads (G = 32: a warp per row, 8 rows per
// 256-thread block; G = blockDim.x = 256: a block per row). Rows are r = t*H + h.
//   s    = a (+ b if b)                       ; written to out_sum if out_sum
//   norm = mean(s^2) (rms) or sum(s^2) (l2)   ; scale = 1 / sqrt(norm + eps)
//   y    = s * scale (* w[d] if w) (* silu(z) if z)   -> out (f32 or bf16)
// Up to NIT = 16/V (a warp per row) or 32/V (a block per row) values per thread are kept in
// registers between the two passes, so D <= 512 per warp, 8192 per block; every input element is read once and outputs may alias inputs (in place).
struct View {  // p[t*st + h*sh + d]
    long long st, sh;
};

template<int G, int V, typename O>
__device__ __forceinline__ void row_norm_impl(
    const float* __restrict__ a, View va, const float* __restrict__ b, View vb,
    const float* __restrict__ w, const float* __restrict__ z, View vz,
    O* out, View vo, float* out_sum, View vs,
    int n_rows, int H, int D, float eps, int l2) {
    constexpr int NIT = (G == 32 ? 16 : 32) / V;
    __shared__ float scratch[32];
    int row, lane;
    if (G == 32) {
        row = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
        lane = threadIdx.x & 31;
        if (row >= n_rows) return;  // warp-uniform; warp mode has no block barrier
    } else {
        row = blockIdx.x;
        lane = threadIdx.x;
        // n_rows == gridDim.x in block mode
    }
    const long long t = row / H, h = row % H;
    const float* ar = a + t * va.st + h * va.sh;
    const float* br = b ? b + t * vb.st + h * vb.sh : nullptr;
    float x[NIT][V];
    float ss = 0.0f;
#pragma unroll
    for (int it = 0; it < NIT; ++it) {
        const int e = (lane + it * G) * V;
        if (e < D) {
            loadv<V>(ar + e, x[it]);
            if (br) {
                float y[V];
                loadv<V>(br + e, y);
#pragma unroll
                for (int i = 0; i < V; ++i) x[it][i] += y[i];
            }
#pragma unroll
            for (int i = 0; i < V; ++i) ss += x[it][i] * x[it][i];
        }
    }
    if (G == 32) ss = warp_sum(ss);
    else ss = block_sum(ss, scratch);
    const float norm = l2 ? ss : ss / (float)D;
    const float scale = 1.0f / sqrtf(norm + eps);
    O* orow = out + t * vo.st + h * vo.sh;
    float* srow = out_sum ? out_sum + t * vs.st + h * vs.sh : nullptr;
    const float* zr = z ? z + t * vz.st + h * vz.sh : nullptr;
#pragma unroll
    for (int it = 0; it < NIT; ++it) {
        const int e = (lane + it * G) * V;
        if (e < D) {
            if (srow) storev<V>(srow + e, x[it]);
            float y[V];
#pragma unroll
            for (int i = 0; i < V; ++i) y[i] = x[it][i] * scale;
            if (w) {
                float wv[V];
                loadv<V>(w + e, wv);
#pragma unroll
                for (int i = 0; i < V; ++i) y[i] *= wv[i];
            }
            if (zr) {
                float zv[V];
                loadv<V>(zr + e, zv);
#pragma unroll
                for (int i = 0; i < V; ++i) y[i] *= siluf_(zv[i]);
            }
            storev<V>(orow + e, y);
        }
    }
}

#define GGF_ROW_NORM(G, V, O, oname)                                                                    \
    extern "C" __global__ void __launch_bounds__(G == 32 ? 256 : G) row_norm_g##G##_v##V##_##oname(     \
        const float* a, long long a_st, long long a_sh, const float* b, long long b_st, long long b_sh, \
        const float* w, const float* z, long long z_st, long long z_sh,                                 \
        O* out, long long o_st, long long o_sh, float* out_sum, long long s_st, long long s_sh,         \
        int n_rows, int H, int D, float eps, int l2) { ggf_pdl_entry();                                 \
        row_norm_impl<G, V, O>(a, View{a_st, a_sh}, b, View{b_st, b_sh}, w, z, View{z_st, z_sh},        \
                               out, View{o_st, o_sh}, out_sum, View{s_st, s_sh}, n_rows, H, D, eps, l2);  \
    }
#define GGF_ROW_NORM_O(G, V) GGF_ROW_NORM(G, V, float, f32) GGF_ROW_NORM(G, V, __nv_bfloat16, bf16)
GGF_ROW_NORM_O(32, 1)
GGF_ROW_NORM_O(32, 4)
GGF_ROW_NORM_O(256, 1)
GGF_ROW_NORM_O(256, 4)

// ---- norm_rope -------------------------------------------------------------------------------------
//
// x [T, H, D] (view), w [D], pos [T] int32 (device) -> out [T, H, D] (view):
//   y = rms_norm(x[t, h]) * w, then rotate the first n_dims dims of y by angle
//   theta_i = pos[t] * freq_scale * freq_base^(-2i/n_dims) / ff[i], i < n_dims/2 (ff = freq
//   factors [n_dims/2], llama.cpp's rope_freqs, or null)
//   mode 0 (neox): pairs (i, i + n_dims/2);  mode 1 (normal): pairs (2i, 2i+1).
// One block per token; its warps take the heads in turn. The angles are computed in double
// (the reference does; at position 1e5 a float angle would be off by ~1e-2 rad) and their
// cos/sin kept in shared memory for all heads.
#define NR_WARPS 8
#define NR_MAX_D 512

extern "C" __global__ void __launch_bounds__(NR_WARPS * 32) norm_rope_f32(
    const float* __restrict__ x, long long x_st, long long x_sh, const float* __restrict__ w,
    const int* __restrict__ pos, float* __restrict__ out, long long o_st, long long o_sh,
    int H, int D, int n_dims, double freq_base, double freq_scale, float eps, int mode,
    const float* __restrict__ ff) { ggf_pdl_entry();
    __shared__ float cs[NR_MAX_D / 2], sn[NR_MAX_D / 2];
    __shared__ float rowbuf[NR_WARPS][NR_MAX_D];
    const int t = blockIdx.x;
    const int half = n_dims >> 1;
    const double p = (double)pos[t] * freq_scale;
    for (int i = threadIdx.x; i < half; i += blockDim.x) {
        double theta = p * pow(freq_base, -(double)i * 2.0 / (double)n_dims);
        if (ff) theta /= (double)ff[i];   // rope_freqs (Gemma 4 full layers: 1e30 = no rotation)
        double s, c;
        sincos(theta, &s, &c);
        cs[i] = (float)c;
        sn[i] = (float)s;
    }
    __syncthreads();
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    float* buf = rowbuf[warp];
    for (int h = warp; h < H; h += NR_WARPS) {
        const float* xr = x + t * x_st + h * x_sh;
        float ss = 0.0f;
        for (int e = lane; e < D; e += 32) {
            const float v = xr[e];
            buf[e] = v;
            ss += v * v;
        }
        ss = warp_sum(ss);  // each lane rereads only its own buf entries until the __syncwarp below
        const float scale = 1.0f / sqrtf(ss / (float)D + eps);
        for (int e = lane; e < D; e += 32) buf[e] = buf[e] * scale * w[e];
        __syncwarp();
        float* orow = out + t * o_st + h * o_sh;
        for (int e = lane; e < D; e += 32) {
            float y = buf[e];
            if (e < n_dims) {
                int i, i0, i1;
                bool first;
                if (mode == 0) {
                    first = e < half;
                    i = first ? e : e - half;
                    i0 = i;
                    i1 = i + half;
                } else {
                    first = (e & 1) == 0;
                    i = e >> 1;
                    i0 = 2 * i;
                    i1 = 2 * i + 1;
                }
                const float y0 = buf[i0], y1 = buf[i1];
                y = first ? y0 * cs[i] - y1 * sn[i] : y0 * sn[i] + y1 * cs[i];
            }
            orow[e] = y;
        }
        __syncwarp();  // buf is rewritten for the next head
    }
}

// ---- elementwise binary ops over [T, H, D] views -------------------------------------------------
//
//   op 0 add:          out = a + b
//   op 1 mul:          out = a * b
//   op 2 sigmoid_mul:  out = a * sigmoid(b)
//   op 3 silu_mul:     out = silu(a) * b           (SwiGLU)
//   op 4 scale:        out = a * factor            (b unused)
//   op 5 copy:         out = a                     (b unused; also converts to bf16)
//   op 6 gelu:         out = gelu(a)               (tanh approximation; b unused)
//   op 7 gelu_mul:     out = gelu(a) * b           (GELU GLU; Gemma's per-layer-embedding gate)
//   op 8 softcap:      out = factor * tanh(a / factor)   (b unused; Gemma's logits)
// b_bcast: b has one value per (t, h) (b[t*st + h*sh]) broadcast along d ([T, 1] gates).
// One thread per V consecutive elements of a row.
template<int V, typename O>
__device__ __forceinline__ void ew_impl(const float* a, View va, const float* b, View vb,
                                        int b_bcast, O* out, View vo, int n_rows, int H, int D,
                                        int op, float factor) {
    const int Dv = D / V;
    const long long n = (long long)n_rows * Dv;
    for (long long idx = blockIdx.x * (long long)blockDim.x + threadIdx.x; idx < n;
         idx += (long long)gridDim.x * blockDim.x) {
        const long long row = idx / Dv;
        const int e = (int)(idx - row * Dv) * V;
        const long long t = row / H, h = row % H;
        float x[V], y[V], r[V];
        loadv<V>(a + t * va.st + h * va.sh + e, x);
        if (op <= 3 || op == 7) {
            if (b_bcast) {
                const float s = b[t * vb.st + h * vb.sh];
#pragma unroll
                for (int i = 0; i < V; ++i) y[i] = s;
            } else {
                loadv<V>(b + t * vb.st + h * vb.sh + e, y);
            }
        }
#pragma unroll
        for (int i = 0; i < V; ++i) {
            switch (op) {
                case 0: r[i] = x[i] + y[i]; break;
                case 1: r[i] = x[i] * y[i]; break;
                case 2: r[i] = x[i] * sigmoidf_(y[i]); break;
                case 3: r[i] = siluf_(x[i]) * y[i]; break;
                case 4: r[i] = x[i] * factor; break;
                case 6: r[i] = geluf_(x[i]); break;
                case 7: r[i] = geluf_(x[i]) * y[i]; break;
                case 8: r[i] = factor * (1.0f - 2.0f / (__expf(2.0f * x[i] / factor) + 1.0f)); break;   // cap tanh(x/cap); tanhf here would be tanh.approx
                default: r[i] = x[i]; break;
            }
        }
        storev<V>(out + t * vo.st + h * vo.sh + e, r);
    }
}

#define GGF_EW(V, O, oname)                                                                             \
    extern "C" __global__ void __launch_bounds__(256) ew_v##V##_##oname(                                \
        const float* a, long long a_st, long long a_sh, const float* b, long long b_st, long long b_sh, \
        int b_bcast, O* out, long long o_st, long long o_sh, int n_rows, int H, int D, int op,          \
        float factor) { ggf_pdl_entry();                                                                \
        ew_impl<V, O>(a, View{a_st, a_sh}, b, View{b_st, b_sh}, b_bcast, out, View{o_st, o_sh}, n_rows,  \
                      H, D, op, factor);                                                                \
    }
GGF_EW(1, float, f32)
GGF_EW(4, float, f32)
GGF_EW(1, __nv_bfloat16, bf16)
GGF_EW(4, __nv_bfloat16, bf16)

// ---- DeltaNet gates ------------------------------------------------------------------------------
//
// alpha, beta_lin [T, Hv] seen through a grouped view: value head h = c*group + j sits at
// p[t*st + c*sg + j] (Qwen3-Next interleaves beta|alpha per key head; a plain [T, Hv] matrix
// is group = Hv). dt_bias, ssm_a [Hv]. g, beta out [T, Hv] contiguous.
//   g = softplus(alpha + dt_bias) * ssm_a   (softplus as ggml: x > 20 ? x : log1p(exp(x)))
//   beta = sigmoid(beta_lin)
// Rows t >= *n_valid (if n_valid is given) get g = 0 and beta = 0: a padded token then leaves
// the recurrent state exactly as it was (decay exp(0) = 1, update beta * (...) = 0).
extern "C" __global__ void __launch_bounds__(256) deltanet_gates_f32(
    const float* __restrict__ alpha, long long a_st, long long a_sg, const float* __restrict__ beta_lin,
    long long b_st, long long b_sg, int group, const float* __restrict__ dt_bias, const float* __restrict__ ssm_a,
    float* __restrict__ g_out, float* __restrict__ beta_out, const int* __restrict__ n_valid, int T, int Hv) { ggf_pdl_entry();
    const int nv = n_valid ? *n_valid : T;
    for (long long idx = blockIdx.x * (long long)blockDim.x + threadIdx.x; idx < (long long)T * Hv;
         idx += (long long)gridDim.x * blockDim.x) {
        const long long t = idx / Hv;
        const int h = (int)(idx - t * Hv);
        const int c = h / group, j = h - c * group;
        float g = 0.0f, bt = 0.0f;
        if (t < nv) gdn_gates(alpha[t * a_st + c * a_sg + j], dt_bias[h], ssm_a[h], beta_lin[t * b_st + c * b_sg + j], g, bt);
        g_out[idx] = g;
        beta_out[idx] = bt;
    }
}

// ---- short causal depthwise conv + SiLU ------------------------------------------------------------
//
// x [T, C] (row stride x_st), state [KC-1, C] (rows contiguous), w [C, KC] -> out [T, C] (row
// stride o_st):  out[t, c] = silu(sum_j w[c, j] * xs[t + j, c]),  xs = concat(state, x).
// Each thread owns one channel for a tile of CONV_TT tokens and slides its window in registers.
// The state is NOT touched here: ssm_conv_state_k runs after it (same stream) and rewrites
// each channel's window in place, one thread per channel, reading before writing.
#define CONV_TT 16

template<int KC>
__device__ __forceinline__ void ssm_conv_silu_impl(const float* __restrict__ x, long long x_st,
                                                   const float* __restrict__ state, const float* __restrict__ w,
                                                   float* __restrict__ out, long long o_st, int T, int C) {
    const int c = blockIdx.x * blockDim.x + threadIdx.x;
    const int t0 = blockIdx.y * CONV_TT;
    if (c >= C) return;
    float wc[KC], win[KC];
#pragma unroll
    for (int j = 0; j < KC; ++j) wc[j] = w[(long long)c * KC + j];
    // window = xs[t0 .. t0+KC-2]: state rows for negative token indices
#pragma unroll
    for (int j = 0; j < KC - 1; ++j) {
        const int tt = t0 + j - (KC - 1);  // token index; < 0 means state row tt + KC - 1
        win[j] = tt < 0 ? state[(long long)(tt + KC - 1) * C + c] : x[(long long)tt * x_st + c];
    }
    const int t_end = min(t0 + CONV_TT, T);
    for (int t = t0; t < t_end; ++t) {
        win[KC - 1] = x[(long long)t * x_st + c];
        float acc = 0.0f;
#pragma unroll
        for (int j = 0; j < KC; ++j) acc += wc[j] * win[j];
        out[(long long)t * o_st + c] = siluf_(acc);
#pragma unroll
        for (int j = 0; j < KC - 1; ++j) win[j] = win[j + 1];
    }
}

// new_state[i] = xs[nv + i] for i < KC-1 (the window ending at token nv-1), in place.
template<int KC>
__device__ __forceinline__ void ssm_conv_state_impl(const float* __restrict__ x, long long x_st, float* state,
                                                    const int* __restrict__ n_valid, int T, int C) {
    const int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= C) return;
    int nv = n_valid ? *n_valid : T;
    nv = nv < 0 ? 0 : (nv > T ? T : nv);
    float old[KC - 1], nw[KC - 1];
#pragma unroll
    for (int i = 0; i < KC - 1; ++i) old[i] = state[(long long)i * C + c];
#pragma unroll
    for (int i = 0; i < KC - 1; ++i) {
        const int s = nv + i;  // index into xs
        nw[i] = s < KC - 1 ? old[s] : x[(long long)(s - (KC - 1)) * x_st + c];
    }
#pragma unroll
    for (int i = 0; i < KC - 1; ++i) state[(long long)i * C + c] = nw[i];
}

#define GGF_CONV(KC)                                                                                    \
    extern "C" __global__ void __launch_bounds__(256) ssm_conv_silu_k##KC(                              \
        const float* x, long long x_st, const float* state, const float* w, float* out, long long o_st, \
        int T, int C) { ggf_pdl_entry();                                                                \
        ssm_conv_silu_impl<KC>(x, x_st, state, w, out, o_st, T, C);                                     \
    }                                                                                                   \
    extern "C" __global__ void __launch_bounds__(256) ssm_conv_state_k##KC(                             \
        const float* x, long long x_st, float* state, const int* n_valid, int T, int C) { ggf_pdl_entry(); \
        ssm_conv_state_impl<KC>(x, x_st, state, n_valid, T, C);                                         \
    }
GGF_CONV(2)
GGF_CONV(3)
GGF_CONV(4)

// One token (T = 1: the decode step): the conv and the window update in one launch, a thread per
// channel reading its window once: out = silu(w . [state; x]) as ssm_conv_silu_k, then, if the
// token is valid (n_valid >= 1), state = [state[1:]; x] in place (each thread its own column).
template<int KC>
__device__ __forceinline__ void ssm_conv1_impl(const float* __restrict__ x, float* state, const float* __restrict__ w,
                                               float* __restrict__ out, const int* __restrict__ n_valid, int C) {
    const int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= C) return;
    float win[KC];
#pragma unroll
    for (int j = 0; j < KC - 1; ++j) win[j] = state[(long long)j * C + c];
    win[KC - 1] = x[c];
    float acc = 0.0f;
#pragma unroll
    for (int j = 0; j < KC; ++j) acc += w[(long long)c * KC + j] * win[j];
    out[c] = siluf_(acc);
    if ((n_valid ? *n_valid : 1) >= 1) {
#pragma unroll
        for (int j = 0; j < KC - 1; ++j) state[(long long)j * C + c] = win[j + 1];
    }
}

#define GGF_CONV1(KC)                                                                                   \
    extern "C" __global__ void __launch_bounds__(256) ssm_conv1_k##KC(                                  \
        const float* x, float* state, const float* w, float* out, const int* n_valid, int C) {          \
        ggf_pdl_entry();                                                                                \
        ssm_conv1_impl<KC>(x, state, w, out, n_valid, C);                                               \
    }
GGF_CONV1(2)
GGF_CONV1(3)
GGF_CONV1(4)

// ---- KV-cache append ------------------------------------------------------------------------------
//
// k, v [T, Hkv, D] f32 views -> k_cache, v_cache [max_ctx, Hkv, D] bf16 (contiguous) rows
// P .. P+T-1, P = *p_dev. Rows past max_ctx are dropped (never written out of bounds).
// blockIdx.y: 0 = k, 1 = v.
extern "C" __global__ void __launch_bounds__(256) kv_append_bf16(
    const float* __restrict__ k, long long k_st, long long k_sh, const float* __restrict__ v, long long v_st,
    long long v_sh, __nv_bfloat16* __restrict__ k_cache, __nv_bfloat16* __restrict__ v_cache,
    const int* __restrict__ p_dev, int T, int Hkv, int D, int max_ctx) { ggf_pdl_entry();
    const int P = *p_dev;
    const bool is_v = blockIdx.y == 1;
    const float* src = is_v ? v : k;
    const long long st = is_v ? v_st : k_st, sh = is_v ? v_sh : k_sh;
    __nv_bfloat16* dst = is_v ? v_cache : k_cache;
    const long long n = (long long)T * Hkv * D;
    for (long long idx = blockIdx.x * (long long)blockDim.x + threadIdx.x; idx < n;
         idx += (long long)gridDim.x * blockDim.x) {
        const long long row = idx / D;
        const int d = (int)(idx - row * D);
        const long long t = row / Hkv, h = row % Hkv;
        if (P + t >= max_ctx) continue;
        dst[((P + t) * Hkv + h) * D + d] = __float2bfloat16_rn(src[t * st + h * sh + d]);
    }
}

// ---- argmax over rows ----------------------------------------------------------------------------
// x [R, N] (row stride x_st) -> out [R] int32, the first index of the largest value (as
// numpy.argmax; NaN is not treated specially). One block per row.
extern "C" __global__ void __launch_bounds__(256) argmax_rows_f32(const float* __restrict__ x, long long x_st,
                                                                   int* __restrict__ out, int N) { ggf_pdl_entry();
    __shared__ float sv[32];
    __shared__ int si[32];
    const float* xr = x + blockIdx.x * x_st;
    float best = __int_as_float(0xff800000);
    int bi = 0x7fffffff;
    for (int e = threadIdx.x; e < N; e += blockDim.x) {
        const float v = xr[e];
        if (v > best || (v == best && e < bi)) { best = v; bi = e; }
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        const float ov = __shfl_xor_sync(GGF_FULL_MASK, best, o);
        const int oi = __shfl_xor_sync(GGF_FULL_MASK, bi, o);
        if (ov > best || (ov == best && oi < bi)) { best = ov; bi = oi; }
    }
    const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5, nw = blockDim.x >> 5;
    if (lane == 0) { sv[wid] = best; si[wid] = bi; }
    __syncthreads();
    if (wid == 0) {
        best = lane < nw ? sv[lane] : __int_as_float(0xff800000);
        bi = lane < nw ? si[lane] : 0x7fffffff;
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) {
            const float ov = __shfl_xor_sync(GGF_FULL_MASK, best, o);
            const int oi = __shfl_xor_sync(GGF_FULL_MASK, bi, o);
            if (ov > best || (ov == best && oi < bi)) { best = ov; bi = oi; }
        }
        if (lane == 0) out[blockIdx.x] = bi == 0x7fffffff ? 0 : bi;
    }
}

// ---- Gemma's post-norm residual --------------------------------------------------------------------
//
// norm_add (kernels/elementwise/ref.py norm_add / norm_add_norm), rows r = t*H + h of [T, H, D] views:
//   y    = x * rsqrt(mean(x^2) + eps) * w + res      ; then y *= s[0] if s (layer_output_scale)
//   sum  -> out_sum (f32)
//   if w_next: out_norm = y * rsqrt(mean(y^2) + eps_next) * w_next  (f32 or bf16)
// G as row_norm (32: a warp per row, 8 rows per block, D <= 512; 256: a block per row, D <= 8192).
// out_sum may alias res (in-place residual stream).
template<int G, int V, typename O>
__device__ __forceinline__ void norm_add_impl(
    const float* __restrict__ x, View vx, const float* __restrict__ w, const float* res, View vr,
    const float* __restrict__ s, const float* __restrict__ w_next, float* out_sum, View vs,
    O* __restrict__ out_norm, View vo, int n_rows, int H, int D, float eps, float eps_next) {
    constexpr int NIT = (G == 32 ? 16 : 32) / V;
    __shared__ float scratch[32];
    int row, lane;
    if (G == 32) {
        row = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
        lane = threadIdx.x & 31;
        if (row >= n_rows) return;
    } else {
        row = blockIdx.x;
        lane = threadIdx.x;
    }
    const long long t = row / H, h = row % H;
    const float* xr = x + t * vx.st + h * vx.sh;
    const float* rr = res + t * vr.st + h * vr.sh;
    float y[NIT][V];
    float ss = 0.0f;
#pragma unroll
    for (int it = 0; it < NIT; ++it) {
        const int e = (lane + it * G) * V;
        if (e < D) {
            loadv<V>(xr + e, y[it]);
#pragma unroll
            for (int i = 0; i < V; ++i) ss += y[it][i] * y[it][i];
        }
    }
    ss = G == 32 ? warp_sum(ss) : block_sum(ss, scratch);
    const float sc = 1.0f / sqrtf(ss / (float)D + eps);
    const float mul = s ? s[0] : 1.0f;
    float ss2 = 0.0f;
#pragma unroll
    for (int it = 0; it < NIT; ++it) {
        const int e = (lane + it * G) * V;
        if (e < D) {
            float wv[V], rv[V];
            loadv<V>(w + e, wv);
            loadv<V>(rr + e, rv);
#pragma unroll
            for (int i = 0; i < V; ++i) {
                y[it][i] = (y[it][i] * sc * wv[i] + rv[i]) * mul;
                ss2 += y[it][i] * y[it][i];
            }
        }
    }
    float* srow = out_sum + t * vs.st + h * vs.sh;
    float sc2 = 0.0f;
    if (w_next) {
        ss2 = G == 32 ? warp_sum(ss2) : block_sum(ss2, scratch);
        sc2 = 1.0f / sqrtf(ss2 / (float)D + eps_next);
    }
    O* orow = w_next ? out_norm + t * vo.st + h * vo.sh : nullptr;
#pragma unroll
    for (int it = 0; it < NIT; ++it) {
        const int e = (lane + it * G) * V;
        if (e < D) {
            storev<V>(srow + e, y[it]);
            if (w_next) {
                float wv[V], z[V];
                loadv<V>(w_next + e, wv);
#pragma unroll
                for (int i = 0; i < V; ++i) z[i] = y[it][i] * sc2 * wv[i];
                storev<V>(orow + e, z);
            }
        }
    }
}

#define GGF_NORM_ADD(G, V, O, oname)                                                                    \
    extern "C" __global__ void __launch_bounds__(G == 32 ? 256 : G) norm_add_g##G##_v##V##_##oname(     \
        const float* x, long long x_st, long long x_sh, const float* w, const float* res,              \
        long long r_st, long long r_sh, const float* s, const float* w_next, float* out_sum,            \
        long long s_st, long long s_sh, O* out_norm, long long o_st, long long o_sh, int n_rows, int H, \
        int D, float eps, float eps_next) { ggf_pdl_entry();                                            \
        norm_add_impl<G, V, O>(x, View{x_st, x_sh}, w, res, View{r_st, r_sh}, s, w_next, out_sum,       \
                               View{s_st, s_sh}, out_norm, View{o_st, o_sh}, n_rows, H, D, eps, eps_next); \
    }
#define GGF_NORM_ADD_O(G, V) GGF_NORM_ADD(G, V, float, f32) GGF_NORM_ADD(G, V, __nv_bfloat16, bf16)
GGF_NORM_ADD_O(32, 1)
GGF_NORM_ADD_O(32, 4)
GGF_NORM_ADD_O(256, 1)
GGF_NORM_ADD_O(256, 4)

// ---- sliding-window ring append --------------------------------------------------------------------
//
// kernels/attention/ref.py kv_ring_append, for the valid rows of a chunk: x [T, Hkv, D] f32 view
// (rows t at positions P + t), ring [R, Hkv, D] bf16 contiguous:
//   ring[(P + t) % R] = bf16(x[t])   for max(0, nv - R) <= t < nv,  P = *p_dev, nv = *n_valid
// (only the last R valid rows survive a chunk longer than the ring; padding rows never enter it).
// Every ring element is written at most once, so threads do not race.
extern "C" __global__ void __launch_bounds__(256) kv_ring_append_bf16(
    const float* __restrict__ x, long long x_st, long long x_sh, __nv_bfloat16* __restrict__ ring,
    const int* __restrict__ p_dev, const int* __restrict__ n_valid, int T, int Hkv, int D, int R) { ggf_pdl_entry();
    const int P = *p_dev;
    const int nv = min(max(*n_valid, 0), T);
    const int t0 = max(0, nv - R);
    const long long n = (long long)(nv - t0) * Hkv * D;
    for (long long idx = blockIdx.x * (long long)blockDim.x + threadIdx.x; idx < n;
         idx += (long long)gridDim.x * blockDim.x) {
        const long long row = idx / D;
        const int d = (int)(idx - row * D);
        const long long t = t0 + row / Hkv, h = row % Hkv;
        const long long r = (P + t) % R;
        ring[(r * Hkv + h) * D + d] = __float2bfloat16_rn(x[t * x_st + h * x_sh + d]);
    }
}
