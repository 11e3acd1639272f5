"""Triton kernel for the embedding FGSM step: ``out = e + eps * sign(g)`` in
one pass (reads e and g once, writes out once)."""
import torch
import triton
import triton.language as tl

from .. import count_launch
from ._trace import wrap_triton

BLOCK = 4096


@triton.jit
def _fgsm(e_ptr, g_ptr, out_ptr, eps, numel, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < numel
    e = tl.load(e_ptr + offs, mask=m).to(tl.float32)
    g = tl.load(g_ptr + offs, mask=m).to(tl.float32)
    # torch.sign: (g > 0) - (g < 0), so sign(0) = 0 and sign(NaN) = 0.
    sign = (g > 0).to(tl.float32) - (g < 0).to(tl.float32)
    tl.store(out_ptr + offs, (e + eps * sign).to(out_ptr.dtype.element_ty), mask=m)


def fgsm_perturb(e: torch.Tensor, g: torch.Tensor, out: torch.Tensor, eps: float) -> None:
    numel = e.numel()
    if numel:
        wrap_triton(_fgsm)[(triton.cdiv(numel, BLOCK),)](e, g, out, float(eps), numel, BLOCK=BLOCK)
        count_launch("triton.fgsm")
