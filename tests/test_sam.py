"""fastadv.SAM against davda54's SAM (fastadv.reference.sam), on every backend
available here."""
import copy

import pytest
import torch
from torch import nn

import fastadv.kernels as kernels
from fastadv.bench.count import count
from fastadv.ops._live import StorageMoved
from fastadv.ops.sam import sam_perturb_
from fastadv.optim.sam import SAM
from fastadv.reference.sam import SAM as RefSAM

from conftest import DEVICE, launches_total, odd_or_aligned, record_guards

FP32 = dict(rtol=1e-5, atol=1e-6)


def net(depth=2, width=10):
    layers = [nn.Linear(6, width), nn.Tanh()]
    for _ in range(depth - 1):
        layers += [nn.Linear(width, width), nn.Tanh()]
    return nn.Sequential(*layers, nn.Linear(width, 3)).to(DEVICE)


def data(n=16):
    return torch.randn(n, 6, device=DEVICE), torch.randint(0, 3, (n,), device=DEVICE)


def loss_of(model, x, y):
    return nn.functional.cross_entropy(model(x), y)


def groups(model, adaptive):
    params = list(model.parameters())
    return [{"params": params[:2], "rho": 0.3, "adaptive": True},
            {"params": params[2:]}] if adaptive == "mixed" else params


def pair(adaptive, backend, **kw):
    model = net()
    ref_model = copy.deepcopy(model)
    ad = adaptive is True
    opt = SAM(groups(model, adaptive), torch.optim.SGD, rho=0.1, adaptive=ad, lr=0.05, momentum=0.9,
              backend=backend, **kw)
    ref = RefSAM(groups(ref_model, adaptive), torch.optim.SGD, rho=0.1, adaptive=ad, lr=0.05, momentum=0.9)
    return model, ref_model, opt, ref


def assert_close_models(a, b, **tol):
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p, q, **(tol or FP32), msg=n)


@pytest.mark.parametrize("adaptive", [False, True, "mixed"])
def test_first_and_second_step_match_davda54(backend, adaptive):
    model, ref_model, opt, ref = pair(adaptive, backend)
    before = [p.data_ptr() for p in model.parameters()]
    for _ in range(3):
        x, y = data()
        for m, o in ((model, opt), (ref_model, ref)):
            loss_of(m, x, y).backward()
            o.first_step(zero_grad=True)
        assert_close_models(model, ref_model)  # w + e(w)
        for m, o in ((model, opt), (ref_model, ref)):
            loss_of(m, x, y).backward()
            o.second_step(zero_grad=True)
        assert_close_models(model, ref_model)  # base step from w
    assert [p.data_ptr() for p in model.parameters()] == before


def test_step_with_closure(backend):
    model, ref_model, opt, ref = pair(False, backend)
    x, y = data()
    for m, o in ((model, opt), (ref_model, ref)):
        def closure(m=m):
            loss = loss_of(m, x, y)
            loss.backward()
            return loss
        closure()
        o.step(closure)
        o.zero_grad()
    assert_close_models(model, ref_model)
    with pytest.raises(ValueError, match="requires closure"):
        opt.step()


def test_restore_is_bit_exact_and_none_grads_are_skipped(backend):
    model, ref_model, opt, ref = pair(False, backend)
    x, y = data()
    loss_of(model, x, y).backward()
    loss_of(ref_model, x, y).backward()
    for m in (model, ref_model):
        m[0].bias.grad = None
    before = [p.detach().clone() for p in model.parameters()]
    opt.first_step()
    ref.first_step()
    assert_close_models(model, ref_model)
    assert torch.equal(model[0].bias, before[1])  # no gradient: untouched
    assert model[0].bias not in opt.state or "old_p" not in opt.state[model[0].bias]
    assert torch.equal(opt.state[model[0].weight]["old_p"], before[0])
    opt.restore()
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))


def test_protocol_misuse_keeps_the_weights(backend):
    model, _, opt, _ = pair(False, backend)
    x, y = data()
    loss_of(model, x, y).backward()
    before = [p.detach().clone() for p in model.parameters()]
    opt.first_step()
    with pytest.raises(RuntimeError, match="still perturbed"):
        opt.first_step()
    opt.restore()
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    with pytest.raises(RuntimeError, match="without a preceding first_step"):
        opt.second_step()
    with pytest.raises(ValueError, match="rho"):
        SAM(model.parameters(), torch.optim.SGD, rho=-1, lr=0.1)


def test_zero_and_nan_gradients_follow_the_math(backend):
    """No skip in SAM: a zero norm gives e(w) = 0, a NaN norm gives NaN weights,
    and restore puts every weight back."""
    for special in (0.0, float("nan")):
        model, ref_model, opt, ref = pair(False, backend)
        for m in (model, ref_model):
            for p in m.parameters():
                p.grad = torch.full_like(p, special)
        before = [p.detach().clone() for p in model.parameters()]
        opt.first_step()
        ref.first_step()
        for p, q in zip(model.parameters(), ref_model.parameters()):
            torch.testing.assert_close(p, q, **FP32, equal_nan=True)
        opt.restore()
        assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))


def test_low_precision_params(backend):
    model = net()
    model[0].half()
    x, y = data()
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    ref_model = copy.deepcopy(model).float()
    for p, q in zip(model.parameters(), ref_model.parameters()):
        q.grad = p.grad.float()
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.5, lr=0.1, backend=backend)
    RefSAM(ref_model.parameters(), torch.optim.SGD, rho=0.5, lr=0.1).first_step()
    opt.first_step()
    for p, q in zip(model.parameters(), ref_model.parameters()):
        tol = FP32 if p.dtype == torch.float32 else dict(rtol=2 * 2**-10, atol=1e-4)
        torch.testing.assert_close(p.float(), q, **tol)


def test_grad_scaler_recipe(backend):
    """Scaled gradients in the first step (e(w) does not depend on the scale),
    restore, then scaler.step(base_optimizer): the unscaled result."""
    model, ref_model, opt, ref = pair(False, backend)
    scaler = torch.amp.GradScaler(DEVICE.type, init_scale=1024.0)
    x, y = data()
    scaler.scale(loss_of(model, x, y)).backward()
    opt.first_step(zero_grad=True)
    scaler.scale(loss_of(model, x, y)).backward()
    opt.restore()
    scaler.step(opt.base_optimizer)
    scaler.update()
    loss_of(ref_model, x, y).backward()
    ref.first_step(zero_grad=True)
    loss_of(ref_model, x, y).backward()
    ref.second_step()
    assert_close_models(model, ref_model, rtol=1e-4, atol=1e-6)


@pytest.mark.launch_free
def test_state_dict_roundtrip_keeps_groups_linked(backend):
    model, _, opt, _ = pair("mixed", backend)
    state = opt.state_dict()
    opt.load_state_dict(state)
    assert opt.base_optimizer.param_groups is opt.param_groups
    assert opt.param_groups[0]["adaptive"] is True and opt.param_groups[1]["rho"] == 0.1


def test_first_step_makes_no_host_sync(backend, no_host_sync):
    model, _, opt, _ = pair("mixed", backend)
    x, y = data()
    loss_of(model, x, y).backward()
    with no_host_sync():
        opt.first_step()
        opt.restore()


def test_launches_do_not_grow_with_depth(backend):
    if backend == "torch":
        pytest.skip("the torch fallback launches per tensor")

    def launches(depth):
        model = net(depth)
        opt = SAM(model.parameters(), torch.optim.SGD, rho=0.1, lr=0.1, backend=backend)
        for p in model.parameters():
            p.grad = torch.randn_like(p)

        def step():
            opt.first_step()
            opt.restore()

        step()
        return count(step)

    shallow, deep = launches(2), launches(24)
    assert shallow["launches"] == deep["launches"] == 4  # sumsq, global norm, update, restore
    assert shallow["syncs"] == deep["syncs"] == 0


def test_functional_op_global_norm(backend):
    ws = [torch.randn(n, device=DEVICE) for n in (5, 300, 1)]
    gs = [torch.randn_like(w) for w in ws]
    bs = [torch.empty_like(w) for w in ws]
    w0 = [w.clone() for w in ws]
    norm = sam_perturb_(ws, gs, bs, [0.2, 0.2, 0.4], [False, True, False], backend=backend)
    expect = torch.linalg.vector_norm(torch.stack([gs[0].norm(), (w0[1].abs() * gs[1]).norm(), gs[2].norm()]))
    torch.testing.assert_close(norm, expect, **FP32)
    torch.testing.assert_close(ws[1], w0[1] + w0[1] ** 2 * gs[1] * (0.2 / (expect + 1e-12)), **FP32)
    torch.testing.assert_close(ws[2], w0[2] + gs[2] * (0.4 / (expect + 1e-12)), **FP32)
    assert all(torch.equal(b, w) for b, w in zip(bs, w0))
    if backend != "torch":
        assert kernels.LAUNCHES[f"{backend}.sam_update"] > 0


@pytest.mark.gpu
def test_gpu_bf16_against_reference(backend, no_host_sync):
    """A bf16 layer among fp32 ones: against davda54 run in fp32 on the same
    values (bf16: two ulps)."""
    torch.manual_seed(3)
    model = net(4, 512).cuda()
    model[2].to(torch.bfloat16)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    ref_model = copy.deepcopy(model).float()
    for p, q in zip(model.parameters(), ref_model.parameters()):
        q.grad = p.grad.float()
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.05, adaptive=True, lr=0.1, backend=backend)
    ref = RefSAM(ref_model.parameters(), torch.optim.SGD, rho=0.05, adaptive=True, lr=0.1)
    before = [p.detach().clone() for p in model.parameters()]
    with no_host_sync():
        opt.first_step()
    ref.first_step()
    for p, q in zip(model.parameters(), ref_model.parameters()):
        tol = FP32 if p.dtype == torch.float32 else dict(rtol=2 * 2**-7, atol=1e-5)
        torch.testing.assert_close(p.float(), q, **tol)
    with no_host_sync():
        opt.restore()
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))


# -- device guard, vector access -------------------------------------------------


def test_kernel_launches_run_under_the_device_guard(backend, monkeypatch):
    if backend == "torch":
        pytest.skip("kernel backends only")
    import fastadv.ops.sam as ops_sam
    seen = record_guards(monkeypatch, ops_sam)
    ws = [torch.randn(n, device=DEVICE) for n in (5, 300)]
    gs, bs = [torch.randn_like(w) for w in ws], [torch.empty_like(w) for w in ws]
    before = launches_total()
    sam_perturb_(ws, gs, bs, [0.1, 0.1], [False, True], backend=backend)
    total = launches_total() - before
    assert total > 0 and seen["inside"] == total
    assert seen["devices"] and all(d == ws[0].device for d in seen["devices"])


def sam_formula(ws, gs, rhos, adaptives):
    """davda54's first step on bare tensors, in fp32 torch: (norm, new weights)."""
    norm = torch.linalg.vector_norm(torch.stack([((w.abs() if a else 1.0) * g).norm()
                                                 for w, g, a in zip(ws, gs, adaptives)]))
    return norm, [w + (w ** 2 if a else 1.0) * g * (r / (norm + 1e-12))
                  for w, g, r, a in zip(ws, gs, rhos, adaptives)]


@pytest.mark.parametrize("odd", [False, True], ids=["aligned", "odd-address"])
def test_blocks_tails_and_alignment_match_the_formula(backend, odd):
    from fastadv.kernels.host import shared_tables
    sizes = (2048, 4101, 32768 + 2048 + 3, 1)  # whole blocks; blocks + tail; two chunks; tail only
    ws = [odd_or_aligned(n, odd) for n in sizes]
    gs = [odd_or_aligned(n, odd) for n in sizes]
    bs = [odd_or_aligned(n, odd) for n in sizes]
    w0 = [w.clone() for w in ws]
    cache = shared_tables()
    cache.clear()
    rhos, adaptive = [0.05, 0.05, 0.1, 0.1], [True, True, False, False]
    norm = sam_perturb_(ws, gs, bs, rhos, adaptive, backend=backend)
    expect_norm, expect = sam_formula(w0, gs, rhos, adaptive)
    torch.testing.assert_close(norm, expect_norm, **FP32)
    for a, b in zip(ws, expect):
        torch.testing.assert_close(a, b, **FP32)
    assert all(torch.equal(b, w) for b, w in zip(bs, w0))
    if backend != "torch":
        tables = list(cache._tables.values())
        assert tables and all(t.aligned == (not odd) for t in tables)


# -- parameter groups of equal sizes (issue 14: one cached table shared by two buckets) ----


def blocks_model(n_blocks, width=8):
    """``n_blocks`` identical blocks: every group has the same tensor sizes."""
    return nn.Sequential(*[nn.Sequential(nn.Linear(width, width), nn.Tanh()) for _ in range(n_blocks)],
                         nn.Linear(width, 3)).to(DEVICE)


def block_groups(model, n_blocks, vary):
    out = []
    for i in range(n_blocks):
        g = {"params": list(model[i].parameters())}
        if vary in ("rho", "both"):
            g["rho"] = 0.05 * (i + 1)
        if vary in ("adaptive", "both"):
            g["adaptive"] = i % 2 == 1
        out.append(g)
    out.append({"params": list(model[n_blocks].parameters()), "rho": 0.7})  # a bucket of its own
    return out


@pytest.mark.parametrize("n_blocks", [2, 4])
@pytest.mark.parametrize("vary", ["rho", "adaptive", "both"])
def test_groups_of_equal_sizes_with_their_own_rho(backend, n_blocks, vary):
    """Per-block rho / adaptive on identical blocks: each group is perturbed
    once with its own rho, backed up, and restored (davda54 as the oracle)."""
    model = blocks_model(n_blocks)
    ref_model = copy.deepcopy(model)
    opt = SAM(block_groups(model, n_blocks, vary), torch.optim.SGD, rho=0.1, lr=0.05, backend=backend)
    ref = RefSAM(block_groups(ref_model, n_blocks, vary), torch.optim.SGD, rho=0.1, lr=0.05)
    x, y = torch.randn(16, 8, device=DEVICE), torch.randint(0, 3, (16,), device=DEVICE)
    for _ in range(2):
        before = [p.detach().clone() for p in model.parameters()]
        for m, o in ((model, opt), (ref_model, ref)):
            loss_of(m, x, y).backward()
            o.first_step(zero_grad=True)
        assert_close_models(model, ref_model)
        for p in model.parameters():
            assert torch.equal(opt.state[p]["old_p"], before.pop(0))
        for m, o in ((model, opt), (ref_model, ref)):
            loss_of(m, x, y).backward()
            o.second_step(zero_grad=True)
        assert_close_models(model, ref_model)


def test_equal_size_buckets_get_their_own_tables(backend):
    """Two buckets of identical sizes: two tables, each listing its own tensors."""
    if backend == "torch":
        pytest.skip("kernel backends only (the torch path has no tables)")
    from fastadv.kernels.host import shared_tables
    ws = [torch.randn(40, device=DEVICE) for _ in range(4)]
    gs = [torch.randn_like(w) for w in ws]
    bs = [torch.empty_like(w) for w in ws]
    w0 = [w.clone() for w in ws]
    cache = shared_tables()
    cache.clear()
    rhos, adaptive = [0.1, 0.1, 0.3, 0.3], [False, True, False, True]  # four buckets, one size
    norm = sam_perturb_(ws, gs, bs, rhos, adaptive, backend=backend)
    expect_norm, expect = sam_formula(w0, gs, rhos, adaptive)
    torch.testing.assert_close(norm, expect_norm, **FP32)
    for a, b in zip(ws, expect):
        torch.testing.assert_close(a, b, **FP32)
    assert all(torch.equal(b, w) for b, w in zip(bs, w0))
    tables = list(cache._tables.values())
    assert len({id(t) for t in tables}) == len(tables) == 4
    assert sorted(t.ptrs[0] for t in tables) == sorted(w.data_ptr() for w in ws)


# -- storage moved between first_step and restore (issue 14) ---------------------------------

MOVES = {
    "double-float": lambda m: m.double().float(),
    "to-with-copy": lambda m: m.to(torch.float64).to(torch.float32),
    "assign": lambda m: m.load_state_dict(m.state_dict(), assign=True),
}


@pytest.mark.parametrize("move", MOVES)
def test_restore_follows_storage_moved_since_first_step(backend, move):
    """User code reallocates the parameters between first_step and restore:
    the new storage gets the original weights, bit for bit; the base step
    then matches davda54's.  (``assign=True`` with the model's own state dict:
    the new Parameter objects share the optimizer's parameters' storage.)"""
    model, ref_model, opt, ref = pair("mixed", backend)
    x, y = data()
    originals = [p.detach().clone() for p in model.parameters()]
    old_ptrs = [p.data_ptr() for p in model.parameters()]
    for m, o in ((model, opt), (ref_model, ref)):
        loss_of(m, x, y).backward()
        o.first_step(zero_grad=True)
    MOVES[move](model)
    if move != "assign":
        assert [p.data_ptr() for p in model.parameters()] != old_ptrs  # really moved
    for m, o in ((model, opt), (ref_model, ref)):
        loss_of(m, x, y).backward()
    opt.restore()
    assert all(torch.equal(p, o) for p, o in zip(model.parameters(), originals))
    if move != "assign":  # assign=True gives the model new Parameter objects, not the optimizer's
        opt.base_optimizer.step()
        ref.second_step()
        assert_close_models(model, ref_model)


@pytest.mark.parametrize("change", ["half", "resize"])
def test_restore_refuses_an_inexact_target_and_keeps_the_backup(backend, change):
    model, _, opt, _ = pair(False, backend)
    x, y = data()
    originals = [p.detach().clone() for p in model.parameters()]
    loss_of(model, x, y).backward()
    opt.first_step()
    if change == "half":
        model.half()
        match = r"param_groups\[0\]\['params'\]\[0\] changed dtype from torch.float32 to torch.float16"
    else:
        model[0].bias.data = torch.zeros(11, device=DEVICE)
        match = r"param_groups\[0\]\['params'\]\[1\] changed shape from \(10,\) to \(11,\)"
    seen = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(StorageMoved, match=match):
        opt.restore()
    assert all(torch.equal(p, s) for p, s in zip(model.parameters(), seen))  # nothing written
    if change == "half":
        model.float()
    else:
        model[0].bias.data = torch.zeros(10, device=DEVICE)
    opt.restore()  # the backup was kept
    assert all(torch.equal(p, o) for p, o in zip(model.parameters(), originals))


# -- torch.library registration ----------------------------------------------------------------

def test_opcheck(backend):
    """Schema (mutations declared), fake tensor and AOT dispatch of ``fastadv::sam_perturb_``:
    buckets of (rho, adaptive), one tensor without gradient signal."""
    from fastadv.ops.sam import sam_perturb_op
    ws = [torch.randn(5, 3, device=DEVICE), torch.randn(7, device=DEVICE), torch.randn(40, device=DEVICE)]
    gs = [torch.randn_like(w) for w in ws]
    gs[1].zero_()
    torch.library.opcheck(sam_perturb_op.overload, ([w.clone() for w in ws], gs, [torch.empty_like(w) for w in ws],
                                                    [0.05, 0.05, 0.2], [False, True, True], backend))


def test_registered():
    assert "sam_perturb_" in dir(torch.ops.fastadv)
