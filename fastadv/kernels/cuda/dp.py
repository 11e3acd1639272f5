"""ctypes launchers of the DP-SGD kernels in ``csrc/dp.cu``.

Same functions, arguments and semantics as :mod:`fastadv.kernels.triton.dp`
(the tables are the shared :class:`~fastadv.kernels.host.TensorTable`,
the noise the same Philox counters); each counts its launches.
"""
from __future__ import annotations

import torch

from .. import count_launch, host
from . import _c_float, _c_int, _c_int64, _c_void_p, _call, _stream, declare, dtype_code

CHUNK = host.RNG_CHUNK  # rng.cuh kChunk
READ_SUMMED, WRITE_SUMMED, WRITE_OUT, NOISE, SECURE, DIVIDE = 1, 2, 4, 8, 16, 32

declare({
    "fastadv_dp_norm_partials": (_c_int, [_c_void_p, _c_int64, _c_int64, _c_int64, _c_int64, _c_int, _c_void_p,
                                          _c_int64, _c_int64, _c_void_p]),
    "fastadv_dp_clip_factors": (_c_int, [_c_void_p, _c_int64, _c_int64, _c_void_p, _c_void_p, _c_float,
                                         _c_void_p]),
    "fastadv_dp_clip_sum": (_c_int, [_c_void_p, _c_int64, _c_int64, _c_int64, _c_int64, _c_int, _c_int, _c_void_p,
                                     _c_void_p, _c_float, _c_float, _c_int64, _c_int, _c_void_p]),
    "fastadv_dp_seed_sumsq": (_c_int, [_c_void_p, _c_int64, _c_int64, _c_int64, _c_int, _c_void_p, _c_int64,
                                       _c_void_p]),
    "fastadv_dp_global_norm": (_c_int, [_c_void_p, _c_int64, _c_void_p, _c_void_p]),
    "fastadv_dp_seed_update": (_c_int, [_c_void_p, _c_int64, _c_int64, _c_int64, _c_int, _c_void_p, _c_void_p,
                                        _c_float, _c_float, _c_int64, _c_void_p]),
})


def _device(t: torch.Tensor):
    if t.device.type != "cuda":
        raise ValueError(f"the cuda backend needs CUDA tensors; got a tensor on {t.device}")
    return torch.cuda.device(t.device)


def _f32(t: torch.Tensor, what: str) -> int:
    if t.dtype != torch.float32 or not t.is_contiguous() or t.device.type != "cuda":
        raise ValueError(f"{what} must be a contiguous float32 CUDA tensor")
    return t.data_ptr()


def _key(key: torch.Tensor | None) -> int | None:
    if key is None:
        return None
    if key.dtype != torch.int64 or key.numel() != 2 or key.device.type != "cuda":
        raise ValueError("key must be an int64 CUDA tensor [seed, base]")
    return key.data_ptr()


def _chunked(table) -> None:
    if table.chunk != CHUNK:
        raise ValueError(f"the dp kernels need a table of {CHUNK}-element chunks, got {table.chunk}")


def norm_partials(table, g_dtype: torch.dtype, batch: int, partials: torch.Tensor, col0: int) -> None:
    """``partials[b, col0 + c]`` (fp32 ``[B, P]``) for every chunk ``c`` of ``table``."""
    if table.n_chunks == 0 or batch == 0:
        return
    _chunked(table)
    with _device(table.data):
        _call("fastadv_dp_norm_partials", table.data.data_ptr(), table.n_tensors, table.n_chunks, table.chunk,
              int(batch), dtype_code(g_dtype), _f32(partials, "partials"), partials.shape[1], int(col0),
              _stream(table.data))
    count_launch("cuda.dp_norm_partials")


def clip_factors(partials: torch.Tensor, max_norm: float, out: torch.Tensor, count: torch.Tensor | None) -> None:
    """``out[0, b]`` = clip factor, ``out[1, b]`` = norm of sample ``b``; ``count`` += non-finite norms."""
    batch, n_parts = partials.shape
    if batch == 0:
        return
    if count is not None and (count.dtype != torch.int64 or count.device != partials.device):
        raise ValueError("count must be an int64 tensor on the partials' device")
    with _device(partials):
        _call("fastadv_dp_clip_factors", _f32(partials, "partials"), n_parts, batch, _f32(out, "out"),
              None if count is None else count.data_ptr(), float(max_norm), _stream(partials))
    count_launch("cuda.dp_clip_factors")


def clip_sum(table, g_dtype: torch.dtype, o_dtype: torch.dtype, batch: int, factors: torch.Tensor,
             key: torch.Tensor | None, std: float, divisor: float | None, chunk0: int, *, read_summed: bool,
             write_summed: bool, write_out: bool, secure: bool) -> None:
    """The fused pass over every tensor of ``table`` (see the Triton module)."""
    if table.n_chunks == 0:
        return
    _chunked(table)
    noise = key is not None and write_out
    flags = ((READ_SUMMED if read_summed else 0) | (WRITE_SUMMED if write_summed else 0)
             | (WRITE_OUT if write_out else 0) | (NOISE if noise else 0) | (SECURE if secure and noise else 0)
             | (DIVIDE if divisor is not None else 0))
    with _device(table.data):
        _call("fastadv_dp_clip_sum", table.data.data_ptr(), table.n_tensors, table.n_chunks, table.chunk,
              int(batch), dtype_code(g_dtype), dtype_code(o_dtype), _f32(factors, "factors"),
              _key(key) if noise else None, float(std), float(divisor or 1.0), int(chunk0), flags,
              _stream(table.data))
    count_launch("cuda.dp_clip_sum")


def seed_sumsq(table, dtype: torch.dtype, partials: torch.Tensor, col0: int) -> None:
    """``partials[col0 + c]`` = sum of squares of chunk ``c`` of a one-list table."""
    if table.n_chunks == 0:
        return
    _chunked(table)
    with _device(table.data):
        _call("fastadv_dp_seed_sumsq", table.data.data_ptr(), table.n_tensors, table.n_chunks, table.chunk,
              dtype_code(dtype), _f32(partials, "partials"), int(col0), _stream(table.data))
    count_launch("cuda.dp_seed_sumsq")


def global_norm(partials: torch.Tensor, n: int, out: torch.Tensor) -> None:
    """``out[0] = sqrt(sum(partials[:n]))`` in a fixed order."""
    with _device(partials):
        _call("fastadv_dp_global_norm", _f32(partials, "partials"), int(n), _f32(out, "out"), _stream(partials))
    count_launch("cuda.dp_global_norm")


def seed_update(table, dtype: torch.dtype, norm: torch.Tensor, key: torch.Tensor | None, max_norm: float,
                noise_multiplier: float, chunk0: int) -> None:
    """In place ``g <- g * clip_coef + noise_multiplier * z`` over a one-list table."""
    if table.n_chunks == 0:
        return
    _chunked(table)
    with _device(table.data):
        _call("fastadv_dp_seed_update", table.data.data_ptr(), table.n_tensors, table.n_chunks, table.chunk,
              dtype_code(dtype), _f32(norm, "norm"), _key(key), float(max_norm), float(noise_multiplier),
              int(chunk0), _stream(table.data))
    count_launch("cuda.dp_seed_update")
