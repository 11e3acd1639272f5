"""FGM as a functional op: ``w += epsilon * g / ||g||`` with a backup, in place.

``fgm_attack_`` perturbs one parameter and returns the :class:`FGMBackup` that
``fgm_restore_`` needs to put it back bit for bit.  The zero / NaN norm test of
the reference is made on the device: nothing is read back to the host.

Dense mode (any tensor): a norm pass and one fused update pass that writes the
backup and the perturbed weights; restore is one copy.  Row mode (a 2-D
parameter, the default on the kernel backends): the norm pass reads all of
``g`` and flags, on the device, every row that holds a non-zero (or NaN / inf)
entry; the update and the restore touch the flagged rows only.  Which rows
carry gradient is read from the gradient, never assumed from how the model
reads the table, so the result equals the dense reference for every model
(tied heads ``h @ W.t()``, ``F.embedding``, ``W[ids]``, accumulation, DDP).
The backup is full-size (allocated, written only at flagged rows), as large as
the reference's clone, so no bound on the number of rows is ever needed.
"""
from __future__ import annotations

import dataclasses

import torch

from ..kernels import count_launch, device_guard
from . import _dist, _registry
from ._live import follow, retarget
from ._registry import KERNEL_DTYPES  # noqa: F401  (re-exported for the ops built on FGM's)


@dataclasses.dataclass
class FGMBackup:
    """What restore needs: the parameter, its saved values and, in row mode,
    the uint8 row flags (row r was saved and perturbed)."""
    param: torch.Tensor
    data: torch.Tensor
    rows: torch.Tensor | None
    backend: str


def _check(param: torch.Tensor, grad: torch.Tensor, epsilon) -> None:
    if not isinstance(grad, torch.Tensor):
        raise TypeError(f"grad must be a tensor, got {type(grad).__name__}")
    if grad.shape != param.shape:
        raise ValueError(f"grad shape {tuple(grad.shape)} does not match parameter shape {tuple(param.shape)}")
    if not param.is_floating_point():
        raise TypeError(f"FGM perturbs floating-point parameters, got {param.dtype}")
    if not isinstance(epsilon, (int, float)) or isinstance(epsilon, bool):
        raise TypeError(f"epsilon must be a number, got {type(epsilon).__name__}")


def resolve(w: torch.Tensor, grad: torch.Tensor, backend: str | None) -> str:
    """The backend that runs FGM / PGD on ``w`` (the registry's rule): the
    gradient on the parameter's device; the kernels take a contiguous
    float32 / float16 / bfloat16 parameter and its gradient in its dtype."""
    return _registry.pick(backend, w.device, same_device=[("the parameter", w), ("grad", grad)],
                          **kernel_limits(w, grad))


def kernel_limits(w: torch.Tensor, grad: torch.Tensor) -> dict:
    """What FGM's and PGD's kernels need of ``w`` and ``grad`` (``pick`` /
    ``require`` keyword arguments)."""
    return dict(dtypes=[("parameters", w)], same_dtype=[("parameter", w), ("gradient", grad)],
                contiguous=[("parameter", w)])


# ---- the registered ops ------------------------------------------------------------------------

def _by_rows(w: torch.Tensor, row_sparse: bool, backend: str) -> bool:
    return row_sparse and backend != "torch" and w.dim() == 2


@_registry.op("fgm_attack_", mutates_args={"w", "backup"}, triton=True)
def fgm_attack_op(w: torch.Tensor, g: torch.Tensor, backup: torch.Tensor, epsilon: float,
                  row_sparse: bool, backend: str) -> torch.Tensor:
    """``w += epsilon * g / ||g||`` (skipped on the device for a 0 / NaN norm),
    saving ``w`` into ``backup`` first; returns the uint8 flag per row in row
    mode (only those rows of ``backup`` are written), empty otherwise (all of
    ``backup`` is written).  The caller allocates ``backup``: full-size, never
    cleared, so no pass is spent on rows without gradient."""
    no_rows = torch.empty(0, dtype=torch.uint8, device=w.device)
    if backend == "torch":
        count_launch("torch.fgm")
        _torch_attack(w, g, backup, epsilon)
        return no_rows
    k = _registry.kernels("fgm", backend)
    g = g.contiguous()
    norm = torch.empty(1, dtype=torch.float32, device=w.device)
    with device_guard(w):
        if not _by_rows(w, row_sparse, backend):
            k.fgm_norm(g.view(1, -1), None, norm)
            k.fgm_update(w.view(1, -1), g.view(1, -1), backup, None, norm, epsilon)
            return no_rows
        rows = torch.empty(w.shape[0], dtype=torch.uint8, device=w.device)
        k.fgm_norm(g, rows, norm)
        k.fgm_update(w, g, backup, rows, norm, epsilon)
    return rows


@fgm_attack_op.register_fake
def _(w, g, backup, epsilon, row_sparse, backend):
    return w.new_empty(w.shape[0] if _by_rows(w, row_sparse, backend) else 0, dtype=torch.uint8)


@_registry.op("fgm_restore_", mutates_args={"w"}, triton=True)
def fgm_restore_op(w: torch.Tensor, backup: torch.Tensor, rows: torch.Tensor, backend: str) -> None:
    """Put ``backup`` back into ``w``, bit-exact: the flagged rows (row mode) or all."""
    if rows.numel() == 0:
        w.copy_(backup)
    elif backend != "torch":
        with device_guard(w):
            _registry.kernels("fgm", backend).fgm_restore_rows(w, backup, rows)
    else:  # storage moved to where the kernel cannot go: same values, dense write
        count_launch("torch.fgm_restore")
        w.copy_(torch.where(rows.bool().unsqueeze(1), backup, w))


@fgm_restore_op.register_fake
def _(w, backup, rows, backend):
    return None


def _torch_attack(w: torch.Tensor, g: torch.Tensor, backup: torch.Tensor, epsilon: float) -> None:
    """Pure-PyTorch fallback (dense, any device and dtype): fp32 math, no sync."""
    backup.copy_(w)
    g32 = g.to(torch.float32)
    norm = torch.linalg.vector_norm(g32)
    invalid = (norm == 0) | torch.isnan(norm)
    # (eps * g) / norm as the reference rounds it; zeroed when the norm is
    # unusable; added in fp32 and rounded once into w's dtype.
    w.add_((epsilon * g32).div_(norm).masked_fill_(invalid, 0.0))


# ---- the functional API ------------------------------------------------------------------------

def fgm_attack_(param: torch.Tensor, grad: torch.Tensor, epsilon: float, *,
                row_sparse: bool = True, backend: str | None = None) -> FGMBackup:
    """Perturb ``param`` in place by ``epsilon * grad / ||grad||`` (skipped on the
    device when the norm is 0 or NaN) and return its backup.

    ``row_sparse`` (default): a 2-D parameter on a kernel backend takes the
    row mode (rows without gradient are neither read twice nor written); the
    result is the same as the dense one.  The torch backend is always dense.
    """
    _check(param, grad, epsilon)
    if grad.is_sparse:
        grad = grad.to_dense()
    if _dist.is_sharded(param):
        # FSDP2: the local shard along the global g / ||g|| (one all_reduce, no host sync)
        return fgm_attack_many_([param], [grad], float(epsilon), row_sparse=bool(row_sparse),
                                backend=backend)[0]
    name = resolve(param, grad, backend)
    with torch.no_grad():
        backup = torch.empty_like(param)
        rows = fgm_attack_op(param, grad.detach(), backup, float(epsilon), bool(row_sparse), name)
    return FGMBackup(param, backup, rows if rows.numel() else None, name)


def fgm_attack_many_(params, grads, epsilon: float, *, row_sparse: bool = True,
                     backend: str | None = None) -> list[FGMBackup]:
    """:func:`fgm_attack_` on every ``params[i]`` along its own ``g / ||g||``.

    FSDP2 shards (DTensors of one shard group): the tensors' partial sums of
    squares share one buffer and one all_reduce per call, however many there
    are.  Plain tensors: no collective; two or more on a kernel backend (on
    one device, with distinct storages) are attacked in one multi-tensor call,
    bitwise what :func:`fgm_attack_` gives each; the others (or a single one)
    one :func:`fgm_attack_` each.  A kernel backend's multi-tensor call
    (``fgm_sq_many`` / ``fgm_update_many`` of ``kernels/triton/fgm.py`` and
    ``kernels/cuda/fgm.py``) launches one partials and one update launch per
    group of tensors (triton: dtype, mode, row block; cuda: dtype, mode) plus
    one sum launch.  Every tensor's backend is resolved before any is
    perturbed."""
    params, grads = list(params), list(grads)
    if len(params) != len(grads):
        raise ValueError(f"fgm_attack_many_ needs one grad per parameter, got {len(params)} and {len(grads)}")
    for p, g in zip(params, grads):
        _check(p, g, epsilon)
    if not params:
        return []
    grads = [g.to_dense() if g.is_sparse else g for g in grads]
    (ws, gs), group = _dist.localize([params, grads], ["params", "grads"])
    if group is None:
        return _attack_plain(params, grads, float(epsilon), bool(row_sparse), backend)
    _registry.check_devices(ws[0].device, [(f"params[{i}]", w) for i, w in enumerate(ws)])
    with torch.no_grad():
        names = [resolve(w, g, backend) for w, g in zip(ws, gs)]
        return _attack_together(params, ws, [g.detach() for g in gs], names, float(epsilon), row_sparse,
                                lambda sq: _dist.all_reduce_sum_(sq, group))


def _attack_plain(params, grads, epsilon: float, row_sparse: bool, backend) -> list[FGMBackup]:
    """Unsharded tensors: the kernel-backend ones together when :func:`multi_tensor_ok`, else
    (and the others) one :func:`fgm_attack_` each, in order."""
    names = [resolve(p, g, backend) for p, g in zip(params, grads)]  # every refusal before any write
    together = multi_tensor_ok(params, names)
    out = [None] * len(params)
    for i, (p, g) in enumerate(zip(params, grads)):
        if i not in together:
            out[i] = fgm_attack_(p, g, epsilon, row_sparse=row_sparse, backend=backend)
    if together:
        with torch.no_grad():
            got = _attack_together([params[i] for i in together], [params[i] for i in together],
                                   [grads[i].detach() for i in together], [names[i] for i in together],
                                   epsilon, row_sparse, lambda sq: sq)
        for i, state in zip(together, got):
            out[i] = state
    return out


def kernel_backends(names) -> list[str]:
    """The kernel backends among ``names``, each once, in order.  Every kernel backend (triton,
    cuda) steps FGM's and PGD's tensors in one multi-tensor call (``fgm_sq_many`` /
    ``fgm_update_many``, ``pgd_sums_many`` / ``pgd_apply_many``); torch steps them one by one."""
    return [name for name in dict.fromkeys(names) if name != "torch"]


def multi_tensor_ok(params, names) -> list[int]:
    """The indices of the unsharded tensors one multi-tensor call per kernel backend takes:
    those on a kernel backend, when there are two or more, all on one device, in distinct
    storages (a shared storage would make the per-tensor calls see each other's writes), and
    not while torch.compile traces (the multi-tensor kernels are not registered ops; the
    per-tensor ops are, and give the same bits).  Empty: each tensor takes its per-tensor call."""
    idx = [i for i, name in enumerate(names) if name in kernel_backends(names)]
    if len(idx) < 2 or torch.compiler.is_compiling():
        return []
    if len({params[i].device for i in idx}) != 1:
        return []
    storages = [p.untyped_storage().data_ptr() for p in params if p.numel()]  # an empty one writes nothing
    if len(set(storages)) != len(storages):
        return []
    return idx


def _attack_together(params, ws, gs, names, epsilon: float, row_sparse: bool, reduce) -> list[FGMBackup]:
    """One call over the local tensors ``ws`` of ``params``: every tensor's ``||g||^2``
    into one buffer, ``reduce`` (the all_reduce across the shards, or nothing), the
    sqrt, every update.  Under no_grad."""
    # the kernels read a contiguous gradient: copied once here, not in both passes
    gs = [g if name == "torch" else g.contiguous() for g, name in zip(gs, names)]
    rows = [_shard_rows(w, row_sparse, name) for w, name in zip(ws, names)]
    backups = [torch.empty_like(w) for w in ws]
    sq = torch.empty(len(ws), dtype=torch.float32, device=ws[0].device)  # the partial ||g||^2
    planned = _shard_square_norms_all(ws, gs, rows, backups, names, sq)
    norms = _sqrt_rn(reduce(sq))
    _shard_update_all(planned, ws, gs, backups, names, norms, epsilon)
    return [FGMBackup(p, b, r, name) for p, b, r, name in zip(params, backups, rows, names)]


def _sqrt_rn(sq: torch.Tensor) -> torch.Tensor:
    """The correctly rounded fp32 ``sqrt`` of ``sq``, the one the per-tensor kernels' finalize
    takes (``tl.sqrt_rn``, ``sqrtf``), so that a multi-tensor call's norms are theirs bitwise.
    torch's own fp32 ``sqrt`` is not always that (torch 2.13's CPU kernel is 1 ulp off for about
    15% of inputs); the fp64 sqrt rounded once to fp32 is (53 >= 2 * 24 + 2 bits: the double
    rounding cannot change it).  No fp64 on MPS, where no kernel backend runs: torch's sqrt."""
    if sq.device.type == "mps":
        return sq.sqrt()
    return sq.double().sqrt_().float()


def _shard_rows(w, row_sparse: bool, name: str) -> torch.Tensor | None:
    """The uint8 row flags of a shard in row mode (written by the norm pass), else None: row
    mode over the local rows, as :func:`fgm_attack_` takes it; a shard without rows (an
    empty one) is dense, with nothing to flag."""
    if _by_rows(w, row_sparse, name) and w.shape[0]:
        return torch.empty(w.shape[0], dtype=torch.uint8, device=w.device)
    return None


def _shard_square_norms_all(ws, gs, rows, backups, names, sq) -> dict:
    """``sq[i]`` = the local ``||g||^2`` of tensor ``i`` (an FSDP2 shard, or a
    whole unsharded table) for every tensor (row mode also flags ``rows[i]``);
    returns what :func:`_shard_update_all` needs.  The tensors of each kernel
    backend go through one multi-tensor plan (launches independent of their
    number); the torch ones one by one."""
    planned = {}
    for name in kernel_backends(names):
        k = _registry.kernels("fgm", name)
        items = [_shard_item(k, i, w, g, r, b)
                 for i, (w, g, r, b, n) in enumerate(zip(ws, gs, rows, backups, names)) if n == name]
        with device_guard(ws[0]):
            planned[name] = k.fgm_sq_many(items, sq)
    for i, (g, name) in enumerate(zip(gs, names)):
        if name == "torch":
            count_launch("torch.fgm")
            g32 = g.to(torch.float32)
            sq[i:i + 1].copy_((g32 * g32).sum().reshape(1))
    return planned


def _shard_update_all(planned: dict, ws, gs, backups, names, norms, epsilon: float) -> None:
    """Every tensor's backup and update from the all-reduced ``norms`` (after
    :func:`_shard_square_norms_all`)."""
    for name, plan in planned.items():
        with device_guard(ws[0]):
            _registry.kernels("fgm", name).fgm_update_many(plan, norms, epsilon)
    for i, (w, g, b, name) in enumerate(zip(ws, gs, backups, names)):
        if name == "torch":
            _torch_shard_update(w, g, b, norms[i:i + 1], epsilon)


def _shard_item(k, slot: int, w, g, rows, backup):
    """The multi-tensor kernels' (``k``) view of one tensor (dense: flat; rows: 2-D plus the flags)."""
    if rows is not None:
        return k.ShardNorm(slot, w, g, backup, rows)
    return k.ShardNorm(slot, w.view(-1), g.view(-1), backup.view(-1))


def _torch_shard_update(w, g, backup, norm, epsilon: float) -> None:
    """Back the shard up into ``backup`` and add ``epsilon * g / norm``
    (skipped for a 0 / NaN global norm, on the device), in PyTorch."""
    g32 = g.to(torch.float32)
    backup.copy_(w)
    invalid = (norm == 0) | torch.isnan(norm)
    w.add_((epsilon * g32).div_(norm).masked_fill_(invalid, 0.0))


def fgm_restore_(state: FGMBackup, param: torch.Tensor | None = None, name: str = "the parameter") -> None:
    """Put the saved values back, bit-exact, into ``param`` (default: the
    parameter attacked) as it is now: into its current storage if user code
    reallocated it (same shape and dtype; a device move is followed), else
    :class:`~fastadv.StorageMoved` is raised and ``state`` kept."""
    state.param = state.param if param is None else param
    target = _dist.local(state.param)  # FSDP2: the local shard
    retarget(name, state.data, target, "attack() and restore()")
    state.data, state.rows = follow(state.data, target), follow(state.rows, target)
    backend = state.backend
    if state.rows is not None and (not target.is_contiguous() or _registry.unusable(backend, target)):
        backend = "torch"  # the storage moved where the kernel cannot go: exact dense write
    rows = state.rows if state.rows is not None else torch.empty(0, dtype=torch.uint8, device=target.device)
    with torch.no_grad():
        fgm_restore_op(target, state.data, rows, backend)


def design_bytes(numel: int, element_size: int, touched_rows: int | None = None,
                 cols: int | None = None) -> int:
    """Bytes the fused design moves per attack + restore.

    Dense: norm reads g (1 pass), update reads w and g and writes backup and w
    (4), restore reads backup and writes w (2): 7 passes.  Row mode: the norm
    reads all of g (1 pass) and writes one flag byte per row; update and
    restore move 6 passes over the touched rows and read the flags twice.
    """
    if touched_rows is None:
        return 7 * numel * element_size
    rows = numel // cols
    return numel * element_size + 6 * touched_rows * cols * element_size + 3 * rows
