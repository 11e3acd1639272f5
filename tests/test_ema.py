"""fastadv.ModelEMA and the AveragedModel averaging functions against the
formulas (and the Kaggle EMA / PyTorch SWA references), on every backend."""
import copy

import pytest
import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from fastadv.averaging import ModelEMA, ema_multi_avg_fn, swa_multi_avg_fn
from fastadv.bench.count import count
from fastadv.ops._live import StorageMoved
from fastadv.ops.ema import lerp_
from fastadv.reference.ema import EMA as RefEMA
from fastadv.reference.ema import swa_average

from conftest import DEVICE, launches_total, odd_or_aligned, record_guards

FP32 = dict(rtol=1e-5, atol=1e-6)


def net(depth=2):
    layers = [nn.Linear(5, 7)]
    for _ in range(depth - 1):
        layers += [nn.ReLU(), nn.Linear(7, 7)]
    return nn.Sequential(*layers, nn.BatchNorm1d(7)).to(DEVICE)


def train_step(*models, seed):
    """The same random change of every trainable weight of each model."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for ps in zip(*(m.parameters() for m in models)):
            d = torch.randn(ps[0].shape, generator=gen).to(DEVICE)
            for p in ps:
                p.add_(d.to(p.dtype))


@pytest.mark.parametrize("warmup", [False, True])
def test_update_follows_the_formula(backend, warmup):
    model = net()
    ema = ModelEMA(model, decay=0.9, warmup=warmup, backend=backend)
    expect = {n: p.detach().double().clone() for n, p in model.named_parameters()}
    for step in range(4):
        train_step(model, seed=step)
        d = min(0.9, (1 + step) / (10 + step)) if warmup else 0.9
        assert ema.current_decay() == d
        ema.update()
        for n, p in model.named_parameters():
            expect[n] = d * expect[n] + (1 - d) * p.detach().double()
    assert ema.num_updates == 4
    for n, s in ema.shadow.items():
        torch.testing.assert_close(s.double(), expect[n], rtol=1e-5, atol=1e-6, msg=n)


def test_kaggle_ema_protocol_matches_reference(backend):
    model = net()
    ref_model = copy.deepcopy(model)
    ema, ref = ModelEMA(model, 0.99, backend=backend), RefEMA(ref_model, 0.99)
    ema.register()
    ref.register()
    for step in range(3):
        train_step(model, ref_model, seed=step)
        ema.update()
        ref.update()
    ema.apply_shadow()
    ref.apply_shadow()
    for p, q in zip(model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(p, q, **FP32)
    ema.restore()
    ref.restore()
    for p, q in zip(model.parameters(), ref_model.parameters()):
        assert torch.equal(p, q)


def test_apply_and_restore_are_in_place_and_bit_exact(backend):
    model = net()
    ema = ModelEMA(model, 0.5, backend=backend)
    train_step(model, seed=1)
    ema.update()
    train_step(model, seed=2)
    live = [p.detach().clone() for p in model.parameters()]
    addresses = [p.data_ptr() for p in model.parameters()]
    with ema.applied():
        assert all(torch.equal(p, s) for p, s in zip(model.parameters(), ema.shadow.values()))
        with pytest.raises(RuntimeError, match="restore"):
            ema.update()
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), live))
    with pytest.raises(ZeroDivisionError):
        with ema.applied():
            1 / 0
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), live))
    assert [p.data_ptr() for p in model.parameters()] == addresses
    with pytest.raises(RuntimeError, match="without a preceding apply_to"):
        ema.restore()


def test_fp32_shadow_of_a_half_model(backend):
    model = net().half()
    ema = ModelEMA(model, 0.9, dtype=torch.float32, backend=backend)
    assert all(s.dtype == torch.float32 for s in ema.shadow.values())
    expect = [p.detach().float().clone() for p in model.parameters()]
    train_step(model, seed=5)
    ema.update()
    for e, p, s in zip(expect, model.parameters(), ema.shadow.values()):
        torch.testing.assert_close(s, 0.9 * e + 0.1 * p.float(), **FP32)
    with ema.applied():
        for p, s in zip(model.parameters(), ema.shadow.values()):
            assert torch.equal(p, s.half())


def test_update_from_another_model_and_state_dict(backend):
    model, other = net(), net()
    ema = ModelEMA(model, 0.8, backend=backend)
    start = [p.detach().clone() for p in model.parameters()]
    ema.update(other)
    for s, a, b in zip(ema.shadow.values(), start, other.parameters()):
        torch.testing.assert_close(s, 0.8 * a + 0.2 * b, **FP32)
    state = ema.state_dict()
    fresh = ModelEMA(net(), 0.5, backend=backend)
    fresh.load_state_dict(state)
    assert fresh.decay == 0.8 and fresh.num_updates == 1
    assert all(torch.equal(a, b) for a, b in zip(fresh.shadow.values(), ema.shadow.values()))
    with pytest.raises(ValueError, match=r"have no average: \['4.weight', '4.bias'"):
        ema.update(net(depth=3))  # matched by name: layers 4 and 5 are unknown
    with pytest.raises(ValueError, match="decay"):
        ModelEMA(model, decay=1.5)


def test_swa_multi_avg_fn_matches_torch(backend):
    model = net()
    ours = AveragedModel(model, multi_avg_fn=swa_multi_avg_fn(backend), use_buffers=True)
    ref = AveragedModel(model, use_buffers=True)
    for step in range(4):
        train_step(model, seed=step)
        model(torch.randn(4, 5, device=DEVICE))  # moves the BatchNorm statistics
        ours.update_parameters(model)
        ref.update_parameters(model)
    for (n, a), b in zip(ours.module.state_dict().items(), ref.module.state_dict().values()):
        torch.testing.assert_close(a, b, **FP32, msg=n)


def test_ema_multi_avg_fn_matches_torch(backend):
    model = net()
    ours = AveragedModel(model, multi_avg_fn=ema_multi_avg_fn(0.75, backend))
    ref = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.75))
    for step in range(3):
        train_step(model, seed=step)
        ours.update_parameters(model)
        ref.update_parameters(model)
    for a, b in zip(ours.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, **FP32)


def test_swa_count_is_read_on_the_device(backend, no_host_sync):
    avg = [torch.randn(n, device=DEVICE) for n in (3, 50)]
    cur = [torch.randn_like(a) for a in avg]
    expect = [a.clone() for a in avg]
    swa_average(expect, cur, 3)
    n = torch.tensor(3, device=DEVICE)
    with no_host_sync():
        swa_multi_avg_fn(backend)(avg, cur, n)
    for a, e in zip(avg, expect):
        torch.testing.assert_close(a, e, **FP32)


def test_update_makes_no_host_sync_and_launches_do_not_grow(backend, no_host_sync):
    def launches(depth):
        model = net(depth)
        ema = ModelEMA(model, 0.9, backend=backend)
        ema.update()
        with no_host_sync():
            ema.update()
        return count(ema.update)

    shallow, deep = launches(2), launches(24)
    assert shallow["syncs"] == deep["syncs"] == 0
    if backend != "torch":
        assert shallow["launches"] == deep["launches"] == 1


def test_lerp_arguments(backend):
    a, x = [torch.zeros(4, device=DEVICE)], [torch.ones(4, device=DEVICE)]
    with pytest.raises(ValueError, match="exactly one"):
        lerp_(a, x)
    lerp_(a, x, 0.25, backend=backend)
    torch.testing.assert_close(a[0], torch.full((4,), 0.25, device=DEVICE))
    lerp_(a, x, count=torch.tensor(0, device=DEVICE), backend=backend)  # weight 1: x exactly
    assert torch.equal(a[0], x[0])


@pytest.mark.gpu
def test_gpu_bf16_model_fp32_shadow(backend, no_host_sync):
    model = nn.Sequential(nn.Linear(1024, 1024), nn.Linear(1024, 7)).cuda().bfloat16()
    ema = ModelEMA(model, 0.99, dtype=torch.float32, backend=backend)
    start = [p.detach().float().clone() for p in model.parameters()]
    train_step(model, seed=0)
    with no_host_sync():
        ema.update()
    for s_, a, p in zip(ema.shadow.values(), start, model.parameters()):
        torch.testing.assert_close(s_, torch.lerp(a, p.float(), 0.01), **FP32)
    live = [p.detach().clone() for p in model.parameters()]
    with no_host_sync():
        ema.apply_to()
        ema.restore()
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), live))


# -- device guard, vector access -------------------------------------------------


def test_kernel_launches_run_under_the_device_guard(backend, monkeypatch):
    if backend == "torch":
        pytest.skip("kernel backends only")
    import fastadv.ops.ema as ops_ema
    seen = record_guards(monkeypatch, ops_ema)
    a, x = [torch.zeros(40, device=DEVICE)], [torch.ones(40, device=DEVICE)]
    before = launches_total()
    lerp_(a, x, 0.25, backend=backend)
    lerp_(a, x, count=torch.tensor(3, device=DEVICE), backend=backend)
    total = launches_total() - before
    assert total > 0 and seen["inside"] == total
    assert seen["devices"] and all(d == a[0].device for d in seen["devices"])


@pytest.mark.parametrize("odd", [False, True], ids=["aligned", "odd-address"])
def test_blocks_tails_and_alignment_match_the_formula(backend, odd):
    from fastadv.kernels.host import shared_tables
    sizes = (2048, 4101, 32768 + 2048 + 3, 1)  # whole blocks; blocks + tail; two chunks; tail only
    avg = [odd_or_aligned(n, odd) for n in sizes]
    cur = [odd_or_aligned(n, odd) for n in sizes]
    expect = [torch.lerp(a, c, 0.1) for a, c in zip(avg, cur)]
    cache = shared_tables()
    cache.clear()
    lerp_(avg, cur, 0.1, backend=backend)
    for a, b in zip(avg, expect):
        torch.testing.assert_close(a, b, **FP32)
    swa_average(expect, cur, 2)
    lerp_(avg, cur, count=torch.tensor(2, device=DEVICE), backend=backend)
    for a, b in zip(avg, expect):
        torch.testing.assert_close(a, b, **FP32)
    if backend != "torch":
        tables = list(cache._tables.values())
        assert tables and all(t.aligned == (not odd) for t in tables)


# -- layers frozen after register() (issue 14, item 5) -------------------------------------------


def test_a_layer_frozen_later_keeps_its_average_as_the_kaggle_ema(backend):
    """Freezing a layer mid-training: the others go on being averaged, the
    frozen one keeps its average and is not applied; unfrozen, it is averaged
    again from where it stopped -- the Kaggle EMA (fastadv.reference.ema) step
    for step."""
    model = net(3)
    ref_model = copy.deepcopy(model)
    ema, ref = ModelEMA(model, 0.8, backend=backend), RefEMA(ref_model, 0.8)
    ref.register()
    for step in range(6):
        if step == 2:
            for m in (model, ref_model):
                m[0].requires_grad_(False)
        if step == 4:
            for m in (model, ref_model):
                m[0].requires_grad_(True)
        train_step(model, ref_model, seed=step)
        ema.update()
        ref.update()
        for n, s_ in ema.shadow.items():
            torch.testing.assert_close(s_, ref.shadow[n], **FP32, msg=f"step {step} {n}")
        if step == 3:  # frozen: its average is neither updated nor applied
            frozen = model[0].weight.detach().clone()
            ema.apply_to()
            ref.apply_shadow()
            assert torch.equal(model[0].weight, frozen)
            for p, q in zip(model.parameters(), ref_model.parameters()):
                torch.testing.assert_close(p, q, **FP32)
            ema.restore()
            ref.restore()
            for p, q in zip(model.parameters(), ref_model.parameters()):
                assert torch.equal(p, q)
    assert ema.num_updates == 6


def test_a_parameter_frozen_at_register_gets_an_average_on_request(backend):
    model = net()
    model[0].requires_grad_(False)
    ema = ModelEMA(model, 0.5, backend=backend)
    assert "0.weight" not in ema.shadow
    train_step(model, seed=0)
    ema.update()
    kept = {n: s_.clone() for n, s_ in ema.shadow.items()}
    model[0].requires_grad_(True)
    with pytest.raises(ValueError, match=r"have no average: \['0.weight', '0.bias'\].*missing_only=True"):
        ema.update()
    ema.register(missing_only=True)
    assert torch.equal(ema.shadow["0.weight"], model[0].weight)
    assert all(torch.equal(ema.shadow[n], s_) for n, s_ in kept.items())  # the others are kept
    assert ema.num_updates == 1
    ema.update()
    assert ema.num_updates == 2


# -- storage moved between apply_to and restore (issue 14) ----------------------------------------

MOVES = {
    "double-float": lambda m: m.double().float(),
    "to-with-copy": lambda m: m.to(torch.float64).to(torch.float32),
    "assign": lambda m: m.load_state_dict(copy.deepcopy(m.state_dict()), assign=True),
}


@pytest.mark.parametrize("move", MOVES)
def test_restore_follows_storage_moved_since_apply(backend, move):
    """Reallocating the parameters while the average is applied: restore puts
    the model's own weights back into the live parameters, bit for bit (the
    Kaggle EMA rebinds them by name too)."""
    model = net()
    ema = ModelEMA(model, 0.5, backend=backend)
    train_step(model, seed=1)
    ema.update()
    train_step(model, seed=2)
    live = {n: p.detach().clone() for n, p in model.named_parameters()}
    old_ptrs = [p.data_ptr() for p in model.parameters()]
    ema.apply_to()
    MOVES[move](model)
    assert [p.data_ptr() for p in model.parameters()] != old_ptrs  # really moved
    new_ptrs = [p.data_ptr() for p in model.parameters()]
    ema.restore()
    for n, p in model.named_parameters():
        assert torch.equal(p, live[n]), n
    assert [p.data_ptr() for p in model.parameters()] == new_ptrs  # written where they live now
    ema.update()  # and the average goes on from the live parameters
    for n, s_ in ema.shadow.items():
        assert torch.isfinite(s_).all(), n


def test_restore_refuses_a_dtype_change_and_keeps_the_backup(backend):
    """model.half() while the average is applied: restore cannot be exact in
    fp16; it says which parameter changed, writes nothing, and works once the
    model is converted back."""
    model = net()
    ema = ModelEMA(model, 0.5, backend=backend)
    train_step(model, seed=1)
    ema.update()
    live = {n: p.detach().clone() for n, p in model.named_parameters()}
    ema.apply_to()
    model.half()
    seen = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(StorageMoved, match=r"0.weight changed dtype from torch.float32 to torch.float16"):
        ema.restore()
    for n, p in model.named_parameters():
        assert torch.equal(p, seen[n]), n  # nothing written
    model.float()
    ema.restore()
    for n, p in model.named_parameters():
        assert torch.equal(p, live[n]), n
    with pytest.raises(RuntimeError, match="without a preceding apply_to"):
        ema.restore()


def test_restore_refuses_a_parameter_that_left_the_model(backend):
    model = net()
    ema = ModelEMA(model, 0.5, backend=backend)
    ema.update()
    ema.apply_to()
    original = model[0]
    model[0] = nn.Identity()
    with pytest.raises(StorageMoved, match="0.weight is no longer a parameter of the model"):
        ema.restore()
    model[0] = original
    ema.restore()


# -- torch.library registration ----------------------------------------------------------------

@pytest.mark.parametrize("by_count", [False, True], ids=["weight", "count"])
def test_opcheck(backend, by_count):
    """Schema (mutation declared), fake tensor and AOT dispatch of ``fastadv::ema_lerp_``,
    with an fp32 average of a model tensor of another dtype on the torch backend."""
    from fastadv.ops.ema import lerp_op
    avg = [torch.randn(5, 3, device=DEVICE), torch.randn(7, device=DEVICE)]
    cur = [torch.randn_like(a) for a in avg]
    if backend == "torch":
        cur[1] = cur[1].double()
    count = torch.tensor(3, device=DEVICE) if by_count else None
    torch.library.opcheck(lerp_op.overload, ([a.clone() for a in avg], cur, 0.0 if by_count else 0.1, count,
                                             backend))


def test_registered():
    assert "ema_lerp_" in dir(torch.ops.fastadv)
