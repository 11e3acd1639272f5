// Multi-tensor apply: one launch over many tensors, one block per chunk.
//
// The work list is a device table of int64 built on the host by
// fastadv/kernels/host.py (TensorTable: immutable, one per set of tensors) and
// shared with the Triton kernels.  For L lists of T tensors cut into N chunks of `chunk`
// elements:
//
//   [0,        L*T)          address of tensor t of list l at l*T + t
//   [L*T,      L*T+T)        numel of tensor t
//   [L*T+T,    L*T+2T+1)     first chunk of tensor t (prefix sum; entry T = N)
//   [L*T+2T+1, L*T+2T+1+N)   owner: the tensor of chunk c
//
// A kernel launched with N blocks finds its tensor and element range with
// chunk_of(); the table stays on the device, so nothing is sent per launch
// but a pointer and three sizes (apex's multi_tensor_apply sends the
// addresses by value instead and relaunches every ~110 tensors).  Per-tensor
// reductions are two-stage: one fp32 partial per chunk, then
// per_tensor_norms_kernel sums each tensor's partials in chunk order
// (deterministic, no atomics).
#pragma once

#include <type_traits>

#include "common.cuh"

namespace fastadv {
namespace mt {

struct Table {
  const int64_t* data;
  int64_t tensors;  // T
  int lists;        // L
  int64_t chunk;    // elements per chunk

  __device__ __forceinline__ int64_t numel(int64_t t) const { return data[lists * tensors + t]; }
  __device__ __forceinline__ int64_t first_chunk(int64_t t) const { return data[(lists + 1) * tensors + t]; }
  __device__ __forceinline__ int64_t owner(int64_t c) const { return data[(lists + 2) * tensors + 1 + c]; }
  template <typename B>
  __device__ __forceinline__ B* ptr(int list, int64_t t) const {
    return reinterpret_cast<B*>(static_cast<uintptr_t>(data[list * tensors + t]));
  }
};

// The Table of a device table pointer handed over the C ABI.
inline Table make_table(const int64_t* table, int lists, int64_t tensors, int64_t chunk) {
  return Table{table, tensors, lists, chunk};
}

// Elements [start, end) of tensor `tensor` form chunk c.
struct Chunk {
  int64_t tensor, start, end;
};

__device__ __forceinline__ Chunk chunk_of(const Table& tb, int64_t c) {
  Chunk k;
  k.tensor = tb.owner(c);
  k.start = (c - tb.first_chunk(k.tensor)) * tb.chunk;
  const int64_t n = tb.numel(k.tensor);
  k.end = k.start + tb.chunk < n ? k.start + tb.chunk : n;
  return k;
}

__device__ __forceinline__ bool aligned(const void* p, int bytes) {
  return reinterpret_cast<uintptr_t>(p) % bytes == 0;
}

// Every pointer, offset to the chunk's first element, is a multiple of 16 bytes (the vector
// access of chunk_loop with kVec<B> elements): the test of the element-wise update kernels.
template <typename... P>
__device__ __forceinline__ bool chunk_aligned16(const Chunk& k, const P*... p) {
  return (aligned(p + k.start, 16) && ...);
}

template <int N>
using Width = std::integral_constant<int, N>;

// Calls f(Width<n>{}, i) over the chunk, each thread of the block taking every
// blockDim.x-th group: groups of VEC elements starting at i (i - start a
// multiple of VEC) when `vec` (the caller checked the alignment of every
// pointer at `start`), then single elements for the tail; else single
// elements throughout.
template <int VEC, typename F>
__device__ __forceinline__ void chunk_loop(const Chunk& k, bool vec, F&& f) {
  int64_t i0 = k.start;
  if (vec && VEC > 1) {
    const int64_t groups = (k.end - k.start) / VEC;
    for (int64_t j = threadIdx.x; j < groups; j += blockDim.x) f(Width<VEC>{}, k.start + j * VEC);
    i0 = k.start + groups * VEC;
  }
  for (int64_t i = i0 + threadIdx.x; i < k.end; i += blockDim.x) f(Width<1>{}, i);
}

template <typename B, int N>
__device__ __forceinline__ Pack<B, N> load(const B* p, int64_t i) {
  return *reinterpret_cast<const Pack<B, N>*>(p + i);
}

template <typename B, int N>
__device__ __forceinline__ void store(B* p, int64_t i, const Pack<B, N>& v) {
  *reinterpret_cast<Pack<B, N>*>(p + i) = v;
}

// ---- second stage of the reductions ------------------------------------------

// One block per tensor: out[a*T + t] = sqrt(sum of tensor t's partials in array a),
// partials laid out as [arrays][n_chunks].
static __global__ void __launch_bounds__(kThreads)
per_tensor_norms_kernel(Table tb, const float* __restrict__ partials, int64_t n_chunks, int arrays,
                        float* __restrict__ out) {
  const int64_t t = blockIdx.x;
  const int64_t lo = tb.first_chunk(t), hi = tb.first_chunk(t + 1);
  for (int a = 0; a < arrays; ++a) {
    float acc = 0.f;
    for (int64_t c = lo + threadIdx.x; c < hi; c += blockDim.x) acc += partials[a * n_chunks + c];
    const float s = block_sum<kThreads>(acc);
    if (threadIdx.x == 0) out[a * tb.tensors + t] = sqrtf(s);
    __syncthreads();  // block_sum's shared scratch is reused by the next array
  }
}

constexpr int kGlobalThreads = 1024;

// One block: *out = sqrt(sum of partials[0, n)), in a fixed order; *ok (when not NULL) = the
// norm is finite (SiFT's skip test, made on the device).
static __global__ void __launch_bounds__(kGlobalThreads)
global_norm_kernel(const float* __restrict__ partials, int64_t n, float* __restrict__ out,
                   uint8_t* __restrict__ ok = nullptr) {
  float acc = 0.f;
  for (int64_t i = threadIdx.x; i < n; i += kGlobalThreads) acc += partials[i];
  const float s = block_sum<kGlobalThreads>(acc);
  if (threadIdx.x == 0) {
    const float norm = sqrtf(s);
    *out = norm;
    if (ok != nullptr) *ok = uint8_t(!isnan(norm) && !isinf(norm));
  }
}

// ---- per-tensor reductions of one call (FGM's and PGD's multi-tensor steps) ----------
//
// One call reduces every tensor of an FGM attack / a PGD step into its own slot of the
// caller's fp32 buffer.  Its int64 *plan* (fastadv/kernels/cuda/multi_tensor.py plan_call,
// one host-to-device copy per call) is
//
//   [P (K+1) | slot (K) | group rows ...]
//
// P the prefix of the K tensors' partial counts, slot their places in the caller's buffer;
// the sum launch (one block per tensor) reads these.  A group (one work table of T tensors,
// in the table's order) has the rows
//
//   [first partial (T) | slot (T) | cols (T) | first block (T+1) | owner (B)]
//
// the last two for a dense group only: its B stage-1 blocks, each tensor taking as many as
// its per-tensor launch has, so a block computes exactly the partial that launch's block
// of the same index computes (same grid-stride order, same block sum).
struct GroupPlan {
  const int64_t* p;
  int64_t tensors;  // T

  __device__ __forceinline__ int64_t first_part(int64_t t) const { return p[t]; }
  __device__ __forceinline__ int64_t slot(int64_t t) const { return p[tensors + t]; }
  __device__ __forceinline__ int64_t cols(int64_t t) const { return p[2 * tensors + t]; }
  __device__ __forceinline__ int64_t first_block(int64_t t) const { return p[3 * tensors + t]; }
  __device__ __forceinline__ int64_t owner(int64_t j) const { return p[4 * tensors + 1 + j]; }
};

// The tensor of dense stage-1 block j, its index among that tensor's blocks and their number.
struct DenseBlock {
  int64_t tensor, index, blocks;
};

__device__ __forceinline__ DenseBlock dense_block_of(const GroupPlan& gp, int64_t j) {
  DenseBlock d;
  d.tensor = gp.owner(j);
  const int64_t first = gp.first_block(d.tensor);
  d.index = j - first;
  d.blocks = gp.first_block(d.tensor + 1) - first;
  return d;
}

// ---- argument checks shared by the C entry points ------------------------------

inline int check_table(const char* fn, const int64_t* table, int lists, int64_t tensors, int64_t chunks,
                       int64_t chunk) {
  if (tensors < 0 || chunks < 0 || lists < 1)
    return fail(int(cudaErrorInvalidValue), "%s: bad sizes lists=%d tensors=%lld chunks=%lld", fn, lists,
                (long long)tensors, (long long)chunks);
  if (chunk <= 0 || chunk % 16)
    return fail(int(cudaErrorInvalidValue), "%s: chunk must be a positive multiple of 16, got %lld", fn,
                (long long)chunk);
  if (table == nullptr && tensors > 0) return fail(int(cudaErrorInvalidValue), "%s: table is NULL", fn);
  return 0;
}

// check_table plus the device scalar(s) an update kernel reads (`what`, not NULL): the
// prologue of the element-wise update entry points (AWP's norms, SAM's norm).
inline int check_update(const char* fn, const int64_t* table, int lists, int64_t tensors, int64_t chunks,
                        int64_t chunk, const void* scalars, const char* what) {
  if (int e = check_table(fn, table, lists, tensors, chunks, chunk)) return e;
  if (scalars == nullptr) return fail(int(cudaErrorInvalidValue), "%s: %s is NULL", fn, what);
  return 0;
}

// The prologue of the multi-tensor FGM / PGD entry points: the table (`lists` lists, the
// mode's), the group's plan rows and the fp32 buffer the launch writes or reads.
inline int check_group(const char* fn, const int64_t* table, int lists, int want_lists, int64_t tensors,
                       int64_t chunks, int64_t chunk, const int64_t* group_plan, const void* buffer,
                       const char* what) {
  if (int e = check_table(fn, table, lists, tensors, chunks, chunk)) return e;
  if (lists != want_lists)
    return fail(int(cudaErrorInvalidValue), "%s: this mode takes %d lists, got %d", fn, want_lists, lists);
  if (tensors > 0 && group_plan == nullptr) return fail(int(cudaErrorInvalidValue), "%s: plan is NULL", fn);
  if (tensors > 0 && buffer == nullptr) return fail(int(cudaErrorInvalidValue), "%s: %s is NULL", fn, what);
  return 0;
}

// The prologue of the multi-tensor sum entry points (one block per tensor of the call).
inline int check_sum(const char* fn, const int64_t* plan, int64_t tensors, const float* partials,
                     const float* out) {
  if (tensors < 0) return fail(int(cudaErrorInvalidValue), "%s: negative tensor count %lld", fn, (long long)tensors);
  if (tensors > 0 && (plan == nullptr || out == nullptr))
    return fail(int(cudaErrorInvalidValue), "%s: plan or out is NULL", fn);
  (void)partials;  // NULL is fine when every tensor is empty (no partial is read)
  return 0;
}

// Runs f(TrA{}, TrB{}) for two dtype codes.
template <typename F>
inline int dispatch_dtypes(const char* fn, int a, int b, F&& f) {
  return dispatch_dtype(fn, a, [&](auto ta) {
    return dispatch_dtype(fn, b, [&](auto tb) { return f(ta, tb); });
  });
}

}  // namespace mt
}  // namespace fastadv
