// NEFTune's per-token scale: scale[b, t] = mask[b, t] * alpha / sqrt(L_b * d), the
// row scale of the uniform noise add (fastadv_noise_add in csrc/noise.cu).  The
// Triton twin is fastadv/kernels/triton/neftune.py, the ctypes launcher is in
// fastadv/kernels/cuda/neftune.py.
#include "common.cuh"
#include "rng.cuh"

namespace fastadv {
namespace {

using rng::kMaxChunks;
using rng::too_big;

// One block per sequence: L = sum(mask[b]); scale[b, t] = mask[b, t] * alpha / sqrt(L * d),
// 0 when L = 0 (all padding; the reference divides by zero there).
__global__ void __launch_bounds__(kThreads)
neftune_scale_kernel(const float* __restrict__ mask, float* __restrict__ scale, int64_t seq_len,
                     float alpha_over_sqrt_d) {
  const float* m = mask + int64_t(blockIdx.x) * seq_len;
  float* s = scale + int64_t(blockIdx.x) * seq_len;
  float acc = 0.f;
  for (int64_t t = threadIdx.x; t < seq_len; t += kThreads) acc += m[t];
  __shared__ float total;
  const float sum = block_sum<kThreads>(acc);
  if (threadIdx.x == 0) total = sum;
  __syncthreads();
  const float length = total;
  const float f = length > 0.f ? __fdiv_rn(alpha_over_sqrt_d, __fsqrt_rn(length)) : 0.f;
  for (int64_t t = threadIdx.x; t < seq_len; t += kThreads) s[t] = m[t] * f;
}

}  // namespace
}  // namespace fastadv

// ---- C ABI (declared in fastadv.h) ---------------------------------------------------------

using namespace fastadv;

// scale[b, t] = mask[b, t] * alpha_over_sqrt_d / sqrt(sum_t mask[b, t]) (0 for an empty sequence);
// mask and scale are float32 [batch, seq_len].
extern "C" FASTADV_API int fastadv_neftune_scale(const float* mask, float* scale, int64_t batch,
                                                 int64_t seq_len, float alpha_over_sqrt_d, void* stream) {
  static const char* fn = "fastadv_neftune_scale";
  if (batch < 0 || seq_len < 0) return bad_sizes(fn, batch, seq_len);
  if (batch == 0 || seq_len == 0) return 0;
  if (batch > kMaxChunks) return too_big(fn, batch);
  neftune_scale_kernel<<<unsigned(batch), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(
      mask, scale, seq_len, alpha_over_sqrt_d);
  return check_launch(fn);
}
