"""Triton kernels of SiFT (DeBERTa's perturbation layer), on a normalised input
``x [rows, cols]``:

* :func:`sift_init` -- ``delta = clamp(ip * z, -2 ip, 2 ip)`` (fp32, ``z`` drawn
  in the kernel from Philox, :mod:`.rng`) and ``pert = x + delta`` in one pass.
* :func:`sift_update` -- ``delta += lr * g / (1e-6 + max_row |g|)`` unless
  ``||g||`` is NaN or inf (decided on the device), then ``pert = x + delta``:
  a row pass (sum of squares and max of |g| per row), a one-program finalize
  (``||g||``, fixed order), one element-wise pass.

The element-wise launches pass ``enable_fp_fusion=False`` (no FMA contraction,
as under the interpreter).  The CUDA twins are ``csrc/sift.cu`` /
``fastadv.kernels.cuda.sift``.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import count_launch
from . import rng
from .noise import NUM_WARPS, _check_key, row_of

QUARTER = rng.QUARTER
BLOCK = 4096                  # elements per program of the update pass
FINALIZE_BLOCK = 1024


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
        gmax = tl.load(rowmax_ptr + row_of(offs, cols, IDX32), mask=m, other=1.0)
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
