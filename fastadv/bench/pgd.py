"""PGD, K=3: the perturbation work of one batch (everything but the model's
forward and backward): ``backup_grad``, three ``attack`` steps with the
``zero_grad`` / ``restore_grad`` of the seed's loop, ``restore``.

The model is the embedding table plus the other parameters of a BERT-base
shaped encoder (their gradients matter: the seed's ``backup_grad`` clones every
gradient of the model).  The backward between steps is stood in for by giving
each parameter its gradient tensor again (no copy), for every implementation.
Cases: 30522x768 and 250002x1024 tables, fp32 and bf16, row-sparse (16x512 ids)
and dense; small sizes on CPU.  Check: the embedding after the third attack
against the reference in fp32 (rtol 1e-5 / bf16 a few ulps), restore bitwise.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .case import CaseCache, Impl, Prepared, Skip, real_sizes
from .check import SHORT, TOLERANCES, usable_backends

K = 3
EPSILON, ALPHA = 1.0, 0.3
SIZES_FULL = ((30522, 768, 12), (250002, 1024, 12))   # (rows, dim, encoder layers)
SIZES_SMALL = ((128, 64, 2),)  # the Triton interpreter runs one program per row
IDS_FULL, IDS_SMALL = (16, 512), (1, 32)


@dataclass(frozen=True)
class Case:
    rows: int
    cols: int
    layers: int
    dtype: torch.dtype
    ids: tuple[int, int] | None

    @property
    def name(self) -> str:
        kind = f"rows={self.ids[0]}x{self.ids[1]}" if self.ids else "dense"
        return f"{self.rows}x{self.cols} +{self.layers}L {SHORT[self.dtype]} {kind} K={K}"

    @property
    def size(self):
        return (self.rows, self.cols)


def cases(device, full: bool | None = None) -> list[Case]:
    big = real_sizes(device, full)
    sizes, ids = (SIZES_FULL, IDS_FULL) if big else (SIZES_SMALL, IDS_SMALL)
    return [Case(r, c, n, dt, sp) for (r, c, n) in sizes
            for dt in (torch.float32, torch.bfloat16) for sp in (ids, None)]


def _encoder_shapes(dim: int, layers: int) -> list[tuple[int, ...]]:
    per_layer = [(dim, dim)] * 4 + [(dim,)] * 4 + [(4 * dim, dim), (4 * dim,), (dim, 4 * dim), (dim,)] \
        + [(dim,)] * 4
    return per_layer * layers


class Model(nn.Module):
    def __init__(self, weight, others):
        super().__init__()
        self.word_embeddings = nn.Embedding(weight.shape[0], weight.shape[1], _weight=weight)
        self.encoder = nn.ParameterList([nn.Parameter(t) for t in others])


class Data:
    def __init__(self, case: Case, device):
        gen = torch.Generator(device=device).manual_seed(0)
        self.case, self.device = case, torch.device(device)
        rnd = lambda *s: torch.randn(s, generator=gen, device=device).to(case.dtype)  # noqa: E731
        self.w0 = rnd(case.rows, case.cols)
        self.others = [rnd(*s) for s in _encoder_shapes(case.cols, case.layers)]
        self.other_grads = [rnd(*s) for s in _encoder_shapes(case.cols, case.layers)]
        self.ids = (torch.randint(0, case.rows, case.ids, generator=gen, device=device)
                    if case.ids else None)
        # three gradients of the table: the clean one and one per adversarial backward
        self.grads = [self._table_grad(gen) for _ in range(K)]
        self.touched = int(torch.unique(self.ids).numel()) if case.ids else None
        self.expected = self._run(self._reference(torch.float32), torch.float32)

    def _table_grad(self, gen):
        if self.ids is None:
            return torch.randn(self.w0.shape, generator=gen, device=self.device).to(self.case.dtype)
        g = torch.zeros_like(self.w0)
        vals = torch.randn((self.ids.numel(), self.case.cols), generator=gen, device=self.device)
        return g.index_add_(0, self.ids.flatten(), vals.to(self.case.dtype))

    def model(self, dtype=None):
        dtype = dtype or self.case.dtype
        m = Model(self.w0.to(dtype).clone(), [t.to(dtype).clone() for t in self.others])
        if self.ids is not None:
            m.word_embeddings(self.ids)  # the forward the hooks see (no backward needed)
        return m

    def _reference(self, dtype):
        from fastadv.reference import PGD as RefPGD
        m = self.model(dtype)
        return m, RefPGD(m, "word_embeddings.", EPSILON, ALPHA)

    def give(self, model, t):
        """What backward t would leave: each parameter's gradient (no copy)."""
        model.word_embeddings.weight.grad = self.grads[t].to(model.word_embeddings.weight.dtype)
        for p, g in zip(model.encoder, self.other_grads):
            p.grad = g.to(p.dtype)

    def _run(self, pair, dtype, record=True):
        model, pgd = pair
        self.give(model, 0)
        return run_k_steps(model, pgd, self, record)


def run_k_steps(model, pgd, data, record=False):
    """The seed's K-step loop without forward/backward; returns the table after the last attack."""
    pgd.backup_grad()
    last = None
    for t in range(K):
        pgd.attack(is_first_attack=(t == 0))
        if record and t == K - 1:
            last = model.word_embeddings.weight.detach().float().clone()
        if t != K - 1:
            model.zero_grad()
            data.give(model, t + 1)
        else:
            pgd.restore_grad()
    pgd.restore()
    return last


def _impl(name, case, device, make):
    def setup():
        data = _data(case, device)
        model, pgd = make(data)
        data.give(model, 0)
        extra = {"touched_rows": data.touched} if data.touched else {}
        interpreted = name == "triton" and torch.device(device).type == "cpu"
        if interpreted and case.dtype != torch.float32:
            raise Skip("the Triton interpreter has no bf16/fp16 arithmetic (GPU only)")

        def check():
            rtol, atol = TOLERANCES[case.dtype]
            got = run_k_steps(model, pgd, data, record=True)
            exp = data.expected.to(case.dtype).float()
            if not torch.allclose(got, exp, rtol=rtol, atol=max(atol, 4 * rtol * float(ALPHA))):
                return f"embedding after {K} attacks differs: max abs {float((got - exp).abs().max()):.3g}"
            if not torch.equal(model.word_embeddings.weight.detach(), data.w0):
                return "restore is not bit-exact"
            data.give(model, 0)
            return None

        design = None
        if name in ("triton", "cuda"):
            from fastadv.ops.pgd import design_bytes
            numel, es = case.rows * case.cols, data.w0.element_size()
            design = (design_bytes(numel, es, K, data.touched, case.cols) if case.ids
                      else design_bytes(numel, es, K))
        return Prepared(step=lambda: run_k_steps(model, pgd, data), check=check,
                        design_bytes=design, extra=extra, timed=not interpreted)
    return Impl(name, setup)


_data = CaseCache(Data)


def impls(case: Case, device) -> list[Impl]:
    from fastadv import PGD
    from fastadv.reference import PGD as RefPGD
    out = [_impl("reference", case, device,
                 lambda d: (lambda m: (m, RefPGD(m, "word_embeddings.", EPSILON, ALPHA)))(d.model()))]
    for backend in usable_backends(device):
        out.append(_impl(backend, case, device, lambda d, b=backend: (lambda m: (
            m, PGD(m, "word_embeddings.", EPSILON, ALPHA, backend=b,
                   row_sparse="auto" if case.ids else False)))(d.model())))
    return out


def release() -> None:
    _data.clear()
