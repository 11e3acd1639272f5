"""Ghost clipping and book-keeping DP-SGD under DDP (``DistributedDataParallel``)
and under FSDP2 (``fully_shard``, with or without a ``MixedPrecisionPolicy``;
see :class:`FSDPGhostClippingModule`).

``PrivacyEngine.make_private(module=ddp_model, ..., grad_sample_mode="ghost" | "bk")``
gives :class:`DistributedGhostClippingModule` and
:class:`DistributedGhostDPOptimizer`, with the semantics of Opacus 1.6's
``DistributedDPOptimizer``: every rank clips its own samples (per-sample norms
from its local batch), the noise ``N(0, (sigma * C)^2)`` is added once, on
rank 0, before the clipped sums are summed over the ranks, and for
``loss_reduction="mean"`` the sum is divided by ``expected_batch_size *
world_size`` (Opacus: ``/ expected_batch_size`` per rank -- the per-rank
batch -- then ``all_reduce(SUM) / world_size``).

The design, one for both modes: **DDP never reduces; the optimizer does, once
per step.**

* The ``"bk"`` mode writes ``p.grad`` itself (no backward reaches the
  parameters: nothing would reduce it), while ``"ghost"``'s second backward
  is a plain ``backward()`` that DDP's reducer would *average* over the
  ranks.  Letting DDP average one mode and reducing the other by hand would
  give two code paths with different scalings, and DDP's average cannot
  carry the noise: Opacus adds it on rank 0 *before* the sum.
* So the forward runs under ``ddp.no_sync()`` (DDP arms its reducer in the
  forward; under ``no_sync`` it does not, and every later backward only
  accumulates locally), and :class:`DistributedGhostDPOptimizer` sums the
  ranks' noised, scaled gradients with **one** ``all_reduce(SUM)`` of one
  flat buffer per dtype (one in practice), whatever the number of parameters
  (Opacus: one per parameter).  Divided by ``world_size`` before the sum
  instead of after: the same number to fp32 rounding.
* ghost's first (norm) backward is ``torch.autograd.grad`` to the parameters:
  autograd hands the gradients back at the leaves' edges without running
  their ``AccumulateGrad`` nodes, so the reducer's hooks would not fire even
  without ``no_sync``; ``"bk"``'s is to the layer outputs (no parameter is
  reached at all).
* Consequence of ``no_sync``: DDP broadcasts module buffers from rank 0 only
  at the first forward (DP-trainable models have no running statistics:
  BatchNorm is refused by Opacus's validator; constant buffers such as
  position ids stay replicated).
* Calling the DDP module directly (not the wrapper) in training arms the
  reducer: the layer hooks detect it (``require_backward_grad_sync``) and
  raise.  The update would still be right (the optimizer's sum of DDP's
  average is the sum: tested by switching ``no_sync`` off), but ghost mode's
  second backward would all-reduce every gradient once more.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from . import ghost as _ghost
from ..ops import _dist
from ..ops import dp as _ops

__all__ = ["DistributedGhostClippingModule", "DistributedGhostDPOptimizer", "FSDPGhostClippingModule",
           "FSDPGhostDPOptimizer"]


class DistributedGhostClippingModule(_ghost.GhostClippingModule):
    """:class:`fastadv.dp.GhostClippingModule` around a DDP model: the hooks sit
    on the layers inside ``ddp.module``; ``forward`` is DDP's forward, under
    ``ddp.no_sync()`` (see the module docstring: the optimizer reduces)."""

    def __init__(self, ddp: DistributedDataParallel, **kwargs):
        if not isinstance(ddp, DistributedDataParallel):
            raise TypeError(f"DistributedGhostClippingModule wraps a DistributedDataParallel model, "
                            f"got {type(ddp).__name__}")
        super().__init__(ddp, **kwargs)

    @property
    def ddp(self) -> DistributedDataParallel:
        return self._module  # a property: a second attribute would register DDP twice (state_dict)

    def forward(self, *args, **kwargs):
        with self.ddp.no_sync():
            return self._module(*args, **kwargs)

    def _capture(self, name):
        record = super()._capture(name)

        def hook(module, inputs, output):
            if (self.hooks_enabled and module.training and torch.is_grad_enabled()
                    and self.ddp.require_backward_grad_sync):
                raise RuntimeError(
                    "the DDP model was called directly in training mode: its reducer would all-reduce "
                    "every gradient at the backward, on top of DistributedGhostDPOptimizer's one "
                    "all_reduce per step (the sum of DDP's average is still the right sum, at twice "
                    "the traffic); call the module returned by make_private (its forward runs DDP's "
                    "under no_sync)")
            return record(module, inputs, output)
        return hook


class DistributedGhostDPOptimizer(_ghost.GhostDPOptimizer):
    """:class:`fastadv.dp.GhostDPOptimizer` across DDP ranks: ``p.grad`` holds
    this rank's clipped sum (DDP did not reduce it); at a step that is not
    skipped, rank 0 alone adds the noise, every rank scales by
    ``expected_batch_size * accumulated_iterations * world_size`` (``"mean"``;
    ``expected_batch_size`` is the per-rank batch, as Opacus passes it) and one
    ``all_reduce(SUM)`` of a flat buffer gives every rank the same private
    gradient, before the step hook (the accountant) and the inner step."""

    def __init__(self, *args, process_group=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.process_group = process_group
        self.rank = dist.get_rank(process_group)
        self.world_size = dist.get_world_size(process_group)

    def _noise_std(self) -> float:
        return super()._noise_std() if self.rank == 0 else 0.0

    def add_noise(self, divisor=None):
        params = self.params
        if divisor is not None:
            divisor = divisor * self.world_size
        for group in _by_dtype(params):
            flat = torch.empty(sum(p.numel() for p in group), dtype=group[0].dtype, device=group[0].device)
            views = [v.view_as(p) for p, v in zip(group, flat.split([p.numel() for p in group]))]
            _ops.add_noise([p.summed_grad for p in group], self._noise_std(), expected_batch_size=divisor,
                           out=views, generator=self.generator, secure_mode=self.secure_mode,
                           backend=self.backend)
            dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=self.process_group)
            for p, v in zip(group, views):
                p.grad = v


def _by_dtype_index(tensors) -> list[list[int]]:
    """Indices of ``tensors`` grouped by (dtype, device), in order."""
    groups: dict = {}
    for i, t in enumerate(tensors):
        groups.setdefault((t.dtype, t.device), []).append(i)
    return list(groups.values())


def _by_dtype(params) -> list[list[torch.Tensor]]:
    """The parameters grouped by (dtype, device), in order: one flat buffer each."""
    groups: dict = {}
    for p in params:
        groups.setdefault((p.dtype, p.device), []).append(p)
    return list(groups.values())


# ---------------------------------------------------------------- FSDP2 (fully_shard), ghost and bk modes

class FSDPGhostClippingModule(_ghost.GhostClippingModule):
    """Ghost clipping and book-keeping on a ``fully_shard``-ed model (FSDP2).

    FSDP2 shards the parameters, not the activations: each layer's input and
    output gradient are full, so the per-sample norms are exact -- provided the
    autograd graph's parameters can be named.  Those are the all-gathered
    (unsharded) parameters the forward used; after a block's forward FSDP2
    swaps its modules back to the DTensor shards.  :meth:`dp_backward`
    therefore unshards every FSDP module first (one all-gather each) and
    keeps them unsharded through the norm backward
    (``set_reshard_after_backward(False)``, set back to FSDP2's default
    ``True`` afterwards): the modules hold the graph's leaves again and the
    parent's graph walk, use check and norms apply unchanged, also for the
    norms taken after that backward returns (bk's; ghost's deepest layers,
    whose output gradients the backward hands back).  ``"ghost"``: the
    modules reshard after the norms; the second backward is FSDP2's own: it
    reduce-scatters the clip-weighted gradient, averaged over the ranks, into
    the sharded ``p.grad``.  ``"bk"``: :meth:`write_clipped` sums the full
    clipped gradients itself, then reshards.

    Under a ``MixedPrecisionPolicy(param_dtype=bf16 | fp16)`` the unsharded
    parameters, activations and output gradients are in ``param_dtype``: the
    norms accumulate them in fp32 (the norm kernels' bf16 / fp16 inputs), the
    clip factors are fp32.  ``"ghost"``: the second backward's gradient is in
    ``param_dtype`` (the factors enter it rounded to the loss's dtype, as any
    backward of a low-precision graph) and FSDP2 reduce-scatters it in its
    ``reduce_dtype`` into the fp32 shard gradient.  ``"bk"``: the clipped sums
    stay fp32 (not rounded to ``param_dtype``), are divided by ``world_size``
    in fp32 (so no partial sum of an fp16 all_reduce exceeds the largest
    rank's own sum) and all-reduced in the dtype FSDP2's reduce-scatter would
    use (the policy's ``reduce_dtype``, else ``param_dtype``: the traffic the
    user chose), then written into the fp32 shard gradient.  The noise is the
    fp32 path's: added to the fp32 shards by :class:`FSDPGhostDPOptimizer`."""

    _wraps_shards = True

    def __init__(self, m: nn.Module, *, mode: str = "ghost", **kwargs):
        super().__init__(m, mode=mode, **kwargs)
        self._shards = dict(m.named_parameters())  # FSDP2's sharded parameters (persistent DTensors)
        self._reduce_dtypes = _fsdp_reduce_dtypes(m)
        self._unsharded: dict = {}

    def dp_backward(self, loss_per_sample, max_grad_norm):
        from torch.distributed.fsdp import FSDPModule

        self._saved_reshard = {}
        for sub in self._module.modules():
            if isinstance(sub, FSDPModule):
                self._saved_reshard[sub] = _reshard_after_backward(sub)
                sub.unshard()
                # the norms (bk: all of them; ghost: the deepest layers', whose output gradients the
                # backward hands back) are taken after the backward: keep the leaves until then
                sub.set_reshard_after_backward(False, recurse=False)
        try:
            for r in self._records:  # a layer still holding a shard would be invisible to the graph walk
                for name, p in r.module.named_parameters(recurse=False):
                    if _dist.is_sharded(p):
                        raise NotImplementedError(f"parameter {name!r} of layer {r.name!r} is still sharded "
                                                  f"after unshard(): it is not managed by fully_shard")
            self._unsharded = dict(self._module.named_parameters())
            self._names = {id(p): n for n, p in self._unsharded.items()}
            out = super().dp_backward(loss_per_sample, max_grad_norm)
        except BaseException:
            self._reshard()  # a refusal must not leave full parameters the next forward would reuse
            raise
        if self.mode == "ghost":  # bk reshards in write_clipped, after its sums
            self._reshard()
        return out

    def _reshard(self) -> None:
        """Every fully_shard module back to the reshard-after-backward setting it
        had before :meth:`dp_backward` (FSDP2's default ``True``) and resharded now."""
        for sub, flag in getattr(self, "_saved_reshard", {}).items():
            sub.set_reshard_after_backward(flag, recurse=False)
            sub.reshard()
        self._saved_reshard = {}

    def write_clipped(self, factors, mats, vecs) -> None:
        """Book-keeping: this rank's full clipped sums (fp32, see the class
        docstring), divided by ``world_size`` (the average FSDP2's reduce-scatter
        gives in ghost mode, which the optimizer undoes), are summed over the
        ranks with one all_reduce per reduce dtype (of the full size: twice a
        reduce-scatter's traffic); each rank adds its shard to the sharded
        ``p.grad``, then the modules reshard."""
        from torch.distributed.fsdp import FSDPModule
        from torch.distributed.tensor import DTensor

        sums = self._clipped_sums(factors, mats, vecs)
        names = [n for n, p in self._shards.items() if p.requires_grad]
        world = dist.get_world_size()
        full = []
        for n in names:
            u = self._unsharded[n]
            g = sums.get(u)
            g = torch.zeros(u.shape, dtype=factors.dtype, device=u.device) if g is None else g
            full.append((g / world).to(self._reduce_dtypes.get(n) or u.dtype))  # FSDP2: reduce_dtype or grad's
        for idx in _by_dtype_index(full):
            flat = torch.cat([full[i].reshape(-1) for i in idx])
            dist.all_reduce(flat, op=dist.ReduceOp.SUM)
            for i, part in zip(idx, flat.split([full[i].numel() for i in idx])):
                shard = self._shards[names[i]]
                local = _dist.shard_of(part.view(full[i].shape), shard).to(shard.dtype)
                if shard.grad is None:
                    shard.grad = DTensor.from_local(local.contiguous(), shard.device_mesh, shard.placements,
                                                    shape=shard.shape, stride=shard.stride())
                else:
                    _dist.local(shard.grad).add_(local)
        self._reshard()


def _reshard_after_backward(sub) -> bool:
    """An FSDP2 module's reshard-after-backward setting (private state; FSDP2's
    default ``True`` where this torch does not expose it)."""
    groups = getattr(sub._get_fsdp_state(), "_fsdp_param_groups", None) or []
    return all(getattr(g, "reshard_after_backward", True) for g in groups)


def _fsdp_reduce_dtypes(m: nn.Module) -> dict:
    """Parameter name -> the ``MixedPrecisionPolicy.reduce_dtype`` of the
    innermost ``fully_shard`` group holding it (None: FSDP2 reduces in the
    gradient's dtype, i.e. ``param_dtype``), which bk's all_reduce uses as
    FSDP2's reduce-scatter does in ghost mode."""
    from torch.distributed.fsdp import FSDPModule, fully_shard

    names = {id(p): n for n, p in m.named_parameters()}
    out: dict = {}
    for sub in m.modules():  # pre-order: an inner group's policy overrides its parent's
        if not isinstance(sub, FSDPModule):
            continue
        policy = getattr(fully_shard.state(sub), "_mp_policy", None)
        if policy is None:  # FSDP2's internals moved: the reduce dtype would be a guess
            raise NotImplementedError(f"cannot read the MixedPrecisionPolicy of {type(sub).__name__} from "
                                      f"this torch's FSDP2 state (torch {torch.__version__})")
        for p in sub.parameters():
            if id(p) in names:
                out[names[id(p)]] = policy.reduce_dtype
    return out


class FSDPGhostDPOptimizer(_ghost.GhostDPOptimizer):
    """The ghost optimizer on FSDP2 shards: ``p.grad`` is this rank's shard of
    the ranks' *average* clipped sum (FSDP2's reduce-scatter); the step makes
    it the shard of ``(sum + N(0, (sigma C)^2)) / (expected_batch_size *
    world_size)`` (``"mean"``; ``expected_batch_size`` per rank, as Opacus).
    The noise: every rank draws the whole tensors' noise from the generator
    (the single-process draws, fastadv's noise op on ``backend``) and keeps
    its shard's part, so each element gets one draw -- the noise is added
    once, not once per rank.  Costs the full-size noise tensors for the
    step (the parameters are full then anyway, see FSDPGhostClippingModule);
    no collective."""

    _refuses_shards = False  # nothing is clipped here: the norms came from full activations

    def __init__(self, *args, process_group=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.world_size = dist.get_world_size(process_group)

    def add_noise(self, divisor=None):
        params = self.params
        std = self._noise_std()
        noise = None
        if std:
            full = [torch.zeros(p.shape, dtype=p.dtype, device=_dist.local(p).device) for p in params]
            noise = _ops.add_noise(full, std, generator=self.generator, secure_mode=self.secure_mode,
                                   backend=self.backend)
        for i, p in enumerate(params):
            g = _dist.local(p.summed_grad) * self.world_size  # FSDP2 averaged the ranks' clipped sums
            if noise is not None:
                g += _dist.shard_of(noise[i], p)
            if divisor is not None:
                g /= divisor * self.world_size
            p.grad = p.summed_grad.clone()
            _dist.local(p.grad).copy_(g)
