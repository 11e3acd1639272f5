// Helpers shared by the fastadv CUDA ops: dtype traits (elements are handled
// as raw bits and converted to fp32 explicitly), aligned vector packs, block
// and warp sums with a fixed order, grid sizing and error reporting.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdarg>
#include <cstdint>
#include <cstdio>

#include "fastadv.h"

namespace fastadv {

// ---- dtypes ---------------------------------------------------------------

struct F32 {
  using bits = uint32_t;
  __device__ __forceinline__ static float to_float(bits b) { return __uint_as_float(b); }
  __device__ __forceinline__ static bits from_float(float x) { return __float_as_uint(x); }
};

struct F16 {
  using bits = uint16_t;
  __device__ __forceinline__ static float to_float(bits b) { return __half2float(__ushort_as_half(b)); }
  __device__ __forceinline__ static bits from_float(float x) { return __half_as_ushort(__float2half_rn(x)); }
};

struct BF16 {
  using bits = uint16_t;
  // bf16 is the top half of an fp32: widening is a shift, exact.
  __device__ __forceinline__ static float to_float(bits b) { return __uint_as_float(uint32_t(b) << 16); }
  __device__ __forceinline__ static bits from_float(float x) { return __bfloat16_as_ushort(__float2bfloat16_rn(x)); }
};

// N elements of T loaded / stored as one aligned access (16 bytes at most).
template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

// Elements per 16-byte access.
template <typename T>
constexpr int kVec = 16 / sizeof(T);

inline bool aligned_to(const void* p, size_t bytes) {
  return reinterpret_cast<uintptr_t>(p) % bytes == 0;
}

// ---- reductions (fixed order: deterministic) --------------------------------

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;  // every lane holds the same sum
}

// Sum over a block of BLOCK threads; the result is valid in thread 0.
template <int BLOCK>
__device__ __forceinline__ float block_sum(float v) {
  static_assert(BLOCK % 32 == 0 && BLOCK <= 1024, "block size");
  __shared__ float warp_sums[BLOCK / 32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  v = warp_sum(v);
  if (lane == 0) warp_sums[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < BLOCK / 32 ? warp_sums[lane] : 0.f;
    v = warp_sum(v);
  }
  return v;
}

// ---- launch geometry --------------------------------------------------------

constexpr int kThreads = 256;                   // elementwise and row kernels
constexpr int kWarpsPerBlock = kThreads / 32;
constexpr int64_t kMaxBlocks = 1 << 16;         // grid-stride loops beyond this

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Blocks for `items` work items of one thread each (items > 0).
inline unsigned grid_for(int64_t items) {
  int64_t b = ceil_div(items, kThreads);
  return unsigned(b < kMaxBlocks ? b : kMaxBlocks);
}

// Blocks for one warp per row (rows > 0).
inline unsigned grid_for_rows(int64_t rows) {
  int64_t b = ceil_div(rows, kWarpsPerBlock);
  return unsigned(b < kMaxBlocks ? b : kMaxBlocks);
}

// ---- errors -------------------------------------------------------------------

// The last failure's message, per host thread (inline: one copy in the .so).
inline thread_local char g_last_error[512] = "";

inline int fail(int code, const char* fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(g_last_error, sizeof g_last_error, fmt, ap);
  va_end(ap);
  return code;
}

// Call right after a launch: reports a launch failure as "<where>: <cuda message>".
inline int check_launch(const char* where) {
  cudaError_t e = cudaGetLastError();
  if (e == cudaSuccess) return 0;
  return fail(int(e), "%s: %s (%s)", where, cudaGetErrorString(e), cudaGetErrorName(e));
}

inline int bad_dtype(const char* fn, int dtype) {
  return fail(int(cudaErrorInvalidValue),
              "%s: unsupported dtype code %d (0=float32, 1=float16, 2=bfloat16)", fn, dtype);
}

inline int bad_sizes(const char* fn, int64_t rows, int64_t cols) {
  return fail(int(cudaErrorInvalidValue), "%s: negative size rows=%lld cols=%lld", fn,
              (long long)rows, (long long)cols);
}

// Runs f(Traits{}) for the dtype code, or reports an unsupported code.
template <typename F>
inline int dispatch_dtype(const char* fn, int dtype, F&& f) {
  switch (dtype) {
    case FASTADV_FLOAT32: return f(F32{});
    case FASTADV_FLOAT16: return f(F16{});
    case FASTADV_BFLOAT16: return f(BF16{});
    default: return bad_dtype(fn, dtype);
  }
}

}  // namespace fastadv
