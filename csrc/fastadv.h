/* fastadv CUDA library: a plain C ABI (no PyTorch headers), loaded from Python
 * with ctypes by fastadv/kernels/cuda/__init__.py (launchers: fastadv/kernels/cuda/<op>.py).
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

#define FASTADV_ABI_VERSION 4

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
 * A parameter is viewed as [rows, cols].  Dense mode (flags NULL) uses the
 * flat tensor of rows*cols elements.  Row mode uses [rows, cols] and a uint8
 * flag per row, written by the norm pass from the gradient itself: 1 where
 * the row holds an entry that is not zero (NaN and inf included).
 */

/* Number of fp32 workspace floats fastadv_fgm_norm needs (0 when nothing to
 * reduce).  Depends on the sizes only, never on the device. */
FASTADV_API int64_t fastadv_fgm_workspace_floats(int64_t rows, int64_t cols, int sparse);

/* *norm_out = sqrt(sum of g*g) in fp32, deterministic (two stages, fixed
 * order, no float atomics).  Row mode (flags != NULL): every row is read and
 * flags[r] is set to 1 iff row r of g holds a non-zero entry, else 0.  Empty
 * input gives 0. */
FASTADV_API int fastadv_fgm_norm(const void* g, int dtype, int64_t rows, int64_t cols,
                                 uint8_t* flags, float* workspace, float* norm_out,
                                 void* stream);

/* backup <- w, then, when *norm (read on the device) is non-zero and not NaN,
 * w <- w + (eps * g) / norm in fp32, rounded once to dtype.
 * Dense (flags == NULL): every element; backup has rows*cols elements.
 * Row mode: only rows with flags[r] != 0, saved at row r of the full-size
 * backup [rows, cols]; other rows are neither read nor written. */
FASTADV_API int fastadv_fgm_update(void* w, const void* g, void* backup, int dtype,
                                   int64_t rows, int64_t cols, const uint8_t* flags,
                                   const float* norm, float eps, void* stream);

/* w[r, :] <- backup[r, :] for every row with flags[r] != 0, bit-exact. */
FASTADV_API int fastadv_fgm_restore_rows(void* w, const void* backup, int dtype,
                                         int64_t rows, int64_t cols, const uint8_t* flags,
                                         void* stream);

/* ---- embedding PGD (csrc/pgd.cu) ----------------------------------------
 * fastadv CUDA library: PGD on an embedding (one step, and the restore of the
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

/* The first half of fastadv_pgd_step: the reduction only, sums[0..2] (fp32
 * on the device) <- [||g||^2, ||r||^2, <r, g>] of this tensor; row mode
 * writes mask; w, backup and saved are only read.  Two launches (partials +
 * their sum), or one when there is nothing to reduce.  (FSDP2 shards step
 * through the multi-tensor calls below, fastadv_pgd_mt_*, which finalize
 * from such sums after the caller's all_reduce.) */
FASTADV_API int fastadv_pgd_sums(const void* w, const void* g, const void* backup, int dtype,
                                 int64_t rows, int64_t cols, uint8_t* mask, const uint8_t* saved,
                                 int first, float* workspace, float* sums, void* stream);

/* w[r, :] <- backup[r, :] bit for bit and saved[r] <- 0 for every row with
 * saved[r] != 0.  One launch when rows > 0, none otherwise. */
FASTADV_API int fastadv_pgd_restore_rows(void* w, const void* backup, int dtype,
                                         int64_t rows, int64_t cols, uint8_t* saved,
                                         void* stream);

/* ---- FGM and PGD over many tensors in one call (csrc/fgm.cu, csrc/pgd.cu) ----------------
 * FSDP2 shards (the caller all_reduces the sums between the two halves) and several unsharded
 * tables: 2 x groups + 1 launches, whatever the number of tensors.  `table` is a work table of
 * one group (csrc/multi_tensor.cuh: `lists` lists of `tensors` tensors, `chunks` chunks of
 * `chunk` elements), `plan` the call's int64 device plan and `group_plan` the group's rows in
 * it (layout in csrc/multi_tensor.cuh, "per-tensor reductions of one call"), `blocks` the
 * group's dense stage-1 blocks (its owner entries).  Dense groups (by_rows == 0): lists
 * 0 = w, 1 = g, 2 = backup, flat.  Row groups: FGM lists 0 = flags, 1 = w, 2 = g, 3 = backup;
 * PGD lists 0 = mask, 1 = saved, 2 = w, 3 = g, 4 = backup; list 0's numel is the row count,
 * chunks of rows.  Every tensor's partials, sums and update are bitwise those of the
 * per-tensor functions above on it (same blocks, same vector width, same summation order;
 * that is the CUDA per-tensor order, not the Triton kernels': the two backends agree within
 * fp32 rounding, not bitwise).
 *
 * fastadv_fgm_mt_partials: each tensor's fastadv_fgm_norm stage-1 partials at its first
 * partial (row mode writes the flags).  fastadv_fgm_mt_sum: out[slot_i] = sum of tensor i's
 * partials (i < tensors, the call's), the finalize's order, no sqrt.  fastadv_fgm_mt_update:
 * fastadv_fgm_update on every tensor with norm = norms[slot].
 * fastadv_pgd_mt_partials: fastadv_pgd_sums's partials, [3][n_parts] (row mode writes mask;
 * `first`: dense r = 0).  fastadv_pgd_mt_sum: sums[3 slot_i + k] = [||g||^2, ||r||^2, <r, g>].
 * fastadv_pgd_mt_apply: fastadv_pgd_apply on every tensor from sums[3 slot ...]. */
FASTADV_API int fastadv_fgm_mt_partials(const int64_t* table, int lists, int64_t tensors, int64_t chunks,
                                        int64_t chunk, int dtype, int by_rows, const int64_t* group_plan,
                                        int64_t blocks, float* partials, void* stream);
FASTADV_API int fastadv_fgm_mt_sum(const int64_t* plan, int64_t tensors, const float* partials, float* out,
                                   void* stream);
FASTADV_API int fastadv_fgm_mt_update(const int64_t* table, int lists, int64_t tensors, int64_t chunks,
                                      int64_t chunk, int dtype, int by_rows, const int64_t* group_plan,
                                      const float* norms, float eps, void* stream);
FASTADV_API int fastadv_pgd_mt_partials(const int64_t* table, int lists, int64_t tensors, int64_t chunks,
                                        int64_t chunk, int dtype, int by_rows, int first,
                                        const int64_t* group_plan, int64_t blocks, int64_t n_parts,
                                        float* partials, void* stream);
FASTADV_API int fastadv_pgd_mt_sum(const int64_t* plan, int64_t tensors, const float* partials, int64_t n_parts,
                                   float* sums, void* stream);
FASTADV_API int fastadv_pgd_mt_apply(const int64_t* table, int lists, int64_t tensors, int64_t chunks,
                                     int64_t chunk, int dtype, int by_rows, int first, const int64_t* group_plan,
                                     const float* sums, float alpha, float eps, void* stream);

/* ---- embedding FGSM (csrc/fgsm.cu) -----------------------------------------
 * out <- e + eps * sign(g) (sign(0) = sign(NaN) = 0), fp32 math rounded once;
 * e, g, out: n elements of dtype. */
FASTADV_API int fastadv_fgsm_perturb(const void* e, const void* g, void* out, int dtype,
                                     int64_t n, float eps, void* stream);

/* ---- multi-tensor plumbing (csrc/multi_tensor.cu) --------------------------------------
 * `table` is the device work list of fastadv/kernels/host.py (TensorTable; layout in
 * csrc/multi_tensor.cuh): `lists` lists of `tensors` tensors cut into `chunks` chunks of
 * `chunk` elements (a positive multiple of 16), one block per chunk.
 *
 * fastadv_mt_sumsq: one fp32 partial per chunk over lists 0 = w, 1 = g; mode 0 (AWP):
 * partials[c] = sum g^2 and partials[chunks + c] = sum w^2; mode 1 (SAM): sum g^2;
 * mode 2 (ASAM): sum (|w| g)^2.  fastadv_mt_norms: out[a * tensors + t] = sqrt(sum of
 * tensor t's partials in array a), partials laid out [arrays][chunks], fixed order.
 * fastadv_mt_global_norm: *out = sqrt(sum of partials[0, n)), fixed order.
 * fastadv_mt_copy: list dst_list <- list src_list, bit-exact when the dtypes match. */
FASTADV_API int fastadv_mt_sumsq(const int64_t* table, int lists, int64_t tensors, int64_t chunks,
                                 int64_t chunk, int dtype, int mode, float* partials, void* stream);
FASTADV_API int fastadv_mt_norms(const int64_t* table, int lists, int64_t tensors, int64_t chunks,
                                 const float* partials, int arrays, float* out, void* stream);
FASTADV_API int fastadv_mt_global_norm(const float* partials, int64_t n, float* out, void* stream);
FASTADV_API int fastadv_mt_copy(const int64_t* table, int lists, int64_t tensors, int64_t chunks,
                                int64_t chunk, int dst_list, int dst_dtype, int src_list, int src_dtype,
                                void* stream);

/* ---- AWP (csrc/awp.cu): lists 0 = w, 1 = g, 2 = backup; norms = [||g_t||] ++ [||w_t||].
 * Unless ||g_t|| is 0 or NaN (read on the device): w <- clamp(w + ((lr * g) / (||g|| + 1e-6))
 * * (||w|| + 1e-6), w0 -/+ eps * |w0|), w0 the backup (written from w first when
 * write_backup). */
FASTADV_API int fastadv_awp_update(const int64_t* table, int64_t tensors, int64_t chunks, int64_t chunk,
                                   int dtype, const float* norms, float lr, float eps, int write_backup,
                                   void* stream);

/* ---- SAM (csrc/sam.cu): lists 0 = w, 1 = g, 2 = backup; *norm the global norm.
 * backup <- w; w <- w + ((w^2 if adaptive) * g) * (rho / (*norm + 1e-12)). */
FASTADV_API int fastadv_sam_update(const int64_t* table, int64_t tensors, int64_t chunks, int64_t chunk,
                                   int dtype, const float* norm, float rho, int adaptive, void* stream);

/* ---- EMA / SWA (csrc/ema.cu): lists 0 = average, 1 = model.  a <- lerp(a, x, weight)
 * in fp32 (torch.lerp's formula); weight = 1 / (*count + 1) when count is not NULL. */
FASTADV_API int fastadv_mt_lerp(const int64_t* table, int64_t tensors, int64_t chunks, int64_t chunk,
                                int dtype_a, int dtype_x, float weight, const int64_t* count, void* stream);

/* ---- noise injection (csrc/noise.cu; key = int64 device [seed, base], csrc/rng.cuh) ----
 * fastadv_noise_add: out = x + r * s (out may be x), r ~ N(0, 1) or U[-1, 1) (uniform),
 * s = scale or row_scale[e / row_len].  fastadv_noise_token_ids: out = clamp(long(float(ids)
 * + factor * z), 0, vocab_size - 1).  fastadv_mt_weight_noise: two-list table (w, backup)
 * of RNG chunks (4 * fastadv_rng_quarter() elements): backup <- w, w <- w + std * z.
 * fastadv_rng_host_chunk: what chunk `chunk` of a launch with the host key draws (tests). */
FASTADV_API int64_t fastadv_rng_quarter(void);
FASTADV_API int fastadv_rng_host_chunk(const int64_t* key, int64_t chunk, uint32_t* words, float* normals,
                                       float* uniforms);
FASTADV_API int fastadv_noise_add(const void* x, void* out, int dtype, int64_t numel, const int64_t* key,
                                  float scale, const float* row_scale, int64_t row_len, int uniform,
                                  void* stream);
FASTADV_API int fastadv_noise_token_ids(const int64_t* ids, int64_t* out, int64_t numel, const int64_t* key,
                                        float factor, int64_t vocab_size, void* stream);
FASTADV_API int fastadv_mt_weight_noise(const int64_t* table, int64_t n_tensors, int64_t n_chunks, int dtype,
                                        const int64_t* key, float std_, void* stream);
/* fastadv_mt_shard_weight_noise: fastadv_mt_weight_noise on shards (FSDP2): the table lists the
 * shards with the spans of fastadv/kernels/host.py shard_counters as sizes, place (device int64,
 * 2 per tensor: first unsharded chunk of the span, lead) their place in the unsharded launch, so
 * every element draws the number the unsharded launch gives it. */
FASTADV_API int fastadv_mt_shard_weight_noise(const int64_t* table, int64_t n_tensors, int64_t n_chunks,
                                              const int64_t* place, int dtype, const int64_t* key, float std_,
                                              void* stream);

/* ---- NEFTune (csrc/neftune.cu): scale[b, t] = mask[b, t] * alpha_over_sqrt_d /
 * sqrt(sum_t mask[b, t]) (0 for an empty sequence); mask, scale: float32 [batch, seq_len]. */
FASTADV_API int fastadv_neftune_scale(const float* mask, float* scale, int64_t batch, int64_t seq_len,
                                      float alpha_over_sqrt_d, void* stream);

/* ---- SiFT (csrc/sift.cu) ------------------------------------------------------------------
 * fastadv_sift_init: delta = clamp(ip * z, -2 ip, 2 ip) (float32), pert = x + delta (dtype).
 * fastadv_sift_update on [rows, cols]: unless ||grad|| is NaN or inf, delta += lr * grad /
 * (1e-6 + max_row |grad|); then pert = x + delta; *ok = the step was taken (if ok != NULL);
 * workspace: fastadv_sift_workspace_floats(rows) floats. */
FASTADV_API int fastadv_sift_init(const void* x, float* delta, void* pert, int dtype, int64_t numel,
                                  const int64_t* key, float ip, void* stream);
FASTADV_API int64_t fastadv_sift_workspace_floats(int64_t rows);
FASTADV_API int fastadv_sift_update(const void* x, float* delta, const float* grad, void* pert, int dtype,
                                    int64_t rows, int64_t cols, float* workspace, uint8_t* ok, float lr,
                                    void* stream);

/* ---- input attacks (csrc/attacks.cu; fastadv.attacks) ----------------------
 * The CUDA twin of fastadv/kernels/triton/attacks.py.  Tensors are contiguous
 * [batch, per_sample]; out, adv, x (the clean images) and g share one dtype;
 * math in fp32 with IEEE roundings in torchattacks' order, rounded once on
 * store; `out` may equal `adv` (in place).  The per-sample sums are two-stage
 * (per-chunk partials in `workspace`, summed in a fixed order by every update
 * block): deterministic, no atomics. */

/* out = clip01(x + clamp(adv + alpha*sign(g) - x, -eps, eps)); x == NULL:
 * out = clip01(adv + alpha*sign(g)).  sign(0) = sign(NaN) = 0 (torch.sign). */
FASTADV_API int fastadv_attack_linf_step(void* out, const void* adv, const void* x, const void* g,
                                         int dtype, int64_t numel, float alpha, float eps,
                                         void* stream);
/* fp32 workspace floats of fastadv_attack_l2_step (kind 0) or
 * fastadv_attack_momentum_step (kind 1); 0 when there is nothing to do. */
FASTADV_API int64_t fastadv_attack_workspace_floats(int64_t batch, int64_t per_sample, int kind);
/* Per sample: a = adv + alpha*g/(||g|| + eps_div); d = a - x;
 * out = clip01(x + d*min(1, eps/||d||)), ||d||^2 taken as
 * ||adv-x||^2 + 2s<adv-x, g> + s^2||g||^2, s = alpha/(||g|| + eps_div). */
FASTADV_API int fastadv_attack_l2_step(void* out, const void* adv, const void* x, const void* g,
                                       int dtype, int64_t batch, int64_t per_sample, float alpha,
                                       float eps, float eps_div, float* workspace, void* stream);
/* Per sample: m = g/mean(|g|) + decay*m (fp32, in place; first != 0: the old m
 * is not read), out = clip01(x + clamp(adv + alpha*sign(m) - x, -eps, eps)). */
FASTADV_API int fastadv_attack_momentum_step(void* out, const void* adv, const void* x,
                                             const void* g, float* momentum, int first, int dtype,
                                             int64_t batch, int64_t per_sample, float alpha,
                                             float eps, float decay, float* workspace,
                                             void* stream);

/* ---- DP-SGD (csrc/dp.cu; fastadv.dp) ----------------------------------------
 * The CUDA twin of fastadv/kernels/triton/dp.py (its docstring has the math).
 * Per-sample tables (layout in csrc/multi_tensor.cuh) have three lists over
 * the per-sample sizes n_t: 0 = out [n_t], 1 = summed [n_t], 2 = per-sample
 * gradients [batch, n_t] (sample b's row at b * n_t); chunks of rng::kChunk
 * (4096) elements; key = int64 device [seed, base] (csrc/rng.cuh). */

/* partials[b * n_parts + col0 + c] = sum over chunk c of g[b]^2, for b < batch
 * (per-sample gradients of dtype `gdtype`). */
FASTADV_API int fastadv_dp_norm_partials(const int64_t* table, int64_t tensors, int64_t chunks,
                                         int64_t chunk, int64_t batch, int gdtype, float* partials,
                                         int64_t n_parts, int64_t col0, void* stream);
/* out[b] = clip factor min(1, C * (1 / (n_b + 1e-6))) (0 when n_b is not finite),
 * out[batch + b] = n_b (fp32 [2, batch]), n_b = sqrt of the fixed-order sum of
 * row b of the partials; *count (int64, may be NULL) += number of non-finite norms. */
FASTADV_API int fastadv_dp_clip_factors(const float* partials, int64_t n_parts, int64_t batch,
                                        float* out, int64_t* count, float max_norm, void* stream);
/* The fused pass: s = sum_b f_b g[b] (samples with factor 0 are not read) in
 * fp32, [+ summed], [summed <- s], [+ std_ * z (Philox chunk chunk0 + c)],
 * [/ divisor], out <- s.  flags: 1 read summed, 2 write summed, 4 write out,
 * 8 noise, 16 secure (four streams, summed, halved), 32 divide.  out and
 * summed have dtype `odtype`, the per-sample gradients `gdtype`. */
FASTADV_API int fastadv_dp_clip_sum(const int64_t* table, int64_t tensors, int64_t chunks,
                                    int64_t chunk, int64_t batch, int gdtype, int odtype,
                                    const float* factors, const int64_t* key, float std_,
                                    float divisor, int64_t chunk0, int flags, void* stream);
/* Seed 000's optimizer (one-list table of gradients): partials[col0 + c] = sum
 * over chunk c of g^2. */
FASTADV_API int fastadv_dp_seed_sumsq(const int64_t* table, int64_t tensors, int64_t chunks,
                                      int64_t chunk, int dtype, float* partials, int64_t col0,
                                      void* stream);
/* *out = sqrt(sum(partials[0, n))), fixed order. */
FASTADV_API int fastadv_dp_global_norm(const float* partials, int64_t n, float* out, void* stream);
/* In place g <- g * clamp(C * (1 / (*norm + 1e-6)), max=1) + sigma * z (noise when
 * key != NULL), over a one-list table. */
FASTADV_API int fastadv_dp_seed_update(const int64_t* table, int64_t tensors, int64_t chunks,
                                       int64_t chunk, int dtype, const float* norm,
                                       const int64_t* key, float max_norm, float sigma,
                                       int64_t chunk0, void* stream);

#ifdef __cplusplus
} /* extern "C" */
#endif

#endif /* FASTADV_H_ */
