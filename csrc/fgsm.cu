// Embedding FGSM: out = e + eps * sign(g) in one pass (reads e and g once,
// writes out once), fp32 math rounded once to the storage dtype.  The CUDA
// twin of fastadv/kernels/triton/fgsm.py.
#include "common.cuh"

namespace fastadv {
namespace {

// torch.sign: (g > 0) - (g < 0), so sign(0) = sign(-0) = sign(NaN) = 0.
__device__ __forceinline__ float sign_of(float g) { return float(g > 0.f) - float(g < 0.f); }

template <typename Tr>
__global__ void __launch_bounds__(kThreads)
fgsm_kernel(const typename Tr::bits* __restrict__ e, const typename Tr::bits* __restrict__ g,
            typename Tr::bits* __restrict__ out, int64_t n, float eps) {
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    // __fmul_rn / __fadd_rn: no FMA contraction, the torch path rounds twice too.
    const float step = __fmul_rn(eps, sign_of(Tr::to_float(g[i])));
    out[i] = Tr::from_float(__fadd_rn(Tr::to_float(e[i]), step));
  }
}

}  // namespace
}  // namespace fastadv

using namespace fastadv;

extern "C" FASTADV_API int fastadv_fgsm_perturb(const void* e, const void* g, void* out, int dtype,
                                                int64_t n, float eps, void* stream) {
  static const char* fn = "fastadv_fgsm_perturb";
  if (n < 0) return bad_sizes(fn, 1, n);
  if (n == 0) return 0;  // nothing to do: no launch
  return dispatch_dtype(fn, dtype, [&](auto tr) {
    using Tr = decltype(tr);
    using B = typename Tr::bits;
    fgsm_kernel<Tr><<<grid_for(n), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(
        static_cast<const B*>(e), static_cast<const B*>(g), static_cast<B*>(out), n, eps);
    return check_launch(fn);
  });
}
