"""ctypes launchers of the input-attack kernels in ``csrc/attacks.cu``; the same
functions, arguments and launch counts as ``fastadv.kernels.triton.attacks``."""
from __future__ import annotations

import torch

from .. import count_launch
from . import _c_float, _c_int, _c_int64, _c_void_p, _call, _check, _ptr, _stream, declare, dtype_code, lib

declare({
    "fastadv_attack_linf_step": (_c_int, [_c_void_p, _c_void_p, _c_void_p, _c_void_p, _c_int, _c_int64,
                                          _c_float, _c_float, _c_void_p]),
    "fastadv_attack_workspace_floats": (_c_int64, [_c_int64, _c_int64, _c_int]),
    "fastadv_attack_l2_step": (_c_int, [_c_void_p, _c_void_p, _c_void_p, _c_void_p, _c_int, _c_int64, _c_int64,
                                        _c_float, _c_float, _c_float, _c_void_p, _c_void_p]),
    "fastadv_attack_momentum_step": (_c_int, [_c_void_p, _c_void_p, _c_void_p, _c_void_p, _c_void_p, _c_int,
                                              _c_int, _c_int64, _c_int64, _c_float, _c_float, _c_float,
                                              _c_void_p, _c_void_p]),
})


def _check_all(out, adv, x, g, momentum=None):
    for t, what in ((out, "out"), (adv, "adv"), (x, "images"), (g, "grad"), (momentum, "momentum")):
        if t is not None:
            _check(t, what)
    if any(t is not None and t.dtype != adv.dtype for t in (out, x, g)):
        raise ValueError("out, adv, images and grad must have one dtype")
    if momentum is not None and momentum.dtype != torch.float32:
        raise ValueError("momentum must be float32")
    return dtype_code(adv.dtype)


def workspace_floats(batch: int, per_sample: int, kind: int) -> int:
    return int(lib().fastadv_attack_workspace_floats(batch, per_sample, kind))


def linf_step(adv: torch.Tensor, x: torch.Tensor | None, g: torch.Tensor, out: torch.Tensor,
              alpha: float, eps: float) -> None:
    """``out = clip01(x + clamp(adv + alpha*sign(g) - x, -eps, eps))``; ``x=None``: ``clip01(adv + alpha*sign(g))``."""
    code = _check_all(out, adv, x, g)
    with torch.cuda.device(adv.device):
        _call("fastadv_attack_linf_step", _ptr(out), _ptr(adv), _ptr(x), _ptr(g), code, adv.numel(),
              float(alpha), float(eps), _stream(adv))
    count_launch("cuda.attack_linf_step", 1 if adv.numel() else 0)


def l2_step(adv: torch.Tensor, x: torch.Tensor, g: torch.Tensor, out: torch.Tensor,
            alpha: float, eps: float, eps_div: float) -> None:
    """The PGD-L2 step on ``[batch, per_sample]`` tensors (a reduction, then the update)."""
    code = _check_all(out, adv, x, g)
    batch, per_sample = adv.shape
    with torch.cuda.device(adv.device):
        ws = torch.empty(max(workspace_floats(batch, per_sample, 0), 1), dtype=torch.float32, device=adv.device)
        _call("fastadv_attack_l2_step", _ptr(out), _ptr(adv), _ptr(x), _ptr(g), code, batch, per_sample,
              float(alpha), float(eps), float(eps_div), _ptr(ws), _stream(adv))
    count_launch("cuda.attack_l2_step", 2 if adv.numel() else 0)


def momentum_step(adv: torch.Tensor, x: torch.Tensor, g: torch.Tensor, momentum: torch.Tensor,
                  out: torch.Tensor, alpha: float, eps: float, decay: float, first: bool) -> None:
    """The MI-FGSM step on ``[batch, per_sample]`` tensors (``momentum`` fp32, in place)."""
    code = _check_all(out, adv, x, g, momentum)
    batch, per_sample = adv.shape
    with torch.cuda.device(adv.device):
        ws = torch.empty(max(workspace_floats(batch, per_sample, 1), 1), dtype=torch.float32, device=adv.device)
        _call("fastadv_attack_momentum_step", _ptr(out), _ptr(adv), _ptr(x), _ptr(g), _ptr(momentum),
              int(bool(first)), code, batch, per_sample, float(alpha), float(eps), float(decay), _ptr(ws),
              _stream(adv))
    count_launch("cuda.attack_momentum_step", 2 if adv.numel() else 0)
