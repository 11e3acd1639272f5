"""Triton kernels for DP-SGD: per-sample clipping and Gaussian noise in fused,
multi-tensor passes (the math and its Opacus counterpart are in
:mod:`fastadv.ops.dp`).

Work list.  A group of per-sample gradients ``g_t [B, n_t]`` (one element
dtype) is listed in a :class:`~.multi_tensor.TensorTable` built over the
*per-sample* sizes ``n_t``, with three lists::

    OUT = 0      out_t [n_t]      written: (summed + noise) / divisor
    SUMMED = 1   summed_t [n_t]   read and / or written: the noise-free clipped sum
    GRAD = 2     g_t [B, n_t]     read; sample b's row starts at b * n_t

(an unused list holds placeholder addresses that are never dereferenced).
Chunk ``c`` of the table is ``CHUNK = rng.CHUNK`` elements of one tensor, the
same for every sample, so one launch covers every tensor of the group.

Three launches per call, whatever the number of tensors (per dtype group for
the first and the last):

1. :func:`norm_partials` -- program ``(c, b)``: ``part[b, col0 + c] =
   sum of g_t[b, chunk c]^2`` (fp32).
2. :func:`clip_factors` -- program ``b``: sums row ``b`` of the partials in a
   fixed order (deterministic), ``n_b = sqrt(.)`` and Opacus's factor
   ``f_b = min(1, C * (1 / (n_b + 1e-6)))``; a non-finite ``n_b`` (a NaN or
   inf in the sample, or a norm beyond fp32) gives ``f_b = 0``: the sample is
   dropped, and counted.
3. :func:`clip_sum` -- program ``c``: reads every sample's chunk once
   (``b = 0 .. B-1`` in order, skipping samples with ``f_b = 0`` so a NaN is
   never multiplied in), ``s = sum_b f_b g_b`` in fp32, adds the old
   ``summed``, writes it back if asked, adds ``std * z`` (Philox inside the
   kernel, chunk ``chunk0 + c`` of the key: the layout of :mod:`.rng`, so every
   tensor and every group of one call draws disjoint counters), divides, and
   writes ``out`` rounded once.

The seed's (non-per-sample) optimizer uses :func:`seed_sumsq` and
:func:`seed_update` on a one-list table of gradients.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import count_launch
from . import multi_tensor as mt
from . import rng
from .multi_tensor import full_blocks, load, store, tensor_ptr, work_item

QUARTER = rng.QUARTER
CHUNK = rng.CHUNK            # elements per work item: one Philox chunk (4 quarters)
NORM_BLOCK = 1024            # elements per iteration of the norm programs
FINALIZE_BLOCK = 1024        # partials per iteration of the finalize programs
NUM_WARPS = 8
MAX_GRID_Y = 65535           # samples beyond this are looped over by the norm programs
OUT, SUMMED, GRAD = 0, 1, 2  # table lists
LISTS = 3
STREAM_STRIDE = 2 ** 61      # secure mode: stream k uses seed + k * 2^61 (seeds are < 2^61)


# ---------------------------------------------------------------- per-sample norms

@triton.jit
def _sumsq(p, start, end, acc, BLOCK: tl.constexpr):
    # acc + p[start:end]^2 in blocks: whole blocks unmasked (vector loads), the tail masked.
    n_full, tail = full_blocks(start, end, BLOCK)
    for i in range(0, n_full):
        x = load(p, start + i * BLOCK + tl.arange(0, BLOCK), end, False).to(tl.float32)
        acc += x * x
    if tail < end:
        x = load(p, tail + tl.arange(0, BLOCK), end, True).to(tl.float32)
        acc += x * x
    return acc


@triton.jit
def _row(g_p, b, n, ALIGNED: tl.constexpr):
    """Sample ``b``'s row of a ``[B, n]`` gradient (``n`` int64: 64-bit offsets);
    ALIGNED: the host checked the base address and ``n * element size``."""
    row = g_p + b * n
    if ALIGNED:
        row = tl.multiple_of(row, 16)
    return row


@triton.jit
def _norm_partials(table, T, B, like_g, part_ptr, P, col0, CHUNK_: tl.constexpr,
                   BLOCK: tl.constexpr, ALIGNED: tl.constexpr):
    c = tl.program_id(0)
    t, start, end = work_item(table, c, T, 3, CHUNK_)
    n = tl.load(table + 3 * T + t)                  # per-sample numel of tensor t
    g_p = tensor_ptr(table, 2, t, T, like_g, ALIGNED)
    for b in range(tl.program_id(1), B, tl.num_programs(1)):
        acc = _sumsq(_row(g_p, b, n, ALIGNED), start, end, tl.zeros([BLOCK], dtype=tl.float32), BLOCK)
        tl.store(part_ptr + b * P + col0 + c, tl.sum(acc, axis=0))


@triton.jit
def _clip_factors(part_ptr, P, B, out_ptr, count_ptr, max_norm, HAS_COUNT: tl.constexpr,
                  BLOCK: tl.constexpr):
    b = tl.program_id(0)
    row = part_ptr + b.to(tl.int64) * P
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for s in range(0, P, BLOCK):
        offs = s + tl.arange(0, BLOCK)
        acc += tl.load(row + offs, mask=offs < P, other=0.0)
    norm = tl.sqrt_rn(tl.sum(acc, axis=0))
    finite = norm < float("inf")                    # False for inf and NaN
    # Opacus 1.6: (max_grad_norm / (norm + 1e-6)).clamp(max=1.0), where
    # float / tensor is reciprocal(tensor) * float
    f = tl.div_rn(1.0, norm + 1e-6) * max_norm
    f = tl.where(finite, tl.minimum(f, 1.0), 0.0)
    tl.store(out_ptr + b, f)
    tl.store(out_ptr + B + b, norm)
    if HAS_COUNT:                                   # integer atomics: the count is deterministic
        tl.atomic_add(count_ptr, tl.where(finite, 0, 1).to(tl.int64))


# ---------------------------------------------------------------- clipped sum + noise

@triton.jit
def _normal_chunk(seed, base, chunk, SECURE: tl.constexpr, QUARTER_: tl.constexpr):
    """The four quarters of N(0, 1) of a chunk; SECURE: (z_0 + z_1 + z_2 + z_3) / 2
    over four independent Philox streams (seeds seed + k * 2^61)."""
    ctr = rng.chunk_counters(base, chunk, QUARTER_)
    z0, z1, z2, z3 = rng.normal4x(seed, ctr)
    if SECURE:
        for k in tl.static_range(1, 4):
            y0, y1, y2, y3 = rng.normal4x(seed + k * 2305843009213693952, ctr)
            z0 += y0
            z1 += y1
            z2 += y2
            z3 += y3
        z0 = z0 * 0.5
        z1 = z1 * 0.5
        z2 = z2 * 0.5
        z3 = z3 * 0.5
    return z0, z1, z2, z3


@triton.jit
def _finish_quarter(o_p, s_p, offs, end, acc, z, std, divisor, READ_SUMMED: tl.constexpr,
                    WRITE_SUMMED: tl.constexpr, WRITE_OUT: tl.constexpr, NOISE: tl.constexpr,
                    DIVIDE: tl.constexpr, MASKED: tl.constexpr):
    if READ_SUMMED:
        acc += load(s_p, offs, end, MASKED).to(tl.float32)
    if WRITE_SUMMED:
        store(s_p, offs, acc.to(s_p.dtype.element_ty), end, MASKED)
    if WRITE_OUT:
        if NOISE:
            acc = acc + std * z
        if DIVIDE:
            acc = tl.div_rn(acc, divisor)
        store(o_p, offs, acc.to(o_p.dtype.element_ty), end, MASKED)


@triton.jit
def _clip_sum_chunk(o_p, s_p, g_p, n, offs, end, B, fac_ptr, z0, z1, z2, z3, std, divisor,
                    READ_SUMMED: tl.constexpr, WRITE_SUMMED: tl.constexpr, WRITE_OUT: tl.constexpr,
                    NOISE: tl.constexpr, DIVIDE: tl.constexpr, QUARTER_: tl.constexpr,
                    ALIGNED: tl.constexpr, MASKED: tl.constexpr):
    a0 = tl.zeros([QUARTER_], dtype=tl.float32)
    a1 = tl.zeros([QUARTER_], dtype=tl.float32)
    a2 = tl.zeros([QUARTER_], dtype=tl.float32)
    a3 = tl.zeros([QUARTER_], dtype=tl.float32)
    for b in range(0, B):                           # fixed order: deterministic
        f = tl.load(fac_ptr + b)
        if f != 0.0:                                # dropped samples are not even read
            row = _row(g_p, b, n, ALIGNED)
            a0 += f * load(row, offs, end, MASKED).to(tl.float32)
            a1 += f * load(row, offs + QUARTER_, end, MASKED).to(tl.float32)
            a2 += f * load(row, offs + 2 * QUARTER_, end, MASKED).to(tl.float32)
            a3 += f * load(row, offs + 3 * QUARTER_, end, MASKED).to(tl.float32)
    _finish_quarter(o_p, s_p, offs, end, a0, z0, std, divisor, READ_SUMMED, WRITE_SUMMED, WRITE_OUT,
                    NOISE, DIVIDE, MASKED)
    _finish_quarter(o_p, s_p, offs + QUARTER_, end, a1, z1, std, divisor, READ_SUMMED, WRITE_SUMMED,
                    WRITE_OUT, NOISE, DIVIDE, MASKED)
    _finish_quarter(o_p, s_p, offs + 2 * QUARTER_, end, a2, z2, std, divisor, READ_SUMMED,
                    WRITE_SUMMED, WRITE_OUT, NOISE, DIVIDE, MASKED)
    _finish_quarter(o_p, s_p, offs + 3 * QUARTER_, end, a3, z3, std, divisor, READ_SUMMED,
                    WRITE_SUMMED, WRITE_OUT, NOISE, DIVIDE, MASKED)


@triton.jit
def _clip_sum(table, T, B, like_o, like_g, fac_ptr, key_ptr, std, divisor, chunk0,
              READ_SUMMED: tl.constexpr, WRITE_SUMMED: tl.constexpr, WRITE_OUT: tl.constexpr,
              NOISE: tl.constexpr, SECURE: tl.constexpr, DIVIDE: tl.constexpr,
              QUARTER_: tl.constexpr, ALIGNED: tl.constexpr):
    c = tl.program_id(0)
    t, start, end = work_item(table, c, T, 3, 4 * QUARTER_)
    n = tl.load(table + 3 * T + t)
    o_p = tensor_ptr(table, 0, t, T, like_o, ALIGNED)
    s_p = tensor_ptr(table, 1, t, T, like_o, ALIGNED)
    g_p = tensor_ptr(table, 2, t, T, like_g, ALIGNED)
    offs = start + tl.arange(0, QUARTER_)
    if NOISE:
        seed, base = rng.load_key(key_ptr)
        z0, z1, z2, z3 = _normal_chunk(seed, base, chunk0 + c, SECURE, QUARTER_)
    else:
        z0 = std
        z1 = std
        z2 = std
        z3 = std
    if end - start == 4 * QUARTER_:                 # a whole chunk: unmasked (vector) access
        _clip_sum_chunk(o_p, s_p, g_p, n, offs, end, B, fac_ptr, z0, z1, z2, z3, std, divisor,
                        READ_SUMMED, WRITE_SUMMED, WRITE_OUT, NOISE, DIVIDE, QUARTER_, ALIGNED, False)
    else:
        _clip_sum_chunk(o_p, s_p, g_p, n, offs, end, B, fac_ptr, z0, z1, z2, z3, std, divisor,
                        READ_SUMMED, WRITE_SUMMED, WRITE_OUT, NOISE, DIVIDE, QUARTER_, ALIGNED, True)


# ---------------------------------------------------------------- seed 000 optimizer

@triton.jit
def _seed_sumsq(table, T, like, part_ptr, col0, CHUNK_: tl.constexpr, BLOCK: tl.constexpr,
                ALIGNED: tl.constexpr):
    c = tl.program_id(0)
    t, start, end = work_item(table, c, T, 1, CHUNK_)
    g_p = tensor_ptr(table, 0, t, T, like, ALIGNED)
    acc = _sumsq(g_p, start, end, tl.zeros([BLOCK], dtype=tl.float32), BLOCK)
    tl.store(part_ptr + col0 + c, tl.sum(acc, axis=0))


@triton.jit
def _seed_quarter(g_p, offs, end, coef, z, noise_multiplier, NOISE: tl.constexpr, MASKED: tl.constexpr):
    g = load(g_p, offs, end, MASKED).to(tl.float32) * coef
    if NOISE:
        g = g + noise_multiplier * z
    store(g_p, offs, g.to(g_p.dtype.element_ty), end, MASKED)


@triton.jit
def _seed_update(table, T, like, norm_ptr, key_ptr, max_norm, noise_multiplier, chunk0,
                 NOISE: tl.constexpr, QUARTER_: tl.constexpr, ALIGNED: tl.constexpr):
    # g <- g * clamp(C * (1 / (||g|| + 1e-6)), max=1) + noise_multiplier * z, in
    # clip_grad_norm_'s order (the clamp lets NaN through, like torch.clamp).
    c = tl.program_id(0)
    t, start, end = work_item(table, c, T, 1, 4 * QUARTER_)
    g_p = tensor_ptr(table, 0, t, T, like, ALIGNED)
    coef = tl.div_rn(1.0, tl.load(norm_ptr) + 1e-6) * max_norm
    coef = tl.where(coef > 1.0, 1.0, coef)
    offs = start + tl.arange(0, QUARTER_)
    if NOISE:
        seed, base = rng.load_key(key_ptr)
        z0, z1, z2, z3 = rng.normal4x(seed, rng.chunk_counters(base, chunk0 + c, QUARTER_))
    else:
        z0 = coef
        z1 = coef
        z2 = coef
        z3 = coef
    if end - start == 4 * QUARTER_:                 # a whole chunk: unmasked (vector) access
        _seed_quarter(g_p, offs, end, coef, z0, noise_multiplier, NOISE, False)
        _seed_quarter(g_p, offs + QUARTER_, end, coef, z1, noise_multiplier, NOISE, False)
        _seed_quarter(g_p, offs + 2 * QUARTER_, end, coef, z2, noise_multiplier, NOISE, False)
        _seed_quarter(g_p, offs + 3 * QUARTER_, end, coef, z3, noise_multiplier, NOISE, False)
    else:
        _seed_quarter(g_p, offs, end, coef, z0, noise_multiplier, NOISE, True)
        _seed_quarter(g_p, offs + QUARTER_, end, coef, z1, noise_multiplier, NOISE, True)
        _seed_quarter(g_p, offs + 2 * QUARTER_, end, coef, z2, noise_multiplier, NOISE, True)
        _seed_quarter(g_p, offs + 3 * QUARTER_, end, coef, z3, noise_multiplier, NOISE, True)


# ---------------------------------------------------------------- launchers

def _placeholder(device) -> torch.Tensor:
    return mt.witness(torch.int64, device)


def _rows_aligned(table: mt.TensorTable, g_dtype: torch.dtype) -> bool:
    """Every address of the table and every per-sample row of the GRAD list
    (``b * n_t`` elements in) is a multiple of 16 bytes: the kernels may use
    vector access (see :mod:`.multi_tensor`)."""
    size = torch.empty((), dtype=g_dtype).element_size()
    return table.aligned and all(n * size % mt.ALIGN == 0 for n in table.numels)


def norm_partials(table: mt.TensorTable, g_dtype: torch.dtype, batch: int, partials: torch.Tensor,
                  col0: int) -> None:
    """``partials[b, col0 + c]`` (fp32 ``[B, P]``) for every chunk ``c`` of ``table``."""
    if table.n_chunks == 0 or batch == 0:
        return
    grid = (table.n_chunks, min(batch, MAX_GRID_Y))
    _norm_partials[grid](table.data, table.n_tensors, batch, mt.witness(g_dtype, table.device),
                         partials, partials.shape[1], col0, CHUNK_=table.chunk, BLOCK=NORM_BLOCK,
                         ALIGNED=_rows_aligned(table, g_dtype))
    count_launch("triton.dp_norm_partials")


def clip_factors(partials: torch.Tensor, max_norm: float, out: torch.Tensor,
                 count: torch.Tensor | None) -> None:
    """``out[0, b]`` = clip factor, ``out[1, b]`` = norm of sample ``b`` (fp32 ``[2, B]``);
    ``count`` (int64, one element) += number of non-finite norms."""
    batch, n_parts = partials.shape
    if batch == 0:
        return
    _clip_factors[(batch,)](partials, n_parts, batch, out, count if count is not None else out,
                            float(max_norm), HAS_COUNT=count is not None, BLOCK=FINALIZE_BLOCK)
    count_launch("triton.dp_clip_factors")


def clip_sum(table: mt.TensorTable, g_dtype: torch.dtype, o_dtype: torch.dtype, batch: int,
             factors: torch.Tensor, key: torch.Tensor | None, std: float, divisor: float | None,
             chunk0: int, *, read_summed: bool, write_summed: bool, write_out: bool,
             secure: bool) -> None:
    """The fused pass over every tensor of ``table`` (see the module docstring)."""
    if table.n_chunks == 0:
        return
    if table.chunk != CHUNK:
        raise ValueError(f"clip_sum needs a table of {CHUNK}-element chunks, got {table.chunk}")
    noise = key is not None and write_out
    _clip_sum[(table.n_chunks,)](
        table.data, table.n_tensors, batch, mt.witness(o_dtype, table.device),
        mt.witness(g_dtype, table.device), factors, key if noise else _placeholder(table.device),
        float(std), float(divisor or 1.0), chunk0,
        READ_SUMMED=bool(read_summed), WRITE_SUMMED=bool(write_summed), WRITE_OUT=bool(write_out),
        NOISE=noise, SECURE=bool(secure) and noise, DIVIDE=divisor is not None,
        QUARTER_=QUARTER, ALIGNED=_rows_aligned(table, g_dtype), num_warps=NUM_WARPS)
    count_launch("triton.dp_clip_sum")


def seed_sumsq(table: mt.TensorTable, dtype: torch.dtype, partials: torch.Tensor, col0: int) -> None:
    """``partials[col0 + c]`` = sum of squares of chunk ``c`` of a one-list table."""
    if table.n_chunks == 0:
        return
    _seed_sumsq[(table.n_chunks,)](table.data, table.n_tensors, mt.witness(dtype, table.device),
                                   partials, col0, CHUNK_=table.chunk, BLOCK=NORM_BLOCK,
                                   ALIGNED=table.aligned)
    count_launch("triton.dp_seed_sumsq")


def global_norm(partials: torch.Tensor, n: int, out: torch.Tensor) -> None:
    """``out[0] = sqrt(sum(partials[:n]))`` in a fixed order."""
    mt.global_norm(partials, n, out)


def seed_update(table: mt.TensorTable, dtype: torch.dtype, norm: torch.Tensor, key: torch.Tensor | None,
                max_norm: float, noise_multiplier: float, chunk0: int) -> None:
    """In place ``g <- g * clip_coef + noise_multiplier * z`` over a one-list table."""
    if table.n_chunks == 0:
        return
    if table.chunk != CHUNK:
        raise ValueError(f"seed_update needs a table of {CHUNK}-element chunks, got {table.chunk}")
    _seed_update[(table.n_chunks,)](
        table.data, table.n_tensors, mt.witness(dtype, table.device), norm,
        key if key is not None else _placeholder(table.device), float(max_norm),
        float(noise_multiplier), chunk0, NOISE=key is not None, QUARTER_=QUARTER,
        ALIGNED=table.aligned, num_warps=NUM_WARPS, enable_fp_fusion=False)
    count_launch("triton.dp_seed_update")
