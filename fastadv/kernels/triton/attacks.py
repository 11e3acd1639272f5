"""Triton kernels for the input attacks (fastadv.attacks): one fused launch per
L-inf step, two per L2 / momentum step (a per-sample reduction, then the update).

Tensors are contiguous and viewed as ``[batch, per_sample]``; images, adversarial
images and gradients share one dtype (fp32, fp16 or bf16), all math is fp32 and
rounded once on store; the MI-FGSM momentum is an fp32 buffer.  ``out`` may be
``adv`` itself (in place).  Nothing is read back to the host.

* ``linf_step``: ``out = clip01(x + clamp(adv + alpha*sign(g) - x, -eps, eps))``
  (PGD, FFGSM, MI-FGSM's projection), or ``out = clip01(adv + alpha*sign(g))``
  when ``x`` is None (FGSM).  Reads adv, [x,] g; writes out.
* ``l2_step``: pass 1 per (sample, chunk) partial sums of ``g.g``, ``d.g`` and
  ``d.d`` with ``d = adv - x``; pass 2 sums the sample's partials (fixed
  order, in every program: no finalize launch, no atomics) and applies
  ``adv + alpha*g/(||g|| + eps_div)``, the projection on the eps-ball (the norm of
  the new delta follows from the three sums:
  ``||d + s g||^2 = d.d + 2 s d.g + s^2 g.g`` with ``s = alpha/(||g|| + eps_div)``)
  and the [0, 1] clip together.
* ``momentum_step``: pass 1 per-chunk partial sums of ``|g|``; pass 2 the
  sample's L1 mean, ``m <- g/mean + decay*m`` (in place) and the L-inf step on
  ``sign(m)``.  ``first=True`` does not read ``m`` (it is taken as 0).

The update launches pass ``enable_fp_fusion=False``: ``a + b * c`` is rounded
twice, as in the reference's order, the interpreter and the CUDA twin
(``__fmul_rn`` / ``__fadd_rn``), instead of becoming an FMA on the GPU.
"""
import torch
import triton
import triton.language as tl

from .. import count_launch
from ._trace import wrap_triton

BLOCK = 4096           # elements per program (elementwise and per-sample chunks)
NUM_WARPS = 8
PARTIALS_BLOCK = 256   # partials summed per iteration when a program finalizes its sample


@triton.jit
def _sign(g):
    # torch.sign: -1, 0 or 1, and 0 for NaN
    return tl.where(g > 0, 1.0, tl.where(g < 0, -1.0, 0.0))


@triton.jit
def _clamp(v, lo, hi):
    # torch.clamp: NaN stays NaN
    return tl.where(v < lo, lo, tl.where(v > hi, hi, v))


@triton.jit
def _project(a, x, eps):
    # clip01(x + clamp(a - x, -eps, eps)), the torchattacks order
    return _clamp(x + _clamp(a - x, -eps, eps), 0.0, 1.0)


@triton.jit
def _linf_step_kernel(adv_ptr, x_ptr, g_ptr, out_ptr, numel, alpha, eps,
                      PROJECT: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < numel
    a = tl.load(adv_ptr + offs, mask=m, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + offs, mask=m, other=0.0).to(tl.float32)
    a = a + alpha * _sign(g)  # alpha * (-1|0|1) is exact: no rounding to differ
    if PROJECT:
        x = tl.load(x_ptr + offs, mask=m, other=0.0).to(tl.float32)
        a = _project(a, x, eps)
    else:
        a = _clamp(a, 0.0, 1.0)
    tl.store(out_ptr + offs, a.to(out_ptr.dtype.element_ty), mask=m)


@triton.jit
def _sample_offsets(per_sample, BLOCK: tl.constexpr):
    # (sample, chunk) program -> element offsets of its chunk, and their mask
    b = tl.program_id(0)
    c = tl.program_id(1)
    local = c.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    return b, c, b.to(tl.int64) * per_sample + local, local < per_sample


@triton.jit
def _sample_sum(part_ptr, b, chunks, PBLOCK: tl.constexpr):
    # The sample's partials summed in a fixed order (every program gets the same bits).
    acc = tl.zeros([PBLOCK], dtype=tl.float32)
    base = b.to(tl.int64) * chunks
    for start in range(0, chunks, PBLOCK):
        o = start + tl.arange(0, PBLOCK)
        acc += tl.load(part_ptr + base + o, mask=o < chunks, other=0.0)
    return tl.sum(acc, axis=0)


@triton.jit
def _l2_partials_kernel(adv_ptr, x_ptr, g_ptr, part_ptr, per_sample, chunks,
                        BLOCK: tl.constexpr):
    b, c, offs, m = _sample_offsets(per_sample, BLOCK)
    g = tl.load(g_ptr + offs, mask=m, other=0.0).to(tl.float32)
    d = (tl.load(adv_ptr + offs, mask=m, other=0.0).to(tl.float32)
         - tl.load(x_ptr + offs, mask=m, other=0.0).to(tl.float32))
    n = tl.num_programs(0).to(tl.int64) * chunks  # partials per quantity
    idx = b.to(tl.int64) * chunks + c
    tl.store(part_ptr + idx, tl.sum(g * g, axis=0))
    tl.store(part_ptr + n + idx, tl.sum(d * g, axis=0))
    tl.store(part_ptr + 2 * n + idx, tl.sum(d * d, axis=0))


@triton.jit
def _l2_update_kernel(adv_ptr, x_ptr, g_ptr, out_ptr, part_ptr, per_sample, chunks,
                      alpha, eps, eps_div, BLOCK: tl.constexpr, PBLOCK: tl.constexpr):
    b, c, offs, m = _sample_offsets(per_sample, BLOCK)
    n = tl.num_programs(0).to(tl.int64) * chunks
    gg = _sample_sum(part_ptr, b, chunks, PBLOCK)
    dg = _sample_sum(part_ptr + n, b, chunks, PBLOCK)
    dd = _sample_sum(part_ptr + 2 * n, b, chunks, PBLOCK)
    gnorm = tl.sqrt_rn(gg) + eps_div
    s = tl.div_rn(alpha, gnorm)
    dnorm = tl.sqrt_rn(tl.maximum(dd + 2.0 * s * dg + s * s * gg, 0.0))
    q = tl.div_rn(eps, dnorm)
    factor = tl.where(q > 1.0, 1.0, q)  # torch.min(eps / ||delta||, 1): NaN stays NaN
    g = tl.load(g_ptr + offs, mask=m, other=0.0).to(tl.float32)
    a = tl.load(adv_ptr + offs, mask=m, other=0.0).to(tl.float32)
    x = tl.load(x_ptr + offs, mask=m, other=0.0).to(tl.float32)
    a = a + alpha * tl.div_rn(g, gnorm)
    out = _clamp(x + (a - x) * factor, 0.0, 1.0)
    tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=m)


@triton.jit
def _abs_partials_kernel(g_ptr, part_ptr, per_sample, chunks, BLOCK: tl.constexpr):
    b, c, offs, m = _sample_offsets(per_sample, BLOCK)
    g = tl.load(g_ptr + offs, mask=m, other=0.0).to(tl.float32)
    tl.store(part_ptr + b.to(tl.int64) * chunks + c, tl.sum(tl.abs(g), axis=0))


@triton.jit
def _momentum_update_kernel(adv_ptr, x_ptr, g_ptr, mom_ptr, out_ptr, part_ptr, per_sample, chunks,
                            count, alpha, eps, decay, FIRST: tl.constexpr, BLOCK: tl.constexpr,
                            PBLOCK: tl.constexpr):
    b, c, offs, m = _sample_offsets(per_sample, BLOCK)
    mean = tl.div_rn(_sample_sum(part_ptr, b, chunks, PBLOCK), count)  # count: per_sample as fp32
    g = tl.load(g_ptr + offs, mask=m, other=0.0).to(tl.float32)
    mom = tl.div_rn(g, mean)  # 0/0 = NaN for an all-zero sample, as torchattacks
    if not FIRST:
        mom = mom + tl.load(mom_ptr + offs, mask=m, other=0.0) * decay
    tl.store(mom_ptr + offs, mom, mask=m)
    a = tl.load(adv_ptr + offs, mask=m, other=0.0).to(tl.float32) + alpha * _sign(mom)
    x = tl.load(x_ptr + offs, mask=m, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, _project(a, x, eps).to(out_ptr.dtype.element_ty), mask=m)


# ---- launchers ---------------------------------------------------------------------------------

def _sample_grid(batch: int, per_sample: int):
    chunks = triton.cdiv(per_sample, BLOCK)
    if chunks > 65535:
        raise ValueError(f"{per_sample} elements per sample is more than the triton backend's "
                         f"{65535 * BLOCK}; use backend='torch'")
    return chunks, (batch, chunks)


def _pblock(chunks: int) -> int:
    return min(triton.next_power_of_2(max(chunks, 1)), PARTIALS_BLOCK)


def linf_step(adv: torch.Tensor, x: torch.Tensor | None, g: torch.Tensor, out: torch.Tensor,
              alpha: float, eps: float) -> None:
    """``out = clip01(x + clamp(adv + alpha*sign(g) - x, -eps, eps))``; with
    ``x=None``: ``out = clip01(adv + alpha*sign(g))``.  One launch."""
    numel = adv.numel()
    if numel == 0:
        return
    wrap_triton(_linf_step_kernel)[(triton.cdiv(numel, BLOCK),)](
        adv, adv if x is None else x, g, out, numel, float(alpha), float(eps),
        PROJECT=x is not None, BLOCK=BLOCK, num_warps=NUM_WARPS, enable_fp_fusion=False)
    count_launch("triton.attack_linf_step")


def l2_step(adv: torch.Tensor, x: torch.Tensor, g: torch.Tensor, out: torch.Tensor,
            alpha: float, eps: float, eps_div: float) -> None:
    """The PGD-L2 step of torchattacks on ``[batch, per_sample]`` tensors.  Two launches."""
    batch, per_sample = adv.shape
    if adv.numel() == 0:
        return
    chunks, grid = _sample_grid(batch, per_sample)
    part = torch.empty(3 * batch * chunks, dtype=torch.float32, device=adv.device)
    _l2_partials_kernel[grid](adv, x, g, part, per_sample, chunks, BLOCK=BLOCK, num_warps=NUM_WARPS)
    _l2_update_kernel[grid](adv, x, g, out, part, per_sample, chunks, float(alpha), float(eps),
                            float(eps_div), BLOCK=BLOCK, PBLOCK=_pblock(chunks), num_warps=NUM_WARPS,
                            enable_fp_fusion=False)
    count_launch("triton.attack_l2_partials")
    count_launch("triton.attack_l2_update")


def momentum_step(adv: torch.Tensor, x: torch.Tensor, g: torch.Tensor, momentum: torch.Tensor,
                  out: torch.Tensor, alpha: float, eps: float, decay: float, first: bool) -> None:
    """The MI-FGSM step of torchattacks on ``[batch, per_sample]`` tensors
    (``momentum``: fp32, updated in place).  Two launches."""
    batch, per_sample = adv.shape
    if adv.numel() == 0:
        return
    chunks, grid = _sample_grid(batch, per_sample)
    part = torch.empty(batch * chunks, dtype=torch.float32, device=adv.device)
    _abs_partials_kernel[grid](g, part, per_sample, chunks, BLOCK=BLOCK, num_warps=NUM_WARPS)
    _momentum_update_kernel[grid](adv, x, g, momentum, out, part, per_sample, chunks, float(per_sample),
                                  float(alpha),
                                  float(eps), float(decay), FIRST=bool(first), BLOCK=BLOCK,
                                  PBLOCK=_pblock(chunks), num_warps=NUM_WARPS, enable_fp_fusion=False)
    count_launch("triton.attack_abs_partials")
    count_launch("triton.attack_momentum_update")
