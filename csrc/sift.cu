// SiFT (DeBERTa's perturbation layer) kernels: the first perturbation drawn in the
// kernel (Philox, rng.cuh) with x + delta in the same pass, and the max-norm step
// (row statistics, a one-block norm, one element-wise pass) with the NaN / inf
// test made on the device.  The Triton twins are in fastadv/kernels/triton/sift.py,
// the ctypes launchers in fastadv/kernels/cuda/sift.py.
#include "common.cuh"
#include "multi_tensor.cuh"
#include "rng.cuh"

namespace fastadv {
namespace {

using rng::kChunk;
using rng::kQuarter;
using rng::chunk_grid;
using rng::div_index;
using rng::kMaxChunks;
using rng::null_arg;
using rng::too_big;

// delta = clamp(ip * z, -2 ip, 2 ip) (fp32), pert = x + delta rounded once.
template <typename Tr>
__global__ void __launch_bounds__(kThreads)
sift_init_kernel(const typename Tr::bits* __restrict__ x, float* __restrict__ delta,
                 typename Tr::bits* __restrict__ pert, int64_t numel, const int64_t* __restrict__ key, float ip) {
  const int64_t start = int64_t(blockIdx.x) * kChunk;
  rng::chunk_draws(rng::load_key(key), blockIdx.x, [&](int64_t off, float z) {
    const int64_t e = start + off;
    if (e < numel) {
      const float d = fminf(fmaxf(z * ip, -2.f * ip), 2.f * ip);
      delta[e] = d;
      pert[e] = Tr::from_float(Tr::to_float(x[e]) + d);
    }
  });
}

// One warp per row: sumsq[r] = sum g^2, rowmax[r] = max |g| (fp32 gradient of delta).
__global__ void __launch_bounds__(kThreads)
sift_row_stats_kernel(const float* __restrict__ g, int64_t rows, int64_t cols, float* __restrict__ sumsq,
                      float* __restrict__ rowmax) {
  const int lane = threadIdx.x & 31;
  const int64_t nwarps = (int64_t(gridDim.x) * blockDim.x) >> 5;
  for (int64_t r = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) >> 5; r < rows; r += nwarps) {
    const float* gr = g + r * cols;
    float acc = 0.f, mx = 0.f;
    for (int64_t c = lane; c < cols; c += 32) {
      const float v = gr[c];
      acc = fmaf(v, v, acc);
      mx = fmaxf(mx, fabsf(v));
    }
    acc = warp_sum(acc);
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, off));
    if (lane == 0) {
      sumsq[r] = acc;
      rowmax[r] = mx;
    }
  }
}

// delta += (lr * g) / (1e-6 + rowmax) unless the norm is NaN or inf (DeBERTa's
// order and its skip, decided on the device); pert = x + delta.
template <typename Tr>
__global__ void __launch_bounds__(kThreads)
sift_update_kernel(const typename Tr::bits* __restrict__ x, float* __restrict__ delta, const float* __restrict__ g,
                   const float* __restrict__ rowmax, const float* __restrict__ norm_p,
                   typename Tr::bits* __restrict__ pert, int64_t numel, int64_t cols, float lr) {
  const float norm = *norm_p;
  const bool ok = !isnan(norm) && !isinf(norm);
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; e < numel; e += stride) {
    float d = delta[e];
    if (ok) {
      d = __fadd_rn(d, __fdiv_rn(__fmul_rn(lr, g[e]), __fadd_rn(1e-6f, rowmax[div_index(e, cols)])));
      delta[e] = d;
    }
    pert[e] = Tr::from_float(__fadd_rn(Tr::to_float(x[e]), d));
  }
}

}  // namespace
}  // namespace fastadv

// ---- C ABI (declared in fastadv.h) ---------------------------------------------------------

using namespace fastadv;

// SiFT start: delta = clamp(ip * z, -2 ip, 2 ip) (float32), pert = x + delta (dtype).
extern "C" FASTADV_API int fastadv_sift_init(const void* x, float* delta, void* pert, int dtype, int64_t numel,
                                             const int64_t* key, float ip, void* stream) {
  static const char* fn = "fastadv_sift_init";
  if (numel < 0) return bad_sizes(fn, 1, numel);
  if (numel == 0) return 0;
  if (key == nullptr) return null_arg(fn, "key");
  if (ceil_div(numel, kChunk) > kMaxChunks) return too_big(fn, numel);
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  return dispatch_dtype(fn, dtype, [&](auto tr) {
    using Tr = decltype(tr);
    using B = typename Tr::bits;
    sift_init_kernel<Tr><<<chunk_grid(numel), kThreads, 0, s>>>(
        static_cast<const B*>(x), delta, static_cast<B*>(pert), numel, key, ip);
    return check_launch(fn);
  });
}

// Workspace floats fastadv_sift_update needs for `rows` rows: sums of squares, row maxima, the norm.
extern "C" FASTADV_API int64_t fastadv_sift_workspace_floats(int64_t rows) {
  return rows > 0 ? 2 * rows + 1 : 1;
}

// SiFT step on [rows, cols]: norm = ||grad|| (deterministic); unless it is NaN or inf,
// delta += lr * grad / (1e-6 + max_row |grad|); then pert = x + delta.  The norm is left
// in workspace[2 * rows] (the last float), and *ok (if not NULL) = 1 when the step was
// taken, 0 when skipped.  Three launches.
extern "C" FASTADV_API int fastadv_sift_update(const void* x, float* delta, const float* grad, void* pert,
                                               int dtype, int64_t rows, int64_t cols, float* workspace,
                                               uint8_t* ok, float lr, void* stream) {
  static const char* fn = "fastadv_sift_update";
  if (rows < 0 || cols < 0) return bad_sizes(fn, rows, cols);
  if (dtype < FASTADV_FLOAT32 || dtype > FASTADV_BFLOAT16) return bad_dtype(fn, dtype);
  if (workspace == nullptr) return null_arg(fn, "workspace");
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  const int64_t n = rows * cols;
  float* sumsq = workspace;
  float* rowmax = workspace + (rows > 0 ? rows : 0);
  float* norm = workspace + (rows > 0 ? 2 * rows : 0);
  if (n > 0) {
    sift_row_stats_kernel<<<grid_for_rows(rows), kThreads, 0, s>>>(grad, rows, cols, sumsq, rowmax);
    if (int e = check_launch("fastadv_sift_update (row stats)")) return e;
  }
  mt::global_norm_kernel<<<1, mt::kGlobalThreads, 0, s>>>(sumsq, n > 0 ? rows : 0, norm, ok);
  if (int e = check_launch("fastadv_sift_update (norm)")) return e;
  if (n == 0) return 0;
  return dispatch_dtype(fn, dtype, [&](auto tr) {
    using Tr = decltype(tr);
    using B = typename Tr::bits;
    sift_update_kernel<Tr><<<grid_for(n), kThreads, 0, s>>>(static_cast<const B*>(x), delta, grad, rowmax, norm,
                                                            static_cast<B*>(pert), n, cols, lr);
    return check_launch(fn);
  });
}
