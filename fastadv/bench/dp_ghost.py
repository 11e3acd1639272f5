"""A whole DP-SGD step (forward, backward(s), clip, noise, optimizer step) of
three models, every way of making it private (issue 13's bench).

Models: a ResNet-18 with GroupNorm (plain torch, :class:`fastadv.bench.dp.ResNet18GN`),
BERT-base (sequence classification) and GPT-2 small (language model, head
tied to the token embedding), both built from transformers configs, dropout
off (the check compares two separate runs).  GPU (or ``full``): the real
sizes, 32x32 images / 64 tokens, B = 32, 256, 1024; CPU: tiny widths and
B = 4 (the CPU main job must stay quick).

Implementations (``impl``):

* ``nonprivate`` -- the plain model and SGD, the throughput yardstick;
* ``reference`` -- Opacus vanilla (``opacus.PrivacyEngine``, per-sample
  gradients from hooks), the reference of the check and of ``speedup``;
* ``opacus-ghost`` -- Opacus's fast gradient clipping (``grad_sample_mode="ghost"``);
  skipped for tied weights (GPT-2), which Opacus's ghost mode refuses;
* ``fastadv-vanilla`` / ``fastadv-ghost`` / ``fastadv-bk`` -- ``fastadv.dp.PrivacyEngine``
  with ``grad_sample_mode`` ``"hooks"`` (the default) / ``"ghost"`` / ``"bk"``,
  on the default backend (``auto``: the row's ``backend`` says which ran).

Columns besides the bench's own (``ms`` GPU only, launches, syncs, bytes):
``peak_mb`` -- the peak memory of one step (after one warm-up step) above
what was live before it, in 1e6 bytes (CUDA: ``torch.cuda.max_memory_allocated``;
CPU: the profiler's memory events, as tests/test_dp_ghost.py measures it),
``peak_vs_nonprivate`` its ratio to the nonprivate row's, and on CUDA
``peak_total_mb``, the whole peak (parameters, inputs and state included);
``vs_nonprivate`` -- throughput as a fraction of the non-private step
(nonprivate ms / ms; :func:`fastadv.bench.report.add_derived` fills it on timed
GPU rows, like ``speedup``, which is against Opacus vanilla here).

Check (noise_multiplier = 0): every DP implementation's private gradient
(``p.grad`` after one step) equals Opacus vanilla's, rtol 1e-4, atol 1e-6 (the
tolerance of tests/test_dp_ghost.py: a whole model's fp32 step in a different
summation order), on the first ``CHECK_BATCH`` samples of the case (Opacus
vanilla's per-sample gradients of BERT-base at B = 1024 do not fit a GPU).
"""
from __future__ import annotations

import gc
import warnings
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from .case import CaseCache, Impl, Prepared, Skip, real_sizes, require
from .dp import ResNet18GN

warnings.filterwarnings("ignore", message="Secure RNG turned off")
warnings.filterwarnings("ignore", message="Full backward hook is firing")

SIGMA = 1.0            # noise multiplier of the timed steps
C = 1.0                # max_grad_norm
LR = 0.1
GPU_BATCHES = (32, 256, 1024)
CHECK_BATCH = 32       # the check runs on at most this many samples
TOL = dict(rtol=1e-4, atol=1e-6)
IMPLS = ("nonprivate", "reference", "opacus-ghost", "fastadv-vanilla", "fastadv-ghost", "fastadv-bk")
FASTADV_MODES = {"fastadv-vanilla": "hooks", "fastadv-ghost": "ghost", "fastadv-bk": "bk"}


# ---------------------------------------------------------------- models

class HFLogits(nn.Module):
    """Logits of an HF model, with position ids of shape [B, T]: a [1, T]
    buffer has no batch dimension, so neither Opacus nor fastadv could split
    its gradient contribution by sample."""

    def __init__(self, model: nn.Module, token_types: bool = False):
        super().__init__()
        self.model = model
        self.token_types = token_types

    def forward(self, ids):
        b, t = ids.shape
        # contiguous ids for every embedding: Opacus's ghost embedding norm
        # calls .view on them (an expanded [1, T] buffer raises there)
        kw = {"position_ids": torch.arange(t, device=ids.device).expand(b, t).contiguous()}
        if self.token_types:
            kw["token_type_ids"] = torch.zeros_like(ids)
        return self.model(input_ids=ids, **kw).logits


def _bert(real: bool) -> nn.Module:
    from transformers import BertConfig, BertForSequenceClassification
    size = {} if real else dict(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                intermediate_size=32, max_position_embeddings=16)
    cfg = BertConfig(num_labels=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, **size)
    return HFLogits(BertForSequenceClassification(cfg), token_types=True)


def _gpt2(real: bool) -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel
    size = {} if real else dict(vocab_size=64, n_embd=16, n_layer=1, n_head=2, n_positions=16)
    cfg = GPT2Config(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **size)
    return HFLogits(GPT2LMHeadModel(cfg))


# ---------------------------------------------------------------- cases

@dataclass(frozen=True)
class Case:
    model: str           # "resnet18", "bert-base", "gpt2"
    batch: int
    real: bool           # real sizes (GPU) or the tiny CPU stand-ins
    tier: int = 0        # --quick runs the first tier

    @property
    def name(self) -> str:
        what = {"resnet18": "ResNet-18(GN) 32x32", "bert-base": "BERT-base T=64", "gpt2": "GPT-2 small T=64"}
        tiny = {"resnet18": "ResNet-18(GN, w=4) 16x16", "bert-base": "BERT-tiny T=8", "gpt2": "GPT-2-tiny T=8"}
        return f"DP step {(what if self.real else tiny)[self.model]} B={self.batch}"

    @property
    def size(self):
        return self.tier + 1

    @property
    def tied(self) -> bool:
        return self.model == "gpt2"   # GPT2LMHeadModel ties its head to the token embedding

    def build(self) -> nn.Module:
        if self.model == "resnet18":
            return ResNet18GN(64 if self.real else 4)
        return (_bert if self.model == "bert-base" else _gpt2)(self.real)

    def row_extra(self) -> dict:
        return {"batch": self.batch, "model": self.model}


def cases(device, full: bool | None = None) -> list[Case]:
    """Real sizes on CUDA or with ``full`` (tiers B = 32, 256, 1024); on CPU
    one tiny case per model at B = 4: BERT in the first tier (the CPU main job
    must stay quick), GPT-2 (tied head) and the ResNet in the second
    (``--full``; the ResNet's 21 convolutions make a DP step cost seconds on CPU)."""
    models = ("resnet18", "bert-base", "gpt2")
    if real_sizes(device, full):
        return [Case(m, b, True, tier) for tier, b in enumerate(GPU_BATCHES) for m in models]
    return [Case("bert-base", 4, False, 0), Case("gpt2", 4, False, 1), Case("resnet18", 4, False, 1)]


class StepData:
    """The inputs, labels and initial weights of one case, and Opacus
    vanilla's private gradient on the check batch (computed once)."""

    def __init__(self, case: Case, device):
        gen = torch.Generator(device="cpu").manual_seed(0)
        torch.manual_seed(0)
        model = case.build()
        self.state = model.state_dict()
        b = case.batch
        if case.model == "resnet18":
            hw = 32 if case.real else 16
            x, y = torch.randn(b, 3, hw, hw, generator=gen), torch.randint(0, 10, (b,), generator=gen)
        else:
            vocab, t = model.model.config.vocab_size, 64 if case.real else 8
            # BERT's ids avoid its padding_idx (0): Opacus vanilla gives the padding row
            # a per-sample gradient, autograd and fastadv's ghost / bk give it none
            # (docs/dp.md), so a pad token changes Opacus's clip factors: every parameter would differ
            low = 1 if case.model == "bert-base" else 0
            x = torch.randint(low, vocab, (b, t), generator=gen)
            y = (torch.randint(0, 2, (b,), generator=gen) if case.model == "bert-base"
                 else torch.randint(0, vocab, (b, t), generator=gen))
        self.x, self.y = x.to(device), y.to(device)
        self.case, self.device = case, device
        self._expected = None

    def model(self) -> nn.Module:
        m = self.case.build()
        m.load_state_dict(self.state)
        return m.to(self.device)

    def batch(self, n: int | None = None):
        n = self.case.batch if n is None else n
        return self.x[:n], self.y[:n]

    def loader(self, n: int):
        x, y = self.batch(n)
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=n)

    def expected(self) -> dict:
        """Opacus vanilla's ``p.grad`` (sigma = 0) after one step on the check batch."""
        if self._expected is None:
            model, step = make_step(self, "reference", 0.0, min(self.case.batch, CHECK_BATCH))
            step()
            self._expected = {n: p.grad.clone() for n, p in model.named_parameters()}
        return self._expected


# ---------------------------------------------------------------- one step, each way

def _loss(out, y):
    """Mean cross-entropy; token level (GPT-2) over all tokens: the per-sample
    unit of Opacus and fastadv stays the sequence."""
    if y.dim() == 2:
        return F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))
    return F.cross_entropy(out, y)


def _loss_ghost(criterion, out, y):
    """The ghost-mode criterion wrapper's loss (fastadv's takes ``shape`` for
    token-level losses, to know which tokens belong to which sample)."""
    if y.dim() == 2:
        return criterion(out.reshape(-1, out.shape[-1]), y.reshape(-1), shape=out.shape)
    return criterion(out, y)


def make_step(data: StepData, impl: str, sigma: float, n: int):
    """(the raw model, one training step on the first ``n`` samples) of ``impl``."""
    model = data.model()
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    x, y = data.batch(n)
    if impl == "nonprivate":
        def step():
            opt.zero_grad(set_to_none=True)
            _loss(model(x), y).backward()
            opt.step()
        return model, step

    opacus = require("opacus")
    if impl in ("reference", "opacus-ghost"):
        engine = opacus.PrivacyEngine(accountant="rdp")
        mode = "hooks" if impl == "reference" else "ghost"
    else:
        from fastadv.dp import PrivacyEngine
        engine, mode = PrivacyEngine(accountant="rdp"), FASTADV_MODES[impl]
    kw = dict(module=model, optimizer=opt, data_loader=data.loader(n), noise_multiplier=sigma,
              max_grad_norm=C, poisson_sampling=False)
    if mode == "hooks":
        private, opt, _ = engine.make_private(**kw)

        def step():
            opt.zero_grad(set_to_none=True)
            _loss(private(x), y).backward()
            opt.step()
        return model, step

    crit = nn.CrossEntropyLoss()
    private, opt, crit, _ = engine.make_private(criterion=crit, grad_sample_mode=mode, **kw)
    loss = _loss_ghost if impl.startswith("fastadv") else (lambda c, out, yy: c(out, yy))

    def step():
        opt.zero_grad(set_to_none=True)
        loss(crit, private(x), y).backward()
        opt.step()
    return model, step


def check(data: StepData, impl: str) -> str | None:
    """None when ``impl``'s private gradient (sigma = 0) equals Opacus vanilla's."""
    model, step = make_step(data, impl, 0.0, min(data.case.batch, CHECK_BATCH))
    step()
    got = {n: p.grad for n, p in model.named_parameters()}
    worst, bad = 0.0, []
    for name, want in data.expected().items():
        g = got.get(name)
        if g is None or not torch.allclose(g, want, **TOL):
            bad.append(name)
            worst = max(worst, float("inf") if g is None else float((g - want).abs().max()))
    if not bad:
        return None
    return f"p.grad of {len(bad)} tensors ({', '.join(bad[:3])}) differs from Opacus vanilla's: max abs error {worst:.3g}"


# ---------------------------------------------------------------- peak memory

def peak_bytes(fn, device) -> tuple[int, int | None]:
    """(peak bytes allocated while ``fn()`` runs above what was live before it,
    the total peak or None).

    CUDA: ``torch.cuda.max_memory_allocated`` after resetting the peak; the
    total counts everything live (parameters, inputs, optimizer and hook
    state).  CPU: the profiler's allocation events (``profile_memory=True``),
    each free matched by address to an allocation made inside the session,
    summed in time order; no total there.
    tests/test_dp_ghost.py's memory test measures with this function."""
    device = torch.device(device)
    gc.collect()  # garbage of earlier rows is not freed inside the measured step
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        total = torch.cuda.max_memory_allocated(device)
        return total - before, total
    from torch._C._profiler import _EventType

    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    # every allocation event of the session, with its address: a free counts only for a block
    # allocated inside the session (the [memory] events also report frees of blocks an earlier
    # session saw allocated, which made the same step's peak depend on what ran before it: 300 KB
    # lower in one CI run), whether or not the profiler can tie the block to a tensor
    allocs, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        ev = stack.pop()
        stack.extend(ev.children)
        if ev.typed[0] == _EventType.Allocation:
            allocs.append((ev.start_time_ns, ev.typed[1]))
    live, cur, peak = {}, 0, 0
    for _, a in sorted(allocs, key=lambda x: x[0]):
        where = (a.ptr, str(a.device))
        if a.alloc_size > 0:
            live[where] = a.alloc_size
            cur += a.alloc_size
        elif where in live:
            cur -= live.pop(where)
        peak = max(peak, cur)
    return peak, None


def _oom_types() -> tuple:
    return (torch.cuda.OutOfMemoryError,) if hasattr(torch.cuda, "OutOfMemoryError") else ()


# ---------------------------------------------------------------- implementations

def _impl(case: Case, device, name: str) -> Impl:
    def setup() -> Prepared:
        if name == "opacus-ghost" and case.tied:
            raise Skip("Opacus's ghost mode refuses tied weights (GPT-2's head is tied to the token embedding)")
        if name != "nonprivate":
            require("opacus")
        data = _data(case, device)
        try:
            _, step = make_step(data, name, SIGMA, case.batch)
            # warm-up: one-time allocations (lazily built state and caches, cuBLAS
            # workspaces, Triton autotuning) are no part of a step's peak; without
            # it the CPU peak depended on which rows ran before
            step()
            peak, total = peak_bytes(step, device)
        except _oom_types() as exc:
            raise Skip(f"out of GPU memory at B={case.batch}") from exc
        extra = {"peak_mb": round(peak / 1e6, 3)}
        if total is not None:
            extra["peak_total_mb"] = round(total / 1e6, 3)
        if name == "nonprivate":
            _nonprivate_peak[case] = peak
        elif _nonprivate_peak.get(case):
            extra["peak_vs_nonprivate"] = round(peak / _nonprivate_peak[case], 3)
        if name.startswith("fastadv"):
            from fastadv import _backend
            extra["backend"] = _backend.resolve(None, torch.device(device))
        is_dp = name not in ("nonprivate", "reference")
        return Prepared(step=step, check=(lambda: check(data, name)) if is_dp else None,
                        extra=extra, sync_free=False)  # a model step and Opacus's hooks sync: not fastadv's
    return Impl(name, setup)


# ---------------------------------------------------------------- registry

_data = CaseCache(StepData)
_nonprivate_peak: dict = {}


def impls(case: Case, device) -> list[Impl]:
    """nonprivate, reference (Opacus vanilla), opacus-ghost, fastadv-vanilla / -ghost / -bk."""
    return [_impl(case, device, n) for n in IMPLS]


def release() -> None:
    _data.clear()
    _nonprivate_peak.clear()
