"""A full adversarial training step of a small transformer with PGD, K=3:
the model's forward and backward (K+1 of each) plus the perturbation work, for
the seed PGD and for fastadv.PGD.  The ratio says how much of the training
step's overhead fastadv removes (the forward/backward cost is the same).

GPU: a 4-layer, d=256 encoder over a 30522-token vocabulary, 16x128 tokens.
CPU: 2 layers, d=32, vocabulary 128, 2x16 tokens.  Check: after one step the
parameters and gradients match the seed's (rtol 1e-4: the two attacks round
the perturbation in a different order, and the model amplifies the last bits).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from .case import Impl, Prepared, real_sizes
from .check import usable_backends

K = 3


@dataclass(frozen=True)
class Case:
    vocab: int
    dim: int
    layers: int
    batch: tuple[int, int]

    @property
    def name(self) -> str:
        return f"encoder {self.layers}L d={self.dim} vocab={self.vocab} tokens={self.batch[0]}x{self.batch[1]}"

    @property
    def size(self):
        return (self.vocab, self.dim)


def cases(device, full: bool | None = None) -> list[Case]:
    if real_sizes(device, full):
        return [Case(30522, 256, 4, (16, 128))]
    return [Case(128, 32, 2, (2, 16))]  # small: the Triton interpreter runs one program per table row


class Encoder(nn.Module):
    def __init__(self, case: Case):
        super().__init__()
        self.word_embeddings = nn.Embedding(case.vocab, case.dim)
        layer = nn.TransformerEncoderLayer(case.dim, 4, 4 * case.dim, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, case.layers)
        self.head = nn.Linear(case.dim, 2)

    def forward(self, ids, labels):
        h = self.encoder(self.word_embeddings(ids))
        return nn.functional.cross_entropy(self.head(h[:, 0]), labels)


def train_step(model, pgd, opt, ids, labels):
    """The seed's loop for one batch."""
    model(ids, labels).backward()
    pgd.backup_grad()
    for t in range(K):
        pgd.attack(is_first_attack=(t == 0))
        if t != K - 1:
            model.zero_grad()
        else:
            pgd.restore_grad()
        model(ids, labels).backward()
    pgd.restore()
    opt.step()
    model.zero_grad()


def _impl(name, case, device, make_pgd):
    def setup():
        gen = torch.Generator(device=device).manual_seed(0)
        torch.manual_seed(0)
        base = Encoder(case).to(device)
        ids = torch.randint(0, case.vocab, case.batch, generator=gen, device=device)
        labels = torch.randint(0, 2, (case.batch[0],), generator=gen, device=device)
        interpreted = name == "triton" and torch.device(device).type == "cpu"

        def check():
            fast, slow = copy.deepcopy(base), copy.deepcopy(base)
            from fastadv.reference import PGD as RefPGD
            for m, p in ((fast, make_pgd(fast)), (slow, RefPGD(slow))):
                train_step(m, p, torch.optim.SGD(m.parameters(), lr=0.1), ids, labels)
            for (n, a), b in zip(fast.named_parameters(), slow.parameters()):
                if not torch.allclose(a, b, rtol=1e-4, atol=1e-5):
                    return f"{n} differs from the seed's after one step"
            return None

        model = copy.deepcopy(base)
        pgd = make_pgd(model)
        opt = torch.optim.SGD(model.parameters(), lr=0.0)  # lr 0: every timed step is the same step
        # the step runs the model's forward and backward: syncs there are not fastadv's
        return Prepared(step=lambda: train_step(model, pgd, opt, ids, labels), check=check,
                        timed=not interpreted, extra={"interpreted": True} if interpreted else {},
                        sync_free=False)
    return Impl(name, setup)


def impls(case: Case, device) -> list[Impl]:
    from fastadv import PGD
    from fastadv.reference import PGD as RefPGD
    out = [_impl("reference", case, device, lambda m: RefPGD(m))]
    return out + [_impl(b, case, device, lambda m, b=b: PGD(m, backend=b)) for b in usable_backends(device)]


def release() -> None:
    pass
