"""DP-SGD references, written from their math.

``DPOptimizer`` (seed ``000_ce39ad189fbf116e.txt``): ``step()`` clips the
gradients of the first parameter group to total L2 norm ``max_grad_norm``
(``torch.nn.utils.clip_grad_norm_``: ``g *= min(1, C / (||g||_total + 1e-6))``)
then adds ``N(0, noise_multiplier^2)`` to each gradient (the noise std is
``noise_multiplier`` itself, not ``noise_multiplier * C``).  Exactly like the
seed, it never updates the parameters (it wraps no inner optimizer: ``step``
only rewrites ``p.grad``), ignores ``closure`` and returns None, and fails on a
parameter whose ``grad`` is None.  The clip is per batch, not per sample.

``clip_and_noise`` (seed ``004_f51110acd6d7dc7a.txt``, Opacus 1.6
``DPOptimizer.clip_and_accumulate`` + ``add_noise`` + ``scale_grad``): for
per-sample gradients ``g_i`` of shape ``[B, *p.shape]``,

    n_b   = || (||g_1b||, ..., ||g_kb||) ||_2           (norm over all tensors)
    f_b   = min(1, C / (n_b + 1e-6))
    out_i = sum_b f_b g_ib + N(0, (sigma C)^2)          (noise skipped if sigma C = 0)
    out_i /= expected_batch_size                        (if given: loss_reduction="mean")

The noise is drawn like Opacus's non-secure ``_generate_noise``: one
``torch.normal`` per tensor, in order, in the tensor's dtype, from
``generator``; with equal generator states the results match Opacus bitwise.
"""
import torch


class DPOptimizer(torch.optim.Optimizer):
    def __init__(self, params, noise_multiplier=1.0, max_grad_norm=1.0):
        super().__init__(params, {})
        self.noise_multiplier = noise_multiplier
        self.max_grad_norm = max_grad_norm

    def step(self, closure=None):
        params = self.param_groups[0]["params"]
        torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm)
        for p in params:
            p.grad.add_(torch.randn_like(p.grad) * self.noise_multiplier)


def clip_and_noise(grad_samples, max_grad_norm, noise_multiplier, *, generator=None,
                   expected_batch_size=None):
    batch = len(grad_samples[0])
    if batch == 0:
        factor = torch.zeros(0, device=grad_samples[0].device)
    else:
        norms = torch.stack([g.reshape(batch, -1).norm(2, dim=-1) for g in grad_samples], dim=1)
        factor = (max_grad_norm / (norms.norm(2, dim=1) + 1e-6)).clamp(max=1.0)
    std = noise_multiplier * max_grad_norm
    out = []
    for g in grad_samples:
        summed = torch.einsum("i,i...", factor.to(g.device, g.dtype), g)
        if std != 0:
            summed = summed + torch.normal(mean=0, std=std, size=summed.shape, device=g.device,
                                           generator=generator, dtype=g.dtype)
        if expected_batch_size is not None:
            summed = summed / expected_batch_size
        out.append(summed)
    return out
