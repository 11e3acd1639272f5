/* fastadv CUDA library: a plain C ABI (no PyTorch headers), loaded from Python
 * with ctypes by fastadv/kernels/cuda.py.
 *
 * Conventions shared by every function:
 *   - pointers are raw device pointers; tensors are contiguous (row-major);
 *   - `dtype` is one of FASTADV_FLOAT32, FASTADV_FLOAT16, FASTADV_BFLOAT16;
 *   - `stream` is a cudaStream_t passed as void* (NULL = legacy default stream);
 *   - the return value is 0 on success, else a cudaError_t code, and
 *     fastadv_last_error() returns the message of the last failure
 *     (per host thread);
 *   - nothing synchronises the host: every kernel is enqueued on `stream`.
 */
#ifndef FASTADV_H_
#define FASTADV_H_

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define FASTADV_API __attribute__((visibility("default")))

#define FASTADV_ABI_VERSION 1

enum fastadv_dtype {
  FASTADV_FLOAT32 = 0,
  FASTADV_FLOAT16 = 1,
  FASTADV_BFLOAT16 = 2
};

/* Message of the last failure on this host thread ("" if none). */
FASTADV_API const char* fastadv_last_error(void);

/* FASTADV_ABI_VERSION of the built library. */
FASTADV_API int fastadv_abi_version(void);

/* ---- FGM ---------------------------------------------------------------
 * A parameter is viewed as [rows, cols].  Dense mode (mask / slots NULL) uses
 * the flat tensor of rows*cols elements.  Row-sparse mode uses an embedding
 * table [rows, cols] and a uint8 row mask (rows that may hold a gradient).
 */

/* Number of fp32 workspace floats fastadv_fgm_norm needs (0 when nothing to
 * reduce).  Depends on the sizes only, never on the device. */
FASTADV_API int64_t fastadv_fgm_workspace_floats(int64_t rows, int64_t cols, int sparse);

/* *norm_out = sqrt(sum of g*g) in fp32, deterministic (two stages, fixed
 * order, no float atomics).  Sparse mode (mask != NULL): rows with mask 0 are
 * not read; a masked row whose sum of squares is exactly 0 has its mask
 * cleared.  Empty input gives 0. */
FASTADV_API int fastadv_fgm_norm(const void* g, int dtype, int64_t rows, int64_t cols,
                                 uint8_t* mask, float* workspace, float* norm_out,
                                 void* stream);

/* backup <- w, then, when *norm (read on the device) is non-zero and not NaN,
 * w <- w + (eps * g) / norm in fp32, rounded once to dtype.
 * Dense (slots == NULL): every element; backup has rows*cols elements.
 * Sparse: slots is the int32 inclusive cumsum of the row mask; row r is touched
 * iff slots[r] != (r ? slots[r-1] : 0), and its backup is row slots[r]-1 of
 * backup [*, cols].  Untouched rows are neither read nor written. */
FASTADV_API int fastadv_fgm_update(void* w, const void* g, void* backup, int dtype,
                                   int64_t rows, int64_t cols, const int32_t* slots,
                                   const float* norm, float eps, void* stream);

/* w[r, :] <- backup[slots[r]-1, :] for every touched row, bit-exact. */
FASTADV_API int fastadv_fgm_restore_rows(void* w, const void* backup, int dtype,
                                         int64_t rows, int64_t cols, const int32_t* slots,
                                         void* stream);

#ifdef __cplusplus
} /* extern "C" */
#endif

#endif /* FASTADV_H_ */
