"""Triton kernel of ghost clipping's per-sample norm of a Linear layer's weight
gradient, from its inputs ``a [B, T, I]`` and output gradients ``g [B, T, O]``
(the Gram form, ``||G_b||^2 = sum_{t,s} (a_t . a_s) (g_t . g_s)``, which is
``||a_b||^2 ||g_b||^2`` when ``T = 1``).

One program per sample: it walks the ``(t, s)`` tiles of ``BLOCK_T`` steps,
builds the two Gram tiles with ``tl.dot`` (fp32 accumulation, IEEE fp32
products for fp32 inputs: no TF32) and sums their product, in a fixed order:
deterministic, no atomics, one fp32 result per sample.  Reads ``a`` and ``g``
``T / BLOCK_T`` times each (they are small next to the weight gradient it
avoids).  No CUDA twin yet.
"""
import torch
import triton
import triton.language as tl

from .. import count_launch

BLOCK_T = 16
BLOCK_K = 32


@triton.jit
def _gram_tile(x_ptr, t0, s0, T, K, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, IEEE: tl.constexpr):
    # (x_t . x_s) for t in [t0, t0 + BLOCK_T), s in [s0, s0 + BLOCK_T), fp32
    rt = t0 + tl.arange(0, BLOCK_T)
    rs = s0 + tl.arange(0, BLOCK_T)
    acc = tl.zeros((BLOCK_T, BLOCK_T), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        kmask = rk[None, :] < K
        xt = tl.load(x_ptr + rt[:, None].to(tl.int64) * K + rk[None, :], mask=(rt[:, None] < T) & kmask, other=0.0)
        xs = tl.load(x_ptr + rs[:, None].to(tl.int64) * K + rk[None, :], mask=(rs[:, None] < T) & kmask, other=0.0)
        if IEEE:
            acc += tl.dot(xt, tl.trans(xs), input_precision="ieee")
        else:
            acc += tl.dot(xt, tl.trans(xs))
    return acc


@triton.jit
def _linear_sq_norms(a_ptr, g_ptr, out_ptr, T, I, O, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr,
                     IEEE: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    a_b = a_ptr + b * T * I
    g_b = g_ptr + b * T * O
    total = tl.zeros((BLOCK_T, BLOCK_T), dtype=tl.float32)
    for t0 in range(0, T, BLOCK_T):
        for s0 in range(0, T, BLOCK_T):
            aa = _gram_tile(a_b, t0, s0, T, I, BLOCK_T, BLOCK_K, IEEE)
            gg = _gram_tile(g_b, t0, s0, T, O, BLOCK_T, BLOCK_K, IEEE)
            total += aa * gg
    tl.store(out_ptr + b, tl.sum(tl.sum(total, axis=1), axis=0))


def linear_sq_norms(a: torch.Tensor, g: torch.Tensor, out: torch.Tensor) -> None:
    """``out[b] = ||g_b^T a_b||_F^2`` (fp32) for contiguous ``a [B, T, I]``,
    ``g [B, T, O]`` of one dtype."""
    batch, steps, cols = a.shape
    if batch == 0:
        return
    _linear_sq_norms[(batch,)](a, g, out, steps, cols, g.shape[2], BLOCK_T=BLOCK_T, BLOCK_K=BLOCK_K,
                               IEEE=a.dtype == torch.float32, enable_fp_fusion=False)
    count_launch("triton.dp_ghost_linear_sq_norms")
