// Input attacks (fastadv.attacks): the fused step kernels of PGD / FGSM /
// FFGSM (L-inf, one launch), PGD-L2 and MI-FGSM (a per-sample reduction, then
// one update launch).  Same math as fastadv/kernels/triton/attacks.py; the
// contracts are declared in fastadv.h ("input attacks").
//
// Tensors are contiguous [batch, per_sample]; images, adv, grad and out share
// one dtype; math in fp32 with explicit IEEE roundings (no contraction), one
// rounding on store.  `out` may equal `adv` (in place).  Per-sample sums are
// two-stage (per-chunk partials, then every update block sums its sample's
// partials in a fixed order): deterministic, no atomics, no host sync.
#include <initializer_list>

#include "common.cuh"

namespace fastadv {
namespace {

constexpr int64_t kChunk = 8192;  // elements of one sample per block in the per-sample passes

__device__ __forceinline__ float sign_of(float g) { return g > 0.f ? 1.f : (g < 0.f ? -1.f : 0.f); }

// torch.clamp: NaN stays NaN.
__device__ __forceinline__ float clamp_to(float v, float lo, float hi) {
  return v < lo ? lo : (v > hi ? hi : v);
}

// clip01(x + clamp(a - x, -eps, eps)), torchattacks' order.
__device__ __forceinline__ float project(float a, float x, float eps) {
  return clamp_to(__fadd_rn(x, clamp_to(__fsub_rn(a, x), -eps, eps)), 0.f, 1.f);
}

// Sums N values over the block (fixed order) and gives every thread the result.
template <int N>
__device__ __forceinline__ void block_allsum(float (&v)[N]) {
  __shared__ float warp_part[N][kWarpsPerBlock];
  __shared__ float total[N];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int k = 0; k < N; ++k) {
    v[k] = warp_sum(v[k]);
    if (lane == 0) warp_part[k][warp] = v[k];
  }
  __syncthreads();
  if (warp == 0) {
#pragma unroll
    for (int k = 0; k < N; ++k) {
      float t = lane < kWarpsPerBlock ? warp_part[k][lane] : 0.f;
      t = warp_sum(t);
      if (lane == 0) total[k] = t;
    }
  }
  __syncthreads();
#pragma unroll
  for (int k = 0; k < N; ++k) v[k] = total[k];
}

// v[k] = sum of part[k*stride + i], i in [0, n), by the whole block, in a fixed order.
template <int N>
__device__ __forceinline__ void block_sum_partials(const float* __restrict__ part, int64_t stride, int64_t n,
                                                   float (&v)[N]) {
#pragma unroll
  for (int k = 0; k < N; ++k) v[k] = 0.f;
  for (int64_t i = threadIdx.x; i < n; i += kThreads) {
#pragma unroll
    for (int k = 0; k < N; ++k) v[k] += part[k * stride + i];
  }
  block_allsum<N>(v);
}

// ---- L-inf --------------------------------------------------------------------------------------

template <typename Tr, int VEC, bool PROJECT>
__global__ void __launch_bounds__(kThreads)
linf_kernel(typename Tr::bits* out, const typename Tr::bits* adv, const typename Tr::bits* __restrict__ x,
            const typename Tr::bits* __restrict__ g, int64_t n, float alpha, float eps) {
  using P = Pack<typename Tr::bits, VEC>;
  const int64_t tid = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t i = tid; i < n / VEC; i += stride) {
    P pa = reinterpret_cast<const P*>(adv)[i];
    const P pg = reinterpret_cast<const P*>(g)[i];
    P px;
    if (PROJECT) px = reinterpret_cast<const P*>(x)[i];
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      const float a = __fadd_rn(Tr::to_float(pa.v[k]), __fmul_rn(alpha, sign_of(Tr::to_float(pg.v[k]))));
      pa.v[k] = Tr::from_float(PROJECT ? project(a, Tr::to_float(px.v[k]), eps) : clamp_to(a, 0.f, 1.f));
    }
    reinterpret_cast<P*>(out)[i] = pa;
  }
  for (int64_t i = n / VEC * VEC + tid; i < n; i += stride) {  // tail (< VEC elements)
    const float a = __fadd_rn(Tr::to_float(adv[i]), __fmul_rn(alpha, sign_of(Tr::to_float(g[i]))));
    out[i] = Tr::from_float(PROJECT ? project(a, Tr::to_float(x[i]), eps) : clamp_to(a, 0.f, 1.f));
  }
}

template <typename Tr>
int linf_impl(void* out_, const void* adv_, const void* x_, const void* g_, int64_t n, float alpha,
              float eps, cudaStream_t stream) {
  using B = typename Tr::bits;
  constexpr int V = kVec<B>;
  B* out = static_cast<B*>(out_);
  const B* adv = static_cast<const B*>(adv_);
  const B* x = static_cast<const B*>(x_);
  const B* g = static_cast<const B*>(g_);
  if (n == 0) return 0;
  const bool vec = aligned_to(out, 16) && aligned_to(adv, 16) && aligned_to(g, 16) &&
                   (x == nullptr || aligned_to(x, 16));
  const unsigned grid = grid_for(vec ? ceil_div(n, V) : n);
  if (x != nullptr) {
    if (vec) linf_kernel<Tr, V, true><<<grid, kThreads, 0, stream>>>(out, adv, x, g, n, alpha, eps);
    else linf_kernel<Tr, 1, true><<<grid, kThreads, 0, stream>>>(out, adv, x, g, n, alpha, eps);
  } else {
    if (vec) linf_kernel<Tr, V, false><<<grid, kThreads, 0, stream>>>(out, adv, x, g, n, alpha, eps);
    else linf_kernel<Tr, 1, false><<<grid, kThreads, 0, stream>>>(out, adv, x, g, n, alpha, eps);
  }
  return check_launch("fastadv_attack_linf_step");
}

// ---- per-sample passes ------------------------------------------------------------------------------
// One block per (sample b, chunk c) of kChunk elements: blockIdx.x = b * chunks + c.
// VEC > 1 only when per_sample % VEC == 0 and the pointers are 16-byte aligned.

struct Span {
  int64_t block, base, len;  // partial index, first element, elements in this chunk
};

__device__ __forceinline__ Span span_of(int64_t per_sample, int64_t chunks) {
  const int64_t blk = blockIdx.x;
  const int64_t b = blk / chunks, c = blk - b * chunks;
  const int64_t start = c * kChunk;
  const int64_t rest = per_sample - start;
  return Span{blk, b * per_sample + start, rest < kChunk ? rest : kChunk};
}

template <typename Tr, int VEC>
__global__ void __launch_bounds__(kThreads)
l2_partials_kernel(const typename Tr::bits* __restrict__ adv, const typename Tr::bits* __restrict__ x,
                   const typename Tr::bits* __restrict__ g, int64_t per_sample, int64_t chunks,
                   float* __restrict__ part, int64_t nparts) {
  using P = Pack<typename Tr::bits, VEC>;
  const Span s = span_of(per_sample, chunks);
  float acc[3] = {0.f, 0.f, 0.f};  // g.g, d.g, d.d
  for (int64_t i = int64_t(threadIdx.x) * VEC; i < s.len; i += int64_t(kThreads) * VEC) {
    const P pa = *reinterpret_cast<const P*>(adv + s.base + i);
    const P px = *reinterpret_cast<const P*>(x + s.base + i);
    const P pg = *reinterpret_cast<const P*>(g + s.base + i);
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      const float gv = Tr::to_float(pg.v[k]);
      const float d = __fsub_rn(Tr::to_float(pa.v[k]), Tr::to_float(px.v[k]));
      acc[0] = fmaf(gv, gv, acc[0]);
      acc[1] = fmaf(d, gv, acc[1]);
      acc[2] = fmaf(d, d, acc[2]);
    }
  }
  block_allsum<3>(acc);
  if (threadIdx.x == 0) {
    part[s.block] = acc[0];
    part[nparts + s.block] = acc[1];
    part[2 * nparts + s.block] = acc[2];
  }
}

template <typename Tr, int VEC>
__global__ void __launch_bounds__(kThreads)
l2_update_kernel(typename Tr::bits* out, const typename Tr::bits* adv, const typename Tr::bits* __restrict__ x,
                 const typename Tr::bits* __restrict__ g, int64_t per_sample, int64_t chunks,
                 const float* __restrict__ part, int64_t nparts, float alpha, float eps, float eps_div) {
  using P = Pack<typename Tr::bits, VEC>;
  const Span s = span_of(per_sample, chunks);
  const int64_t first = (s.block / chunks) * chunks;  // the sample's first partial
  float sums[3];  // g.g, d.g, d.d of the sample
  block_sum_partials<3>(part + first, nparts, chunks, sums);
  const float gg = sums[0], dg = sums[1], dd = sums[2];
  const float gnorm = __fadd_rn(__fsqrt_rn(gg), eps_div);
  const float sc = __fdiv_rn(alpha, gnorm);
  const float dn2 = __fadd_rn(__fadd_rn(dd, __fmul_rn(__fmul_rn(2.f, sc), dg)), __fmul_rn(__fmul_rn(sc, sc), gg));
  const float q = __fdiv_rn(eps, __fsqrt_rn(fmaxf(dn2, 0.f)));
  const float factor = q > 1.f ? 1.f : q;  // torch.min(eps / ||d||, 1): NaN stays NaN
  for (int64_t i = int64_t(threadIdx.x) * VEC; i < s.len; i += int64_t(kThreads) * VEC) {
    P pa = *reinterpret_cast<const P*>(adv + s.base + i);
    const P px = *reinterpret_cast<const P*>(x + s.base + i);
    const P pg = *reinterpret_cast<const P*>(g + s.base + i);
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      const float xv = Tr::to_float(px.v[k]);
      const float a = __fadd_rn(Tr::to_float(pa.v[k]), __fmul_rn(alpha, __fdiv_rn(Tr::to_float(pg.v[k]), gnorm)));
      pa.v[k] = Tr::from_float(clamp_to(__fadd_rn(xv, __fmul_rn(__fsub_rn(a, xv), factor)), 0.f, 1.f));
    }
    *reinterpret_cast<P*>(out + s.base + i) = pa;
  }
}

template <typename Tr, int VEC>
__global__ void __launch_bounds__(kThreads)
abs_partials_kernel(const typename Tr::bits* __restrict__ g, int64_t per_sample, int64_t chunks,
                    float* __restrict__ part) {
  using P = Pack<typename Tr::bits, VEC>;
  const Span s = span_of(per_sample, chunks);
  float acc[1] = {0.f};
  for (int64_t i = int64_t(threadIdx.x) * VEC; i < s.len; i += int64_t(kThreads) * VEC) {
    const P pg = *reinterpret_cast<const P*>(g + s.base + i);
#pragma unroll
    for (int k = 0; k < VEC; ++k) acc[0] = __fadd_rn(acc[0], fabsf(Tr::to_float(pg.v[k])));
  }
  block_allsum<1>(acc);
  if (threadIdx.x == 0) part[s.block] = acc[0];
}

template <typename Tr, int VEC, bool FIRST>
__global__ void __launch_bounds__(kThreads)
momentum_update_kernel(typename Tr::bits* out, const typename Tr::bits* adv,
                       const typename Tr::bits* __restrict__ x, const typename Tr::bits* __restrict__ g,
                       float* __restrict__ momentum, int64_t per_sample, int64_t chunks,
                       const float* __restrict__ part, float alpha, float eps, float decay) {
  using P = Pack<typename Tr::bits, VEC>;
  using M = Pack<float, VEC>;
  const Span s = span_of(per_sample, chunks);
  const int64_t first = (s.block / chunks) * chunks;
  float sum[1];
  block_sum_partials<1>(part + first, 0, chunks, sum);
  const float mean = __fdiv_rn(sum[0], float(per_sample));
  for (int64_t i = int64_t(threadIdx.x) * VEC; i < s.len; i += int64_t(kThreads) * VEC) {
    P pa = *reinterpret_cast<const P*>(adv + s.base + i);
    const P px = *reinterpret_cast<const P*>(x + s.base + i);
    const P pg = *reinterpret_cast<const P*>(g + s.base + i);
    M pm;
    if (!FIRST) pm = *reinterpret_cast<const M*>(momentum + s.base + i);
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      float m = __fdiv_rn(Tr::to_float(pg.v[k]), mean);  // 0/0 = NaN for an all-zero sample
      if (!FIRST) m = __fadd_rn(m, __fmul_rn(pm.v[k], decay));
      pm.v[k] = m;
      const float a = __fadd_rn(Tr::to_float(pa.v[k]), __fmul_rn(alpha, sign_of(m)));
      pa.v[k] = Tr::from_float(project(a, Tr::to_float(px.v[k]), eps));
    }
    *reinterpret_cast<M*>(momentum + s.base + i) = pm;
    *reinterpret_cast<P*>(out + s.base + i) = pa;
  }
}

int64_t chunks_of(int64_t per_sample) { return ceil_div(per_sample, kChunk); }

int check_sample_sizes(const char* fn, int64_t batch, int64_t per_sample) {
  if (batch < 0 || per_sample < 0) return bad_sizes(fn, batch, per_sample);
  if (per_sample > 0 && batch * chunks_of(per_sample) > int64_t(0x7fffffff))
    return fail(int(cudaErrorInvalidValue), "%s: %lld samples of %lld elements is too many blocks", fn,
                (long long)batch, (long long)per_sample);
  return 0;
}

template <typename Tr>
bool use_vec(int64_t per_sample, std::initializer_list<const void*> ptrs, size_t align) {
  if (per_sample % kVec<typename Tr::bits> != 0) return false;
  for (const void* p : ptrs)
    if (!aligned_to(p, align)) return false;
  return true;
}

template <typename Tr>
int l2_impl(void* out_, const void* adv_, const void* x_, const void* g_, int64_t batch, int64_t per_sample,
            float alpha, float eps, float eps_div, float* part, cudaStream_t stream) {
  using B = typename Tr::bits;
  constexpr int V = kVec<B>;
  B* out = static_cast<B*>(out_);
  const B* adv = static_cast<const B*>(adv_);
  const B* x = static_cast<const B*>(x_);
  const B* g = static_cast<const B*>(g_);
  const int64_t chunks = chunks_of(per_sample), nparts = batch * chunks;
  const unsigned grid = unsigned(nparts);
  if (use_vec<Tr>(per_sample, {out_, adv_, x_, g_}, 16)) {
    l2_partials_kernel<Tr, V><<<grid, kThreads, 0, stream>>>(adv, x, g, per_sample, chunks, part, nparts);
    if (int e = check_launch("fastadv_attack_l2_step (partials)")) return e;
    l2_update_kernel<Tr, V><<<grid, kThreads, 0, stream>>>(out, adv, x, g, per_sample, chunks, part, nparts,
                                                           alpha, eps, eps_div);
  } else {
    l2_partials_kernel<Tr, 1><<<grid, kThreads, 0, stream>>>(adv, x, g, per_sample, chunks, part, nparts);
    if (int e = check_launch("fastadv_attack_l2_step (partials)")) return e;
    l2_update_kernel<Tr, 1><<<grid, kThreads, 0, stream>>>(out, adv, x, g, per_sample, chunks, part, nparts,
                                                           alpha, eps, eps_div);
  }
  return check_launch("fastadv_attack_l2_step (update)");
}

template <typename Tr, int VEC>
void momentum_launch(unsigned grid, cudaStream_t stream, bool first, typename Tr::bits* out,
                     const typename Tr::bits* adv, const typename Tr::bits* x, const typename Tr::bits* g,
                     float* momentum, int64_t per_sample, int64_t chunks, const float* part, float alpha,
                     float eps, float decay) {
  if (first)
    momentum_update_kernel<Tr, VEC, true><<<grid, kThreads, 0, stream>>>(out, adv, x, g, momentum, per_sample,
                                                                         chunks, part, alpha, eps, decay);
  else
    momentum_update_kernel<Tr, VEC, false><<<grid, kThreads, 0, stream>>>(out, adv, x, g, momentum, per_sample,
                                                                          chunks, part, alpha, eps, decay);
}

template <typename Tr>
int momentum_impl(void* out_, const void* adv_, const void* x_, const void* g_, float* momentum, bool first,
                  int64_t batch, int64_t per_sample, float alpha, float eps, float decay, float* part,
                  cudaStream_t stream) {
  using B = typename Tr::bits;
  constexpr int V = kVec<B>;
  B* out = static_cast<B*>(out_);
  const B* adv = static_cast<const B*>(adv_);
  const B* x = static_cast<const B*>(x_);
  const B* g = static_cast<const B*>(g_);
  const int64_t chunks = chunks_of(per_sample);
  const unsigned grid = unsigned(batch * chunks);
  // the fp32 momentum pack of V floats needs V*4-byte alignment
  if (use_vec<Tr>(per_sample, {out_, adv_, x_, g_}, 16) && aligned_to(momentum, sizeof(float) * V)) {
    abs_partials_kernel<Tr, V><<<grid, kThreads, 0, stream>>>(g, per_sample, chunks, part);
    if (int e = check_launch("fastadv_attack_momentum_step (partials)")) return e;
    momentum_launch<Tr, V>(grid, stream, first, out, adv, x, g, momentum, per_sample, chunks, part, alpha, eps,
                           decay);
  } else {
    abs_partials_kernel<Tr, 1><<<grid, kThreads, 0, stream>>>(g, per_sample, chunks, part);
    if (int e = check_launch("fastadv_attack_momentum_step (partials)")) return e;
    momentum_launch<Tr, 1>(grid, stream, first, out, adv, x, g, momentum, per_sample, chunks, part, alpha, eps,
                           decay);
  }
  return check_launch("fastadv_attack_momentum_step (update)");
}

}  // namespace
}  // namespace fastadv

// ---- C ABI ------------------------------------------------------------------------------------------

using namespace fastadv;

extern "C" FASTADV_API int fastadv_attack_linf_step(void* out, const void* adv, const void* x, const void* g,
                                                    int dtype, int64_t numel, float alpha, float eps,
                                                    void* stream) {
  static const char* fn = "fastadv_attack_linf_step";
  if (numel < 0) return bad_sizes(fn, 1, numel);
  if (numel > 0 && (out == nullptr || adv == nullptr || g == nullptr))
    return fail(int(cudaErrorInvalidValue), "%s: out, adv and g must not be NULL", fn);
  return dispatch_dtype(fn, dtype, [&](auto tr) {
    return linf_impl<decltype(tr)>(out, adv, x, g, numel, alpha, eps, static_cast<cudaStream_t>(stream));
  });
}

extern "C" FASTADV_API int64_t fastadv_attack_workspace_floats(int64_t batch, int64_t per_sample, int kind) {
  if (batch <= 0 || per_sample <= 0) return 0;
  return (kind == 0 ? 3 : 1) * batch * chunks_of(per_sample);
}

extern "C" FASTADV_API int fastadv_attack_l2_step(void* out, const void* adv, const void* x, const void* g,
                                                  int dtype, int64_t batch, int64_t per_sample, float alpha,
                                                  float eps, float eps_div, float* workspace, void* stream) {
  static const char* fn = "fastadv_attack_l2_step";
  if (int e = check_sample_sizes(fn, batch, per_sample)) return e;
  if (batch == 0 || per_sample == 0) return dtype >= 0 && dtype <= 2 ? 0 : bad_dtype(fn, dtype);
  if (out == nullptr || adv == nullptr || x == nullptr || g == nullptr || workspace == nullptr)
    return fail(int(cudaErrorInvalidValue), "%s: out, adv, x, g and workspace must not be NULL", fn);
  return dispatch_dtype(fn, dtype, [&](auto tr) {
    return l2_impl<decltype(tr)>(out, adv, x, g, batch, per_sample, alpha, eps, eps_div, workspace,
                                 static_cast<cudaStream_t>(stream));
  });
}

extern "C" FASTADV_API int fastadv_attack_momentum_step(void* out, const void* adv, const void* x,
                                                        const void* g, float* momentum, int first, int dtype,
                                                        int64_t batch, int64_t per_sample, float alpha,
                                                        float eps, float decay, float* workspace,
                                                        void* stream) {
  static const char* fn = "fastadv_attack_momentum_step";
  if (int e = check_sample_sizes(fn, batch, per_sample)) return e;
  if (batch == 0 || per_sample == 0) return dtype >= 0 && dtype <= 2 ? 0 : bad_dtype(fn, dtype);
  if (out == nullptr || adv == nullptr || x == nullptr || g == nullptr || momentum == nullptr ||
      workspace == nullptr)
    return fail(int(cudaErrorInvalidValue), "%s: out, adv, x, g, momentum and workspace must not be NULL", fn);
  return dispatch_dtype(fn, dtype, [&](auto tr) {
    return momentum_impl<decltype(tr)>(out, adv, x, g, momentum, first != 0, batch, per_sample, alpha, eps,
                                       decay, workspace, static_cast<cudaStream_t>(stream));
  });
}
