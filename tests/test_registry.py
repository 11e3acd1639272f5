"""The one backend rule (fastadv/ops/_registry.py ``pick`` / ``require``):
device misuse is refused on every backend with the tensors and devices named;
a kernel limit makes ``auto`` take torch and a forced kernel backend raise."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import fastadv
from fastadv.ops import _registry
from fastadv.ops import attacks as A
from fastadv.ops import fgm as F
from fastadv.ops import neftune as N
from fastadv.ops import pgd as P
from fastadv.ops import sift as S

from conftest import DEVICE, usable_backends

KERNELS = [b for b in usable_backends() if b != "torch"]
ALL = ["auto", *usable_backends()]
OTHER = torch.device("meta")  # another device, on any machine


def _t(*shape, device=DEVICE, **kw):
    return torch.rand(*shape, device=device, **kw)


@pytest.mark.parametrize("backend", ALL)
def test_a_tensor_on_another_device_is_refused_naming_it(backend):
    x, other = _t(2, 6), _t(2, 6, device=OTHER)
    calls = {
        "grad": lambda: fastadv.fgsm_perturb(x, other, 0.1, backend=backend),
        "images": lambda: A.pgd_step_(x.clone(), other, x, 0.1, 0.1, backend=backend),
        "momentum": lambda: A.mifgsm_step_(x.clone(), x, x, other, 0.1, 0.1, backend=backend),
        "out": lambda: A.fgsm_step_(x.clone(), x, 0.1, out=other, backend=backend),
        "attention_mask": lambda: N.neftune(_t(2, 3, 4), 5.0, torch.ones(2, 3, device=OTHER), backend=backend),
        "delta": lambda: S.sift_update_(x, other.float(), x.float(), 0.1, backend=backend),
    }
    for what, call in calls.items():
        with pytest.raises(ValueError, match=rf"{what} is on meta, expected {DEVICE.type}.*one device"):
            call()
    w = _t(4, 3)
    with pytest.raises(ValueError, match=r"grad is on meta.*the parameter on"):
        F.fgm_attack_(w, _t(4, 3, device=OTHER), 0.1, backend=backend)
    with pytest.raises(ValueError, match=r"grad is on meta"):
        P.pgd_attack_(w, _t(4, 3, device=OTHER), 0.1, 0.2, backend=backend)


@pytest.mark.parametrize("backend", ALL)
def test_pgd_later_step_refuses_a_gradient_on_another_device(backend):
    w = _t(4, 3)
    state = P.pgd_attack_(w, _t(4, 3), 0.1, 0.2, backend=backend)
    with pytest.raises(ValueError, match=r"grad is on meta"):
        P.pgd_attack_(w, _t(4, 3, device=OTHER), 0.1, 0.2, state, backend=backend)
    P.pgd_restore_(state)


@pytest.mark.parametrize("kernel", KERNELS)
def test_kernel_limits_auto_takes_torch_forced_raises(kernel):
    x = _t(2, 6)
    dense = dict(batch_major=[("adv", x[:, ::2])])
    layout = dict(same_layout=[("adv", _t(2, 3, 4, 4)), ("out", _t(2, 3, 4, 4).contiguous(
        memory_format=torch.channels_last))])
    sparse = dict(strided=[("gradients", x.to_sparse())])
    mom = dict(dtypes=[("momentum buffers", x.half(), (torch.float32,))])
    cases = [(dense, ValueError, "dense with the batch dimension outermost"),
             (layout, ValueError, "out in the adv's memory layout"),
             (sparse, ValueError, "needs dense gradients"),
             (mom, TypeError, "supports float32 momentum buffers, got torch.float16")]
    for limits, exc, message in cases:
        if DEVICE.type == "cuda":  # auto picks a kernel backend only on CUDA tensors
            assert _registry.pick("auto", DEVICE, **limits) == "torch"
        with pytest.raises(exc, match=message):
            _registry.pick(kernel, DEVICE, **limits)


@pytest.mark.parametrize("kernel", KERNELS)
def test_a_sparse_tensor_is_refused_first_and_where_ends_the_message(kernel):
    """``strided`` is checked before the other limits (a sparse tensor has no
    strides: ``contiguous`` alone refuses it the same way instead of failing in
    ``is_contiguous``), and ``where`` ends a forced backend's message."""
    sparse = _t(4, 4, dtype=torch.float64).to_sparse()
    with pytest.raises(ValueError, match=r"needs dense grad, got a torch.sparse_coo tensor; "
                                         r"use backend='torch' \(index 2\)$"):
        _registry.pick(kernel, DEVICE, where="index 2", dtypes=[("grad", sparse)], strided=[("grad", sparse)])
    with pytest.raises(ValueError, match=r"needs dense grad, got a torch.sparse_coo tensor; use backend='torch'$"):
        _registry.pick(kernel, DEVICE, contiguous=[("grad", _t(4, 4).to_sparse())])
    with pytest.raises(TypeError, match=r"got torch.float64; use backend='torch' \(index 0\)$"):
        _registry.pick(kernel, DEVICE, where="index 0", dtypes=[("grad", _t(3, dtype=torch.float64))])
    if DEVICE.type == "cuda":  # auto picks a kernel backend only on CUDA tensors
        assert _registry.pick("auto", DEVICE, where="index 2", strided=[("grad", sparse)]) == "torch"


@pytest.mark.parametrize("kernel", KERNELS)
def test_multi_tensor_split_uses_the_registry_rule(kernel):
    """The multi-tensor split has no limit of its own: pick's limits, pick's
    messages, the index of the first tensor of the group at the end."""
    from fastadv.ops.multi_tensor import split

    w = [_t(4), _t(4, 4), _t(3, dtype=torch.float64)]
    g = [_t(4), _t(4, 4).to_sparse(), _t(3, dtype=torch.float64)]
    names = ("weight", "gradient")
    with pytest.raises(ValueError, match=r"needs dense gradient, got a torch.sparse_coo tensor; "
                                         r"use backend='torch' \(index 1\)$"):
        split(kernel, DEVICE, [w[:2], g[:2]], names)
    with pytest.raises(TypeError, match=r"supports float32, float16 and bfloat16 tensors, got torch.float64; "
                                        r"use backend='torch' \(index 1\)$"):
        split(kernel, DEVICE, [[w[0], w[2]], [g[0], g[2]]], names)
    with pytest.raises(TypeError, match=r"needs the gradient in the weight's dtype \(torch.float32\), "
                                        r"got torch.float16; use backend='torch' \(index 0\)$"):
        split(kernel, DEVICE, [[w[0]], [g[0].half()]], names)
    assert split(kernel, DEVICE, [[w[0]], [g[0].half()]], names, same_dtype=False) == (kernel, [0], [])
    assert split("torch", DEVICE, [w, g], names) == ("torch", [], [0, 1, 2])
    auto = _registry.pick("auto", DEVICE)
    if auto != "torch":  # CUDA tensors: the kernels take index 0, torch the sparse and the float64 ones
        assert split("auto", DEVICE, [w, g], names) == (auto, [0], [1, 2])


def test_one_device_is_a_kernel_limit():
    pairs = [("tensors", _t(2)), ("tensors", _t(2, device=OTHER))]
    assert _registry.pick("torch", DEVICE, one_device=pairs) == "torch"
    for kernel in KERNELS:
        with pytest.raises(ValueError, match=rf"needs every tensor on one device, got \['{DEVICE.type}[^']*', 'meta'\]"):
            _registry.pick(kernel, DEVICE, one_device=pairs)


@pytest.mark.parametrize("kernel", KERNELS)
def test_require_keeps_the_first_steps_backend(kernel):
    """PGD's steps after the first keep the first step's backend: a gradient
    the kernels cannot take then raises (no switch to torch mid-attack)."""
    w = _t(4, 3)
    state = P.pgd_attack_(w, _t(4, 3), 0.1, 0.2, backend=kernel)
    with pytest.raises(TypeError, match=r"needs the gradient in the parameter's dtype \(torch.float32\)"):
        P.pgd_attack_(w, _t(4, 3).double(), 0.1, 0.2, state, backend=kernel)
    P.pgd_restore_(state)
    _registry.require("torch", contiguous=[("parameter", w.t())])  # the torch backend takes anything


def test_dense_batch_major():
    x = torch.rand(2, 3, 4, 5)
    assert _registry.dense_batch_major(x)
    assert _registry.dense_batch_major(x.contiguous(memory_format=torch.channels_last))
    assert not _registry.dense_batch_major(x[:, :, :, ::2])
    assert not _registry.dense_batch_major(x.transpose(0, 1))
    assert _registry.dense_batch_major(x[:1].transpose(0, 1)[:, :1])


_LIST_OPS = """
import importlib, pkgutil, sys
import torch
from torch._library.custom_ops import OPDEFS
def listed():
    return sorted(q for q in OPDEFS if q.startswith("fastadv::"))
import fastadv
after_import = listed()
import fastadv.ops
for m in pkgutil.iter_modules(fastadv.ops.__path__):
    importlib.import_module("fastadv.ops." + m.name)
print(after_import == listed(), len(after_import), sorted(set(listed()) - set(after_import)))
"""


def test_import_fastadv_lists_every_op():
    """Every op defined in fastadv/ops/ is in torch.ops.fastadv after a plain
    ``import fastadv`` (fresh interpreter: the tests import more)."""
    out = subprocess.run([sys.executable, "-c", _LIST_OPS], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    same, n, missing = out.stdout.split(" ", 2)
    assert same == "True", f"not registered by import fastadv: {missing}"
    assert int(n) >= 30, out.stdout
