"""Seed FGSM adversarial training step (``000_ce39ad189fbf116e.txt``), written
from its math.

``fgsm_perturb(e, g, eps) = e + eps * sign(g)`` (``sign(0) = 0``).

``adversarial_train_step(model, inputs, labels, epsilon)``, with
``E = model.get_input_embeddings()(inputs["input_ids"])``:

    loss     = CE(model(inputs_embeds=E).logits, labels)
    g        = d loss / d E                      (a constant below)
    adv_loss = CE(model(inputs_embeds=E + epsilon * sign(g)).logits, labels)
    return 0.5 * (loss + adv_loss)

The caller backpropagates the result (``loss.backward(); optimizer.step()``),
so the parameters get the gradient of ``0.5 * (loss + adv_loss)``, through
both passes (the embedding table included).

Deviations from the seed's literal code, which cannot run as written:
* The seed sets ``requires_grad`` on the looked-up embeddings (an error on a
  non-leaf tensor), reads their ``.grad`` (never populated on a non-leaf) and
  calls ``loss.backward()`` inside the step, after which the caller's
  ``backward()`` of the returned loss fails (graph already freed).  Here
  ``g = torch.autograd.grad(loss, E, retain_graph=True)``: no ``.grad`` of the
  model is touched inside the step and the caller's backward works.
* The seed calls ``model(inputs, inputs_embeds=E)``; an HF model would take
  the dict as ``input_ids`` and refuse both.  Here both passes get
  ``inputs_embeds`` plus the other entries of ``inputs`` (``attention_mask``
  ...) as keywords; the seed's second pass passed only ``inputs_embeds``.
"""
import torch
import torch.nn.functional as F


def fgsm_perturb(embeds, grad, epsilon):
    return embeds + epsilon * grad.detach().sign()


def adversarial_train_step(model, inputs, labels, epsilon=0.1):
    extra = {k: v for k, v in inputs.items() if k not in ("input_ids", "inputs_embeds")}
    embeds = model.get_input_embeddings()(inputs["input_ids"])
    if not embeds.requires_grad:  # frozen embeddings: a leaf, as the seed meant
        embeds.requires_grad_()
    loss = F.cross_entropy(model(inputs_embeds=embeds, **extra).logits, labels)
    (grad,) = torch.autograd.grad(loss, embeds, retain_graph=True)
    adv_embeds = fgsm_perturb(embeds, grad, epsilon)
    adv_loss = F.cross_entropy(model(inputs_embeds=adv_embeds, **extra).logits, labels)
    return 0.5 * (loss + adv_loss)
