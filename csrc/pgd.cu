// PGD kernels: one reduction (||g||^2, ||r||^2, <r, g>), a one-block finalize
// that turns it into coef = [||g||, ||r'||, step, project] on the device, and
// one fused step + projection pass (dense, or row-sparse with saved-row flags);
// plus the bit-exact restore of the saved rows.  The CUDA twin of
// fastadv/kernels/triton/pgd.py: same quantities, same formulas, same rounding
// order.  Contracts in fastadv.h ("embedding PGD").
#include "common.cuh"

namespace fastadv {
namespace {

constexpr int64_t kPartialElemsPerBlock = 8192;  // dense stage 1: work per block, at least
constexpr int64_t kPartialMaxBlocks = 1024;      // dense stage 1: partials, at most
constexpr int kFinalizeThreads = 1024;
constexpr unsigned kFullMask = 0xffffffffu;

// Dense stage-1 blocks, a function of n only: the reduction order, and so the
// result, never depends on the device.
int64_t dense_blocks(int64_t n) {
  if (n <= 0) return 0;
  int64_t b = ceil_div(n, kPartialElemsPerBlock);
  return b < kPartialMaxBlocks ? b : kPartialMaxBlocks;
}

// Three sums over a block of BLOCK threads, fixed order; valid in thread 0.
template <int BLOCK>
__device__ __forceinline__ void block_sum3(float& a, float& b, float& c) {
  static_assert(BLOCK % 32 == 0 && BLOCK <= 1024, "block size");
  __shared__ float sums[3][BLOCK / 32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  a = warp_sum(a);
  b = warp_sum(b);
  c = warp_sum(c);
  if (lane == 0) {
    sums[0][warp] = a;
    sums[1][warp] = b;
    sums[2][warp] = c;
  }
  __syncthreads();
  if (warp == 0) {
    const bool in = lane < BLOCK / 32;
    a = warp_sum(in ? sums[0][lane] : 0.f);
    b = warp_sum(in ? sums[1][lane] : 0.f);
    c = warp_sum(in ? sums[2][lane] : 0.f);
  }
}

// ---- stage 1: partial sums --------------------------------------------------------

// One element's contribution: gg += g*g and, unless FIRST (r = 0), with
// r = w - w0: rr += r*r, rg += r*g.
template <bool FIRST>
__device__ __forceinline__ void accumulate(float w, float w0, float g, float& gg, float& rr, float& rg) {
  gg = fmaf(g, g, gg);
  if (!FIRST) {
    const float r = __fsub_rn(w, w0);
    rr = fmaf(r, r, rr);
    rg = fmaf(r, g, rg);
  }
}

// part[k * gridDim.x + blockIdx.x], k = 0, 1, 2: this block's share of
// ||g||^2, ||r||^2, <r, g>.  FIRST: w and backup are not read (r = 0).
template <typename Tr, int VEC, bool FIRST>
__global__ void __launch_bounds__(kThreads)
partial_dense_kernel(const typename Tr::bits* __restrict__ w, const typename Tr::bits* __restrict__ backup,
                     const typename Tr::bits* __restrict__ g, int64_t n, float* __restrict__ part) {
  using P = Pack<typename Tr::bits, VEC>;
  const int64_t tid = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  const int64_t nvec = n / VEC;
  const P* wv = reinterpret_cast<const P*>(w);
  const P* bv = reinterpret_cast<const P*>(backup);
  const P* gv = reinterpret_cast<const P*>(g);
  float gg = 0.f, rr = 0.f, rg = 0.f;
  for (int64_t i = tid; i < nvec; i += stride) {
    const P pg = gv[i];
    P pw{}, pb{};
    if (!FIRST) {
      pw = wv[i];
      pb = bv[i];
    }
#pragma unroll
    for (int k = 0; k < VEC; ++k)
      accumulate<FIRST>(Tr::to_float(pw.v[k]), Tr::to_float(pb.v[k]), Tr::to_float(pg.v[k]), gg, rr, rg);
  }
  for (int64_t i = nvec * VEC + tid; i < n; i += stride) {  // tail (< VEC elements)
    const float x = Tr::to_float(g[i]);
    if (FIRST)
      accumulate<true>(0.f, 0.f, x, gg, rr, rg);
    else
      accumulate<false>(Tr::to_float(w[i]), Tr::to_float(backup[i]), x, gg, rr, rg);
  }
  block_sum3<kThreads>(gg, rr, rg);
  if (threadIdx.x == 0) {
    part[blockIdx.x] = gg;
    part[gridDim.x + blockIdx.x] = rr;
    part[2 * int64_t(gridDim.x) + blockIdx.x] = rg;
  }
}

// One warp per row: part[r], part[rows + r], part[2 rows + r] = the row's
// ||g||^2, ||r||^2, <r, g>.  Every row of g is read (the norm is over all of
// it): mask[r] is set to 1 iff the row holds a non-zero entry (NaN / inf
// included), else 0 -- which rows carry gradient is read from the gradient.
// w and backup are read on saved rows only (r = w - w0 is zero elsewhere).
template <typename Tr, int VEC>
__global__ void __launch_bounds__(kThreads)
partial_rows_kernel(const typename Tr::bits* __restrict__ w, const typename Tr::bits* __restrict__ backup,
                    const typename Tr::bits* __restrict__ g, int64_t rows, int64_t cols, uint8_t* mask,
                    const uint8_t* __restrict__ saved, float* __restrict__ part) {
  using P = Pack<typename Tr::bits, VEC>;
  const int lane = threadIdx.x & 31;
  const int64_t nwarps = (int64_t(gridDim.x) * blockDim.x) >> 5;
  const int64_t cv = cols / VEC;  // VEC divides cols (host's choice)
  for (int64_t r = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) >> 5; r < rows; r += nwarps) {
    const bool was_saved = saved[r] != 0;
    float gg = 0.f, rr = 0.f, rg = 0.f;
    const P* wr = reinterpret_cast<const P*>(w + r * cols);
    const P* br = reinterpret_cast<const P*>(backup + r * cols);
    const P* gr = reinterpret_cast<const P*>(g + r * cols);
    int nonzero = 0;  // any g != 0 (NaN included), this lane
    for (int64_t c = lane; c < cv; c += 32) {
      const P pg = gr[c];
      if (was_saved) {  // uniform across the warp
        const P pw = wr[c], pb = br[c];
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
          const float x = Tr::to_float(pg.v[k]);
          nonzero |= int(x != 0.f);
          accumulate<false>(Tr::to_float(pw.v[k]), Tr::to_float(pb.v[k]), x, gg, rr, rg);
        }
      } else {
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
          const float x = Tr::to_float(pg.v[k]);
          nonzero |= int(x != 0.f);
          accumulate<true>(0.f, 0.f, x, gg, rr, rg);
        }
      }
    }
    gg = warp_sum(gg);
    rr = warp_sum(rr);
    rg = warp_sum(rg);
    const bool any_nonzero = __any_sync(kFullMask, nonzero) != 0;
    if (lane == 0) {
      mask[r] = any_nonzero ? 1 : 0;
      part[r] = gg;
      part[rows + r] = rr;
      part[2 * rows + r] = rg;
    }
  }
}

// ---- finalize ----------------------------------------------------------------------------

// The three sums of the n partials of each quantity, in a fixed order (one
// block of kFinalizeThreads; the totals are valid in thread 0).
__device__ __forceinline__ void sum_partials(const float* __restrict__ part, int64_t n,
                                             float& gg, float& rr, float& rg) {
  gg = 0.f, rr = 0.f, rg = 0.f;
  for (int64_t i = threadIdx.x; i < n; i += kFinalizeThreads) {
    gg += part[i];
    rr += part[n + i];
    rg += part[2 * n + i];
  }
  block_sum3<kFinalizeThreads>(gg, rr, rg);
}

// One block: sums the n partials of each quantity in a fixed order, then
// coef = [||g||, ||r'||, step, project] with s = alpha / ||g|| and
// ||r'||^2 = max(||r||^2 + (2 s) <r, g> + (s s) ||g||^2, 0).
__global__ void __launch_bounds__(kFinalizeThreads)
finalize_kernel(const float* __restrict__ part, int64_t n, float* __restrict__ coef, float alpha, float eps) {
  float gg, rr, rg;
  sum_partials(part, n, gg, rr, rg);
  if (threadIdx.x == 0) {
    const float norm_g = __fsqrt_rn(gg);
    const bool step = norm_g != 0.f && norm_g == norm_g;  // neither 0 nor NaN
    const float s = __fdiv_rn(alpha, norm_g);
    const float sq = __fadd_rn(__fadd_rn(rr, __fmul_rn(__fmul_rn(2.f, s), rg)), __fmul_rn(__fmul_rn(s, s), gg));
    const float norm_r = __fsqrt_rn(fmaxf(sq, 0.f));  // fmaxf(NaN, 0) = 0
    coef[0] = norm_g;
    coef[1] = norm_r;
    coef[2] = step ? 1.f : 0.f;
    coef[3] = step && norm_r > eps ? 1.f : 0.f;
  }
}

// The reduction half of finalize_kernel, for FSDP2 shards: out[0..2] = the
// three sums of the n partials (same order), which the caller all_reduces
// across the shards before finalize_kernel reads them back as n = 1 partials.
__global__ void __launch_bounds__(kFinalizeThreads)
sum_parts_kernel(const float* __restrict__ part, int64_t n, float* __restrict__ out) {
  float gg, rr, rg;
  sum_partials(part, n, gg, rr, rg);
  if (threadIdx.x == 0) {
    out[0] = gg;
    out[1] = rr;
    out[2] = rg;
  }
}

// ---- update ------------------------------------------------------------------------------

struct Coef {
  float norm_g, norm_r;
  bool step, project;
};

__device__ __forceinline__ Coef load_coef(const float* __restrict__ coef) {
  return Coef{coef[0], coef[1], coef[2] != 0.f, coef[3] != 0.f};
}

// The reference's order, fp32 with IEEE rounding: d = w + (g * alpha) / ||g||;
// r = d - w0; r = (r * eps) / ||r'|| when projecting; w0 + r.
__device__ __forceinline__ float stepped(float w, float w0, float g, float alpha, float eps, const Coef& cf) {
  float r = __fsub_rn(__fadd_rn(w, __fdiv_rn(__fmul_rn(g, alpha), cf.norm_g)), w0);
  if (cf.project) r = __fdiv_rn(__fmul_rn(r, eps), cf.norm_r);
  return __fadd_rn(w0, r);
}

// FIRST: backup <- w (always), w0 = w.  Else w0 = backup, and nothing to do
// when the step is skipped.
template <typename Tr, int VEC, bool FIRST>
__global__ void __launch_bounds__(kThreads)
update_dense_kernel(typename Tr::bits* w, const typename Tr::bits* __restrict__ g,
                    typename Tr::bits* __restrict__ backup, int64_t n, const float* __restrict__ coef,
                    float alpha, float eps) {
  using P = Pack<typename Tr::bits, VEC>;
  const Coef cf = load_coef(coef);
  if (!FIRST && !cf.step) return;
  const int64_t tid = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  const int64_t nvec = n / VEC;
  P* wv = reinterpret_cast<P*>(w);
  const P* gv = reinterpret_cast<const P*>(g);
  P* bv = reinterpret_cast<P*>(backup);
  for (int64_t i = tid; i < nvec; i += stride) {
    P pw = wv[i];
    P pb;
    if (FIRST) {
      bv[i] = pw;
      pb = pw;
    } else {
      pb = bv[i];
    }
    if (cf.step) {
      const P pg = gv[i];
#pragma unroll
      for (int k = 0; k < VEC; ++k)
        pw.v[k] = Tr::from_float(stepped(Tr::to_float(pw.v[k]), Tr::to_float(pb.v[k]),
                                         Tr::to_float(pg.v[k]), alpha, eps, cf));
      wv[i] = pw;
    }
  }
  for (int64_t i = nvec * VEC + tid; i < n; i += stride) {  // tail (< VEC elements)
    const auto x = w[i];
    if (FIRST) backup[i] = x;
    if (cf.step) {
      const float w0 = Tr::to_float(FIRST ? x : backup[i]);
      w[i] = Tr::from_float(stepped(Tr::to_float(x), w0, Tr::to_float(g[i]), alpha, eps, cf));
    }
  }
}

// One warp per row visited (marked or saved), when the step is taken: a row
// not saved yet is backed up on its first perturbation; g is read on marked
// rows only (zero elsewhere); the row is marked saved afterwards.
template <typename Tr, int VEC>
__global__ void __launch_bounds__(kThreads)
update_rows_kernel(typename Tr::bits* w, const typename Tr::bits* __restrict__ g,
                   typename Tr::bits* __restrict__ backup, int64_t rows, int64_t cols,
                   const uint8_t* __restrict__ mask, uint8_t* saved, const float* __restrict__ coef,
                   float alpha, float eps) {
  using P = Pack<typename Tr::bits, VEC>;
  const Coef cf = load_coef(coef);
  if (!cf.step) return;
  const int lane = threadIdx.x & 31;
  const int64_t nwarps = (int64_t(gridDim.x) * blockDim.x) >> 5;
  const int64_t cv = cols / VEC;
  for (int64_t r = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) >> 5; r < rows; r += nwarps) {
    const bool marked = mask[r] != 0;
    const bool was_saved = saved[r] != 0;
    if (!marked && !was_saved) continue;  // uniform across the warp
    P* wr = reinterpret_cast<P*>(w + r * cols);
    P* br = reinterpret_cast<P*>(backup + r * cols);
    const P* gr = reinterpret_cast<const P*>(g + r * cols);
    for (int64_t c = lane; c < cv; c += 32) {
      P pw = wr[c];
      P pb;
      if (was_saved) {
        pb = br[c];
      } else {  // first perturbation of this row: back it up now
        br[c] = pw;
        pb = pw;
      }
      P pg{};  // zero bits: 0.0 in every dtype
      if (marked) pg = gr[c];
#pragma unroll
      for (int k = 0; k < VEC; ++k)
        pw.v[k] = Tr::from_float(stepped(Tr::to_float(pw.v[k]), Tr::to_float(pb.v[k]),
                                         Tr::to_float(pg.v[k]), alpha, eps, cf));
      wr[c] = pw;
    }
    __syncwarp();  // every lane has read saved[r]
    if (lane == 0) saved[r] = 1;
  }
}

// ---- passes ------------------------------------------------------------------------------

// Which part of a step one call runs: all of it, or (FSDP2 shards) the
// reduction into `sums`, then, after the caller's all_reduce of `sums`,
// finalize + update from them.
enum Phase { kAll, kSums, kApply };

// Reduction and finalize as the phase asks; returns 0 or an error, and sets
// *done when nothing is left to launch (kSums).
inline int reduce_phase(Phase phase, int64_t parts, const float* workspace, float* sums, float* coef,
                        float alpha, float eps, cudaStream_t stream, bool* done) {
  *done = phase == kSums;
  if (phase == kSums) {
    sum_parts_kernel<<<1, kFinalizeThreads, 0, stream>>>(workspace, parts, sums);
    return check_launch("fastadv_pgd_sums (sum of the partials)");
  }
  finalize_kernel<<<1, kFinalizeThreads, 0, stream>>>(phase == kApply ? sums : workspace,
                                                        phase == kApply ? 1 : parts, coef, alpha, eps);
  return check_launch("fastadv_pgd_step (finalize)");
}

template <typename Tr, int VEC, bool FIRST>
int dense_step(typename Tr::bits* w, const typename Tr::bits* g, typename Tr::bits* backup, int64_t n,
               int64_t parts, float* workspace, float* sums, float* coef, float alpha, float eps, Phase phase,
               cudaStream_t stream) {
  if (parts > 0 && phase != kApply) {
    partial_dense_kernel<Tr, VEC, FIRST><<<unsigned(parts), kThreads, 0, stream>>>(w, backup, g, n, workspace);
    if (int e = check_launch("fastadv_pgd_step (dense partial sums)")) return e;
  }
  bool done = false;
  if (int e = reduce_phase(phase, parts, workspace, sums, coef, alpha, eps, stream, &done)) return e;
  if (done || parts == 0) return 0;
  update_dense_kernel<Tr, VEC, FIRST><<<grid_for(ceil_div(n, VEC)), kThreads, 0, stream>>>(
      w, g, backup, n, coef, alpha, eps);
  return check_launch("fastadv_pgd_step (dense update)");
}

template <typename Tr, int VEC>
int rows_step(typename Tr::bits* w, const typename Tr::bits* g, typename Tr::bits* backup, int64_t rows,
              int64_t cols, uint8_t* mask, uint8_t* saved, float* workspace, float* sums, float* coef,
              float alpha, float eps, Phase phase, cudaStream_t stream) {
  const unsigned grid = rows > 0 ? grid_for_rows(rows) : 0;
  if (rows > 0 && phase != kApply) {
    partial_rows_kernel<Tr, VEC><<<grid, kThreads, 0, stream>>>(w, backup, g, rows, cols, mask, saved, workspace);
    if (int e = check_launch("fastadv_pgd_step (row partial sums)")) return e;
  }
  bool done = false;
  if (int e = reduce_phase(phase, rows, workspace, sums, coef, alpha, eps, stream, &done)) return e;
  if (done || rows == 0) return 0;
  update_rows_kernel<Tr, VEC><<<grid, kThreads, 0, stream>>>(w, g, backup, rows, cols, mask, saved, coef,
                                                               alpha, eps);
  return check_launch("fastadv_pgd_step (row update)");
}

template <typename Tr>
int step_impl(void* w_, const void* g_, void* backup_, int64_t rows, int64_t cols, uint8_t* mask,
              uint8_t* saved, bool first, float* workspace, float* sums, float* coef, float alpha, float eps,
              Phase phase, cudaStream_t stream) {
  using B = typename Tr::bits;
  constexpr int V = kVec<B>;
  B* w = static_cast<B*>(w_);
  const B* g = static_cast<const B*>(g_);
  B* backup = static_cast<B*>(backup_);
  const bool vec = aligned_to(w, 16) && aligned_to(g, 16) && aligned_to(backup, 16);
  if (mask == nullptr) {
    const int64_t n = rows * cols;
    const int64_t parts = dense_blocks(n);
    if (parts > 0 && workspace == nullptr && phase != kApply)
      return fail(int(cudaErrorInvalidValue), "fastadv_pgd_step: workspace is NULL");
    if (vec)
      return first ? dense_step<Tr, V, true>(w, g, backup, n, parts, workspace, sums, coef, alpha, eps, phase, stream)
                   : dense_step<Tr, V, false>(w, g, backup, n, parts, workspace, sums, coef, alpha, eps, phase, stream);
    return first ? dense_step<Tr, 1, true>(w, g, backup, n, parts, workspace, sums, coef, alpha, eps, phase, stream)
                 : dense_step<Tr, 1, false>(w, g, backup, n, parts, workspace, sums, coef, alpha, eps, phase, stream);
  }
  if (rows > 0 && workspace == nullptr && phase != kApply)
    return fail(int(cudaErrorInvalidValue), "fastadv_pgd_step: workspace is NULL");
  if (vec && cols % V == 0)
    return rows_step<Tr, V>(w, g, backup, rows, cols, mask, saved, workspace, sums, coef, alpha, eps, phase, stream);
  return rows_step<Tr, 1>(w, g, backup, rows, cols, mask, saved, workspace, sums, coef, alpha, eps, phase, stream);
}

// ---- restore -----------------------------------------------------------------------------

// One warp per saved row: the row copied as `units` raw words of type U, then
// its flag cleared.
template <typename U>
__global__ void __launch_bounds__(kThreads)
restore_rows_kernel(U* w, const U* __restrict__ backup, int64_t rows, int64_t units, uint8_t* saved) {
  const int lane = threadIdx.x & 31;
  const int64_t nwarps = (int64_t(gridDim.x) * blockDim.x) >> 5;
  for (int64_t r = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) >> 5; r < rows; r += nwarps) {
    if (saved[r] == 0) continue;  // uniform across the warp
    U* dst = w + r * units;
    const U* src = backup + r * units;
    for (int64_t c = lane; c < units; c += 32) dst[c] = src[c];
    __syncwarp();  // every lane has read saved[r]
    if (lane == 0) saved[r] = 0;
  }
}

template <typename U>
int restore_launch(void* w, const void* backup, int64_t rows, int64_t row_bytes, uint8_t* saved,
                   cudaStream_t stream) {
  restore_rows_kernel<U><<<grid_for_rows(rows), kThreads, 0, stream>>>(
      static_cast<U*>(w), static_cast<const U*>(backup), rows, row_bytes / int64_t(sizeof(U)), saved);
  return check_launch("fastadv_pgd_restore_rows");
}

}  // namespace
}  // namespace fastadv

// ---- C ABI ---------------------------------------------------------------------------------

using namespace fastadv;

extern "C" FASTADV_API int64_t fastadv_pgd_workspace_floats(int64_t rows, int64_t cols, int sparse) {
  if (rows <= 0 || cols < 0) return 0;
  return 3 * (sparse ? rows : dense_blocks(rows * cols));
}

extern "C" FASTADV_API int fastadv_pgd_step(void* w, const void* g, void* backup, int dtype,
                                            int64_t rows, int64_t cols, uint8_t* mask, uint8_t* saved,
                                            int first, float* workspace, float* coef,
                                            float alpha, float eps, void* stream) {
  static const char* fn = "fastadv_pgd_step";
  if (rows < 0 || cols < 0) return bad_sizes(fn, rows, cols);
  if (coef == nullptr) return fail(int(cudaErrorInvalidValue), "%s: coef is NULL", fn);
  if ((mask == nullptr) != (saved == nullptr))
    return fail(int(cudaErrorInvalidValue),
                "%s: mask and saved must both be given (row-sparse) or both be NULL (dense)", fn);
  return dispatch_dtype(fn, dtype, [&](auto tr) {
    return step_impl<decltype(tr)>(w, g, backup, rows, cols, mask, saved, first != 0, workspace, nullptr,
                                   coef, alpha, eps, kAll, static_cast<cudaStream_t>(stream));
  });
}

extern "C" FASTADV_API int fastadv_pgd_sums(const void* w, const void* g, const void* backup, int dtype,
                                            int64_t rows, int64_t cols, uint8_t* mask, const uint8_t* saved,
                                            int first, float* workspace, float* sums, void* stream) {
  static const char* fn = "fastadv_pgd_sums";
  if (rows < 0 || cols < 0) return bad_sizes(fn, rows, cols);
  if (sums == nullptr) return fail(int(cudaErrorInvalidValue), "%s: sums is NULL", fn);
  if ((mask == nullptr) != (saved == nullptr))
    return fail(int(cudaErrorInvalidValue),
                "%s: mask and saved must both be given (row-sparse) or both be NULL (dense)", fn);
  // kSums reads w, g, backup and saved and writes only mask, workspace and sums
  return dispatch_dtype(fn, dtype, [&](auto tr) {
    return step_impl<decltype(tr)>(const_cast<void*>(w), g, const_cast<void*>(backup), rows, cols, mask,
                                   const_cast<uint8_t*>(saved), first != 0, workspace, sums, nullptr, 0.f, 0.f,
                                   kSums, static_cast<cudaStream_t>(stream));
  });
}

extern "C" FASTADV_API int fastadv_pgd_apply(void* w, const void* g, void* backup, int dtype,
                                             int64_t rows, int64_t cols, uint8_t* mask, uint8_t* saved,
                                             int first, const float* sums, float* coef,
                                             float alpha, float eps, void* stream) {
  static const char* fn = "fastadv_pgd_apply";
  if (rows < 0 || cols < 0) return bad_sizes(fn, rows, cols);
  if (sums == nullptr || coef == nullptr) return fail(int(cudaErrorInvalidValue), "%s: sums or coef is NULL", fn);
  if ((mask == nullptr) != (saved == nullptr))
    return fail(int(cudaErrorInvalidValue),
                "%s: mask and saved must both be given (row-sparse) or both be NULL (dense)", fn);
  return dispatch_dtype(fn, dtype, [&](auto tr) {
    return step_impl<decltype(tr)>(w, g, backup, rows, cols, mask, saved, first != 0, nullptr,
                                   const_cast<float*>(sums), coef, alpha, eps, kApply,
                                   static_cast<cudaStream_t>(stream));
  });
}

extern "C" FASTADV_API int fastadv_pgd_restore_rows(void* w, const void* backup, int dtype,
                                                    int64_t rows, int64_t cols, uint8_t* saved,
                                                    void* stream) {
  static const char* fn = "fastadv_pgd_restore_rows";
  if (rows < 0 || cols < 0) return bad_sizes(fn, rows, cols);
  if (saved == nullptr) return fail(int(cudaErrorInvalidValue), "%s: saved is NULL", fn);
  if (dtype < FASTADV_FLOAT32 || dtype > FASTADV_BFLOAT16) return bad_dtype(fn, dtype);
  if (rows == 0) return 0;  // nothing to copy: no launch (with cols == 0 the flags are still cleared)
  const int64_t row_bytes = cols * (dtype == FASTADV_FLOAT32 ? 4 : 2);
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  // The widest word that divides the row and to which both tables are aligned.
  auto fits = [&](int64_t bytes) {
    return row_bytes % bytes == 0 && aligned_to(w, bytes) && aligned_to(backup, bytes);
  };
  if (fits(16)) return restore_launch<uint4>(w, backup, rows, row_bytes, saved, s);
  if (fits(8)) return restore_launch<uint2>(w, backup, rows, row_bytes, saved, s);
  if (fits(4)) return restore_launch<uint32_t>(w, backup, rows, row_bytes, saved, s);
  return restore_launch<uint16_t>(w, backup, rows, row_bytes, saved, s);
}
