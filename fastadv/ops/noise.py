"""Noise injection and SiFT as functional ops: validation, backend dispatch and
the pure-PyTorch fallback.

Every op draws its noise inside the kernel (triton / cuda backends) from a
Philox key made by ``torch.randint`` on the tensor's device with ``generator``
(default: the device's default generator): reproducible under
``torch.manual_seed``, no host sync, a new key per call (see
``fastadv/kernels/triton/rng.py``).  The torch backend draws with
``torch.randn`` / ``torch.rand`` from the same generator; its numbers differ
from the kernels' (another generator algorithm), its distribution does not.

Kernel backends take float32 / float16 / bfloat16 tensors (int64 ids for the
token-id op); other dtypes go to the torch backend under ``auto`` and raise
under a forced backend.  Non-contiguous tensors are made contiguous first (one
extra pass).  The math is fp32, rounded once to the tensor's dtype.
"""
from __future__ import annotations

import dataclasses
import math

import torch

from .. import _backend
from ..kernels import count_launch, device_guard, host
from ._live import StorageMoved

KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
QUARTER = host.RNG_QUARTER  # Philox counters per chunk
CHUNK = host.RNG_CHUNK      # elements per chunk


# ---- helpers -----------------------------------------------------------------------------------

def _kernels(name: str):
    if name == "triton":
        from ..kernels.triton import noise
        return noise
    from ..kernels.cuda import noise
    return noise



def _forced(backend) -> bool:
    return (backend or _backend.default()) != "auto"


def _pick(backend, t: torch.Tensor, dtypes=KERNEL_DTYPES) -> str:
    """The backend that runs on ``t``: a kernel backend if it supports the dtype."""
    name = _backend.resolve(backend, t.device)
    if name != "torch" and t.dtype not in dtypes:
        if _forced(backend):
            allowed = ", ".join(str(d).replace("torch.", "") for d in dtypes)
            raise TypeError(f"the {name} backend supports {allowed} tensors, got {t.dtype}; "
                            f"use backend='torch'")
        name = "torch"
    return name


def _number(value, what: str, *, nonneg: bool = True) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{what} must be a number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value) or (nonneg and value < 0):
        raise ValueError(f"{what} must be finite{' and >= 0' if nonneg else ''}, got {value}")
    return value


def _check_float(x, what: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{what} must be a tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{what} must be a floating-point tensor, got {x.dtype}")


def _opmath(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def _torch_noisy(x: torch.Tensor, noise: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    """``x + noise`` (``noise`` in x's opmath dtype, consumed) rounded once to x's
    dtype, in place or as a new tensor: the torch backend's last step."""
    if noise.dtype == x.dtype:
        return x.add_(noise) if inplace else x + noise
    res = noise.add_(x).to(x.dtype)
    return x.copy_(res) if inplace else res


class _IdentityGrad(torch.autograd.Function):
    """``compute(x)`` (no autograd inside) whose gradient w.r.t. ``x`` is the identity:
    the derivative of ``x + noise``."""

    @staticmethod
    def forward(ctx, x, compute):
        return compute(x)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def _with_identity_grad(x: torch.Tensor, compute):
    if torch.is_grad_enabled() and x.requires_grad:
        return _IdentityGrad.apply(x, compute)
    with torch.no_grad():
        return compute(x)


def _inplace(x: torch.Tensor, compute_) -> torch.Tensor:
    """Run ``compute_(t)`` (in place on a contiguous ``t``) on ``x``, keeping autograd honest."""
    if torch.is_grad_enabled() and x.requires_grad and x.is_leaf:
        raise RuntimeError("a leaf Variable that requires grad is being used in an in-place operation.")
    with torch.no_grad():
        if x.is_contiguous():
            compute_(x)
        else:
            tmp = x.contiguous()
            compute_(tmp)
            x.copy_(tmp)
    if x.requires_grad:
        # the gradient of x + noise is the identity: the graph stays valid, but
        # anything that saved x for backward must see that it changed
        torch.autograd.graph.increment_version(x)
    return x


# ---- Gaussian input / activation noise -------------------------------------------------------------

def _gaussian_out(x, std, generator, name, out=None):
    """``x + std * z`` into ``out`` (new if None); x contiguous for kernels."""
    if name == "torch":
        count_launch("torch.noise_add")
        z = torch.randn(x.shape, dtype=_opmath(x.dtype), device=x.device, generator=generator)
        return _torch_noisy(x, z.mul_(std), inplace=out is not None)
    if out is None:
        out = torch.empty_like(x)
    with device_guard(x):
        _kernels(name).add_noise(x, out, host.new_key(x.device, generator), std)
    return out


def add_gaussian_noise(x: torch.Tensor, std: float, *, generator: torch.Generator | None = None,
                       backend: str | None = None) -> torch.Tensor:
    """``x + N(0, std^2)`` as a new tensor (the reference's ``x + randn_like(x) * std``),
    one read and one write; differentiable w.r.t. ``x`` (identity)."""
    _check_float(x, "x")
    std = _number(std, "std")
    name = _pick(backend, x)

    def compute(t):
        return _gaussian_out(t if name == "torch" else t.contiguous(), std, generator, name)

    return _with_identity_grad(x, compute)


def add_gaussian_noise_(x: torch.Tensor, std: float, *, generator: torch.Generator | None = None,
                        backend: str | None = None) -> torch.Tensor:
    """In place ``x += N(0, std^2)``; returns ``x`` (same ``data_ptr``)."""
    _check_float(x, "x")
    std = _number(std, "std")
    name = _pick(backend, x)
    return _inplace(x, lambda t: _gaussian_out(t, std, generator, name, out=t))


# ---- NEFTune -------------------------------------------------------------------------------------

def neftune(embeds: torch.Tensor, alpha: float, attention_mask: torch.Tensor | None = None, *,
            generator: torch.Generator | None = None, backend: str | None = None) -> torch.Tensor:
    """NEFTune: ``embeds + U[-1, 1) * alpha / sqrt(L * d)`` as a new tensor.

    ``embeds``: ``[B, L, d]`` (or ``[L, d]``, one sequence).  Without a mask
    ``L`` is the padded length ``embeds.shape[-2]``; with ``attention_mask``
    ``[B, L]`` (bool, int or float), ``L_b = sum(mask[b])`` and the noise of
    token ``t`` is multiplied by ``mask[b, t]`` (padding gets none), as in the
    NEFTune training code.  A sequence with ``L_b = 0`` gets no noise (the
    reference divides by zero).  Differentiable w.r.t. ``embeds`` (identity).
    """
    _check_float(embeds, "embeds")
    alpha = _number(alpha, "alpha")
    if embeds.dim() not in (2, 3):
        raise ValueError(f"embeds must be [B, L, d] or [L, d], got shape {tuple(embeds.shape)}")
    seq_len, dim = embeds.shape[-2], embeds.shape[-1]
    batch = embeds.shape[0] if embeds.dim() == 3 else 1
    mask = None
    if attention_mask is not None:
        if not isinstance(attention_mask, torch.Tensor):
            raise TypeError(f"attention_mask must be a tensor, got {type(attention_mask).__name__}")
        if attention_mask.shape != embeds.shape[:-1]:
            raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} does not match "
                             f"embeds {tuple(embeds.shape)} (expected {tuple(embeds.shape[:-1])})")
        if attention_mask.device != embeds.device:
            raise ValueError(f"attention_mask is on {attention_mask.device}, embeds on {embeds.device}")
        mask = attention_mask.reshape(batch, seq_len)
    name = _pick(backend, embeds)

    def compute(x):
        if name == "torch":
            count_launch("torch.neftune")
            ot = _opmath(x.dtype)
            u = torch.rand(x.shape, dtype=ot, device=x.device, generator=generator).mul_(2).sub_(1)
            if mask is None:
                scale = alpha / math.sqrt(seq_len * dim) if seq_len * dim else 0.0
            else:
                m = mask.to(ot)
                length = m.sum(-1, keepdim=True)
                mag = torch.where(length > 0, alpha / torch.sqrt(length.clamp_min(1e-30) * dim),
                                  torch.zeros((), dtype=ot, device=x.device))
                scale = (m * mag).reshape(*x.shape[:-1], 1)
            return _torch_noisy(x, u.mul_(scale))
        x = x.contiguous()
        out = torch.empty_like(x)
        k = _kernels(name)
        with device_guard(x):
            key = host.new_key(x.device, generator)
            if mask is None:
                scale = alpha / math.sqrt(seq_len * dim) if seq_len * dim else 0.0
                k.add_noise(x, out, key, scale, uniform=True)
            else:
                m = mask.contiguous()
                if m.dtype == torch.bool:
                    m = m.view(torch.uint8)
                row_scale = torch.empty((batch, seq_len), dtype=torch.float32, device=x.device)
                k.neftune_scale(m, row_scale, alpha / math.sqrt(dim) if dim else 0.0)
                k.add_noise(x, out, key, 1.0, uniform=True, row_scale=row_scale, row_len=dim)
        return out

    return _with_identity_grad(embeds, compute)


# ---- the seed's token-id noise ---------------------------------------------------------------------

def noisy_token_ids(input_ids: torch.Tensor, noise_factor: float, vocab_size: int, *,
                    generator: torch.Generator | None = None, backend: str | None = None) -> torch.Tensor:
    """The seed's input noise: ``clamp(long(float(ids) + noise_factor * z), 0, V - 1)``.

    ``long`` truncates toward zero, so with a small ``noise_factor`` every id
    ``> 0`` whose draw is negative becomes ``id - 1`` (about half of them) and
    the rest stay: a random substitution by the neighbouring vocabulary id, not
    a small perturbation.  Kept for the seed's training loop; see docs/noise.md.
    """
    if not isinstance(input_ids, torch.Tensor) or input_ids.dtype != torch.int64:
        raise TypeError("input_ids must be an int64 (long) tensor")
    noise_factor = _number(noise_factor, "noise_factor")
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 1:
        raise ValueError(f"vocab_size must be a positive int, got {vocab_size!r}")
    name = _pick(backend, input_ids, dtypes=(torch.int64,))
    if name == "torch":
        count_launch("torch.noise_token_ids")
        z = torch.randn(input_ids.shape, dtype=torch.float32, device=input_ids.device, generator=generator)
        return (input_ids.float() + z * noise_factor).long().clamp(min=0, max=vocab_size - 1)
    ids = input_ids.contiguous()
    out = torch.empty_like(ids)
    with device_guard(ids):
        _kernels(name).token_ids(ids, out, host.new_key(ids.device, generator), noise_factor, vocab_size)
    return out


# ---- weight noise (multi-tensor) -------------------------------------------------------------------

@dataclasses.dataclass
class WeightNoiseBackup:
    """What :func:`weight_noise_restore_` needs: the perturbed tensors (the
    objects given to :func:`weight_noise_`), their names (for error messages)
    and one backup of the original bits per tensor (kernel groups: views of
    one flat buffer per group; torch group: clones), plus the backend choice
    that perturbed them.  Nothing here is a raw address: the restore builds its
    work list from the live tensors."""
    tensors: list
    names: list
    backups: list
    backend: str | None = None

    def __bool__(self) -> bool:
        return bool(self.tensors)


_TABLES = None


def _tables():
    global _TABLES
    if _TABLES is None:
        _TABLES = host.TableCache()
    return _TABLES


def _mt_groups(tensors: list[torch.Tensor], backend):
    """Positions of the tensors grouped by (backend, device, dtype); kernel
    groups hold contiguous tensors only (others go to the torch group)."""
    groups: dict = {}
    for i, t in enumerate(tensors):
        name = _pick(backend, t)
        if name != "torch" and not t.is_contiguous():
            if _forced(backend):
                raise ValueError(f"the {name} backend needs contiguous parameters; use backend='torch'")
            name = "torch"
        groups.setdefault((name, t.device, t.dtype if name != "torch" else None), []).append(i)
    return groups


def _bump_versions(tensors) -> None:
    """Tell autograd the tensors changed in place (a kernel wrote them): a graph
    that saved them then fails in backward, as after the reference's ``copy_``,
    instead of silently using the new values."""
    for t in tensors:
        torch.autograd.graph.increment_version(t)


BACKUP_ALIGN = 16  # elements: each tensor's backup view starts on a multiple (aligned vector access)


def _flat_backups(group: list[torch.Tensor]) -> list[torch.Tensor]:
    """One backup view per tensor, in one flat buffer (views 16-element aligned)."""
    offsets, total = [], 0
    for t in group:
        offsets.append(total)
        total += -(-t.numel() // BACKUP_ALIGN) * BACKUP_ALIGN
    flat = torch.empty(total, dtype=group[0].dtype, device=group[0].device)
    return [flat[o: o + t.numel()].view(t.shape) for o, t in zip(offsets, group)]


def weight_noise_(tensors: list[torch.Tensor], std: float, *, generator: torch.Generator | None = None,
                  backend: str | None = None, names: list[str] | None = None) -> WeightNoiseBackup:
    """In place ``w <- w + N(0, std^2)`` for every tensor, returning the backup
    that puts them back bit for bit (:func:`weight_noise_restore_`).  Kernel
    backends: one launch per (device, dtype) group, the backup written in the
    same pass.  ``names``: one per tensor, for the restore's error messages."""
    std = _number(std, "std")
    tensors = list(tensors)
    for t in tensors:
        _check_float(t, "a perturbed tensor")
    names = [f"tensor {i}" for i in range(len(tensors))] if names is None else list(names)
    if len(names) != len(tensors):
        raise ValueError(f"names has {len(names)} entries for {len(tensors)} tensors")
    state = WeightNoiseBackup([], [], [], backend)
    try:
        with torch.no_grad():
            for (name, device, dtype), idx in _mt_groups(tensors, backend).items():
                group = [tensors[i] for i in idx]
                if name == "torch":
                    # a generator on another device draws there (as host.new_key does for kernels)
                    at = device if generator is None else generator.device
                    backups = [t.detach().clone() for t in group]
                    state.tensors += group
                    state.names += [names[i] for i in idx]
                    state.backups += backups
                    for t in group:
                        z = torch.randn(t.shape, dtype=_opmath(t.dtype), device=at, generator=generator)
                        _torch_noisy(t, z.to(device).mul_(std), inplace=True)
                    count_launch("torch.weight_noise")
                    continue
                backups = _flat_backups(group)
                with device_guard(backups[0]):
                    table = _tables().get("weight_noise", [group, backups], chunk=CHUNK)
                    _kernels(name).weight_noise(table, dtype, host.new_key(device, generator), std)
                state.tensors += group
                state.names += [names[i] for i in idx]
                state.backups += backups
                _bump_versions(group)
    except BaseException:
        weight_noise_restore_(state)  # the groups already perturbed go back before the error leaves
        raise
    return state


def weight_noise_restore_(state: WeightNoiseBackup, live: list | None = None) -> None:
    """Copy the original bits back, bit-exact, into the *live* tensors.

    ``live`` (optional): the tensor to restore into for each perturbed tensor,
    in order -- e.g. a model's parameters looked up again by name after
    ``load_state_dict(assign=True)`` replaced them; None in the list means the
    parameter is gone.  By default the tensors given to :func:`weight_noise_`,
    in their current storage (``model.double().float()`` or ``.to()`` inside
    the block gave them new storage: that storage is restored).  Nothing keeps
    a raw address from the perturbation: the restore's work list is built from
    the live tensors.  A tensor whose shape or dtype changed raises
    :class:`~fastadv.ops._live.StorageMoved` naming it before anything is
    written; the error carries ``backups`` ({name: original values}) and the
    state stays as it was, so the call can be repeated once fixed."""
    if not state.tensors:
        return
    objs = list(state.tensors) if live is None else list(live)
    if len(objs) != len(state.tensors):
        raise ValueError(f"live has {len(objs)} tensors, {len(state.tensors)} were perturbed")
    from .awp import restore_live_
    live = [None if t is None else t.data for t in objs]
    try:
        with torch.no_grad(), device_guard(next((t for t in live if t is not None), state.backups[0])):
            restore_live_(state.names, live, state.backups, between="the weight noise and its restore",
                          backend=state.backend)
    except StorageMoved as exc:
        exc.backups = dict(zip(state.names, state.backups))
        raise
    _bump_versions(objs)
    state.tensors, state.names, state.backups = [], [], []


# ---- SiFT (DeBERTa's perturbation layer) -----------------------------------------------------------

def sift_init(x: torch.Tensor, init_perturbation: float, *, out: torch.Tensor | None = None,
              generator: torch.Generator | None = None, backend: str | None = None
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(delta, pert)``: ``delta = clamp(N(0, ip^2), -2 ip, 2 ip)`` in fp32
    (written into ``out`` when given: contiguous fp32 of ``x``'s shape) and
    ``pert = x + delta`` in ``x``'s dtype.  No autograd; one pass on kernels."""
    _check_float(x, "x")
    ip = _number(init_perturbation, "init_perturbation")
    if out is not None and (out.shape != x.shape or out.dtype != torch.float32 or not out.is_contiguous()):
        raise ValueError("out must be a contiguous float32 tensor of x's shape")
    name = _pick(backend, x)
    with torch.no_grad():
        delta = torch.empty(x.shape, dtype=torch.float32, device=x.device) if out is None else out
        if name == "torch":
            count_launch("torch.sift_init")
            z = torch.randn(x.shape, dtype=torch.float32, device=x.device, generator=generator)
            delta.copy_(torch.clamp(z * ip, -2 * ip, 2 * ip))
            return delta, (x.to(torch.float32) + delta).to(x.dtype)
        x = x.contiguous()
        pert = torch.empty_like(x)
        with device_guard(x):
            _kernels(name).sift_init(x, delta, pert, host.new_key(x.device, generator), ip)
        return delta, pert


def sift_update_(x: torch.Tensor, delta: torch.Tensor, grad: torch.Tensor, learning_rate: float, *,
                 backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """DeBERTa's step, ``delta += lr * g / (1e-6 + max|g| over the last dim)``
    in place unless ``||g||`` is NaN or inf, then ``pert = x + delta``.

    Returns ``(pert, ok)``: ``ok`` is a 0-dim bool device tensor (the step was
    taken), never read on the host.  ``delta`` and ``grad`` are fp32 of ``x``'s
    shape."""
    _check_float(x, "x")
    lr = _number(learning_rate, "learning_rate", nonneg=False)
    if delta.shape != x.shape or grad.shape != x.shape:
        raise ValueError(f"delta {tuple(delta.shape)} and grad {tuple(grad.shape)} must have x's shape "
                         f"{tuple(x.shape)}")
    if delta.dtype != torch.float32 or not delta.is_contiguous():
        raise ValueError("delta must be a contiguous float32 tensor")
    name = _pick(backend, x)
    with torch.no_grad():
        g = grad.to(torch.float32)
        if name == "torch":
            count_launch("torch.sift_update")
            norm = torch.linalg.vector_norm(g)
            ok = torch.isfinite(norm)
            step = lr * g / (1e-6 + g.abs().amax(-1, keepdim=True))
            delta.copy_(torch.where(ok, delta + step, delta))
            return (x.to(torch.float32) + delta).to(x.dtype), ok
        cols = x.shape[-1] if x.dim() else 1
        x2 = x.contiguous().view(-1, cols)
        pert = torch.empty_like(x2)
        with device_guard(x2):
            ok = _kernels(name).sift_update(x2, delta.view(-1, cols), g.contiguous().view(-1, cols), pert, lr)
        return pert.view(x.shape), ok


def design_bytes(op: str, numel: int, element_size: int, *, rows: int = 0) -> int:
    """Bytes the fused design moves per call (what the benchmark reports).

    ``noise`` / ``noise_`` / ``neftune``: read x, write out (2 passes) (+ the
    fp32 row scale, ``4 * rows``, read and written for a NEFTune mask);
    ``weight_noise``: enter reads w, writes w and backup (3), exit reads the
    backup and writes w (2); ``token_ids``: 16 bytes per id;
    ``sift_init``: read x, write pert, write fp32 delta;
    ``sift_update``: read g twice (stats + update), delta (r + w), x, write pert."""
    s = element_size
    if op in ("noise", "noise_", "neftune"):
        return 2 * numel * s + 8 * rows
    if op == "weight_noise":
        return 5 * numel * s
    if op == "token_ids":
        return 16 * numel
    if op == "sift_init":
        return numel * (2 * s + 4)
    if op == "sift_update":
        return numel * (4 * 4 + 2 * s) + 8 * rows
    raise ValueError(f"unknown op {op!r}")
