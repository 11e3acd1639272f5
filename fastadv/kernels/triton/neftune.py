"""Triton kernel of NEFTune's per-token noise scale: ``scale[b, t] = mask[b, t]
* alpha / sqrt(L_b * d)`` with ``L_b = sum_t mask[b, t]`` (0 for an
all-padding sequence).  The noise itself is :func:`.noise.add_noise` with that
row scale.  The CUDA twin is ``csrc/neftune.cu`` / ``fastadv.kernels.cuda.neftune``.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import count_launch


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



def neftune_scale(mask2d: torch.Tensor, scale_out: torch.Tensor, alpha_over_sqrt_d: float) -> None:
    """``scale_out[b, t] = mask[b, t] * alpha / sqrt(L_b * d)`` (fp32), ``L_b = sum_t mask[b, t]``."""
    batch, seq_len = mask2d.shape
    if batch == 0 or seq_len == 0:
        return
    block_t = min(triton.next_power_of_2(seq_len), 4096)
    _neftune_scale_kernel[(batch,)](mask2d, scale_out, seq_len, float(alpha_over_sqrt_d), BLOCK_T=block_t)
    count_launch("triton.neftune_scale")
