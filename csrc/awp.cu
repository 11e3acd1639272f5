// AWP, SAM and weight-averaging kernels over multi-tensor tables
// (csrc/multi_tensor.cuh).  The Triton twins are in
// fastadv/kernels/triton/awp.py and compute the same functions; the ctypes
// launchers are in fastadv/kernels/cuda/awp.py.
//
// Table lists: AWP and SAM use 0 = w (weights), 1 = g (gradients), 2 = b
// (backup); lerp uses 0 = a (the average, updated) and 1 = x (the model);
// copy takes its two list indices as arguments.
//
// All arithmetic is fp32 with explicitly rounded intrinsics (__fmul_rn, ...),
// which the compiler never contracts into FMAs, so fp32 results follow the
// reference's order of operations.
#include "multi_tensor.cuh"

namespace fastadv {
namespace {

using mt::Chunk;
using mt::Table;

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
  const bool vec = mt::aligned(w + k.start, 16) && mt::aligned(g + k.start, 16) && mt::aligned(b + k.start, 16);
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
  const bool vec = mt::aligned(w + k.start, 16) && mt::aligned(g + k.start, 16) && mt::aligned(b + k.start, 16);
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

Table make_table(const int64_t* table, int lists, int64_t tensors, int64_t chunk) {
  return Table{table, tensors, lists, chunk};
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

extern "C" FASTADV_API int fastadv_awp_update(const int64_t* table, int64_t tensors, int64_t chunks,
                                              int64_t chunk, int dtype, const float* norms, float lr,
                                              float eps, int write_backup, void* stream) {
  static const char* fn = "fastadv_awp_update";
  if (int e = mt::check_table(fn, table, 3, tensors, chunks, chunk)) return e;
  if (norms == nullptr) return fail(int(cudaErrorInvalidValue), "%s: norms is NULL", fn);
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

extern "C" FASTADV_API int fastadv_sam_update(const int64_t* table, int64_t tensors, int64_t chunks,
                                              int64_t chunk, int dtype, const float* norm, float rho,
                                              int adaptive, void* stream) {
  static const char* fn = "fastadv_sam_update";
  if (int e = mt::check_table(fn, table, 3, tensors, chunks, chunk)) return e;
  if (norm == nullptr) return fail(int(cudaErrorInvalidValue), "%s: norm is NULL", fn);
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
