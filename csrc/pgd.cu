// PGD kernels: one reduction (||g||^2, ||r||^2, <r, g>), a one-block finalize
// that turns it into coef = [||g||, ||r'||, step, project] on the device, and
// one fused step + projection pass (dense, or row-sparse with saved-row flags);
// plus the bit-exact restore of the saved rows; and the step over many tensors
// in one call (the end of the anonymous namespace).  The CUDA twin of
// fastadv/kernels/triton/pgd.py: same quantities, same formulas, same rounding
// order.  Contracts in fastadv.h ("embedding PGD").
#include "multi_tensor.cuh"

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

// Block b's share of ||g||^2, ||r||^2, <r, g> (valid in thread 0) when the
// stage-1 grid has `blocks` blocks: the grid-stride order of the per-tensor
// kernel, shared with the multi-tensor one (so both sum in the same order).
// FIRST: w and backup are not read (r = 0).
template <typename Tr, int VEC, bool FIRST>
__device__ __forceinline__ void dense_partial_block(const typename Tr::bits* __restrict__ w,
                                                    const typename Tr::bits* __restrict__ backup,
                                                    const typename Tr::bits* __restrict__ g, int64_t n, int64_t b,
                                                    int64_t blocks, float& gg, float& rr, float& rg) {
  using P = Pack<typename Tr::bits, VEC>;
  const int64_t tid = b * blockDim.x + threadIdx.x;
  const int64_t stride = blocks * blockDim.x;
  const int64_t nvec = n / VEC;
  const P* wv = reinterpret_cast<const P*>(w);
  const P* bv = reinterpret_cast<const P*>(backup);
  const P* gv = reinterpret_cast<const P*>(g);
  gg = 0.f, rr = 0.f, rg = 0.f;
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
}

// part[k * gridDim.x + blockIdx.x], k = 0, 1, 2: this block's share of
// ||g||^2, ||r||^2, <r, g>.
template <typename Tr, int VEC, bool FIRST>
__global__ void __launch_bounds__(kThreads)
partial_dense_kernel(const typename Tr::bits* __restrict__ w, const typename Tr::bits* __restrict__ backup,
                     const typename Tr::bits* __restrict__ g, int64_t n, float* __restrict__ part) {
  float gg, rr, rg;
  dense_partial_block<Tr, VEC, FIRST>(w, backup, g, n, blockIdx.x, gridDim.x, gg, rr, rg);
  if (threadIdx.x == 0) {
    part[blockIdx.x] = gg;
    part[gridDim.x + blockIdx.x] = rr;
    part[2 * int64_t(gridDim.x) + blockIdx.x] = rg;
  }
}

// One row read by one warp (this thread is lane `lane`): the row's ||g||^2,
// ||r||^2, <r, g> (in every lane) and whether it holds a non-zero entry of g
// (NaN / inf included); w and backup are read on a saved row only (r = w - w0
// is zero elsewhere).  Shared by the per-tensor and the multi-tensor row
// kernels; VEC divides cols (the caller's choice); the whole warp calls it.
template <typename Tr, int VEC>
__device__ __forceinline__ bool row_sums(const typename Tr::bits* __restrict__ w_row,
                                         const typename Tr::bits* __restrict__ b_row,
                                         const typename Tr::bits* __restrict__ g_row, int64_t cols, int lane,
                                         bool was_saved, float& gg, float& rr, float& rg) {
  using P = Pack<typename Tr::bits, VEC>;
  const int64_t cv = cols / VEC;
  const P* wr = reinterpret_cast<const P*>(w_row);
  const P* br = reinterpret_cast<const P*>(b_row);
  const P* gr = reinterpret_cast<const P*>(g_row);
  gg = 0.f, rr = 0.f, rg = 0.f;
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
  return __any_sync(kFullMask, nonzero) != 0;
}

// One warp per row: part[r], part[rows + r], part[2 rows + r] = the row's
// ||g||^2, ||r||^2, <r, g>.  Every row of g is read (the norm is over all of
// it): mask[r] is set to 1 iff the row holds a non-zero entry (NaN / inf
// included), else 0 -- which rows carry gradient is read from the gradient.
template <typename Tr, int VEC>
__global__ void __launch_bounds__(kThreads)
partial_rows_kernel(const typename Tr::bits* __restrict__ w, const typename Tr::bits* __restrict__ backup,
                    const typename Tr::bits* __restrict__ g, int64_t rows, int64_t cols, uint8_t* mask,
                    const uint8_t* __restrict__ saved, float* __restrict__ part) {
  const int lane = threadIdx.x & 31;
  const int64_t nwarps = (int64_t(gridDim.x) * blockDim.x) >> 5;
  for (int64_t r = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) >> 5; r < rows; r += nwarps) {
    float gg, rr, rg;
    const bool any_nonzero = row_sums<Tr, VEC>(w + r * cols, backup + r * cols, g + r * cols, cols, lane,
                                               saved[r] != 0, gg, rr, rg);
    if (lane == 0) {
      mask[r] = any_nonzero ? 1 : 0;
      part[r] = gg;
      part[rows + r] = rr;
      part[2 * rows + r] = rg;
    }
  }
}

// ---- finalize ----------------------------------------------------------------------------

// The three sums of the n partials of each quantity (quantity k at part[k *
// stride, + n)), in a fixed order (one block of kFinalizeThreads; the totals
// are valid in thread 0); shared by the finalize and the multi-tensor sum.
__device__ __forceinline__ void sum_partials(const float* __restrict__ part, int64_t n, int64_t stride,
                                             float& gg, float& rr, float& rg) {
  gg = 0.f, rr = 0.f, rg = 0.f;
  for (int64_t i = threadIdx.x; i < n; i += kFinalizeThreads) {
    gg += part[i];
    rr += part[stride + i];
    rg += part[2 * stride + i];
  }
  block_sum3<kFinalizeThreads>(gg, rr, rg);
}

struct Coef {
  float norm_g, norm_r;
  bool step, project;
};

// coef = [||g||, ||r'||, step, project] from the three sums, with s = alpha / ||g|| and
// ||r'||^2 = max(||r||^2 + (2 s) <r, g> + (s s) ||g||^2, 0): the one formula of the
// finalize, shared with the multi-tensor apply.
__device__ __forceinline__ Coef coef_of(float gg, float rr, float rg, float alpha, float eps) {
  const float norm_g = __fsqrt_rn(gg);
  const bool step = norm_g != 0.f && norm_g == norm_g;  // neither 0 nor NaN
  const float s = __fdiv_rn(alpha, norm_g);
  const float sq = __fadd_rn(__fadd_rn(rr, __fmul_rn(__fmul_rn(2.f, s), rg)), __fmul_rn(__fmul_rn(s, s), gg));
  const float norm_r = __fsqrt_rn(fmaxf(sq, 0.f));  // fmaxf(NaN, 0) = 0
  return Coef{norm_g, norm_r, step, step && norm_r > eps};
}

// One block: sums the n partials of each quantity in a fixed order, then
// coef = [||g||, ||r'||, step, project] (coef_of).
__global__ void __launch_bounds__(kFinalizeThreads)
finalize_kernel(const float* __restrict__ part, int64_t n, float* __restrict__ coef, float alpha, float eps) {
  float gg, rr, rg;
  sum_partials(part, n, n, gg, rr, rg);
  if (threadIdx.x == 0) {
    const Coef cf = coef_of(gg, rr, rg, alpha, eps);
    coef[0] = cf.norm_g;
    coef[1] = cf.norm_r;
    coef[2] = cf.step ? 1.f : 0.f;
    coef[3] = cf.project ? 1.f : 0.f;
  }
}

// The reduction half of finalize_kernel, for FSDP2 shards: out[0..2] = the
// three sums of the n partials (same order), which the caller all_reduces
// across the shards before finalize_kernel reads them back as n = 1 partials.
__global__ void __launch_bounds__(kFinalizeThreads)
sum_parts_kernel(const float* __restrict__ part, int64_t n, float* __restrict__ out) {
  float gg, rr, rg;
  sum_partials(part, n, n, gg, rr, rg);
  if (threadIdx.x == 0) {
    out[0] = gg;
    out[1] = rr;
    out[2] = rg;
  }
}

// ---- update ------------------------------------------------------------------------------

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

// One visited row (marked or saved) by one warp (this thread is lane `lane`),
// the step taken: backed up on its first perturbation (not saved yet), g read
// on a marked row only (zero elsewhere); shared by the per-tensor and the
// multi-tensor row kernels.  VEC divides cols and the rows are aligned to it.
template <typename Tr, int VEC>
__device__ __forceinline__ void update_row(typename Tr::bits* w_row, const typename Tr::bits* __restrict__ g_row,
                                           typename Tr::bits* __restrict__ b_row, int64_t cols, int lane,
                                           bool marked, bool was_saved, float alpha, float eps, const Coef& cf) {
  using P = Pack<typename Tr::bits, VEC>;
  const int64_t cv = cols / VEC;
  P* wr = reinterpret_cast<P*>(w_row);
  P* br = reinterpret_cast<P*>(b_row);
  const P* gr = reinterpret_cast<const P*>(g_row);
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
}

// One warp per row visited (marked or saved), when the step is taken
// (update_row); the row is marked saved afterwards.
template <typename Tr, int VEC>
__global__ void __launch_bounds__(kThreads)
update_rows_kernel(typename Tr::bits* w, const typename Tr::bits* __restrict__ g,
                   typename Tr::bits* __restrict__ backup, int64_t rows, int64_t cols,
                   const uint8_t* __restrict__ mask, uint8_t* saved, const float* __restrict__ coef,
                   float alpha, float eps) {
  const Coef cf = load_coef(coef);
  if (!cf.step) return;
  const int lane = threadIdx.x & 31;
  const int64_t nwarps = (int64_t(gridDim.x) * blockDim.x) >> 5;
  for (int64_t r = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) >> 5; r < rows; r += nwarps) {
    const bool marked = mask[r] != 0;
    const bool was_saved = saved[r] != 0;
    if (!marked && !was_saved) continue;  // uniform across the warp
    update_row<Tr, VEC>(w + r * cols, g + r * cols, backup + r * cols, cols, lane, marked, was_saved, alpha, eps, cf);
    __syncwarp();  // every lane has read saved[r]
    if (lane == 0) saved[r] = 1;
  }
}

// ---- passes ------------------------------------------------------------------------------

// Which part of a step one call runs: all of it, or the reduction into `sums`
// only (fastadv_pgd_sums; the multi-tensor apply finalizes from such sums).
enum Phase { kAll, kSums };

// Reduction and finalize as the phase asks; returns 0 or an error, and sets
// *done when nothing is left to launch (kSums).
inline int reduce_phase(Phase phase, int64_t parts, const float* workspace, float* sums, float* coef,
                        float alpha, float eps, cudaStream_t stream, bool* done) {
  *done = phase == kSums;
  if (phase == kSums) {
    sum_parts_kernel<<<1, kFinalizeThreads, 0, stream>>>(workspace, parts, sums);
    return check_launch("fastadv_pgd_sums (sum of the partials)");
  }
  finalize_kernel<<<1, kFinalizeThreads, 0, stream>>>(workspace, parts, coef, alpha, eps);
  return check_launch("fastadv_pgd_step (finalize)");
}

template <typename Tr, int VEC, bool FIRST>
int dense_step(typename Tr::bits* w, const typename Tr::bits* g, typename Tr::bits* backup, int64_t n,
               int64_t parts, float* workspace, float* sums, float* coef, float alpha, float eps, Phase phase,
               cudaStream_t stream) {
  if (parts > 0) {
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
  if (rows > 0) {
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
    if (parts > 0 && workspace == nullptr)
      return fail(int(cudaErrorInvalidValue), "fastadv_pgd_step: workspace is NULL");
    if (vec)
      return first ? dense_step<Tr, V, true>(w, g, backup, n, parts, workspace, sums, coef, alpha, eps, phase, stream)
                   : dense_step<Tr, V, false>(w, g, backup, n, parts, workspace, sums, coef, alpha, eps, phase, stream);
    return first ? dense_step<Tr, 1, true>(w, g, backup, n, parts, workspace, sums, coef, alpha, eps, phase, stream)
                 : dense_step<Tr, 1, false>(w, g, backup, n, parts, workspace, sums, coef, alpha, eps, phase, stream);
  }
  if (rows > 0 && workspace == nullptr)
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

// ---- many tensors in one call (fastadv/kernels/cuda/pgd.py pgd_sums_many / pgd_apply_many) ----
//
// Per group of tensors (dtype, mode, dense first step) one partials launch and one apply launch
// over a work table (dense: lists w, g, b; rows: lists mask, saved, w, g, b, chunks of rows,
// list 0's numel the row count), one sum launch for the whole call: 2 x groups + 1 launches.
// Each block runs the per-tensor kernels' helpers on the same data with the same vector width
// (the per-tensor launcher's alignment test, per tensor), so a tensor's three sums are bitwise
// those of fastadv_pgd_sums, and its step (coef_of on them, fused into the update) that of
// fastadv_pgd_step.  Partials: [3][n_parts].

using mt::Chunk;
using mt::GroupPlan;
using mt::Table;

template <typename B>
__device__ __forceinline__ bool aligned3(const B* w, const B* g, const B* b) {
  return mt::aligned(w, 16) && mt::aligned(g, 16) && mt::aligned(b, 16);
}

// Dense stage 1: block j is stage-1 block `index` of its tensor's per-tensor launch.
template <typename Tr, bool FIRST>
__global__ void __launch_bounds__(kThreads)
mt_partial_dense_kernel(Table tb, GroupPlan gp, int64_t n_parts, float* __restrict__ part) {
  using B = typename Tr::bits;
  const mt::DenseBlock d = mt::dense_block_of(gp, blockIdx.x);
  const B* w = tb.ptr<const B>(0, d.tensor);
  const B* g = tb.ptr<const B>(1, d.tensor);
  const B* b = tb.ptr<const B>(2, d.tensor);
  const int64_t n = tb.numel(d.tensor);
  float gg, rr, rg;
  if (aligned3(w, g, b))  // fastadv_pgd_step's choice
    dense_partial_block<Tr, kVec<B>, FIRST>(w, b, g, n, d.index, d.blocks, gg, rr, rg);
  else
    dense_partial_block<Tr, 1, FIRST>(w, b, g, n, d.index, d.blocks, gg, rr, rg);
  if (threadIdx.x == 0) {
    const int64_t at = gp.first_part(d.tensor) + d.index;
    part[at] = gg;
    part[n_parts + at] = rr;
    part[2 * n_parts + at] = rg;
  }
}

// Row stage 1 on the chunk's rows, one warp per row (partials at the tensor's first + r).
template <typename Tr>
__global__ void __launch_bounds__(kThreads)
mt_partial_rows_kernel(Table tb, GroupPlan gp, int64_t n_parts, float* __restrict__ part) {
  using B = typename Tr::bits;
  const Chunk k = mt::chunk_of(tb, blockIdx.x);
  uint8_t* mask = tb.ptr<uint8_t>(0, k.tensor);
  const uint8_t* saved = tb.ptr<const uint8_t>(1, k.tensor);
  const B* w = tb.ptr<const B>(2, k.tensor);
  const B* g = tb.ptr<const B>(3, k.tensor);
  const B* b = tb.ptr<const B>(4, k.tensor);
  const int64_t cols = gp.cols(k.tensor);
  const int64_t first = gp.first_part(k.tensor);
  const bool vec = aligned3(w, g, b) && cols % kVec<B> == 0;  // fastadv_pgd_step's choice
  const int lane = threadIdx.x & 31;
  for (int64_t r = k.start + (threadIdx.x >> 5); r < k.end; r += kWarpsPerBlock) {  // warp-uniform
    float gg, rr, rg;
    const int64_t at = r * cols;
    const bool was_saved = saved[r] != 0;
    const bool any_nonzero = vec ? row_sums<Tr, kVec<B>>(w + at, b + at, g + at, cols, lane, was_saved, gg, rr, rg)
                                 : row_sums<Tr, 1>(w + at, b + at, g + at, cols, lane, was_saved, gg, rr, rg);
    if (lane == 0) {
      mask[r] = any_nonzero ? 1 : 0;
      part[first + r] = gg;
      part[n_parts + first + r] = rr;
      part[2 * n_parts + first + r] = rg;
    }
  }
}

// Block i: sums[3 slot_i + k] = tensor i's partials [P_i, P_{i+1}) of quantity k, summed as the
// finalize sums them; an empty tensor gets zeros.
__global__ void __launch_bounds__(kFinalizeThreads)
mt_sum_kernel(const int64_t* __restrict__ plan, int64_t tensors, const float* __restrict__ part, int64_t n_parts,
              float* __restrict__ sums) {
  const int64_t i = blockIdx.x;
  const int64_t lo = plan[i], hi = plan[i + 1];
  float gg, rr, rg;
  sum_partials(part + lo, hi - lo, n_parts, gg, rr, rg);
  if (threadIdx.x == 0) {
    float* out = sums + 3 * plan[tensors + 1 + i];
    out[0] = gg;
    out[1] = rr;
    out[2] = rg;
  }
}

// The finalize of tensor t from its (all-reduced) slot of sums.
__device__ __forceinline__ Coef slot_coef(const GroupPlan& gp, int64_t t, const float* __restrict__ sums,
                                          float alpha, float eps) {
  const float* s = sums + 3 * gp.slot(t);
  return coef_of(s[0], s[1], s[2], alpha, eps);
}

// Finalize + the dense update on one chunk.  FIRST: backup <- w (always), w0 = w.
template <typename Tr, bool FIRST>
__global__ void __launch_bounds__(kThreads)
mt_apply_dense_kernel(Table tb, GroupPlan gp, const float* __restrict__ sums, float alpha, float eps) {
  using B = typename Tr::bits;
  const Chunk k = mt::chunk_of(tb, blockIdx.x);
  const Coef cf = slot_coef(gp, k.tensor, sums, alpha, eps);
  if (!FIRST && !cf.step) return;
  B* w = tb.ptr<B>(0, k.tensor);
  const B* g = tb.ptr<const B>(1, k.tensor);
  B* b = tb.ptr<B>(2, k.tensor);
  mt::chunk_loop<kVec<B>>(k, mt::chunk_aligned16(k, w, g, b), [&](auto width, int64_t i) {
    constexpr int N = decltype(width)::value;
    auto pw = mt::load<B, N>(w, i);
    Pack<B, N> pb;
    if (FIRST) {
      mt::store<B, N>(b, i, pw);
      pb = pw;
    } else {
      pb = mt::load<B, N>(b, i);
    }
    if (cf.step) {
      const auto pg = mt::load<B, N>(g, i);
#pragma unroll
      for (int j = 0; j < N; ++j)
        pw.v[j] = Tr::from_float(stepped(Tr::to_float(pw.v[j]), Tr::to_float(pb.v[j]), Tr::to_float(pg.v[j]),
                                         alpha, eps, cf));
      mt::store<B, N>(w, i, pw);
    }
  });
}

// Finalize + the row update on the chunk's rows, one warp per visited row.
template <typename Tr>
__global__ void __launch_bounds__(kThreads)
mt_apply_rows_kernel(Table tb, GroupPlan gp, const float* __restrict__ sums, float alpha, float eps) {
  using B = typename Tr::bits;
  const Chunk k = mt::chunk_of(tb, blockIdx.x);
  const Coef cf = slot_coef(gp, k.tensor, sums, alpha, eps);
  if (!cf.step) return;
  const uint8_t* mask = tb.ptr<const uint8_t>(0, k.tensor);
  uint8_t* saved = tb.ptr<uint8_t>(1, k.tensor);
  B* w = tb.ptr<B>(2, k.tensor);
  const B* g = tb.ptr<const B>(3, k.tensor);
  B* b = tb.ptr<B>(4, k.tensor);
  const int64_t cols = gp.cols(k.tensor);
  const bool vec = aligned3(w, g, b) && cols % kVec<B> == 0;
  const int lane = threadIdx.x & 31;
  for (int64_t r = k.start + (threadIdx.x >> 5); r < k.end; r += kWarpsPerBlock) {
    const bool marked = mask[r] != 0;
    const bool was_saved = saved[r] != 0;
    if (!marked && !was_saved) continue;  // uniform across the warp
    const int64_t at = r * cols;
    if (vec)
      update_row<Tr, kVec<B>>(w + at, g + at, b + at, cols, lane, marked, was_saved, alpha, eps, cf);
    else
      update_row<Tr, 1>(w + at, g + at, b + at, cols, lane, marked, was_saved, alpha, eps, cf);
    __syncwarp();  // every lane has read saved[r]
    if (lane == 0) saved[r] = 1;
  }
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

// ---- many tensors --------------------------------------------------------------------------

extern "C" FASTADV_API int fastadv_pgd_mt_partials(const int64_t* table, int lists, int64_t tensors,
                                                   int64_t chunks, int64_t chunk, int dtype, int by_rows, int first,
                                                   const int64_t* group_plan, int64_t blocks, int64_t n_parts,
                                                   float* partials, void* stream) {
  static const char* fn = "fastadv_pgd_mt_partials";
  if (int e = mt::check_group(fn, table, lists, by_rows ? 5 : 3, tensors, chunks, chunk, group_plan, partials,
                              "partials"))
    return e;
  if (blocks < 0 || n_parts < 0)
    return fail(int(cudaErrorInvalidValue), "%s: negative size blocks=%lld n_parts=%lld", fn, (long long)blocks,
                (long long)n_parts);
  const int64_t grid = by_rows ? chunks : blocks;
  if (tensors == 0 || grid == 0) return 0;
  const Table tb = mt::make_table(table, lists, tensors, chunk);
  const GroupPlan gp{group_plan, tensors};
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  return dispatch_dtype(fn, dtype, [&](auto tr) {
    using Tr = decltype(tr);
    if (by_rows)
      mt_partial_rows_kernel<Tr><<<unsigned(grid), kThreads, 0, s>>>(tb, gp, n_parts, partials);
    else if (first)
      mt_partial_dense_kernel<Tr, true><<<unsigned(grid), kThreads, 0, s>>>(tb, gp, n_parts, partials);
    else
      mt_partial_dense_kernel<Tr, false><<<unsigned(grid), kThreads, 0, s>>>(tb, gp, n_parts, partials);
    return check_launch(fn);
  });
}

extern "C" FASTADV_API int fastadv_pgd_mt_sum(const int64_t* plan, int64_t tensors, const float* partials,
                                              int64_t n_parts, float* sums, void* stream) {
  static const char* fn = "fastadv_pgd_mt_sum";
  if (int e = mt::check_sum(fn, plan, tensors, partials, sums)) return e;
  if (n_parts < 0) return fail(int(cudaErrorInvalidValue), "%s: negative n_parts %lld", fn, (long long)n_parts);
  if (tensors == 0) return 0;
  mt_sum_kernel<<<unsigned(tensors), kFinalizeThreads, 0, static_cast<cudaStream_t>(stream)>>>(
      plan, tensors, partials, n_parts, sums);
  return check_launch(fn);
}

extern "C" FASTADV_API int fastadv_pgd_mt_apply(const int64_t* table, int lists, int64_t tensors, int64_t chunks,
                                                int64_t chunk, int dtype, int by_rows, int first,
                                                const int64_t* group_plan, const float* sums, float alpha, float eps,
                                                void* stream) {
  static const char* fn = "fastadv_pgd_mt_apply";
  if (int e = mt::check_group(fn, table, lists, by_rows ? 5 : 3, tensors, chunks, chunk, group_plan, sums, "sums"))
    return e;
  if (tensors == 0 || chunks == 0) return 0;
  const Table tb = mt::make_table(table, lists, tensors, chunk);
  const GroupPlan gp{group_plan, tensors};
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  return dispatch_dtype(fn, dtype, [&](auto tr) {
    using Tr = decltype(tr);
    if (by_rows)
      mt_apply_rows_kernel<Tr><<<unsigned(chunks), kThreads, 0, s>>>(tb, gp, sums, alpha, eps);
    else if (first)
      mt_apply_dense_kernel<Tr, true><<<unsigned(chunks), kThreads, 0, s>>>(tb, gp, sums, alpha, eps);
    else
      mt_apply_dense_kernel<Tr, false><<<unsigned(chunks), kThreads, 0, s>>>(tb, gp, sums, alpha, eps);
    return check_launch(fn);
  });
}
