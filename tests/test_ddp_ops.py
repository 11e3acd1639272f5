"""The ops that tests/test_distributed.py does not run under DDP, under DDP
(gloo, 2 CPU processes, one spawned run for the whole file): the input attacks
(``fastadv.attacks`` on a DDP-wrapped small CNN: their ``torch.autograd.grad``
on the images runs through DDP's forward and reducer), SiFT
(``fastadv.sift``), DP-Logits (``fastadv.dp.DPLogits`` inside DDP), NEFTune
through the model-level hook (the HF integration's, on the DDP model's
embedding) and the embedding FGSM step (``fastadv.adversarial.fgsm``).

Each rank runs each op, on the torch and the triton backend, on its own
batches for STEPS training steps (the op, a backward through DDP, SGD).
Checked against single-process runs of the same op with the unwrapped model,
one per rank's batches, run in lockstep with DDP's communication done by hand
(rank 0's buffers to every rank before a step, the mean of the ranks'
gradients after the backward), same seeds:

* attacks: each rank's adversarial images equal the single-process run's
  bitwise at every step (and torchattacks 3.5.1's on the unwrapped model, as
  in tests/test_attacks.py);
* losses (SiFT's adversarial loss, DP-Logits' noisy logits), gradients and
  weights after each step: the single-process run's, fp32 tolerance (one run
  per rank rather than one on the concatenated batch: the CNN's batch norm
  normalises each rank's batch by its own statistics, and the noise ops draw
  on each rank from the same generator state);
* the replicas' weights stay bitwise identical;
* no host sync inside the op call; the backend under test launched, no other.

Also under ``DDP(static_graph=True)`` and ``DDP(find_unused_parameters=True)``
(torch backend); what fails there, and why, is written at the xfails below.
"""
import functools
import os
import traceback
import types

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from fastadv import attacks, sift
from fastadv.adversarial.fgsm import adversarial_train_step
from fastadv.dp import DPLogits
from fastadv.integrations.transformers import _NEFTuneHook

from conftest import DEVICE
from test_attacks import KW, NAMES, assert_matches, conv_model, load_torchattacks
from test_distributed import VOCAB, _batch, _ran, _SyncWatch, spawn_ranks
from test_fgm import FP32, TinyLM
from test_sift import HIDDEN, Tiny, logits_fn

WORLD = 2
BACKENDS = ["torch", "triton"]
TRAINING_OPS = ["sift", "dp_logits", "neftune", "embedding_fgsm"]
LR, STEPS = 0.1, 2  # two steps: the second starts from the first's averaged step
SPAWN_TIMEOUT = 180  # seconds for the 2-process run (~25 s on 2 shared cores)
pytestmark = pytest.mark.skipif(DEVICE.type != "cpu" or not dist.is_available(),
                                reason="the gloo tests run on CPU")


# ---------------------------------------------------------------- the scenarios (one rank's batch)

def _images(rank, step):
    gen = torch.Generator().manual_seed(100 + 10 * step + rank)
    return torch.rand(4, 3, 8, 8, generator=gen), torch.randint(0, 5, (4,), generator=gen)


def _tokens(rank, step):
    gen = torch.Generator().manual_seed(200 + 10 * step + rank)
    return {"input_ids": torch.randint(0, 50, (3, 7), generator=gen),
            "labels": torch.randint(0, 5, (3,), generator=gen)}


def _watched(fn, out):
    """``fn()`` (an op call), with its host syncs and the backends it launched added to ``out``."""
    watch = _SyncWatch()

    def call():
        with watch:
            return fn()
    result, ran = _ran(call)
    out["syncs"] += watch.syncs
    out["ran"] = sorted(set(out["ran"]) | set(ran))
    return result


def _training(net, model, scenario):
    """STEPS training steps of ``scenario(step, out, record) -> loss`` (the op inside),
    each ending in a backward and an SGD step; a generator that yields
    ``("buffers", net)`` before each step's first forward (where DDP
    broadcasts rank 0's buffers) and ``("grads", net)`` after the backward
    (where DDP has averaged the gradients), so that single-process runs of the
    ranks can be driven in lockstep (:func:`_lockstep`).  Returns the
    per-step losses, gradients and weights, the backends launched and the
    host syncs of the op calls."""
    opt = torch.optim.SGD(net.parameters(), lr=LR)
    out = dict(ran=[], syncs=[], steps=[])
    for step in range(STEPS):
        yield "buffers", net
        opt.zero_grad()
        record = {}
        loss = scenario(step, out, record)
        loss.backward()
        yield "grads", net
        record["grads"] = {n: p.grad.detach().clone() for n, p in net.named_parameters() if p.grad is not None}
        opt.step()
        record.update(loss=loss.detach(), weights={n: p.detach().clone() for n, p in net.named_parameters()})
        out["steps"].append(record)
    return out


def _attack(name, backend, rank, wrap):
    """Each step: the attack on the rank's images through ``wrap(model)``, then
    a training step on the adversarial images (model in training mode: batch
    norm on the batch's statistics, dropout drawn from a seeded generator)."""
    torch.manual_seed(0)
    net = conv_model()
    model = wrap(net)
    atk = getattr(attacks, name)(model, backend=backend, **KW[name])

    def scenario(step, out, record):
        x, y = _images(rank, step)
        torch.manual_seed(7 + step)
        record["adv"] = adv = _watched(lambda: atk(x, y), out)
        model.train()
        torch.manual_seed(9 + step)
        return F.cross_entropy(model(adv), y)
    return _training(net, model, scenario)


def _sift(backend, rank, wrap):
    """DeBERTa's protocol: loss + AdversarialLearner.loss, one backward."""
    torch.manual_seed(0)
    net = Tiny()
    model = wrap(net)
    layers = sift.hook_sift_layer(model, HIDDEN, learning_rate=0.1, init_perturbation=0.02, backend=backend)
    learner = sift.AdversarialLearner(model, layers)

    def scenario(step, out, record):
        data = _tokens(rank, step)
        torch.manual_seed(5 + step)
        logits, loss = model(**data)
        adv_loss = _watched(lambda: learner.loss(logits, logits_fn, **data), out)
        record["adv_loss"] = adv_loss.detach()
        return loss + adv_loss
    return _training(net, model, scenario)


class _MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(6, 8), nn.Linear(8, 5)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


def _dp_logits(backend, rank, wrap):
    """Training through DPLogits (clipped rows + noise, identity gradient) inside DDP."""
    torch.manual_seed(0)
    net = DPLogits(_MLP(), sigma=0.5, clip_norm=2.0, backend=backend)
    model = wrap(net)

    def scenario(step, out, record):
        gen = torch.Generator().manual_seed(300 + 10 * step + rank)
        x, y = torch.randn(4, 6, generator=gen), torch.randint(0, 5, (4,), generator=gen)
        torch.manual_seed(3 + step)
        logits = _watched(lambda: model(x), out)
        record["logits"] = logits.detach()
        return F.cross_entropy(logits, y)
    return _training(net, model, scenario)


def _neftune(backend, rank, wrap):
    """NEFTune's model-level hook (the HF integration's) on the embedding of the wrapped model."""
    torch.manual_seed(0)
    net = TinyLM(vocab=VOCAB)
    model = wrap(net)
    net.word_embeddings.register_forward_hook(_NEFTuneHook(5.0, backend))
    model.train()

    def scenario(step, out, record):
        ids, labels = _batch(rank, step)
        torch.manual_seed(4 + step)
        return _watched(lambda: model(ids, labels), out)
    return _training(net, model, scenario)


class _EmbedsLM(nn.Module):
    """The HF surface adversarial_train_step needs: get_input_embeddings, inputs_embeds, .logits."""

    def __init__(self):
        super().__init__()
        self.emb, self.head = nn.Embedding(VOCAB, 12), nn.Linear(12, 5)

    def get_input_embeddings(self):
        return self.emb

    def forward(self, input_ids=None, inputs_embeds=None):
        h = self.emb(input_ids) if inputs_embeds is None else inputs_embeds
        return types.SimpleNamespace(logits=self.head(torch.tanh(h).mean(1)))


def _embedding_fgsm(backend, rank, wrap):
    """Seed 000's adversarial_train_step (embedding FGSM) called with the wrapped model."""
    torch.manual_seed(0)
    net = _EmbedsLM()
    model = wrap(net)

    def scenario(step, out, record):
        ids, labels = _batch(rank, step)
        return _watched(lambda: adversarial_train_step(model, {"input_ids": ids}, labels, 0.1,
                                                       backend=backend), out)
    return _training(net, model, scenario)


RUNS = {"sift": _sift, "dp_logits": _dp_logits, "neftune": _neftune, "embedding_fgsm": _embedding_fgsm}
CASES = [(name, backend) for name in NAMES for backend in BACKENDS] + \
        [(op, backend) for op in TRAINING_OPS for backend in BACKENDS]


def _scenario(op, backend, rank, wrap):
    fn = RUNS.get(op)
    return fn(backend, rank, wrap) if fn else _attack(op, backend, rank, wrap)


def _run(gen):
    """A scenario run to its end (under DDP: the yields need nothing)."""
    try:
        while True:
            next(gen)
    except StopIteration as stop:
        return stop.value


def _lockstep(gens):
    """The ranks' single-process runs, one step at a time, with DDP's
    communication done by hand at the scenario's yields: rank 0's buffers to
    every rank before a step, the mean of the gradients after the backward."""
    outs = [None] * len(gens)
    while True:
        points = []
        for i, gen in enumerate(gens):
            try:
                points.append(next(gen))
            except StopIteration as stop:
                outs[i] = stop.value
        if not points:
            return outs
        kind, nets = points[0][0], [net for _, net in points]
        if kind == "buffers":
            for bufs in zip(*(net.buffers() for net in nets)):
                for b in bufs[1:]:
                    b.copy_(bufs[0])
        else:
            for params in zip(*(net.parameters() for net in nets)):
                if params[0].grad is not None:
                    mean = sum(p.grad for p in params) / len(params)
                    for p in params:
                        p.grad = mean.clone()


# ---------------------------------------------------------------- the 2-process run

def _ddp(net, **kw):
    return nn.parallel.DistributedDataParallel(net, **kw)


# DDP's other reducer modes, on the torch backend (the op's kernels are the same on triton)
MODES = {"static_graph": dict(static_graph=True), "find_unused": dict(find_unused_parameters=True)}
MODE_OPS = ["PGD", "sift", "dp_logits", "neftune"]


def _worker(rank, port, out):
    try:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=WORLD)
        results = {}
        runs = [((op, backend), op, backend, _ddp) for op, backend in CASES] + \
            [((mode, op), op, "torch", functools.partial(_ddp, **kw)) for mode, kw in MODES.items()
             for op in MODE_OPS]
        for key, op, backend, wrap in runs:
            try:  # an op that raises is reported by its tests, the others still run
                results[key] = _run(_scenario(op, backend, rank, wrap))
            except Exception:
                results[key] = {"error": traceback.format_exc()}
        torch.save(results, os.path.join(out, f"ddp_ops{rank}.pt"))
    except BaseException:
        with open(os.path.join(out, f"ddp_ops{rank}.err"), "w") as f:
            f.write(traceback.format_exc())
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


_RUN: list = []


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """Both ranks' results of the one spawned run (bounded by SPAWN_TIMEOUT; a
    hang in an op is reported as the run killed, with any rank's traceback)."""
    if not _RUN:
        _RUN.append(spawn_ranks(_worker, WORLD, tmp_path_factory.mktemp("ddp_ops"), "ddp_ops", SPAWN_TIMEOUT))
    if isinstance(_RUN[0], str):
        pytest.fail(_RUN[0])
    return _RUN[0]


_SINGLE: dict = {}


def _single(op, backend):
    """The same op with the unwrapped model, the ranks' runs in lockstep on this process."""
    if (op, backend) not in _SINGLE:
        _SINGLE[op, backend] = _lockstep([_scenario(op, backend, r, lambda net: net) for r in range(WORLD)])
    return _SINGLE[op, backend]


def _got(ranks, op, backend):
    got = [r[op, backend] for r in ranks]
    for rank, g in enumerate(got):
        assert "error" not in g, f"rank {rank}, {op} on {backend} under DDP raised:\n{g['error']}"
    return got


def _check(got, single, backend, what):
    """Per step and rank: the single-process run's losses, outputs, gradients
    and weights; the replicas bitwise identical; the backend under test
    launched and no other; no host sync in the op calls."""
    for rank, (g, e) in enumerate(zip(got, single)):
        assert len(g["steps"]) == len(e["steps"]) == STEPS
        for step, (gs, es) in enumerate(zip(g["steps"], e["steps"])):
            assert gs.keys() == es.keys()
            for key, expected in es.items():
                if key == "adv":
                    continue  # checked bitwise by the attack test
                tensors = expected.items() if isinstance(expected, dict) else [("", expected)]
                for n, t in tensors:
                    actual = gs[key][n] if n else gs[key]
                    torch.testing.assert_close(actual, t, **FP32,
                                               msg=lambda m: f"{what} rank {rank} step {step} {key} {n}: {m}")
            for n, w in gs["weights"].items():
                assert torch.equal(got[1 - rank]["steps"][step]["weights"][n], w), (what, "replicas differ", step, n)
        assert g["ran"] == [backend], (rank, g["ran"])
        assert g["syncs"] == [], (rank, g["syncs"])


# ---------------------------------------------------------------- the checks

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", NAMES)
def test_attack_under_ddp_equals_one_process(ranks, name, backend):
    """Each rank's adversarial images are the unwrapped model's on its images,
    bitwise, at each step; the training steps after the attacks are DDP's
    averaged steps."""
    got, single = _got(ranks, name, backend), _single(name, backend)
    for rank in range(WORLD):
        for step in range(STEPS):
            adv, expected = got[rank]["steps"][step]["adv"], single[rank]["steps"][step]["adv"]
            assert torch.equal(adv, expected), (name, backend, rank, step, (adv - expected).abs().max().item())
            assert not torch.equal(adv, _images(rank, step)[0])
    _check(got, single, backend, f"{name} {backend}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", NAMES)
def test_attack_under_ddp_matches_torchattacks(ranks, name, backend):
    """torchattacks 3.5.1 on the unwrapped model at the first step, same seed,
    each rank's images (bitwise; PGD-L2 / MI-FGSM's per-sample sums to fp32
    rounding on triton)."""
    classes, why = load_torchattacks()
    if classes is None:
        pytest.skip(why)
    for rank, g in enumerate(_got(ranks, name, backend)):
        torch.manual_seed(0)
        net = conv_model()
        x, y = _images(rank, 0)
        torch.manual_seed(7)
        assert_matches(g["steps"][0]["adv"], classes[name](net, **KW[name])(x, y), name, backend)


# embedding FGSM: adversarial_train_step(model, ...) looks the table up on the wrapped module (a DDP
# wrapper does not forward get_input_embeddings: it raised AttributeError) and runs its forwards
# through DDP (passing ddp.module instead would skip the gradient averaging, silently).
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", TRAINING_OPS)
def test_training_op_under_ddp_equals_one_process(ranks, op, backend):
    """Each rank's losses (and DP-Logits' noisy logits) are the unwrapped
    model's on its batch, the gradients DDP's average, at each step."""
    _check(_got(ranks, op, backend), _single(op, backend), backend, f"{op} {backend}")


# Measured (CPU, gloo, 2 ranks); the same with torchattacks' PGD and DeBERTa's reference SiFT in place
# of fastadv's, so these are the protocols' limits under DDP, not the kernels':
# * static_graph=True: the attack's / SiFT's extra forwards through DDP (a backward to the inputs or
#   delta only) are the iterations DDP records the static graph from; it records no parameter as
#   used, and from then on never all-reduces: every rank keeps its own gradient (bitwise the
#   single-process gradient of its batch; PGD 0.weight 0.49 away from the mean), the replicas drift,
#   no error. So fastadv's attacks and SiFT's AdversarialLearner refuse such a model (ValueError,
#   test_static_graph_refused). Workaround: attack the module (``PGD(ddp.module, ...)``), train
#   through DDP (its forwards then skip DDP's buffer broadcast: batch-norm stats are the rank's own).
# * find_unused_parameters=True: SiFT's two forwards before one backward raise
#   "RuntimeError: Expected to mark a variable ready only once" in the backward.
_REFUSED = [("static_graph", "PGD"), ("static_graph", "sift")]
_MODE_XFAIL = {
    ("find_unused", "sift"): "DDP(find_unused_parameters=True): SiFT's second forward before the backward "
                             "raises 'Expected to mark a variable ready only once'",
}


@pytest.mark.parametrize("mode,op", [
    pytest.param(mode, op, marks=pytest.mark.xfail(reason=_MODE_XFAIL[mode, op], strict=True))
    if (mode, op) in _MODE_XFAIL else (mode, op) for mode in MODES for op in MODE_OPS if (mode, op) not in _REFUSED])
def test_op_under_ddp_modes(ranks, mode, op):
    """DDP(static_graph=True) and DDP(find_unused_parameters=True), torch
    backend: the same checks as in the default mode."""
    got = [r[mode, op] for r in ranks]
    for rank, g in enumerate(got):
        assert "error" not in g, f"rank {rank}, {op} under DDP {mode} raised:\n{g['error']}"
    _check(got, _single(op, "torch"), "torch", f"{op} {mode}")



@pytest.mark.parametrize("mode,op", _REFUSED)
def test_static_graph_refused(ranks, mode, op):
    """An input attack and SiFT refuse a DDP(static_graph=True) model with an
    error naming the setting and the workaround, instead of training with
    gradients that are never all-reduced."""
    for r in ranks:
        err = r[mode, op].get("error", "")
        assert "ValueError" in err and "static_graph=True" in err and "ddp.module" in err, err[-600:]
