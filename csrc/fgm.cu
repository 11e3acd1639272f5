// FGM kernels: the deterministic gradient norm (dense or row-sparse), the
// fused backup + update, and the bit-exact restore of touched rows.
// See docs/ARCHITECTURE.md ("FGM kernels") and fastadv.h for the contracts.
#include "common.cuh"

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

// partials[blockIdx.x] = fp32 sum of squares of this block's share of g.
template <typename Tr, int VEC>
__global__ void __launch_bounds__(kThreads)
sumsq_dense_kernel(const typename Tr::bits* __restrict__ g, int64_t n, float* __restrict__ partials) {
  using P = Pack<typename Tr::bits, VEC>;
  const int64_t tid = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
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
  const float s = block_sum<kThreads>(acc);
  if (threadIdx.x == 0) partials[blockIdx.x] = s;
}

// One warp per row: partials[r] = the row's sum of squares, and rows[r] = 1
// iff the row holds an entry that is not zero (NaN and inf included), else 0.
// Every row is read: which rows carry gradient is read from the gradient.
template <typename Tr, int VEC>
__global__ void __launch_bounds__(kThreads)
sumsq_rows_kernel(const typename Tr::bits* __restrict__ g, int64_t rows, int64_t cols,
                  uint8_t* __restrict__ flags, float* __restrict__ partials) {
  using P = Pack<typename Tr::bits, VEC>;
  const int lane = threadIdx.x & 31;
  const int64_t nwarps = (int64_t(gridDim.x) * blockDim.x) >> 5;
  const int64_t cv = cols / VEC;  // VEC divides cols (host's choice)
  for (int64_t r = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) >> 5; r < rows; r += nwarps) {
    const P* row = reinterpret_cast<const P*>(g + r * cols);
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
    acc = warp_sum(acc);
    // The loop over rows is warp-uniform, so the whole warp votes here.
    nonzero = __any_sync(0xffffffffu, nonzero);
    if (lane == 0) {
      partials[r] = acc;
      flags[r] = nonzero ? 1 : 0;  // the same rule as the Triton kernel
    }
  }
}

// One block: *out = sqrt(sum of partials), summed in a fixed order.
__global__ void __launch_bounds__(kFinalizeThreads)
finalize_norm_kernel(const float* __restrict__ partials, int64_t n, float* __restrict__ out) {
  float acc = 0.f;
  for (int64_t i = threadIdx.x; i < n; i += kFinalizeThreads) acc += partials[i];
  const float s = block_sum<kFinalizeThreads>(acc);
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

// One warp per row; rows flagged by the norm pass only.  The backup is
// full-size: row r is saved at row r.
template <typename Tr, int VEC>
__global__ void __launch_bounds__(kThreads)
update_rows_kernel(typename Tr::bits* w, const typename Tr::bits* __restrict__ g,
                   typename Tr::bits* __restrict__ backup, int64_t rows, int64_t cols,
                   const uint8_t* __restrict__ flags, const float* __restrict__ norm_p, float eps) {
  using P = Pack<typename Tr::bits, VEC>;
  const float norm = *norm_p;
  const bool valid = norm_is_valid(norm);
  const int lane = threadIdx.x & 31;
  const int64_t nwarps = (int64_t(gridDim.x) * blockDim.x) >> 5;
  const int64_t cv = cols / VEC;
  for (int64_t r = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) >> 5; r < rows; r += nwarps) {
    if (flags[r] == 0) continue;
    P* wr = reinterpret_cast<P*>(w + r * cols);
    const P* gr = reinterpret_cast<const P*>(g + r * cols);
    P* br = reinterpret_cast<P*>(backup + r * cols);
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
