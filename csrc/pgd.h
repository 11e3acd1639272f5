/* fastadv CUDA library: PGD on an embedding (one step, and the restore of the
 * perturbed rows).  Same conventions as fastadv.h: raw device pointers to
 * contiguous tensors, a dtype code, a cudaStream_t as void*, 0 or a
 * cudaError_t code returned, fastadv_last_error() for the message, no host
 * synchronisation.  The CUDA twin of fastadv/kernels/triton/pgd.py.
 *
 * With r = w - w0 the perturbation so far and s = alpha / ||g||, the new
 * perturbation r' = r + s g has ||r'||^2 = ||r||^2 + 2 s <r, g> + s^2 ||g||^2:
 * one reduction (||g||^2, ||r||^2, <r, g>) gives the coefficients
 *   coef = [||g||, ||r'||, step (1: ||g|| neither 0 nor NaN), project (1: step
 *           and ||r'|| > eps)]
 * on the device, then one update pass applies, element by element in fp32
 * with IEEE rounding (the reference's order), rounded once to dtype:
 *   r = (w + (g * alpha) / ||g||) - w0;  r = (r * eps) / ||r'|| if project;
 *   w = w0 + r                                    (nothing when step is 0).
 *
 * Dense mode (mask == saved == NULL): the flat tensor of rows*cols elements;
 * `first` != 0 means r = 0 and the update writes backup <- w (always, even when
 * the step is skipped).
 * Row mode (mask and saved both given, uint8 [rows]): w, g, backup are
 * [rows, cols]; the reduction reads every row of g and writes mask[r] = 1 iff
 * the row holds a non-zero entry (NaN / inf included), else 0.  The update
 * visits a row when mask[r] or saved[r] (perturbed by an earlier step: backup
 * holds its w0).  When the step is taken, every visited row is updated, backed
 * up first if it was not saved, and marked saved.  `first` is ignored (saved
 * says it all).
 */
#ifndef FASTADV_PGD_H_
#define FASTADV_PGD_H_

#include <stdint.h>

#include "fastadv.h"

#ifdef __cplusplus
extern "C" {
#endif

/* fp32 workspace floats fastadv_pgd_step needs (3 partial sums per stage-1
 * block, or per row when sparse; 0 when nothing to reduce).  Depends on the
 * sizes only, never on the device. */
FASTADV_API int64_t fastadv_pgd_workspace_floats(int64_t rows, int64_t cols, int sparse);

/* One PGD step in place: reduction, finalize (writes coef[0..3], fp32 on the
 * device), fused update.  Three launches, or the finalize only when there is
 * nothing to reduce (dense: rows*cols == 0; sparse: rows == 0). */
FASTADV_API int fastadv_pgd_step(void* w, const void* g, void* backup, int dtype,
                                 int64_t rows, int64_t cols, uint8_t* mask, uint8_t* saved,
                                 int first, float* workspace, float* coef,
                                 float alpha, float eps, void* stream);

/* w[r, :] <- backup[r, :] bit for bit and saved[r] <- 0 for every row with
 * saved[r] != 0.  One launch when rows > 0, none otherwise. */
FASTADV_API int fastadv_pgd_restore_rows(void* w, const void* backup, int dtype,
                                         int64_t rows, int64_t cols, uint8_t* saved,
                                         void* stream);

#ifdef __cplusplus
} /* extern "C" */
#endif

#endif /* FASTADV_PGD_H_ */
