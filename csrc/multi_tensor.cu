// Multi-tensor plumbing shared by AWP, SAM, EMA / SWA and weight noise, over the
// tables of csrc/multi_tensor.cuh: the chunk reductions (sums of squares), their
// per-tensor and global finalizes, and the multi-tensor copy (the bit-exact
// restore of every op that backs weights up).  The Triton twins are in
// fastadv/kernels/triton/multi_tensor.py, the ctypes launchers in
// fastadv/kernels/cuda/multi_tensor.py.
#include "multi_tensor.cuh"

namespace fastadv {
namespace {

using mt::Chunk;
using mt::Table;
using mt::make_table;

// ---- reductions (first stage) -----------------------------------------------------

enum SumsqMode { kAwp = 0, kGrad = 1, kAdaptive = 2 };

// One block per chunk.  kAwp: partials[c] = sum g^2, partials[N + c] = sum w^2;
// kGrad: partials[c] = sum g^2; kAdaptive: partials[c] = sum (|w| g)^2.
template <typename Tr, int MODE>
__global__ void __launch_bounds__(kThreads)
sumsq_kernel(Table tb, int64_t n_chunks, float* __restrict__ partials) {
  using B = typename Tr::bits;
  const Chunk k = mt::chunk_of(tb, blockIdx.x);
  const B* w = tb.ptr<const B>(0, k.tensor);
  const B* g = tb.ptr<const B>(1, k.tensor);
  const bool vec = mt::aligned(w + k.start, 16) && mt::aligned(g + k.start, 16);
  float sg = 0.f, sw = 0.f;
  mt::chunk_loop<kVec<B>>(k, vec, [&](auto width, int64_t i) {
    constexpr int N = decltype(width)::value;
    const auto pg = mt::load<B, N>(g, i);
    if (MODE == kGrad) {
#pragma unroll
      for (int j = 0; j < N; ++j) {
        const float x = Tr::to_float(pg.v[j]);
        sg = fmaf(x, x, sg);
      }
    } else {
      const auto pw = mt::load<B, N>(w, i);
#pragma unroll
      for (int j = 0; j < N; ++j) {
        const float x = Tr::to_float(pg.v[j]), y = Tr::to_float(pw.v[j]);
        if (MODE == kAwp) {
          sg = fmaf(x, x, sg);
          sw = fmaf(y, y, sw);
        } else {
          const float z = fabsf(y) * x;
          sg = fmaf(z, z, sg);
        }
      }
    }
  });
  const float s = block_sum<kThreads>(sg);
  if (threadIdx.x == 0) partials[blockIdx.x] = s;
  if (MODE == kAwp) {
    __syncthreads();  // block_sum's shared scratch is reused
    const float t = block_sum<kThreads>(sw);
    if (threadIdx.x == 0) partials[n_chunks + blockIdx.x] = t;
  }
}

// ---- copy ---------------------------------------------------------------------------

// list DST <- list SRC: raw bits when the dtypes match (bit-exact), else one rounding.
template <typename TrD, typename TrS>
__global__ void __launch_bounds__(kThreads)
copy_kernel(Table tb, int dst_list, int src_list) {
  using D = typename TrD::bits;
  using S = typename TrS::bits;
  constexpr int V = kVec<D> < kVec<S> ? kVec<D> : kVec<S>;
  const Chunk k = mt::chunk_of(tb, blockIdx.x);
  D* d = tb.ptr<D>(dst_list, k.tensor);
  const S* s = tb.ptr<const S>(src_list, k.tensor);
  const bool vec = mt::aligned(d + k.start, V * sizeof(D)) && mt::aligned(s + k.start, V * sizeof(S));
  mt::chunk_loop<V>(k, vec, [&](auto width, int64_t i) {
    constexpr int N = decltype(width)::value;
    const auto ps = mt::load<S, N>(s, i);
    Pack<D, N> pd;
#pragma unroll
    for (int j = 0; j < N; ++j) {
      if constexpr (std::is_same_v<TrD, TrS>)
        pd.v[j] = ps.v[j];
      else
        pd.v[j] = TrD::from_float(TrS::to_float(ps.v[j]));
    }
    mt::store<D, N>(d, i, pd);
  });
}

}  // namespace
}  // namespace fastadv

// ---- C ABI (declared in fastadv.h) ---------------------------------------------------------

using namespace fastadv;

extern "C" FASTADV_API int fastadv_mt_sumsq(const int64_t* table, int lists, int64_t tensors, int64_t chunks,
                                            int64_t chunk, int dtype, int mode, float* partials, void* stream) {
  static const char* fn = "fastadv_mt_sumsq";
  if (int e = mt::check_table(fn, table, lists, tensors, chunks, chunk)) return e;
  if (lists < 2) return fail(int(cudaErrorInvalidValue), "%s: needs the lists w, g (got %d lists)", fn, lists);
  if (mode < kAwp || mode > kAdaptive) return fail(int(cudaErrorInvalidValue), "%s: bad mode %d", fn, mode);
  if (chunks == 0) return 0;
  const Table tb = make_table(table, lists, tensors, chunk);
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  return dispatch_dtype(fn, dtype, [&](auto tr) {
    using Tr = decltype(tr);
    if (mode == kAwp) sumsq_kernel<Tr, kAwp><<<unsigned(chunks), kThreads, 0, s>>>(tb, chunks, partials);
    else if (mode == kGrad) sumsq_kernel<Tr, kGrad><<<unsigned(chunks), kThreads, 0, s>>>(tb, chunks, partials);
    else sumsq_kernel<Tr, kAdaptive><<<unsigned(chunks), kThreads, 0, s>>>(tb, chunks, partials);
    return check_launch(fn);
  });
}

extern "C" FASTADV_API int fastadv_mt_norms(const int64_t* table, int lists, int64_t tensors, int64_t chunks,
                                            const float* partials, int arrays, float* out, void* stream) {
  static const char* fn = "fastadv_mt_norms";
  if (int e = mt::check_table(fn, table, lists, tensors, chunks, 16)) return e;
  if (arrays < 1) return fail(int(cudaErrorInvalidValue), "%s: arrays must be >= 1", fn);
  if (tensors == 0) return 0;
  const Table tb = make_table(table, lists, tensors, 16);  // the chunk size is not used here
  mt::per_tensor_norms_kernel<<<unsigned(tensors), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(
      tb, partials, chunks > 0 ? chunks : 1, arrays, out);
  return check_launch(fn);
}

extern "C" FASTADV_API int fastadv_mt_global_norm(const float* partials, int64_t n, float* out, void* stream) {
  static const char* fn = "fastadv_mt_global_norm";
  if (n < 0) return fail(int(cudaErrorInvalidValue), "%s: negative size %lld", fn, (long long)n);
  if (out == nullptr) return fail(int(cudaErrorInvalidValue), "%s: out is NULL", fn);
  mt::global_norm_kernel<<<1, mt::kGlobalThreads, 0, static_cast<cudaStream_t>(stream)>>>(partials, n, out);
  return check_launch(fn);
}

extern "C" FASTADV_API int fastadv_mt_copy(const int64_t* table, int lists, int64_t tensors, int64_t chunks,
                                           int64_t chunk, int dst_list, int dst_dtype, int src_list,
                                           int src_dtype, void* stream) {
  static const char* fn = "fastadv_mt_copy";
  if (int e = mt::check_table(fn, table, lists, tensors, chunks, chunk)) return e;
  if (dst_list < 0 || dst_list >= lists || src_list < 0 || src_list >= lists)
    return fail(int(cudaErrorInvalidValue), "%s: list indices %d, %d out of range for %d lists", fn, dst_list,
                src_list, lists);
  if (chunks == 0) return 0;
  const Table tb = make_table(table, lists, tensors, chunk);
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  return mt::dispatch_dtypes(fn, dst_dtype, src_dtype, [&](auto td, auto ts) {
    copy_kernel<decltype(td), decltype(ts)><<<unsigned(chunks), kThreads, 0, s>>>(tb, dst_list, src_list);
    return check_launch(fn);
  });
}
