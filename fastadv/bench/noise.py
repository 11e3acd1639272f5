"""Noise injection: cases and implementations for the benchmark.

Ops (each timed per call):

* ``gaussian``     ``x + N(0, std^2)`` out of place (reference: ``x + torch.randn_like(x) * std``);
* ``gaussian_``    the same in place (reference: ``x.add_(torch.randn_like(x) * std)``);
* ``token_ids``    the seed's token-id noise;
* ``weight_noise`` ``with weight_noise(model, std): pass``, enter + exit, over the
  parameter shapes of BERT-base (199 tensors, 101 named ``*weight*``) and
  BERT-large.

NEFTune and SiFT have their own cases (:mod:`fastadv.bench.neftune`,
:mod:`fastadv.bench.sift`).

Sizes: on CUDA (or with ``--full``) activations of 16x512x768 and embedding
tables of 30522x768 and 250002x1024, fp32 and bf16;
on CPU small stand-ins, so the run takes seconds.  Cases come in tiers, 0
small, 1 medium, 2 large (``size`` = tier + 1; ``--quick`` runs tier 0, all ops).

Implementations: ``reference``, ``compiled`` (``torch.compile`` of the
reference; elementwise ops only: Inductor draws the noise inside its fused
kernel too, the fair baseline), and each fastadv backend usable here.
The ``GB/s`` and ``%copy`` columns use the bytes the op must move
(``fastadv.ops.noise.design_bytes``: read x once, write the output once, ...)
for fastadv rows, and the counted aten traffic for the others.

Checks before timing: the noise of the output is N(0, std^2) (mean and std
within 6 sigma of the sampling error, plus rounding slack in bf16), token
ids stay in the vocabulary, weight_noise restores every weight bit for
bit (same ``data_ptr``).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .case import CaseCache, Impl, Prepared, Skip, real_sizes
from .check import SHORT, compile_or_skip, interpreted, noise_spread, not_restored, skip_unsupported, usable_backends

STD = 0.1
TOKEN_FACTOR = 3.0
VOCAB = 30522
DTYPES = (torch.float32, torch.bfloat16)

# (op, tier) -> shape; the full sizes (CUDA or --full) and the CPU stand-ins
SHAPES_FULL = {
    ("gaussian", 0): (16, 512, 768), ("gaussian", 1): (30522, 768), ("gaussian", 2): (250002, 1024),
    ("gaussian_", 0): (16, 512, 768), ("gaussian_", 1): (30522, 768), ("gaussian_", 2): (250002, 1024),
    ("token_ids", 0): (16, 512), ("token_ids", 1): (256, 2048),
    ("weight_noise", 0): ("bert-base",), ("weight_noise", 1): ("bert-large",),
}
SHAPES_SMALL = {
    ("gaussian", 0): (4, 64, 64), ("gaussian", 1): (1000, 256),
    ("gaussian_", 0): (4, 64, 64), ("gaussian_", 1): (1000, 256),
    ("token_ids", 0): (16, 512),
    ("weight_noise", 0): ("bert-mini",),
}
# hidden, layers, intermediate, vocab
MODELS = {"bert-base": (768, 12, 3072, 30522), "bert-large": (1024, 24, 4096, 30522),
          "bert-mini": (64, 2, 256, 1000)}


@dataclass(frozen=True)
class Case:
    op: str
    shape: tuple
    dtype: torch.dtype
    tier: int

    @property
    def name(self) -> str:
        dims = self.shape[0] if isinstance(self.shape[0], str) else "x".join(map(str, self.shape))
        return f"{self.op} {dims} {SHORT[self.dtype]}"

    @property
    def size(self) -> int:
        return self.tier + 1  # --quick keeps the cases of the first size (must be truthy)


def cases(device, full: bool | None = None) -> list[Case]:
    """Full sizes on CUDA or with ``full``; CPU stand-ins otherwise; fp32 and bf16
    (token ids: int64, listed once)."""
    big = real_sizes(device, full)
    shapes = SHAPES_FULL if big else SHAPES_SMALL
    out = []
    for tier in (0, 1, 2):
        for (op, t), shape in shapes.items():
            if t != tier:
                continue
            for dt in (DTYPES if op != "token_ids" else (torch.float32,)):
                out.append(Case(op, shape, dt, tier))
    return out


# ---- data --------------------------------------------------------------------------------------

class BertShapes(nn.Module):
    """A parameter-only model with BERT's parameter names and shapes (no forward)."""

    def __init__(self, hidden, layers, inter, vocab, dtype, device):
        super().__init__()
        kw = dict(dtype=dtype, device=device)
        emb = nn.Module()
        emb.word_embeddings = nn.Embedding(vocab, hidden, **kw)
        emb.position_embeddings = nn.Embedding(512, hidden, **kw)
        emb.token_type_embeddings = nn.Embedding(2, hidden, **kw)
        emb.LayerNorm = nn.LayerNorm(hidden, **kw)
        self.embeddings = emb
        self.layer = nn.ModuleList()
        for _ in range(layers):
            block = nn.Module()
            for name in ("query", "key", "value", "attention_output"):
                setattr(block, name, nn.Linear(hidden, hidden, **kw))
            block.attention_LayerNorm = nn.LayerNorm(hidden, **kw)
            block.intermediate = nn.Linear(hidden, inter, **kw)
            block.output = nn.Linear(inter, hidden, **kw)
            block.output_LayerNorm = nn.LayerNorm(hidden, **kw)
            self.layer.append(block)
        self.pooler = nn.Linear(hidden, hidden, **kw)


class CaseData:
    """Inputs of one case, built once and shared by its implementations."""

    def __init__(self, case: Case, device):
        self.case, self.device = case, torch.device(device)
        gen = torch.Generator(device=self.device).manual_seed(0)
        c = case
        if c.op == "weight_noise":
            h, layers, inter, vocab = MODELS[c.shape[0]]
            self.model = BertShapes(h, layers, inter, vocab, c.dtype, self.device)
            self.params = [p for n, p in self.model.named_parameters() if "weight" in n]
            self.numel = sum(p.numel() for p in self.params)
            self.original = [p.detach().clone() for p in self.params]
        elif c.op == "token_ids":
            self.ids = torch.randint(0, VOCAB, c.shape, device=self.device, generator=gen)
            self.numel = self.ids.numel()
        else:
            self.x = torch.randn(c.shape, device=self.device, generator=gen).to(c.dtype)
            self.numel = self.x.numel()

    def element_size(self) -> int:
        return torch.empty((), dtype=self.case.dtype).element_size()

    def design_bytes(self) -> int:
        from fastadv.ops.noise import design_bytes

        c = self.case
        s = self.element_size()
        if c.op == "gaussian":
            return design_bytes("noise", self.numel, s)
        if c.op == "gaussian_":
            return design_bytes("noise_", self.numel, s)
        if c.op == "token_ids":
            return design_bytes("token_ids", self.numel, 8)
        return design_bytes("weight_noise", self.numel, s)

    def check_noise(self, out: torch.Tensor, x: torch.Tensor, scale: float) -> str | None:
        return noise_spread(out, x, scale, self.case.dtype)


_data = CaseCache(CaseData)


def release() -> None:
    _data.clear()


# ---- implementations ---------------------------------------------------------------------------------

def _functions(case: Case, d: CaseData, impl: str):
    """(step, check) of ``impl`` ('reference', 'compiled', or a backend) on the case."""
    from fastadv import noise as fnoise
    from fastadv.reference import noise as ref

    b = None if impl in ("reference", "compiled") else impl
    op = case.op
    if op == "gaussian":
        fn = (lambda: ref.add_gaussian_noise(d.x, STD)) if b is None else \
            (lambda: fnoise.add_gaussian_noise(d.x, STD, backend=b))
        return fn, lambda f: d.check_noise(f(), d.x, STD)
    if op == "gaussian_":
        buf = d.x.clone()
        fn = (lambda: buf.add_(torch.randn_like(buf) * STD)) if b is None else \
            (lambda: fnoise.add_gaussian_noise_(buf, STD, backend=b))

        def check(f):
            buf.copy_(d.x)
            f()
            return d.check_noise(buf, d.x, STD)
        return fn, check
    if op == "token_ids":
        fn = (lambda: ref.noisy_token_ids(d.ids, TOKEN_FACTOR, VOCAB)) if b is None else \
            (lambda: fnoise.noisy_token_ids(d.ids, TOKEN_FACTOR, VOCAB, backend=b))

        def check(f):
            out = f()
            if out.dtype != torch.int64 or int(out.min()) < 0 or int(out.max()) >= VOCAB:
                return "ids outside the vocabulary"
            moved = float((out != d.ids).double().mean())  # P(floor(3 z) != 0) = 0.87
            return None if abs(moved - 0.8694) < 0.02 else f"{moved:.3f} of the ids moved (want 0.869)"
        return fn, check
    if op == "weight_noise":
        if b is None:
            def fn():
                with ref.weight_noise(d.model, STD):
                    pass
        else:
            def fn():
                with fnoise.weight_noise(d.model, STD, backend=b):
                    pass

        def check(f):
            ptrs = [p.data_ptr() for p in d.params]
            inner = {}
            ctx = ref.weight_noise(d.model, STD) if b is None else fnoise.weight_noise(d.model, STD, backend=b)
            with ctx:
                p, o = d.params[0], d.original[0]
                inner["msg"] = d.check_noise(p.detach(), o, STD)
            return not_restored(enumerate(d.params), dict(enumerate(d.original)),
                                ptrs if b is not None else None) or inner["msg"]
        return fn, check
    raise ValueError(op)


def _reference_impl(case: Case, device) -> Impl:
    def setup() -> Prepared:
        d = _data(case, device)
        fn, check = _functions(case, d, "reference")
        return Prepared(step=fn, check=lambda: check(fn))

    return Impl("reference", setup)


def _compiled_impl(case: Case, device) -> Impl:
    def setup() -> Prepared:
        if case.op == "weight_noise":
            raise Skip("not compiled: a context manager with a host-side restore")
        d = _data(case, device)
        fn, check = _functions(case, d, "compiled")
        compiled = compile_or_skip(fn)
        return Prepared(step=compiled, check=lambda: check(compiled), counting="compiled",
                        teardown=torch._dynamo.reset)

    return Impl("compiled", setup)


def _fastadv_impl(case: Case, device, backend: str) -> Impl:
    def setup() -> Prepared:
        skip_unsupported(backend, device, case.dtype)
        slow = interpreted(backend, device)
        d = _data(case, device)
        fn, check = _functions(case, d, backend)
        extra = {"interpreted": True} if slow else {}
        return Prepared(step=fn, check=lambda: check(fn), design_bytes=d.design_bytes(), extra=extra,
                        timed=not slow)

    return Impl(backend, setup)


def impls(case: Case, device) -> list[Impl]:
    """reference, compiled, then every fastadv backend usable on ``device``."""
    out = [_reference_impl(case, device), _compiled_impl(case, device)]
    return out + [_fastadv_impl(case, device, b) for b in usable_backends(device)]
