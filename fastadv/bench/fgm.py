"""FGM attack + restore: cases and implementations for the benchmark.

Cases: embedding tables users meet (BERT-base 30522x768, DeBERTa-v3 128100x1024,
XLM-R 250002x1024), fp32 and bf16, each with

* a row-sparse gradient: the table's ``nn.Embedding`` really runs forward on a
  16x512 batch of token ids (uniform random, seeded), so fastadv's forward
  pre-hook sees the ids, then backward; every implementation then gets the very
  same gradient tensor values;
* a dense gradient (the tied-LM-head case): random normal, fastadv gets
  ``row_sparse=False``.

On CPU (unless real sizes are asked for) the tables are 128x64 and 4000x128
with a 1x32 id batch, so the whole run takes seconds (the Triton interpreter
runs the row kernels one program per row).

Implementations: ``reference`` (fastadv.reference.FGM), ``compiled``
(``torch.compile`` of the reference's attack and restore; Dynamo meets the
data-dependent branch and handles it as it can), and ``fastadv.FGM`` with each
backend usable on the device (``torch``, ``triton``, ``cuda``).

Check before timing: two attack / restore cycles; after each attack the weights
must equal the reference's (fp32: rtol=1e-5, atol=1e-6; bf16 / fp16 against the
reference run in fp32 and rounded once, within two ulps of the result plus two
ulps of the perturbation, since the seed itself rounds the norm to bf16), after
each restore they must be bit-identical to the original (and, for fastadv, the
parameter keeps its ``data_ptr``, and on CUDA one more attack + restore runs
under ``torch.cuda.set_sync_debug_mode("error")``).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .case import CaseCache, Impl, Prepared, Skip, real_sizes
from .check import SHORT, TOLERANCES, interpreted, skip_unsupported, usable_backends  # TOLERANCES: after attack

EPSILON = 1.0
EMB_NAME = "word_embeddings."
SIZES_FULL = ((30522, 768), (128100, 1024), (250002, 1024))
SIZES_SMALL = ((128, 64), (4000, 128))  # the Triton interpreter runs one program per row
IDS_FULL = (16, 512)
IDS_SMALL = (1, 32)
DTYPES = (torch.float32, torch.bfloat16)


@dataclass(frozen=True)
class Case:
    rows: int
    cols: int
    dtype: torch.dtype
    ids: tuple[int, int] | None  # token batch (row-sparse gradient) or None (dense)

    @property
    def name(self) -> str:
        kind = f"rows={self.ids[0]}x{self.ids[1]}" if self.ids else "dense"
        return f"{self.rows}x{self.cols} {SHORT[self.dtype]} {kind}"

    @property
    def size(self) -> tuple[int, int]:
        return (self.rows, self.cols)

    @property
    def sparse(self) -> bool:
        return self.ids is not None


def cases(device, full: bool | None = None) -> list[Case]:
    """Real sizes on CUDA or with ``full``; small ones on CPU."""
    big = real_sizes(device, full)
    sizes, ids = (SIZES_FULL, IDS_FULL) if big else (SIZES_SMALL, IDS_SMALL)
    return [Case(r, c, dt, sp) for (r, c) in sizes for dt in DTYPES for sp in (ids, None)]


class Model(nn.Module):
    """The smallest model with a matching parameter: ``word_embeddings.weight``."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.word_embeddings = nn.Embedding(weight.shape[0], weight.shape[1], _weight=weight)


class CaseData:
    """Inputs and the expected results of one case, built once and shared by
    every implementation: the original weights, the token ids, the gradient,
    the attacked weights the reference gives (in fp32, rounded once)."""

    def __init__(self, case: Case, device, seed: int = 0):
        device = torch.device(device)
        self.case = case
        self.device = device
        gen = torch.Generator(device=device).manual_seed(seed)
        shape = (case.rows, case.cols)
        self.w0 = torch.randn(shape, generator=gen, device=device).to(case.dtype)
        if case.sparse:
            self.ids = torch.randint(0, case.rows, case.ids, generator=gen, device=device)
            emb = nn.Embedding(case.rows, case.cols, _weight=self.w0.clone())
            out = emb(self.ids)
            upstream = torch.randn(out.shape, generator=gen, device=device).to(case.dtype)
            out.backward(upstream)
            self.g0 = emb.weight.grad.detach()
            del emb, out, upstream
            self.touched_rows = int(torch.unique(self.ids).numel())
        else:
            self.ids = None
            self.g0 = torch.randn(shape, generator=gen, device=device).to(case.dtype)
            self.touched_rows = None
        self.expected = self._reference_attack_fp32()

    def _reference_attack_fp32(self) -> torch.Tensor:
        from fastadv.reference import fgm as ref

        model = Model(self.w0.float().clone())
        model.word_embeddings.weight.grad = self.g0.float()
        f = ref.FGM(model, EMB_NAME, EPSILON)
        f.attack()
        attacked = model.word_embeddings.weight.detach()
        # |perturbation| in fp32: the low-precision seed computes it in its own
        # dtype (a rounded norm), so it may differ by a few of its ulps
        self.perturbation = None if self.case.dtype == torch.float32 else (attacked - self.w0.float()).abs()
        out = attacked.to(self.case.dtype).clone()
        del f, model, attacked
        return out

    def close_to_expected(self, got: torch.Tensor) -> tuple[bool, float]:
        """(within tolerance, max abs error) of attacked weights ``got``.

        fp32: ``|got - exp| <= atol + rtol |exp|``.  bf16 / fp16: two ulps of
        the result plus two ulps of the perturbation,
        ``|got - exp| <= atol + rtol (|exp| + |r|)``."""
        rtol, atol = TOLERANCES[self.case.dtype]
        exp = self.expected.float()
        err = (got.float() - exp).abs()
        allowed = exp.abs().mul_(rtol).add_(atol)
        if self.perturbation is not None:
            allowed.add_(self.perturbation, alpha=rtol)
        ok = bool((err <= allowed).all())
        return ok, float(err.max()) if err.numel() else 0.0

    def model(self) -> Model:
        return Model(self.w0.clone())

    def give_gradient(self, model: Model) -> None:
        """Set the gradient: forward (so hooks see the ids) + backward, then the
        case's exact values; dense: assign the dense gradient."""
        p = model.word_embeddings.weight
        p.grad = None
        if self.case.sparse:
            model.word_embeddings(self.ids).sum().backward()
        if p.grad is None:
            p.grad = self.g0.clone()
        else:
            p.grad.copy_(self.g0)

    def check(self, fgm, model: Model, cycles: int = 2, inplace: bool = False) -> str | None:
        """None if ``fgm`` attacks like the reference and restores bit-exactly
        (and, with ``inplace``, keeps the parameter's ``data_ptr``)."""
        p = model.word_embeddings.weight
        ptr = p.data_ptr()
        for cycle in range(1, cycles + 1):
            fgm.attack()
            ok, err = self.close_to_expected(p.detach())
            if not ok:
                try:  # leave the implementation restored for what comes next
                    fgm.restore()
                except Exception:
                    pass
                return f"attack (cycle {cycle}) differs from the reference: max abs error {err:.3g}"
            fgm.restore()
            if not torch.equal(p.detach(), self.w0):
                return f"restore (cycle {cycle}) is not bit-exact"
            if inplace and p.data_ptr() != ptr:
                return f"data_ptr of the parameter changed (cycle {cycle})"
        return None

    def row_extra(self) -> dict:
        return {"touched_rows": self.touched_rows} if self.case.sparse else {}

    def design_bytes(self) -> int | None:
        try:
            from fastadv.ops.fgm import design_bytes
        except ImportError:
            return None
        c = self.case
        if c.sparse:
            return int(design_bytes(c.rows * c.cols, self.w0.element_size(), self.touched_rows, c.cols))
        return int(design_bytes(c.rows * c.cols, self.w0.element_size()))


_data = CaseCache(CaseData)


def _reference_impl(case: Case, device) -> Impl:
    def setup() -> Prepared:
        from fastadv.reference.fgm import FGM as RefFGM

        data = _data(case, device)
        model = data.model()
        fgm = RefFGM(model, EMB_NAME, EPSILON)
        data.give_gradient(model)

        def step():
            fgm.attack()
            fgm.restore()

        return Prepared(step=step, check=lambda: data.check(fgm, model), extra=data.row_extra())

    return Impl("reference", setup)


def _compiled_impl(case: Case, device) -> Impl:
    def setup() -> Prepared:
        from fastadv.reference.fgm import FGM as RefFGM

        data = _data(case, device)
        model = data.model()
        fgm = RefFGM(model, EMB_NAME, EPSILON)
        data.give_gradient(model)
        try:
            import torch._dynamo
            from torch._dynamo.utils import counters

            torch._dynamo.reset()  # a fresh cache per case: no recompile limit, no stale guards
            counters.clear()
            c_attack = torch.compile(fgm.attack)
            c_restore = torch.compile(fgm.restore)
            c_attack()  # compile now, so a failure is a skip, not a crash
            c_restore()
            captured = int(counters["stats"].get("calls_captured", 0))
        except Exception as exc:
            raise Skip(f"torch.compile failed here: {type(exc).__name__}: "
                       f"{str(exc).splitlines()[0] if str(exc) else ''}") from exc

        class Compiled:
            attack = staticmethod(c_attack)
            restore = staticmethod(c_restore)

        def step():
            c_attack()
            c_restore()

        def teardown():
            torch._dynamo.reset()

        # Dynamo falls back to eager where it cannot trace (the norm test is a
        # data-dependent branch inside the loop: with torch 2.13 the whole
        # attack runs eagerly and only restore's `param.data = backup` is
        # captured); captured_ops says how many calls went into graphs.
        return Prepared(step=step, check=lambda: data.check(Compiled, model),
                        counting="compiled",
                        extra={**data.row_extra(), "captured_ops": captured},
                        teardown=teardown)

    return Impl("compiled", setup)


def _fastadv_impl(case: Case, device, backend: str) -> Impl:
    def setup() -> Prepared:
        try:
            from fastadv import FGM
        except ImportError as exc:
            raise Skip(f"fastadv.FGM is not available ({exc})") from exc
        skip_unsupported(backend, device, case.dtype)
        data = _data(case, device)
        model = data.model()
        fgm = FGM(model, EMB_NAME, EPSILON, backend=backend,
                  row_sparse="auto" if case.sparse else False)
        data.give_gradient(model)

        def step():
            fgm.attack()
            fgm.restore()

        def teardown():
            for name in ("close", "remove_hooks", "remove"):
                fn = getattr(fgm, name, None)
                if callable(fn):
                    fn()
                    break

        extra = data.row_extra()
        slow = interpreted(backend, device)
        if slow:
            extra["interpreted"] = True  # checked and counted, not timed

        def check():
            failure = data.check(fgm, model, inplace=True)
            if failure is None and torch.device(device).type == "cuda":
                failure = _host_sync_on_cuda(fgm)
            return failure

        return Prepared(step=step, check=check,
                        design_bytes=data.design_bytes(), extra=extra, teardown=teardown,
                        timed=not slow)

    return Impl(backend, setup)


def _host_sync_on_cuda(fgm) -> str | None:
    """None if attack + restore run under ``torch.cuda.set_sync_debug_mode("error")``."""
    torch.cuda.synchronize()
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        fgm.attack()
        fgm.restore()
    except RuntimeError as exc:
        torch.cuda.set_sync_debug_mode(previous)
        try:
            fgm.restore()
        except Exception:
            pass
        return f"host sync under torch.cuda.set_sync_debug_mode('error'): {str(exc).splitlines()[0]}"
    finally:
        torch.cuda.set_sync_debug_mode(previous)
    return None


def impls(case: Case, device) -> list[Impl]:
    """reference, compiled, then every fastadv backend usable on ``device``."""
    out = [_reference_impl(case, device), _compiled_impl(case, device)]
    return out + [_fastadv_impl(case, device, b) for b in usable_backends(device)]


def release() -> None:
    """Free the cached case data (call after the last case)."""
    _data.clear()
