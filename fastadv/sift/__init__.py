"""SiFT (scale-invariant fine-tuning, from DeBERTa) with DeBERTa's API on fused
kernels::

    from fastadv.sift import AdversarialLearner, hook_sift_layer

    adv_modules = hook_sift_layer(model, hidden_size=768)
    adv = AdversarialLearner(model, adv_modules)

    def logits_fn(model, *args, **kwargs):
        return model(*args, **kwargs).logits

    logits, loss = ...                       # the usual forward
    loss = loss + adv.loss(logits, logits_fn, **data)

See docs/noise.md ("SiFT").
"""
from .sift import (AdversarialLearner, PerturbationLayer, hook_sift_layer, kl, mse, perturbation_loss_fns,
                   symmetric_kl)

__all__ = ["PerturbationLayer", "AdversarialLearner", "hook_sift_layer", "symmetric_kl", "kl", "mse",
           "perturbation_loss_fns"]
