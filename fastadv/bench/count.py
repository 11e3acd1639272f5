"""What one call costs, counted exactly on any machine (no GPU needed).

* :func:`count` -- launches, host syncs and bytes moved: aten ops through a
  ``TorchDispatchMode``, fastadv kernels through
  :data:`fastadv.kernels.LAUNCHES` and the op's stated design bytes.
* :func:`count_profiled` -- launches and syncs seen by the PyTorch profiler,
  for ``torch.compile`` output (the dispatch mode sees only the eager ops it
  replaces).

Units: ``bytes`` bytes.
"""
from __future__ import annotations

import collections
import math
import os
import sys
from typing import Any, Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


def tensor_bytes(t: torch.Tensor) -> int:
    """Bytes spanned by the elements of ``t``: numel * element_size, with
    broadcast (stride 0) dimensions counted once."""
    if t.numel() == 0:
        return 0
    n = 1
    for size, stride in zip(t.shape, t.stride()):
        if stride != 0:
            n *= size
    return n * t.element_size()


# Ops that launch nothing: allocation, metadata, aliasing.
NO_KERNEL = frozenset({
    "empty", "empty_strided", "new_empty", "new_empty_strided", "empty_like", "empty_permuted",
    "resize_", "resize_as_", "set_", "lift_fresh", "detach", "detach_", "alias", "record_stream",
    "sym_size", "sym_stride", "sym_numel", "sym_storage_offset", "size", "stride", "numel", "dim",
    "is_same_size", "_has_compatible_shallow_copy_type", "is_pinned", "_version",
    "is_contiguous", "is_strides_like_format", "is_non_overlapping_and_dense", "_reshape_alias",
})
# Host syncs that launch no kernel (a device-to-host read of a scalar).
SYNC_ONLY = frozenset({"_local_scalar_dense", "item", "is_nonzero"})
# Ops that launch a kernel and then read its result on the host.
_SYNC_AND_LAUNCH = frozenset({"equal"})
# In-place ops whose mutated argument is only written, never read.
_WRITE_ONLY = frozenset({
    "copy_", "fill_", "zero_", "normal_", "uniform_", "random_", "bernoulli_", "exponential_",
    "geometric_", "cauchy_", "log_normal_",
})
# Gathers: the source (first tensor argument) is read only where indexed.
_GATHER = frozenset({"index_select", "index", "embedding", "gather", "take", "_unsafe_index"})
# Scatters: self is written (and read when accumulating) only where indexed.
_SCATTER = frozenset({
    "index_put_", "_index_put_impl_", "index_add_", "index_copy_", "index_fill_", "scatter_",
    "scatter_add_", "scatter_reduce_", "index_reduce_", "masked_scatter_", "put_",
})
_SCATTER_ACCUMULATES = frozenset({"index_add_", "scatter_add_", "scatter_reduce_", "index_reduce_"})
_INDEX_PUT = ("index_put_", "_index_put_impl_")

_INTERPRETER_FILE = os.path.join("triton", "runtime", "interpreter.py")
_interp_codes: dict = {}


def _inside_triton_interpreter() -> bool:
    """True when the current aten op is issued by the Triton interpreter (it
    moves kernel arguments to and from host copies with aten ops; those are not
    the kernel's work and are not counted)."""
    frame = sys._getframe(2)
    while frame is not None:
        code = frame.f_code
        hit = _interp_codes.get(code)
        if hit is None:
            hit = _interp_codes[code] = code.co_filename.endswith(_INTERPRETER_FILE)
        if hit:
            return True
        frame = frame.f_back
    return False


def _is_view(func) -> bool:
    if getattr(func, "is_view", False):
        return True
    rets = func._schema.returns
    return bool(rets) and all(r.alias_info is not None and not r.alias_info.is_write for r in rets)


def _bound_args(func, args, kwargs):
    """(schema argument, value) pairs."""
    out = []
    for i, arg in enumerate(func._schema.arguments):
        if i < len(args) and not arg.kwarg_only:
            out.append((arg, args[i]))
        elif arg.name in kwargs:
            out.append((arg, kwargs[arg.name]))
    return out


def _has_mask(indices) -> bool:
    return any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in indices or [])


def _index_put_elements(self_t: torch.Tensor, indices) -> int:
    shapes, covered = [], 0
    rest = 1
    for d, idx in enumerate(indices):
        covered = d + 1
        if idx is None:
            rest *= self_t.shape[d]
        elif idx.dtype in (torch.bool, torch.uint8):
            shapes.append((int(idx.count_nonzero()),))
            covered = d + idx.dim()
        else:
            shapes.append(tuple(idx.shape))
    n = math.prod(torch.broadcast_shapes(*shapes)) if shapes else 1
    return n * rest * math.prod(self_t.shape[covered:])


def _scatter_elements(name: str, bound: dict, self_t: torch.Tensor) -> int:
    if name in _INDEX_PUT:
        return _index_put_elements(self_t, bound.get("indices") or [])
    if name == "index_fill_":
        dim = bound.get("dim", 0)
        return bound["index"].numel() * (self_t.numel() // max(1, self_t.size(dim)))
    if name == "masked_scatter_":
        return int(bound["mask"].expand_as(self_t).count_nonzero())
    for key in ("source", "src"):
        if isinstance(bound.get(key), torch.Tensor):
            return bound[key].numel()
    return bound["index"].numel()


def _syncs_host(func, name: str, bound_pairs, bound: dict, out) -> bool:
    """Whether an op that launches a kernel also waits for the device."""
    if torch.Tag.dynamic_output_shape in func.tags:
        if name == "index":  # only boolean masks need the size on the host
            return _has_mask(bound.get("indices"))
        if name == "repeat_interleave":
            return bound.get("output_size") is None
        return True
    if name in _INDEX_PUT and _has_mask(bound.get("indices")):
        return True  # boolean indices are turned into positions on the host
    if name in ("_to_copy", "copy_") and isinstance(out, torch.Tensor) and out.device.type == "cpu":
        inputs = [v for _, v in bound_pairs]
        from_cuda = any(isinstance(t, torch.Tensor) and t.device.type == "cuda" for t in tree_leaves(inputs))
        return from_cuda and not bound.get("non_blocking", False)  # a blocking device-to-host copy
    return name in _SYNC_AND_LAUNCH


def _key(t: torch.Tensor):
    return (t.device, t.data_ptr() if t.numel() else id(t), tuple(t.shape), tuple(t.stride()), t.dtype)


def _read_bytes(name: str, bound_pairs, mutated_keys: set, out) -> int:
    """Bytes of the tensor operands read (each distinct tensor once; the
    mutated ones are counted with the writes)."""
    seen: set = set()
    total = 0
    first_tensor = next((v for _, v in bound_pairs if isinstance(v, torch.Tensor)), None)
    for _, value in bound_pairs:
        for t in tree_leaves(value):
            if not isinstance(t, torch.Tensor) or _key(t) in seen:
                continue
            seen.add(_key(t))
            if _key(t) in mutated_keys:
                continue
            if name in _GATHER and t is first_tensor and isinstance(out, torch.Tensor):
                total += min(tensor_bytes(t), out.numel() * t.element_size())
            else:
                total += tensor_bytes(t)
    return total


def _written_bytes(name: str, bound_pairs, bound: dict, mutated: list) -> int:
    """In-place and out= arguments: written once, and read too unless the op
    only writes them; scatters count the indexed part."""
    total = 0
    for t in mutated:
        if name in _SCATTER and t is bound.get("self"):
            touched = _scatter_elements(name, bound, t) * t.element_size()
            accumulate = name in _SCATTER_ACCUMULATES or bool(bound.get("accumulate", False))
            total += touched * (2 if accumulate else 1)
            continue
        arg_is_out = any(a.kwarg_only and v is t for a, v in bound_pairs)
        read = name not in _WRITE_ONLY and not arg_is_out
        total += tensor_bytes(t) * (2 if read else 1)
    return total


def _op_bytes(name: str, bound_pairs, bound: dict, out) -> int:
    """Bytes one aten op moves: operands read + results written."""
    mutated = [t for arg, value in bound_pairs if arg.alias_info is not None and arg.alias_info.is_write
               for t in tree_leaves(value) if isinstance(t, torch.Tensor)]
    mutated_keys = {_key(t) for t in mutated}
    fresh = sum(tensor_bytes(t) for t in tree_leaves(out)
                if isinstance(t, torch.Tensor) and _key(t) not in mutated_keys)
    return _read_bytes(name, bound_pairs, mutated_keys, out) + _written_bytes(name, bound_pairs, bound, mutated) \
        + fresh


def _fastadv_impl(func) -> Callable | None:
    """The Python implementation of a ``torch.ops.fastadv`` op, or None.

    Called through the dispatcher (``torch.ops.fastadv.<op>``, the path of
    ``torch.compile`` and of autograd), a registered op reaches the counting
    mode as one opaque op whose implementation runs below it, out of sight;
    running the implementation under the mode instead counts what the op
    really launches and moves, as in the eager path that calls it directly."""
    if getattr(func, "namespace", None) != "fastadv":
        return None
    from torch._library.custom_ops import OPDEFS

    opdef = OPDEFS.get(func._schema.name)
    return getattr(opdef, "_init_fn", None)


class _CountingMode(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.launches = 0
        self.syncs = 0
        self.bytes = 0
        self.ops: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        impl = _fastadv_impl(func)
        if impl is not None:
            with self:  # the mode is off inside its own handler: back on for the implementation
                return impl(*args, **kwargs)
        out = func(*args, **kwargs)
        if not _inside_triton_interpreter():
            self._record(func, args, kwargs, out)
        return out

    def _record(self, func, args, kwargs, out):
        name = func._overloadpacket.__name__
        if name in SYNC_ONLY:
            self.syncs += 1
            self.ops[name] += 1
            return
        if name in NO_KERNEL or _is_view(func) or torch.Tag.inplace_view in func.tags:
            return
        bound_pairs = _bound_args(func, args, kwargs)
        bound = {a.name: v for a, v in bound_pairs}
        self.launches += 1
        self.syncs += int(_syncs_host(func, name, bound_pairs, bound, out))
        self.ops[name] += 1
        self.bytes += _op_bytes(name, bound_pairs, bound, out)


def _launch_diff(before: collections.Counter) -> collections.Counter:
    """fastadv kernel launches since ``before``.  ``torch.*`` entries are
    markers of the torch backend (which ran aten ops, counted as such), not
    kernels, and are left out."""
    from fastadv.kernels import LAUNCHES

    return collections.Counter({k: v - before.get(k, 0) for k, v in LAUNCHES.items()
                                if v - before.get(k, 0) > 0 and not k.startswith("torch.")})


def count(fn: Callable[[], Any], design_bytes: int | Callable[[collections.Counter], int] | None = None
          ) -> dict:
    """Run ``fn()`` once and count what it costs.

    Returns

    * ``launches``: aten ops that launch a kernel (views, metadata and
      allocation ops excluded) + fastadv kernel launches
      (:data:`fastadv.kernels.LAUNCHES`);
    * ``syncs``: host syncs: ``aten::_local_scalar_dense`` (``.item()``,
      ``bool(t)``, ...) and ops that need a device result on the host
      (``nonzero``, boolean indexing, ``equal``, a device-to-host copy);
    * ``bytes``: for aten ops, bytes of tensor operands read + results written
      (an in-place result is written once, and read too unless the op only
      writes it, like ``copy_``; gathers and scatters count the indexed part).
      When fastadv kernels ran, ``bytes`` is ``design_bytes`` instead: the bytes
      the op's design moves per call, kernels and the op's helper aten ops
      together (an int, or a function of the launch counter); None if not given;
    * the breakdown ``aten_launches``, ``kernel_launches``, ``aten_bytes``,
      ``design_bytes``, ``ops`` (aten op -> calls), ``kernels`` (kernel -> launches).

    Aten ops the Triton interpreter issues to stage kernel arguments
    (``TRITON_INTERPRET=1``) are not counted: they are not the kernel's work.
    """
    from fastadv.kernels import LAUNCHES

    before = collections.Counter(LAUNCHES)
    mode = _CountingMode()
    with mode:
        fn()
    kernels = _launch_diff(before)
    n_kernels = sum(kernels.values())
    if callable(design_bytes):
        design_bytes = design_bytes(kernels)
    if n_kernels == 0:
        total = mode.bytes
    else:
        total = None if design_bytes is None else int(design_bytes)
    return {
        "launches": mode.launches + n_kernels,
        "syncs": mode.syncs,
        "bytes": total,
        "aten_launches": mode.launches,
        "kernel_launches": n_kernels,
        "aten_bytes": mode.bytes,
        "design_bytes": design_bytes,
        "ops": dict(mode.ops),
        "kernels": dict(kernels),
    }


def count_profiled(fn: Callable[[], Any], device) -> dict:
    """Launches and syncs of ``fn()`` seen by the PyTorch profiler, for code the
    dispatch mode cannot see into (``torch.compile`` output).  On CUDA: device
    kernels and memsets are launches; ``cudaStreamSynchronize`` /
    ``cudaDeviceSynchronize`` / ``cudaEventSynchronize`` calls are syncs.  On
    CPU launches are not defined (None) and syncs are ``_local_scalar_dense``
    calls.  Bytes are not counted (None).  Device-to-device copies (``clone``)
    count as launches; device-to-host / host-to-device copies do not."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    device = torch.device(device)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    with profile(activities=acts) as prof:
        fn()
    events = prof.events()
    if device.type == "cuda":
        launches = sum(1 for e in events if e.device_type == DeviceType.CUDA
                       and not e.name.startswith(("Memcpy DtoH", "Memcpy HtoD")))
        syncs = sum(1 for e in events if e.name in ("cudaStreamSynchronize", "cudaDeviceSynchronize",
                                                    "cudaEventSynchronize"))
    else:
        launches = None
        syncs = sum(1 for e in events if e.name == "aten::_local_scalar_dense")
    return {"launches": launches, "syncs": syncs, "bytes": None}

