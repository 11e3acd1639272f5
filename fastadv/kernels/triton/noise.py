"""Triton kernels for noise injection and SiFT: the noise is drawn inside the
kernel (Philox, keyed from the PyTorch generator: see :mod:`.rng`), so each op
reads its input once and writes its output once.

Noise ops (one launch each):

* :func:`add_noise` -- ``out = x + r * s`` in fp32, rounded once, with
  ``r ~ N(0, 1)`` or ``U[-1, 1)`` and ``s`` a scalar or a per-row scale (NEFTune:
  ``s[row] = mask[row] * alpha / sqrt(L * d)``, made by :func:`neftune_scale`).
  ``out`` may be ``x`` (in place).
* :func:`token_ids` -- the seed's token-id noise,
  ``clamp(long(float(ids) + f * z), 0, V - 1)``.
* :func:`weight_noise` -- multi-tensor: one launch perturbs every tensor of a
  dtype group in place, ``w <- w + std * z``, and writes its bit-exact backup
  in the same pass.  The tensors are listed in the shared multi-tensor table
  (:class:`fastadv.kernels.host.TensorTable`, the CUDA backend reads the same
  layout); the restore is the multi-tensor copy.

SiFT (DeBERTa's perturbation layer, on a normalised input ``x [rows, cols]``):

* :func:`sift_init` -- ``delta = clamp(ip * z, -2 ip, 2 ip)`` (fp32) and
  ``pert = x + delta`` in one pass.
* :func:`sift_update` -- ``delta += lr * g / (1e-6 + max_row |g|)`` unless
  ``||g||`` is NaN or inf (decided on the device), then ``pert = x + delta``:
  a row pass (sum of squares and max of |g| per row), a one-program finalize
  (``||g||``, fixed order), one element-wise pass.

Rounding: the element-wise launches pass ``enable_fp_fusion=False``, so
``x + r * s`` is rounded twice on the GPU as under the interpreter and in the
torch reference (no FMA contraction).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import count_launch
from . import multi_tensor as mt
from . import rng

QUARTER = rng.QUARTER
CHUNK = rng.CHUNK
NUM_WARPS = 8                 # 256 threads: 4 Philox counters (16 elements) each per chunk
BLOCK = 4096                  # elements per program, non-random element-wise passes
FINALIZE_BLOCK = 1024


# ---- element-wise noise ------------------------------------------------------------------------

@triton.jit
def _row_of(offs, row_len, IDX32: tl.constexpr):
    # offs // row_len (int64); the division in 32 bits when every offset fits (int64
    # division is slow on GPUs).  One return: compiled Triton rejects branches that
    # return different types.
    if IDX32:
        r = (offs.to(tl.int32) // row_len).to(tl.int64)
    else:
        r = offs // row_len
    return r


@triton.jit
def _add_quarter(x_ptr, out_ptr, offs, numel, r, scale, rs_ptr, row_len, ROW_SCALE: tl.constexpr,
                 IDX32: tl.constexpr):
    m = offs < numel
    x = tl.load(x_ptr + offs, mask=m, other=0.0).to(tl.float32)
    if ROW_SCALE:
        s = tl.load(rs_ptr + _row_of(offs, row_len, IDX32), mask=m, other=0.0)
    else:
        s = scale
    tl.store(out_ptr + offs, (x + r * s).to(out_ptr.dtype.element_ty), mask=m)


@triton.jit
def _add_noise_kernel(x_ptr, out_ptr, key_ptr, numel, scale, rs_ptr, row_len,
                      UNIFORM: tl.constexpr, ROW_SCALE: tl.constexpr, IDX32: tl.constexpr,
                      QUARTER_: tl.constexpr):
    chunk = tl.program_id(0)
    seed, base = rng.load_key(key_ptr)
    ctr = rng.chunk_counters(base, chunk, QUARTER_)
    if UNIFORM:
        u0, u1, u2, u3 = rng.uniform4x(seed, ctr)
        r0, r1, r2, r3 = 2.0 * u0 - 1.0, 2.0 * u1 - 1.0, 2.0 * u2 - 1.0, 2.0 * u3 - 1.0
    else:
        r0, r1, r2, r3 = rng.normal4x(seed, ctr)
    offs = chunk.to(tl.int64) * 4 * QUARTER_ + tl.arange(0, QUARTER_)
    _add_quarter(x_ptr, out_ptr, offs, numel, r0, scale, rs_ptr, row_len, ROW_SCALE, IDX32)
    _add_quarter(x_ptr, out_ptr, offs + QUARTER_, numel, r1, scale, rs_ptr, row_len, ROW_SCALE, IDX32)
    _add_quarter(x_ptr, out_ptr, offs + 2 * QUARTER_, numel, r2, scale, rs_ptr, row_len, ROW_SCALE, IDX32)
    _add_quarter(x_ptr, out_ptr, offs + 3 * QUARTER_, numel, r3, scale, rs_ptr, row_len, ROW_SCALE, IDX32)


@triton.jit
def _neftune_scale_kernel(mask_ptr, scale_ptr, seq_len, alpha_over_sqrt_d, BLOCK_T: tl.constexpr):
    # One program per sequence: L = sum(mask); scale[t] = mask[t] * alpha / sqrt(L * d)
    # (0 for an all-padding sequence, where the reference divides by 0).
    b = tl.program_id(0)
    row = b.to(tl.int64) * seq_len
    acc = tl.zeros([BLOCK_T], dtype=tl.float32)
    for start in range(0, seq_len, BLOCK_T):
        offs = start + tl.arange(0, BLOCK_T)
        acc += tl.load(mask_ptr + row + offs, mask=offs < seq_len, other=0).to(tl.float32)
    length = tl.sum(acc, axis=0)
    f = tl.where(length > 0, tl.div_rn(alpha_over_sqrt_d, tl.sqrt_rn(tl.maximum(length, 1e-30))), 0.0)
    for start in range(0, seq_len, BLOCK_T):
        offs = start + tl.arange(0, BLOCK_T)
        m = offs < seq_len
        mk = tl.load(mask_ptr + row + offs, mask=m, other=0).to(tl.float32)
        tl.store(scale_ptr + row + offs, mk * f, mask=m)


@triton.jit
def _ids_quarter(ids_ptr, out_ptr, offs, numel, z, factor, vmax):
    m = offs < numel
    ids = tl.load(ids_ptr + offs, mask=m, other=0)
    v = (ids.to(tl.float32) + z * factor).to(tl.int64)  # truncation toward zero, as .long()
    v = tl.minimum(tl.maximum(v, 0), vmax)
    tl.store(out_ptr + offs, v.to(out_ptr.dtype.element_ty), mask=m)


@triton.jit
def _token_ids_kernel(ids_ptr, out_ptr, key_ptr, numel, factor, vmax, QUARTER_: tl.constexpr):
    chunk = tl.program_id(0)
    seed, base = rng.load_key(key_ptr)
    z0, z1, z2, z3 = rng.normal4x(seed, rng.chunk_counters(base, chunk, QUARTER_))
    offs = chunk.to(tl.int64) * 4 * QUARTER_ + tl.arange(0, QUARTER_)
    _ids_quarter(ids_ptr, out_ptr, offs, numel, z0, factor, vmax)
    _ids_quarter(ids_ptr, out_ptr, offs + QUARTER_, numel, z1, factor, vmax)
    _ids_quarter(ids_ptr, out_ptr, offs + 2 * QUARTER_, numel, z2, factor, vmax)
    _ids_quarter(ids_ptr, out_ptr, offs + 3 * QUARTER_, numel, z3, factor, vmax)


def _check_key(key: torch.Tensor) -> None:
    if key.dtype != torch.int64 or key.numel() != 2:
        raise ValueError("key must be an int64 tensor [seed, base] (see rng.new_key)")


def add_noise(x: torch.Tensor, out: torch.Tensor, key: torch.Tensor, scale: float, *,
              uniform: bool = False, row_scale: torch.Tensor | None = None, row_len: int = 1) -> None:
    """``out = x + r * s`` (``out`` may be ``x``); contiguous tensors of one shape."""
    _check_key(key)
    numel = x.numel()
    if numel == 0:
        return
    rs = row_scale if row_scale is not None else key  # placeholder pointer when unused
    _add_noise_kernel[(rng.chunks(numel),)](
        x, out, key, numel, float(scale), rs, max(int(row_len), 1),
        UNIFORM=bool(uniform), ROW_SCALE=row_scale is not None, IDX32=rng.chunks(numel) * CHUNK < 2 ** 31,
        QUARTER_=QUARTER, num_warps=NUM_WARPS, enable_fp_fusion=False)
    count_launch("triton.noise_add")


def neftune_scale(mask2d: torch.Tensor, scale_out: torch.Tensor, alpha_over_sqrt_d: float) -> None:
    """``scale_out[b, t] = mask[b, t] * alpha / sqrt(L_b * d)`` (fp32), ``L_b = sum_t mask[b, t]``."""
    batch, seq_len = mask2d.shape
    if batch == 0 or seq_len == 0:
        return
    block_t = min(triton.next_power_of_2(seq_len), 4096)
    _neftune_scale_kernel[(batch,)](mask2d, scale_out, seq_len, float(alpha_over_sqrt_d), BLOCK_T=block_t)
    count_launch("triton.neftune_scale")


def token_ids(ids: torch.Tensor, out: torch.Tensor, key: torch.Tensor, factor: float, vocab_size: int) -> None:
    _check_key(key)
    numel = ids.numel()
    if numel == 0:
        return
    _token_ids_kernel[(rng.chunks(numel),)](ids, out, key, numel, float(factor), int(vocab_size) - 1,
                                            QUARTER_=QUARTER, num_warps=NUM_WARPS,
                                            enable_fp_fusion=False)
    count_launch("triton.noise_token_ids")


# ---- multi-tensor weight noise ---------------------------------------------------------------------

# The work list is the shared multi-tensor table (fastadv.kernels.host.TensorTable) of two
# lists, 0 = w (the weights) and 1 = b (their backups), in chunks of CHUNK = 4 * QUARTER
# elements.  Chunks are numbered across the tensors: chunk c draws Philox counters
# base + c * QUARTER + j, so tensors never share counters.

@triton.jit
def _wn_quarter(w_p, b_p, offs, end, z, std, MASKED: tl.constexpr):
    w = mt.load(w_p, offs, end, MASKED)
    mt.store(b_p, offs, w, end, MASKED)
    mt.store(w_p, offs, (w.to(tl.float32) + z * std).to(w.dtype), end, MASKED)


@triton.jit
def _weight_noise_kernel(table, T, like, key_ptr, std, QUARTER_: tl.constexpr, ALIGNED: tl.constexpr):
    chunk = tl.program_id(0)
    t, start, end = mt.work_item(table, chunk, T, 2, 4 * QUARTER_)
    w_p = mt.tensor_ptr(table, 0, t, T, like, ALIGNED)
    b_p = mt.tensor_ptr(table, 1, t, T, like, ALIGNED)
    seed, base = rng.load_key(key_ptr)
    z0, z1, z2, z3 = rng.normal4x(seed, rng.chunk_counters(base, chunk, QUARTER_))
    offs = start + tl.arange(0, QUARTER_)
    if start + 4 * QUARTER_ <= end:  # a whole chunk: unmasked (vector) access
        _wn_quarter(w_p, b_p, offs, end, z0, std, False)
        _wn_quarter(w_p, b_p, offs + QUARTER_, end, z1, std, False)
        _wn_quarter(w_p, b_p, offs + 2 * QUARTER_, end, z2, std, False)
        _wn_quarter(w_p, b_p, offs + 3 * QUARTER_, end, z3, std, False)
    else:
        _wn_quarter(w_p, b_p, offs, end, z0, std, True)
        _wn_quarter(w_p, b_p, offs + QUARTER_, end, z1, std, True)
        _wn_quarter(w_p, b_p, offs + 2 * QUARTER_, end, z2, std, True)
        _wn_quarter(w_p, b_p, offs + 3 * QUARTER_, end, z3, std, True)


def weight_noise(table: mt.TensorTable, dtype: torch.dtype, key: torch.Tensor, std: float) -> None:
    """In place ``w <- w + std * z`` for every tensor of the two-list table
    (``0 = w``, ``1 = backup``, chunks of :data:`CHUNK` elements), the original
    bits written to the backups in the same pass.  One launch.  The restore is
    the multi-tensor copy (:func:`.multi_tensor.copy`) on a table of the live
    tensors.  ``table.aligned`` (every address a multiple of 16 bytes) selects
    vector access."""
    _check_key(key)
    if table.n_lists != 2 or table.chunk != CHUNK:
        raise ValueError(f"weight noise needs a table of 2 lists in {CHUNK}-element chunks, got "
                         f"{table.n_lists} lists of {table.chunk}")
    if table.n_chunks == 0:
        return
    _weight_noise_kernel[(table.n_chunks,)](table.data, table.n_tensors, mt.witness(dtype, table.device), key,
                                            float(std), QUARTER_=QUARTER, ALIGNED=bool(table.aligned),
                                            num_warps=NUM_WARPS, enable_fp_fusion=False)
    count_launch("triton.weight_noise")


# ---- SiFT ----------------------------------------------------------------------------------------

@triton.jit
def _sift_init_quarter(x_ptr, delta_ptr, pert_ptr, offs, numel, z, ip):
    m = offs < numel
    d = tl.minimum(tl.maximum(z * ip, -2.0 * ip), 2.0 * ip)
    x = tl.load(x_ptr + offs, mask=m, other=0.0).to(tl.float32)
    tl.store(delta_ptr + offs, d, mask=m)
    tl.store(pert_ptr + offs, (x + d).to(pert_ptr.dtype.element_ty), mask=m)


@triton.jit
def _sift_init_kernel(x_ptr, delta_ptr, pert_ptr, key_ptr, numel, ip, QUARTER_: tl.constexpr):
    chunk = tl.program_id(0)
    seed, base = rng.load_key(key_ptr)
    z0, z1, z2, z3 = rng.normal4x(seed, rng.chunk_counters(base, chunk, QUARTER_))
    offs = chunk.to(tl.int64) * 4 * QUARTER_ + tl.arange(0, QUARTER_)
    _sift_init_quarter(x_ptr, delta_ptr, pert_ptr, offs, numel, z0, ip)
    _sift_init_quarter(x_ptr, delta_ptr, pert_ptr, offs + QUARTER_, numel, z1, ip)
    _sift_init_quarter(x_ptr, delta_ptr, pert_ptr, offs + 2 * QUARTER_, numel, z2, ip)
    _sift_init_quarter(x_ptr, delta_ptr, pert_ptr, offs + 3 * QUARTER_, numel, z3, ip)


@triton.jit
def _sift_row_stats_kernel(g_ptr, sumsq_ptr, rowmax_ptr, cols, BLOCK_C: tl.constexpr):
    row = tl.program_id(0)
    base = row.to(tl.int64) * cols
    acc = tl.zeros([BLOCK_C], dtype=tl.float32)
    mx = tl.zeros([BLOCK_C], dtype=tl.float32)
    for start in range(0, cols, BLOCK_C):
        offs = start + tl.arange(0, BLOCK_C)
        g = tl.load(g_ptr + base + offs, mask=offs < cols, other=0.0).to(tl.float32)
        acc += g * g
        mx = tl.maximum(mx, tl.abs(g))
    tl.store(sumsq_ptr + row, tl.sum(acc, axis=0))
    tl.store(rowmax_ptr + row, tl.max(mx, axis=0))


@triton.jit
def _finalize_norm_kernel(part_ptr, n, norm_ptr, ok_ptr, BLOCK_: tl.constexpr):
    # ||g|| from the row partials in a fixed order, and whether it is finite
    acc = tl.zeros([BLOCK_], dtype=tl.float32)
    for start in range(0, n, BLOCK_):
        offs = start + tl.arange(0, BLOCK_)
        acc += tl.load(part_ptr + offs, mask=offs < n, other=0.0)
    norm = tl.sqrt_rn(tl.sum(acc, axis=0))
    tl.store(norm_ptr, norm)
    tl.store(ok_ptr, ((norm == norm) & (norm != float("inf"))).to(tl.uint8))


@triton.jit
def _sift_update_kernel(x_ptr, delta_ptr, g_ptr, rowmax_ptr, norm_ptr, pert_ptr, numel, cols, lr,
                        IDX32: tl.constexpr, BLOCK_: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK_ + tl.arange(0, BLOCK_)
    m = offs < numel
    d = tl.load(delta_ptr + offs, mask=m, other=0.0).to(tl.float32)  # fp32 (a no-op for the fp32 delta)
    norm = tl.load(norm_ptr)
    # DeBERTa skips the step when ||g|| is NaN or inf; decided here, on the device.
    if (norm == norm) & (norm != float("inf")):
        g = tl.load(g_ptr + offs, mask=m, other=0.0).to(tl.float32)
        gmax = tl.load(rowmax_ptr + _row_of(offs, cols, IDX32), mask=m, other=1.0)
        d = d + tl.div_rn(lr * g, 1e-6 + gmax)
        tl.store(delta_ptr + offs, d.to(delta_ptr.dtype.element_ty), mask=m)
    x = tl.load(x_ptr + offs, mask=m, other=0.0).to(tl.float32)
    tl.store(pert_ptr + offs, (x + d).to(pert_ptr.dtype.element_ty), mask=m)


def sift_init(x: torch.Tensor, delta: torch.Tensor, pert: torch.Tensor, key: torch.Tensor,
              init_perturbation: float) -> None:
    """``delta = clamp(ip * z, -2 ip, 2 ip)`` (fp32), ``pert = (x + delta)`` in x's dtype.  One launch."""
    _check_key(key)
    numel = x.numel()
    if numel == 0:
        return
    _sift_init_kernel[(rng.chunks(numel),)](x, delta, pert, key, numel, float(init_perturbation),
                                            QUARTER_=QUARTER, num_warps=NUM_WARPS,
                                            enable_fp_fusion=False)
    count_launch("triton.sift_init")


def sift_update(x2d: torch.Tensor, delta: torch.Tensor, grad: torch.Tensor, pert: torch.Tensor,
                learning_rate: float) -> torch.Tensor:
    """DeBERTa's step on ``[rows, cols]`` tensors: ``delta`` updated in place unless
    ``||grad||`` is NaN/inf, ``pert = x + delta``.  Three launches.  Returns the
    device flag ``||grad|| is finite`` (0-dim bool, not read on the host)."""
    rows, cols = x2d.shape
    norm = torch.empty(1, dtype=torch.float32, device=x2d.device)
    ok = torch.empty(1, dtype=torch.uint8, device=x2d.device)
    sumsq = torch.empty(max(rows, 1), dtype=torch.float32, device=x2d.device)
    rowmax = torch.empty(max(rows, 1), dtype=torch.float32, device=x2d.device)
    if rows and cols:
        block_c = min(triton.next_power_of_2(cols), 4096)
        _sift_row_stats_kernel[(rows,)](grad, sumsq, rowmax, cols, BLOCK_C=block_c)
        count_launch("triton.sift_row_stats")
    else:
        rows = 0
    _finalize_norm_kernel[(1,)](sumsq, rows, norm, ok, BLOCK_=FINALIZE_BLOCK)
    count_launch("triton.sift_finalize")
    numel = x2d.numel()
    if numel:
        _sift_update_kernel[(triton.cdiv(numel, BLOCK),)](x2d, delta, grad, rowmax, norm, pert, numel, cols,
                                                          float(learning_rate),
                                                          IDX32=triton.cdiv(numel, BLOCK) * BLOCK < 2 ** 31,
                                                          BLOCK_=BLOCK, enable_fp_fusion=False)
        count_launch("triton.sift_update")
    return ok.view(torch.bool)[0]
