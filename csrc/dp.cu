// DP-SGD kernels: per-sample clipping and Gaussian noise in fused multi-tensor
// passes.  They mirror fastadv/kernels/triton/dp.py (read its docstring for
// the math and the table lists); the C ABI is at the end of this file,
// declared in fastadv.h ("DP-SGD").
//
// Tables (multi_tensor.cuh) are built over the per-sample sizes n_t with three
// lists: 0 = out [n_t], 1 = summed [n_t], 2 = per-sample gradients [B, n_t]
// (sample b's row at b * n_t).  One block handles one chunk of rng::kChunk
// elements of one tensor, for every sample:
//
//   dp_norm_partials   grid (chunks, min(B, 65535)): partials[b, col0 + c] = sum g^2
//   dp_clip_factors    grid (B): fixed-order sum of row b, n_b = sqrt, Opacus's
//                      factor min(1, C * (1 / (n_b + 1e-6))), 0 when n_b is not finite
//   dp_clip_sum        grid (chunks): reads every sample's chunk once (samples with
//                      factor 0 are skipped, so a NaN never enters), sums f_b g_b
//                      in fp32, adds / writes summed, adds std * z (Philox counters
//                      of chunk chunk0 + c, the layout of rng.cuh), divides, writes out
//
// Thread t of a chunk owns the Philox counters 4t .. 4t+3 and, for each quarter
// q, the four consecutive elements q * kQuarter + 4t .. +3 (one 4-wide load
// per quarter and sample when the rows are aligned).
#include "common.cuh"
#include "multi_tensor.cuh"
#include "rng.cuh"

namespace fastadv {
namespace {

using mt::Table;
using rng::kChunk;
using rng::kQuarter;

constexpr int kDpThreads = 256;
constexpr int kPerThread = kQuarter / kDpThreads;  // Philox counters per thread: 4
static_assert(kPerThread == 4, "one 4-wide pack per quarter and thread");
constexpr int kOut = 0, kSummed = 1, kGrad = 2, kLists = 3;
constexpr int64_t kMaxGridY = 65535;
constexpr uint64_t kStreamStride = uint64_t(1) << 61;  // secure mode: stream k keyed seed + k * 2^61

enum Flags {
  kReadSummed = 1,
  kWriteSummed = 2,
  kWriteOut = 4,
  kNoise = 8,
  kSecure = 16,
  kDivide = 32,
};

// ---- per-sample norms ---------------------------------------------------------------------

template <typename Tr>
__global__ void __launch_bounds__(kDpThreads)
norm_partials_kernel(Table tb, int64_t batch, float* __restrict__ partials, int64_t n_parts, int64_t col0) {
  using B = typename Tr::bits;
  const int64_t c = blockIdx.x;
  const mt::Chunk k = mt::chunk_of(tb, c);
  const int64_t n = tb.numel(k.tensor);
  const B* g = tb.ptr<const B>(kGrad, k.tensor);
  for (int64_t b = blockIdx.y; b < batch; b += gridDim.y) {
    const B* row = g + b * n;
    float acc = 0.f;
    mt::chunk_loop<kVec<B>>(k, mt::aligned(row + k.start, 16), [&](auto w, int64_t i) {
      constexpr int N = decltype(w)::value;
      const Pack<B, N> p = mt::load<B, N>(row, i);
#pragma unroll
      for (int j = 0; j < N; ++j) {
        const float x = Tr::to_float(p.v[j]);
        acc = fmaf(x, x, acc);
      }
    });
    const float s = block_sum<kDpThreads>(acc);
    if (threadIdx.x == 0) partials[b * n_parts + col0 + c] = s;
    __syncthreads();  // block_sum's scratch is reused by the next sample
  }
}

__global__ void __launch_bounds__(kDpThreads)
clip_factors_kernel(const float* __restrict__ partials, int64_t n_parts, int64_t batch, float* __restrict__ out,
                    unsigned long long* count, float max_norm) {
  const int64_t b = blockIdx.x;
  const float* row = partials + b * n_parts;
  float acc = 0.f;
  for (int64_t i = threadIdx.x; i < n_parts; i += kDpThreads) acc += row[i];
  const float s = block_sum<kDpThreads>(acc);
  if (threadIdx.x == 0) {
    const float norm = __fsqrt_rn(s);
    const bool finite = isfinite(norm);  // false for inf and NaN
    // Opacus 1.6: (max_grad_norm / (norm + 1e-6)).clamp(max=1.0), float / tensor
    // being reciprocal(tensor) * float
    float f = __fmul_rn(__fdiv_rn(1.0f, __fadd_rn(norm, 1e-6f)), max_norm);
    f = finite ? fminf(f, 1.0f) : 0.0f;
    out[b] = f;
    out[batch + b] = norm;
    if (count != nullptr && !finite) atomicAdd(count, 1ull);  // integer: deterministic
  }
}

// ---- clipped sum + noise ----------------------------------------------------------------------

// The normals of counter `counter` (word q -> quarter q); secure: (z1 + z2 + z3 + z4) / 2
// over four independent streams.
__device__ __forceinline__ void chunk_normals(const rng::Key& key, uint64_t counter, bool secure, float z[4]) {
  rng::normal4(rng::philox4x32_10(counter, key.seed), z);
  if (secure) {
    for (uint64_t s = 1; s < 4; ++s) {
      float y[4];
      rng::normal4(rng::philox4x32_10(counter, key.seed + s * kStreamStride), y);
#pragma unroll
      for (int q = 0; q < 4; ++q) z[q] += y[q];
    }
#pragma unroll
    for (int q = 0; q < 4; ++q) z[q] *= 0.5f;
  }
}

template <typename TrG, typename TrO>
__global__ void __launch_bounds__(kDpThreads)
clip_sum_kernel(Table tb, int64_t batch, const float* __restrict__ factors, const int64_t* __restrict__ key,
                float std_, float divisor, int64_t chunk0, int flags) {
  using BG = typename TrG::bits;
  using BO = typename TrO::bits;
  const int64_t c = blockIdx.x;
  const mt::Chunk k = mt::chunk_of(tb, c);
  const int64_t n = tb.numel(k.tensor);
  const BG* g = tb.ptr<const BG>(kGrad, k.tensor);
  const int64_t j0 = int64_t(kPerThread) * threadIdx.x;
  // rows start at g + b * n: 4-wide loads need g aligned and n a multiple of 4
  const bool vec = (n % kPerThread == 0) && mt::aligned(g, int(sizeof(BG)) * kPerThread);

  float acc[4][kPerThread];
#pragma unroll
  for (int q = 0; q < 4; ++q)
#pragma unroll
    for (int r = 0; r < kPerThread; ++r) acc[q][r] = 0.f;

  for (int64_t b = 0; b < batch; ++b) {  // fixed order: deterministic
    const float f = factors[b];
    if (f == 0.f) continue;              // dropped samples are not even read
    const BG* row = g + b * n;
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      const int64_t e = k.start + q * kQuarter + j0;
      if (vec && e + kPerThread <= k.end) {
        const Pack<BG, kPerThread> p = mt::load<BG, kPerThread>(row, e);
#pragma unroll
        for (int r = 0; r < kPerThread; ++r) acc[q][r] = fmaf(f, TrG::to_float(p.v[r]), acc[q][r]);
      } else {
#pragma unroll
        for (int r = 0; r < kPerThread; ++r)
          if (e + r < k.end) acc[q][r] = fmaf(f, TrG::to_float(row[e + r]), acc[q][r]);
      }
    }
  }

  BO* out = tb.ptr<BO>(kOut, k.tensor);
  BO* summed = tb.ptr<BO>(kSummed, k.tensor);
  const bool noise = (flags & kNoise) && (flags & kWriteOut);
  rng::Key kk{0, 0};
  if (noise) kk = rng::load_key(key);
#pragma unroll
  for (int r = 0; r < kPerThread; ++r) {
    float z[4] = {0.f, 0.f, 0.f, 0.f};
    if (noise) chunk_normals(kk, uint64_t(kk.base + (chunk0 + c) * kQuarter + j0 + r), flags & kSecure, z);
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      const int64_t e = k.start + q * kQuarter + j0 + r;
      if (e >= k.end) continue;
      float v = acc[q][r];
      if (flags & kReadSummed) v += TrO::to_float(summed[e]);
      if (flags & kWriteSummed) summed[e] = TrO::from_float(v);
      if (flags & kWriteOut) {
        if (noise) v = fmaf(std_, z[q], v);
        if (flags & kDivide) v = __fdiv_rn(v, divisor);
        out[e] = TrO::from_float(v);
      }
    }
  }
}

// ---- seed 000: clip the total norm, add noise ----------------------------------------------------

template <typename Tr>
__global__ void __launch_bounds__(kDpThreads)
seed_sumsq_kernel(Table tb, float* __restrict__ partials, int64_t col0) {
  using B = typename Tr::bits;
  const int64_t c = blockIdx.x;
  const mt::Chunk k = mt::chunk_of(tb, c);
  const B* g = tb.ptr<const B>(0, k.tensor);
  float acc = 0.f;
  mt::chunk_loop<kVec<B>>(k, mt::aligned(g + k.start, 16), [&](auto w, int64_t i) {
    constexpr int N = decltype(w)::value;
    const Pack<B, N> p = mt::load<B, N>(g, i);
#pragma unroll
    for (int j = 0; j < N; ++j) {
      const float x = Tr::to_float(p.v[j]);
      acc = fmaf(x, x, acc);
    }
  });
  const float s = block_sum<kDpThreads>(acc);
  if (threadIdx.x == 0) partials[col0 + c] = s;
}

// g <- g * clamp(C * (1 / (||g|| + 1e-6)), max=1) + sigma * z, rounded as clip_grad_norm_
// followed by g.add_(randn * sigma) (NaN coefficients pass, like torch.clamp).
template <typename Tr>
__global__ void __launch_bounds__(kDpThreads)
seed_update_kernel(Table tb, const float* __restrict__ norm, const int64_t* __restrict__ key, float max_norm,
                   float sigma, int64_t chunk0, int noise) {
  using B = typename Tr::bits;
  const int64_t c = blockIdx.x;
  const mt::Chunk k = mt::chunk_of(tb, c);
  B* g = tb.ptr<B>(0, k.tensor);
  float coef = __fmul_rn(__fdiv_rn(1.0f, __fadd_rn(*norm, 1e-6f)), max_norm);
  coef = coef > 1.0f ? 1.0f : coef;
  const int64_t j0 = int64_t(kPerThread) * threadIdx.x;
  rng::Key kk{0, 0};
  if (noise) kk = rng::load_key(key);
#pragma unroll
  for (int r = 0; r < kPerThread; ++r) {
    float z[4] = {0.f, 0.f, 0.f, 0.f};
    if (noise) chunk_normals(kk, uint64_t(kk.base + (chunk0 + c) * kQuarter + j0 + r), false, z);
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      const int64_t e = k.start + q * kQuarter + j0 + r;
      if (e >= k.end) continue;
      float v = __fmul_rn(Tr::to_float(g[e]), coef);
      if (noise) v = __fadd_rn(v, __fmul_rn(sigma, z[q]));
      g[e] = Tr::from_float(v);
    }
  }
}

// ---- argument checks ---------------------------------------------------------------------------

int check_chunked(const char* fn, const int64_t* table, int64_t tensors, int64_t chunks, int64_t chunk,
                  int lists) {
  if (int e = mt::check_table(fn, table, lists, tensors, chunks, chunk)) return e;
  if (chunk != kChunk)
    return fail(int(cudaErrorInvalidValue), "%s: the table must use chunks of %lld elements, got %lld", fn,
                (long long)kChunk, (long long)chunk);
  if (chunks > int64_t(0x7fffffff))
    return fail(int(cudaErrorInvalidValue), "%s: %lld chunks exceed the grid", fn, (long long)chunks);
  return 0;
}

inline int null_arg(const char* fn, const char* what) {
  return fail(int(cudaErrorInvalidValue), "%s: %s is NULL", fn, what);
}

}  // namespace
}  // namespace fastadv

// ---- C ABI -----------------------------------------------------------------------------------------
// Every function returns 0 or a cudaError_t (message in fastadv_last_error()) and
// only enqueues work on `stream`.  `table` is a device TensorTable (multi_tensor.cuh)
// of `chunks` chunks of `chunk` (= 4096) elements over `tensors` tensors.

using namespace fastadv;

// partials[b * n_parts + col0 + c] = sum over chunk c of g[b]^2, for b < batch
// (table of 3 lists, per-sample gradients in list 2, dtype `gdtype`).
extern "C" FASTADV_API int fastadv_dp_norm_partials(const int64_t* table, int64_t tensors, int64_t chunks,
                                                    int64_t chunk, int64_t batch, int gdtype, float* partials,
                                                    int64_t n_parts, int64_t col0, void* stream) {
  static const char* fn = "fastadv_dp_norm_partials";
  if (int e = check_chunked(fn, table, tensors, chunks, chunk, kLists)) return e;
  if (batch < 0 || n_parts < 0 || col0 < 0) return bad_sizes(fn, batch, n_parts);
  if (chunks == 0 || batch == 0) return 0;
  if (partials == nullptr) return null_arg(fn, "partials");
  const Table tb{table, tensors, kLists, chunk};
  const dim3 grid(unsigned(chunks), unsigned(batch < kMaxGridY ? batch : kMaxGridY));
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  return dispatch_dtype(fn, gdtype, [&](auto tr) {
    norm_partials_kernel<decltype(tr)><<<grid, kDpThreads, 0, s>>>(tb, batch, partials, n_parts, col0);
    return check_launch(fn);
  });
}

// out[b] = clip factor, out[batch + b] = norm of sample b (fp32 [2, batch]);
// *count (int64, may be NULL) += number of non-finite norms.
extern "C" FASTADV_API int fastadv_dp_clip_factors(const float* partials, int64_t n_parts, int64_t batch,
                                                   float* out, int64_t* count, float max_norm, void* stream) {
  static const char* fn = "fastadv_dp_clip_factors";
  if (batch < 0 || n_parts < 0) return bad_sizes(fn, batch, n_parts);
  if (batch == 0) return 0;
  if (partials == nullptr) return null_arg(fn, "partials");
  if (out == nullptr) return null_arg(fn, "out");
  if (batch > int64_t(0x7fffffff)) return fail(int(cudaErrorInvalidValue), "%s: batch too large", fn);
  clip_factors_kernel<<<unsigned(batch), kDpThreads, 0, static_cast<cudaStream_t>(stream)>>>(
      partials, n_parts, batch, out, reinterpret_cast<unsigned long long*>(count), max_norm);
  return check_launch(fn);
}

// The fused pass (flags: 1 read summed, 2 write summed, 4 write out, 8 noise, 16 secure,
// 32 divide).  out and summed have dtype `odtype`, the per-sample gradients `gdtype`.
extern "C" FASTADV_API int fastadv_dp_clip_sum(const int64_t* table, int64_t tensors, int64_t chunks,
                                               int64_t chunk, int64_t batch, int gdtype, int odtype,
                                               const float* factors, const int64_t* key, float std_,
                                               float divisor, int64_t chunk0, int flags, void* stream) {
  static const char* fn = "fastadv_dp_clip_sum";
  if (int e = check_chunked(fn, table, tensors, chunks, chunk, kLists)) return e;
  if (batch < 0 || chunk0 < 0) return bad_sizes(fn, batch, chunk0);
  if (chunks == 0) return 0;
  if (batch > 0 && factors == nullptr) return null_arg(fn, "factors");
  if ((flags & kNoise) && key == nullptr) return null_arg(fn, "key");
  const Table tb{table, tensors, kLists, chunk};
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  return mt::dispatch_dtypes(fn, gdtype, odtype, [&](auto tg, auto to) {
    clip_sum_kernel<decltype(tg), decltype(to)><<<unsigned(chunks), kDpThreads, 0, s>>>(
        tb, batch, factors, key, std_, divisor, chunk0, flags);
    return check_launch(fn);
  });
}

// partials[col0 + c] = sum over chunk c of g^2 (table of 1 list).
extern "C" FASTADV_API int fastadv_dp_seed_sumsq(const int64_t* table, int64_t tensors, int64_t chunks,
                                                 int64_t chunk, int dtype, float* partials, int64_t col0,
                                                 void* stream) {
  static const char* fn = "fastadv_dp_seed_sumsq";
  if (int e = check_chunked(fn, table, tensors, chunks, chunk, 1)) return e;
  if (chunks == 0) return 0;
  if (partials == nullptr) return null_arg(fn, "partials");
  const Table tb{table, tensors, 1, chunk};
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  return dispatch_dtype(fn, dtype, [&](auto tr) {
    seed_sumsq_kernel<decltype(tr)><<<unsigned(chunks), kDpThreads, 0, s>>>(tb, partials, col0);
    return check_launch(fn);
  });
}

// *out = sqrt(sum(partials[0, n))), fixed order.
extern "C" FASTADV_API int fastadv_dp_global_norm(const float* partials, int64_t n, float* out, void* stream) {
  static const char* fn = "fastadv_dp_global_norm";
  if (n < 0) return bad_sizes(fn, 1, n);
  if (out == nullptr) return null_arg(fn, "out");
  mt::global_norm_kernel<<<1, mt::kGlobalThreads, 0, static_cast<cudaStream_t>(stream)>>>(partials, n, out);
  return check_launch(fn);
}

// In place g <- g * clip_coef(*norm) + sigma * z over a one-list table (noise when key != NULL).
extern "C" FASTADV_API int fastadv_dp_seed_update(const int64_t* table, int64_t tensors, int64_t chunks,
                                                  int64_t chunk, int dtype, const float* norm,
                                                  const int64_t* key, float max_norm, float sigma,
                                                  int64_t chunk0, void* stream) {
  static const char* fn = "fastadv_dp_seed_update";
  if (int e = check_chunked(fn, table, tensors, chunks, chunk, 1)) return e;
  if (chunks == 0) return 0;
  if (norm == nullptr) return null_arg(fn, "norm");
  const Table tb{table, tensors, 1, chunk};
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  return dispatch_dtype(fn, dtype, [&](auto tr) {
    seed_update_kernel<decltype(tr)><<<unsigned(chunks), kDpThreads, 0, s>>>(tb, norm, key, max_norm, sigma,
                                                                            chunk0, key != nullptr);
    return check_launch(fn);
  });
}
