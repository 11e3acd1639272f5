"""fastadv under HSDP: FSDP2's ``fully_shard`` on a 2-D device mesh
``(replicate=2, shard=2)``, 4 real gloo processes spawned by the test.

A parameter is a DTensor with placements ``(Replicate(), Shard(0))``: each
shard lives on two ranks (replicas), and FSDP2 averages the gradients over
all four (a reduce-scatter in the shard group, then an all-reduce across the
replicas).  The assumption this file breaks: a norm's per-shard partials
must be summed over the *shard* group only -- summed over the whole world,
every replica's copy would be counted and each norm would come out
``sqrt(2)`` times too large, silently.  Checked for every op (FGM, PGD, AWP,
SAM, EMA, the *_weights scenarios with 4 attacked tensors):

* weights and gradients after 2 steps equal the single-process run of the
  unsharded model (the reference classes) on the 4 ranks' batches, fp32;
* every rank gathers the same tensors (bitwise): replicas stay replicas;
* each op call makes the same all_reduce calls as under plain FSDP2, each
  over a group of 2 ranks (the shard group), and the same Triton launches;
  no host sync;
* weight_noise: the gathered weights equal the single-process draw bitwise
  (replicas draw the same numbers, shards their own part);
* ghost / bk DP-SGD: weights and private gradients equal the single-process
  run, with noise the single-process draw (added once, not once per replica);
* ``torch.compile(model)`` on HSDP (inductor once, aot_eager otherwise) with
  FGM, PGD, AWP, SAM, EMA between its compiled passes: the same results.
"""
import collections
import contextlib
import os
import traceback

import pytest
import torch
import torch.distributed as dist
from torch import nn

import fastadv
import fastadv.kernels as kernels
from fastadv.dp import PrivacyEngine

from conftest import DEVICE
from test_distributed import (_EXPECTED_CALLS, _EXPECTED_FSDP_LAUNCHES, OPS, RUNS, STEPS, ShardLM, _SyncWatch,
                              _batch, _ran, _weights, _scenario, _single_weight_noise, spawn_ranks)
from test_dp_ghost import TinyLM, _loss_dp
from test_fgm import FP32

WORLD, MESH, SHARD = 4, (2, 2), 2        # 4 ranks: 2 replicas of 2 shards
BACKENDS = ["torch", "triton"]
SPAWN_TIMEOUT = 400                      # 4 processes on 2 shared cores
DP_BATCH, DP_C, DP_SIGMA, DP_SEED = 2, 4.5, 1.0, 5  # DP_BATCH per rank
pytestmark = pytest.mark.skipif(DEVICE.type != "cpu" or not dist.is_available(),
                                reason="the gloo tests run on CPU")

_GROUP_SIZES: list = []  # the size of the group of every all_reduce, while a probe watches


def _count_all_reduce_groups():
    real = dist.all_reduce

    def counted(tensor, *args, **kwargs):
        group = kwargs.get("group", args[1] if len(args) > 1 else None)
        _GROUP_SIZES.append(dist.get_world_size(group))
        return real(tensor, *args, **kwargs)
    dist.all_reduce = counted


class GroupProbe:
    """Around each op call: the sizes of the groups of its all_reduces, its
    kernel launches and its host syncs (the interface test_distributed's
    scenarios call)."""

    def __init__(self):
        self.calls, self.launches, self.syncs = [], [], []

    @contextlib.contextmanager
    def op(self):
        before, launched = len(_GROUP_SIZES), sum(kernels.LAUNCHES.values())
        watch = _SyncWatch()
        with watch:
            yield
        self.calls.append(_GROUP_SIZES[before:])
        self.launches.append(sum(kernels.LAUNCHES.values()) - launched)
        self.syncs += watch.syncs


def _hsdp(net, mesh):
    from torch.distributed.fsdp import fully_shard
    fully_shard(net, mesh=mesh)
    return net


# ---------------------------------------------------------------- a compiled model under HSDP

# (op, backend): inductor compiles one (slow on CPU), aot_eager the rest (the same graph capture and
# autograd; no C++ build)
COMPILED = [(op, backend) for op in ("fgm", "pgd", "awp", "sam", "ema") for backend in BACKENDS]
INDUCTOR = ("fgm", "torch")


def _compiled_scenario(rank, mesh, op, backend):
    """``torch.compile(model)`` (forward and backward compiled, the fastadv op
    eager between them, as users write it) on the HSDP model; the number of
    graphs dynamo compiled, so the test knows it did not run eagerly."""
    from torch._dynamo.utils import counters
    torch._dynamo.reset()  # a fresh cache per model: no recompile limit reached, silently eager
    counters.clear()
    torch.manual_seed(0)
    model = torch.compile(_hsdp(ShardLM(), mesh), backend="inductor" if (op, backend) == INDUCTOR else "aot_eager")
    out = _scenario(op, model, lambda step: [_batch(rank, step)], 1.0, backend, False, GroupProbe())
    out["graphs"] = counters["stats"]["unique_graphs"]
    return out


# ---------------------------------------------------------------- DP-SGD under HSDP

class BlockLM(nn.Module):
    """test_dp_ghost's TinyLM (tied head) as one block under a root: the block
    is its own fully_shard group, the root holds no parameter."""

    def __init__(self):
        super().__init__()
        self.lm = TinyLM()

    def forward(self, ids):
        return self.lm(ids)


def _dp_data():
    gen = torch.Generator().manual_seed(11)
    n = WORLD * DP_BATCH * STEPS
    return torch.utils.data.TensorDataset(torch.randint(0, 11, (n, 5), generator=gen),
                                          torch.randint(0, 11, (n, 5), generator=gen))


def _dp_train(mesh, mode, backend, sigma=0.0):
    """Ghost / bk DP-SGD (SGD, lr 0.1; lr 0 when noisy) for STEPS steps: on the
    HSDP model (``mesh``: each rank its DistributedSampler part) or on one
    process (None: the concatenated batches).  The private gradients per step
    and the weights."""
    torch.manual_seed(0)
    if mesh is None:
        model = TinyLM()
        loader = torch.utils.data.DataLoader(_dp_data(), batch_size=WORLD * DP_BATCH)
    else:
        model = BlockLM()
        _hsdp(model.lm, mesh)
        _hsdp(model, mesh)
        sampler = torch.utils.data.DistributedSampler(_dp_data(), shuffle=False)
        loader = torch.utils.data.DataLoader(_dp_data(), batch_size=DP_BATCH, sampler=sampler)
    m, opt, crit, loader = PrivacyEngine(backend=backend).make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.0 if sigma else 0.1),
        criterion=nn.CrossEntropyLoss(), data_loader=loader, noise_multiplier=sigma, max_grad_norm=DP_C,
        poisson_sampling=False, grad_sample_mode=mode, noise_generator=torch.Generator().manual_seed(DP_SEED))
    name = lambda n: n.removeprefix("lm.")  # noqa: E731
    out = dict(grads=[], cls=type(opt).__name__)

    def run():
        for _, (x, y) in zip(range(STEPS), loader):
            opt.zero_grad()
            _loss_dp(crit, m(x), y).backward()
            opt.step()
            out["grads"].append({name(n): _full(p.grad) for n, p in model.named_parameters()})
    _, out["ran"] = _ran(run)
    out["weights"] = {name(n): _full(p) for n, p in model.named_parameters()}
    return out


def _full(t):
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().clone()


# ---------------------------------------------------------------- the 4-process run

def _worker(rank, port, out):
    try:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=WORLD)
        _count_all_reduce_groups()
        from torch.distributed.device_mesh import init_device_mesh
        mesh = init_device_mesh("cpu", MESH, mesh_dim_names=("replicate", "shard"))
        res = {"placements": None}
        for op in OPS:
            for backend in BACKENDS:
                torch.manual_seed(0)
                model = _hsdp(ShardLM(), mesh)
                res["placements"] = [str(p) for p in model.gate.weight.placements]  # str(Replicate()) is "R"
                res[op, backend] = _scenario(op, model, lambda step: [_batch(rank, step)], 1.0, backend, False,
                                             GroupProbe())
        for op, backend in COMPILED:
            res["compiled", op, backend] = _compiled_scenario(rank, mesh, op, backend)
        for backend in ["torch", "triton"]:
            torch.manual_seed(0)
            model = _hsdp(ShardLM(), mesh)
            before = _weights(model)
            torch.manual_seed(7)
            watch = _SyncWatch()
            with watch:
                ctx = fastadv.noise.weight_noise(model, 0.01, backend=backend)
                ctx.__enter__()
            res["noisy", backend] = _weights(model)
            ctx.__exit__(None, None, None)
            res["noise_restored", backend] = all(torch.equal(a, before[n]) for n, a in _weights(model).items())
            res["noise_syncs", backend] = watch.syncs
        for mode in ["ghost", "bk"]:
            for backend in BACKENDS:
                res["dp", mode, backend] = _dp_train(mesh, mode, backend)
            res["dp_noisy", mode] = _dp_train(mesh, mode, "torch", sigma=DP_SIGMA)
        torch.save(res, os.path.join(out, f"rank{rank}.pt"))
        dist.barrier()
    except BaseException:
        with open(os.path.join(out, f"rank{rank}.err"), "w") as f:
            f.write(traceback.format_exc())
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    got = spawn_ranks(_worker, WORLD, tmp_path_factory.mktemp("hsdp"), "rank", SPAWN_TIMEOUT)
    if isinstance(got, str):
        pytest.fail(got)
    return got


_SINGLE: dict = {}


def _single_process(op):
    """The 4 ranks' batches on one process with the reference class, the loss
    scaled by 1/4: HSDP's gradient is the average over all ranks."""
    if op not in _SINGLE:
        torch.manual_seed(0)
        _SINGLE[op] = _scenario(op, ShardLM(), lambda step: [_batch(r, step) for r in range(WORLD)],
                                1.0 / WORLD, None, True, GroupProbe())
    return _SINGLE[op]


def _assert_close(got, want, what):
    assert got.keys() == want.keys(), what
    for n, w in want.items():
        torch.testing.assert_close(got[n], w, **FP32, msg=lambda s: f"{what} {n}: {s}")


def _assert_ranks_equal(ranks, key, what):
    for r in ranks[1:]:
        for n, w in ranks[0][key].items():
            assert torch.equal(r[key][n], w), (what, n)


# ---------------------------------------------------------------- the checks

def test_the_mesh_is_hybrid(ranks):
    """The parameters really are HSDP's: replicated over one mesh dim, sharded over the other."""
    for r in ranks:
        assert r["placements"] == ["R", "S(0)"], r["placements"]


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_hsdp_equals_one_process(ranks, op, backend):
    expected = _single_process(op)
    for rank, r in enumerate(ranks):
        got = r[op, backend]
        _assert_close(got["weights"], expected["weights"], f"rank {rank} {op} {backend} weights")
        _assert_close(got["grads"], expected["grads"], f"rank {rank} {op} {backend} grads")
        if op == "ema":
            _assert_close(got["shadow"], expected["shadow"], f"rank {rank} ema {backend} averages")
        assert got["ran"] == [backend], got["ran"]
    for key in ("weights", "grads"):
        _assert_ranks_equal([r[op, backend] for r in ranks], key, (op, backend))


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_hsdp_norms_reduce_over_the_shard_group(ranks, op, backend):
    """Each op call: as many all_reduces as under plain FSDP2, every one over
    the 2-rank shard group (never the 4-rank world, which would count each
    replica's partial); the same launches; no host sync."""
    for r in ranks:
        got = r[op, backend]
        assert got["calls"] and all(c == [SHARD] * _EXPECTED_CALLS[op] for c in got["calls"]), got["calls"]
        assert got["syncs"] == [], got["syncs"]
        if backend == "triton":
            assert set(got["launches"]) == {_EXPECTED_FSDP_LAUNCHES[op]}, got["launches"]


@pytest.mark.parametrize("op,backend", COMPILED)
def test_hsdp_compiled_model_equals_one_process(ranks, op, backend):
    """``torch.compile(model)`` on HSDP (inductor for one case, aot_eager for
    the others): the ops act on the compiled model's parameters between its
    compiled forward / backward passes; the result is the single-process
    reference's, every rank gathers the same, the norms' all_reduces are the
    shard group's."""
    expected = _single_process(op)
    for rank, r in enumerate(ranks):
        got = r["compiled", op, backend]
        assert got["graphs"] >= 1, "dynamo compiled nothing: the model ran eagerly"
        _assert_close(got["weights"], expected["weights"], f"rank {rank} compiled {op} {backend} weights")
        _assert_close(got["grads"], expected["grads"], f"rank {rank} compiled {op} {backend} grads")
        assert got["ran"] == [backend], got["ran"]
        assert all(c == [SHARD] * _EXPECTED_CALLS[op] for c in got["calls"]), got["calls"]
    _assert_ranks_equal([r["compiled", op, backend] for r in ranks], "weights", (op, backend))


@pytest.mark.parametrize("backend", BACKENDS)
def test_hsdp_weight_noise_is_the_single_process_draw(ranks, backend):
    """Replicas draw the same numbers and each shard its part: the gathered
    weights equal the single-process draw bitwise; restored bit-exact."""
    expected = _single_weight_noise(backend)
    for r in ranks:
        for n, w in expected.items():
            assert torch.equal(r["noisy", backend][n], w), n
        assert r["noise_restored", backend] is True
        assert r["noise_syncs", backend] == []


_DP_SINGLE: dict = {}


def _dp_single(mode, backend, sigma=0.0):
    key = (mode, backend, sigma)
    if key not in _DP_SINGLE:
        _DP_SINGLE[key] = _dp_train(None, mode, backend, sigma)
    return _DP_SINGLE[key]


@pytest.mark.parametrize("mode", ["ghost", "bk"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_hsdp_dp_equals_one_process(ranks, mode, backend):
    """Ghost / bk DP-SGD (tied head, the block its own group): the private
    gradients of both steps and the weights equal the single-process run;
    every rank holds the same."""
    single = _dp_single(mode, backend)
    for rank, r in enumerate(ranks):
        got = r["dp", mode, backend]
        assert got["cls"] == "FSDPGhostDPOptimizer", got["cls"]
        _assert_close(got["weights"], single["weights"], f"rank {rank} {mode} {backend} weights")
        for step in range(STEPS):
            _assert_close(got["grads"][step], single["grads"][step], f"rank {rank} {mode} {backend} step {step}")
        assert got["ran"] == [backend], got["ran"]
    _assert_ranks_equal([r["dp", mode, backend] for r in ranks], "weights", (mode, backend))


@pytest.mark.parametrize("mode", ["ghost", "bk"])
def test_hsdp_dp_noise_added_once(ranks, mode):
    """With noise, the first private gradient is the single-process one (the
    same generator: each element's noise drawn once, not once per replica)."""
    single = _dp_single(mode, "torch", DP_SIGMA)
    for rank, r in enumerate(ranks):
        _assert_close(r["dp_noisy", mode]["grads"][0], single["grads"][0], f"rank {rank} {mode} noisy")
