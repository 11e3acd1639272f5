/* fastadv CUDA library: the input attacks (fastadv.attacks).  Same conventions
 * as fastadv.h: raw device pointers, a dtype code, a cudaStream_t as void*, 0
 * or a cudaError_t code returned, fastadv_last_error() for the message, no host
 * synchronisation.  The CUDA twin of fastadv/kernels/triton/attacks.py.
 *
 * Tensors are contiguous [batch, per_sample]; out, adv, x (the clean images)
 * and g share one dtype; math in fp32 with IEEE roundings in torchattacks'
 * order, rounded once on store; `out` may equal `adv` (in place).  The
 * per-sample sums are two-stage (per-chunk partials in `workspace`, summed in a
 * fixed order by every update block): deterministic, no atomics.
 */
#ifndef FASTADV_ATTACKS_H_
#define FASTADV_ATTACKS_H_

#include <stdint.h>

#include "fastadv.h"

#ifdef __cplusplus
extern "C" {
#endif

// out = clip01(x + clamp(adv + alpha*sign(g) - x, -eps, eps)); x == NULL:
// out = clip01(adv + alpha*sign(g)).  sign(0) = sign(NaN) = 0 (torch.sign).
FASTADV_API int fastadv_attack_linf_step(void* out, const void* adv, const void* x, const void* g,
                                         int dtype, int64_t numel, float alpha, float eps,
                                         void* stream);
// fp32 workspace floats of fastadv_attack_l2_step (kind 0) or
// fastadv_attack_momentum_step (kind 1); 0 when there is nothing to do.
FASTADV_API int64_t fastadv_attack_workspace_floats(int64_t batch, int64_t per_sample, int kind);
// Per sample: a = adv + alpha*g/(||g|| + eps_div); d = a - x;
// out = clip01(x + d*min(1, eps/||d||)), ||d||^2 taken as
// ||adv-x||^2 + 2s<adv-x, g> + s^2||g||^2, s = alpha/(||g|| + eps_div).
FASTADV_API int fastadv_attack_l2_step(void* out, const void* adv, const void* x, const void* g,
                                       int dtype, int64_t batch, int64_t per_sample, float alpha,
                                       float eps, float eps_div, float* workspace, void* stream);
// Per sample: m = g/mean(|g|) + decay*m (fp32, in place; first != 0: the old m
// is not read), out = clip01(x + clamp(adv + alpha*sign(m) - x, -eps, eps)).
FASTADV_API int fastadv_attack_momentum_step(void* out, const void* adv, const void* x,
                                             const void* g, float* momentum, int first, int dtype,
                                             int64_t batch, int64_t per_sample, float alpha,
                                             float eps, float decay, float* workspace,
                                             void* stream);

#ifdef __cplusplus
} /* extern "C" */
#endif

#endif /* FASTADV_ATTACKS_H_ */
