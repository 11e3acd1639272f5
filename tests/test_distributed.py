"""fastadv under real torch.distributed process groups (gloo, 2 CPU processes):
DDP (replicated weights, gradients already reduced) and FSDP2
(``fully_shard``: DTensor shards, norms combined by one all_reduce per call).

One spawned 2-process run per configuration (DDP, FSDP2) runs every op's
scenario on every backend and writes its results; the tests below check
them (module-scoped fixture), so the file costs two spawns.  For each op:

* weights and gradients after a few training steps equal the single-process
  run of the unsharded model on the same global batches (the reference class:
  the seed's FGM / PGD / AWP, davda54's SAM, the Kaggle EMA), fp32 tolerance;
* every rank holds the same weights (DDP: bitwise-identical replicas;
  FSDP2: the gathered tensor);
* all_reduce calls per op call, counted by wrapping
  ``torch.distributed.all_reduce`` in the worker: 0 under DDP, 1 for AWP /
  SAM under FSDP2 whatever the number of tensors, 0 for EMA;
* no host sync inside the op call (the conftest's list of syncing aten ops);
* the backend under test launched and no other (the conftest ``backend``
  fixture's check, done here on the launches the workers counted).
"""
import collections
import contextlib
import os
import socket
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import fastadv
from fastadv.reference import AWP as RefAWP
from fastadv.reference import EMA as RefEMA
from fastadv.reference import FGM as RefFGM
from fastadv.reference import PGD as RefPGD
from fastadv.reference import SAM as RefSAM

from conftest import DEVICE, SYNCING_OPS
from test_fgm import FP32, TinyLM

WORLD, STEPS, K = 2, 3, 3
BACKENDS = ["torch", "triton"]
OPS = ["fgm", "pgd", "awp", "sam", "ema"]
SPAWN_TIMEOUT = 300  # seconds for one 2-process run (they take ~30-60 s on 2 shared cores)
pytestmark = pytest.mark.skipif(DEVICE.type != "cpu" or not dist.is_available(),
                                reason="the gloo tests run on CPU")


def _batch(rank, step):
    gen = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randint(0, 97, (2, 7), generator=gen), torch.randint(0, 5, (2,), generator=gen)


# ---------------------------------------------------------------- what the worker counts

class _SyncWatch(torch.utils._python_dispatch.TorchDispatchMode):
    """Records every aten op that reads device data back to the host."""

    def __init__(self):
        super().__init__()
        self.syncs = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ in SYNCING_OPS:
            self.syncs.append(str(func))
        return func(*args, **(kwargs or {}))


class Probe:
    """Around each op call: the all_reduce calls it made and its host syncs."""

    def __init__(self):
        self.calls: list[int] = []
        self.syncs: list[str] = []

    @contextlib.contextmanager
    def op(self):
        before = _ALL_REDUCES[0]
        watch = _SyncWatch()
        with watch:
            yield
        self.calls.append(_ALL_REDUCES[0] - before)
        self.syncs += watch.syncs


_ALL_REDUCES = [0]


def _count_all_reduce():
    """Wrap torch.distributed.all_reduce (fastadv looks it up at each call)."""
    real = dist.all_reduce

    def counted(*args, **kwargs):
        _ALL_REDUCES[0] += 1
        return real(*args, **kwargs)

    dist.all_reduce = counted


class _NoProbe(Probe):
    @contextlib.contextmanager
    def op(self):
        yield


# ---------------------------------------------------------------- the scenarios

def _backward(model, batches, scale):
    for ids, labels in batches:
        (model(ids, labels) * scale).backward()


def _run_fgm(model, batches_of, scale, backend, ref, probe):
    fgm = RefFGM(model, epsilon=0.7) if ref else fastadv.FGM(model, epsilon=0.7, backend=backend)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(STEPS):
        model.zero_grad()
        _backward(model, batches_of(step), scale)
        with probe.op():
            fgm.attack()
        _backward(model, batches_of(step), scale)
        fgm.restore()
        opt.step()


def _run_pgd(model, batches_of, scale, backend, ref, probe):
    pgd = RefPGD(model, epsilon=0.05) if ref else fastadv.PGD(model, epsilon=0.05, backend=backend)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(STEPS):
        model.zero_grad()
        _backward(model, batches_of(step), scale)
        pgd.backup_grad()
        for t in range(K):
            with probe.op():
                pgd.attack(is_first_attack=(t == 0))
            if t != K - 1:
                model.zero_grad()
            else:
                pgd.restore_grad()
            _backward(model, batches_of(step), scale)
        pgd.restore()
        opt.step()


def _run_awp(model, batches_of, scale, backend, ref, probe):
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    kw = dict(adv_lr=0.5, adv_eps=0.1)
    awp = RefAWP(model, opt, **kw) if ref else fastadv.AWP(model, opt, backend=backend, **kw)
    for step in range(STEPS):
        opt.zero_grad()
        _backward(model, batches_of(step), scale)
        awp._save()
        for _ in range(2):  # the first step writes the backup, the second reads it
            with probe.op():
                awp._attack_step()
            opt.zero_grad()
            _backward(model, batches_of(step), scale)
        awp._restore()
        opt.step()


def _run_sam(model, batches_of, scale, backend, ref, probe):
    if ref:
        opt = RefSAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1)
    else:
        opt = fastadv.SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, backend=backend)
    for step in range(STEPS):
        opt.zero_grad()
        _backward(model, batches_of(step), scale)
        with probe.op():
            opt.first_step(zero_grad=True)
        _backward(model, batches_of(step), scale)
        opt.second_step()


def _run_ema(model, batches_of, scale, backend, ref, probe):
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ema = RefEMA(model, 0.9) if ref else fastadv.ModelEMA(model, decay=0.9, backend=backend)
    if ref:
        ema.register()
    for step in range(STEPS):
        opt.zero_grad()
        _backward(model, batches_of(step), scale)
        opt.step()
        with probe.op():
            ema.update()
    extra = {"shadow": {n.removeprefix("module."): _full(s) for n, s in ema.shadow.items()}}
    if not ref:  # applied: the model holds the averages; restored: its own weights, bit-exact
        before = _weights(model)
        with ema.applied():
            extra["applied"] = _weights(model)
        extra["restored"] = _weights(model)
        extra["before"] = before
    return extra


RUNS = {"fgm": _run_fgm, "pgd": _run_pgd, "awp": _run_awp, "sam": _run_sam, "ema": _run_ema}


def _full(t):
    """The whole tensor (FSDP2: gathered from the shards), detached."""
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().clone()


def _weights(model):
    return {n.removeprefix("module."): _full(p) for n, p in model.named_parameters()}


def _grads(model):
    return {n.removeprefix("module."): _full(p.grad) for n, p in model.named_parameters()
            if p.grad is not None}


def _scenario(op, model, batches_of, scale, backend, ref, probe):
    import fastadv.kernels as kernels
    launches = collections.Counter(kernels.LAUNCHES)
    extra = RUNS[op](model, batches_of, scale, backend, ref, probe) or {}
    ran = sorted({n.split(".")[0] for n, c in kernels.LAUNCHES.items() if c > launches[n]})
    return dict(weights=_weights(model), grads=_grads(model), calls=probe.calls, syncs=probe.syncs,
                ran=ran, **extra)


# ---------------------------------------------------------------- the 2-process run

def _wrap(mode, mesh):
    torch.manual_seed(0)
    net = TinyLM(tied=True)
    if mode == "ddp":
        return torch.nn.parallel.DistributedDataParallel(net)
    from torch.distributed.fsdp import fully_shard
    fully_shard(net, mesh=mesh)
    return net


def _worker(rank, port, mode, out):
    try:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=WORLD)
        _count_all_reduce()
        mesh = None
        if mode == "fsdp":
            from torch.distributed.device_mesh import init_device_mesh
            mesh = init_device_mesh("cpu", (WORLD,))
        results = {}
        for op in OPS:
            for backend in BACKENDS:
                model = _wrap(mode, mesh)
                results[op, backend] = _scenario(op, model, lambda step: [_batch(rank, step)], 1.0,
                                                 backend, False, Probe())
        torch.save(results, os.path.join(out, f"{mode}{rank}.pt"))
    except BaseException:
        with open(os.path.join(out, f"{mode}{rank}.err"), "w") as f:
            f.write(traceback.format_exc())
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(mode, out):
    """Both ranks of ``mode``, bounded in time; the results of each rank.  A
    rank that fails, or a run past SPAWN_TIMEOUT (killed), fails with the
    workers' tracebacks."""
    ctx = mp.start_processes(_worker, args=(_free_port(), mode, str(out)), nprocs=WORLD, join=False,
                             start_method="spawn")
    for p in ctx.processes:
        p.join(timeout=SPAWN_TIMEOUT)
    late = [p for p in ctx.processes if p.is_alive()]
    for p in late:
        p.kill()
        p.join(10)
    errors = "\n".join(f"rank {r}:\n{(out / f'{mode}{r}.err').read_text()}" for r in range(WORLD)
                       if (out / f"{mode}{r}.err").exists())
    if late:
        pytest.fail(f"{mode}: the 2-process run took more than {SPAWN_TIMEOUT} s and was killed\n{errors}")
    codes = [p.exitcode for p in ctx.processes]
    if any(codes):
        pytest.fail(f"{mode}: worker exit codes {codes}\n{errors}")
    return [torch.load(out / f"{mode}{r}.pt") for r in range(WORLD)]


_RUNS: dict = {}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """``runs(mode)``: the results of both ranks of that configuration (spawned once)."""
    def get(mode):
        if mode not in _RUNS:
            _RUNS[mode] = _spawn(mode, tmp_path_factory.mktemp(mode))
        return _RUNS[mode]
    return get


_SINGLE: dict = {}


def _single_process(op):
    """The same global batches on one process with the reference class: the
    loss averaged over the ranks' batches gives DDP's / FSDP2's averaged gradient."""
    if op not in _SINGLE:
        torch.manual_seed(0)
        model = TinyLM(tied=True)
        _SINGLE[op] = _scenario(op, model, lambda step: [_batch(r, step) for r in range(WORLD)],
                                1.0 / WORLD, None, True, _NoProbe())
    return _SINGLE[op]


# ---------------------------------------------------------------- the checks

MODES = ["ddp", "fsdp"]
CASES = [(mode, op, backend) for mode in MODES for op in OPS for backend in BACKENDS]


def _assert_close(got, expected, what):
    assert got.keys() == expected.keys(), what
    for name, ref in expected.items():
        torch.testing.assert_close(got[name], ref, **FP32, msg=f"{what} {name}")


@pytest.mark.parametrize("mode,op,backend", CASES)
def test_two_processes_equal_one(runs, mode, op, backend):
    ranks = runs(mode)
    got, expected = ranks[0][op, backend], _single_process(op)
    _assert_close(got["weights"], expected["weights"], f"{mode} {op} {backend} weights")
    _assert_close(got["grads"], expected["grads"], f"{mode} {op} {backend} grads")
    if op == "ema":
        _assert_close(got["shadow"], expected["shadow"], f"{mode} ema {backend} averages")
        for name, avg in got["shadow"].items():  # applied: the averages; restored: bit-exact
            assert torch.equal(got["applied"][name], avg), name
            assert torch.equal(got["restored"][name], got["before"][name]), name
    for key in ("weights", "grads") + (("shadow",) if op == "ema" else ()):
        for name, t in got[key].items():  # every rank holds the same (replicated or gathered) tensors
            assert torch.equal(ranks[1][op, backend][key][name], t), (mode, op, backend, key, name)


# all_reduce calls per op call (the model has 3 "weight" tensors for AWP, 6 with a gradient for SAM)
_EXPECTED_CALLS = {"fgm": 1, "pgd": 1, "awp": 1, "sam": 1, "ema": 0}


@pytest.mark.parametrize("mode,op,backend", CASES)
def test_collectives_and_host_syncs(runs, mode, op, backend):
    for rank, res in enumerate(runs(mode)):
        r = res[op, backend]
        per_call = _EXPECTED_CALLS[op] if mode == "fsdp" else 0
        assert r["calls"] and set(r["calls"]) == {per_call}, (rank, r["calls"])
        assert not r["syncs"], (rank, r["syncs"])


@pytest.mark.parametrize("mode,op,backend", CASES)
def test_backend_launched(runs, mode, op, backend):
    """The backend fixture's check, on the launches counted in the workers."""
    for res in runs(mode):
        ran = set(res[op, backend]["ran"])
        assert backend in ran, f"{backend} was under test but launched nothing ({sorted(ran)})"
        assert ran <= {backend}, f"{backend} was under test but {sorted(ran - {backend})} also ran"
