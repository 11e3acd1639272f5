"""Embedding FGSM: fastadv.fgsm_perturb and adversarial_train_step against the
seed-000 reference."""
import types

import pytest
import torch
from torch import nn

import fastadv
from fastadv.reference import adversarial_train_step as ref_step
from fastadv.reference import fgsm_perturb as ref_perturb

from conftest import DEVICE


@pytest.mark.parametrize("shape", [(0, 3), (1,), (2, 7, 5), (3, 4097)])
def test_perturb_matches_reference_bitwise(backend, shape, request):
    if 0 in shape:
        request.applymarker(pytest.mark.launch_free)  # an empty tensor needs no kernel
    e = torch.randn(shape, device=DEVICE)
    g = torch.randn(shape, device=DEVICE)
    if g.numel() > 3:
        g.view(-1)[:3] = torch.tensor([0.0, float("nan"), -0.0])
    assert torch.equal(fastadv.fgsm_perturb(e, g, 0.1, backend=backend), ref_perturb(e, g, 0.1))


def test_perturb_fp16(backend):
    e = torch.randn(5, 33, device=DEVICE)
    g = torch.randn(5, 33, device=DEVICE)
    out = fastadv.fgsm_perturb(e.half(), g.half(), 0.1, backend=backend)
    assert out.dtype == torch.float16
    torch.testing.assert_close(out, ref_perturb(e.half().float(), g, 0.1).half(), rtol=0, atol=0)


def test_perturb_is_differentiable_in_embeds(backend):
    e = torch.randn(4, 6, device=DEVICE, requires_grad=True)
    g = torch.randn(4, 6, device=DEVICE)
    out = fastadv.fgsm_perturb(e, g, 0.3, backend=backend)
    (out * 2).sum().backward()
    assert torch.equal(e.grad, torch.full_like(e, 2.0))


def test_perturb_no_host_sync(backend, no_host_sync):
    e, g = torch.randn(8, 8, device=DEVICE), torch.randn(8, 8, device=DEVICE)
    with no_host_sync():
        fastadv.fgsm_perturb(e, g, 0.1, backend=backend)


class TinyHF(nn.Module):
    """An HF-style classifier: get_input_embeddings, inputs_embeds, .logits."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(50, 8)
        self.body = nn.Linear(8, 3)

    def get_input_embeddings(self):
        return self.emb

    def forward(self, input_ids=None, inputs_embeds=None, attention_mask=None):
        h = self.emb(input_ids) if inputs_embeds is None else inputs_embeds
        if attention_mask is not None:
            h = h * attention_mask.unsqueeze(-1)
        return types.SimpleNamespace(logits=self.body(torch.tanh(h)).mean(1))


def test_adversarial_train_step_matches_reference(backend):
    model = TinyHF().to(DEVICE)
    ref_model = TinyHF().to(DEVICE)
    ref_model.load_state_dict(model.state_dict())
    ids = torch.randint(0, 50, (4, 6), device=DEVICE)
    inputs = {"input_ids": ids, "attention_mask": torch.ones(4, 6, device=DEVICE)}
    labels = torch.randint(0, 3, (4,), device=DEVICE)
    loss = fastadv.adversarial_train_step(model, inputs, labels, epsilon=0.1, backend=backend)
    ref = ref_step(ref_model, inputs, labels, epsilon=0.1)
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-6)
    loss.backward()
    ref.backward()
    for p, q in zip(model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6)


def test_adversarial_train_step_needs_input_ids():
    with pytest.raises(ValueError, match="input_ids"):
        fastadv.adversarial_train_step(TinyHF(), {"inputs_embeds": torch.zeros(1, 2, 8)},
                                       torch.zeros(1, dtype=torch.long))


def test_perturb_float64_on_the_torch_backend_keeps_its_precision():
    e = torch.randn(6, 5, dtype=torch.float64, device=DEVICE)
    g = torch.randn(6, 5, dtype=torch.float64, device=DEVICE)
    out = fastadv.fgsm_perturb(e, g, 1e-9, backend="torch")
    assert out.dtype == torch.float64 and torch.equal(out, e + 1e-9 * g.sign())


@pytest.mark.launch_free
def test_forced_kernel_backend_refuses_float64(backend):
    if backend == "torch":
        pytest.skip("the torch backend takes float64")
    e = torch.randn(3, 3, dtype=torch.float64, device=DEVICE)
    with pytest.raises(TypeError, match="float32, float16 and bfloat16"):
        fastadv.fgsm_perturb(e, torch.randn_like(e), 0.1, backend=backend)


def test_forced_cuda_backend_never_runs_torch_code():
    """backend='cuda' runs the CUDA kernel or raises; it never falls back."""
    from fastadv import BackendUnavailable
    e = torch.randn(4, 4, device=DEVICE)
    if DEVICE.type != "cuda":
        with pytest.raises(BackendUnavailable, match="CUDA tensors"):
            fastadv.fgsm_perturb(e, torch.randn_like(e), 0.1, backend="cuda")


def test_opcheck(backend):
    from fastadv.ops.fgsm import fgsm_perturb_op
    e = torch.randn(4, 6, device=DEVICE, requires_grad=True)
    torch.library.opcheck(fgsm_perturb_op.overload, (e, torch.randn(4, 6, device=DEVICE), 0.1, backend))


def test_compiled_perturbation_has_no_graph_break(backend):
    torch._dynamo.reset()
    e = torch.randn(4, 6, device=DEVICE, requires_grad=True)
    g = torch.randn(4, 6, device=DEVICE)
    f = torch.compile(lambda e, g: (fastadv.fgsm_perturb(e, g, 0.1, backend=backend) * 2).sum(),
                      fullgraph=True)
    out = f(e, g)
    out.backward()
    torch.testing.assert_close(out, (ref_perturb(e.detach(), g, 0.1) * 2).sum())
    assert torch.equal(e.grad, torch.full_like(e, 2.0))
