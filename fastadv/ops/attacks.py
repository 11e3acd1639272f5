"""One step of the input attacks (torchattacks' math) as functional ops.

Each function updates ``adv`` in place (or writes ``out`` when given) and
returns it; ``images`` is the clean batch ``x`` (the centre of the eps-ball),
``grad`` the gradient of the attack's cost at ``adv``.  The first dimension is
the batch; per-sample norms run over all the others.  Everything stays on the
device: no host sync, no data-dependent Python branch.

========================  =========================================================  ==========
op                        math (fp32, rounded once to the images' dtype)              launches
========================  =========================================================  ==========
``fgsm_step_``            ``adv = clip01(adv + alpha*sign(g))``                        1
``pgd_step_``             ``adv = clip01(x + clamp(adv + alpha*sign(g) - x, ±eps))``   1
``pgdl2_step_``           ``a = adv + alpha*g/(||g||+eps_div)``, ``d = a - x``,          2
                          ``adv = clip01(x + d*min(1, eps/||d||))``
``mifgsm_step_``          ``m = g/mean(|g|) + decay*m`` (in place), then                2
                          ``pgd_step_`` with ``sign(m)``
========================  =========================================================  ==========

Each is the registered op ``torch.ops.fastadv.attack_<name>_step_`` (see
:mod:`fastadv.ops._registry`): it writes ``out`` when given, else ``adv``,
declared as mutated (with ``momentum``); the Python functions validate, pick
the backend and call it.

``sign`` is ``torch.sign`` (0 for 0 and for NaN).  On the ``triton`` and ``cuda``
backends the L2 step's ``||d||`` comes from the same reduction pass as
``||g||`` (``||d_old + s g||^2 = d.d + 2 s d.g + s^2 g.g``): a reduction and an
update pass, instead of the three passes of the direct formula; it agrees with
it to fp32 rounding.  The ``torch`` backend computes torchattacks' own ops, in
the images' precision when that is float64 (float32 for fp32 / fp16 / bf16,
rounded once), and runs anywhere (any dtype, any layout).  The kernels take
float32, float16 and bfloat16: a forced kernel backend given float64 raises
``TypeError``; ``auto`` takes the torch backend for it.

Hyper-parameters (``alpha``, ``eps``, ...) are real numbers: Python or numpy
scalars, or 0-d tensors (read with ``float()``: a 0-d CUDA tensor costs a host
sync; pass a Python number on the hot path).

Bytes per step (fp32, N elements): FGSM 12N, PGD 16N (the floor: read adv, x,
g, write adv), PGD-L2 28N (reduction reads g, adv, x; update reads them again
and writes adv), MI-FGSM 28N (reduction reads g; update reads g, m, adv, x,
writes m, adv).  See :func:`design_bytes`.
"""
from __future__ import annotations

import numbers
from typing import Optional

import torch

from ..kernels import count_launch, device_guard
from . import _registry


# ---- validation ----------------------------------------------------------------------------------

def real_number(name: str, value) -> float:
    """``value`` as a float: a real Python / numpy scalar or a 0-d real tensor
    (what torchattacks' arithmetic takes), else ``TypeError``."""
    if isinstance(value, torch.Tensor):
        if value.dim() != 0 or value.dtype == torch.bool or value.is_complex():
            raise TypeError(f"{name} must be a real number or a 0-d real tensor, got a tensor of shape "
                            f"{tuple(value.shape)} and dtype {value.dtype}")
        return float(value)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    return float(value)


def _number(name: str, value, minimum: float | None = 0.0) -> float:
    value = real_number(name, value)
    if value != value:
        raise ValueError(f"{name} must not be NaN")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum:g}, got {value:g}")
    return value


def _check_tensors(adv, images, grad, out, momentum=None) -> None:
    for name, t in (("adv", adv), ("images", images), ("grad", grad), ("out", out),
                    ("momentum", momentum)):
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
        if t.shape != adv.shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)}, adv has {tuple(adv.shape)}")
    if adv.dim() < 1:
        raise ValueError("adv needs a batch dimension (shape [batch, ...])")
    if out is not None and out.dtype != adv.dtype:
        raise TypeError(f"out has dtype {out.dtype}, adv has {adv.dtype}")


_dense_batch_major = _registry.dense_batch_major  # the registry's layout rule (fastadv.attacks.base uses it)


def _like(t: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """``t`` in ``ref``'s memory layout (a copy only when they differ)."""
    if t.stride() == ref.stride() or t.numel() <= 1:
        return t
    return torch.empty_like(ref, dtype=t.dtype).copy_(t)


def _pick(backend, adv, images, grad, out, momentum=None) -> str:
    """The backend that runs this step (the registry's rule,
    :func:`fastadv.ops._registry.pick`): every tensor on adv's device; the
    kernels take float32 / float16 / bfloat16 images, with adv, images and
    grad in one dtype and a float32 momentum buffer; they walk adv, out and
    momentum as raw ``[batch, per_sample]`` memory, so those must be dense
    with the batch outermost (contiguous, channels_last, ...) and share one
    layout (images and grad are copied into it when they differ)."""
    return _registry.pick(
        backend, adv.device,
        same_device=[("adv", adv), ("images", images), ("grad", grad), ("out", out), ("momentum", momentum)],
        dtypes=[("images", adv), ("momentum buffers", momentum, (torch.float32,))],
        same_dtype=[("adv", adv), ("images", images), ("grad", grad)],
        batch_major=[("adv", adv), ("out", out), ("momentum", momentum)],
        same_layout=[("adv", adv), ("out", out), ("momentum", momentum)])


def _flat(t: torch.Tensor) -> torch.Tensor:
    """A ``[batch, per_sample]`` view of the memory of a dense batch-major tensor."""
    b = t.shape[0]
    per = t.numel() // b if b else 0
    return t.as_strided((b, per), (per, 1))


def _acc_of(*ts) -> torch.dtype:
    """The torch backend's compute dtype: float64 when an operand is float64 (as
    in torchattacks), else float32 (fp16 / bf16 rounded once at the end)."""
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in ts) else torch.float32


def _as(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t if t.dtype == dtype else t.to(dtype)


def _bshape(t: torch.Tensor) -> tuple:
    return (t.shape[0],) + (1,) * (t.dim() - 1)


def _per_sample_norm(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(t.shape[0], -1).norm(p=2, dim=1).view(_bshape(t))


def _linf_project(a, x32, eps):
    return torch.clamp(x32 + torch.clamp(a - x32, min=-eps, max=eps), min=0, max=1)


# ---- the registered ops ----------------------------------------------------------------------------
# Each writes ``out`` when given, else ``adv`` in place (never both: the two are distinct tensors).

@_registry.op("attack_fgsm_step_", mutates_args={"adv", "out"}, triton=True)
def fgsm_step_op(adv: torch.Tensor, grad: torch.Tensor, out: Optional[torch.Tensor], alpha: float,
                 backend: str) -> None:
    """``clip01(adv + alpha * sign(grad))`` into ``out`` (None: into ``adv``)."""
    target = adv if out is None else out
    if backend == "torch":
        count_launch("torch.attack_fgsm_step")
        acc = _acc_of(adv, grad)
        target.copy_(torch.clamp(_as(adv, acc) + alpha * _as(grad, acc).sign(), min=0, max=1))
        return
    with device_guard(adv):
        _registry.kernels("attacks", backend).linf_step(_flat(adv), None, _flat(_like(grad, adv)),
                                                        _flat(target), alpha, 0.0)


@_registry.op("attack_pgd_step_", mutates_args={"adv", "out"}, triton=True)
def pgd_step_op(adv: torch.Tensor, images: torch.Tensor, grad: torch.Tensor, out: Optional[torch.Tensor],
                alpha: float, eps: float, backend: str) -> None:
    """``clip01(images + clamp(adv + alpha*sign(grad) - images, -eps, eps))`` into ``out`` / ``adv``."""
    target = adv if out is None else out
    if backend == "torch":
        count_launch("torch.attack_linf_step")
        acc = _acc_of(adv, images, grad)
        a = _as(adv, acc) + alpha * _as(grad, acc).sign()
        target.copy_(_linf_project(a, _as(images, acc), eps))
        return
    with device_guard(adv):
        _registry.kernels("attacks", backend).linf_step(_flat(adv), _flat(_like(images, adv)),
                                                        _flat(_like(grad, adv)), _flat(target), alpha, eps)


@_registry.op("attack_pgdl2_step_", mutates_args={"adv", "out"})
def pgdl2_step_op(adv: torch.Tensor, images: torch.Tensor, grad: torch.Tensor, out: Optional[torch.Tensor],
                  alpha: float, eps: float, eps_for_division: float, backend: str) -> None:
    """One torchattacks PGD-L2 step into ``out`` / ``adv`` (a reduction, then the update)."""
    target = adv if out is None else out
    if backend == "torch":
        count_launch("torch.attack_l2_step")
        acc = _acc_of(adv, images, grad)
        g, x = _as(grad, acc), _as(images, acc)
        a = _as(adv, acc) + alpha * (g / (_per_sample_norm(g) + eps_for_division))
        delta = a - x
        dn = _per_sample_norm(delta)
        factor = torch.min(eps / dn, torch.ones_like(dn))
        target.copy_(torch.clamp(x + delta * factor, min=0, max=1))
        return
    with device_guard(adv):
        _registry.kernels("attacks", backend).l2_step(_flat(adv), _flat(_like(images, adv)),
                                                      _flat(_like(grad, adv)), _flat(target), alpha, eps,
                                                      eps_for_division)


@_registry.op("attack_mifgsm_step_", mutates_args={"adv", "out", "momentum"})
def mifgsm_step_op(adv: torch.Tensor, images: torch.Tensor, grad: torch.Tensor, momentum: torch.Tensor,
                   out: Optional[torch.Tensor], alpha: float, eps: float, decay: float, first: bool,
                   backend: str) -> None:
    """``momentum = grad / mean|grad| + decay * momentum`` in place (``first``:
    the old momentum is not read), then the L-inf step on ``sign(momentum)``
    into ``out`` / ``adv``."""
    target = adv if out is None else out
    if backend == "torch":
        count_launch("torch.attack_momentum_step")
        acc = _acc_of(adv, images, grad, momentum)
        g = _as(grad, acc)
        mean = g.abs().reshape(g.shape[0], -1).mean(dim=1).view(_bshape(g))
        m = g / mean
        if first:  # torchattacks adds a zero momentum times decay: the same bits without reading it
            m = m + torch.zeros((), dtype=acc, device=m.device) * decay
        else:
            m = m + _as(momentum, acc) * decay
        momentum.copy_(m)
        a = _as(adv, acc) + alpha * m.sign()
        target.copy_(_linf_project(a, _as(images, acc), eps))
        return
    with device_guard(adv):
        _registry.kernels("attacks", backend).momentum_step(
            _flat(adv), _flat(_like(images, adv)), _flat(_like(grad, adv)), _flat(momentum), _flat(target),
            alpha, eps, decay, bool(first))


for _op in (fgsm_step_op, pgd_step_op, pgdl2_step_op, mifgsm_step_op):
    _op.register_fake(lambda *args: None)  # in place: nothing to allocate


# ---- the functional API ----------------------------------------------------------------------------

def fgsm_step_(adv: torch.Tensor, grad: torch.Tensor, alpha: float, *, out: torch.Tensor | None = None,
               backend: str | None = None) -> torch.Tensor:
    """``adv = clip01(adv + alpha * sign(grad))`` (FGSM with ``adv = images``, ``alpha = eps``)."""
    alpha = _number("alpha", alpha)
    _check_tensors(adv, None, grad, out)
    fgsm_step_op(adv, grad, _distinct(adv, out), alpha, _pick(backend, adv, None, grad, out))
    return adv if out is None else out


def pgd_step_(adv: torch.Tensor, images: torch.Tensor, grad: torch.Tensor, alpha: float, eps: float, *,
              out: torch.Tensor | None = None, backend: str | None = None) -> torch.Tensor:
    """``adv = clip01(images + clamp(adv + alpha*sign(grad) - images, -eps, eps))``: one L-inf PGD step."""
    alpha, eps = _number("alpha", alpha), _number("eps", eps)
    _check_tensors(adv, images, grad, out)
    pgd_step_op(adv, images, grad, _distinct(adv, out), alpha, eps, _pick(backend, adv, images, grad, out))
    return adv if out is None else out


def pgdl2_step_(adv: torch.Tensor, images: torch.Tensor, grad: torch.Tensor, alpha: float, eps: float,
                eps_for_division: float = 1e-10, *, out: torch.Tensor | None = None,
                backend: str | None = None) -> torch.Tensor:
    """One L2 PGD step (torchattacks ``PGDL2``): a step of length ``alpha`` along
    ``grad / (||grad|| + eps_for_division)``, the per-sample projection of
    ``adv - images`` on the L2 ball of radius ``eps``, the [0, 1] clip."""
    alpha, eps = _number("alpha", alpha), _number("eps", eps)
    eps_div = _number("eps_for_division", eps_for_division)
    _check_tensors(adv, images, grad, out)
    pgdl2_step_op(adv, images, grad, _distinct(adv, out), alpha, eps, eps_div,
                  _pick(backend, adv, images, grad, out))
    return adv if out is None else out


def mifgsm_step_(adv: torch.Tensor, images: torch.Tensor, grad: torch.Tensor, momentum: torch.Tensor,
                 alpha: float, eps: float, decay: float = 1.0, *, first: bool = False,
                 out: torch.Tensor | None = None, backend: str | None = None) -> torch.Tensor:
    """One MI-FGSM step (torchattacks ``MIFGSM``):
    ``momentum = grad / mean(|grad|) + decay * momentum`` per sample, in place
    (``first=True``: the old momentum is not read, taken as 0, so the buffer may
    be uninitialised), then ``pgd_step_`` along ``sign(momentum)``.  On the
    kernel backends ``momentum`` is float32 in ``adv``'s layout."""
    alpha, eps = _number("alpha", alpha), _number("eps", eps)
    decay = _number("decay", decay, minimum=None)
    _check_tensors(adv, images, grad, out, momentum)
    if momentum is None:
        raise TypeError("momentum must be a tensor")
    mifgsm_step_op(adv, images, grad, momentum, _distinct(adv, out), alpha, eps, decay, bool(first),
                   _pick(backend, adv, images, grad, out, momentum))
    return adv if out is None else out


def _distinct(adv: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor | None:
    """``out=adv`` is the in-place step: the op is given ``out=None`` (a mutated
    argument must not alias another)."""
    return None if out is adv else out


def design_bytes(kind: str, numel: int, element_size: int) -> int:
    """Bytes one step moves by design on the kernel backends (images of
    ``numel`` elements of ``element_size`` bytes; the momentum is fp32):

    * ``fgsm``: read adv, g; write out: 3 passes;
    * ``pgd``: read adv, x, g; write adv: 4 passes (the floor);
    * ``pgdl2``: reduction reads g, adv, x; update reads g, adv, x, writes adv: 7;
    * ``mifgsm``: reduction reads g; update reads g, adv, x, m(fp32) and writes
      m(fp32), adv (the first step does not read m).
    Per-sample partials (a few floats per 4096 elements) are not counted.
    """
    n, e = numel, element_size
    table = {"fgsm": 3 * n * e, "pgd": 4 * n * e, "pgdl2": 7 * n * e,
             "mifgsm": 5 * n * e + 8 * n, "mifgsm_first": 5 * n * e + 4 * n}
    if kind not in table:
        raise KeyError(f"unknown step kind {kind!r}; one of {', '.join(table)}")
    return table[kind]
