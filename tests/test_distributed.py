"""FGM and PGD under real torch.distributed process groups (gloo, 2 CPU
processes): DDP (replicated weights, gradients already reduced) and FSDP2
(``fully_shard``: DTensor shards, norms combined by one all_reduce).  After a
few training steps the weights equal a single-process run of the same global
batches, and replicated weights stay bitwise identical across ranks.

Not covered here yet (issue 12): AWP, SAM, EMA, weight_noise and DP clip +
noise under FSDP2, and the bench of the collective's cost on a GPU."""
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import fastadv
from fastadv.reference import FGM as RefFGM
from fastadv.reference import PGD as RefPGD

from conftest import DEVICE
from test_fgm import FP32, TinyLM

WORLD, STEPS, K = 2, 3, 3
BACKENDS = ["torch", "triton"]
pytestmark = pytest.mark.skipif(DEVICE.type != "cpu" or not dist.is_available(),
                                reason="the gloo tests run on CPU")


def _batch(rank, step):
    gen = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randint(0, 97, (2, 7), generator=gen), torch.randint(0, 5, (2,), generator=gen)


def _fgm_step(model, fgm, batches, scale):
    for ids, labels in batches:
        (model(ids, labels) * scale).backward()
    fgm.attack()
    for ids, labels in batches:
        (model(ids, labels) * scale).backward()
    fgm.restore()


def _pgd_step(model, pgd, batches, scale):
    def backward():
        for ids, labels in batches:
            (model(ids, labels) * scale).backward()
    backward()
    pgd.backup_grad()
    for t in range(K):
        pgd.attack(is_first_attack=(t == 0))
        if t != K - 1:
            model.zero_grad()
        else:
            pgd.restore_grad()
        backward()
    pgd.restore()


def _train(model, attack, op, batches_of_step, scale):
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(STEPS):
        (_fgm_step if op == "fgm" else _pgd_step)(model, attack, batches_of_step(step), scale)
        opt.step()
        model.zero_grad()


def _make_attack(op, model, backend, ref=False):
    if op == "fgm":
        return (RefFGM(model, epsilon=0.7) if ref else
                fastadv.FGM(model, epsilon=0.7, backend=backend))
    return RefPGD(model, epsilon=0.05) if ref else fastadv.PGD(model, epsilon=0.05, backend=backend)


def _worker(rank, port, mode, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        results = {}
        for op in ("fgm", "pgd"):
            for backend in BACKENDS:
                torch.manual_seed(0)
                net = TinyLM(tied=True)
                if mode == "ddp":
                    model = torch.nn.parallel.DistributedDataParallel(net)
                else:
                    from torch.distributed.device_mesh import init_device_mesh
                    from torch.distributed.fsdp import fully_shard
                    mesh = init_device_mesh("cpu", (WORLD,))
                    fully_shard(net, mesh=mesh)
                    model = net
                attack = _make_attack(op, model, backend)
                _train(model, attack, op, lambda step: [_batch(rank, step)], 1.0)
                full = {n.removeprefix("module."): (p.full_tensor() if hasattr(p, "full_tensor") else p)
                        .detach().clone() for n, p in model.named_parameters()}
                results[op, backend] = full
        torch.save(results, os.path.join(out, f"{mode}{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _single_process(op):
    """The same global batches on one process: the loss averaged over the
    ranks' batches gives DDP's / FSDP2's averaged gradient."""
    torch.manual_seed(0)
    model = TinyLM(tied=True)
    attack = _make_attack(op, model, None, ref=True)
    _train(model, attack, op, lambda step: [_batch(r, step) for r in range(WORLD)], 1.0 / WORLD)
    return {n: p.detach() for n, p in model.named_parameters()}


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_processes_equal_one(mode, tmp_path):
    ctx = mp.start_processes(_worker, args=(_free_port(), mode, str(tmp_path)), nprocs=WORLD,
                             join=False, start_method="spawn")
    for p in ctx.processes:
        p.join(timeout=600)
    assert all(p.exitcode == 0 for p in ctx.processes), [p.exitcode for p in ctx.processes]
    ranks = [torch.load(tmp_path / f"{mode}{r}.pt") for r in range(WORLD)]
    for op in ("fgm", "pgd"):
        expected = _single_process(op)
        for backend in BACKENDS:
            got = ranks[0][op, backend]
            for name, ref in expected.items():
                torch.testing.assert_close(got[name], ref, **FP32, msg=f"{mode} {op} {backend} {name}")
                # every rank holds the same weights (replicated, or gathered from the shards)
                assert torch.equal(ranks[1][op, backend][name], got[name]), (mode, op, backend, name)
