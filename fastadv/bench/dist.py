"""``dist_step``: what the distributed path costs on a single-rank process group.

Issue 12: on one device with a 1-rank process group, fastadv's FSDP2 path
should cost at most one small collective per call more than the plain path.
Each case runs one op call side by side in one process:

* FGM: ``attack()`` + ``restore()`` on an embedding table (dense gradient);
* AWP: ``_save()`` + one ``_attack_step()`` + ``_restore()`` over a tiny
  BERT's parameters (the ``*weight*`` ones perturbed);
* SAM: ``first_step()`` + ``second_step()`` over the same parameters (the
  base optimizer does nothing, as in :mod:`fastadv.bench.sam`),

with two implementations per fastadv backend usable here: ``<backend>``, the
plain model, and ``<backend> fsdp1``, the same model under FSDP2's
``fully_shard`` on a 1-rank process group (gloo on CPU, nccl on CUDA, over a
``FileStore`` in a temporary folder: no port), created in ``setup`` and
destroyed in ``teardown``.  The gradients are the same values in both (set
on the shards as DTensors), so both rows check against the same reference
run (fp32: rtol 1e-5; bf16: two ulps) and restore bit-exactly.

Extra columns: ``all_reduces`` and ``all_reduce_bytes`` (one call of the
step with ``torch.distributed.all_reduce`` wrapped; fastadv looks it up at
each call), ``tensors``; launches and syncs are the usual counted columns
(on the fsdp rows the collective is one of the launches), bytes too on the
torch backend (the kernel backends' rows leave them empty: the op's own
bench row has its design bytes), ``ms`` GPU only, and ``vs_plain`` (the fsdp
row's ms over the plain row's, :func:`fastadv.bench.report.add_derived`).
Both rows of a fastadv backend must make no host sync (``sync_free``: the
GPU check runs them under ``torch.cuda.set_sync_debug_mode("error")``).  What one
call all-reduces (``fastadv/ops``): FGM one fp32 ``||g||^2`` per table (4
bytes a tensor), AWP ``||g||`` and ``||w||`` per perturbed tensor (8 bytes a
tensor), SAM the square of its one global norm (4 bytes).

Without torch.distributed or FSDP2, or inside a process group that is
already initialised (someone else's), the fsdp rows are skipped with the reason.
"""
from __future__ import annotations

import collections
import contextlib
import os
import tempfile
from dataclasses import dataclass

import torch

from . import awp as awp_bench, fgm as fgm_bench, sam as sam_bench
from .case import CaseCache, Impl, Prepared, Skip, real_sizes
from .check import SHORT, close, interpreted, not_restored, skip_unsupported, usable_backends

OPS = ("fgm", "awp", "sam")


@dataclass(frozen=True)
class Case:
    op: str             # "fgm", "awp" or "sam"
    dtype: torch.dtype
    big: bool           # real sizes (BERT-base) or the tiny CPU stand-ins

    @property
    def name(self) -> str:
        what = {"fgm": "attack+restore", "awp": "save+step+restore", "sam": "first+second step"}[self.op]
        return f"{self.op} {what} {self.size} {SHORT[self.dtype]}"

    @property
    def size(self) -> str:
        return _model(self.big)[0]


def _model(big: bool) -> tuple:
    return awp_bench.MODELS_FULL[0] if big else awp_bench.MODELS_SMALL[0]


def cases(device, full: bool | None = None) -> list[Case]:
    """Each op in fp32 and bf16; BERT-base shapes on CUDA or with ``full``, tiny ones on CPU."""
    big = real_sizes(device, full)
    return [Case(op, dt, big) for op in OPS for dt in (torch.float32, torch.bfloat16)]


class Data:
    """Weights, gradients and the reference's result of one case, from the op's
    own bench data (:mod:`fastadv.bench.fgm`, ``awp``, ``sam``): ``w0`` and
    ``g`` by parameter name, ``expected`` (after the attack) of ``perturbed``."""

    def __init__(self, case: Case, device):
        if case.op == "fgm":
            _, vocab, dim, *_ = _model(case.big)
            d = fgm_bench.CaseData(fgm_bench.Case(vocab, dim, case.dtype, None), device)
            name = "word_embeddings.weight"
            self.w0, self.g, self.expected = {name: d.w0}, {name: d.g0}, {name: d.expected}
        else:
            module = awp_bench if case.op == "awp" else sam_bench
            d = module.Data(module.Case(_model(case.big), case.dtype), device)
            self.w0, self.g = d.w0, d.g
            self.expected = d.expected
        self.perturbed = list(self.expected)

    def model(self) -> torch.nn.Module:
        if len(self.w0) == 1:  # FGM: the table as an nn.Embedding
            return fgm_bench.Model(next(iter(self.w0.values())).clone())
        return awp_bench.ShapeModel({n: v.clone() for n, v in self.w0.items()})


_data = CaseCache(Data)


def release() -> None:
    _data.clear()


# ---- the 1-rank process group ------------------------------------------------------------------

class OneRank:
    """A 1-rank process group (gloo on CPU, nccl on CUDA) over a FileStore in a
    temporary folder, and its device mesh; :meth:`close` destroys it.  A
    :class:`Skip` where torch.distributed, the backend or FSDP2 is missing,
    or a process group is already initialised (not ours to replace)."""

    def __init__(self, device):
        device = torch.device(device)
        if not torch.distributed.is_available():
            raise Skip("torch.distributed is not available in this torch build")
        import torch.distributed as dist
        try:
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import fully_shard
        except ImportError as exc:
            raise Skip(f"FSDP2 (torch.distributed.fsdp.fully_shard) is not available: {exc}") from exc
        if dist.is_initialized():
            raise Skip("a process group is already initialised in this process: the case makes its own "
                       "1-rank group")
        backend = "nccl" if device.type == "cuda" else "gloo"
        if not dist.is_backend_available(backend):
            raise Skip(f"the {backend} backend of torch.distributed is not available")
        self.fully_shard = fully_shard
        self._dir = tempfile.TemporaryDirectory(prefix="fastadv-dist-")
        store = dist.FileStore(os.path.join(self._dir.name, "store"), 1)
        kw = {}
        if device.type == "cuda":  # nccl binds the group to one device, with its index
            device = torch.device("cuda", torch.cuda.current_device() if device.index is None else device.index)
            torch.cuda.set_device(device)
            kw["device_id"] = device
        try:
            dist.init_process_group(backend, store=store, rank=0, world_size=1, **kw)
            self.mesh = init_device_mesh(device.type, (1,))
        except Exception:
            self.close()
            raise

    def close(self) -> None:
        import torch.distributed as dist
        if dist.is_initialized():
            dist.destroy_process_group()
        self._dir.cleanup()


@contextlib.contextmanager
def counting_all_reduce():
    """Count ``torch.distributed.all_reduce`` calls and the bytes of their tensors
    (fastadv's ``_dist.all_reduce_sum_`` looks it up at each call)."""
    import torch.distributed as dist
    real = dist.all_reduce
    seen = collections.Counter()

    def counted(tensor, *args, **kwargs):
        seen["calls"] += 1
        seen["bytes"] += tensor.numel() * tensor.element_size()
        return real(tensor, *args, **kwargs)

    dist.all_reduce = counted
    try:
        yield seen
    finally:
        dist.all_reduce = real


def _shard_gradients(model, grads: dict) -> None:
    """Each (sharded) parameter's gradient: the case's values, placed as the parameter is."""
    from torch.distributed.tensor import distribute_tensor
    for n, p in model.named_parameters():
        p.grad = distribute_tensor(grads[n].clone(), p.device_mesh, p.placements)


# ---- the implementations -----------------------------------------------------------------------

def _attacker(case: Case, model, backend: str):
    """(attack, restore) of one op call on ``model``."""
    if case.op == "fgm":
        from fastadv import FGM
        f = FGM(model, fgm_bench.EMB_NAME, fgm_bench.EPSILON, backend=backend, row_sparse=False)
        return f.attack, f.restore
    if case.op == "awp":
        from fastadv.adversarial.awp import AWP
        a = AWP(model, None, adv_lr=awp_bench.ADV_LR, adv_eps=awp_bench.ADV_EPS, backend=backend)

        def attack():
            a._save()
            a._attack_step()
        return attack, a._restore
    from fastadv import SAM
    s = SAM(model.parameters(), sam_bench.NoStep, rho=sam_bench.RHO, backend=backend)
    return s.first_step, s.second_step


def _check(data: Data, model, attack, restore) -> str | None:
    """None if the attack gives the reference's weights and the restore the
    original ones bit-exactly, in place (the local shards: on one rank, the
    whole tensors)."""
    from fastadv.ops._dist import local

    named = [(n, local(p.detach())) for n, p in model.named_parameters()]
    ptrs = [t.data_ptr() for _, t in named]
    attack()
    now = dict(named)
    for n in data.perturbed:
        exp = data.expected[n]
        ok, err = close(now[n], exp, exp.float() - data.w0[n].float())
        if not ok:
            restore()
            return f"{n} after the attack differs from the reference: max abs error {err:.3g}"
    restore()
    return not_restored(named, data.w0, ptrs)


def _impl(case: Case, device, backend: str, sharded: bool) -> Impl:
    def setup() -> Prepared:
        skip_unsupported(backend, device, case.dtype)
        data = _data(case, device)
        group = OneRank(device) if sharded else None
        try:
            model = data.model()
            if sharded:
                group.fully_shard(model, mesh=group.mesh)
                _shard_gradients(model, data.g)
            else:
                for n, p in model.named_parameters():
                    p.grad = data.g[n].clone()
            attack, restore = _attacker(case, model, backend)

            def step():
                attack()
                restore()

            with counting_all_reduce() as seen:
                step()
        except BaseException:
            if group is not None:
                group.close()
            raise
        slow = interpreted(backend, device)
        extra = {"tensors": len(data.perturbed), "all_reduces": seen["calls"],
                 "all_reduce_bytes": seen["bytes"], "plain": backend}
        if slow:
            extra["interpreted"] = True
        return Prepared(step=step, check=lambda: _check(data, model, attack, restore), extra=extra,
                        design_bytes=None, timed=not slow, sync_free=True,
                        teardown=group.close if group is not None else None)

    return Impl(f"{backend} fsdp1" if sharded else backend, setup)


def impls(case: Case, device) -> list[Impl]:
    """Per fastadv backend usable on ``device``: the plain model, then FSDP2 on one rank."""
    return [_impl(case, device, b, sharded) for b in usable_backends(device) for sharded in (False, True)]
