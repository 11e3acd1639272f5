"""Triton kernels for noise injection: the noise is drawn inside the kernel
(Philox, keyed from the PyTorch generator: see :mod:`.rng`), so each op reads
its input once and writes its output once.

* :func:`add_noise` -- ``out = x + r * s`` in fp32, rounded once, with
  ``r ~ N(0, 1)`` or ``U[-1, 1)`` and ``s`` a scalar or a per-row scale (NEFTune's,
  made by :func:`fastadv.kernels.triton.neftune.neftune_scale`).  ``out`` may
  be ``x`` (in place).
* :func:`token_ids` -- the seed's token-id noise,
  ``clamp(long(float(ids) + f * z), 0, V - 1)``.
* :func:`weight_noise` -- multi-tensor: one launch perturbs every tensor of a
  dtype group in place, ``w <- w + std * z``, and writes its bit-exact backup
  in the same pass.  The tensors are listed in the shared multi-tensor table
  (:class:`fastadv.kernels.host.TensorTable`, the CUDA backend reads the same
  layout); the restore is the multi-tensor copy.

SiFT's kernels are in :mod:`.sift`, NEFTune's row scale in :mod:`.neftune`.

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


# ---- element-wise noise ------------------------------------------------------------------------

@triton.jit
def row_of(offs, row_len, IDX32: tl.constexpr):
    # offs // row_len (int64); the division in 32 bits when every offset fits (int64
    # division is slow on GPUs).  Also used by SiFT's update.  One return: compiled Triton rejects branches that
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
        s = tl.load(rs_ptr + row_of(offs, row_len, IDX32), mask=m, other=0.0)
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


# ---- weight noise on shards (FSDP2) ----------------------------------------------------------------
# Each shard draws the counters its elements get in the unsharded launch (host.shard_counters):
# the two-list table lists the shards with their *spans* (the shard widened at the front to the
# global chunk boundary, lead elements), ``place[2t], place[2t+1]`` = (global chunk of the span's
# first chunk, lead).  Span positions below lead belong to the previous shard: masked off.

@triton.jit
def _shard_quarter(w_p, b_p, s, lead, end, z, std):
    m = (s >= lead) & (s < end)
    offs = s - lead                       # the shard's own element index (negative ones are masked)
    w = tl.load(w_p + offs, mask=m, other=0.0)
    tl.store(b_p + offs, w, mask=m)
    tl.store(w_p + offs, (w.to(tl.float32) + z * std).to(w.dtype), mask=m)


@triton.jit
def _shard_weight_noise_kernel(table, T, like, place, key_ptr, std, QUARTER_: tl.constexpr):
    pid = tl.program_id(0)
    t, start, end = mt.work_item(table, pid, T, 2, 4 * QUARTER_)   # span coordinates
    w_p = mt.tensor_ptr(table, 0, t, T, like, False)
    b_p = mt.tensor_ptr(table, 1, t, T, like, False)
    chunk = tl.load(place + 2 * t) + start // (4 * QUARTER_)         # the unsharded launch's chunk
    lead = tl.load(place + 2 * t + 1)
    seed, base = rng.load_key(key_ptr)
    z0, z1, z2, z3 = rng.normal4x(seed, rng.chunk_counters(base, chunk, QUARTER_))
    s = start + tl.arange(0, QUARTER_)
    _shard_quarter(w_p, b_p, s, lead, end, z0, std)
    _shard_quarter(w_p, b_p, s + QUARTER_, lead, end, z1, std)
    _shard_quarter(w_p, b_p, s + 2 * QUARTER_, lead, end, z2, std)
    _shard_quarter(w_p, b_p, s + 3 * QUARTER_, lead, end, z3, std)


def shard_weight_noise(table: mt.TensorTable, place: torch.Tensor, dtype: torch.dtype, key: torch.Tensor,
                       std: float) -> None:
    """:func:`weight_noise` on shards: ``table`` lists the shards (list 0) and
    their backups (list 1) with the spans of :func:`fastadv.kernels.host.shard_counters`
    as sizes, ``place`` (int64, device) its ``place``.  Every element gets the
    number the unsharded launch with the same key gives it.  One launch."""
    _check_key(key)
    if table.n_lists != 2 or table.chunk != CHUNK:
        raise ValueError(f"weight noise needs a table of 2 lists in {CHUNK}-element chunks, got "
                         f"{table.n_lists} lists of {table.chunk}")
    if place.dtype != torch.int64 or place.numel() != 2 * table.n_tensors:
        raise ValueError(f"place must be int64 with 2 entries per tensor ({2 * table.n_tensors})")
    if table.n_chunks == 0:
        return
    _shard_weight_noise_kernel[(table.n_chunks,)](table.data, table.n_tensors, mt.witness(dtype, table.device),
                                                  place, key, float(std), QUARTER_=QUARTER,
                                                  num_warps=NUM_WARPS, enable_fp_fusion=False)
    count_launch("triton.shard_weight_noise")
