"""Ghost clipping / book-keeping's registered ops (``torch.ops.fastadv.*``):
``dp_ghost_linear_sq_norms``, ``dp_ghost_linear_sq_norms_ps``, ``dp_ghost_embedding_sq_norms``,
``dp_ghost_vector_sq_norms``, ``dp_ghost_clip_factors``,
``dp_ghost_clipped_linear_grad``, ``dp_ghost_clipped_vector_grads``,
``dp_ghost_clipped_embedding_grad``, ``dp_ghost_cross_gram``,
``dp_ghost_pair_sq_norms_ps``, ``dp_ghost_uses_sq_norms_ps``,
``dp_ghost_norm_layer_grads`` and ``dp_ghost_group_norm_grads``.

``linear_sq_norms(a, g)``: for a Linear layer with inputs ``a [B, T, I]`` and
output gradients ``g [B, T, O]``, the squared Frobenius norm of every
sample's weight gradient ``g_b^T a_b`` without forming it, in fp32 (the Gram
form, :func:`fastadv.reference.dp_ghost.gram_sq_norms`).  Backends: torch (the
reference math) and triton (one launch, one program per sample,
deterministic).

``linear_sq_norms_ps(a, g)``: the same norms the per-sample way (for
``T^2 > O * I``), each sample's gradient built tile by tile with ``tl.dot``
and squared in registers, never stored (memory: one fp32 partial per
(sample, tile)).  Triton: two launches (the partials, then their sum in
tile order), deterministic.

``embedding_sq_norms(ids, g)``: the same for one embedding lookup with ids
``[B, T]`` and output gradients ``g [B, T, D]``, whose ``P`` is the one-hot
of the ids: ``sum_{t,s: id_t = id_s} g_t . g_s`` in fp32.  Triton: one
launch, one program per sample walking ``(t, s)`` tiles with the
id-equality mask, deterministic.

``vector_sq_norms_(out, vecs, rows)``: the vector terms (bias and norm-layer
per-sample gradients ``[B, ...]``) added into their distinct rows of the
``[n_rows, B]`` buffer, ``out[rows[k], b] += ||vecs[k][b]||^2``.  Triton: one
launch for all of them through a device table of addresses built in the call
(one program per (vector, 16 samples), fp32, deterministic).

``clip_factors(rows, C)``: from the per-parameter squared-norm rows ``[n_rows,
B]`` (fp32), the per-sample norm ``sqrt(sum of the rows)`` (summed in row
order: deterministic), Opacus 1.6's clip factor ``(C / (norm + 1e-6)).clamp(
max=1)``, 0 for a non-finite norm, and the finite flag
(:func:`fastadv.reference.dp_ghost.clip_factors_from_rows`).  Triton: one
launch.

``clipped_linear_grad_(out, p, q, factors)``: book-keeping's clipped gradient
of one Linear use, ``out += sum_b f_b P_b^T Q_b`` (``out``: fp32 ``[O, I]``),
samples with ``f_b = 0`` masked out of both operands
(:func:`fastadv.reference.dp_ghost.add_clipped_use`).  Triton: one tiled
GEMM launch, one program per output tile, fp32 accumulation, no atomics
(with an fp32 operand and ``T < 16``: the ``(b, t)`` rows flattened into one
reduction, each scaled by its ``f_b`` before an IEEE fp32 dot).

``clipped_vector_grads(vecs, f)``: book-keeping's clipped gradients of the
vector parameters, ``sum_b f_b v_k[b]`` each (dropped samples masked).
Triton: one launch for all of them (a table of the outputs and vectors built
in the call, one program per 128 output elements of one vector, the samples
in a fixed order).

``clipped_embedding_grad_(out, ids, g, f)``: book-keeping's clipped gradient
of one embedding lookup, ``out[v] += sum_{(b, t): id = v} f_b g[b, t]``.
Triton: a stable sort of the ids, then one launch in which each run of equal
ids has one owner summing it in ``(b, t)`` order: deterministic, where
``index_add_`` on CUDA is not.

``cross_gram(u, v, pp)``: a tied parameter's cross term between two of its
uses, ``<G^u_b, G^v_b> = sum_{t,s} (P^u P^v^T)_{ts} (Q^u Q^v^T)_{ts}`` per
sample (:func:`fastadv.reference.dp_ghost.cross_gram`), scaled and written
or added into a ``[B]`` row: Linear x Linear (``T_u != T_v`` allowed),
Linear x lookup (``P^u`` read at the lookup's ids, or a precomputed ``P^u
P^v^T``: a tied head's ``[B, T, V]`` output gradient need not be kept),
lookup x lookup (id equality).  Triton: two launches (per-(sample, 16 steps
of ``u``) partials, then their sum in order), deterministic.

``pair_sq_norms_ps(u, v, rows)``: a parameter with two uses (a tied head and
its table, a Linear applied twice), ``||G_b^u + G_b^v||^2`` the per-sample
way (the cheaper way when ``T^2 > rows * I``) without the reference's ``[B,
rows, I]``: each sample's gradient tile built from both uses in registers (a
lookup's rows by a select per hit step, chunks without a hit skipped) and
squared.  Triton: two launches, deterministic.

``uses_sq_norms_ps(uses, rows)``: the same for any number of uses (a Linear
applied three times, as ALBERT shares its layers): the uses in a device
table built in the call, each sample's gradient tile summed over all of
them in registers (a kind of operand in two dtypes widened to fp32 first).
Triton: two launches, deterministic.

``norm_layer_grads(a, g, eps)``: a LayerNorm's / RMSNorm's per-sample
weight and bias gradients, ``sum_t g_t * xhat_t`` and ``sum_t g_t``, with
``xhat`` recomputed from the input in registers.  Triton: one launch, one
program per sample, deterministic.

``group_norm_grads(a, g, groups, eps)``: the same for a GroupNorm (``[B,
C, N]``, per-channel sums, ``xhat`` over groups of channels).  Triton: one
launch, one program per (sample, group), deterministic.

None of the thirteen has a CUDA kernel (no CUDA twin yet): a forced
``backend="cuda"`` raises :class:`~fastadv.BackendUnavailable`; ``auto`` on a
CUDA tensor runs triton.
"""
from __future__ import annotations

from typing import Optional

import torch

from .. import _backend
from ..kernels import count_launch, device_guard
from ..reference import dp_ghost as ref
from . import _registry

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
NORM_MAX_D = 16384  # the norm-layer kernel's largest normalised dimension (one row in registers)


@_registry.op("dp_ghost_linear_sq_norms", mutates_args={"out"})
def linear_sq_norms_op(a: torch.Tensor, g: torch.Tensor, out: torch.Tensor, backend: str) -> None:
    """``out[b] = ||g_b^T a_b||^2`` (``out``: fp32 ``[B]``)."""
    if backend == "torch":
        count_launch("torch.dp_ghost_linear_sq_norms")
        out.copy_(ref.gram_sq_norms([ref.MatUse(p=g, q=a)]))
        return
    with device_guard(a):
        _registry.kernels("dp_ghost", backend).linear_sq_norms(a, g, out)


@linear_sq_norms_op.register_fake
def _(a, g, out, backend):
    return None


def _check(a: torch.Tensor, g: torch.Tensor) -> None:
    if not (isinstance(a, torch.Tensor) and isinstance(g, torch.Tensor)):
        raise TypeError("a and g must be tensors")
    if a.dim() != 3 or g.dim() != 3 or a.shape[:2] != g.shape[:2]:
        raise ValueError(f"a must be [B, T, I] and g [B, T, O] with the same B and T, got "
                         f"{tuple(a.shape)} and {tuple(g.shape)}")
    if a.device != g.device:
        raise ValueError(f"a and g must be on one device, got {a.device} and {g.device}")
    if not (a.is_floating_point() and g.is_floating_point()):
        raise TypeError(f"a and g must be floating point, got {a.dtype} and {g.dtype}")


def _no_cuda(op: str, backend, name: str) -> str:
    if name == "cuda":  # no CUDA kernel for these ops: forced cuda raises, auto uses torch
        if _registry.forced(backend):
            raise _backend.BackendUnavailable(f"{op} has no CUDA kernel yet; use backend='triton' or 'torch'")
        name = "torch"
    return name


def _backend_for(backend, a, g) -> str:
    # a and g may differ in dtype (autocast: an fp32 first-layer input, bf16 output gradients)
    name = _registry.pick(backend, a.device, dtypes=[("activations", a), ("output gradients", g)],
                          allowed=_DTYPES)
    return _no_cuda("dp_ghost_linear_sq_norms", backend, name)


def linear_sq_norms(a: torch.Tensor, g: torch.Tensor, *, backend: str | None = None,
                    out: torch.Tensor | None = None) -> torch.Tensor:
    """Per-sample ``||g_b^T a_b||_F^2``, fp32 ``[B]`` (fp64 for fp64 inputs on
    the torch backend); ``out``: a contiguous ``[B]`` tensor of that dtype to
    write it into (a row of :func:`clip_factors`'s buffer)."""
    _check(a, g)
    name = _backend_for(backend, a, g)
    if name != "torch":
        a, g = a.contiguous(), g.contiguous()
    out = _out_row(out, a.shape[0], ref.acc_dtype(a, g), a.device)
    linear_sq_norms_op(a, g, out, name)
    return out


def _out_row(out: torch.Tensor | None, batch: int, acc: torch.dtype, device) -> torch.Tensor:
    """A norm op's ``[B]`` output: a new tensor, or ``out`` checked (a row of
    :func:`clip_factors`'s buffer)."""
    if out is None:
        return torch.empty(batch, dtype=acc, device=device)
    if out.shape != (batch,) or out.dtype != acc or out.device != device or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous {acc} [{batch}] tensor on {device}, got "
                         f"{out.dtype} {tuple(out.shape)} on {out.device}")
    return out


# ---------------------------------------------------------------- per-sample-strategy norm

@_registry.op("dp_ghost_linear_sq_norms_ps", mutates_args={"out"})
def linear_sq_norms_ps_op(a: torch.Tensor, g: torch.Tensor, out: torch.Tensor, backend: str) -> None:
    """``out[b] = ||g_b^T a_b||^2`` from each sample's gradient (``out``: fp32 ``[B]``)."""
    if backend == "torch":
        count_launch("torch.dp_ghost_linear_sq_norms_ps")
        out.copy_(ref.matrix_sq_norms([ref.MatUse(p=g, q=a)], g.shape[2], "per_sample"))
        return
    with device_guard(a):
        _registry.kernels("dp_ghost", backend).linear_sq_norms_ps(a, g, out)


@linear_sq_norms_ps_op.register_fake
def _(a, g, out, backend):
    return None


def linear_sq_norms_ps_backend(backend, a: torch.Tensor, g: torch.Tensor) -> str:
    """The backend :func:`linear_sq_norms_ps` runs for these operands."""
    name = _registry.pick(backend, a.device, dtypes=[("activations", a), ("output gradients", g)],
                          allowed=_DTYPES, strided=[("activations", a), ("output gradients", g)])
    return _no_cuda("dp_ghost_linear_sq_norms_ps", backend, name)


def linear_sq_norms_ps(a: torch.Tensor, g: torch.Tensor, *, backend: str | None = None,
                       out: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`linear_sq_norms` the per-sample way (``T^2 > O * I``: the Gram
    form costs more): each sample's ``g_b^T a_b`` built tile by tile and
    squared without being stored (the reference materialises ``[B, O, I]``).
    Strided ``a``, ``g`` (a conv's unfolded patches); ``out`` as in
    :func:`linear_sq_norms`."""
    _check(a, g)
    name = linear_sq_norms_ps_backend(backend, a, g)
    out = _out_row(out, a.shape[0], ref.acc_dtype(a, g), a.device)
    linear_sq_norms_ps_op(a, g, out, name)
    return out


# ---------------------------------------------------------------- embedding norms

_ID_DTYPES = (torch.int32, torch.int64)  # nn.Embedding's index dtypes


@_registry.op("dp_ghost_embedding_sq_norms", mutates_args={"out"})
def embedding_sq_norms_op(ids: torch.Tensor, g: torch.Tensor, out: torch.Tensor, backend: str) -> None:
    """``out[b] = sum_{t,s: id_t = id_s} g_t . g_s`` (``out``: fp32 ``[B]``)."""
    if backend == "torch":
        count_launch("torch.dp_ghost_embedding_sq_norms")
        out.copy_(ref.gram_sq_norms([ref.MatUse(ids=ids, q=g)]))
        return
    with device_guard(g):
        _registry.kernels("dp_ghost", backend).embedding_sq_norms(ids, g, out)


@embedding_sq_norms_op.register_fake
def _(ids, g, out, backend):
    return None


def _check_embedding(ids: torch.Tensor, g: torch.Tensor) -> None:
    if not (isinstance(ids, torch.Tensor) and isinstance(g, torch.Tensor)):
        raise TypeError("ids and g must be tensors")
    if ids.dim() != 2 or g.dim() != 3 or ids.shape != g.shape[:2]:
        raise ValueError(f"ids must be [B, T] and g [B, T, D] with the same B and T, got "
                         f"{tuple(ids.shape)} and {tuple(g.shape)}")
    if ids.dtype not in _ID_DTYPES:
        raise TypeError(f"ids must be int32 or int64 (nn.Embedding's indices), got {ids.dtype}")
    if not g.is_floating_point():
        raise TypeError(f"g must be floating point, got {g.dtype}")


def embedding_sq_norms_backend(backend, ids: torch.Tensor, g: torch.Tensor) -> str:
    """The backend :func:`embedding_sq_norms` runs for these operands."""
    name = _registry.pick(backend, g.device, same_device=[("ids", ids)], dtypes=[("output gradients", g)],
                          allowed=_DTYPES)
    return _no_cuda("dp_ghost_embedding_sq_norms", backend, name)


def embedding_sq_norms(ids: torch.Tensor, g: torch.Tensor, *, backend: str | None = None,
                       out: torch.Tensor | None = None) -> torch.Tensor:
    """Per-sample squared norm of one embedding lookup's weight gradient from
    its ids ``[B, T]`` and output gradients ``g [B, T, D]`` (rows of a
    ``padding_idx`` zeroed by the caller), ``sum_{t,s: id_t = id_s} g_t . g_s``:
    fp32 ``[B]`` (fp64 for fp64 ``g`` on the torch backend); ``out`` as in
    :func:`linear_sq_norms`."""
    _check_embedding(ids, g)
    name = embedding_sq_norms_backend(backend, ids, g)
    if name != "torch":
        ids, g = ids.contiguous(), g.contiguous()
    out = _out_row(out, g.shape[0], ref.acc_dtype(g), g.device)
    embedding_sq_norms_op(ids, g, out, name)
    return out


# ---------------------------------------------------------------- vector terms

@_registry.op("dp_ghost_vector_sq_norms", mutates_args={"out"})
def vector_sq_norms_op(vecs: list[torch.Tensor], rows: list[int], out: torch.Tensor, backend: str) -> None:
    """``out[rows[k]] += ||vecs[k][b]||^2`` per sample ``b`` (distinct rows)."""
    if backend == "torch":
        count_launch("torch.dp_ghost_vector_sq_norms")
        for v, r in zip(vecs, rows):
            out[r] += ref.vector_sq_norms([v]).to(out.dtype)
        return
    with device_guard(out):
        _registry.kernels("dp_ghost", backend).vector_sq_norms(vecs, rows, out)


@vector_sq_norms_op.register_fake
def _(vecs, rows, out, backend):
    return None


def _check_vectors(out: torch.Tensor, vecs, rows) -> None:
    if not isinstance(out, torch.Tensor) or out.dim() != 2 or not out.is_floating_point():
        raise ValueError(f"out must be a floating-point [n_rows, B] tensor, got "
                         f"{getattr(out, 'dtype', type(out))} {tuple(getattr(out, 'shape', ()))}")
    if len(vecs) != len(rows):
        raise ValueError(f"vecs and rows must have the same length, got {len(vecs)} and {len(rows)}")
    if len(set(rows)) != len(rows) or any(not 0 <= r < out.shape[0] for r in rows):
        raise ValueError(f"rows must be distinct rows of out (0 <= row < {out.shape[0]}), got {list(rows)}")
    for i, v in enumerate(vecs):
        if not isinstance(v, torch.Tensor) or not v.is_floating_point() or v.dim() < 1 \
                or v.shape[0] != out.shape[1]:
            raise ValueError(f"vecs[{i}] must be a floating-point [B, ...] tensor with B = {out.shape[1]}, got "
                             f"{getattr(v, 'dtype', type(v))} {tuple(getattr(v, 'shape', ()))}")


def vector_sq_norms_(out: torch.Tensor, vecs: list[torch.Tensor], rows: list[int], *,
                     backend: str | None = None) -> torch.Tensor:
    """The vector terms of one DP backward (biases, norm layers: materialised
    per-sample gradients ``[B, ...]``) added into their rows of the
    per-parameter buffer: ``out[rows[k], b] += ||vecs[k][b]||^2``, rows
    distinct.  Kernel backends: one launch for all of them (one dtype per
    call, fp32 / fp16 / bf16; fp32 contiguous ``out``).  Returns ``out``."""
    vecs, rows = list(vecs), [int(r) for r in rows]
    _check_vectors(out, vecs, rows)
    pairs = [("vectors", v) for v in vecs]
    name = _registry.pick(backend, out.device, same_device=pairs, strided=pairs,
                          dtypes=[("out", out, (torch.float32,))] + pairs, allowed=_DTYPES,
                          same_dtype=pairs, contiguous=[("out", out)])
    name = _no_cuda("dp_ghost_vector_sq_norms", backend, name)
    if vecs:
        if name != "torch":
            vecs = [v.contiguous() for v in vecs]  # the kernel walks each as [B, d] memory
        vector_sq_norms_op(vecs, rows, out, name)
    return out


@_registry.op("dp_ghost_clipped_vector_grads", mutates_args={"outs"})
def clipped_vector_grads_op(vecs: list[torch.Tensor], factors: torch.Tensor, outs: list[torch.Tensor],
                            backend: str) -> None:
    """``outs[k] = sum_b f_b vecs[k][b]`` (``f_b = 0``: the sample is not read)."""
    if backend == "torch":
        count_launch("torch.dp_ghost_clipped_vector_grads")
        for v, o in zip(vecs, outs):
            o.copy_(ref.clipped_vector_grad([v], factors))
        return
    with device_guard(factors):
        _registry.kernels("dp_ghost", backend).clipped_vector_grads(vecs, factors, outs)


@clipped_vector_grads_op.register_fake
def _(vecs, factors, outs, backend):
    return None


def clipped_vector_grads(vecs: list[torch.Tensor], factors: torch.Tensor, *,
                         backend: str | None = None) -> list[torch.Tensor]:
    """Book-keeping's clipped gradients of the vector parameters (biases, norm
    layers) from their per-sample gradients ``[B, ...]``: ``sum_b f_b
    vecs[k][b]`` each, samples with ``f_b = 0`` masked out (their NaN cannot
    enter), in the factors' dtype.  Kernel backends: one launch for all (one
    dtype of vectors per call, fp32 / fp16 / bf16; fp32 factors)."""
    vecs = list(vecs)
    if not isinstance(factors, torch.Tensor) or factors.dim() != 1 or not factors.is_floating_point():
        raise ValueError(f"factors must be a floating-point [B] tensor, got "
                         f"{getattr(factors, 'dtype', type(factors))} {tuple(getattr(factors, 'shape', ()))}")
    for i, v in enumerate(vecs):
        if not isinstance(v, torch.Tensor) or not v.is_floating_point() or v.dim() < 1 \
                or v.shape[0] != factors.shape[0]:
            raise ValueError(f"vecs[{i}] must be a floating-point [B, ...] tensor with B = {factors.shape[0]}, "
                             f"got {getattr(v, 'dtype', type(v))} {tuple(getattr(v, 'shape', ()))}")
    pairs = [("vectors", v) for v in vecs]
    name = _registry.pick(backend, factors.device, same_device=pairs, strided=pairs,
                          dtypes=[("factors", factors, (torch.float32,))] + pairs, allowed=_DTYPES,
                          same_dtype=pairs)
    name = _no_cuda("dp_ghost_clipped_vector_grads", backend, name)
    outs = [torch.empty(v.shape[1:], dtype=factors.dtype, device=factors.device) for v in vecs]
    if vecs:
        if name != "torch":
            vecs, factors = [v.contiguous() for v in vecs], factors.contiguous()
        clipped_vector_grads_op(vecs, factors, outs, name)
    return outs


def _copy_outs(outs, values) -> None:
    """A norm layer op's torch path: each asked-for output gets its reference value."""
    for out, v in zip(outs, values):
        if out is not None:
            out.copy_(v)


@_registry.op("dp_ghost_norm_layer_grads", mutates_args={"w_out", "b_out"})
def norm_layer_grads_op(a: torch.Tensor, g: torch.Tensor, eps: float, rms: bool, w_out: Optional[torch.Tensor],
                        b_out: Optional[torch.Tensor], backend: str) -> None:
    """``w_out[b] = sum_t g_t * xhat_t``, ``b_out[b] = sum_t g_t`` (fp32 ``[B, D]``, either may be None)."""
    if backend == "torch":
        count_launch("torch.dp_ghost_norm_layer_grads")
        _copy_outs((w_out, b_out), ref.norm_layer_grads(a, g, eps, rms, weight=w_out is not None,
                                                        bias=b_out is not None))
        return
    with device_guard(a):
        _registry.kernels("dp_ghost", backend).norm_layer_grads(a, g, eps, rms, w_out, b_out)


@norm_layer_grads_op.register_fake
def _(a, g, eps, rms, w_out, b_out, backend):
    return None


def norm_layer_grads(a: torch.Tensor, g: torch.Tensor, eps: float, *, rms: bool = False, weight: bool = True,
                     bias: bool = True, backend: str | None = None) -> tuple:
    """Per-sample gradients of a LayerNorm's (``rms``: RMSNorm's) weight and
    bias, ``(sum_t g_t * xhat_t, sum_t g_t)`` ``[B, D]`` each (None where not
    asked for), from its input ``a`` and output gradient ``g`` ``[B, T, D]``
    (normalised over ``D``; ``xhat`` recomputed from ``a`` as the layer's
    forward computes it: :func:`fastadv.reference.dp_ghost.norm_layer_grads`).
    fp32 (fp64 for fp64 inputs on the torch backend).  Triton: one launch, one
    program per sample (fp32 / fp16 / bf16, mixed and strided; ``D`` up to
    16384), ``xhat`` and ``g * xhat`` never stored."""
    _check(a, g)
    if a.shape != g.shape:
        raise ValueError(f"a and g must both be [B, T, D], got {tuple(a.shape)} and {tuple(g.shape)}")
    pairs = [("input", a), ("output gradient", g)]
    name = _registry.pick(backend, a.device, same_device=pairs[1:], dtypes=pairs, allowed=_DTYPES, strided=pairs)
    if name != "torch" and a.shape[2] > NORM_MAX_D:
        if _registry.forced(backend):
            raise ValueError(f"the {name} backend normalises at most {NORM_MAX_D} elements, got "
                             f"{a.shape[2]}; use backend='torch'")
        name = "torch"
    name = _no_cuda("dp_ghost_norm_layer_grads", backend, name)
    acc = ref.acc_dtype(a, g) if name == "torch" else torch.float32
    outs = [torch.empty(a.shape[0], a.shape[2], dtype=acc, device=a.device) if want else None
            for want in (weight, bias)]
    if weight or bias:
        norm_layer_grads_op(a, g, float(eps), bool(rms), outs[0], outs[1], name)
    return outs[0], outs[1]


@_registry.op("dp_ghost_group_norm_grads", mutates_args={"w_out", "b_out"})
def group_norm_grads_op(a: torch.Tensor, g: torch.Tensor, groups: int, eps: float, w_out: Optional[torch.Tensor],
                        b_out: Optional[torch.Tensor], backend: str) -> None:
    """``w_out[b, c] = sum_n g * xhat``, ``b_out[b, c] = sum_n g`` (fp32 ``[B, C]``, either may be None)."""
    if backend == "torch":
        count_launch("torch.dp_ghost_group_norm_grads")
        _copy_outs((w_out, b_out), ref.group_norm_grads(a, g, groups, eps, weight=w_out is not None,
                                                        bias=b_out is not None))
        return
    with device_guard(a):
        _registry.kernels("dp_ghost", backend).group_norm_grads(a, g, groups, eps, w_out, b_out)


@group_norm_grads_op.register_fake
def _(a, g, groups, eps, w_out, b_out, backend):
    return None


def group_norm_grads(a: torch.Tensor, g: torch.Tensor, groups: int, eps: float, *, weight: bool = True,
                     bias: bool = True, backend: str | None = None) -> tuple:
    """Per-sample gradients of a GroupNorm's weight and bias, ``(sum_n g *
    xhat, sum_n g)`` ``[B, C]`` each (None where not asked for), from its
    input ``a`` and output gradient ``g`` ``[B, C, N]`` (``xhat`` recomputed
    from ``a`` over ``groups`` groups of channels, as the layer's forward:
    :func:`fastadv.reference.dp_ghost.group_norm_grads`).  fp32 (fp64 for
    fp64 inputs on the torch backend).  Triton: one launch, one program per
    (sample, group), ``xhat`` and ``g * xhat`` never stored."""
    if not (isinstance(a, torch.Tensor) and isinstance(g, torch.Tensor)) or a.dim() != 3 or a.shape != g.shape:
        raise ValueError(f"a and g must both be [B, C, N], got {tuple(getattr(a, 'shape', ()))} and "
                         f"{tuple(getattr(g, 'shape', ()))}")
    if not (a.is_floating_point() and g.is_floating_point()):
        raise TypeError(f"a and g must be floating point, got {a.dtype} and {g.dtype}")
    groups = int(groups)
    if groups < 1 or a.shape[1] % groups:
        raise ValueError(f"the {a.shape[1]} channels must split into groups={groups} equal groups")
    pairs = [("input", a), ("output gradient", g)]
    name = _registry.pick(backend, a.device, same_device=pairs[1:], dtypes=pairs, allowed=_DTYPES, strided=pairs)
    name = _no_cuda("dp_ghost_group_norm_grads", backend, name)
    acc = ref.acc_dtype(a, g) if name == "torch" else torch.float32
    outs = [torch.empty(a.shape[0], a.shape[1], dtype=acc, device=a.device) if want else None
            for want in (weight, bias)]
    if weight or bias:
        group_norm_grads_op(a, g, groups, float(eps), outs[0], outs[1], name)
    return outs[0], outs[1]


@_registry.op("dp_ghost_clipped_embedding_grad", mutates_args={"out"})
def clipped_embedding_grad_op(ids: torch.Tensor, g: torch.Tensor, factors: torch.Tensor, out: torch.Tensor,
                              backend: str) -> None:
    """``out[v] += sum_{(b, t): id = v} f_b g[b, t]`` (``f_b = 0``: not read)."""
    if backend == "torch":
        count_launch("torch.dp_ghost_clipped_embedding_grad")
        ref.add_clipped_use(out, ref.MatUse(ids=ids, q=g), factors)
        return
    with device_guard(out):
        _registry.kernels("dp_ghost", backend).clipped_embedding_grad(ids, g, factors, out)


@clipped_embedding_grad_op.register_fake
def _(ids, g, factors, out, backend):
    return None


def clipped_embedding_grad_backend(backend, ids, g, factors, out) -> str:
    """The backend :func:`clipped_embedding_grad_` runs for these tensors
    (kernels: fp32 / fp16 / bf16 ``g``, fp32 factors, contiguous fp32 ``out``)."""
    name = _registry.pick(backend, out.device, same_device=[("ids", ids), ("g", g), ("factors", factors)],
                          dtypes=[("output gradients", g), ("factors", factors, (torch.float32,)),
                                  ("out", out, (torch.float32,))],
                          allowed=_DTYPES, contiguous=[("out", out)], strided=[("g", g)])
    return _no_cuda("dp_ghost_clipped_embedding_grad", backend, name)


def clipped_embedding_grad_(out: torch.Tensor, ids: torch.Tensor, g: torch.Tensor, factors: torch.Tensor, *,
                            backend: str | None = None) -> torch.Tensor:
    """Book-keeping's clipped gradient of one embedding lookup, in place:
    ``out[v] += sum_{(b, t): ids[b, t] = v} f_b g[b, t]`` for ``ids [B, T]``
    (valid rows of ``out``), ``g [B, T, D]``, ``factors [B]``, ``out [V, D]``;
    samples with ``f_b = 0`` never read.  Triton: deterministic (a stable sort
    of the ids, then one launch in which each row has one owner, summing in
    ``(b, t)`` order), where ``index_add_`` on CUDA adds with atomics.
    Returns ``out``."""
    _check_embedding(ids, g)
    if not (isinstance(factors, torch.Tensor) and isinstance(out, torch.Tensor)) \
            or factors.shape != (g.shape[0],) or out.dim() != 2 or out.shape[1] != g.shape[2]:
        raise ValueError(f"need ids [B, T], g [B, T, D], factors [B], out [V, D]; got ids {tuple(ids.shape)}, "
                         f"g {tuple(g.shape)}, factors {tuple(getattr(factors, 'shape', ()))}, "
                         f"out {tuple(getattr(out, 'shape', ()))}")
    name = clipped_embedding_grad_backend(backend, ids, g, factors, out)
    if name != "torch":
        ids, g, factors = ids.contiguous(), g.contiguous(), factors.contiguous()
    clipped_embedding_grad_op(ids, g, factors, out, name)
    return out


# ---------------------------------------------------------------- clip factors

@_registry.op("dp_ghost_clip_factors", mutates_args={"factors", "finite", "norms"})
def clip_factors_op(rows: torch.Tensor, max_grad_norm: float, factors: torch.Tensor, finite: torch.Tensor,
                    norms: torch.Tensor, backend: str) -> None:
    """``norms = sqrt(rows.sum(0))``, ``factors`` (Opacus's, 0 if not finite),
    ``finite`` (bool) from the squared-norm rows ``[n_rows, B]``."""
    if backend == "torch":
        count_launch("torch.dp_ghost_clip_factors")
        sq = rows.sum(0)
        f, ok = ref.clip_factors(sq, max_grad_norm)
        factors.copy_(f)
        finite.copy_(ok)
        norms.copy_(sq.sqrt())
        return
    with device_guard(rows):
        _registry.kernels("dp_ghost", backend).clip_factors(rows, max_grad_norm, factors, finite, norms)


@clip_factors_op.register_fake
def _(rows, max_grad_norm, factors, finite, norms, backend):
    return None


def clip_factors_backend(backend, device, dtype=torch.float32) -> str:
    """The backend :func:`clip_factors` runs for rows of ``dtype`` on ``device``
    (the kernels take fp32 rows only)."""
    probe = torch.empty(0, dtype=dtype, device=device)
    name = _registry.pick(backend, device, dtypes=[("squared-norm rows", probe)], allowed=(torch.float32,))
    return _no_cuda("dp_ghost_clip_factors", backend, name)


def clip_factors(rows: torch.Tensor, max_grad_norm: float, *, backend: str | None = None):
    """``(factors, finite, norms)``, each ``[B]``, from the per-parameter
    squared-norm rows ``[n_rows, B]`` (fp32; fp64 on the torch backend)."""
    if not isinstance(rows, torch.Tensor) or rows.dim() != 2 or not rows.is_floating_point():
        raise ValueError(f"rows must be a floating-point [n_rows, B] tensor, got "
                         f"{getattr(rows, 'dtype', type(rows))} {tuple(getattr(rows, 'shape', ()))}")
    name = clip_factors_backend(backend, rows.device, rows.dtype)
    if name != "torch":
        rows = rows.contiguous()
    batch = rows.shape[1]
    factors = torch.empty(batch, dtype=rows.dtype, device=rows.device)
    finite = torch.empty(batch, dtype=torch.bool, device=rows.device)
    norms = torch.empty(batch, dtype=rows.dtype, device=rows.device)
    clip_factors_op(rows, float(max_grad_norm), factors, finite, norms, name)
    return factors, finite, norms


# ---------------------------------------------------------------- book-keeping's clipped gradient

@_registry.op("dp_ghost_clipped_linear_grad", mutates_args={"out"})
def clipped_linear_grad_op(p: torch.Tensor, q: torch.Tensor, factors: torch.Tensor, out: torch.Tensor,
                           accumulate: bool, backend: str) -> None:
    """``out += sum_b f_b P_b^T Q_b`` (``f_b = 0``: the sample is not read);
    ``accumulate=False``: ``out = ...`` (its old values never read)."""
    if backend == "torch":
        count_launch("torch.dp_ghost_clipped_linear_grad")
        if not accumulate:
            out.zero_()
        ref.add_clipped_use(out, ref.MatUse(p=p, q=q), factors)
        return
    with device_guard(out):
        _registry.kernels("dp_ghost", backend).clipped_linear_grad(p, q, factors, out, accumulate)


@clipped_linear_grad_op.register_fake
def _(p, q, factors, out, accumulate, backend):
    return None


def clipped_linear_grad_backend(backend, p: torch.Tensor, q: torch.Tensor, factors: torch.Tensor,
                                out: torch.Tensor) -> str:
    """The backend :func:`clipped_linear_grad_` runs for these tensors
    (kernels: fp32 / fp16 / bf16 operands, mixed allowed; fp32 factors and
    contiguous fp32 ``out``)."""
    name = _registry.pick(backend, out.device, same_device=[("p", p), ("q", q), ("factors", factors)],
                          dtypes=[("p", p), ("q", q), ("factors", factors, (torch.float32,)),
                                  ("out", out, (torch.float32,))],
                          allowed=_DTYPES, contiguous=[("out", out)], strided=[("p", p), ("q", q)])
    return _no_cuda("dp_ghost_clipped_linear_grad", backend, name)


def clipped_linear_grad_(out: torch.Tensor, p: torch.Tensor, q: torch.Tensor, factors: torch.Tensor, *,
                         accumulate: bool = True, backend: str | None = None) -> torch.Tensor:
    """Book-keeping's clipped gradient of one Linear use, in place:
    ``out += sum_b f_b P_b^T Q_b`` for ``p [B, T, O]``, ``q [B, T, I]``,
    ``factors [B]``, ``out [O, I]`` (fp32 on the kernel backends);
    ``accumulate=False``: ``out = ...`` (a parameter's first use: ``out`` may
    be uninitialised, it is not read).  Returns ``out``."""
    if not all(isinstance(t, torch.Tensor) for t in (out, p, q, factors)):
        raise TypeError("out, p, q and factors must be tensors")
    if p.dim() != 3 or q.dim() != 3 or p.shape[:2] != q.shape[:2] or factors.shape != (p.shape[0],) \
            or out.shape != (p.shape[2], q.shape[2]):
        raise ValueError(f"need p [B, T, O], q [B, T, I], factors [B], out [O, I]; got p {tuple(p.shape)}, "
                         f"q {tuple(q.shape)}, factors {tuple(factors.shape)}, out {tuple(out.shape)}")
    clipped_linear_grad_op(p, q, factors, out, bool(accumulate),
                           clipped_linear_grad_backend(backend, p, q, factors, out))
    return out


# ---------------------------------------------------------------- cross terms of a tied parameter

@_registry.op("dp_ghost_cross_gram", mutates_args={"out"})
def cross_gram_op(qu: torch.Tensor, qv: torch.Tensor, pu: Optional[torch.Tensor], pv: Optional[torch.Tensor],
                  ids_u: Optional[torch.Tensor], ids_v: Optional[torch.Tensor], pp: Optional[torch.Tensor],
                  scale: float, out: torch.Tensor, accumulate: bool, backend: str) -> None:
    """``out (+)= scale * <G^u_b, G^v_b>`` (``accumulate``: added; ``out``: fp32 ``[B]``)."""
    if backend == "torch":
        count_launch("torch.dp_ghost_cross_gram")
        term = ref.cross_gram(ref.MatUse(q=qu, p=pu, ids=ids_u), ref.MatUse(q=qv, p=pv, ids=ids_v), pp)
        term = term if scale == 1.0 else scale * term
        out.add_(term) if accumulate else out.copy_(term)
        return
    with device_guard(out):
        _registry.kernels("dp_ghost", backend).cross_gram(qu, qv, pu, pv, ids_u, ids_v, pp, scale, out, accumulate)


@cross_gram_op.register_fake
def _(qu, qv, pu, pv, ids_u, ids_v, pp, scale, out, accumulate, backend):
    return None


def _cross_operands(u: ref.MatUse, v: ref.MatUse, pp) -> tuple:
    """``(u, v)`` checked, a lookup ``u`` paired with a Linear ``v`` swapped (the
    cross term is symmetric: the kernel reads the Linear's ``P`` at the ids)."""
    for name, w in (("u", u), ("v", v)):
        if not isinstance(w, ref.MatUse) or not isinstance(w.q, torch.Tensor) or w.q.dim() != 3 \
                or not w.q.is_floating_point():
            raise ValueError(f"{name} must be a MatUse with a floating-point q [B, T, I]")
        if pp is None and (w.p is None) == (w.ids is None):
            raise ValueError(f"{name} needs exactly one of p [B, T, O] and ids [B, T] (or give pp)")
        if pp is None and w.p is not None and (w.p.dim() != 3 or w.p.shape[:2] != w.q.shape[:2]
                                               or not w.p.is_floating_point()):
            raise ValueError(f"{name}.p must be a floating-point [B, T, O] with q's B and T, got "
                             f"{tuple(w.p.shape)} for q {tuple(w.q.shape)}")
        if pp is None and w.ids is not None:
            if w.ids.dim() != 2 or w.ids.shape != w.q.shape[:2]:
                raise ValueError(f"{name}.ids must be [B, T] with q's B and T, got {tuple(w.ids.shape)}")
            if w.ids.dtype not in _ID_DTYPES:
                raise TypeError(f"{name}.ids must be int32 or int64 (nn.Embedding's indices), got {w.ids.dtype}")
    (b, t_u, i), (b_v, t_v, i_v) = u.q.shape, v.q.shape
    if (b, i) != (b_v, i_v):
        raise ValueError(f"u.q [B, T_u, I] and v.q [B, T_v, I] need the same B and I, got {tuple(u.q.shape)} "
                         f"and {tuple(v.q.shape)}")
    if pp is not None:
        if not isinstance(pp, torch.Tensor) or pp.shape != (b, t_u, t_v) or not pp.is_floating_point():
            raise ValueError(f"pp must be a floating-point [B, T_u, T_v] = {(b, t_u, t_v)} tensor, got "
                             f"{getattr(pp, 'dtype', type(pp))} {tuple(getattr(pp, 'shape', ()))}")
        return ref.MatUse(q=u.q), ref.MatUse(q=v.q)
    if u.p is None and v.p is not None:
        u, v = v, u
    if u.p is not None and v.p is not None and u.p.shape[2] != v.p.shape[2]:
        raise ValueError(f"u.p and v.p need the same O, got {tuple(u.p.shape)} and {tuple(v.p.shape)}")
    return u, v


def cross_gram_backend(backend, u: ref.MatUse, v: ref.MatUse, pp: torch.Tensor | None = None) -> str:
    """The backend :func:`cross_gram` runs for these uses (kernels: fp32 / fp16
    / bf16 operands, mixed allowed, strided; fp32 ``out``)."""
    floats = [(n, t) for n, t in (("u.q", u.q), ("v.q", v.q), ("pp", pp)) if t is not None]
    if pp is None:
        floats += [(n, t) for n, t in (("u.p", u.p), ("v.p", v.p)) if t is not None]
    ids = [(n, t) for n, t in (("u.ids", u.ids), ("v.ids", v.ids)) if t is not None and pp is None]
    name = _registry.pick(backend, u.q.device, same_device=floats[1:] + ids, dtypes=floats, allowed=_DTYPES,
                          strided=floats)
    return _no_cuda("dp_ghost_cross_gram", backend, name)


def cross_gram(u: ref.MatUse, v: ref.MatUse, pp: torch.Tensor | None = None, *, scale: float = 1.0,
               out: torch.Tensor | None = None, accumulate: bool = False,
               backend: str | None = None) -> torch.Tensor:
    """The cross term of two uses ``u``, ``v`` of one weight matrix,
    ``scale * <G^u_b, G^v_b>`` for every sample (``G_b = P_b^T Q_b``; a use is
    a :class:`~fastadv.reference.dp_ghost.MatUse`: ``q [B, T, I]`` with ``p [B,
    T, O]`` (Linear) or ``ids [B, T]`` (embedding lookup, its ``padding_idx``
    rows of ``q`` zeroed by the caller)); ``pp``: a precomputed ``P^u P^v^T
    [B, T_u, T_v]`` (:func:`fastadv.reference.dp_ghost.gather_pp`), then the
    uses' ``p`` / ``ids`` are not read.  fp32 ``[B]`` (fp64 for fp64 inputs on
    the torch backend); ``out``: a contiguous ``[B]`` row to write it into, or
    (``accumulate``) add it to.  ``u is v`` gives the use's own Gram norm."""
    u, v = _cross_operands(u, v, pp)
    name = cross_gram_backend(backend, u, v, pp)
    acc = ref.acc_dtype(u.q, v.q, u.p, v.p, pp)
    if out is None:
        out, accumulate = torch.empty(u.q.shape[0], dtype=acc, device=u.q.device), False
    out = _out_row(out, u.q.shape[0], acc, u.q.device)
    cross_gram_op(u.q, v.q, u.p, v.p, u.ids, v.ids, pp, float(scale), out, bool(accumulate), name)
    return out


# ---------------------------------------------------------------- two uses, the per-sample way

@_registry.op("dp_ghost_pair_sq_norms_ps", mutates_args={"out"})
def pair_sq_norms_ps_op(qu: torch.Tensor, qv: torch.Tensor, pu: Optional[torch.Tensor], pv: Optional[torch.Tensor],
                        ids_u: Optional[torch.Tensor], ids_v: Optional[torch.Tensor], rows: int, out: torch.Tensor,
                        backend: str) -> None:
    """``out[b] = ||G_b^u + G_b^v||^2`` from each sample's gradient (``out``: fp32 ``[B]``)."""
    if backend == "torch":
        count_launch("torch.dp_ghost_pair_sq_norms_ps")
        uses = [ref.MatUse(q=qu, p=pu, ids=ids_u), ref.MatUse(q=qv, p=pv, ids=ids_v)]
        out.copy_(ref.matrix_sq_norms(uses, rows, "per_sample"))
        return
    with device_guard(out):
        _registry.kernels("dp_ghost", backend).pair_sq_norms_ps(qu, qv, pu, pv, ids_u, ids_v, rows, out)


@pair_sq_norms_ps_op.register_fake
def _(qu, qv, pu, pv, ids_u, ids_v, rows, out, backend):
    return None


def pair_sq_norms_ps_backend(backend, u: ref.MatUse, v: ref.MatUse) -> str:
    """The backend :func:`pair_sq_norms_ps` runs for these uses."""
    floats = [(n, t) for n, t in (("u.q", u.q), ("v.q", v.q), ("u.p", u.p), ("v.p", v.p)) if t is not None]
    ids = [(n, t) for n, t in (("u.ids", u.ids), ("v.ids", v.ids)) if t is not None]
    name = _registry.pick(backend, u.q.device, same_device=floats[1:] + ids, dtypes=floats, allowed=_DTYPES,
                          strided=floats)
    return _no_cuda("dp_ghost_pair_sq_norms_ps", backend, name)


def pair_sq_norms_ps(u: ref.MatUse, v: ref.MatUse, rows: int, *, backend: str | None = None,
                     out: torch.Tensor | None = None) -> torch.Tensor:
    """``||G_b^u + G_b^v||_F^2`` per sample for two uses of one ``[rows, I]``
    weight matrix (each a :class:`~fastadv.reference.dp_ghost.MatUse`: a
    Linear's ``p [B, T, rows]``, or a lookup's ``ids [B, T]`` with valid rows,
    its ``padding_idx`` rows of ``q`` zeroed), the per-sample way
    (:func:`fastadv.reference.dp_ghost.matrix_sq_norms` with ``"per_sample"``,
    which materialises ``[B, rows, I]``; the kernel stores nothing per
    sample but one fp32 partial per tile).  fp32 ``[B]`` (fp64 for fp64
    inputs on the torch backend); ``out`` as in :func:`linear_sq_norms`."""
    u, v = _cross_operands(u, v, None)
    rows = int(rows)
    for name, w in (("u", u), ("v", v)):
        if w.p is not None and w.p.shape[2] != rows:
            raise ValueError(f"{name}.p must have rows = {rows} columns, got {tuple(w.p.shape)}")
    name = pair_sq_norms_ps_backend(backend, u, v)
    out = _out_row(out, u.q.shape[0], ref.acc_dtype(u.q, v.q, u.p, v.p), u.q.device)
    pair_sq_norms_ps_op(u.q, v.q, u.p, v.p, u.ids, v.ids, rows, out, name)
    return out


# ---------------------------------------------------------------- any number of uses, the per-sample way

@_registry.op("dp_ghost_uses_sq_norms_ps", mutates_args={"out"})
def uses_sq_norms_ps_op(qs: list[torch.Tensor], ps: list[Optional[torch.Tensor]], ids: list[Optional[torch.Tensor]],
                        rows: int, out: torch.Tensor, backend: str) -> None:
    """``out[b] = ||sum_u G_b^u||^2`` from each sample's gradient (``out``: fp32 ``[B]``)."""
    if backend == "torch":
        count_launch("torch.dp_ghost_uses_sq_norms_ps")
        uses = [ref.MatUse(q=q, p=p, ids=i) for q, p, i in zip(qs, ps, ids)]
        out.copy_(ref.matrix_sq_norms(uses, rows, "per_sample"))
        return
    with device_guard(out):
        _registry.kernels("dp_ghost", backend).uses_sq_norms_ps(list(qs), list(ps), list(ids), rows, out)


@uses_sq_norms_ps_op.register_fake
def _(qs, ps, ids, rows, out, backend):
    return None


def uses_sq_norms_ps_backend(backend, uses: list[ref.MatUse]) -> str:
    """The backend :func:`uses_sq_norms_ps` runs for these uses (the kernel:
    fp32 / fp16 / bf16 operands, mixed allowed, strided)."""
    floats = [(f"uses[{k}].{n}", t) for k, u in enumerate(uses) for n, t in (("q", u.q), ("p", u.p)) if t is not None]
    ids = [(f"uses[{k}].ids", u.ids) for k, u in enumerate(uses) if u.ids is not None]
    name = _registry.pick(backend, uses[0].q.device, same_device=floats[1:] + ids, dtypes=floats, allowed=_DTYPES,
                          strided=floats)
    return _no_cuda("dp_ghost_uses_sq_norms_ps", backend, name)


def _one_dtype_per_kind(uses: list[ref.MatUse]) -> list[ref.MatUse]:
    """The uses with one dtype per operand kind, as the kernel's table needs
    (one element type for the Linear uses' ``p``, one for their ``q``, one for
    the lookups' ``q`` and one for their ids): a kind found in two dtypes is
    widened, exactly, to fp32 (ids to int64) -- a shared layer under
    autocast sees an fp32 input first and bf16 ones after; the pair kernel
    widens a mixed pair the same way."""
    def widened(ts, wide):
        return ts if len({t.dtype for t in ts}) <= 1 else [t.to(wide) for t in ts]

    lin = [k for k, u in enumerate(uses) if u.p is not None]
    look = [k for k, u in enumerate(uses) if u.p is None]
    out = list(uses)
    ps, qs = widened([uses[k].p for k in lin], torch.float32), widened([uses[k].q for k in lin], torch.float32)
    for k, p, q in zip(lin, ps, qs):
        out[k] = ref.MatUse(p=p, q=q)
    qs, ids = widened([uses[k].q for k in look], torch.float32), widened([uses[k].ids for k in look], torch.int64)
    for k, q, i in zip(look, qs, ids):
        out[k] = ref.MatUse(q=q, ids=i)
    return out


def uses_sq_norms_ps(uses: list[ref.MatUse], rows: int, *, backend: str | None = None,
                     out: torch.Tensor | None = None) -> torch.Tensor:
    """``||sum_u G_b^u||_F^2`` per sample for any number of uses of one
    ``[rows, I]`` weight matrix (:func:`pair_sq_norms_ps` for a list: a Linear
    applied three times, a table tied to a head and read twice), the per-sample
    way without the reference's ``[B, rows, I]``.  fp32 ``[B]`` (fp64 for
    fp64 inputs on the torch backend); ``out`` as in :func:`linear_sq_norms`."""
    if not isinstance(uses, (list, tuple)) or not uses:
        raise ValueError("uses must be a non-empty list of MatUse")
    for k, w in enumerate(uses):  # each use against the first: shapes, dtypes, one B and I (and O)
        try:
            _cross_operands(w, uses[0], None)
        except (ValueError, TypeError) as e:
            raise type(e)(f"uses[{k}] (u) against uses[0] (v): {e}") from None
    rows = int(rows)
    for k, w in enumerate(uses):
        if w.p is not None and w.p.shape[2] != rows:
            raise ValueError(f"uses[{k}].p must have rows = {rows} columns, got {tuple(w.p.shape)}")
    name = uses_sq_norms_ps_backend(backend, uses)
    out = _out_row(out, uses[0].q.shape[0], ref.acc_dtype(*[t for w in uses for t in (w.q, w.p)]), uses[0].q.device)
    if name != "torch":
        uses = _one_dtype_per_kind(uses)
    uses_sq_norms_ps_op([w.q for w in uses], [w.p for w in uses], [w.ids for w in uses], rows, out, name)
    return out
