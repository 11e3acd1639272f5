"""ctypes launchers of the multi-tensor kernels in ``csrc/awp.cu`` (AWP, SAM,
lerp for EMA / SWA, copy).  Same functions and arguments as
:mod:`fastadv.kernels.triton.awp`; the tables are the shared
:class:`fastadv.kernels.host.TensorTable`."""
from __future__ import annotations

import torch

from .. import count_launch
from . import _c_float, _c_int, _c_int64, _c_void_p, _call, _stream, declare, dtype_code

MODE_AWP, MODE_GRAD, MODE_ADAPTIVE = 0, 1, 2

declare({
    "fastadv_mt_sumsq": (_c_int, [_c_void_p, _c_int, _c_int64, _c_int64, _c_int64, _c_int, _c_int,
                                  _c_void_p, _c_void_p]),
    "fastadv_mt_norms": (_c_int, [_c_void_p, _c_int, _c_int64, _c_int64, _c_void_p, _c_int, _c_void_p,
                                  _c_void_p]),
    "fastadv_mt_global_norm": (_c_int, [_c_void_p, _c_int64, _c_void_p, _c_void_p]),
    "fastadv_awp_update": (_c_int, [_c_void_p, _c_int64, _c_int64, _c_int64, _c_int, _c_void_p, _c_float,
                                    _c_float, _c_int, _c_void_p]),
    "fastadv_sam_update": (_c_int, [_c_void_p, _c_int64, _c_int64, _c_int64, _c_int, _c_void_p, _c_float,
                                    _c_int, _c_void_p]),
    "fastadv_mt_lerp": (_c_int, [_c_void_p, _c_int64, _c_int64, _c_int64, _c_int, _c_int, _c_float, _c_void_p,
                                 _c_void_p]),
    "fastadv_mt_copy": (_c_int, [_c_void_p, _c_int, _c_int64, _c_int64, _c_int64, _c_int, _c_int, _c_int, _c_int,
                                 _c_void_p]),
})


def _where(table):
    if table.device.type != "cuda":
        raise ValueError(f"the cuda backend needs CUDA tensors; got tensors on {table.device}")
    return torch.cuda.device(table.device)


def _f32(t: torch.Tensor, what: str) -> int:
    if t.dtype != torch.float32 or not t.is_contiguous() or t.device.type != "cuda":
        raise ValueError(f"{what} must be a contiguous float32 CUDA tensor")
    return t.data_ptr()


def _sumsq(table, dtype, partials, mode) -> None:
    if table.n_chunks == 0:
        return
    with _where(table):
        _call("fastadv_mt_sumsq", table.data.data_ptr(), table.n_lists, table.n_tensors, table.n_chunks,
              table.chunk, dtype_code(dtype), mode, _f32(partials, "partials"), _stream(table.data))
    count_launch("cuda.mt_sumsq")


def per_tensor_norms(table, partials: torch.Tensor, arrays: int, out: torch.Tensor) -> None:
    """``out[a*T + t] = sqrt(sum of tensor t's partials in array a)``."""
    if table.n_tensors == 0:
        return
    with _where(table):
        _call("fastadv_mt_norms", table.data.data_ptr(), table.n_lists, table.n_tensors, table.n_chunks,
              _f32(partials, "partials"), arrays, _f32(out, "out"), _stream(table.data))
    count_launch("cuda.mt_norms")


def global_norm(partials: torch.Tensor, n: int, out: torch.Tensor) -> None:
    """``out[0] = sqrt(sum(partials[:n]))``, fixed order."""
    with torch.cuda.device(partials.device):
        _call("fastadv_mt_global_norm", _f32(partials, "partials"), n, _f32(out, "out"), _stream(partials))
    count_launch("cuda.mt_global_norm")


def awp_norms(table, dtype, norms: torch.Tensor) -> None:
    """``norms[t] = ||g_t||``, ``norms[T + t] = ||w_t||``."""
    partials = torch.empty(2 * max(table.n_chunks, 1), dtype=torch.float32, device=table.device)
    _sumsq(table, dtype, partials, MODE_AWP)
    per_tensor_norms(table, partials, 2, norms)


def awp_update(table, dtype, norms: torch.Tensor, lr: float, eps: float, write_backup: bool) -> None:
    if table.n_chunks == 0:
        return
    with _where(table):
        _call("fastadv_awp_update", table.data.data_ptr(), table.n_tensors, table.n_chunks, table.chunk,
              dtype_code(dtype), _f32(norms, "norms"), float(lr), float(eps), int(bool(write_backup)),
              _stream(table.data))
    count_launch("cuda.awp_update")


def sam_sumsq(table, dtype, partials: torch.Tensor, adaptive: bool) -> None:
    _sumsq(table, dtype, partials, MODE_ADAPTIVE if adaptive else MODE_GRAD)


def sam_update(table, dtype, norm: torch.Tensor, rho: float, adaptive: bool) -> None:
    if table.n_chunks == 0:
        return
    with _where(table):
        _call("fastadv_sam_update", table.data.data_ptr(), table.n_tensors, table.n_chunks, table.chunk,
              dtype_code(dtype), _f32(norm, "norm"), float(rho), int(bool(adaptive)), _stream(table.data))
    count_launch("cuda.sam_update")


def lerp(table, dtype_a, dtype_x, weight: float, count: torch.Tensor | None = None) -> None:
    if table.n_chunks == 0:
        return
    if count is not None and (count.dtype != torch.int64 or count.device != table.device):
        raise ValueError("count must be an int64 tensor on the tables' device")
    with _where(table):
        _call("fastadv_mt_lerp", table.data.data_ptr(), table.n_tensors, table.n_chunks, table.chunk,
              dtype_code(dtype_a), dtype_code(dtype_x), float(weight),
              None if count is None else count.data_ptr(), _stream(table.data))
    count_launch("cuda.lerp")


def copy(table, dst: int, src: int, dst_dtype, src_dtype) -> None:
    if table.n_chunks == 0:
        return
    with _where(table):
        _call("fastadv_mt_copy", table.data.data_ptr(), table.n_lists, table.n_tensors, table.n_chunks,
              table.chunk, dst, dtype_code(dst_dtype), src, dtype_code(src_dtype), _stream(table.data))
    count_launch("cuda.mt_copy")
