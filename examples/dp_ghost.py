"""DP-SGD with book-keeping / ghost clipping on CPU in seconds.

    python examples/dp_ghost.py            # book-keeping (one backward)
    python examples/dp_ghost.py ghost      # ghost clipping (two backwards)

A tiny language model with a tied head on random tokens: per-sample gradient
norms come from each layer's inputs and output gradients, never from
per-sample gradients; Opacus's accountant reports epsilon.
"""
import sys

import torch
import torch.nn.functional as F
from torch import nn

from fastadv.dp import PrivacyEngine


class TinyLM(nn.Module):
    def __init__(self, vocab=50, d=32, length=12):
        super().__init__()
        self.emb, self.pos = nn.Embedding(vocab, d), nn.Embedding(length, d)
        self.ln = nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.emb.weight            # tied: handled exactly
        nn.init.normal_(self.emb.weight, std=0.02)    # GPT-2's init (N(0, 1) logits would be huge)

    def forward(self, ids):
        b, t = ids.shape
        h = self.emb(ids) + self.pos(torch.arange(t).expand(b, t))
        q, k, v = self.qkv(self.ln(h)).chunk(3, dim=-1)
        h = h + self.proj(F.scaled_dot_product_attention(q, k, v, is_causal=True))
        return self.head(h)


def main(mode="bk"):
    torch.manual_seed(0)
    tokens = torch.randint(0, 50, (256, 13))
    data = torch.utils.data.TensorDataset(tokens[:, :-1], tokens[:, 1:])
    loader = torch.utils.data.DataLoader(data, batch_size=64)
    model = TinyLM()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    engine = PrivacyEngine()
    model, optimizer, criterion, loader = engine.make_private(
        module=model, optimizer=optimizer, data_loader=loader, criterion=nn.CrossEntropyLoss(),
        noise_multiplier=1.0, max_grad_norm=1.0, grad_sample_mode=mode)
    for epoch in range(2):
        for x, y in loader:
            optimizer.zero_grad()
            logits = model(x)
            loss = criterion(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), shape=logits.shape)
            loss.backward()
            optimizer.step()
        print(f"{mode}: epoch {epoch}  loss {loss.item():.3f}  epsilon {engine.get_epsilon(1e-5):.2f}")


if __name__ == "__main__":
    main(*sys.argv[1:])
