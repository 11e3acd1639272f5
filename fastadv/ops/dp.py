"""DP-SGD as functional ops: per-sample clipping and Gaussian noise, fused.

For per-sample gradients ``g_t [B, *shape_t]`` (one tensor per parameter,
one row per sample) :func:`clip_and_noise` computes, as Opacus 1.6's
``DPOptimizer`` does in ``clip_and_accumulate`` + ``add_noise`` + ``scale_grad``::

    n_b    = sqrt(sum_t ||g_t[b]||^2)                 norm over all tensors
    f_b    = min(1, C * (1 / (n_b + 1e-6)))           Opacus's clip factor, fp32
    s_t    = summed_t + sum_b f_b g_t[b]              clipped sum (+ a carried sum)
    out_t  = (s_t + N(0, (sigma C)^2)) / expected_batch_size

in fp32, rounded once into each output's dtype.  Kernel backends (triton,
cuda) do it in three launches for any number of tensors (per dtype group):
per-(sample, chunk) partial sums of squares, one finalize program per sample
(fixed order: deterministic), then one pass that reads every per-sample
gradient once and writes the clipped sum, the noise drawn inside the kernel
(Philox keyed from the PyTorch generator, see
``fastadv/kernels/triton/rng.py``).  Nothing is read back to the host.

Registered ops (``torch.ops.fastadv.*``, see :mod:`fastadv.ops._registry`):

==========================  ==============================================================
``dp_clip_and_noise``       clip, sum (into ``summed`` when given), noise, scale into ``out``
``dp_clip_and_accumulate``  clip and add the sum into ``summed`` (no noise)
``dp_add_noise``            ``out = (x + noise) / divisor``
``dp_seed_clip_noise_``     seed 000: total-norm clip + noise, in place on the gradients
``dp_noise_key``            the Philox key ``[seed, base]`` (int64 device tensor) of one call
``dp_normal``               the torch backend's noise, ``torch.normal`` as Opacus draws it
==========================  ==============================================================

Randomness enters the compute ops only as tensors: the kernel backends take
the key (``key``), the torch backend the drawn noise (``noise``).  The Python
functions below draw them from ``generator`` (eager), or through
``dp_noise_key`` / ``dp_normal`` from the device's default generator when
``generator`` is None -- the one form ``torch.compile`` can trace (a
``torch.Generator`` cannot enter a graph): compiled and eager calls then draw
the same numbers under one ``torch.manual_seed``.

Non-finite samples.  A sample whose norm is NaN or inf (a NaN or inf anywhere
in its gradient, or a norm beyond the fp32 range, about 1.8e19) gets factor 0:
it is dropped from the sum (never multiplied in: ``0 * NaN`` would poison the
sum), which keeps the sensitivity at ``C``.  ``on_nonfinite="drop"`` (default)
does that without a host sync and adds the number of dropped samples to
``nonfinite_count`` if given; ``"raise"`` checks the count on the host (one
sync) and raises :class:`FloatingPointError` before anything is written.
(Opacus lets such a sample turn the whole gradient into NaN, which both breaks
training and reveals, through the NaN, that one sample was bad.)

Noise (kernel backends): ``std * z`` with ``z`` from Box-Muller on Philox
words, ``|z| <= 6.76``.  ``secure_mode=True`` draws the Philox key from
``os.urandom`` on every call (the generator is ignored) and uses
``z = (z_1 + z_2 + z_3 + z_4) / 2`` over four independent streams (Opacus's
defence against floating-point attacks, which also lifts the bound on ``|z|``
to 13.5); see docs/dp.md for the threat model.  The torch backend draws with
``torch.normal`` from the same generator (other numbers, same distribution),
every tensor's noise before the sums (it holds one noise tensor per output
for the duration of the call).
"""
from __future__ import annotations

import math
import numbers
import os
from typing import Optional, Sequence

import torch

from ..kernels import count_launch, device_guard, host
from ..kernels.host import new_key  # noqa: F401  (part of this module's API)
from . import _registry

CHUNK = host.RNG_CHUNK    # elements per work item: one Philox chunk
NONFINITE = ("drop", "raise")


# ---------------------------------------------------------------- helpers

_cache_obj = None


def _cache():
    global _cache_obj
    if _cache_obj is None:
        _cache_obj = host.TableCache(maxsize=64)
    return _cache_obj


def _number(value, what: str) -> float:
    """``value`` as a finite float.  Taken as Opacus takes it: a Python or numpy
    real scalar (``np.float32`` from a scheduler) or a 0-d real tensor
    (``torch.tensor(1.0)``; read with ``float()``, which for a CUDA tensor is a
    host sync: keep hyper-parameters on the CPU or in Python)."""
    if isinstance(value, torch.Tensor):
        if value.dim() != 0 or value.dtype == torch.bool or value.is_complex():
            raise TypeError(f"{what} must be a real number or a 0-d real tensor, got a tensor of shape "
                            f"{tuple(value.shape)} and dtype {value.dtype}")
        value = float(value)
    elif isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{what} must be a number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{what} must be finite, got {value}")
    return value


def check_hyperparameters(max_grad_norm, noise_multiplier) -> tuple[float, float]:
    """``(C, sigma)`` as floats; ``C > 0`` and ``sigma >= 0`` or a clear error."""
    c = _number(max_grad_norm, "max_grad_norm")
    if c <= 0:
        raise ValueError(f"max_grad_norm must be > 0, got {c} (it is the per-sample clipping bound C)")
    sigma = _number(noise_multiplier, "noise_multiplier")
    if sigma < 0:
        raise ValueError(f"noise_multiplier must be >= 0, got {sigma} (the noise std is "
                         f"noise_multiplier * max_grad_norm)")
    return c, sigma


def noise_std(noise_multiplier, max_grad_norm) -> float:
    """Opacus's noise std, ``noise_multiplier * max_grad_norm`` computed as
    Opacus computes it (the product of the objects as given: two ``np.float32``
    multiply in float32, a 0-d tensor gives a tensor), then read as a float."""
    check_hyperparameters(max_grad_norm, noise_multiplier)
    return _number(noise_multiplier * max_grad_norm, "noise_multiplier * max_grad_norm")


def _divisor(expected_batch_size) -> float | None:
    if expected_batch_size is None:
        return None
    d = _number(expected_batch_size, "expected_batch_size")
    if d <= 0:
        raise ValueError(f"expected_batch_size must be > 0, got {d}")
    return d


def _tensor_list(xs, what: str) -> list:
    if isinstance(xs, torch.Tensor):
        raise TypeError(f"{what} must be a list of tensors (one per parameter), got a tensor")
    xs = list(xs)
    for i, t in enumerate(xs):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{what}[{i}] must be a tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{what}[{i}] must be a floating-point tensor, got {t.dtype}")
    return xs


def _check_batch(gs: list) -> int:
    """The common batch size of the per-sample gradients, or a clear error."""
    for i, g in enumerate(gs):
        if g.dim() == 0:
            raise ValueError(f"grad_samples[{i}] is a scalar; per-sample gradients are [batch, *param_shape]")
        if g.is_sparse:
            raise ValueError(f"grad_samples[{i}] is sparse; per-sample gradients must be dense")
    sizes = [g.shape[0] for g in gs]
    if len(set(sizes)) > 1:
        raise ValueError("per-sample gradients must share their batch size (dim 0); got "
                         + ", ".join(f"grad_samples[{i}]: {tuple(g.shape)}" for i, g in enumerate(gs)))
    return sizes[0] if sizes else 0


def _check_targets(ts, shapes, anchor, what: str) -> None:
    """``ts`` has one tensor of each shape, all on the device of ``anchor``
    (``(what, tensor)``: the first per-sample gradient, or the first of ``ts``
    when there are none); the device rule and message are the registry's."""
    if len(ts) != len(shapes):
        raise ValueError(f"{what} has {len(ts)} tensors, expected {len(shapes)} (one per parameter)")
    for i, (t, shape) in enumerate(zip(ts, shapes)):
        if t.numel() != math.prod(shape):
            raise ValueError(f"{what}[{i}] has shape {tuple(t.shape)}, expected {tuple(shape)}")
    # only the first stray tensor goes into the message (next to the anchor):
    # a model's hundreds of parameters would bury it
    stray = [(f"{what}[{i}]", t) for i, t in enumerate(ts) if t.device != anchor[1].device][:1]
    _registry.check_devices(anchor[1].device, [anchor, *stray])


def _choose(backend: str | None, device, gs, outs, summed) -> str:
    """The backend of one DP call (:func:`fastadv.ops._registry.pick`): the
    kernels take float32 / float16 / bfloat16 tensors, write contiguous ones,
    need ``out[i]`` and ``summed[i]`` in one dtype, and every tensor on one
    device (the torch backend takes per-sample gradients spread over several)."""
    outs, summed = list(outs or ()), list(summed or ())
    dtypes = ([("per-sample gradients", g) for g in gs] + [("outputs", o) for o in outs]
              + [("summed tensors", s) for s in summed])
    contiguous = [("output", o) for o in outs] + [("summed tensor", s) for s in summed]
    name = _registry.pick(backend, device, dtypes=dtypes, contiguous=contiguous)
    if name == "torch":
        return name
    # same_dtype takes one group: the registry's rule and message for the first pair that differs
    mixed = [[("summed tensor", s), ("output", o)] for o, s in zip(outs, summed) if o.dtype != s.dtype]
    return _registry.pick(backend, device, same_dtype=mixed[0] if mixed else (),
                          one_device=[("tensors", t) for t in gs + outs + summed])


# ---------------------------------------------------------------- randomness, as tensors

@_registry.op("dp_noise_key")
def noise_key_op(like: list[torch.Tensor], secure: bool, follow_opacus: bool) -> torch.Tensor:
    """The Philox key ``[seed, base]`` (int64, on ``like[0]``'s device) of one
    noisy call, from the device's default generator (``secure``: from
    ``os.urandom``).  ``follow_opacus``: :func:`noise_key` (on the CPU the
    generator then moves as Opacus's ``torch.normal`` draws for ``like`` move
    it), else :func:`new_key`."""
    device = like[0].device
    if follow_opacus:
        return noise_key(device, None, secure, [(tuple(t.shape), t.dtype) for t in like])
    return new_key(device, None, secure)


@noise_key_op.register_fake
def _(like, secure, follow_opacus):
    return like[0].new_empty(2, dtype=torch.int64)


@_registry.op("dp_normal")
def normal_op(like: list[torch.Tensor], std: float, secure: bool) -> list[torch.Tensor]:
    """The torch backend's noise: for each tensor of ``like``, a flat
    ``N(0, std^2)`` draw of its size, in its dtype and on its device, from that
    device's default generator (Opacus's non-secure ``torch.normal``); with
    ``secure``, Opacus's secure draw (four float32 draws from a generator seeded
    from ``os.urandom``, summed, times ``std / 2``)."""
    return [_torch_noise((t.numel(),), std, t.device, None, secure, t.dtype) for t in like]


@normal_op.register_fake
def _(like, std, secure):
    return [t.new_empty(t.numel(), dtype=torch.float32 if secure else t.dtype) for t in like]


def _no_generator_when_compiling(generator) -> None:
    if generator is not None and torch.compiler.is_compiling():
        raise RuntimeError("fastadv.dp under torch.compile draws its noise from the default generator: "
                           "pass generator=None (seed it with torch.manual_seed); a torch.Generator "
                           "cannot be traced into a graph")


def _draw_key(targets, generator, secure: bool, follow_opacus: bool = True) -> torch.Tensor:
    """The key of a kernel backend's noisy call (a device tensor)."""
    if generator is None or secure:
        return noise_key_op(list(targets), bool(secure), follow_opacus)
    _no_generator_when_compiling(generator)
    device = targets[0].device
    if follow_opacus:
        return noise_key(device, generator, secure, [(tuple(t.shape), t.dtype) for t in targets])
    return new_key(device, generator, secure)


def _draw_noise(targets, std: float, generator, secure: bool) -> list[torch.Tensor]:
    """The torch backend's noise for ``targets``, drawn before the sums (the
    generators move as Opacus's draws move them: one per tensor, in order)."""
    if generator is None or secure:
        return normal_op(list(targets), float(std), bool(secure))
    _no_generator_when_compiling(generator)
    return [_torch_noise((t.numel(),), std, t.device, generator, False, t.dtype) for t in targets]


# ---------------------------------------------------------------- the registered compute ops

@_registry.op("dp_clip_and_noise", mutates_args={"summed", "out", "count"})
def clip_and_noise_op(grad_samples: list[torch.Tensor], summed: list[torch.Tensor], out: list[torch.Tensor],
                      count: Optional[torch.Tensor], key: Optional[torch.Tensor], noise: list[torch.Tensor],
                      max_grad_norm: float, std: float, divisor: Optional[float], read_summed: bool,
                      write_summed: bool, secure: bool, true_div: bool, check_raise: bool,
                      backend: str) -> None:
    """``out = (summed + sum_b f_b g[b] + noise) / divisor`` (``summed`` read
    when ``read_summed``, overwritten with the noise-free sum when
    ``write_summed``; empty: no carried sum).  The noise: ``std * z`` from
    ``key`` (kernel backends; None: no noise) or the drawn ``noise`` tensors
    (torch backend; empty: no noise).  ``count`` += the samples dropped for a
    non-finite norm; ``check_raise`` raises before anything is written if one
    was.  ``divisor`` None: no scaling; ``true_div``: Opacus's clip factor as
    ``C / (n + 1e-6)`` (a tensor ``max_grad_norm``), on the torch backend."""
    _run(backend, grad_samples, summed=summed, read_summed=read_summed, write_summed=write_summed, out=out,
         count=count, key=key, noise=noise, max_grad_norm=max_grad_norm, std=std, divisor=divisor,
         secure=secure, true_div=true_div, check_raise=check_raise)


@clip_and_noise_op.register_fake
def _(grad_samples, summed, out, count, key, noise, max_grad_norm, std, divisor, read_summed, write_summed,
      secure, true_div, check_raise, backend):
    return None


@_registry.op("dp_clip_and_accumulate", mutates_args={"summed", "count"})
def clip_and_accumulate_op(grad_samples: list[torch.Tensor], summed: list[torch.Tensor],
                           count: Optional[torch.Tensor], max_grad_norm: float, read_summed: bool,
                           true_div: bool, check_raise: bool, backend: str) -> None:
    """``summed = [summed +] sum_b f_b g[b]`` in place (read when ``read_summed``), no noise."""
    _run(backend, grad_samples, summed=summed, read_summed=read_summed, write_summed=True, out=[],
         count=count, key=None, noise=[], max_grad_norm=max_grad_norm, std=0.0, divisor=None, secure=False,
         true_div=true_div, check_raise=check_raise)


@clip_and_accumulate_op.register_fake
def _(grad_samples, summed, count, max_grad_norm, read_summed, true_div, check_raise, backend):
    return None


@_registry.op("dp_add_noise", mutates_args={"out"})
def add_noise_op(tensors: list[torch.Tensor], out: list[torch.Tensor], key: Optional[torch.Tensor],
                 noise: list[torch.Tensor], std: float, divisor: Optional[float], secure: bool,
                 backend: str) -> None:
    """``out = (tensors + std * z) / divisor``, one launch on the kernel backends."""
    _run(backend, [], summed=tensors, read_summed=True, write_summed=False, out=out, count=None, key=key,
         noise=noise, max_grad_norm=1.0, std=std, divisor=divisor, secure=secure, true_div=False,
         check_raise=False)


@add_noise_op.register_fake
def _(tensors, out, key, noise, std, divisor, secure, backend):
    return None


def _run(backend, gs, *, summed, read_summed, write_summed, out, count, key, noise, max_grad_norm, std,
         divisor, secure, true_div, check_raise) -> None:
    """The three compute ops' one implementation (lists may be empty)."""
    if summed and out and any(o.data_ptr() == s.data_ptr() and o.numel() for o, s in zip(out, summed)):
        raise ValueError("out and summed must be different tensors")
    shapes = [tuple(g.shape[1:]) for g in gs] if gs else [tuple(s.shape) for s in summed]
    args = dict(batch=gs[0].shape[0] if gs else 0, max_grad_norm=max_grad_norm, std=std,
                summed=summed or None, read_summed=read_summed and bool(summed),
                write_summed=write_summed and bool(summed),
                out=out or None, write_out=bool(out), divisor=divisor, secure=bool(secure), count=count,
                check_raise=check_raise)
    if backend == "torch":
        _torch_fused(gs, shapes, noise=noise, true_div=true_div, **args)
        return
    ref = gs[0] if gs else (summed[0] if summed else out[0])
    with device_guard(ref):
        _kernel_fused(backend, [g if g.is_contiguous() else g.contiguous() for g in gs], shapes, key=key,
                      **args)


# ---------------------------------------------------------------- the general form (Python)

def fused_clip_noise(grad_samples, *, max_grad_norm: float, std: float, summed=None,
                     read_summed: bool = False, write_summed: bool = False, out=None,
                     write_out: bool = True, out_dtype: torch.dtype | None = None,
                     shapes=None, expected_batch_size=None, generator=None, secure_mode: bool = False,
                     on_nonfinite: str = "drop", nonfinite_count: torch.Tensor | None = None,
                     backend: str | None = None):
    """The general form of the ops below (the optimizers call it directly):
    validates, picks the backend, draws the key / noise and calls one of the
    registered ops (``dp_clip_and_noise``, ``dp_clip_and_accumulate``,
    ``dp_add_noise``).

    ``max_grad_norm`` as the user gave it (a number or a 0-d tensor: with a
    tensor Opacus's clip factor is ``C / (n + 1e-6)``, with a number
    ``reciprocal(n + 1e-6) * C``; the torch backend follows either, the kernels
    compute the latter, one fp32 rounding apart).

    ``grad_samples``: list of ``[B, *shape_t]`` (may be empty when ``shapes``
    is given: then ``summed`` is read and ``out`` written, the
    ``dp_add_noise`` op).  ``summed``: tensors read (``read_summed``)
    and / or written (``write_summed``: the noise-free sum) in place; allocated
    in ``out_dtype`` (default: each per-sample gradient's dtype) when None and
    written.  ``out``: written with ``(sum + std * z) / expected_batch_size``
    when ``write_out`` (allocated when None).  ``std``: the noise std itself
    (0: no noise, no key drawn).  Returns ``(out, summed)``, each None when
    not written.

    With ``on_nonfinite="raise"`` the key / noise is drawn before the check:
    a call that raises has still moved the generator.
    """
    if on_nonfinite not in NONFINITE:
        raise ValueError(f"on_nonfinite must be one of {NONFINITE}, got {on_nonfinite!r}")
    gs = _tensor_list(grad_samples, "grad_samples")
    batch = _check_batch(gs)
    if shapes is None:
        shapes = [tuple(g.shape[1:]) for g in gs]
    shapes = [tuple(s) for s in shapes]
    if gs:
        for i, (g, shape) in enumerate(zip(gs, shapes)):
            if math.prod(g.shape[1:]) != math.prod(shape):
                raise ValueError(f"grad_samples[{i}] has shape {tuple(g.shape)}, expected "
                                 f"[batch, {', '.join(map(str, shape))}]")
    if not shapes:
        return ([] if write_out else None), ([] if write_summed else None)
    ref = gs[0] if gs else (summed[0] if summed is not None else out[0])
    device = ref.device
    dtypes = [out_dtype or (gs[i].dtype if gs else ref.dtype) for i in range(len(shapes))]
    if summed is not None:
        summed = _tensor_list(summed, "summed")
        _check_targets(summed, shapes, ("grad_samples[0]", gs[0]) if gs else ("summed[0]", summed[0]),
                       "summed")
    elif read_summed:
        raise ValueError("read_summed needs summed tensors")
    if out is not None:
        out = _tensor_list(out, "out")
        _check_targets(out, shapes, ("grad_samples[0]", gs[0]) if gs else ("out[0]", out[0]), "out")
    if not gs and not (read_summed and write_out and not write_summed):
        raise ValueError("without per-sample gradients the op reads summed and writes out "
                         "(read_summed=True, write_out=True, write_summed=False)")
    if not write_out and not write_summed:
        return None, None
    if write_summed and summed is None:
        summed = [torch.empty(s, dtype=dt, device=device) for s, dt in zip(shapes, dtypes)]
    if write_out and out is None:
        out = [torch.empty(s, dtype=(summed[i].dtype if summed is not None else dtypes[i]), device=device)
               for i, s in enumerate(shapes)]
    divisor = _divisor(expected_batch_size)
    true_div = isinstance(max_grad_norm, torch.Tensor)
    max_grad_norm = _number(max_grad_norm, "max_grad_norm")
    std = _number(std, "std")

    name = _choose(backend, device, gs, out if write_out else None, summed)
    count = nonfinite_count
    if on_nonfinite == "raise" and batch:
        count = torch.zeros(1, dtype=torch.int64, device=device)
    check_raise = on_nonfinite == "raise"
    key, noise = None, []
    if write_out and std != 0.0:
        if name == "torch":
            noise = _draw_noise(out, std, generator, secure_mode)
        else:
            key = _draw_key(out, generator, secure_mode)
    secure = bool(secure_mode)
    if not gs:
        add_noise_op(summed, out, key, noise, std, divisor, secure, name)
    elif write_out:
        clip_and_noise_op(gs, summed or [], out, count, key, noise, max_grad_norm, std, divisor,
                          bool(read_summed), bool(write_summed), secure, true_div, check_raise, name)
    else:
        clip_and_accumulate_op(gs, summed, count, max_grad_norm, bool(read_summed), true_div, check_raise,
                               name)
    if count is not None and count is not nonfinite_count and nonfinite_count is not None:
        nonfinite_count.add_(count)
    return (out if write_out else None), (summed if write_summed else None)


def _raise_nonfinite(count: torch.Tensor) -> None:
    n = int(count.sum())  # the one host sync of on_nonfinite="raise"
    if n:
        raise FloatingPointError(
            f"{n} per-sample gradient(s) have a non-finite norm (NaN or inf values, or a norm "
            f"beyond the float32 range); nothing was written.  With on_nonfinite='drop' such "
            f"samples are left out of the sum (clip factor 0) without a host sync.")


def _kernel_fused(name, gs, shapes, *, batch, max_grad_norm, std, summed, read_summed, write_summed,
                  out, write_out, divisor, key, secure, count, check_raise) -> None:
    k = _registry.kernels("dp", name)
    cache = _cache()
    targets = out if write_out else summed
    device = targets[0].device
    n = len(shapes)
    g_list = gs if gs else targets                     # placeholders when there is no per-sample term
    s_list = summed if summed is not None else targets
    keys = [(g_list[i].dtype, targets[i].dtype) for i in range(n)]
    groups: dict = {}
    for i, k_ in enumerate(keys):
        groups.setdefault(k_, []).append(i)
    tables = []
    for (g_dtype, o_dtype), idx in groups.items():
        lists = [[targets[i] for i in idx], [s_list[i] for i in idx], [g_list[i] for i in idx]]
        tables.append((cache.get("dp", lists, chunk=CHUNK), g_dtype, o_dtype))
    n_parts = sum(t.n_chunks for t, _, _ in tables)

    factors = torch.empty((2, batch), dtype=torch.float32, device=device)
    if batch:
        if n_parts:
            partials = torch.empty((batch, n_parts), dtype=torch.float32, device=device)
        else:
            partials = torch.zeros((batch, 1), dtype=torch.float32, device=device)
        col = 0
        for table, g_dtype, _ in tables:
            k.norm_partials(table, g_dtype, batch, partials, col)
            col += table.n_chunks
        k.clip_factors(partials, max_grad_norm, factors, count)
        if check_raise:
            _raise_nonfinite(count)
    noisy = key is not None and write_out
    chunk0 = 0
    for table, g_dtype, o_dtype in tables:
        k.clip_sum(table, g_dtype, o_dtype, batch if gs else 0, factors, key if noisy else None, std, divisor,
                   chunk0, read_summed=read_summed, write_summed=write_summed, write_out=write_out,
                   secure=secure)
        chunk0 += table.n_chunks


def noise_key(device, generator, secure: bool, draws) -> torch.Tensor:
    """The Philox key of one noisy DP call, drawn so that the generators move as
    Opacus's noise moves them (so that, under one seed, everything drawn later
    -- Opacus's Poisson sampler, which draws from the default CPU generator,
    dropout, ... -- draws what it draws next to Opacus).

    ``draws``: ``(shape, dtype)`` of each tensor Opacus would draw noise for,
    in order (``torch.normal(size=shape, dtype=dtype, generator=generator)``).

    * CUDA tensors: :func:`fastadv.kernels.host.new_key` (``torch.randint`` from
      the device's generator).  Opacus's noise draws from that generator too,
      and its Poisson sampler from the CPU one, which neither touches: the data
      order is Opacus's.  The device generator itself advances by another
      amount than Opacus's ``torch.normal`` calls (its later draws differ).
    * CPU tensors (the Triton interpreter): the key is the generator's next two
      ``torch.randint`` words, read from a snapshot of its state; the generator
      is then advanced by exactly the ``torch.normal`` draws Opacus makes (they
      are drawn and dropped: this path is for tests, not speed).
    * ``secure``: :func:`new_key` from ``os.urandom``; no generator moves (Opacus
      draws from its own CSPRNG then)."""
    device = torch.device(device)
    if secure or device.type != "cpu":
        return new_key(device, generator, secure)
    gen = generator if generator is not None else torch.default_generator
    if gen.device.type != "cpu":
        return new_key(device, generator, secure)
    state = gen.get_state()
    key = new_key(device, gen)
    gen.set_state(state)
    for shape, dtype in draws:
        torch.normal(0.0, 1.0, shape, generator=gen, dtype=dtype)
    return key


def _torch_factors(gs, batch, max_grad_norm, device, acc, true_div=False):
    """(factors, finite) in ``acc`` (fp32, or fp64 for fp64 inputs) on ``device``,
    Opacus's formula with non-finite norms dropped (``true_div``: ``C / (n +
    1e-6)``, what Opacus computes when ``max_grad_norm`` is a tensor; else
    ``reciprocal(n + 1e-6) * C``, Python's ``C / tensor``)."""
    norms = torch.stack([torch.linalg.vector_norm(g.reshape(batch, -1), dim=1, dtype=acc)
                         .to(device) for g in gs], dim=1)
    norm = torch.linalg.vector_norm(norms, dim=1)
    finite = torch.isfinite(norm)
    if true_div:
        f = (torch.full((), max_grad_norm, dtype=norm.dtype, device=norm.device) / (norm + 1e-6)).clamp(max=1.0)
    else:
        f = ((norm + 1e-6).reciprocal() * max_grad_norm).clamp(max=1.0)
    return torch.where(finite, f, torch.zeros_like(f)), finite


def _torch_noise(shape, std, device, generator, secure, dtype=torch.float32) -> torch.Tensor:
    """Opacus's non-secure draw: ``torch.normal(0, std, shape, dtype=dtype)`` from ``generator``."""
    if secure:
        gen = torch.Generator(device=device)
        gen.manual_seed(int.from_bytes(os.urandom(8), "little"))
        z = sum(torch.normal(0.0, 1.0, shape, generator=gen, device=device) for _ in range(4))
        return z.mul_(0.5 * std)
    if generator is not None and not host.same_device(generator.device, device):
        return torch.normal(0.0, std, shape, generator=generator, device=generator.device,
                            dtype=dtype).to(device)
    return torch.normal(0.0, std, shape, generator=generator, device=device, dtype=dtype)


def _torch_fused(gs, shapes, *, batch, max_grad_norm, std, summed, read_summed, write_summed, out,
                 write_out, divisor, noise, secure, count, check_raise, true_div=False) -> None:
    """Pure-PyTorch path (any device and float dtype); no host sync.  Opacus's
    ops in Opacus's order (fp32 results are its bits under one seed); ``noise``
    (drawn by :func:`_draw_noise` in each output's dtype, as Opacus draws it;
    empty: no noise) is added to the sums."""
    count_launch("torch.dp_clip_noise")
    factors = finite = None
    targets = [t for t in (out if write_out else []) + (summed or [])]
    acc = torch.float64 if any(t.dtype == torch.float64 for t in list(gs) + targets) else torch.float32
    if gs and batch:
        factors, finite = _torch_factors(gs, batch, max_grad_norm, gs[0].device, acc, true_div)
        if count is not None:
            count.add_((~finite).sum().to(count.device))
            if check_raise:
                _raise_nonfinite(count)
    for i, shape in enumerate(shapes):
        target = out[i] if write_out else summed[i]
        if factors is not None:
            g = gs[i].reshape(batch, -1).to(acc)
            keep = finite.to(g.device).view(batch, 1)
            g = torch.where(keep, g, torch.zeros((), dtype=g.dtype, device=g.device))
            s = torch.einsum("b,bn->n", factors.to(g.device), g).to(target.device)
        else:
            s = torch.zeros(math.prod(shape), dtype=acc, device=target.device)
        if read_summed:
            s = s + summed[i].reshape(-1).to(acc)
        if write_summed:
            summed[i].copy_(s.view(summed[i].shape))
        if write_out:
            if noise:
                s = s + noise[i].reshape(-1).to(acc)
            if divisor is not None:
                s = s / divisor
            out[i].copy_(s.view(out[i].shape))


# ---------------------------------------------------------------- public ops

def clip_and_noise(grad_samples: Sequence[torch.Tensor], max_grad_norm: float, noise_multiplier: float, *,
                   generator: torch.Generator | None = None, expected_batch_size: float | None = None,
                   summed: Sequence[torch.Tensor] | None = None, out: Sequence[torch.Tensor] | None = None,
                   secure_mode: bool = False, on_nonfinite: str = "drop",
                   nonfinite_count: torch.Tensor | None = None,
                   backend: str | None = None) -> list[torch.Tensor]:
    """Clip every sample to L2 norm ``max_grad_norm`` (across all tensors), sum
    over the batch and add ``N(0, (noise_multiplier * max_grad_norm)^2)`` noise.

    Returns one tensor per parameter, ``grad_samples[t].shape[1:]``, in the
    per-sample gradients' dtype (or ``out``'s): what Opacus 1.6 leaves in
    ``p.grad`` after ``add_noise`` and, when ``expected_batch_size`` is given,
    ``scale_grad`` (``loss_reduction="mean"``).

    ``summed``: Opacus's ``p.summed_grad`` (the noise-free clipped sums carried
    over skipped steps): the new clipped sum is added to it in place before the
    noise.  ``out``: tensors to write the result into (contiguous).
    ``nonfinite_count``: int64 device tensor, increased by the number of
    samples dropped for a non-finite norm; ``on_nonfinite="raise"`` raises
    instead (one host sync).  ``generator`` None (the device's default
    generator) is the form ``torch.compile`` traces.  See the module docstring
    for the rest.
    """
    check_hyperparameters(max_grad_norm, noise_multiplier)
    res, _ = fused_clip_noise(grad_samples, max_grad_norm=max_grad_norm,
                              std=noise_std(noise_multiplier, max_grad_norm), summed=summed,
                              read_summed=summed is not None, write_summed=summed is not None, out=out,
                              expected_batch_size=expected_batch_size, generator=generator,
                              secure_mode=secure_mode, on_nonfinite=on_nonfinite,
                              nonfinite_count=nonfinite_count, backend=backend)
    return res


def clip_and_accumulate(grad_samples: Sequence[torch.Tensor], max_grad_norm: float,
                        summed: Sequence[torch.Tensor] | None = None, *, on_nonfinite: str = "drop",
                        nonfinite_count: torch.Tensor | None = None,
                        backend: str | None = None) -> list[torch.Tensor]:
    """``summed[t] += sum_b f_b g_t[b]`` in place (new tensors in the per-sample
    gradients' dtype when ``summed`` is None), no noise: Opacus's
    ``clip_and_accumulate``, for steps that are skipped (virtual batches)."""
    check_hyperparameters(max_grad_norm, 0.0)
    _, res = fused_clip_noise(grad_samples, max_grad_norm=max_grad_norm, std=0.0, summed=summed,
                              read_summed=summed is not None, write_summed=True, write_out=False,
                              on_nonfinite=on_nonfinite, nonfinite_count=nonfinite_count, backend=backend)
    return res


def add_noise(tensors: Sequence[torch.Tensor], std: float, *, expected_batch_size: float | None = None,
              out: Sequence[torch.Tensor] | None = None, generator: torch.Generator | None = None,
              secure_mode: bool = False, backend: str | None = None) -> list[torch.Tensor]:
    """``(x + N(0, std^2)) / expected_batch_size`` for every tensor, out of place
    (one launch for all of them on the kernel backends; ``std = 0``: a copy)."""
    std = _number(std, "std")
    if std < 0:
        raise ValueError(f"std must be >= 0, got {std}")
    xs = _tensor_list(tensors, "tensors")
    xs = [x if x.is_contiguous() else x.contiguous() for x in xs]
    res, _ = fused_clip_noise([], max_grad_norm=1.0, std=std, summed=xs, read_summed=True,
                              shapes=[tuple(x.shape) for x in xs], out=out,
                              expected_batch_size=expected_batch_size, generator=generator,
                              secure_mode=secure_mode, backend=backend)
    return res


# ---------------------------------------------------------------- seed 000: clip the total norm + noise

@_registry.op("dp_seed_clip_noise_", mutates_args={"grads"})
def seed_clip_noise_op(grads: list[torch.Tensor], key: Optional[torch.Tensor], noise: list[torch.Tensor],
                       max_norm: float, noise_multiplier: float, backend: str) -> None:
    """Seed 000's step in place: ``g = g * min(1, C / (||all||_2 + 1e-6)) +
    noise_multiplier * z``, ``z`` from ``key`` (kernel backends) or the drawn
    standard normal ``noise`` (torch backend); None / empty: no noise."""
    if backend == "torch":
        _torch_seed(grads, max_norm, noise_multiplier, noise)
        return
    device = grads[0].device
    with device_guard(grads[0]):
        k = _registry.kernels("dp", backend)
        cache = _cache()
        groups: dict = {}
        for i, g in enumerate(grads):
            groups.setdefault(g.dtype, []).append(i)
        tables = [(cache.get("dp_seed", [[grads[i] for i in idx]], chunk=CHUNK), dtype)
                  for dtype, idx in groups.items()]
        n_parts = sum(t.n_chunks for t, _ in tables)
        partials = torch.empty(n_parts, dtype=torch.float32, device=device) if n_parts else \
            torch.zeros(1, dtype=torch.float32, device=device)
        col = 0
        for table, dtype in tables:
            k.seed_sumsq(table, dtype, partials, col)
            col += table.n_chunks
        norm = torch.empty(1, dtype=torch.float32, device=device)
        k.global_norm(partials, n_parts, norm)
        chunk0 = 0
        for table, dtype in tables:
            k.seed_update(table, dtype, norm, key, max_norm, noise_multiplier, chunk0)
            chunk0 += table.n_chunks


@seed_clip_noise_op.register_fake
def _(grads, key, noise, max_norm, noise_multiplier, backend):
    return None


def clip_grad_norm_and_noise_(grads: Sequence[torch.Tensor], max_norm: float, noise_multiplier: float, *,
                              generator: torch.Generator | None = None,
                              backend: str | None = None) -> None:
    """In place: ``g *= min(1, max_norm / (||all grads|| + 1e-6))`` (as
    ``torch.nn.utils.clip_grad_norm_``), then ``g += noise_multiplier * N(0, 1)``.

    Seed 000's ``DPOptimizer.step``; NOT per-sample DP (see fastadv.dp).
    Kernel backends: per dtype group one reduction launch and one update launch
    (noise drawn inside), one finalize: constant in the number of tensors."""
    gs = _tensor_list(grads, "grads")
    if not gs:
        return
    max_norm = _number(max_norm, "max_grad_norm")
    sigma = _number(noise_multiplier, "noise_multiplier")
    device = gs[0].device
    name = _registry.pick(backend, device, dtypes=[("gradients", g) for g in gs],
                          # a sparse CSR tensor has no is_contiguous: strided= refuses it
                          contiguous=[("gradient", g) for g in gs if g.layout == torch.strided],
                          strided=[("gradients", g) for g in gs], one_device=[("gradients", g) for g in gs])
    key, noise = None, []
    if sigma != 0:
        if name == "torch":
            noise = _draw_noise(gs, 1.0, generator, False)
        else:
            key = _draw_key(gs, generator, False, follow_opacus=False)
    seed_clip_noise_op(gs, key, noise, max_norm, sigma, name)


def _torch_seed(gs, max_norm, sigma, noise) -> None:
    count_launch("torch.dp_seed_clip_noise")
    total = torch.nn.utils.get_total_norm(gs)
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    for g in gs:
        g.mul_(coef.to(g.device))
    for g, z in zip(gs, noise):  # as the seed: g += randn_like(g) * sigma
        g.add_(z.view(g.shape) * sigma)
