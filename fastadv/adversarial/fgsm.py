"""Seed 000's ``adversarial_train_step`` with the fused FGSM perturbation.

Same semantics as :func:`fastadv.reference.adversarial_train_step` (which
documents where the seed's literal code cannot run): clean loss on the looked-up
embeddings, ``g = d loss / d embeds``, adversarial loss on
``embeds + epsilon * sign(g)``, returns ``0.5 * (loss + adv_loss)`` for the
caller to backpropagate.  Works with any model that accepts ``inputs_embeds``
and returns an object with ``.logits`` (HF models).
"""
import torch
import torch.nn.functional as F

from ..ops._dist import unwrapped
from ..ops.fgsm import fgsm_perturb


def adversarial_train_step(model, inputs, labels, epsilon=0.1, *, backend=None):
    if "input_ids" not in inputs:
        raise ValueError("inputs must hold 'input_ids' (the step looks up the embeddings itself)")
    extra = {k: v for k, v in inputs.items() if k not in ("input_ids", "inputs_embeds")}
    # the table from the wrapped module (DDP / DataParallel do not forward get_input_embeddings),
    # the forwards through ``model`` (DDP averages the gradients)
    embeds = unwrapped(model).get_input_embeddings()(inputs["input_ids"])
    if not embeds.requires_grad:  # frozen embedding table
        embeds.requires_grad_()
    loss = F.cross_entropy(model(inputs_embeds=embeds, **extra).logits, labels)
    (grad,) = torch.autograd.grad(loss, embeds, retain_graph=True)
    adv_embeds = fgsm_perturb(embeds, grad, epsilon, backend=backend)
    adv_loss = F.cross_entropy(model(inputs_embeds=adv_embeds, **extra).logits, labels)
    return 0.5 * (loss + adv_loss)
