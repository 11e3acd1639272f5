"""NEFTune (Jain et al., 2023, "NEFTune: Noisy Embeddings Improve Instruction
Finetuning") in plain PyTorch, written from its definition.

Noise ``U(-1, 1) * alpha / sqrt(L * d)`` is added to the input embeddings
``[B, L, d]`` in training.

* Without a mask (NEFTune's embedding hook, also Hugging Face's):
  ``L`` is the padded sequence length, ``embeds + uniform_(-mag, mag)``.
* With an attention mask (NEFTune's training loop): ``L_b = sum_t mask[b, t]``,
  the noise of token ``t`` is multiplied by ``mask[b, t]``, ``mag_b = alpha /
  sqrt(L_b * d)``; the noise is computed in the embeddings' dtype.
"""
import torch


def neftune(embeds, alpha, attention_mask=None):
    if attention_mask is None:
        mag = alpha / torch.sqrt(torch.tensor(embeds.size(-2) * embeds.size(-1), dtype=torch.float32))
        return embeds + torch.zeros_like(embeds).uniform_(-float(mag), float(mag))
    mask = attention_mask.to(embeds)
    lengths = mask.sum(-1)
    noise = torch.zeros_like(embeds).uniform_(-1, 1) * mask.unsqueeze(-1)
    mag = alpha / torch.sqrt(lengths * embeds.size(-1))  # [B] (or a scalar for one sequence)
    return embeds + (noise * mag.reshape(*mag.shape, 1, 1)).detach()
