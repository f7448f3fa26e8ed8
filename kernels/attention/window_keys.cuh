// The keys one query of window_attn.cu reads, as runs of consecutive rows (plain C++ too: the
// host test tests/test_window_keys_host.py checks it against kernels/attention/ref.py).
//
// A query at position P + t (P: tokens before the chunk) sees the positions
// lo = max(0, P + t - window + 1) (window 0: lo = 0) .. P + t. With R == 0 they are rows lo ..
// P + t of the KV cache (one run). With a ring of R >= window - 1 rows, positions before P sit
// at ring row p % R, and lo .. P - 1 is at most two runs of rows (before and after the wrap);
// positions P .. P + t are the chunk's rows lo - P .. t (one run).
#pragma once

#ifndef __CUDACC__
#define WK_HD inline
#else
#define WK_HD __host__ __device__ __forceinline__
#endif

namespace wk {

enum Src { kRing = 0, kChunk = 1 };   // kRing: the ring, or the KV cache when R == 0

struct Run {
    int src, row, n;    // rows row .. row + n - 1 of src
};

WK_HD int max_i(int a, int b) { return a > b ? a : b; }
WK_HD int min_i(int a, int b) { return a < b ? a : b; }

// Fills runs[0..2] (n = 0: an empty run): runs[0], runs[1] the ring's two runs (or the cache's
// one run, R == 0), runs[2] the chunk's. Fixed slots, so a kernel keeps them in registers.
WK_HD void key_runs(int P, int t, int R, int window, Run runs[3]) {
    const int qp = P + t;
    const int lo = window > 0 ? max_i(0, qp - window + 1) : 0;
    runs[1] = Run{kRing, 0, 0};
    runs[2] = Run{kChunk, 0, 0};
    if (R == 0) {
        runs[0] = Run{kRing, lo, qp - lo + 1};
        return;
    }
    const int a = lo, b = min_i(qp, P - 1);
    const int n_ring = max_i(b - a + 1, 0);
    const int r0 = n_ring > 0 ? a % R : 0;
    const int n1 = min_i(n_ring, R - r0);
    runs[0] = Run{kRing, r0, n1};
    runs[1] = Run{kRing, 0, n_ring - n1};
    const int c0 = max_i(lo, P) - P;
    runs[2] = Run{kChunk, c0, t - c0 + 1};
}

}  // namespace wk
