// FGM kernels: the deterministic gradient norm (dense or row-sparse), the
// fused backup + update, and the bit-exact restore of touched rows; and the
// same passes over many tensors in one call (the end of the anonymous
// namespace: FSDP2 shards and several unsharded tables).
// See docs/ARCHITECTURE.md ("FGM kernels") and fastadv.h for the contracts.
#include "multi_tensor.cuh"

namespace fastadv {
namespace {

// ---- norm ----------------------------------------------------------------------

constexpr int64_t kNormElemsPerBlock = 8192;  // at least this much work per block
constexpr int64_t kNormMaxBlocks = 1024;      // partials the finalize sums
constexpr int kFinalizeThreads = 1024;

// Stage-1 blocks (= partials) for n dense elements; a function of n only, so
// the reduction order, and so the result, never depends on the device.
int64_t dense_norm_blocks(int64_t n) {
  if (n <= 0) return 0;
  int64_t b = ceil_div(n, kNormElemsPerBlock);
  return b < kNormMaxBlocks ? b : kNormMaxBlocks;
}

// The fp32 sum of squares (valid in thread 0) of block b's share of g when the
// stage-1 grid has `blocks` blocks: the grid-stride order of the per-tensor
// kernel, shared with the multi-tensor one (so both sum in the same order).
template <typename Tr, int VEC>
__device__ __forceinline__ float sumsq_dense_block(const typename Tr::bits* __restrict__ g, int64_t n,
                                                   int64_t b, int64_t blocks) {
  using P = Pack<typename Tr::bits, VEC>;
  const int64_t tid = b * blockDim.x + threadIdx.x;
  const int64_t stride = blocks * blockDim.x;
  const int64_t nvec = n / VEC;
  const P* gv = reinterpret_cast<const P*>(g);
  float acc = 0.f;
  for (int64_t i = tid; i < nvec; i += stride) {
    const P p = gv[i];
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      const float x = Tr::to_float(p.v[k]);
      acc = fmaf(x, x, acc);
    }
  }
  for (int64_t i = nvec * VEC + tid; i < n; i += stride) {  // tail (< VEC elements)
    const float x = Tr::to_float(g[i]);
    acc = fmaf(x, x, acc);
  }
  return block_sum<kThreads>(acc);
}

// partials[blockIdx.x] = fp32 sum of squares of this block's share of g.
template <typename Tr, int VEC>
__global__ void __launch_bounds__(kThreads)
sumsq_dense_kernel(const typename Tr::bits* __restrict__ g, int64_t n, float* __restrict__ partials) {
  const float s = sumsq_dense_block<Tr, VEC>(g, n, blockIdx.x, gridDim.x);
  if (threadIdx.x == 0) partials[blockIdx.x] = s;
}

// One row of g read by one warp (this thread is lane `lane`): the row's sum of
// squares (in every lane) and whether it holds an entry that is not zero (NaN
// and inf included); shared by the per-tensor and the multi-tensor row kernels.
// VEC divides cols (the caller's choice); the whole warp calls it.
template <typename Tr, int VEC>
__device__ __forceinline__ float row_sumsq(const typename Tr::bits* __restrict__ g_row, int64_t cols, int lane,
                                           bool* any_nonzero) {
  using P = Pack<typename Tr::bits, VEC>;
  const P* row = reinterpret_cast<const P*>(g_row);
  const int64_t cv = cols / VEC;
  float acc = 0.f;
  bool nonzero = false;
  for (int64_t c = lane; c < cv; c += 32) {
    const P p = row[c];
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      const float x = Tr::to_float(p.v[k]);
      acc = fmaf(x, x, acc);
      nonzero |= (x != 0.f);  // NaN counts as non-zero; tiny values whose square underflows too
    }
  }
  *any_nonzero = __any_sync(0xffffffffu, nonzero);
  return warp_sum(acc);
}

// One warp per row: partials[r] = the row's sum of squares, and rows[r] = 1
// iff the row holds an entry that is not zero (NaN and inf included), else 0.
// Every row is read: which rows carry gradient is read from the gradient.
template <typename Tr, int VEC>
__global__ void __launch_bounds__(kThreads)
sumsq_rows_kernel(const typename Tr::bits* __restrict__ g, int64_t rows, int64_t cols,
                  uint8_t* __restrict__ flags, float* __restrict__ partials) {
  const int lane = threadIdx.x & 31;
  const int64_t nwarps = (int64_t(gridDim.x) * blockDim.x) >> 5;
  // The loop over rows is warp-uniform, so the whole warp votes in row_sumsq.
  for (int64_t r = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) >> 5; r < rows; r += nwarps) {
    bool nonzero;
    const float acc = row_sumsq<Tr, VEC>(g + r * cols, cols, lane, &nonzero);
    if (lane == 0) {
      partials[r] = acc;
      flags[r] = nonzero ? 1 : 0;  // the same rule as the Triton kernel
    }
  }
}

// The sum of partials[0, n) in a fixed order (one block of kFinalizeThreads;
// valid in thread 0): the finalize's, shared with the multi-tensor sum.
__device__ __forceinline__ float sum_partials(const float* __restrict__ partials, int64_t n) {
  float acc = 0.f;
  for (int64_t i = threadIdx.x; i < n; i += kFinalizeThreads) acc += partials[i];
  return block_sum<kFinalizeThreads>(acc);
}

// One block: *out = sqrt(sum of partials), summed in a fixed order.
__global__ void __launch_bounds__(kFinalizeThreads)
finalize_norm_kernel(const float* __restrict__ partials, int64_t n, float* __restrict__ out) {
  const float s = sum_partials(partials, n);
  if (threadIdx.x == 0) *out = sqrtf(s);
}

template <typename Tr>
int norm_impl(const void* g_, int64_t rows, int64_t cols, uint8_t* flags, float* workspace,
              float* norm_out, cudaStream_t stream) {
  using B = typename Tr::bits;
  constexpr int V = kVec<B>;
  const B* g = static_cast<const B*>(g_);
  int64_t parts = 0;
  if (flags == nullptr) {
    const int64_t n = rows * cols;
    parts = dense_norm_blocks(n);
    if (parts > 0) {
      if (aligned_to(g, 16))
        sumsq_dense_kernel<Tr, V><<<unsigned(parts), kThreads, 0, stream>>>(g, n, workspace);
      else
        sumsq_dense_kernel<Tr, 1><<<unsigned(parts), kThreads, 0, stream>>>(g, n, workspace);
      if (int e = check_launch("fastadv_fgm_norm (dense partial sums)")) return e;
    }
  } else {
    parts = rows;
    if (rows > 0) {
      const unsigned grid = grid_for_rows(rows);
      if (aligned_to(g, 16) && cols % V == 0)
        sumsq_rows_kernel<Tr, V><<<grid, kThreads, 0, stream>>>(g, rows, cols, flags, workspace);
      else
        sumsq_rows_kernel<Tr, 1><<<grid, kThreads, 0, stream>>>(g, rows, cols, flags, workspace);
      if (int e = check_launch("fastadv_fgm_norm (row partial sums)")) return e;
    }
  }
  finalize_norm_kernel<<<1, kFinalizeThreads, 0, stream>>>(workspace, parts, norm_out);
  return check_launch("fastadv_fgm_norm (finalize)");
}

// ---- update ----------------------------------------------------------------------

// The reference's order, (eps * g) / norm, then w + r: fp32, IEEE rounding,
// rounded once to the storage dtype.
template <typename Tr>
__device__ __forceinline__ typename Tr::bits fgm_step(typename Tr::bits w, typename Tr::bits g,
                                                      float eps, float norm) {
  const float r = __fdiv_rn(__fmul_rn(eps, Tr::to_float(g)), norm);
  return Tr::from_float(__fadd_rn(Tr::to_float(w), r));
}

__device__ __forceinline__ bool norm_is_valid(float norm) { return norm != 0.f && !isnan(norm); }

template <typename Tr, int VEC>
__global__ void __launch_bounds__(kThreads)
update_dense_kernel(typename Tr::bits* w, const typename Tr::bits* __restrict__ g,
                    typename Tr::bits* __restrict__ backup, int64_t n, const float* __restrict__ norm_p,
                    float eps) {
  using P = Pack<typename Tr::bits, VEC>;
  const float norm = *norm_p;
  const bool valid = norm_is_valid(norm);
  const int64_t tid = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  const int64_t nvec = n / VEC;
  P* wv = reinterpret_cast<P*>(w);
  const P* gv = reinterpret_cast<const P*>(g);
  P* bv = reinterpret_cast<P*>(backup);
  for (int64_t i = tid; i < nvec; i += stride) {
    P pw = wv[i];
    bv[i] = pw;
    if (valid) {
      const P pg = gv[i];
#pragma unroll
      for (int k = 0; k < VEC; ++k) pw.v[k] = fgm_step<Tr>(pw.v[k], pg.v[k], eps, norm);
      wv[i] = pw;
    }
  }
  for (int64_t i = nvec * VEC + tid; i < n; i += stride) {  // tail (< VEC elements)
    const auto x = w[i];
    backup[i] = x;
    if (valid) w[i] = fgm_step<Tr>(x, g[i], eps, norm);
  }
}

// One flagged row, by one warp (this thread is lane `lane`): backed up and,
// for a usable norm, perturbed; shared by the per-tensor and the multi-tensor
// row kernels.  VEC divides cols and the three rows are aligned to it.
template <typename Tr, int VEC>
__device__ __forceinline__ void update_row(typename Tr::bits* w_row, const typename Tr::bits* __restrict__ g_row,
                                           typename Tr::bits* __restrict__ b_row, int64_t cols, int lane,
                                           bool valid, float norm, float eps) {
  using P = Pack<typename Tr::bits, VEC>;
  P* wr = reinterpret_cast<P*>(w_row);
  const P* gr = reinterpret_cast<const P*>(g_row);
  P* br = reinterpret_cast<P*>(b_row);
  const int64_t cv = cols / VEC;
  for (int64_t c = lane; c < cv; c += 32) {
    P pw = wr[c];
    br[c] = pw;
    if (valid) {
      const P pg = gr[c];
#pragma unroll
      for (int k = 0; k < VEC; ++k) pw.v[k] = fgm_step<Tr>(pw.v[k], pg.v[k], eps, norm);
      wr[c] = pw;
    }
  }
}

// One warp per row; rows flagged by the norm pass only.  The backup is
// full-size: row r is saved at row r.
template <typename Tr, int VEC>
__global__ void __launch_bounds__(kThreads)
update_rows_kernel(typename Tr::bits* w, const typename Tr::bits* __restrict__ g,
                   typename Tr::bits* __restrict__ backup, int64_t rows, int64_t cols,
                   const uint8_t* __restrict__ flags, const float* __restrict__ norm_p, float eps) {
  const float norm = *norm_p;
  const bool valid = norm_is_valid(norm);
  const int lane = threadIdx.x & 31;
  const int64_t nwarps = (int64_t(gridDim.x) * blockDim.x) >> 5;
  for (int64_t r = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) >> 5; r < rows; r += nwarps) {
    if (flags[r] == 0) continue;
    update_row<Tr, VEC>(w + r * cols, g + r * cols, backup + r * cols, cols, lane, valid, norm, eps);
  }
}

template <typename Tr>
int update_impl(void* w_, const void* g_, void* backup_, int64_t rows, int64_t cols,
                const uint8_t* flags, const float* norm, float eps, cudaStream_t stream) {
  using B = typename Tr::bits;
  constexpr int V = kVec<B>;
  B* w = static_cast<B*>(w_);
  const B* g = static_cast<const B*>(g_);
  B* backup = static_cast<B*>(backup_);
  const int64_t n = rows * cols;
  if (n == 0) return 0;  // nothing to touch: no launch
  const bool vec = aligned_to(w, 16) && aligned_to(g, 16) && aligned_to(backup, 16);
  if (flags == nullptr) {
    if (vec) {
      update_dense_kernel<Tr, V><<<grid_for(ceil_div(n, V)), kThreads, 0, stream>>>(w, g, backup, n, norm, eps);
    } else {
      update_dense_kernel<Tr, 1><<<grid_for(n), kThreads, 0, stream>>>(w, g, backup, n, norm, eps);
    }
    return check_launch("fastadv_fgm_update (dense)");
  }
  const unsigned grid = grid_for_rows(rows);
  if (vec && cols % V == 0)
    update_rows_kernel<Tr, V><<<grid, kThreads, 0, stream>>>(w, g, backup, rows, cols, flags, norm, eps);
  else
    update_rows_kernel<Tr, 1><<<grid, kThreads, 0, stream>>>(w, g, backup, rows, cols, flags, norm, eps);
  return check_launch("fastadv_fgm_update (rows)");
}

// ---- restore -----------------------------------------------------------------------

// One warp per flagged row; the row is copied as `units` raw words of type U.
template <typename U>
__global__ void __launch_bounds__(kThreads)
restore_rows_kernel(U* w, const U* __restrict__ backup, int64_t rows, int64_t units,
                    const uint8_t* __restrict__ flags) {
  const int lane = threadIdx.x & 31;
  const int64_t nwarps = (int64_t(gridDim.x) * blockDim.x) >> 5;
  for (int64_t r = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) >> 5; r < rows; r += nwarps) {
    if (flags[r] == 0) continue;
    U* dst = w + r * units;
    const U* src = backup + r * units;
    for (int64_t c = lane; c < units; c += 32) dst[c] = src[c];
  }
}

template <typename U>
int restore_launch(void* w, const void* backup, int64_t rows, int64_t row_bytes,
                   const uint8_t* flags, cudaStream_t stream) {
  restore_rows_kernel<U><<<grid_for_rows(rows), kThreads, 0, stream>>>(
      static_cast<U*>(w), static_cast<const U*>(backup), rows, row_bytes / int64_t(sizeof(U)), flags);
  return check_launch("fastadv_fgm_restore_rows");
}

// ---- many tensors in one call (fastadv/kernels/cuda/fgm.py fgm_sq_many / fgm_update_many) ----
//
// Per group of tensors (dtype, mode) one partials launch and one update launch over a work
// table (dense: lists w, g, b; rows: lists flags, w, g, b, chunks of rows, list 0's numel the
// row count), and one sum launch for the whole call: 2 x groups + 1 launches.  Each block
// runs the per-tensor kernels' helpers on the same data with the same vector width (the
// per-tensor launchers' alignment tests, per tensor): a tensor's partials, and so its sum,
// are bitwise those of fastadv_fgm_norm (without the sqrt), and its update that of
// fastadv_fgm_update.

using mt::Chunk;
using mt::GroupPlan;
using mt::Table;

// Dense stage 1: block j is stage-1 block `index` of its tensor's per-tensor launch.
template <typename Tr>
__global__ void __launch_bounds__(kThreads)
mt_sumsq_dense_kernel(Table tb, GroupPlan gp, float* __restrict__ partials) {
  using B = typename Tr::bits;
  const mt::DenseBlock d = mt::dense_block_of(gp, blockIdx.x);
  const B* g = tb.ptr<const B>(1, d.tensor);
  const int64_t n = tb.numel(d.tensor);
  const float s = mt::aligned(g, 16) ? sumsq_dense_block<Tr, kVec<B>>(g, n, d.index, d.blocks)
                                    : sumsq_dense_block<Tr, 1>(g, n, d.index, d.blocks);
  if (threadIdx.x == 0) partials[gp.first_part(d.tensor) + d.index] = s;
}

// Row stage 1 on the chunk's rows, one warp per row (partial r at the tensor's first + r).
template <typename Tr>
__global__ void __launch_bounds__(kThreads)
mt_sumsq_rows_kernel(Table tb, GroupPlan gp, float* __restrict__ partials) {
  using B = typename Tr::bits;
  const Chunk k = mt::chunk_of(tb, blockIdx.x);
  uint8_t* flags = tb.ptr<uint8_t>(0, k.tensor);
  const B* g = tb.ptr<const B>(2, k.tensor);
  const int64_t cols = gp.cols(k.tensor);
  float* part = partials + gp.first_part(k.tensor);
  const bool vec = mt::aligned(g, 16) && cols % kVec<B> == 0;  // fastadv_fgm_norm's choice
  const int lane = threadIdx.x & 31;
  for (int64_t r = k.start + (threadIdx.x >> 5); r < k.end; r += kWarpsPerBlock) {  // warp-uniform
    bool nonzero;
    const float acc = vec ? row_sumsq<Tr, kVec<B>>(g + r * cols, cols, lane, &nonzero)
                          : row_sumsq<Tr, 1>(g + r * cols, cols, lane, &nonzero);
    if (lane == 0) {
      part[r] = acc;
      flags[r] = nonzero ? 1 : 0;
    }
  }
}

// Block i: out[slot_i] = tensor i's partials [P_i, P_{i+1}) summed as the finalize sums them
// (no sqrt: the caller all_reduces the squares first); an empty tensor gets 0.
__global__ void __launch_bounds__(kFinalizeThreads)
mt_sum_kernel(const int64_t* __restrict__ plan, int64_t tensors, const float* __restrict__ partials,
              float* __restrict__ out) {
  const int64_t i = blockIdx.x;
  const int64_t lo = plan[i], hi = plan[i + 1];
  const float s = sum_partials(partials + lo, hi - lo);
  if (threadIdx.x == 0) out[plan[tensors + 1 + i]] = s;
}

// fastadv_fgm_update (dense) on one chunk, with the norm of the tensor's slot.
template <typename Tr>
__global__ void __launch_bounds__(kThreads)
mt_update_dense_kernel(Table tb, GroupPlan gp, const float* __restrict__ norms, float eps) {
  using B = typename Tr::bits;
  const Chunk k = mt::chunk_of(tb, blockIdx.x);
  const float norm = norms[gp.slot(k.tensor)];
  const bool valid = norm_is_valid(norm);
  B* w = tb.ptr<B>(0, k.tensor);
  const B* g = tb.ptr<const B>(1, k.tensor);
  B* b = tb.ptr<B>(2, k.tensor);
  mt::chunk_loop<kVec<B>>(k, mt::chunk_aligned16(k, w, g, b), [&](auto width, int64_t i) {
    constexpr int N = decltype(width)::value;
    auto pw = mt::load<B, N>(w, i);
    mt::store<B, N>(b, i, pw);
    if (valid) {
      const auto pg = mt::load<B, N>(g, i);
#pragma unroll
      for (int j = 0; j < N; ++j) pw.v[j] = fgm_step<Tr>(pw.v[j], pg.v[j], eps, norm);
      mt::store<B, N>(w, i, pw);
    }
  });
}

// fastadv_fgm_update (rows) on the chunk's rows, one warp per flagged row.
template <typename Tr>
__global__ void __launch_bounds__(kThreads)
mt_update_rows_kernel(Table tb, GroupPlan gp, const float* __restrict__ norms, float eps) {
  using B = typename Tr::bits;
  const Chunk k = mt::chunk_of(tb, blockIdx.x);
  const float norm = norms[gp.slot(k.tensor)];
  const bool valid = norm_is_valid(norm);
  const uint8_t* flags = tb.ptr<const uint8_t>(0, k.tensor);
  B* w = tb.ptr<B>(1, k.tensor);
  const B* g = tb.ptr<const B>(2, k.tensor);
  B* b = tb.ptr<B>(3, k.tensor);
  const int64_t cols = gp.cols(k.tensor);
  const bool vec = mt::aligned(w, 16) && mt::aligned(g, 16) && mt::aligned(b, 16) && cols % kVec<B> == 0;
  const int lane = threadIdx.x & 31;
  for (int64_t r = k.start + (threadIdx.x >> 5); r < k.end; r += kWarpsPerBlock) {
    if (flags[r] == 0) continue;  // uniform across the warp
    if (vec)
      update_row<Tr, kVec<B>>(w + r * cols, g + r * cols, b + r * cols, cols, lane, valid, norm, eps);
    else
      update_row<Tr, 1>(w + r * cols, g + r * cols, b + r * cols, cols, lane, valid, norm, eps);
  }
}

}  // namespace
}  // namespace fastadv

// ---- C ABI ------------------------------------------------------------------------
// fastadv_last_error and fastadv_abi_version belong to the whole library; they
// are defined here, in the library's first translation unit.

using namespace fastadv;

extern "C" FASTADV_API const char* fastadv_last_error(void) { return g_last_error; }

extern "C" FASTADV_API int fastadv_abi_version(void) { return FASTADV_ABI_VERSION; }

extern "C" FASTADV_API int64_t fastadv_fgm_workspace_floats(int64_t rows, int64_t cols, int sparse) {
  if (rows <= 0 || cols < 0) return 0;
  return sparse ? rows : dense_norm_blocks(rows * cols);
}

extern "C" FASTADV_API int fastadv_fgm_norm(const void* g, int dtype, int64_t rows, int64_t cols,
                                            uint8_t* flags, float* workspace, float* norm_out,
                                            void* stream) {
  static const char* fn = "fastadv_fgm_norm";
  if (rows < 0 || cols < 0) return bad_sizes(fn, rows, cols);
  if (norm_out == nullptr) return fail(int(cudaErrorInvalidValue), "%s: norm_out is NULL", fn);
  return dispatch_dtype(fn, dtype, [&](auto tr) {
    return norm_impl<decltype(tr)>(g, rows, cols, flags, workspace, norm_out, static_cast<cudaStream_t>(stream));
  });
}

extern "C" FASTADV_API int fastadv_fgm_update(void* w, const void* g, void* backup, int dtype,
                                              int64_t rows, int64_t cols, const uint8_t* flags,
                                              const float* norm, float eps, void* stream) {
  static const char* fn = "fastadv_fgm_update";
  if (rows < 0 || cols < 0) return bad_sizes(fn, rows, cols);
  if (norm == nullptr) return fail(int(cudaErrorInvalidValue), "%s: norm is NULL", fn);
  return dispatch_dtype(fn, dtype, [&](auto tr) {
    return update_impl<decltype(tr)>(w, g, backup, rows, cols, flags, norm, eps, static_cast<cudaStream_t>(stream));
  });
}

extern "C" FASTADV_API int fastadv_fgm_restore_rows(void* w, const void* backup, int dtype,
                                                    int64_t rows, int64_t cols, const uint8_t* flags,
                                                    void* stream) {
  static const char* fn = "fastadv_fgm_restore_rows";
  if (rows < 0 || cols < 0) return bad_sizes(fn, rows, cols);
  if (flags == nullptr) return fail(int(cudaErrorInvalidValue), "%s: flags is NULL", fn);
  if (dtype < FASTADV_FLOAT32 || dtype > FASTADV_BFLOAT16) return bad_dtype(fn, dtype);
  const int64_t row_bytes = cols * (dtype == FASTADV_FLOAT32 ? 4 : 2);
  if (rows == 0 || row_bytes == 0) return 0;  // nothing to copy: no launch
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  // The widest word that divides the row and to which both tables are aligned.
  auto fits = [&](int64_t bytes) {
    return row_bytes % bytes == 0 && aligned_to(w, bytes) && aligned_to(backup, bytes);
  };
  if (fits(16)) return restore_launch<uint4>(w, backup, rows, row_bytes, flags, s);
  if (fits(8)) return restore_launch<uint2>(w, backup, rows, row_bytes, flags, s);
  if (fits(4)) return restore_launch<uint32_t>(w, backup, rows, row_bytes, flags, s);
  return restore_launch<uint16_t>(w, backup, rows, row_bytes, flags, s);
}

// ---- many tensors --------------------------------------------------------------------------

extern "C" FASTADV_API int fastadv_fgm_mt_partials(const int64_t* table, int lists, int64_t tensors,
                                                   int64_t chunks, int64_t chunk, int dtype, int by_rows,
                                                   const int64_t* group_plan, int64_t blocks, float* partials,
                                                   void* stream) {
  static const char* fn = "fastadv_fgm_mt_partials";
  if (int e = mt::check_group(fn, table, lists, by_rows ? 4 : 3, tensors, chunks, chunk, group_plan, partials,
                              "partials"))
    return e;
  if (blocks < 0) return fail(int(cudaErrorInvalidValue), "%s: negative block count %lld", fn, (long long)blocks);
  const int64_t grid = by_rows ? chunks : blocks;
  if (tensors == 0 || grid == 0) return 0;
  const Table tb = mt::make_table(table, lists, tensors, chunk);
  const GroupPlan gp{group_plan, tensors};
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  return dispatch_dtype(fn, dtype, [&](auto tr) {
    using Tr = decltype(tr);
    if (by_rows)
      mt_sumsq_rows_kernel<Tr><<<unsigned(grid), kThreads, 0, s>>>(tb, gp, partials);
    else
      mt_sumsq_dense_kernel<Tr><<<unsigned(grid), kThreads, 0, s>>>(tb, gp, partials);
    return check_launch(fn);
  });
}

extern "C" FASTADV_API int fastadv_fgm_mt_sum(const int64_t* plan, int64_t tensors, const float* partials,
                                              float* out, void* stream) {
  static const char* fn = "fastadv_fgm_mt_sum";
  if (int e = mt::check_sum(fn, plan, tensors, partials, out)) return e;
  if (tensors == 0) return 0;
  mt_sum_kernel<<<unsigned(tensors), kFinalizeThreads, 0, static_cast<cudaStream_t>(stream)>>>(plan, tensors,
                                                                                                 partials, out);
  return check_launch(fn);
}

extern "C" FASTADV_API int fastadv_fgm_mt_update(const int64_t* table, int lists, int64_t tensors, int64_t chunks,
                                                 int64_t chunk, int dtype, int by_rows, const int64_t* group_plan,
                                                 const float* norms, float eps, void* stream) {
  static const char* fn = "fastadv_fgm_mt_update";
  if (int e = mt::check_group(fn, table, lists, by_rows ? 4 : 3, tensors, chunks, chunk, group_plan, norms,
                              "norms"))
    return e;
  if (tensors == 0 || chunks == 0) return 0;
  const Table tb = mt::make_table(table, lists, tensors, chunk);
  const GroupPlan gp{group_plan, tensors};
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  return dispatch_dtype(fn, dtype, [&](auto tr) {
    using Tr = decltype(tr);
    if (by_rows)
      mt_update_rows_kernel<Tr><<<unsigned(chunks), kThreads, 0, s>>>(tb, gp, norms, eps);
    else
      mt_update_dense_kernel<Tr><<<unsigned(chunks), kThreads, 0, s>>>(tb, gp, norms, eps);
    return check_launch(fn);
  });
}
