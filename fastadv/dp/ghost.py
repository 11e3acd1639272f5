"""DP-SGD without per-sample gradients: ghost clipping and book-keeping.

``PrivacyEngine.make_private(..., grad_sample_mode="ghost" | "bk")`` wraps the
model in :class:`GhostClippingModule`, the optimizer in
:class:`GhostDPOptimizer` and the criterion in :class:`DPLossGhost` (Opacus
1.6's ``DPLossFastGradientClipping`` API: ``loss = criterion(out, y);
loss.backward()``).

One step:

1. forward: a forward hook on every supported layer keeps its input ``a``
   (detached) and its output ``y``;
2. ``loss.backward()`` runs ``torch.autograd.grad(sum_b loss_b, [y...])``: the
   output gradients ``g`` of every layer, and no parameter gradient;
3. per-sample norms from ``(a, g)`` (:mod:`fastadv.reference.dp_ghost`: the
   Gram form or the per-sample gradient, whichever is cheaper per layer; tied
   parameters summed over their uses exactly), Opacus's clip factor ``f_b``
   (on a kernel backend: one row per parameter of an fp32 ``[n_params, B]``
   buffer -- a single-use Linear / embedding's Gram norm written by its norm
   kernel, a tied parameter's Gram and cross terms added by
   ``dp_ghost_cross_gram``, all bias / norm-layer terms by one
   ``dp_ghost_vector_sq_norms`` launch -- reduced by one
   ``dp_ghost_clip_factors`` launch);
4. ``"bk"`` (book-keeping): ``p.grad += sum_b f_b G_b`` from the kept ``a``
   and ``g`` (``a^T (f g)`` for a Linear layer; on a kernel backend one
   ``dp_ghost_clipped_linear_grad`` GEMM launch per Linear / Conv use, one
   deterministic ``dp_ghost_clipped_embedding_grad`` launch per embedding
   lookup and one ``dp_ghost_clipped_vector_grads`` launch for all the bias /
   norm-layer gradients), no second backward;
   ``"ghost"``: a second backward of ``sum_b f_b loss_b`` fills ``p.grad``;
5. ``optimizer.step()``: noise and scaling with fastadv's noise op (the same
   draws as :class:`fastadv.dp.DPOptimizer`), then the inner optimizer.

Exact by construction: every trainable parameter must belong to a supported
layer (checked when wrapping), and at every backward the autograd graph is
walked to count each parameter's uses: a use that no hook saw (a tied head
written as ``h @ W.t()``, a layer called with hooks off) raises instead of
giving a wrong norm.  A layer input modified in place after the layer
raises too (an in-place op on a layer's output is fine).
"""
from __future__ import annotations

import collections
import functools
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from opacus.utils.fast_gradient_clipping_utils import DPLossFastGradientClipping, DPTensorFastGradientClipping
from torch import nn

from ..ops import _dist
from ..ops import dp as _ops
from ..ops import dp_ghost as _ghost_ops
from ..reference import dp_ghost as ref
from .optimizer import DPOptimizer

GHOST_MODES = ("ghost", "bk")

__all__ = ["GHOST_MODES", "GhostClippingModule", "GhostDPOptimizer", "DPLossGhost", "DPTensorGhost",
           "UnsupportedLayerError", "supported_layers"]


class UnsupportedLayerError(NotImplementedError):
    """A layer with trainable parameters that ghost / book-keeping clipping cannot handle."""


# ---------------------------------------------------------------- layer rules

@dataclass
class _Uses:
    """What one layer call contributes: weight matrices (as ``MatUse``, with the
    view of the parameter as ``[rows, cols]``) and small parameters' per-sample
    gradients."""
    mats: list = field(default_factory=list)   # (param, MatUse or _LazyUse: resolve before reading)
    vecs: list = field(default_factory=list)   # (param, [B, *param.shape])


def _flat3(t: torch.Tensor) -> torch.Tensor:
    """``[B, ..., d]`` as ``[B, T, d]`` (a 2-D input is ``T = 1``)."""
    return t.reshape(t.shape[0], math.prod(t.shape[1:-1]), t.shape[-1])  # no -1: the batch may be empty


def _linear(m, a, g, backend=None, *, transposed: bool = False) -> _Uses:
    """nn.Linear (``W [out, in]``: ``G = g^T a``); ``transposed``: transformers'
    ``Conv1D`` (GPT-2), ``y = x @ W + b`` with ``W [in, out]`` (``G = a^T g``)."""
    out = _Uses()
    if m.weight.requires_grad:
        p, q = (_flat3(a), _flat3(g)) if transposed else (_flat3(g), _flat3(a))
        out.mats.append((m.weight, ref.MatUse(p=p, q=q)))
    if m.bias is not None and m.bias.requires_grad:
        out.vecs.append((m.bias, _flat3(g).sum(1, dtype=ref.acc_dtype(g))))  # fp16 / bf16: fp32 sum over T
    return out


def _embedding(m: nn.Embedding, ids, g, backend=None) -> _Uses:
    ids = ids.reshape(ids.shape[0], math.prod(ids.shape[1:]))
    g = g.reshape(ids.shape[0], ids.shape[1], g.shape[-1])
    if m.padding_idx is not None:  # the padding row gets no gradient
        g = g * (ids != m.padding_idx)[:, :, None].to(g.dtype)
    return _Uses(mats=[(m.weight, ref.MatUse(ids=ids, q=g))])


def _norm_layer(m, a, g, eps, rms, backend) -> _Uses:
    """LayerNorm / RMSNorm: the per-sample weight and bias gradients from one
    ``dp_ghost_norm_layer_grads`` call (a kernel recomputes ``xhat`` in
    registers), ``a`` and ``g`` seen as ``[B, T, D]`` with ``D`` the
    normalised elements (a 2-D input: ``T = 1``)."""
    shape = tuple(m.normalized_shape) if hasattr(m, "normalized_shape") else tuple(m.weight.shape)
    d = math.prod(shape)
    w = m.weight if m.weight is not None and m.weight.requires_grad else None
    b = getattr(m, "bias", None)
    b = b if b is not None and b.requires_grad else None
    a3, g3 = _btd(a, d), _btd(g, d)
    w_ps, b_ps = _ghost_ops.norm_layer_grads(a3, g3, eps, rms=rms, weight=w is not None, bias=b is not None,
                                             backend=backend)
    return _Uses(vecs=[(p, v.reshape(v.shape[0], *shape)) for p, v in ((w, w_ps), (b, b_ps)) if p is not None])


def _btd(t: torch.Tensor, d: int) -> torch.Tensor:
    """``[B, ..., (normalised elements)]`` as ``[B, T, d]`` (``T = 1`` for a 2-D input)."""
    return t.reshape(t.shape[0], t.numel() // max(t.shape[0] * d, 1), d)


def _layer_norm(m: nn.LayerNorm, a, g, backend=None) -> _Uses:
    return _norm_layer(m, a, g, m.eps, False, backend)


def _rms_norm(m, a, g, backend=None) -> _Uses:
    eps = m.eps if m.eps is not None else torch.finfo(a.dtype).eps  # torch's default: the input's eps
    return _norm_layer(m, a, g, eps, True, backend)


def _hf_rms_norm(m, a, g, backend=None) -> _Uses:
    """transformers' RMSNorm (LlamaRMSNorm's forward: ``weight * xhat`` with
    ``xhat`` computed in fp32 and rounded to the input's dtype).  An fp32 /
    fp64 input: the norm-layer op (no rounding to undo); a low-precision one:
    ``xhat`` rounded as the forward rounds it, in plain PyTorch."""
    if a.dtype in (torch.float32, torch.float64):
        return _norm_layer(m, a, g, m.variance_epsilon, True, backend)
    d = m.weight.numel()
    w, _ = ref.norm_layer_grads(_btd(a, d), _btd(g, d), m.variance_epsilon, rms=True, bias=False, xhat_dtype=a.dtype)
    return _Uses(vecs=[(m.weight, w.reshape(a.shape[0], *m.weight.shape))])


def _gemma_rms_norm(m, a, g, backend=None) -> _Uses:
    """transformers' GemmaRMSNorm (``xhat * (1 + weight)`` in fp32, rounded
    after): the weight's per-sample gradient is ``sum_t g_t * xhat_t`` with
    the fp32 ``xhat``, the norm-layer op's, for any input dtype."""
    return _norm_layer(m, a, g, m.eps, True, backend)


def _scaled_embedding(m, ids, g, backend=None) -> _Uses:
    """transformers' GemmaTextScaledWordEmbedding (``embedding * embed_scale``):
    the lookup's output gradient times the scale, as its forward multiplies."""
    return _embedding(m, ids, g * m.embed_scale.to(m.weight.dtype).to(g.dtype))


def _code(cls, method):
    return getattr(getattr(cls, method, None), "__code__", None)


def _same_code(x, y) -> bool:
    return x is not None and y is not None and all(
        getattr(x, f) == getattr(y, f) for f in ("co_code", "co_consts", "co_names", "co_varnames"))


def _hf_layer_families() -> list:
    """transformers' layer classes with a rule here, as (their methods' code,
    (rule, check), an attribute they have, family); empty without transformers."""
    try:
        from transformers.models.gemma.modeling_gemma import GemmaRMSNorm, GemmaTextScaledWordEmbedding
        from transformers.models.llama.modeling_llama import LlamaRMSNorm
    except Exception:  # pragma: no cover - transformers is optional
        return []
    scaled = GemmaTextScaledWordEmbedding
    return [({"forward": _code(LlamaRMSNorm, "forward")}, (_hf_rms_norm, None), "variance_epsilon",
             "RMSNorm with LlamaRMSNorm's forward (Llama, Mistral, Qwen2 / 3, Phi-3, Mixtral, Granite)"),
            ({"forward": _code(GemmaRMSNorm, "forward"), "_norm": _code(GemmaRMSNorm, "_norm")},
             (_gemma_rms_norm, None), "eps", "RMSNorm with GemmaRMSNorm's forward (Gemma, Gemma 2 / 3)"),
            ({"forward": _code(scaled, "forward")}, (_scaled_embedding, _check_embedding), "embed_scale",
             "scaled embedding with GemmaTextScaledWordEmbedding's forward (Gemma, Gemma 2 / 3)")]


def _hf_layer_rule(m):
    """The (rule, check) of a transformers layer whose methods are one known
    class's code, byte for byte (transformers generates the other models'
    classes from LlamaRMSNorm, GemmaRMSNorm and GemmaTextScaledWordEmbedding),
    with only a ``weight`` and the class's attribute; None otherwise: a
    variant with its own forward (T5's or OLMo-2's RMSNorm, a subclass
    overriding forward) is refused like any unknown layer."""
    if [n for n, _ in m.named_parameters(recurse=False)] != ["weight"] or list(m.children()):
        return None
    for methods, rule, attr, _ in _HF_LAYERS:
        if hasattr(m, attr) and all(_same_code(_code(type(m), k), v) for k, v in methods.items()):
            return rule
    return None


def _group_norm(m: nn.GroupNorm, a, g, backend=None) -> _Uses:
    """GroupNorm: per-channel affine after normalising groups of channels; the
    per-sample weight and bias gradients from one ``dp_ghost_group_norm_grads``
    call (``a``, ``g`` seen as ``[B, C, N]``)."""
    w = m.weight if m.weight is not None and m.weight.requires_grad else None
    b = m.bias if m.bias is not None and m.bias.requires_grad else None
    a3, g3 = (t.reshape(t.shape[0], t.shape[1], math.prod(t.shape[2:])) for t in (a, g))
    w_ps, b_ps = _ghost_ops.group_norm_grads(a3, g3, m.num_groups, m.eps, weight=w is not None, bias=b is not None,
                                             backend=backend)
    return _Uses(vecs=[(p, v) for p, v in ((w, w_ps), (b, b_ps)) if p is not None])


def _conv(m, a, g, backend=None) -> _Uses:
    """Conv1d / Conv2d: the unfolded input patches make it a Linear layer with
    one step per output position (``weight`` viewed as ``[out, in * k]``)."""
    if m.weight.dim() == 3:  # Conv1d as a 1 x k Conv2d
        a = a.unsqueeze(2)
        k, s, p, d = (1, *m.kernel_size), (1, *m.stride), (0, *m.padding), (1, *m.dilation)
    else:
        k, s, p, d = m.kernel_size, m.stride, m.padding, m.dilation
    gl = g.reshape(g.shape[0], g.shape[1], math.prod(g.shape[2:])).transpose(1, 2)                  # [B, L, out]
    out = _Uses()
    if m.weight.requires_grad:  # the unfolded patches are k^2 times the input: built when needed
        out.mats.append((m.weight, _LazyUse(functools.partial(_conv_use, a, gl, k, s, p, d))))
    if m.bias is not None and m.bias.requires_grad:
        out.vecs.append((m.bias, gl.sum(1, dtype=ref.acc_dtype(gl))))  # fp16 / bf16: fp32 sum over L
    return out


def _conv_use(a, gl, k, s, p, d) -> ref.MatUse:
    patches = F.unfold(a, k, dilation=d, padding=p, stride=s).transpose(1, 2)  # [B, L, in * k]
    return ref.MatUse(p=gl, q=patches)


@dataclass
class _LazyUse:
    """A weight use whose ``MatUse`` is built when a norm or a clipped gradient
    needs it, and dropped after (a conv's unfolded patches: book-keeping keeps
    the layer's input and output gradient until the end, not ``k^2`` copies
    of the input)."""
    make: object

    @staticmethod
    def resolve(uses: list) -> list:
        return [u.make() if isinstance(u, _LazyUse) else u for u in uses]


def _check_conv(m) -> str | None:
    if m.groups != 1:
        return f"groups={m.groups} (only groups=1)"
    if m.padding_mode != "zeros":
        return f"padding_mode={m.padding_mode!r} (only 'zeros')"
    if isinstance(m.padding, str):
        return f"padding={m.padding!r} (give the padding as numbers)"
    return None


def _check_embedding(m) -> str | None:
    if m.max_norm is not None:
        return "max_norm (it rewrites the table in the forward pass)"
    if m.sparse:
        return "sparse=True"
    if m.scale_grad_by_freq:
        return "scale_grad_by_freq=True"
    return None


# type -> (rule(module, input, output_grad, backend) -> _Uses, check(module) -> reason or None); backend:
# the DP-ghost kernels' (the norm layers' rules launch one)
_RULES = {
    nn.Linear: (_linear, None),
    nn.Embedding: (_embedding, _check_embedding),
    nn.LayerNorm: (_layer_norm, None),
    nn.GroupNorm: (_group_norm, None),
    nn.Conv1d: (_conv, _check_conv),
    nn.Conv2d: (_conv, _check_conv),
}
if hasattr(nn, "RMSNorm"):
    _RULES[nn.RMSNorm] = (_rms_norm, None)
try:  # GPT-2's linear layer, when transformers is installed
    from transformers.pytorch_utils import Conv1D as _HFConv1D
    _RULES[_HFConv1D] = (functools.partial(_linear, transposed=True), None)
except Exception:  # pragma: no cover - transformers is optional
    pass


_HF_LAYERS = _hf_layer_families()


def _rule(m):
    """The (rule, check) of a layer: by its exact type, or a transformers
    layer recognised by its code; None for an unsupported layer."""
    rule = _RULES.get(type(m))
    return rule if rule is not None else _hf_layer_rule(m)


def supported_layers() -> list[str]:
    """The layer types with a rule (exact types: a subclass may change forward),
    and the transformers layers recognised by their code."""
    names = [f"{t.__module__}.{t.__qualname__}" for t in _RULES]
    return names + [f"transformers {family}" for *_, family in _HF_LAYERS]


def _type_name(m) -> str:
    return f"{type(m).__module__}.{type(m).__qualname__}"


# ---------------------------------------------------------------- autograd graph walk

# Nodes that only re-view or cast their one input: a parameter seen through them
# is still the parameter (each op consuming the view is one use).  A compute
# node with one input (EmbeddingBackward, MmBackward of a first layer) is not:
# its output may feed many ops and is still one use.
_PASS_THROUGH = frozenset({"TBackward0", "ToCopyBackward0", "ViewBackward0", "UnsafeViewBackward0",
                           "ReshapeAliasBackward0", "PermuteBackward0", "TransposeBackward0",
                           "ExpandBackward0", "AliasBackward0", "CloneBackward0", "SliceBackward0",
                           "SelectBackward0", "SqueezeBackward0", "SqueezeBackward1", "UnsqueezeBackward0"})


def _param_uses(root, params: dict[int, str]) -> collections.Counter:
    """How many times each parameter enters the graph below ``root``.

    A use is an edge from an op into the parameter's leaf, or into a chain of
    pass-through nodes ending at it (a transpose, an autocast copy: autocast
    caches one cast per weight, so two uses share the copy node and are two
    edges into it)."""
    chain: dict = {}

    def leaf_of(fn):  # id of the parameter a node is a pass-through chain to, or None
        if fn in chain:
            return chain[fn]
        var = getattr(fn, "variable", None)
        res = None
        if var is not None:
            res = id(var) if id(var) in params else None
        elif type(fn).__name__ in _PASS_THROUGH:
            nxt = [n for n, _ in fn.next_functions if n is not None]
            res = leaf_of(nxt[0]) if len(nxt) == 1 else None
        chain[fn] = res
        return res

    counts: collections.Counter = collections.Counter()
    seen, stack = set(), [root]
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        if type(fn).__name__ == "CheckpointFunctionBackward":
            raise NotImplementedError(
                "reentrant activation checkpointing (torch.utils.checkpoint(..., use_reentrant=True), or "
                "gradient_checkpointing_enable() with reentrant checkpoints) runs the checkpointed layers "
                "under no_grad and hides their parameters from the graph: their per-sample norms would be "
                "left out silently and the clipping bound broken. Use use_reentrant=False (HF: "
                "gradient_checkpointing_enable(gradient_checkpointing_kwargs={'use_reentrant': False}))")
        for nxt, _ in fn.next_functions:
            if nxt is None:
                continue
            leaf = leaf_of(nxt)
            if leaf is not None:
                counts[leaf] += 1
            elif getattr(nxt, "variable", None) is None:
                stack.append(nxt)
    return counts


# ---------------------------------------------------------------- the module wrapper

@dataclass(eq=False)  # compared by identity
class _Record:
    """One layer call: its input (detached, with its version to detect a later
    in-place change) and the autograd edge of its output.  The output tensor
    itself is not kept (autograd may not need it; keeping it would cost
    memory), and an in-place op on it after the layer (``ReLU(inplace=True)``)
    is fine: the edge still receives the gradient of the value the layer
    produced."""
    name: str
    module: nn.Module
    a: torch.Tensor
    version: int
    edge: object
    seen: bool = False


class _Pass:
    """One DP backward's per-sample squared norms, layer by layer as the output
    gradients arrive.

    * book-keeping (``keep``): every use is kept for the clipped gradient and
      the norms are computed at the end;
    * ghost, a parameter used once: reduced to its ``[B]`` squared norm at
      once, ``g`` dropped;
    * ghost, a tied parameter: each use adds its own Gram term and its cross
      terms with the uses that came before; what later uses need is kept --
      ``Q`` always, ``P`` only if a later use is not an embedding lookup (for a
      pending lookup ``P^u P^v^T`` is a gather of ``P^u`` at its ids, known from
      the forward: a tied LM head keeps ``[B, T, T]``, not its ``[B, T, V]``
      output gradient).

    ``fused`` (a kernel backend): each parameter's ``[B]`` term goes into its
    own row of one preallocated ``[n_params, B]`` buffer (a single Linear or
    embedding use's Gram norm is written there by its norm kernel; every
    vector term (biases, norm layers) by one ``dp_ghost_vector_sq_norms``
    launch at the end, so ghost mode keeps those small ``[B, d]`` terms until
    then; a tied matrix's Gram and cross terms are added into its row by
    ``dp_ghost_cross_gram``), and one
    ``dp_ghost_clip_factors`` launch sums the rows.  Otherwise the terms are
    added into one ``[B]`` sum as they come (the torch path)."""

    def __init__(self, owner, records, batch, acc, device, keep, fused=False):
        self.owner, self.batch, self.keep = owner, batch, keep
        self.mats, self.vecs = collections.defaultdict(list), collections.defaultdict(list)
        self.hooked = collections.Counter()
        self.pending = collections.defaultdict(list)  # param id -> records not yet arrived
        self.arrived = collections.defaultdict(list)  # param id -> [(MatUse, {id(record): PP})]
        self.row_of = {}  # param id -> its row of the fused buffer
        for r in records:
            for p in r.module.parameters(recurse=False):
                if p.requires_grad:
                    self.pending[id(p)].append(r)
                    self.row_of.setdefault(id(p), len(self.row_of))
        shape = (len(self.row_of), batch) if fused else (batch,)
        self.rows = torch.zeros(shape, dtype=acc, device=device) if fused else None
        self.sq = None if fused else torch.zeros(shape, dtype=acc, device=device)

    def _add(self, p, term: torch.Tensor) -> None:
        """Add one ``[B]`` term of ``p``'s squared norm."""
        if self.rows is None:
            self.sq += term.to(self.sq.device)
        else:
            self.rows[self.row_of[id(p)]].add_(term.to(self.rows.device))

    def _add_matrix(self, p, uses) -> None:
        """Add the squared norm of ``p``'s gradient over all its ``uses`` (each
        parameter once: its row is still zero, so a norm kernel may write it)."""
        uses = _LazyUse.resolve(uses)
        row = self.rows[self.row_of[id(p)]] if self.rows is not None else None
        term = self.owner._sq_norms(uses, _rows(p, uses[0]), out=row)
        if term is not row:
            self._add(p, term)

    def add(self, r: _Record, g) -> None:
        if g is None:
            return  # this call does not reach the loss
        if r.a._version != r.version:
            raise RuntimeError(f"the input of layer {r.name!r} ({_type_name(r.module)}) was modified "
                               f"in place after the layer ran; its per-sample gradient cannot be "
                               f"computed from it: make that operation out of place")
        if r.a.shape[0] != self.batch or g.shape[0] != self.batch:
            raise ValueError(f"layer {r.name!r} ({_type_name(r.module)}) saw a batch of "
                             f"{r.a.shape[0]} (output gradient {g.shape[0]}), the loss has {self.batch} "
                             f"samples: every layer input must have the batch first (for HF models "
                             f"pass position_ids of shape [batch, length])")
        uses = _rule(r.module)[0](r.module, r.a, g.detach(), self.owner.backend)
        for p, u in uses.mats:
            self._arrive(p, r)
            if self.keep:
                self.mats[p].append(u)  # a lazy use stays lazy until the norms / the clipped gradient
            elif not self.pending[id(p)] and not self.arrived[id(p)]:
                self._add_matrix(p, [u])
            else:
                self._tied(p, r, _LazyUse.resolve([u])[0])
        for p, v in uses.vecs:
            self._arrive(p, r)
            if self.keep or self.rows is not None or self.pending[id(p)] or p in self.vecs:
                self.vecs[p].append(v)  # small: summed over the uses at the end (fused: one launch)
            else:
                self._add(p, ref.vector_sq_norms([v]))

    def _arrive(self, p, r) -> None:
        self.hooked[id(p)] += 1
        if r in self.pending[id(p)]:
            self.pending[id(p)].remove(r)

    def _tied(self, p, r, u: ref.MatUse) -> None:
        """Ghost mode, a use of a parameter with other uses: its Gram term and its
        cross terms with the uses before it, now."""
        arrived = self.arrived[id(p)]
        self._add_cross(p, u, u)
        for prev, gathered in arrived:
            self._add_cross(p, prev, u, gathered.get(id(r)), scale=2.0)  # (prev, u) and (u, prev)
        pending = self.pending[id(p)]
        if pending:  # keep what the later uses need
            lookups = [q for q in pending if type(q.module) is nn.Embedding]
            if u.p is not None and len(lookups) == len(pending):
                gathered = {id(q): ref.gather_pp(u, _embedding_ids(q)) for q in lookups}
                u = ref.MatUse(q=u.q, p=None, ids=None) if u.ids is None else u
                arrived.append((u, gathered))
            else:
                arrived.append((u, {}))

    def _add_cross(self, p, u: ref.MatUse, v: ref.MatUse, pp=None, scale: float = 1.0) -> None:
        """Add ``scale * <G^u_b, G^v_b>`` (``u is v``: the use's own squared norm)
        to ``p``'s squared norm: on a kernel backend ``dp_ghost_cross_gram``,
        added in place into ``p``'s row of the fused buffer; the torch backend
        the reference's math."""
        backend = self.owner.backend
        if _ghost_ops.cross_gram_backend(backend, u, v, pp) == "torch":
            term = ref.gram_sq_norms([u]) if u is v else ref.cross_gram(u, v, pp)
            self._add(p, term if scale == 1.0 else scale * term)
            return
        row = self.rows[self.row_of[id(p)]] if self.rows is not None else None
        if row is not None and row.device == u.q.device and row.dtype == torch.float32:
            _ghost_ops.cross_gram(u, v, pp, scale=scale, out=row, accumulate=True, backend=backend)
        else:
            self._add(p, _ghost_ops.cross_gram(u, v, pp, scale=scale, backend=backend))

    def finish(self) -> torch.Tensor:
        """The squared norms of the whole gradient: ``[B]``, or the fused
        buffer's ``[n_params, B]`` rows."""
        for p, uses in self.mats.items():
            self._add_matrix(p, uses)
        if self.rows is None:
            for p, vs in self.vecs.items():
                self._add(p, ref.vector_sq_norms(vs))
            return self.sq
        self._add_vectors()
        return self.rows

    def _add_vectors(self) -> None:
        """Every vector parameter's term into its row in one
        ``dp_ghost_vector_sq_norms`` call (a parameter used more than once:
        its uses' per-sample gradients summed first, as the reference does)."""
        if not self.vecs:
            return
        acc, device = self.rows.dtype, self.rows.device
        vecs = [(vs[0] if len(vs) == 1 else sum(v.to(acc) for v in vs)).to(device) for vs in self.vecs.values()]
        rows = [self.row_of[id(p)] for p in self.vecs]
        _ghost_ops.vector_sq_norms_(self.rows, vecs, rows, backend=self.owner.backend)


def _embedding_ids(r: _Record) -> torch.Tensor:
    return r.a.reshape(r.a.shape[0], math.prod(r.a.shape[1:]))


class GhostClippingModule(nn.Module):
    """The model, plus forward hooks that keep each supported layer's input and
    output edge; the DP criterion (:class:`DPLossGhost`) turns them into
    per-sample norms and clipped gradients.  ``forward`` is the model's.

    ``mode``: ``"ghost"`` (second backward) or ``"bk"`` (book-keeping, one
    backward).  ``strategy``: ``"auto"`` (per layer, the Gram form or the
    per-sample gradient, whichever costs fewer operations), ``"gram"`` or
    ``"per_sample"``.  ``backend``: the DP-ghost kernels' (the Gram norm of a
    layer's single use runs :func:`fastadv.ops.dp_ghost.linear_sq_norms`, of a
    single-use embedding :func:`fastadv.ops.dp_ghost.embedding_sq_norms`; on a
    kernel backend a single Linear / Conv use's per-sample-strategy norm runs
    :func:`fastadv.ops.dp_ghost.linear_sq_norms_ps` (no ``[B, O, I]``
    buffer) and a single-use embedding's the Gram kernel (the same norm, no
    ``[B, V, d]``), a tied parameter's terms (Gram form) run
    :func:`fastadv.ops.dp_ghost.cross_gram` per pair of uses (the per-sample
    way, two uses: :func:`fastadv.ops.dp_ghost.pair_sq_norms_ps`, more:
    :func:`fastadv.ops.dp_ghost.uses_sq_norms_ps`), the vector terms are one
    :func:`fastadv.ops.dp_ghost.vector_sq_norms_` launch, the clip factors one
    :func:`fastadv.ops.dp_ghost.clip_factors` launch and bk's clipped gradient
    one :func:`fastadv.ops.dp_ghost.clipped_linear_grad_` launch per Linear /
    Conv use plus one :func:`fastadv.ops.dp_ghost.clipped_vector_grads` launch;
    the torch backend is the plain-PyTorch reference path).
    Raises :class:`UnsupportedLayerError` naming the first layer with
    trainable parameters that no rule covers (freeze it, or replace it)."""

    _wraps_shards = False  # FSDPGhostClippingModule (fastadv.dp.ghost_dist) unshards first

    def __init__(self, m: nn.Module, *, mode: str = "bk", batch_first: bool = True,
                 loss_reduction: str = "mean", max_grad_norm: float = 1.0, strategy: str = "auto",
                 backend: str | None = None):
        super().__init__()
        if mode not in GHOST_MODES:
            raise ValueError(f"mode must be one of {GHOST_MODES}, got {mode!r}")
        if not batch_first:
            raise NotImplementedError("ghost / bk clipping supports batch_first=True only")
        if loss_reduction not in ("mean", "sum"):
            raise ValueError(f"loss_reduction must be 'mean' or 'sum', got {loss_reduction!r}")
        if strategy not in ("auto", "gram", "per_sample"):
            raise ValueError(f"strategy must be 'auto', 'gram' or 'per_sample', got {strategy!r}")
        if not self._wraps_shards and any(_dist.is_sharded(p) for p in m.parameters()):
            # the graph's leaves would be FSDP2's unsharded parameters, which no hook can name: ghost
            # mode would silently see no use and clip nothing
            raise NotImplementedError(f"{type(self).__name__} does not take FSDP2 (fully_shard) parameters; "
                                      f"use fastadv.dp.PrivacyEngine.make_private, which wraps an FSDP2 "
                                      f"model in fastadv.dp.ghost_dist.FSDPGhostClippingModule")
        self._module = m
        self.mode, self.batch_first, self.loss_reduction = mode, batch_first, loss_reduction
        self.max_grad_norm, self.strategy, self.backend = max_grad_norm, strategy, backend
        self.hooks_enabled = True
        self._records: list[_Record] = []
        self._forbid_accumulation = False
        self._per_sample_gradient_norms = None
        self._names = {id(p): n for n, p in m.named_parameters()}
        self._handles = []
        for name, sub in m.named_modules():
            own = [n for n, p in sub.named_parameters(recurse=False) if p.requires_grad]
            if not own:
                continue
            rule = _rule(sub)
            if rule is None:
                raise UnsupportedLayerError(
                    f"layer {name or '<root>'!r} ({_type_name(sub)}) has trainable parameters {own} and "
                    f"no ghost-clipping rule; supported layers: {supported_layers()}. Freeze its "
                    f"parameters or use grad_sample_mode='hooks'")
            why = rule[1](sub) if rule[1] is not None else None
            if why is not None:
                raise UnsupportedLayerError(f"layer {name!r} ({_type_name(sub)}): {why} is not supported "
                                            f"by ghost / bk clipping")
            self._handles.append(sub.register_forward_hook(self._capture(name)))

    def forward(self, *args, **kwargs):
        return self._module(*args, **kwargs)

    # Opacus's GradSampleModule methods that the criterion and users call
    def enable_hooks(self):
        self.hooks_enabled = True

    def disable_hooks(self):
        self.hooks_enabled = False

    def forbid_grad_accumulation(self):
        self._forbid_accumulation = True

    def allow_grad_accumulation(self):
        self._forbid_accumulation = False

    def remove_hooks(self):
        for h in self._handles:
            h.remove()
        self._handles = []
        self._records = []

    cleanup = remove_hooks

    @property
    def per_sample_gradient_norms(self) -> torch.Tensor:
        """The last batch's per-sample gradient norms (not private: debugging only)."""
        if self._per_sample_gradient_norms is None:
            raise AttributeError("per_sample_gradient_norms is set by the first DP backward")
        return self._per_sample_gradient_norms

    def _capture(self, name):
        def hook(module, inputs, output):
            if not (self.hooks_enabled and module.training and torch.is_grad_enabled()):
                return
            if not isinstance(output, torch.Tensor) or not output.requires_grad:
                return
            a = inputs[0].detach()  # shares the input's version counter
            edge = torch.autograd.graph.get_gradient_edge(output)
            self._records.append(_Record(name, module, a, a._version, edge))
        return hook

    # ---- the DP backward

    def _take_records(self) -> list[_Record]:
        records, self._records = self._records, []
        return records

    def _sq_norms(self, uses, rows, out=None) -> torch.Tensor:
        """``[B]`` squared norms of one weight matrix over its uses: the Gram form
        or the per-sample gradient, whichever costs fewer operations (or as
        ``strategy`` says); a single use in Gram form runs the
        registered op (``linear_sq_norms``, or ``embedding_sq_norms`` for a
        lookup: a kernel on the triton backend), a single Linear / Conv use
        the per-sample way on a kernel backend ``linear_sq_norms_ps`` (no
        ``[B, O, I]`` buffer), a single lookup the per-sample way on a kernel
        backend ``embedding_sq_norms`` (the same norm), several uses in Gram
        form on a kernel backend ``cross_gram`` per pair, written into ``out``
        when given and on the inputs' device (then ``out`` is returned);
        two uses the per-sample way on a kernel backend ``pair_sq_norms_ps``
        (no ``[B, rows, I]``), three or more ``uses_sq_norms_ps`` (an operand
        kind in two dtypes widened to fp32 first); the torch backend the
        reference's ``[B, rows, I]``."""
        how = self.strategy
        if how == "auto":
            how = "gram" if ref.gram_cost(uses, rows) <= ref.per_sample_cost(uses, rows) else "per_sample"
        if how == "gram" and len(uses) > 1 and self._cross_kernels(uses):
            return self._tied_gram_sq_norms(uses, out)
        if self.strategy == "per_sample" and len(uses) == 1 and uses[0].p is None \
                and _ghost_ops.embedding_sq_norms_backend(self.backend, uses[0].ids, uses[0].q) != "torch":
            # an embedding's per-sample table gradient has the Gram form's norm, exactly (sum_v ||sum_{t:
            # id_t = v} g_t||^2 = sum_{t,s: id_t = id_s} g_t . g_s): the Gram kernel, never [B, V, d].
            # Only when the strategy is forced: "auto" picks per-sample for a lookup only when V < T (a
            # token-type table), where [B, V, d] is small and the Gram form's T^2 d would cost more
            how = "gram"
        if how == "gram" and len(uses) == 1:
            u = uses[0]
            ok = out is not None and out.device == u.q.device and out.dtype == ref.acc_dtype(u.q, u.p)
            if u.p is None:  # an embedding lookup (its padding_idx rows of g already zeroed)
                return _ghost_ops.embedding_sq_norms(u.ids, u.q, backend=self.backend, out=out if ok else None)
            return _ghost_ops.linear_sq_norms(u.q, u.p, backend=self.backend, out=out if ok else None)
        if how == "per_sample" and len(uses) == 1 and uses[0].p is not None:
            u = uses[0]
            # a kernel backend builds G_b tile by tile, never [B, O, I] (issue 13); torch: the reference below
            if _ghost_ops.linear_sq_norms_ps_backend(self.backend, u.q, u.p) != "torch":
                ok = out is not None and out.device == u.q.device and out.dtype == ref.acc_dtype(u.q, u.p)
                return _ghost_ops.linear_sq_norms_ps(u.q, u.p, backend=self.backend, out=out if ok else None)
        if how == "per_sample" and len(uses) == 2 \
                and _ghost_ops.pair_sq_norms_ps_backend(self.backend, *uses) != "torch":
            # a tied head and its table (or a Linear applied twice): G_b built tile by tile, never [B, rows, I]
            ok = out is not None and out.device == uses[0].q.device and out.dtype == torch.float32
            return _ghost_ops.pair_sq_norms_ps(*uses, rows, backend=self.backend, out=out if ok else None)
        if how == "per_sample" and len(uses) > 2 \
                and _ghost_ops.uses_sq_norms_ps_backend(self.backend, uses) != "torch":
            # a Linear applied three times (ALBERT's shared layers): the same, the uses from a device table
            ok = out is not None and out.device == uses[0].q.device and out.dtype == torch.float32
            return _ghost_ops.uses_sq_norms_ps(uses, rows, backend=self.backend, out=out if ok else None)
        return ref.matrix_sq_norms(uses, rows, how)

    def _cross_kernels(self, uses) -> bool:
        """Whether every (u, v) term of a tied parameter's Gram form runs a kernel
        (else all of them stay the reference's math: no mix of the two)."""
        return all(_ghost_ops.cross_gram_backend(self.backend, u, v) != "torch"
                   for i, u in enumerate(uses) for v in uses[i:])

    def _tied_gram_sq_norms(self, uses, out=None) -> torch.Tensor:
        """``||sum_u G_b^u||^2`` of a tied parameter (book-keeping keeps every use)
        as ``sum_u <G^u, G^u> + 2 sum_{u < v} <G^u, G^v>``: one
        ``dp_ghost_cross_gram`` call per pair, written then added into ``out``
        (when it is a usable fp32 row on the uses' device) or a new ``[B]``; a
        tied head's ``P`` is read at the lookup's ids, never gathered into a
        ``[B, T, T]`` buffer."""
        q = uses[0].q
        if out is None or out.device != q.device or out.dtype != torch.float32:
            out = torch.empty(q.shape[0], dtype=torch.float32, device=q.device)
        pairs = [(u, v) for i, u in enumerate(uses) for v in uses[i:]]
        for k, (u, v) in enumerate(pairs):
            _ghost_ops.cross_gram(u, v, scale=1.0 if u is v else 2.0, out=out, accumulate=k > 0,
                                  backend=self.backend)
        return out

    def _check_uses(self, graph_counts, hooked) -> None:
        for pid, n in graph_counts.items():
            if n != hooked[pid]:
                raise RuntimeError(
                    f"parameter {self._names[pid]!r} enters the autograd graph {n} times but the layer "
                    f"hooks saw {hooked[pid]} uses: it is used outside its layer (e.g. a tied head "
                    f"written as h @ W.t()); per-sample norms would be wrong. Use the layer module "
                    f"(nn.Linear, nn.Embedding, ...) for every use")

    def dp_backward(self, loss_per_sample: torch.Tensor, max_grad_norm):
        """One backward of ``sum_b loss_b`` that computes the per-sample gradient
        norms.  ``"bk"``: the output gradients only (``torch.autograd.grad`` on
        the layers' output edges: no parameter gradient is computed), kept for
        :meth:`write_clipped`.  ``"ghost"``: a backward to the parameters (the
        graph retained for the criterion's second backward; the parameter
        gradients are dropped), each layer's norms computed by a hook on its
        output's node as its gradient arrives, so that the output gradients
        are not all kept.  Returns ``(factors, finite, mats, vecs)`` (bk: ``mats``
        may hold :class:`_LazyUse` entries, built by :meth:`_LazyUse.resolve`)."""
        if loss_per_sample.dim() != 1:
            raise ValueError(f"the per-sample loss must be 1-D [batch], got shape {tuple(loss_per_sample.shape)}")
        records = self._take_records()
        batch = loss_per_sample.shape[0]
        total = loss_per_sample.sum()
        params = {id(p): p for p in self._module.parameters() if p.requires_grad}
        counts = _param_uses(total.grad_fn, params) if total.grad_fn is not None else collections.Counter()
        acc = ref.acc_dtype(*[r.a for r in records])
        fused = _ghost_ops.clip_factors_backend(self.backend, loss_per_sample.device, acc) != "torch"
        state = _Pass(self, records, batch, acc, loss_per_sample.device, keep=self.mode == "bk", fused=fused)
        if self.mode == "bk":
            grads = list(torch.autograd.grad(total, [r.edge for r in records], allow_unused=True)) if records else []
            for i, r in enumerate(records):
                state.add(r, grads[i])
                grads[i] = None
        else:
            handles = [r.edge.node.register_prehook(self._prehook(r, state)) for r in records]
            try:
                # Asked for the output gradients of the deepest layers only: the backward passes
                # every layer's output edge on its way (the hooks take their norms there) but
                # computes no parameter gradient, and holds few output gradients at its end.
                deepest = _deepest(records)
                if deepest:
                    grads = torch.autograd.grad(total, [r.edge for r in deepest], retain_graph=True,
                                                allow_unused=True)
                    for r, g in zip(deepest, grads):
                        if not r.seen:  # the engine hands a requested edge's gradient back, unhooked
                            r.seen = True
                            state.add(r, g)
            finally:
                for h in handles:
                    h.remove()
        self._check_uses(counts, state.hooked)
        sq = state.finish()
        if fused:  # one launch: rows summed in a fixed order, sqrt, Opacus's factor, finite flag
            factors, finite, norms = _ghost_ops.clip_factors(sq, max_grad_norm, backend=self.backend)
        else:
            factors, finite = ref.clip_factors(sq, max_grad_norm)
            norms = sq.sqrt()
        self._per_sample_gradient_norms = norms
        return factors, finite, state.mats, state.vecs

    def _clipped_matrix_grad(self, uses, rows, factors) -> torch.Tensor:
        """``sum_b f_b sum_u G_b^u`` into one ``[rows, I]`` buffer in the factors'
        dtype: on a kernel backend a Linear / Conv use runs
        ``dp_ghost_clipped_linear_grad`` (one GEMM launch), an embedding lookup
        ``dp_ghost_clipped_embedding_grad`` (a sort, then one deterministic
        launch); the torch backend the reference's masked matmul / index_add."""
        out = torch.empty(rows, uses[0].q.shape[2], dtype=factors.dtype, device=uses[0].q.device)
        for i, u in enumerate(uses):  # a first Linear use writes the buffer (no zero fill), later ones add
            if u.p is None:
                name = _ghost_ops.clipped_embedding_grad_backend(self.backend, u.ids, u.q, factors, out)
            else:
                name = _ghost_ops.clipped_linear_grad_backend(self.backend, u.p, u.q, factors, out)
            if i == 0 and (name == "torch" or u.p is None):
                out.zero_()  # a lookup adds into the rows it hits: the others must be zero
            if name == "torch":
                ref.add_clipped_use(out, u, factors)
            elif u.p is None:
                _ghost_ops.clipped_embedding_grad_(out, u.ids, u.q, factors, backend=name)
            else:
                _ghost_ops.clipped_linear_grad_(out, u.p, u.q, factors, accumulate=i > 0, backend=name)
        return out

    @staticmethod
    def _prehook(r: _Record, state: _Pass):
        def hook(grad_outputs):
            if not r.seen:
                r.seen = True
                state.add(r, grad_outputs[r.edge.output_nr])
        return hook

    def write_clipped(self, factors, mats, vecs) -> None:
        """Book-keeping: ``p.grad += sum_b f_b G_b`` for every used parameter."""
        for p, g in self._clipped_sums(factors, mats, vecs).items():
            _accumulate(p, g)

    def _clipped_sums(self, factors, mats, vecs) -> dict:
        """``parameter -> sum_b f_b G_b`` in the accumulation dtype (fp32 for
        fp16 / bf16), not yet rounded to the parameter's dtype: matrices one
        by one, every vector parameter in one ``dp_ghost_clipped_vector_grads``
        call per device (a parameter used more than once: its uses summed
        first).  FSDP2's book-keeping sums these over the ranks first."""
        sums = {}
        for p, uses in mats.items():  # one parameter's (lazy) uses built at a time
            uses = _LazyUse.resolve(uses)
            sums[p] = self._clipped_matrix_grad(uses, _rows(p, uses[0]), factors.to(uses[0].q.device)).reshape(p.shape)
        by_device = collections.defaultdict(list)
        for p, vs in vecs.items():
            by_device[vs[0].device].append(p)
        for device, params in by_device.items():
            f = factors.to(device)
            summed = [vecs[p][0] if len(vecs[p]) == 1 else sum(v.to(f.dtype) for v in vecs[p]) for p in params]
            for p, g in zip(params, _ghost_ops.clipped_vector_grads(summed, f, backend=self.backend)):
                g = g.reshape(p.shape)
                sums[p] = g if p not in sums else sums[p] + g.to(sums[p].dtype)
        return sums


def _deepest(records) -> list:
    """The records from whose output node no other record's node is reachable
    in the backward graph: every record lies on a path from the loss to one of
    them, so a backward asked for their edges reaches every record's edge."""
    targets = {r.edge.node for r in records}
    reaches: dict = {}  # node -> whether a record's node is reachable below it

    def below(node) -> bool:
        stack = [node]
        while stack:  # iterative post-order over next_functions (graphs are deep)
            n = stack.pop()
            if n is None or n in reaches:
                continue
            kids = [f for f, _ in n.next_functions if f is not None]
            if all(k in reaches for k in kids):
                reaches[n] = any(k in targets or reaches[k] for k in kids)
            else:
                stack.append(n)
                stack.extend(k for k in kids if k not in reaches)
        return reaches[node]

    return [r for r in records if not below(r.edge.node)]


def _rows(p: torch.Tensor, use: ref.MatUse) -> int:
    """Rows of the ``[rows, cols]`` view of ``p`` that a use's ``G = P^T Q`` has."""
    return math.prod(p.shape) // use.q.shape[2]


def _accumulate(p: torch.Tensor, g: torch.Tensor) -> None:
    g = g.reshape(p.shape).to(p.dtype)
    if p.grad is None:
        p.grad = g
    else:
        p.grad.add_(g)


# ---------------------------------------------------------------- the criterion

class DPTensorGhost(DPTensorFastGradientClipping):
    """Opacus's ``DPTensorFastGradientClipping`` (``.item()``, arithmetic) whose
    ``backward()`` is fastadv's: the output gradients without parameter
    gradients, the norms, then the clipped gradient (``"bk"``) or the second
    backward on ``sum_b f_b loss_b`` (``"ghost"``).  Gradients accumulate in
    ``p.grad`` across backwards (micro-batches) until ``optimizer.step()``."""

    def backward(self):
        module, opt = self.module, self.optimizer
        if module._forbid_accumulation and opt._pending_backwards:
            raise ValueError("Poisson sampling is not compatible with grad accumulation. You need to call "
                             "optimizer.step() after every forward/backward pass or consider using "
                             "BatchMemoryManager")
        factors, finite, mats, vecs = module.dp_backward(self.loss_per_sample, opt.max_grad_norm)
        opt._count_nonfinite(finite)
        if module.mode == "bk":
            module.write_clipped(factors, mats, vecs)
        else:
            weighted = (factors.detach().to(self.loss_per_sample.dtype) * self.loss_per_sample).sum()
            module.disable_hooks()
            try:
                weighted.backward()
            finally:
                module.enable_hooks()
        opt._pending_backwards += 1


def _wrap_result(name):
    base = getattr(DPTensorFastGradientClipping, name)

    def method(self, *args):
        r = base(self, *args)
        return DPTensorGhost(r.module, r.optimizer, r.loss_per_sample, r.loss_reduction)
    method.__name__ = name
    return method


for _name in ("__truediv__", "__mul__", "__rmul__", "__add__", "__radd__", "__sub__", "__rsub__", "__neg__"):
    setattr(DPTensorGhost, _name, _wrap_result(_name))


class DPLossGhost(DPLossFastGradientClipping):
    """Opacus's ``DPLossFastGradientClipping``: ``criterion(output, target)``
    computes the per-sample loss (``shape=`` for token-level losses, as
    Opacus) and returns a :class:`DPTensorGhost`."""

    def __call__(self, *args, shape=None, **kwargs) -> DPTensorGhost:
        r = super().__call__(*args, shape=shape, **kwargs)
        return DPTensorGhost(r.module, r.optimizer, r.loss_per_sample, r.loss_reduction)


# ---------------------------------------------------------------- the optimizer

class GhostDPOptimizer(DPOptimizer):
    """The optimizer of the ghost / bk modes: ``p.grad`` already holds the
    clipped sum (written by the DP backward); ``step()`` accumulates it into
    ``p.summed_grad``, and unless the step is skipped (virtual batches) adds
    ``N(0, (noise_multiplier * max_grad_norm)^2)`` with fastadv's noise op --
    the same draws as :class:`fastadv.dp.DPOptimizer` -- and divides by
    ``expected_batch_size * accumulated_iterations`` for ``loss_reduction="mean"``
    (``accumulated_iterations``: the DP backwards since the last step, as
    Opacus's vanilla optimizer counts accumulated batches)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._pending_backwards = 0

    @property
    def accumulated_iterations(self) -> int:
        return max(self._pending_backwards, 1)

    def _count_nonfinite(self, finite: torch.Tensor) -> None:
        counter = self._counter(finite.device)
        counter.add_((~finite).sum())
        if self.on_nonfinite == "raise" and bool((~finite).any()):
            raise FloatingPointError(f"{int((~finite).sum())} sample(s) have a non-finite gradient norm")

    def zero_grad(self, set_to_none: bool = False):
        self._pending_backwards = 0  # the cleared gradients' backwards no longer count
        for p in self.params:
            if not self._is_last_step_skipped:
                p.summed_grad = None
        self.original_optimizer.zero_grad(set_to_none)

    def clip_and_accumulate(self, copy: bool = True):
        """``p.summed_grad += p.grad`` (the clipping happened in the backward).
        ``copy=False`` (a step that is not skipped): with no sum carried over,
        ``p.summed_grad`` is ``p.grad``'s tensor itself, not a copy -- the
        noised gradient replaces ``p.grad`` next, so the step holds one
        gradient-sized tensor less (a skipped step must copy: ``zero_grad``
        may zero ``p.grad`` in place)."""
        for p in self.params:
            g = p.grad if p.grad is not None else torch.zeros_like(p)
            s = getattr(p, "summed_grad", None)
            if s is not None:
                s.add_(g)
            else:
                p.summed_grad = g.detach().clone() if copy else g.detach()

    def add_noise(self, divisor=None):
        params = self.params
        grads = _ops.add_noise([p.summed_grad for p in params], self._noise_std(),
                               expected_batch_size=divisor, generator=self.generator,
                               secure_mode=self.secure_mode, backend=self.backend)
        for p, g in zip(params, grads):
            p.grad = g.view_as(p)

    def pre_step(self, closure=None) -> bool:
        if not self.params:
            return True
        if self._pending_backwards == 0:
            raise ValueError("no DP backward since the last step: call loss.backward() on the loss "
                             "returned by the criterion of make_private")
        _ops.check_hyperparameters(self.max_grad_norm, self.noise_multiplier)
        self.clip_and_accumulate(copy=self._check_skip_next_step(pop_next=False))
        if self._check_skip_next_step():
            self._is_last_step_skipped = True
            self._pending_backwards = 0
            return False
        divisor = self.expected_batch_size * self.accumulated_iterations if self.loss_reduction == "mean" else None
        self.add_noise(divisor)
        if self.step_hook:
            self.step_hook(self)
        self._is_last_step_skipped = False
        self._pending_backwards = 0
        return True
