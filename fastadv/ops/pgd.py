"""One PGD step on a parameter, in place: ``w += alpha * g / ||g||`` (skipped
when the norm is 0 or NaN), then ``w - w0`` projected onto the L2 ball of
radius ``epsilon`` around the weights ``w0`` of the first step.

``pgd_attack_`` returns (or updates) a :class:`PGDState`; ``pgd_restore_``
puts ``w0`` back bit for bit.  Kernels: one reduction and one fused step +
projection per step (``fastadv/kernels/triton/pgd.py``, ``kernels/cuda/pgd.py``); the torch fallback
computes the same function with plain ops.
"""
from __future__ import annotations

import dataclasses

import torch

from ..kernels import count_launch, device_guard
from . import _dist, _registry
from ._live import follow, retarget
from .fgm import _check, kernel_backends, kernel_limits, multi_tensor_ok, resolve


@dataclasses.dataclass
class PGDState:
    """The backup ``w0`` and, in row mode, which rows were perturbed
    (``saved``) and the per-step flags of the rows holding gradient (``mask``)."""
    param: torch.Tensor
    backup: torch.Tensor
    saved: torch.Tensor | None
    backend: str
    mask: torch.Tensor | None = None


def _torch_step(w, w0, g, alpha: float, eps: float) -> None:
    g32 = g.to(torch.float32)
    norm_g = torch.linalg.vector_norm(g32)
    valid = (norm_g != 0) & ~torch.isnan(norm_g)
    w32, w0_32 = w.to(torch.float32), w0.to(torch.float32)
    r = (w32 + alpha * g32 / norm_g) - w0_32
    norm_r = torch.linalg.vector_norm(r)
    r = torch.where(valid & (norm_r > eps), eps * r / norm_r, r)
    w.copy_(torch.where(valid, w0_32 + r, w32))


# ---- the registered ops ------------------------------------------------------------------------

@_registry.op("pgd_step_", mutates_args={"w", "backup", "saved", "mask"}, triton=True)
def pgd_step_op(w: torch.Tensor, g: torch.Tensor, backup: torch.Tensor, saved: torch.Tensor,
                mask: torch.Tensor, alpha: float, epsilon: float, first: bool, backend: str) -> None:
    """One PGD step in place.  ``first`` writes ``backup`` (dense) / backs rows up
    as they are first perturbed (row mode: ``saved`` and ``mask`` are uint8
    per row; empty tensors select the dense mode)."""
    if backend == "torch":
        count_launch("torch.pgd")
        if first:
            backup.copy_(w)
        _torch_step(w, backup, g, alpha, epsilon)
        return
    g = g.contiguous()
    coef = torch.empty(4, dtype=torch.float32, device=w.device)
    k = _registry.kernels("pgd", backend)
    with device_guard(w):
        if saved.numel():
            k.pgd_step(w, g, backup, coef, alpha, epsilon, first, mask, saved)
        else:
            k.pgd_step(w.view(-1), g.view(-1), backup.view(-1), coef, alpha, epsilon, first)


@pgd_step_op.register_fake
def _(w, g, backup, saved, mask, alpha, epsilon, first, backend):
    return None


@_registry.op("pgd_restore_", mutates_args={"w", "saved"}, triton=True)
def pgd_restore_op(w: torch.Tensor, backup: torch.Tensor, saved: torch.Tensor, backend: str) -> None:
    """Put ``w0`` back, bit-exact: the saved rows (row mode, then cleared) or all."""
    if saved.numel() == 0:
        w.copy_(backup)
    elif backend != "torch":
        with device_guard(w):
            _registry.kernels("pgd", backend).pgd_restore_rows(w, backup, saved)
    else:  # storage moved to where the kernel cannot go: same values, dense write
        count_launch("torch.pgd_restore")
        w.copy_(torch.where(saved.bool().unsqueeze(1), backup, w))
        saved.zero_()


@pgd_restore_op.register_fake
def _(w, backup, saved, backend):
    return None


# ---- the functional API ------------------------------------------------------------------------

def pgd_attack_(param: torch.Tensor, grad: torch.Tensor, alpha: float, epsilon: float,
                state: PGDState | None = None, *, row_sparse: bool = True, name: str = "the parameter",
                backend: str | None = None) -> PGDState:
    """One PGD step on ``param``; ``state`` is None on the first step (which
    saves ``w0``) and the returned state afterwards.  ``row_sparse``: a 2-D
    parameter on a kernel backend takes the row mode (rows found from the
    gradient on the device; same result as dense).  Later steps run on
    ``param`` as it is now (its storage may have moved: see ``ops._live``)."""
    _check(param, grad, alpha)
    _check(param, grad, epsilon)
    if grad.is_sparse:
        grad = grad.to_dense()
    if _dist.is_sharded(param):
        return _sharded_steps([param], [grad], float(alpha), float(epsilon), [state], row_sparse, [name],
                              backend)[0]
    first = state is None
    state = _prepare(param, grad, state, row_sparse, name, backend)
    _step(param, grad, state, alpha, epsilon, first)
    return state


def _prepare(param, grad, state: PGDState | None, row_sparse: bool, name: str, backend) -> PGDState:
    """The state a step on the unsharded ``param`` runs with: new on the first step (``state``
    None), else followed to ``param``'s storage and checked against its backend; raises
    before anything is written."""
    if state is None:
        return _new_state(param, param, grad, row_sparse, backend)
    _follow(state, param, name, "two PGD attack() steps")
    _registry.check_devices(param.device, [("the parameter", param), ("grad", grad)])
    _registry.require(state.backend, **kernel_limits(param, grad))  # the backend of the first step
    return state


def _step(param, grad, state: PGDState, alpha: float, epsilon: float, first: bool) -> None:
    """One step of the registered op on the unsharded ``param`` with its prepared ``state``."""
    none = torch.empty(0, dtype=torch.uint8, device=param.device)
    with torch.no_grad():
        pgd_step_op(param, grad.detach(), state.backup,
                    none if state.saved is None else state.saved,
                    none if state.mask is None else state.mask,
                    float(alpha), float(epsilon), first, state.backend)


def pgd_attack_many_(params, grads, alpha: float, epsilon: float, states, *, row_sparse: bool = True,
                     names=None, backend: str | None = None) -> list[PGDState]:
    """:func:`pgd_attack_` on each ``params[i]`` with ``states[i]`` (None on
    the first step); returns the new states.  FSDP2 shards (DTensors) are
    stepped together: their partial sums share one buffer and one all_reduce
    per call, however many tensors are attacked.  Unsharded tensors: no
    collective; two or more on a kernel backend (one device, distinct
    storages: ``fastadv.ops.fgm.multi_tensor_ok``) are stepped in one
    multi-tensor call, bitwise what :func:`pgd_attack_` gives each; the
    others (or a single one) one :func:`pgd_attack_` step each.  Every
    unsharded tensor's state is prepared (and refused) before any is written."""
    params, grads, states = list(params), list(grads), list(states)
    names = list(names) if names is not None else [f"params[{i}]" for i in range(len(params))]
    if not len(params) == len(grads) == len(states) == len(names):
        raise ValueError(f"pgd_attack_many_ needs one grad, state and name per parameter, got "
                         f"{len(params)} params, {len(grads)} grads, {len(states)} states, {len(names)} names")
    out = list(states)
    sharded = [i for i, p in enumerate(params) if _dist.is_sharded(p)]
    plain = [i for i in range(len(params)) if i not in sharded]
    if plain:
        got = _plain_steps([params[i] for i in plain], [grads[i] for i in plain], alpha, epsilon,
                           [states[i] for i in plain], row_sparse, [names[i] for i in plain], backend)
        for i, state in zip(plain, got):
            out[i] = state
    if sharded:
        got = _sharded_steps([params[i] for i in sharded], [grads[i] for i in sharded], alpha, epsilon,
                             [states[i] for i in sharded], row_sparse, [names[i] for i in sharded], backend)
        for i, state in zip(sharded, got):
            out[i] = state
    return out


def _plain_steps(params, grads, alpha: float, eps: float, states, row_sparse: bool, names,
                 backend) -> list[PGDState]:
    """Unsharded tensors: every state prepared first, then the kernel-backend ones together
    when ``multi_tensor_ok`` (no collective), the others one registered-op step each."""
    for p, g in zip(params, grads):
        _check(p, g, alpha)
        _check(p, g, eps)
    alpha, eps = float(alpha), float(eps)
    grads = [g.to_dense() if g.is_sparse else g for g in grads]
    firsts = [s is None for s in states]
    states = [_prepare(p, g, s, row_sparse, n, backend) for p, g, s, n in zip(params, grads, states, names)]
    together = multi_tensor_ok(params, [s.backend for s in states])
    for i, (p, g, s, first) in enumerate(zip(params, grads, states, firsts)):
        if i not in together:
            _step(p, g, s, alpha, eps, first)
    if together:
        with torch.no_grad():
            _steps_together([states[i] for i in together], [params[i] for i in together],
                            [grads[i].detach() for i in together], [firsts[i] for i in together],
                            alpha, eps, lambda sums: sums)
    return states


def _sharded_steps(params, grads, alpha: float, eps: float, states, row_sparse: bool, names,
                   backend) -> list[PGDState]:
    """FSDP2: one step on each local shard.  The three sums a step needs
    (``||g||^2``, ``||r||^2``, ``<r, g>``) of every tensor go into one fp32
    buffer on the device, combined across the shards by one all_reduce (no
    host sync), from which the finalize decides skip and projection on the
    device (``||r + s g||^2`` from the three sums) before the update.  A
    kernel backend steps all its tensors in a constant number of launches
    (``pgd_sums_many`` / ``pgd_apply_many``: per group -- triton: dtype, mode,
    dense first step, row block; cuda: the same without the row block -- one
    partials and one apply launch, plus one sum launch)."""
    for p, g in zip(params, grads):
        _check(p, g, alpha)
        _check(p, g, eps)
    alpha, eps = float(alpha), float(eps)
    grads = [g.to_dense() if g.is_sparse else g for g in grads]
    (ws, gs), group = _dist.localize([params, grads], ["params", "grads"])
    gs = [g.detach() for g in gs]
    _registry.check_devices(ws[0].device, [(n, w) for n, w in zip(names, ws)])
    firsts = [s is None for s in states]
    with torch.no_grad():
        states = [_shard_state(p, w, g, s, row_sparse, n, backend)
                  for p, w, g, s, n in zip(params, ws, gs, states, names)]
        _steps_together(states, ws, gs, firsts, alpha, eps, lambda sums: _dist.all_reduce_sum_(sums, group))
    return states


def _steps_together(states, ws, gs, firsts, alpha: float, eps: float, reduce) -> None:
    """One call over the local tensors ``ws`` with their prepared ``states``: every tensor's
    three sums into one buffer, ``reduce`` (the all_reduce across the shards, or nothing),
    every step.  Under no_grad."""
    # the kernels read a contiguous gradient: copied once here, not in both passes
    gs = [g if s.backend == "torch" else g.contiguous() for g, s in zip(gs, states)]
    sums = torch.empty(3 * len(ws), dtype=torch.float32, device=ws[0].device)
    planned = _shard_sums_all(states, ws, gs, firsts, sums)
    reduce(sums)
    _shard_apply_all(planned, states, ws, gs, sums, alpha, eps)


def _new_state(param, w, g, row_sparse: bool, backend) -> PGDState:
    """The state of a first step on ``w`` (``param`` itself, or its local
    shard): a backup of ``w``'s shape and, for a 2-D ``w`` on a kernel
    backend with ``row_sparse`` and rows, the row flags (``saved`` cleared)."""
    name = resolve(w, g, backend)
    state = PGDState(param, torch.empty_like(w, requires_grad=False), None, name)
    if row_sparse and name != "torch" and w.dim() == 2 and w.shape[0]:
        state.saved = torch.zeros(w.shape[0], dtype=torch.uint8, device=w.device)
        state.mask = torch.empty(w.shape[0], dtype=torch.uint8, device=w.device)
    return state


def _shard_state(param, w, g, state, row_sparse: bool, name: str, backend) -> PGDState:
    """The state of a shard's step: new on the first step (row mode as in
    :func:`pgd_attack_`, over the local rows), else followed to ``w``'s storage."""
    _registry.check_devices(w.device, [("the parameter", w), ("grad", g)])
    if state is None:
        return _new_state(param, w, g, row_sparse, backend)
    _follow(state, w, name, "two PGD attack() steps")
    _registry.require(state.backend, **kernel_limits(w, g))
    state.param = param  # the DTensor: restore takes its local shard as it is then
    return state


def _shard_sums_all(states, ws, gs, firsts, sums) -> dict:
    """``sums[3 i : 3 i + 3]`` = the local sums of tensor ``i`` (an FSDP2
    shard, or a whole unsharded table) for every tensor; returns what
    :func:`_shard_apply_all` needs.  The tensors of each kernel backend go
    through one multi-tensor plan (launches independent of their number); the
    torch ones step one by one."""
    planned = {}
    for name in kernel_backends([s.backend for s in states]):
        k = _registry.kernels("pgd", name)
        multi = [_shard_step(k, i, s, w, g, f) for i, (s, w, g, f) in enumerate(zip(states, ws, gs, firsts))
                 if s.backend == name]
        with device_guard(ws[0]):
            planned[name] = k.pgd_sums_many(multi, sums)
    for i, (state, w, g, first) in enumerate(zip(states, ws, gs, firsts)):
        if state.backend == "torch":
            _torch_shard_sums(state, w, g, sums[3 * i:3 * i + 3], first)
    return planned


def _shard_apply_all(planned: dict, states, ws, gs, sums, alpha: float, eps: float) -> None:
    """Every tensor's step from the all-reduced ``sums`` (after :func:`_shard_sums_all`)."""
    for name, plan in planned.items():
        with device_guard(ws[0]):
            _registry.kernels("pgd", name).pgd_apply_many(plan, sums, alpha, eps)
    for i, (state, w, g) in enumerate(zip(states, ws, gs)):
        if state.backend == "torch":
            _torch_shard_apply(state, w, g, sums[3 * i:3 * i + 3], alpha, eps)


def _shard_step(k, slot: int, state: PGDState, w, g, first: bool):
    """The multi-tensor kernels' (``k``) view of one tensor (dense: flat; rows: 2-D plus the flags)."""
    g = g.contiguous()
    if state.mask is not None:
        return k.ShardStep(slot, w, g, state.backup, first, state.mask, state.saved)
    return k.ShardStep(slot, w.view(-1), g.view(-1), state.backup.view(-1), first)


def _torch_shard_sums(state: PGDState, w, g, out, first: bool) -> None:
    """``out`` (3 fp32) = this shard's ``[||g||^2, ||r||^2, <r, g>]``, in PyTorch."""
    count_launch("torch.pgd")
    if first:
        state.backup.copy_(w)
    g32, r = g.to(torch.float32), w.to(torch.float32) - state.backup.to(torch.float32)
    out.copy_(torch.stack([(g32 * g32).sum(), (r * r).sum(), (r * g32).sum()]))


def _torch_shard_apply(state: PGDState, w, g, sums, alpha: float, eps: float) -> None:
    """The step on the shard from the all-reduced ``sums``, in PyTorch."""
    g32, w32, w0 = g.to(torch.float32), w.to(torch.float32), state.backup.to(torch.float32)
    norm_g = sums[0].sqrt()
    valid = (norm_g != 0) & ~torch.isnan(norm_g)
    s = alpha / norm_g
    norm_r = (sums[1] + 2 * s * sums[2] + s * s * sums[0]).clamp_min(0).sqrt()
    d = (w32 + alpha * g32 / norm_g) - w0
    d = torch.where(valid & (norm_r > eps), eps * d / norm_r, d)
    w.copy_(torch.where(valid, w0 + d, w32))


def _follow(state: PGDState, param: torch.Tensor, name: str, between: str) -> None:
    """Point ``state`` at ``param``'s current storage, or raise if that is not exact."""
    retarget(name, state.backup, param, between)
    if state.backend != "torch" and not param.is_contiguous():
        raise RuntimeError(f"{name} is no longer contiguous after {between}; the {state.backend} "
                           f"kernels need a contiguous parameter")
    state.backup, state.saved = follow(state.backup, param), follow(state.saved, param)
    state.mask, state.param = follow(state.mask, param), param


def pgd_restore_(state: PGDState, param: torch.Tensor | None = None, name: str = "the parameter") -> None:
    """Put ``w0`` back in place, bit-exact (``data_ptr`` unchanged), into
    ``param`` (default: the parameter attacked) as it is now."""
    state.param = state.param if param is None else param
    target = _dist.local(state.param)  # FSDP2: the local shard
    retarget(name, state.backup, target, "attack() and restore()")
    state.backup, state.saved = follow(state.backup, target), follow(state.saved, target)
    backend = state.backend
    if state.saved is not None and (not target.is_contiguous() or _registry.unusable(backend, target)):
        backend = "torch"  # the storage moved where the kernel cannot go: exact dense write
    saved = state.saved if state.saved is not None else torch.empty(0, dtype=torch.uint8,
                                                                      device=target.device)
    with torch.no_grad():
        pgd_restore_op(target, state.backup, saved, backend)


def design_bytes(numel: int, element_size: int, steps: int = 3, touched_rows: int | None = None,
                 cols: int | None = None) -> int:
    """Bytes the fused design moves for ``steps`` attacks + restore.

    First step: the reduction reads g, the update reads w and g and writes the
    backup and w (5 passes).  Later steps: the reduction reads w, w0 and g, the
    update reads them and writes w (7 passes).  Restore: 2 passes.  Row mode:
    every reduction reads all of g (1 pass per step) and writes a flag per
    row; the other passes run over the touched rows, plus the uint8 flags
    (mask and saved, 1 byte per row, read by each kernel).  ``backup_grad`` /
    ``restore_grad`` move nothing (no copies).
    """
    passes = 5 + 7 * (steps - 1) + 2
    if touched_rows is None:
        return passes * numel * element_size
    rows = numel // cols
    g_full = steps * numel * element_size
    touched = (passes - steps) * touched_rows * cols * element_size
    return g_full + touched + (5 * steps + 1) * rows
