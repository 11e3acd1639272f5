// AWP's update kernel over multi-tensor tables (csrc/multi_tensor.cuh; the
// reductions are fastadv_mt_sumsq / fastadv_mt_norms in csrc/multi_tensor.cu).
// The Triton twin is fastadv/kernels/triton/awp.py; the ctypes launchers are in
// fastadv/kernels/cuda/awp.py.  Table lists: 0 = w (weights), 1 = g
// (gradients), 2 = b (backup).
//
// All arithmetic is fp32 with explicitly rounded intrinsics (__fmul_rn, ...),
// which the compiler never contracts into FMAs, so fp32 results follow the
// reference's order of operations.
#include "multi_tensor.cuh"

namespace fastadv {
namespace {

using mt::Chunk;
using mt::Table;
using mt::make_table;

// ---- AWP update ---------------------------------------------------------------------

// clamp(w + ((lr * g) / den) * num, w0 -/+ eps * |w0|), NaN-propagating like torch.min/max.
template <typename Tr>
__device__ __forceinline__ typename Tr::bits awp_elem(typename Tr::bits wb, typename Tr::bits gb,
                                                      float w0, float lr, float den, float num, float eps) {
  const float step = __fmul_rn(__fdiv_rn(__fmul_rn(lr, Tr::to_float(gb)), den), num);
  float v = __fadd_rn(Tr::to_float(wb), step);
  const float bound = __fmul_rn(eps, fabsf(w0));
  const float lo = __fsub_rn(w0, bound), hi = __fadd_rn(w0, bound);
  v = (v < lo || isnan(lo)) ? lo : v;
  v = (v > hi || isnan(hi)) ? hi : v;
  return Tr::from_float(v);
}

// One block per chunk; norms = [||g_t|| for t] ++ [||w_t|| for t].  Skipped (the
// backup still written when WRITE_BACKUP) when ||g|| is 0 or NaN.
template <typename Tr, bool WRITE_BACKUP>
__global__ void __launch_bounds__(kThreads)
awp_update_kernel(Table tb, const float* __restrict__ norms, float lr, float eps) {
  using B = typename Tr::bits;
  const Chunk k = mt::chunk_of(tb, blockIdx.x);
  const float gnorm = norms[k.tensor];
  const bool valid = gnorm != 0.f && !isnan(gnorm);
  if (!valid && !WRITE_BACKUP) return;
  const float den = __fadd_rn(gnorm, 1e-6f);
  const float num = __fadd_rn(norms[tb.tensors + k.tensor], 1e-6f);
  B* w = tb.ptr<B>(0, k.tensor);
  const B* g = tb.ptr<const B>(1, k.tensor);
  B* b = tb.ptr<B>(2, k.tensor);
  const bool vec = mt::chunk_aligned16(k, w, g, b);
  mt::chunk_loop<kVec<B>>(k, vec, [&](auto width, int64_t i) {
    constexpr int N = decltype(width)::value;
    auto pw = mt::load<B, N>(w, i);
    Pack<B, N> pb;
    if (WRITE_BACKUP) {
      mt::store<B, N>(b, i, pw);
      pb = pw;
    } else {
      pb = mt::load<B, N>(b, i);
    }
    if (!valid) return;
    const auto pg = mt::load<B, N>(g, i);
#pragma unroll
    for (int j = 0; j < N; ++j)
      pw.v[j] = awp_elem<Tr>(pw.v[j], pg.v[j], Tr::to_float(pb.v[j]), lr, den, num, eps);
    mt::store<B, N>(w, i, pw);
  });
}

}  // namespace
}  // namespace fastadv

// ---- C ABI (declared in fastadv.h) ---------------------------------------------------------

using namespace fastadv;

extern "C" FASTADV_API int fastadv_awp_update(const int64_t* table, int64_t tensors, int64_t chunks,
                                              int64_t chunk, int dtype, const float* norms, float lr,
                                              float eps, int write_backup, void* stream) {
  static const char* fn = "fastadv_awp_update";
  if (int e = mt::check_update(fn, table, 3, tensors, chunks, chunk, norms, "norms")) return e;
  if (chunks == 0) return 0;
  const Table tb = make_table(table, 3, tensors, chunk);
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  return dispatch_dtype(fn, dtype, [&](auto tr) {
    using Tr = decltype(tr);
    if (write_backup) awp_update_kernel<Tr, true><<<unsigned(chunks), kThreads, 0, s>>>(tb, norms, lr, eps);
    else awp_update_kernel<Tr, false><<<unsigned(chunks), kThreads, 0, s>>>(tb, norms, lr, eps);
    return check_launch(fn);
  });
}
