"""FGM's shard path without a process group: each "rank" writes its row
range's ``||g||^2`` of every tensor into its own buffer
(``_shard_square_norm``), the buffers are added (what the one all_reduce of
``fgm_attack_many_`` does), and each shard is perturbed along the global
``g / ||g||`` (``_shard_update``).  The shards put together equal the seed's
FGM (fastadv.reference) on the whole tensors, fp32 tolerance; restore is
bit-exact.  Dense and row mode, uneven and empty shards, rows without
gradient, a zero gradient (skipped on the device).  tests/test_distributed.py
runs the same path on real FSDP2 shards (gloo, 2 processes)."""
import torch

from fastadv.ops import fgm as ops
from fastadv.reference import FGM as RefFGM

from conftest import DEVICE
from test_fgm import FP32

EPS = 0.7
# (shape, row_sparse, row cuts into 3 ranks, zero gradient?)
TENSORS = [((37, 12), True, [0, 20, 20, 37], False), ((1000,), True, [0, 1, 600, 1000], False),
           ((9, 5), False, [0, 4, 8, 9], False), ((6, 4), True, [0, 3, 5, 6], True)]


def test_shards_equal_the_unsharded_reference(backend):
    gen = torch.Generator().manual_seed(0)
    weights = [torch.randn(shape, generator=gen).to(DEVICE) for shape, *_ in TENSORS]
    grads = []
    for shape, _, _, zero in TENSORS:
        g = torch.randn(shape, generator=gen)
        if len(shape) == 2:
            g[::3] = 0  # rows without gradient: row mode leaves them alone
        grads.append((g * (not zero)).to(DEVICE))
    shards = [[w[c[r]:c[r + 1]].clone() for w, (_, _, c, _) in zip(weights, TENSORS)] for r in range(3)]
    gs = [[g[c[r]:c[r + 1]].contiguous() for g, (_, _, c, _) in zip(grads, TENSORS)] for r in range(3)]
    rows = [[torch.empty(w.shape[0], dtype=torch.uint8, device=DEVICE)
             if backend != "torch" and ops._by_rows(w, rs, backend) else None
             for w, (_, rs, _, _) in zip(shards[r], TENSORS)] for r in range(3)]
    bufs = []
    for r in range(3):
        buf = torch.empty(len(TENSORS), dtype=torch.float32, device=DEVICE)
        for i, (w, g) in enumerate(zip(shards[r], gs[r])):
            ops._shard_square_norm(w, g, rows[r][i], buf[i:i + 1], backend)
        bufs.append(buf)
    norms = sum(bufs).sqrt_()  # the all_reduce, then the sqrt
    backups = [[ops._shard_update(w, g, rows[r][i], norms[i:i + 1], EPS, backend)
                for i, (w, g) in enumerate(zip(shards[r], gs[r]))] for r in range(3)]

    model = torch.nn.Module()
    for i, (w, g) in enumerate(zip(weights, grads)):
        model.register_parameter(f"t{i}", torch.nn.Parameter(w.clone()))
        getattr(model, f"t{i}").grad = g.clone()
    RefFGM(model, emb_name="t", epsilon=EPS).attack()
    for i, expected in enumerate(model.parameters()):
        got = torch.cat([shards[r][i] for r in range(3)])
        torch.testing.assert_close(got, expected.detach(), **FP32, msg=f"tensor {i}")
        assert torch.equal(got, weights[i]) == TENSORS[i][3], i  # moved unless the gradient is zero
    for r in range(3):
        for i, w in enumerate(shards[r]):
            state = ops.FGMBackup(w, backups[r][i], rows[r][i], backend)
            ops.fgm_restore_(state, w)
            c = TENSORS[i][2]
            assert torch.equal(w, weights[i][c[r]:c[r + 1]]), (r, i)
