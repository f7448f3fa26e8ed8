// Dequantisation of GGML-quantised weights: whole tensors (or a row range) and embedding rows.
//
//   dequantize_<type>_<out>(raw, n_elems, out)
//       raw: the tensor's GGUF bytes (rows of blocks, no padding between rows, so the tensor is
//       one flat stream of blocks); n_elems = n_rows * row_len; out [n_elems] f32 or bf16,
//       16-byte aligned. Each thread makes 8 consecutive elements.
//   get_rows_<type>_<out>(raw, n_table_rows, row_len, row_bytes, ids, n_tokens, out)
//       out[t, :] = table[clamp(ids[t]), :]; out [n_tokens, row_len]. One block per token.
//       Out-of-range ids (e.g. padding tokens) are clamped, never read out of bounds.
#include "pdl.cuh"
#include "common.cuh"
#include "quant/ggml_quants.cuh"

template<int T, typename O>
__device__ __forceinline__ void dequantize_flat(const unsigned char* __restrict__ raw, long long n_elems,
                                                O* __restrict__ out) {
    constexpr int QK = QBlock<T>::QK, BY = QBlock<T>::BYTES, UPB = QK / 8;
    const long long n_units = (n_elems + 7) >> 3;
    for (long long u = blockIdx.x * (long long)blockDim.x + threadIdx.x; u < n_units;
         u += (long long)gridDim.x * blockDim.x) {
        const long long e0 = u << 3;
        const unsigned char* blk = raw + (u / UPB) * BY;
        if (e0 + 8 <= n_elems) {
            float v[8];
            dequant8<T>(blk, (int)(u % UPB), v);
            store8(out + e0, v);
        } else {
            // tail of a float-typed tensor whose length is not a multiple of 8 (QK == 8 there)
            for (long long e = e0; e < n_elems; ++e) store_f(out + e, dequant_at<T>(blk, (int)(e - e0)));
        }
    }
}

template<int T, typename O>
__device__ __forceinline__ void get_rows_impl(const unsigned char* __restrict__ raw, int n_table_rows, int row_len,
                                              long long row_bytes, const int* __restrict__ ids, int n_tokens,
                                              O* __restrict__ out) {
    constexpr int QK = QBlock<T>::QK, BY = QBlock<T>::BYTES, UPB = QK / 8;
    const int t = blockIdx.x;
    if (t >= n_tokens) return;
    int id = ids[t];
    id = id < 0 ? 0 : (id >= n_table_rows ? n_table_rows - 1 : id);
    const unsigned char* row = raw + (long long)id * row_bytes;
    O* o = out + (long long)t * row_len;
    if ((row_len & 7) == 0) {
        for (int u = threadIdx.x; u < (row_len >> 3); u += blockDim.x) {
            float v[8];
            dequant8<T>(row + (long long)(u / UPB) * BY, u % UPB, v);
            store8(o + 8 * u, v);
        }
    } else {
        // only float types can have such rows; out rows are then not 16-byte aligned either
        for (int e = threadIdx.x; e < row_len; e += blockDim.x) store_f(o + e, dequant_at<T>(row, e));
    }
}

#define GGF_DEQUANT_KERNELS(T, tname, O, oname)                                                            \
    extern "C" __global__ void __launch_bounds__(256) dequantize_##tname##_##oname(                        \
        const unsigned char* __restrict__ raw, long long n_elems, O* __restrict__ out) { ggf_pdl_entry();   \
        dequantize_flat<T, O>(raw, n_elems, out);                                                          \
    }                                                                                                      \
    extern "C" __global__ void __launch_bounds__(256) get_rows_##tname##_##oname(                          \
        const unsigned char* __restrict__ raw, int n_table_rows, int row_len, long long row_bytes,         \
        const int* __restrict__ ids, int n_tokens, O* __restrict__ out) { ggf_pdl_entry();                 \
        get_rows_impl<T, O>(raw, n_table_rows, row_len, row_bytes, ids, n_tokens, out);                    \
    }

#define GGF_DEQUANT_TYPE(T, tname)                \
    GGF_DEQUANT_KERNELS(T, tname, float, f32)     \
    GGF_DEQUANT_KERNELS(T, tname, __nv_bfloat16, bf16)

GGF_DEQUANT_TYPE(GGML_F32, f32)
GGF_DEQUANT_TYPE(GGML_F16, f16)
GGF_DEQUANT_TYPE(GGML_BF16, bf16)
GGF_DEQUANT_TYPE(GGML_Q4_0, q4_0)
GGF_DEQUANT_TYPE(GGML_Q4_1, q4_1)
GGF_DEQUANT_TYPE(GGML_Q5_0, q5_0)
GGF_DEQUANT_TYPE(GGML_Q5_1, q5_1)
GGF_DEQUANT_TYPE(GGML_Q8_0, q8_0)
GGF_DEQUANT_TYPE(GGML_Q2_K, q2_k)
GGF_DEQUANT_TYPE(GGML_Q3_K, q3_k)
GGF_DEQUANT_TYPE(GGML_Q4_K, q4_k)
GGF_DEQUANT_TYPE(GGML_Q5_K, q5_k)
GGF_DEQUANT_TYPE(GGML_Q6_K, q6_k)
