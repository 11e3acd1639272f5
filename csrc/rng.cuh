// Randomness inside fastadv's CUDA kernels: Philox-4x32-10 keyed from the
// PyTorch generator, the same stream as the Triton kernels
// (fastadv/kernels/triton/rng.py; read that docstring for the whole contract).
//
// Key: an int64 device tensor [seed, base] drawn by torch.randint on the
// tensor's device (reproducible under torch.manual_seed, a new key per call,
// nothing read back to the host, CUDA-graph safe: the kernel loads it).
//
// Counters: chunk c of a launch (kChunk = 4 * kQuarter elements) uses the
// counters base + c * kQuarter + j, j < kQuarter; element
// c * kChunk + q * kQuarter + j takes 32-bit word q of counter j.  Multi-tensor
// launches number chunks across their tensors (disjoint counters per tensor).
//
// Generator: Philox-4x32-10 (Salmon et al., SC'11), the algorithm of cuRAND's
// Philox4_32_10 and of Triton's tl.randint4x, with key (seed lo, seed hi) and
// counter (k lo, k hi, 0, 0).  It is written out here rather than taken from
// curand_kernel.h because (a) the toolkit the project builds with in CI ships
// without the cuRAND headers, and (b) curand_init + curand4 evaluate Philox
// twice per call (curand4 precomputes the next block); here it is one
// evaluation per 4 words, and the words are bit-identical to Triton's for the
// same key and counter.  The float conversions below are the ones of rng.py.
#pragma once

#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

#include "common.cuh"

namespace fastadv {
namespace rng {

constexpr int64_t kQuarter = 1024;          // counters per chunk
constexpr int64_t kChunk = 4 * kQuarter;    // elements per chunk

struct Key {
  uint64_t seed;
  int64_t base;
};

__device__ __forceinline__ Key load_key(const int64_t* key) {
  return Key{static_cast<uint64_t>(key[0]), key[1]};
}

struct Words {
  uint32_t w[4];
};

// Philox-4x32-10 of counter (lo, hi, 0, 0) under key (seed lo, seed hi).
__host__ __device__ inline Words philox4x32_10(uint64_t counter, uint64_t seed) {
  uint32_t c0 = static_cast<uint32_t>(counter), c1 = static_cast<uint32_t>(counter >> 32);
  uint32_t c2 = 0u, c3 = 0u;
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
#pragma unroll
  for (int round = 0; round < 10; ++round) {
    const uint64_t p0 = uint64_t(0xD2511F53u) * c0;  // mulhilo: one wide multiply
    const uint64_t p1 = uint64_t(0xCD9E8D57u) * c2;
    const uint32_t n0 = static_cast<uint32_t>(p1 >> 32) ^ c1 ^ k0;
    const uint32_t n2 = static_cast<uint32_t>(p0 >> 32) ^ c3 ^ k1;
    c1 = static_cast<uint32_t>(p1);
    c3 = static_cast<uint32_t>(p0);
    c0 = n0;
    c2 = n2;
    k0 += 0x9E3779B9u;  // key schedule (Weyl sequence)
    k1 += 0xBB67AE85u;
  }
  return Words{{c0, c1, c2, c3}};
}

// uint32 word -> uniform in [0, 1): top 24 bits times 2^-24 (exact in fp32).
__host__ __device__ inline float uniform01(uint32_t w) {
  return static_cast<float>(w >> 8) * 5.9604644775390625e-08f;
}

// Two words -> two N(0, 1) (Box-Muller); u1 = w1 * 2^-32 + 2^-33 lies in (0, 1].
__host__ __device__ inline void normal_pair(uint32_t w1, uint32_t w2, float& z1, float& z2) {
  const float u1 = static_cast<float>(w1) * 2.3283064365386963e-10f + 1.1641532182693481e-10f;
  const float r = sqrtf(-2.0f * logf(u1));
  const float theta = 6.283185307179586f * uniform01(w2);
  z1 = r * cosf(theta);
  z2 = r * sinf(theta);
}

// The four normals / uniforms of one counter, in word order.
__host__ __device__ inline void normal4(const Words& w, float z[4]) {
  normal_pair(w.w[0], w.w[1], z[0], z[1]);
  normal_pair(w.w[2], w.w[3], z[2], z[3]);
}

__host__ __device__ inline void uniform4(const Words& w, float u[4]) {
#pragma unroll
  for (int q = 0; q < 4; ++q) u[q] = uniform01(w.w[q]);
}


// ---- the per-chunk loop of the random kernels (noise, SiFT) ------------------------------

// The draws of chunk `chunk` (a global chunk index: the counters base + chunk * kQuarter + j),
// in the layout above: thread j takes counters j, j + kThreads, ... and, for each, calls
// f(q * kQuarter + j, r[q]) for q = 0..3 -- the element's offset inside the chunk and its
// N(0, 1) (UNIFORM: U[0, 1)) number.  Coalesced: consecutive threads, consecutive elements.
template <bool UNIFORM = false, typename F>
__device__ __forceinline__ void chunk_draws(const Key& k, int64_t chunk, F&& f) {
  for (int64_t j = threadIdx.x; j < kQuarter; j += kThreads) {
    const Words w = philox4x32_10(uint64_t(k.base + chunk * kQuarter + j), k.seed);
    float r[4];
    if (UNIFORM) uniform4(w, r);
    else normal4(w, r);
#pragma unroll
    for (int q = 0; q < 4; ++q) f(q * kQuarter + j, r[q]);
  }
}

// ---- launch helpers of the kernels on this chunk layout (noise, NEFTune, SiFT) ----------

constexpr int64_t kMaxChunks = (int64_t(1) << 31) - 1;  // grid.x limit

// Blocks of one chunk each covering numel elements.
inline unsigned chunk_grid(int64_t numel) { return unsigned(ceil_div(numel, kChunk)); }

inline int too_big(const char* fn, int64_t numel) {
  return fail(int(cudaErrorInvalidValue), "%s: %lld elements exceed the chunk grid", fn, (long long)numel);
}

inline int null_arg(const char* fn, const char* what) {
  return fail(int(cudaErrorInvalidValue), "%s: %s is NULL", fn, what);
}

// e / n, in 32 bits when both fit (64-bit integer division is slow on GPUs).
__device__ __forceinline__ int64_t div_index(int64_t e, int64_t n) {
  if (((e | n) >> 31) == 0) return int64_t(uint32_t(e) / uint32_t(n));
  return e / n;
}

}  // namespace rng
}  // namespace fastadv
