"""EMA update (``fastadv.ops.ema``): cases and implementations for the benchmark.

Cases: one ``update()`` of an EMA of every parameter of a BERT-base (199
tensors, 109.5M elements) and a DeBERTa-v3-large (390 tensors, 434.0M
elements) shaped model, fp32 and bf16 (the shapes of
:mod:`fastadv.bench.awp`; on CPU, without ``--full``, the same structures,
tiny).

Implementations: ``reference`` (the Kaggle EMA class,
``fastadv.reference.ema``; fp32 only: in bf16 it rounds the decay to 1.0)
and fastadv.ModelEMA on each backend usable here, the average stored in the
model's dtype.  GB/s counts the design's 3 passes (read the weights and the
average, write the average); ``%copy`` compares them with the device's copy
bandwidth measured in the same run.

Check before timing: after the weights move by 1, one update gives
``decay * average + (1 - decay) * w`` (fp32: rtol 1e-5; bf16: two ulps).
"""
from __future__ import annotations


import torch

from .awp import MODELS_FULL, MODELS_SMALL, ModelCase, ShapeModel, model_shapes
from .case import CaseCache, Impl, Prepared, Skip, real_sizes
from .check import SHORT, interpreted, skip_unsupported, usable_backends

DECAY = 0.999


class Case(ModelCase):
    WHAT = "update"


def cases(device, full: bool | None = None) -> list[Case]:
    """Real shapes on CUDA or with ``full``; tiny ones on CPU."""
    models = MODELS_FULL if real_sizes(device, full) else MODELS_SMALL
    return [Case(m, dt) for m in models for dt in (torch.float32, torch.bfloat16)]


class Data:
    """The model's starting weights, built once per case."""

    def __init__(self, case: Case, device):
        gen = torch.Generator(device=device).manual_seed(0)
        self.w0 = {n: (0.05 * torch.randn(s, generator=gen, device=device)).to(case.dtype)
                   for n, s in model_shapes(*case.model[1:]).items()}

    def model(self) -> ShapeModel:
        return ShapeModel({n: v.clone() for n, v in self.w0.items()})


_data = CaseCache(Data)


def release() -> None:
    _data.clear()


def _checker(model, ema, shadow: dict, dtype: torch.dtype):
    """Move every weight by 1, update once, compare with the formula."""
    start = {n: s.clone() for n, s in shadow.items()}
    tol = 1e-5 if dtype == torch.float32 else 2 * 2**-7

    def check() -> str | None:
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1.0)
        ema.update()
        for n, p in model.named_parameters():
            exp = DECAY * start[n].float() + (1 - DECAY) * p.detach().float()
            if not torch.allclose(shadow[n].float(), exp, rtol=tol, atol=1e-6):
                return f"EMA of {n} differs from the formula"
        return None

    return check


def _impl(case: Case, device, name: str) -> Impl:
    def setup() -> Prepared:
        from fastadv.averaging import ModelEMA
        from fastadv.reference.ema import EMA as RefEMA

        skip_unsupported(name, device, case.dtype)
        model = _data(case, device).model()
        if name == "reference":
            if case.dtype != torch.float32:
                raise Skip("the Kaggle EMA computes in the model's dtype: in bf16 it rounds "
                           f"decay={DECAY} to 1.0 and its average never moves")
            ema = RefEMA(model, DECAY)
            ema.register()
        else:
            ema = ModelEMA(model, DECAY, backend=name)
        numel = sum(p.numel() for p in model.parameters())
        es = next(model.parameters()).element_size()
        slow = interpreted(name, device)
        extra = {"tensors": len(ema.shadow), "elements": numel}
        if slow:
            extra["interpreted"] = True
        return Prepared(step=ema.update, check=_checker(model, ema, ema.shadow, case.dtype),
                        design_bytes=3 * numel * es if name in ("triton", "cuda") else None,
                        extra=extra, timed=not slow)

    return Impl(name, setup)


def impls(case: Case, device) -> list[Impl]:
    """reference, then every fastadv backend usable on ``device``."""
    return [_impl(case, device, n) for n in ["reference"] + usable_backends(device)]
