// Weight averaging (EMA, SWA): a <- lerp(a, x, weight) over a multi-tensor table
// (csrc/multi_tensor.cuh).  The Triton twin is fastadv/kernels/triton/ema.py; the
// ctypes launcher is in fastadv/kernels/cuda/ema.py.  Table lists: 0 = a (the
// average, updated), 1 = x (the model).
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

// ---- lerp (EMA, SWA) ----------------------------------------------------------------

// a <- lerp(a, x, weight) in fp32 with torch.lerp's formula; weight = 1 / (*count + 1)
// when count is not NULL (read on the device).
template <typename TrA, typename TrX>
__global__ void __launch_bounds__(kThreads)
lerp_kernel(Table tb, float weight, const int64_t* __restrict__ count) {
  using A = typename TrA::bits;
  using X = typename TrX::bits;
  constexpr int V = kVec<A> < kVec<X> ? kVec<A> : kVec<X>;
  const Chunk k = mt::chunk_of(tb, blockIdx.x);
  if (count != nullptr) weight = __fdiv_rn(1.f, float(*count + 1));
  A* a = tb.ptr<A>(0, k.tensor);
  const X* x = tb.ptr<const X>(1, k.tensor);
  const bool vec = mt::aligned(a + k.start, V * sizeof(A)) && mt::aligned(x + k.start, V * sizeof(X));
  const bool low = weight < 0.5f;
  const float rest = __fsub_rn(1.f, weight);
  mt::chunk_loop<V>(k, vec, [&](auto width, int64_t i) {
    constexpr int N = decltype(width)::value;
    auto pa = mt::load<A, N>(a, i);
    const auto px = mt::load<X, N>(x, i);
#pragma unroll
    for (int j = 0; j < N; ++j) {
      const float s = TrA::to_float(pa.v[j]), e = TrX::to_float(px.v[j]);
      const float d = __fsub_rn(e, s);
      pa.v[j] = TrA::from_float(low ? __fadd_rn(s, __fmul_rn(weight, d)) : __fsub_rn(e, __fmul_rn(d, rest)));
    }
    mt::store<A, N>(a, i, pa);
  });
}

}  // namespace
}  // namespace fastadv

// ---- C ABI (declared in fastadv.h) ---------------------------------------------------------

using namespace fastadv;

extern "C" FASTADV_API int fastadv_mt_lerp(const int64_t* table, int64_t tensors, int64_t chunks, int64_t chunk,
                                           int dtype_a, int dtype_x, float weight, const int64_t* count,
                                           void* stream) {
  static const char* fn = "fastadv_mt_lerp";
  if (int e = mt::check_table(fn, table, 2, tensors, chunks, chunk)) return e;
  if (chunks == 0) return 0;
  const Table tb = make_table(table, 2, tensors, chunk);
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  return mt::dispatch_dtypes(fn, dtype_a, dtype_x, [&](auto ta, auto tx) {
    lerp_kernel<decltype(ta), decltype(tx)><<<unsigned(chunks), kThreads, 0, s>>>(tb, weight, count);
    return check_launch(fn);
  });
}
