"""weight_noise's kernels on shards (FSDP2's layout, without a process group):
each shard draws the Philox counters its elements have in the unsharded
launch (``fastadv.kernels.host.shard_counters``), so the shards put together
equal the unsharded launch of the same backend and key, bitwise.  The
unsharded launch is the specification here (tests/test_noise.py checks it
against fixed draws and the reference); tests/test_distributed.py runs the
same op on real FSDP2 shards.  Cuts cross chunk and quarter boundaries, start
mid-quarter, and leave shards empty.  The cuda backend runs on a GPU only
(the backend fixture skips it elsewhere)."""
import pytest
import torch

from fastadv.kernels import host
from fastadv.ops import noise as ops

from conftest import DEVICE

CHUNK, QUARTER = host.RNG_CHUNK, host.RNG_QUARTER
SHAPES = [(10000,), (37, 300), (5, 2), (9000,)]
# row cuts of each tensor into 3 "ranks" (uneven, across chunk / quarter boundaries, empty shards)
CUTS = [[0, 4100, 8191, 10000], [0, 13, 14, 37], [0, 5, 5, 5], [0, 1, 4097, 9000]]


def _shards(full, rank):
    return [t[c[rank]:c[rank + 1]] for t, c in zip(full, CUTS)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_shards_equal_the_unsharded_launch(backend, dtype):
    if backend == "torch":
        pytest.skip("the shard launch is a kernel-backend op (the torch backend draws whole tensors)")
    full = [torch.randn(s, device=DEVICE).to(dtype) for s in SHAPES]
    key = host.new_key(DEVICE)
    expected = [t.clone() for t in full]
    ops.weight_noise_op(expected, [torch.empty_like(t) for t in expected], [key], 0.1, backend)
    got = [t.clone() for t in full]
    for rank in range(3):
        shards = [s.clone() for s in _shards(full, rank)]
        offsets = [c[rank] * t[0].numel() for t, c in zip(full, CUTS)]
        _, place = host.shard_counters([t.numel() for t in full], offsets, [s.numel() for s in shards])
        backups = [torch.empty_like(s) for s in shards]
        ops.shard_weight_noise_op(shards, backups, [key], place, 0.1, backend)
        for b, orig in zip(backups, _shards(full, rank)):
            assert torch.equal(b, orig)  # the bit-exact backup, written in the same pass
        for g, s in zip(_shards(got, rank), shards):
            g.copy_(s)
    for g, e, t in zip(got, expected, full):
        assert torch.equal(g, e)
        assert not torch.equal(e, t)  # the noise was applied (else both sides equal ``full``)


def test_shard_counters_layout():
    """Spans start on the global chunk boundary before the shard; the chunk
    numbering is the unsharded launch's (prefix sum of global chunk counts)."""
    spans, place = host.shard_counters([10000, 11100, 10], [4100, 0, 10], [4091, 3900, 0])
    assert spans == [4 + 4091, 3900, 0]
    assert place == [0 + 1, 4, 3 + 0, 0, 3 + 3 + 0, 10]
    with pytest.raises(ValueError, match="outside its tensor"):
        host.shard_counters([10], [8], [3])


@pytest.mark.launch_free
def test_shard_op_refuses_the_torch_backend_and_a_bad_place():
    w = [torch.zeros(4, device=DEVICE)]
    key = host.new_key(DEVICE)
    with pytest.raises(ValueError, match="kernel backends"):
        ops.shard_weight_noise_op(w, [torch.empty_like(w[0])], [key], [0, 0], 0.1, "torch")
    with pytest.raises(ValueError, match="2 each"):
        ops.shard_weight_noise_op(w, [torch.empty_like(w[0])], [key], [0], 0.1, "triton")


def test_opcheck(backend):
    if backend == "torch":
        pytest.skip("the shard launch is a kernel-backend op")
    ws = [torch.randn(5, device=DEVICE), torch.randn(3, 3, device=DEVICE)]
    _, place = host.shard_counters([10, 18], [5, 9], [5, 9])
    torch.library.opcheck(ops.shard_weight_noise_op.overload,
                          (ws, [torch.empty_like(w) for w in ws], [host.new_key(DEVICE)], place, 0.1, backend))
