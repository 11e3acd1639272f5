"""ctypes launchers of the multi-tensor plumbing in ``csrc/multi_tensor.cu``:
the chunk reductions (sums of squares), their per-tensor and global
finalizes, and the multi-tensor copy.  Same functions and arguments as
:mod:`fastadv.kernels.triton.multi_tensor`; the tables are the shared
:class:`fastadv.kernels.host.TensorTable`."""
from __future__ import annotations

import torch

from .. import count_launch
from . import _c_int, _c_int64, _c_void_p, _call, _stream, declare, dtype_code

# fastadv_mt_sumsq modes: AWP (sum g^2 and sum w^2), SAM (sum g^2), ASAM (sum (|w| g)^2)
MODE_AWP, MODE_GRAD, MODE_ADAPTIVE = 0, 1, 2

declare({
    "fastadv_mt_sumsq": (_c_int, [_c_void_p, _c_int, _c_int64, _c_int64, _c_int64, _c_int, _c_int,
                                  _c_void_p, _c_void_p]),
    "fastadv_mt_norms": (_c_int, [_c_void_p, _c_int, _c_int64, _c_int64, _c_void_p, _c_int, _c_void_p,
                                  _c_void_p]),
    "fastadv_mt_global_norm": (_c_int, [_c_void_p, _c_int64, _c_void_p, _c_void_p]),
    "fastadv_mt_copy": (_c_int, [_c_void_p, _c_int, _c_int64, _c_int64, _c_int64, _c_int, _c_int, _c_int, _c_int,
                                 _c_void_p]),
})


def where(table):
    """The device guard of a table's launches (refusing a table on another device type)."""
    if table.device.type != "cuda":
        raise ValueError(f"the cuda backend needs CUDA tensors; got tensors on {table.device}")
    return torch.cuda.device(table.device)


def f32_ptr(t: torch.Tensor, what: str) -> int:
    if t.dtype != torch.float32 or not t.is_contiguous() or t.device.type != "cuda":
        raise ValueError(f"{what} must be a contiguous float32 CUDA tensor")
    return t.data_ptr()


def sumsq(table, dtype, partials: torch.Tensor, mode: int) -> None:
    """One fp32 partial per chunk (``[2, N]`` for :data:`MODE_AWP`)."""
    if table.n_chunks == 0:
        return
    with where(table):
        _call("fastadv_mt_sumsq", table.data.data_ptr(), table.n_lists, table.n_tensors, table.n_chunks,
              table.chunk, dtype_code(dtype), mode, f32_ptr(partials, "partials"), _stream(table.data))
    count_launch("cuda.mt_sumsq")


def per_tensor_norms(table, partials: torch.Tensor, arrays: int, out: torch.Tensor) -> None:
    """``out[a*T + t] = sqrt(sum of tensor t's partials in array a)``."""
    if table.n_tensors == 0:
        return
    with where(table):
        _call("fastadv_mt_norms", table.data.data_ptr(), table.n_lists, table.n_tensors, table.n_chunks,
              f32_ptr(partials, "partials"), arrays, f32_ptr(out, "out"), _stream(table.data))
    count_launch("cuda.mt_norms")


def global_norm(partials: torch.Tensor, n: int, out: torch.Tensor) -> None:
    """``out[0] = sqrt(sum(partials[:n]))``, fixed order."""
    with torch.cuda.device(partials.device):
        _call("fastadv_mt_global_norm", f32_ptr(partials, "partials"), n, f32_ptr(out, "out"),
              _stream(partials))
    count_launch("cuda.mt_global_norm")


def copy(table, dst: int, src: int, dst_dtype, src_dtype) -> None:
    """List ``dst`` <- list ``src`` of ``table``; bit-exact when the dtypes match."""
    if table.n_chunks == 0:
        return
    with where(table):
        _call("fastadv_mt_copy", table.data.data_ptr(), table.n_lists, table.n_tensors, table.n_chunks,
              table.chunk, dst, dtype_code(dst_dtype), src, dtype_code(src_dtype), _stream(table.data))
    count_launch("cuda.mt_copy")
