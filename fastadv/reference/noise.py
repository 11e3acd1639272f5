"""Noise injection of seed ``000_ce39ad189fbf116e.txt`` (input, weight and
activation noise), written from its math.

* ``add_gaussian_noise(x, std) = x + randn_like(x) * std``.
* ``noisy_token_ids(ids, f, V) = clamp(long(float(ids) + f * z), 0, V - 1)``,
  ``z ~ N(0, 1)`` in fp32, ``long`` truncating toward zero (the seed's
  input-id noise; same RNG draw as the seed's ``randn_like(ids, dtype=float)``).
* ``GaussianNoise(std)``: activation noise, ``x + std * z`` in training mode,
  the identity in eval mode or when ``std == 0``.
* ``weight_noise(model, std, adv_param="weight")``: a context manager that, for
  every parameter whose name contains ``adv_param``, adds ``N(0, std^2)`` in
  place on entry and copies the exact original back on exit (``data_ptr``
  unchanged).  The seed describes weight noise without code; this is its
  plain form.
"""
from contextlib import contextmanager

import torch
from torch import nn


def add_gaussian_noise(x, std):
    return x + torch.randn_like(x) * std


def noisy_token_ids(input_ids, noise_factor, vocab_size):
    noise = torch.randn_like(input_ids, dtype=torch.float) * noise_factor
    return (input_ids.float() + noise).long().clamp(min=0, max=vocab_size - 1)


class GaussianNoise(nn.Module):
    def __init__(self, std):
        super().__init__()
        self.std = std

    def forward(self, x):
        if not self.training or self.std == 0:
            return x
        return x + torch.randn_like(x) * self.std

    def extra_repr(self):
        return f"std={self.std}"


@contextmanager
def weight_noise(model, std, adv_param="weight"):
    params = [p for n, p in model.named_parameters() if adv_param in n]
    backups = [p.detach().clone() for p in params]
    try:
        with torch.no_grad():
            for p in params:
                p.add_(torch.randn_like(p) * std)
        yield model
    finally:
        with torch.no_grad():
            for p, b in zip(params, backups):
                p.copy_(b)
