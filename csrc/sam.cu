// SAM's first-step update kernel over multi-tensor tables (csrc/multi_tensor.cuh;
// the global gradient norm is fastadv_mt_sumsq + fastadv_mt_global_norm in
// csrc/multi_tensor.cu).  The Triton twin is fastadv/kernels/triton/sam.py; the
// ctypes launchers are in fastadv/kernels/cuda/sam.py.  Table lists: 0 = w
// (weights), 1 = g (gradients), 2 = b (backup).
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

// ---- SAM update ---------------------------------------------------------------------

// b <- w; w <- w + ((w^2 if ADAPTIVE) * g) * (rho / (||.|| + 1e-12)).
template <typename Tr, bool ADAPTIVE>
__global__ void __launch_bounds__(kThreads)
sam_update_kernel(Table tb, const float* __restrict__ norm, float rho) {
  using B = typename Tr::bits;
  const Chunk k = mt::chunk_of(tb, blockIdx.x);
  const float scale = __fdiv_rn(rho, __fadd_rn(*norm, 1e-12f));
  B* w = tb.ptr<B>(0, k.tensor);
  const B* g = tb.ptr<const B>(1, k.tensor);
  B* b = tb.ptr<B>(2, k.tensor);
  const bool vec = mt::chunk_aligned16(k, w, g, b);
  mt::chunk_loop<kVec<B>>(k, vec, [&](auto width, int64_t i) {
    constexpr int N = decltype(width)::value;
    auto pw = mt::load<B, N>(w, i);
    mt::store<B, N>(b, i, pw);
    const auto pg = mt::load<B, N>(g, i);
#pragma unroll
    for (int j = 0; j < N; ++j) {
      const float x = Tr::to_float(pw.v[j]);
      float e = Tr::to_float(pg.v[j]);
      if (ADAPTIVE) e = __fmul_rn(__fmul_rn(x, x), e);
      pw.v[j] = Tr::from_float(__fadd_rn(x, __fmul_rn(e, scale)));
    }
    mt::store<B, N>(w, i, pw);
  });
}

}  // namespace
}  // namespace fastadv

// ---- C ABI (declared in fastadv.h) ---------------------------------------------------------

using namespace fastadv;

extern "C" FASTADV_API int fastadv_sam_update(const int64_t* table, int64_t tensors, int64_t chunks,
                                              int64_t chunk, int dtype, const float* norm, float rho,
                                              int adaptive, void* stream) {
  static const char* fn = "fastadv_sam_update";
  if (int e = mt::check_update(fn, table, 3, tensors, chunks, chunk, norm, "norm")) return e;
  if (chunks == 0) return 0;
  const Table tb = make_table(table, 3, tensors, chunk);
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  return dispatch_dtype(fn, dtype, [&](auto tr) {
    using Tr = decltype(tr);
    if (adaptive) sam_update_kernel<Tr, true><<<unsigned(chunks), kThreads, 0, s>>>(tb, norm, rho);
    else sam_update_kernel<Tr, false><<<unsigned(chunks), kThreads, 0, s>>>(tb, norm, rho);
    return check_launch(fn);
  });
}
