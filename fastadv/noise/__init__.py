"""Noise injection on fused kernels (``fastadv.noise.noise``): input, activation
and weight noise, NEFTune, and the seed's token-id noise.  See docs/noise.md."""
from .noise import (GaussianNoise, add_gaussian_noise, add_gaussian_noise_, neftune, noisy_token_ids,
                    weight_noise)

__all__ = ["GaussianNoise", "add_gaussian_noise", "add_gaussian_noise_", "weight_noise", "neftune",
           "noisy_token_ids"]
