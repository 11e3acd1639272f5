"""Noise injection as functional ops: ``torch.ops.fastadv.noise_add`` (and its
in-place ``noise_add_``), ``noise_token_ids`` and the multi-tensor
``weight_noise_``; validation, backend choice and the pure-PyTorch fallback.

Randomness.  A noise op takes its randomness as a tensor argument ``rand``,
drawn here from ``generator`` (default: the device's default generator):

* kernel backends (triton, cuda): a Philox key ``[seed, base]``
  (:func:`fastadv.kernels.host.new_key`, ``torch.randint`` on the tensor's
  device: reproducible under ``torch.manual_seed``, no host sync, a new key
  per call); the noise is drawn inside the kernel (see
  ``fastadv/kernels/triton/rng.py``);
* torch backend: the standard draw itself (``torch.randn`` / ``torch.rand``
  from the same generator, the reference's draw); its numbers differ from the
  kernels' (another generator algorithm), its distribution does not.

So a registered op is a function of its inputs (``opcheck`` and
``torch.compile`` see a deterministic op; a ``torch.Generator`` is no
``torch.library`` argument type).

Kernel backends take float32 / float16 / bfloat16 tensors (int64 ids for the
token-id op); other dtypes go to the torch backend under ``auto`` and raise
under a forced backend.  Non-contiguous tensors are made contiguous first (one
extra pass).  The math is fp32, rounded once to the tensor's dtype.  NEFTune is
:mod:`fastadv.ops.neftune`, SiFT :mod:`fastadv.ops.sift`.
"""
from __future__ import annotations

import dataclasses
import math

import torch

from ..kernels import count_launch, device_guard, host
from . import _dist, _registry
from ._live import StorageMoved
from .multi_tensor import group, split, tables, take

QUARTER = host.RNG_QUARTER  # Philox counters per chunk
CHUNK = host.RNG_CHUNK      # elements per chunk


# ---- helpers shared by the noise ops (NEFTune and SiFT use them too) ------------------------------

def number(value, what: str, *, nonneg: bool = True) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{what} must be a number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value) or (nonneg and value < 0):
        raise ValueError(f"{what} must be finite{' and >= 0' if nonneg else ''}, got {value}")
    return value


def check_float(x, what: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{what} must be a tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{what} must be a floating-point tensor, got {x.dtype}")


def pick(backend, t: torch.Tensor, what: str = "tensors", dtypes=_registry.KERNEL_DTYPES) -> str:
    """The backend that runs on ``t`` (the registry's rule for its dtype)."""
    return _registry.pick(backend, t.device, dtypes=[(what, t)], allowed=dtypes)


def opmath(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def draw(backend: str, shape, dtype: torch.dtype, device, generator, kind: str = "normal") -> torch.Tensor:
    """The ``rand`` argument of a noise op (module docstring): a Philox key for
    the kernel backends; for the torch backend the standard draw of ``shape``
    (``normal``: N(0, 1), ``uniform``: U[-1, 1)) in ``dtype`` on ``device`` --
    a generator on another device draws there and the draw is moved."""
    if backend != "torch":
        return host.new_key(device, generator)
    at = device if generator is None else generator.device
    if kind == "normal":
        r = torch.randn(shape, dtype=dtype, device=at, generator=generator)
    else:
        r = torch.rand(shape, dtype=dtype, device=at, generator=generator).mul_(2).sub_(1)
    return r if generator is None else r.to(device)


def noisy(x: torch.Tensor, noise: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    """``x + noise`` (``noise`` in x's opmath dtype, consumed) rounded once to x's
    dtype, in place or as a new tensor: the torch backend's last step."""
    if noise.dtype == x.dtype:
        return x.add_(noise) if inplace else x + noise
    res = noise.add_(x).to(x.dtype)
    return x.copy_(res) if inplace else res


def _inplace(x: torch.Tensor, run) -> torch.Tensor:
    """``run()`` writes ``x`` in place (a registered mutating op): refuse a leaf
    that requires grad, as PyTorch's in-place ops do, and keep autograd honest."""
    if torch.is_grad_enabled() and x.requires_grad and x.is_leaf:
        raise RuntimeError("a leaf Variable that requires grad is being used in an in-place operation.")
    with torch.no_grad():
        run()
    if x.requires_grad:
        # the gradient of x + noise is the identity: the graph stays valid, but
        # anything that saved x for backward must see that it changed
        torch.autograd.graph.increment_version(x)
    return x


def _identity_backward(ctx, grad):
    return grad, None, None, None, None


# ---- Gaussian (and uniform) noise added to a tensor -----------------------------------------------

@_registry.op("noise_add")
def noise_add_op(x: torch.Tensor, rand: torch.Tensor, scale: float, uniform: bool, backend: str) -> torch.Tensor:
    """``x + scale * r`` as a new tensor, ``r ~ N(0, 1)`` (or ``U[-1, 1)`` when
    ``uniform``): drawn in the kernel from the key ``rand``, or ``rand`` itself
    on the torch backend.  Differentiable w.r.t. ``x`` (identity)."""
    if backend == "torch":
        count_launch("torch.noise_add")
        return noisy(x, rand * scale)
    x = x.contiguous()
    out = torch.empty_like(x)
    with device_guard(x):
        _registry.kernels("noise", backend).add_noise(x, out, rand, scale, uniform=uniform)
    return out


@noise_add_op.register_fake
def _(x, rand, scale, uniform, backend):
    if backend == "torch":
        return noisy(x, rand * scale)
    return torch.empty_like(x, memory_format=torch.contiguous_format)


noise_add_op.register_autograd(_identity_backward)


@_registry.op("noise_add_", mutates_args={"x"})
def noise_add_inplace_op(x: torch.Tensor, rand: torch.Tensor, scale: float, uniform: bool,
                         backend: str) -> None:
    """In place ``x += scale * r`` (see ``noise_add``)."""
    if backend == "torch":
        count_launch("torch.noise_add")
        noisy(x, rand * scale, inplace=True)
        return
    k = _registry.kernels("noise", backend)
    with device_guard(x):
        if x.is_contiguous():
            k.add_noise(x, x, rand, scale, uniform=uniform)
        else:
            tmp = x.contiguous()
            k.add_noise(tmp, tmp, rand, scale, uniform=uniform)
            x.copy_(tmp)


@noise_add_inplace_op.register_fake
def _(x, rand, scale, uniform, backend):
    return None


def add_gaussian_noise(x: torch.Tensor, std: float, *, generator: torch.Generator | None = None,
                       backend: str | None = None) -> torch.Tensor:
    """``x + N(0, std^2)`` as a new tensor (the reference's ``x + randn_like(x) * std``),
    one read and one write; differentiable w.r.t. ``x`` (identity)."""
    check_float(x, "x")
    std = number(std, "std")
    name = pick(backend, x)
    return noise_add_op(x, draw(name, x.shape, opmath(x.dtype), x.device, generator), std, False, name)


def add_gaussian_noise_(x: torch.Tensor, std: float, *, generator: torch.Generator | None = None,
                        backend: str | None = None) -> torch.Tensor:
    """In place ``x += N(0, std^2)``; returns ``x`` (same ``data_ptr``)."""
    check_float(x, "x")
    std = number(std, "std")
    name = pick(backend, x)
    rand = draw(name, x.shape, opmath(x.dtype), x.device, generator)
    return _inplace(x, lambda: noise_add_inplace_op(x, rand, std, False, name))


# ---- the seed's token-id noise ---------------------------------------------------------------------

@_registry.op("noise_token_ids")
def noise_token_ids_op(ids: torch.Tensor, rand: torch.Tensor, factor: float, vocab_size: int,
                       backend: str) -> torch.Tensor:
    """``clamp(long(float(ids) + factor * z), 0, vocab_size - 1)``, ``z`` from
    the key ``rand`` (kernels) or ``rand`` itself (torch, fp32)."""
    if backend == "torch":
        count_launch("torch.noise_token_ids")
        return (ids.float() + rand * factor).long().clamp(min=0, max=vocab_size - 1)
    ids = ids.contiguous()
    out = torch.empty_like(ids)
    with device_guard(ids):
        _registry.kernels("noise", backend).token_ids(ids, out, rand, factor, vocab_size)
    return out


@noise_token_ids_op.register_fake
def _(ids, rand, factor, vocab_size, backend):
    if backend == "torch":
        return (ids.float() + rand * factor).long().clamp(min=0, max=vocab_size - 1)
    return torch.empty_like(ids, memory_format=torch.contiguous_format)


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
    noise_factor = number(noise_factor, "noise_factor")
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 1:
        raise ValueError(f"vocab_size must be a positive int, got {vocab_size!r}")
    name = pick(backend, input_ids, "input ids", dtypes=(torch.int64,))
    rand = draw(name, input_ids.shape, torch.float32, input_ids.device, generator)
    return noise_token_ids_op(input_ids, rand, noise_factor, vocab_size, name)


# ---- weight noise (multi-tensor) -------------------------------------------------------------------

@dataclasses.dataclass
class WeightNoiseBackup:
    """What :func:`weight_noise_restore_` needs: the perturbed tensors (the
    objects given to :func:`weight_noise_`), their names (for error messages)
    and one backup of the original bits per tensor (kernel groups: views of
    one flat buffer per group; torch group: one tensor each), plus the backend
    choice that perturbed them.  Nothing here is a raw address: the restore
    builds its work list from the live tensors."""
    tensors: list
    names: list
    backups: list
    backend: str | None = None

    def __bool__(self) -> bool:
        return bool(self.tensors)


@_registry.op("weight_noise_", mutates_args={"weights", "backups"})
def weight_noise_op(weights: list[torch.Tensor], backups: list[torch.Tensor], rand: list[torch.Tensor],
                    std: float, backend: str) -> None:
    """``backups[i] <- weights[i]``, then ``weights[i] += std * z`` in place, for
    tensors on one device.  Kernel backends: one dtype, ``rand = [key]``, one
    launch (the backup written in the same pass); torch: ``rand`` holds one
    standard draw per tensor."""
    if not weights:
        return
    if backend == "torch":
        torch._foreach_copy_(backups, weights)
        for w, z in zip(weights, rand):
            noisy(w, z * std, inplace=True)
        count_launch("torch.weight_noise")
        return
    with device_guard(weights[0]):
        table = tables().get("weight_noise", [weights, backups], chunk=CHUNK)
        _registry.kernels("noise", backend).weight_noise(table, weights[0].dtype, rand[0], std)


@weight_noise_op.register_fake
def _(weights, backups, rand, std, backend):
    return None


def _bump_versions(tensors) -> None:
    """Tell autograd the tensors changed in place (a kernel wrote them): a graph
    that saved them then fails in backward, as after the reference's ``copy_``,
    instead of silently using the new values."""
    for t in tensors:
        torch.autograd.graph.increment_version(t)


BACKUP_ALIGN = 16  # elements: each tensor's backup view starts on a multiple (aligned vector access)


def _flat_backups(group_: list[torch.Tensor]) -> list[torch.Tensor]:
    """One backup view per tensor, in one flat buffer (views 16-element aligned)."""
    offsets, total = [], 0
    for t in group_:
        offsets.append(total)
        total += -(-t.numel() // BACKUP_ALIGN) * BACKUP_ALIGN
    flat = torch.empty(total, dtype=group_[0].dtype, device=group_[0].device)
    return [flat[o: o + t.numel()].view(t.shape) for o, t in zip(offsets, group_)]


def _groups(tensors: list[torch.Tensor], backend):
    """``{(backend, device, dtype or None): positions}``: kernel groups hold one
    dtype of contiguous tensors (the registry's rule per tensor), one torch
    group per device takes the rest."""
    keys: list = [None] * len(tensors)
    for device, idx in group([t.device for t in tensors]).items():
        name, fast, slow = split(backend, device, [take(tensors, idx)], ("parameter",))
        for pos in fast:
            keys[idx[pos]] = (name, device, tensors[idx[pos]].dtype)
        for pos in slow:
            keys[idx[pos]] = ("torch", device, None)
    return group(keys)  # in the order of the tensors' first appearance


def weight_noise_(tensors: list[torch.Tensor], std: float, *, generator: torch.Generator | None = None,
                  backend: str | None = None, names: list[str] | None = None) -> WeightNoiseBackup:
    """In place ``w <- w + N(0, std^2)`` for every tensor, returning the backup
    that puts them back bit for bit (:func:`weight_noise_restore_`).  Kernel
    backends: one launch per (device, dtype) group, the backup written in the
    same pass.  ``names``: one per tensor, for the restore's error messages."""
    std = number(std, "std")
    tensors = list(tensors)
    for t in tensors:
        check_float(t, "a perturbed tensor")
    names = [f"tensor {i}" for i in range(len(tensors))] if names is None else list(names)
    if len(names) != len(tensors):
        raise ValueError(f"names has {len(names)} entries for {len(tensors)} tensors")
    if any(_dist.is_sharded(t) for t in tensors):
        return _sharded_weight_noise(tensors, std, generator, backend, names)
    state = WeightNoiseBackup([], [], [], backend)
    try:
        with torch.no_grad():
            for (name, device, dtype), idx in _groups(tensors, backend).items():
                group_ = take(tensors, idx)
                if name == "torch":
                    backups = [torch.empty_like(t) for t in group_]
                    rand = [draw(name, t.shape, opmath(t.dtype), device, generator) for t in group_]
                else:
                    backups = _flat_backups(group_)
                    rand = [draw(name, (), dtype, device, generator)]
                weight_noise_op(group_, backups, rand, std, name)
                state.tensors += group_
                state.names += take(names, idx)
                state.backups += backups
                if name != "torch":
                    _bump_versions(group_)
    except BaseException:
        weight_noise_restore_(state)  # the groups already perturbed go back before the error leaves
        raise
    return state


def _sharded_weight_noise(tensors, std, generator, backend, names) -> WeightNoiseBackup:
    """FSDP2 (DTensor shards): each shard draws its own part of the noise the
    single-process call gives the whole tensor, so the gathered weights equal
    the single-process run with the same generator state (``torch.manual_seed``
    on every rank) bitwise, and no two shards share a number.  The groups are
    those of the single-process call (:func:`_groups` on the local shards,
    which have the full tensors' dtypes and layout), drawn in the same order:

    * kernel groups: one key per group, and one launch in which every shard
      draws the Philox counters its elements have in the unsharded launch
      (:func:`fastadv.kernels.host.shard_counters`); each rank draws only
      its own elements;
    * the torch group: the torch backend's ``randn`` of each tensor's global
      shape, tensor after tensor, of which each shard adds its part (one
      full-size draw per tensor on every rank: the torch generator cannot
      skip ahead)."""
    if not all(_dist.is_sharded(t) for t in tensors):
        raise ValueError("weight noise on a mix of sharded (FSDP2) and unsharded tensors: call it once "
                         "for each kind")
    local = [_dist.local(t) for t in tensors]
    state = WeightNoiseBackup([], [], [], backend)
    try:
        with torch.no_grad():
            for (name, device, dtype), idx in _groups(local, backend).items():
                glob, shards = take(tensors, idx), take(local, idx)
                if name == "torch":
                    backups = [torch.empty_like(t) for t in shards]
                    # the shard's part copied out, so that only one full-size draw is alive at a time
                    rand = [_dist.shard_of(draw("torch", t.shape, opmath(t.dtype), device, generator), t).clone()
                            for t in glob]
                    weight_noise_op(shards, backups, rand, std, "torch")
                else:
                    backups = _flat_backups(shards)
                    _, place = host.shard_counters([t.numel() for t in glob],
                                                   [_dist.shard_offset(t) for t in glob],
                                                   [t.numel() for t in shards])
                    key = draw(name, (), dtype, device, generator)
                    shard_weight_noise_op(shards, backups, [key], place, std, name)
                    _bump_versions(shards)
                state.tensors += glob
                state.names += take(names, idx)
                state.backups += backups
    except BaseException:
        weight_noise_restore_(state)  # the groups already perturbed go back before the error leaves
        raise
    return state


@_registry.op("shard_weight_noise_", mutates_args={"weights", "backups"})
def shard_weight_noise_op(weights: list[torch.Tensor], backups: list[torch.Tensor], rand: list[torch.Tensor],
                          place: list[int], std: float, backend: str) -> None:
    """:func:`weight_noise_op` on shards, kernel backends only: ``weights`` are
    local shards (one dtype, one device), ``rand = [key]``, ``place`` their
    place in the unsharded launch (:func:`fastadv.kernels.host.shard_counters`).
    One launch; each element gets the number the unsharded launch gives it."""
    if backend not in ("triton", "cuda"):
        raise ValueError(f"shard weight noise runs on the kernel backends, got {backend!r}")
    if len(place) != 2 * len(weights):
        raise ValueError(f"place has {len(place)} entries for {len(weights)} tensors (2 each)")
    if not weights:
        return
    spans = [lead + w.numel() if w.numel() else 0 for w, lead in zip(weights, place[1::2])]
    with device_guard(weights[0]):
        # built for this call from the live tensors (the spans are not the tensors' sizes, so the
        # shared cache keyed by sizes does not hold them): two small copies, no host sync
        table = host.TensorTable(spans, 2, weights[0].device, CHUNK,
                                 ptrs=[t.data_ptr() for lst in (weights, backups) for t in lst])
        place_ = host.host_to(torch.tensor(place, dtype=torch.int64), weights[0].device)
        _registry.kernels("noise", backend).shard_weight_noise(table, place_, weights[0].dtype, rand[0], std)


@shard_weight_noise_op.register_fake
def _(weights, backups, rand, place, std, backend):
    return None


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
    from .multi_tensor import restore_live_
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


def design_bytes(op: str, numel: int, element_size: int) -> int:
    """Bytes the fused design moves per call (what the benchmark reports).

    ``noise`` / ``noise_``: read x, write out (2 passes); ``weight_noise``:
    enter reads w, writes w and backup (3), exit reads the backup and writes w
    (2); ``token_ids``: 16 bytes per id.  NEFTune and SiFT have their own
    (:func:`fastadv.ops.neftune.design_bytes`, :func:`fastadv.ops.sift.design_bytes`)."""
    s = element_size
    if op in ("noise", "noise_"):
        return 2 * numel * s
    if op == "weight_noise":
        return 5 * numel * s
    if op == "token_ids":
        return 16 * numel
    raise ValueError(f"unknown op {op!r}")
