"""AWP attack step: cases and implementations for the benchmark.

AWP cases: ``_save()`` + one ``_attack_step()`` + ``_restore()`` (the
perturbation work of ``attack_backward``, without the model's forward and
backward) over the parameters of a BERT-base (199 tensors, 109.5M elements;
101 ``*weight*`` tensors perturbed) and a DeBERTa-v3-large (390 tensors,
434.0M elements; 196 perturbed) shaped model, fp32 and bf16, every parameter with a
random gradient.  On CPU (without ``--full``) the same structures, tiny.

Implementations: ``reference`` (fastadv.reference.AWP), ``compiled``
(``torch.compile`` of its three methods), and fastadv.AWP with every backend
usable here: ``torch`` is the ``torch._foreach_*`` version, ``triton`` and
``cuda`` the fused kernels.  Check before timing: after the step the
perturbed weights equal the reference's run in fp32 (fp32: rtol 1e-5; bf16:
two ulps of the weight plus two of the step), after restore they are
bit-identical to the original (fastadv: same ``data_ptr``).

Extra columns: ``tensors`` / ``elements`` perturbed, and on CUDA
``peak_extra_mb``, the peak memory above the model and its gradients during
the first save + step + restore (the seed holds the backup and both clamp
bounds: 3x the perturbed weights; fastadv holds one backup).

The model shapes are shared with :mod:`fastadv.bench.ema` and
:mod:`fastadv.bench.sam`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from .case import CaseCache, Impl, Prepared, Skip, real_sizes
from .check import SHORT, close, interpreted, not_restored, skip_unsupported, usable_backends

ADV_LR, ADV_EPS = 1.0, 0.2

# (name, vocab, dim, layers, intermediate, extra) ; extra: "bert" or "deberta" tables
MODELS_FULL = (("bert-base", 30522, 768, 12, 3072, "bert"),
               ("deberta-v3-large", 128100, 1024, 24, 4096, "deberta"))
MODELS_SMALL = (("bert-tiny", 1000, 64, 2, 256, "bert"),
                ("deberta-tiny", 2000, 96, 2, 384, "deberta"))


def model_shapes(vocab: int, dim: int, layers: int, inter: int, kind: str) -> dict[str, tuple[int, ...]]:
    """Parameter names and shapes of a BERT / DeBERTa-v3 encoder (HF naming, '.' -> '_')."""
    s: dict[str, tuple[int, ...]] = {"embeddings_word_embeddings_weight": (vocab, dim)}
    if kind == "bert":
        s["embeddings_position_embeddings_weight"] = (512, dim)
        s["embeddings_token_type_embeddings_weight"] = (2, dim)
    s["embeddings_LayerNorm_weight"] = s["embeddings_LayerNorm_bias"] = (dim,)
    proj = ("query", "key", "value") if kind == "bert" else ("query_proj", "key_proj", "value_proj")
    for i in range(layers):
        p = f"encoder_layer_{i}_"
        for n in [f"attention_self_{q}" for q in proj] + ["attention_output_dense"]:
            s[p + n + "_weight"], s[p + n + "_bias"] = (dim, dim), (dim,)
        s[p + "attention_output_LayerNorm_weight"] = s[p + "attention_output_LayerNorm_bias"] = (dim,)
        s[p + "intermediate_dense_weight"], s[p + "intermediate_dense_bias"] = (inter, dim), (inter,)
        s[p + "output_dense_weight"], s[p + "output_dense_bias"] = (dim, inter), (dim,)
        s[p + "output_LayerNorm_weight"] = s[p + "output_LayerNorm_bias"] = (dim,)
    if kind == "bert":
        s["pooler_dense_weight"], s["pooler_dense_bias"] = (dim, dim), (dim,)
    else:
        s["encoder_rel_embeddings_weight"] = (512, dim)
        s["encoder_LayerNorm_weight"] = s["encoder_LayerNorm_bias"] = (dim,)
    return s


@dataclass(frozen=True)
class ModelCase:
    """A case over one model's tensor shapes in one dtype (AWP, SAM, EMA);
    ``WHAT`` names what the case times."""
    model: tuple        # an entry of MODELS_FULL / MODELS_SMALL
    dtype: torch.dtype
    WHAT: ClassVar[str] = ""

    @property
    def name(self) -> str:
        return f"{self.WHAT} {self.model[0]} {SHORT[self.dtype]}"

    @property
    def size(self):
        return self.model[0]


class Case(ModelCase):
    WHAT = "save+step+restore"


def cases(device, full: bool | None = None) -> list[Case]:
    """Real shapes on CUDA or with ``full``; tiny ones on CPU."""
    big = real_sizes(device, full)
    models = MODELS_FULL if big else MODELS_SMALL
    return [Case(m, dt) for m in models for dt in (torch.float32, torch.bfloat16)]


class ShapeModel(nn.Module):
    """Parameters with the given names and shapes (values and gradients given)."""

    def __init__(self, values: dict[str, torch.Tensor]):
        super().__init__()
        for name, v in values.items():
            self.register_parameter(name, nn.Parameter(v))


class Data:
    """Weights, gradients and the reference's perturbed weights (fp32, rounded once)."""

    def __init__(self, case: Case, device):
        self.case, self.device = case, torch.device(device)
        gen = torch.Generator(device=self.device).manual_seed(0)
        shapes = model_shapes(*case.model[1:])
        self.w0 = {n: (0.05 * torch.randn(s, generator=gen, device=self.device)).to(case.dtype)
                   for n, s in shapes.items()}
        self.g = {n: (1e-3 * torch.randn(s, generator=gen, device=self.device)).to(case.dtype)
                  for n, s in shapes.items()}
        self.perturbed = [n for n in shapes if "weight" in n]
        self.elements = sum(self.w0[n].numel() for n in self.perturbed)
        self.expected = self._reference_fp32()

    def model(self, dtype=None) -> ShapeModel:
        dtype = dtype or self.case.dtype
        m = ShapeModel({n: v.to(dtype).clone() for n, v in self.w0.items()})
        for n, p in m.named_parameters():
            p.grad = self.g[n].to(dtype)
        return m

    def _reference_fp32(self) -> dict[str, torch.Tensor]:
        from fastadv.reference import AWP as RefAWP
        m = self.model(torch.float32)
        ref = RefAWP(m, None, adv_lr=ADV_LR, adv_eps=ADV_EPS)
        ref._save()
        ref._attack_step()
        out = {n: m.get_parameter(n).detach().to(self.case.dtype) for n in self.perturbed}
        ref._restore()
        return out

    def check_awp(self, awp, model, inplace: bool) -> str | None:
        ptrs = [p.data_ptr() for p in model.parameters()]
        awp._save()
        awp._attack_step()
        for n in self.perturbed:
            ok, err = close(model.get_parameter(n).detach(), self.expected[n],
                            self.expected[n].float() - self.w0[n].float())
            if not ok:
                awp._restore()
                return f"{n} after the step differs from the reference: max abs {err:.3g}"
        awp._restore()
        return not_restored(model.named_parameters(), self.w0, ptrs if inplace else None)

    def extra(self) -> dict:
        return {"tensors": len(self.perturbed), "elements": self.elements}


_data = CaseCache(Data)


def _awp_step(awp):
    def step():
        awp._save()
        awp._attack_step()
        awp._restore()
    return step


def _peak_extra_mb(step, device) -> float | None:
    """Peak memory above what is allocated before ``step()`` runs (CUDA only)."""
    if torch.device(device).type != "cuda":
        return None
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    step()
    torch.cuda.synchronize(device)
    return round((torch.cuda.max_memory_allocated(device) - base) / 1e6, 1)


def _awp_impl(case: Case, device, name: str) -> Impl:
    def setup() -> Prepared:
        from fastadv.adversarial.awp import AWP
        from fastadv.ops.awp import design_bytes
        from fastadv.reference import AWP as RefAWP

        skip_unsupported(name, device, case.dtype)
        data = _data(case, device)
        model = data.model()
        fused = name not in ("reference", "compiled")
        if fused:
            awp = AWP(model, None, adv_lr=ADV_LR, adv_eps=ADV_EPS, backend=name)
        else:
            awp = RefAWP(model, None, adv_lr=ADV_LR, adv_eps=ADV_EPS)
        teardown = None
        if name == "compiled":
            awp = _compiled(awp)
            teardown = torch._dynamo.reset
        step = _awp_step(awp)
        extra = data.extra()
        peak = _peak_extra_mb(step, device)  # the first call: allocations included
        if peak is not None:
            extra["peak_extra_mb"] = peak
        design = None
        if name in ("triton", "cuda"):
            design = design_bytes({data.w0[data.perturbed[0]].element_size(): data.elements})
        slow = interpreted(name, device)
        if slow:
            extra["interpreted"] = True
        return Prepared(step=step, check=lambda: data.check_awp(awp, model, inplace=fused),
                        design_bytes=design, counting="compiled" if name == "compiled" else "dispatch",
                        extra=extra, teardown=teardown, timed=not slow)

    return Impl(name, setup)


def _compiled(ref):
    """The reference with its three methods compiled (a Skip if compiling fails)."""
    try:
        import torch._dynamo
        torch._dynamo.reset()
        save, attack, restore = (torch.compile(f) for f in (ref._save, ref._attack_step, ref._restore))

        class Compiled:
            _save, _attack_step, _restore = staticmethod(save), staticmethod(attack), staticmethod(restore)

        _awp_step(Compiled)()  # compile now: a failure is a skip, not a crash
        return Compiled
    except Exception as exc:
        raise Skip(f"torch.compile failed here: {type(exc).__name__}: "
                   f"{str(exc).splitlines()[0] if str(exc) else ''}") from exc


def impls(case: Case, device) -> list[Impl]:
    """reference, compiled, then every fastadv backend usable on ``device``."""
    return [_awp_impl(case, device, n) for n in ["reference", "compiled"] + usable_backends(device)]


def release() -> None:
    _data.clear()
