"""Per-sample gradient norms without per-sample gradients: the plain-PyTorch math.

A weight-matrix use is written as ``G_b = P_b^T Q_b`` (``P_b``: ``[T, O]``,
``Q_b``: ``[T, I]``; a Linear layer has ``P = g`` (output gradients), ``Q =
a`` (inputs); an Embedding has a one-hot ``P`` given by its ids).  The
squared Frobenius norm of the per-sample gradient summed over every use
``u`` of one parameter is

    ||sum_u G_b^u||^2 = sum_{u,v} sum_{t,s} (P^u P^v^T)_{ts} (Q^u Q^v^T)_{ts}

(the Gram, or "ghost", form; with one use and ``T = 1`` it is ``||g||^2
||a||^2``).  The other way is to materialise ``sum_u G_b^u`` (``[B, O, I]``)
and take its norm.  :func:`matrix_sq_norms` picks the cheaper of the two by
operation count, as fastDP does (``T^2`` against ``O * I``).

These functions are the reference the fused kernels are tested against, and
the CPU path of :mod:`fastadv.dp.ghost`.  Everything is computed in fp32 (or
fp64 for fp64 inputs) whatever the inputs' dtype.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


def acc_dtype(*ts: torch.Tensor) -> torch.dtype:
    """fp64 when any input is fp64, else fp32 (fp16 / bf16 accumulate in fp32)."""
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in ts) else torch.float32


@dataclass
class MatUse:
    """One use of a weight matrix ``W [O, I]``: ``G_b = P_b^T Q_b``.

    ``p``: ``[B, T, O]``, or None for an embedding lookup, whose ``P`` is the
    one-hot of ``ids`` (``[B, T]``, rows of ``W``); ``q``: ``[B, T, I]``."""
    q: torch.Tensor
    p: torch.Tensor | None = None
    ids: torch.Tensor | None = None

    @property
    def steps(self) -> int:
        return self.q.shape[1]


def _pp(u: MatUse, v: MatUse, acc) -> torch.Tensor:
    """``P^u P^v^T`` per sample, ``[B, T_u, T_v]``."""
    if u.p is not None and v.p is not None:
        return torch.bmm(u.p.to(acc), v.p.to(acc).transpose(1, 2))
    if u.p is None and v.p is None:
        return (u.ids[:, :, None] == v.ids[:, None, :]).to(acc)
    if u.p is None:  # one-hot rows of u pick columns of P^v
        return _pp(v, u, acc).transpose(1, 2)
    b, t_v = v.ids.shape
    # gathered, then cast (the same values): no fp32 copy of a low-precision [B, T, V] head gradient
    return u.p.gather(2, v.ids[:, None, :].expand(b, u.steps, t_v)).to(acc)


def _qq(u: MatUse, v: MatUse, acc) -> torch.Tensor:
    return torch.bmm(u.q.to(acc), v.q.to(acc).transpose(1, 2))


def gather_pp(u: MatUse, ids: torch.Tensor) -> torch.Tensor:
    """``P^u P^v^T`` for a later embedding lookup ``v`` with ``ids`` ``[B, T_v]``:
    ``P^u`` gathered at the ids, ``[B, T_u, T_v]`` (so ``P^u`` can be dropped)."""
    return _pp(u, MatUse(q=u.q[:, :0], ids=ids), acc_dtype(u.q))


def cross_gram(u: MatUse, v: MatUse, pp: torch.Tensor | None = None) -> torch.Tensor:
    """``<G^u_b, G^v_b>`` for every sample, ``[B]`` (``pp``: a precomputed
    ``P^u P^v^T``, see :func:`gather_pp`)."""
    acc = acc_dtype(u.q, v.q)
    pp = _pp(u, v, acc) if pp is None else pp.to(acc)
    return (pp * _qq(u, v, acc)).sum((1, 2))


def gram_sq_norms(uses: list[MatUse]) -> torch.Tensor:
    """``||sum_u G_b^u||^2`` for every sample ``b`` from the Gram form, ``[B]``."""
    acc = acc_dtype(*[u.q for u in uses])
    total = None
    for i, u in enumerate(uses):
        for j in range(i, len(uses)):
            v = uses[j]
            if u.steps == 1 and v.steps == 1 and u.p is not None and v.p is not None:
                term = (u.p[:, 0].to(acc) * v.p[:, 0].to(acc)).sum(1) * (u.q[:, 0].to(acc) * v.q[:, 0].to(acc)).sum(1)
            else:
                term = (_pp(u, v, acc) * _qq(u, v, acc)).sum((1, 2))
            term = term if i == j else 2 * term  # the (u, v) and (v, u) cross terms are equal
            total = term if total is None else total + term
    return total


def per_sample_grads(uses: list[MatUse], rows: int) -> torch.Tensor:
    """``sum_u G_b^u``, ``[B, rows, I]`` (materialised: the other way to the norms)."""
    acc = acc_dtype(*[u.q for u in uses])
    b, _, cols = uses[0].q.shape
    out = torch.zeros(b, rows, cols, dtype=acc, device=uses[0].q.device)
    for u in uses:
        q = u.q.to(acc)
        if u.p is not None:
            out += torch.bmm(u.p.to(acc).transpose(1, 2), q)
        else:
            flat = (u.ids + rows * torch.arange(b, device=u.ids.device)[:, None]).reshape(-1)
            out.view(b * rows, cols).index_add_(0, flat, q.reshape(flat.shape[0], cols))  # cols may be 0
    return out


def gram_cost(uses: list[MatUse], rows: int) -> int:
    """Multiply-adds of the Gram form (embedding one-hot products are gathers)."""
    cols = uses[0].q.shape[2]
    return sum(u.steps * v.steps * ((rows if u.p is not None and v.p is not None else 1) + cols)
               for u in uses for v in uses)


def per_sample_cost(uses: list[MatUse], rows: int) -> int:
    cols = uses[0].q.shape[2]
    return rows * cols * (1 + sum(u.steps for u in uses))


def matrix_sq_norms(uses: list[MatUse], rows: int, how: str = "auto") -> torch.Tensor:
    """``||per-sample gradient||^2`` of one weight matrix ``[rows, I]`` over all
    its uses, ``[B]``; ``how``: ``"gram"``, ``"per_sample"`` or ``"auto"``
    (the cheaper by operation count)."""
    if how == "auto":
        how = "gram" if gram_cost(uses, rows) <= per_sample_cost(uses, rows) else "per_sample"
    if how == "gram":
        return gram_sq_norms(uses)
    if how == "per_sample":
        return per_sample_grads(uses, rows).flatten(1).square().sum(1)
    raise ValueError(f"how must be 'auto', 'gram' or 'per_sample', got {how!r}")


def add_clipped_use(out: torch.Tensor, u: MatUse, factors: torch.Tensor) -> torch.Tensor:
    """``out += sum_b f_b G_b^u`` for one use (``out``: ``[rows, I]`` in the
    factors' dtype), dropped samples (``f_b = 0``) masked out of both factors."""
    acc = factors.dtype
    keep = (factors != 0)[:, None, None]
    rows, cols = out.shape
    q = torch.where(keep, u.q.to(acc), 0.0)
    if u.p is not None:
        p = torch.where(keep, u.p.to(acc), 0.0) * factors[:, None, None]
        out += p.reshape(-1, rows).transpose(0, 1) @ q.reshape(-1, cols)
    else:
        out.index_add_(0, u.ids.reshape(-1), (q * factors[:, None, None]).reshape(-1, cols))
    return out


def norm_layer_grads(a: torch.Tensor, g: torch.Tensor, eps: float, rms: bool = False, weight: bool = True,
                     bias: bool = True, xhat_dtype: torch.dtype | None = None
                     ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Per-sample gradients of a LayerNorm's (``rms``: RMSNorm's) weight and
    bias from its input ``a`` and output gradient ``g``, both ``[B, T, D]``
    (normalised over ``D``): ``sum_t g_t * xhat_t`` and ``sum_t g_t``, ``[B,
    D]`` each (None where not asked for), ``xhat`` recomputed from ``a`` as
    the layer's forward computes it, in fp32 (fp64 for fp64 inputs);
    ``xhat_dtype``: ``xhat`` rounded to it first (transformers' LlamaRMSNorm
    rounds it to the input's dtype before the weight multiplies)."""
    acc = acc_dtype(a, g)
    shape = (a.shape[2],)
    x = a.to(acc)
    xhat = torch.nn.functional.rms_norm(x, shape, eps=eps) if rms else torch.nn.functional.layer_norm(x, shape, eps=eps)
    if xhat_dtype is not None:
        xhat = xhat.to(xhat_dtype).to(acc)
    g = g.to(acc)
    return (g * xhat).sum(1) if weight else None, g.sum(1) if bias else None


def group_norm_grads(a: torch.Tensor, g: torch.Tensor, groups: int, eps: float, weight: bool = True,
                     bias: bool = True) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Per-sample gradients of a GroupNorm's per-channel weight and bias from
    its input ``a`` and output gradient ``g``, both ``[B, C, N]`` (``N``: the
    spatial positions): ``sum_n g * xhat`` and ``sum_n g``, ``[B, C]`` each
    (None where not asked for), ``xhat`` recomputed from ``a`` as the layer's
    forward computes it (``groups`` groups of channels), in fp32 (fp64 for
    fp64 inputs)."""
    acc = acc_dtype(a, g)
    xhat = torch.nn.functional.group_norm(a.to(acc), groups, eps=eps)
    g = g.to(acc)
    return (g * xhat).sum(2) if weight else None, g.sum(2) if bias else None


def vector_sq_norms(per_sample: list[torch.Tensor]) -> torch.Tensor:
    """``||sum_u g_b^u||^2`` for small parameters whose per-sample gradients are
    materialised (biases, norm layers), ``[B]``."""
    acc = acc_dtype(*per_sample)
    s = sum(g.to(acc) for g in per_sample)
    return s.flatten(1).square().sum(1)


def clipped_vector_grad(per_sample: list[torch.Tensor], factors: torch.Tensor) -> torch.Tensor:
    acc = factors.dtype
    s = sum(g.to(acc) for g in per_sample)
    keep = (factors != 0).view(-1, *([1] * (s.dim() - 1)))
    return torch.einsum("b,b...->...", factors, torch.where(keep, s, 0.0))


def clip_factors(sq_norms: torch.Tensor, max_grad_norm) -> tuple[torch.Tensor, torch.Tensor]:
    """Opacus 1.6's ``(C / (norm + 1e-6)).clamp(max=1)`` and the finite mask; a
    non-finite norm gets factor 0 (dropped, as fastadv's vanilla mode does)."""
    norm = sq_norms.sqrt()
    finite = torch.isfinite(norm)
    f = (max_grad_norm / (norm + 1e-6)).clamp(max=1.0)
    return torch.where(finite, f, torch.zeros_like(f)), finite


def clip_factors_from_rows(rows: torch.Tensor, max_grad_norm) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`clip_factors` of the per-sample squared norm summed over the
    per-parameter rows ``[n_rows, B]``."""
    return clip_factors(rows.sum(0), max_grad_norm)
