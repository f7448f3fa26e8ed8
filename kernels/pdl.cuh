// Programmatic dependent launch (sm_90+): how a kernel of a captured graph may start while the
// kernel before it is still running. The runtime turns a captured graph's kernel-to-kernel edge
// into a programmatic one (kernels/graph.py) only into kernels of sm_90 modules, and every
// kernel of ggfuse calls ggf_pdl_wait() before it touches memory that an earlier kernel of the
// graph wrote or reads (activations, states, caches, routing tables, the valid-row count): the
// wait returns once every earlier kernel has completed and its writes are visible. What a kernel
// does before its wait may only read memory no kernel of the graph writes (the weights: a GEMV
// asks L2 for its first rows there). ggf_pdl_launch() lets the next kernel's blocks be scheduled
// as soon as every block of this one has issued it; they then run up to their own wait.
// ggf_pdl_entry() is both, at the top of a kernel. Below sm_90 all three are empty: such modules'
// kernels never get a programmatic edge (kernels/nvrtc.py pdl_ready).
#pragma once

__device__ __forceinline__ void ggf_pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

__device__ __forceinline__ void ggf_pdl_launch() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

__device__ __forceinline__ void ggf_pdl_entry() {
    ggf_pdl_wait();
    ggf_pdl_launch();
}

// What a kernel may do before its wait: ask L2 for bytes no kernel of the graph writes (a weight
// row; null: nothing). Lines first_line, first_line + 32 wpr, ... of 128 bytes: the wpr warps
// sharing a row take every wpr-th run of 32 lines (a whole block of 256 threads: first_line =
// threadIdx.x, wpr = 8).
__device__ __forceinline__ void prefetch_row_l2(const unsigned char* row, long long row_bytes, int first_line,
                                                int wpr) {
    if (row != nullptr) {
        for (long long b = (long long)first_line * 128; b < row_bytes; b += 32LL * 128 * wpr)
            asm volatile("prefetch.global.L2 [%0];" :: "l"(row + b));
    }
}
