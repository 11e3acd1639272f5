"""ctypes launchers of the noise-injection kernels in ``csrc/noise.cu``.

Same functions, arguments and semantics as ``fastadv/kernels/triton/noise.py``
(and the same Philox counters, see ``csrc/rng.cuh``); each counts its launches.
"""
from __future__ import annotations

import ctypes

import torch

from .. import count_launch, host
from . import _c_float, _c_int, _c_int64, _c_void_p, _call, _check, _ptr, _stream, declare, dtype_code, lib

declare({
    "fastadv_rng_quarter": (_c_int64, []),
    "fastadv_rng_host_chunk": (_c_int, [_c_void_p, _c_int64, _c_void_p, _c_void_p, _c_void_p]),
    "fastadv_noise_add": (_c_int, [_c_void_p, _c_void_p, _c_int, _c_int64, _c_void_p, _c_float, _c_void_p,
                                   _c_int64, _c_int, _c_void_p]),
    "fastadv_noise_token_ids": (_c_int, [_c_void_p, _c_void_p, _c_int64, _c_void_p, _c_float, _c_int64,
                                         _c_void_p]),
    "fastadv_mt_weight_noise": (_c_int, [_c_void_p, _c_int64, _c_int64, _c_int, _c_void_p, _c_float, _c_void_p]),
    "fastadv_mt_shard_weight_noise": (_c_int, [_c_void_p, _c_int64, _c_int64, _c_void_p, _c_int, _c_void_p,
                                               _c_float, _c_void_p]),
})

CHUNK = host.RNG_CHUNK  # elements per chunk (one block): rng.cuh kChunk


def _key(key: torch.Tensor) -> None:
    _check(key, "key")
    if key.dtype != torch.int64 or key.numel() != 2:
        raise ValueError("key must be an int64 tensor [seed, base] on the device")


def _chunks(numel: int) -> int:
    return -(-numel // CHUNK)


def host_chunk(key: tuple[int, int], chunk: int = 0):
    """What chunk ``chunk`` of a launch with key ``(seed, base)`` draws, computed
    on the host by the library's own code (no GPU needed): (words int64,
    normals fp32, uniforms fp32), each ``4 * 1024`` long in element order."""
    n = 4 * int(lib().fastadv_rng_quarter())
    k = (ctypes.c_int64 * 2)(*key)
    words = torch.empty(n, dtype=torch.int32)
    normals = torch.empty(n, dtype=torch.float32)
    uniforms = torch.empty(n, dtype=torch.float32)
    rc = lib().fastadv_rng_host_chunk(ctypes.addressof(k), int(chunk), words.data_ptr(), normals.data_ptr(),
                                      uniforms.data_ptr())
    if rc != 0:
        raise RuntimeError(lib().fastadv_last_error().decode(errors="replace"))
    return words.to(torch.int64) & 0xFFFFFFFF, normals, uniforms


def add_noise(x: torch.Tensor, out: torch.Tensor, key: torch.Tensor, scale: float, *,
              uniform: bool = False, row_scale: torch.Tensor | None = None, row_len: int = 1) -> None:
    """``out = x + r * s`` (``out`` may be ``x``); contiguous tensors of one shape and dtype."""
    for t, what in ((x, "x"), (out, "out")):
        _check(t, what)
    _key(key)
    if out.dtype != x.dtype or out.numel() != x.numel():
        raise ValueError("x and out must have one dtype and size")
    if row_scale is not None:
        _check(row_scale, "row_scale")
        if row_scale.dtype != torch.float32:
            raise ValueError("row_scale must be float32")
    numel = x.numel()
    with torch.cuda.device(x.device):
        _call("fastadv_noise_add", _ptr(x), _ptr(out), dtype_code(x.dtype), numel, _ptr(key), float(scale),
              _ptr(row_scale), int(row_len), int(bool(uniform)), _stream(x))
    count_launch("cuda.noise_add", 1 if numel else 0)


def token_ids(ids: torch.Tensor, out: torch.Tensor, key: torch.Tensor, factor: float, vocab_size: int) -> None:
    for t, what in ((ids, "ids"), (out, "out")):
        _check(t, what)
        if t.dtype != torch.int64:
            raise ValueError(f"{what} must be int64")
    _key(key)
    numel = ids.numel()
    with torch.cuda.device(ids.device):
        _call("fastadv_noise_token_ids", _ptr(ids), _ptr(out), numel, _ptr(key), float(factor), int(vocab_size),
              _stream(ids))
    count_launch("cuda.noise_token_ids", 1 if numel else 0)


def weight_noise(table, dtype: torch.dtype, key: torch.Tensor, std: float) -> None:
    """In place ``w <- w + std * z`` for every tensor of the two-list table
    (``0 = w``, ``1 = backup``; a :class:`~fastadv.kernels.host.TensorTable` of
    ``RNG_CHUNK``-element chunks), the original bits to the backups in the same
    pass.  One launch.  The restore is the multi-tensor copy
    (:func:`fastadv.kernels.cuda.multi_tensor.copy`)."""
    if table.device.type != "cuda":
        raise ValueError(f"the cuda backend needs CUDA tensors; got tensors on {table.device}")
    if table.n_lists != 2 or table.chunk != CHUNK:
        raise ValueError(f"weight noise needs a table of 2 lists in {CHUNK}-element chunks, got "
                         f"{table.n_lists} lists of {table.chunk}")
    _key(key)
    with torch.cuda.device(table.device):
        _call("fastadv_mt_weight_noise", table.data.data_ptr(), table.n_tensors, table.n_chunks,
              dtype_code(dtype), _ptr(key), float(std), _stream(table.data))
    count_launch("cuda.weight_noise", 1 if table.n_chunks else 0)


def shard_weight_noise(table, place: torch.Tensor, dtype: torch.dtype, key: torch.Tensor, std: float) -> None:
    """:func:`weight_noise` on shards (FSDP2): ``table`` lists the shards and
    their backups with the spans of :func:`fastadv.kernels.host.shard_counters`
    as sizes, ``place`` (int64, on the device) its ``place``; every element gets
    the number the unsharded launch with ``key`` gives it.  One launch."""
    if table.device.type != "cuda":
        raise ValueError(f"the cuda backend needs CUDA tensors; got tensors on {table.device}")
    if table.n_lists != 2 or table.chunk != CHUNK:
        raise ValueError(f"weight noise needs a table of 2 lists in {CHUNK}-element chunks, got "
                         f"{table.n_lists} lists of {table.chunk}")
    _check(place, "place")
    if place.dtype != torch.int64 or place.numel() != 2 * table.n_tensors:
        raise ValueError(f"place must be int64 with 2 entries per tensor ({2 * table.n_tensors})")
    _key(key)
    with torch.cuda.device(table.device):
        _call("fastadv_mt_shard_weight_noise", table.data.data_ptr(), table.n_tensors, table.n_chunks,
              _ptr(place), dtype_code(dtype), _ptr(key), float(std), _stream(table.data))
    count_launch("cuda.shard_weight_noise", 1 if table.n_chunks else 0)
