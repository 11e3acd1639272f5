"""Seed FGM (``001_4797a51bec1d6b12.txt``), written from its math.

``attack()``: for every parameter whose name contains ``emb_name`` and that
requires grad, back it up and add ``epsilon * g / ||g||`` unless the norm is 0
or NaN.  ``restore()``: put the backups back (as the seed does, by rebinding
``param.data``).  Two host syncs per tensor (the norm tests) and a full clone.
"""
import torch


class FGM:
    def __init__(self, model, emb_name="word_embeddings.", epsilon=1.0):
        self.model = model
        self.epsilon = epsilon
        self.emb_name = emb_name
        self.backup = {}

    def attack(self, epsilon=None, emb_name=None):
        epsilon = self.epsilon if epsilon is None else epsilon
        emb_name = self.emb_name if emb_name is None else emb_name
        for name, param in self.model.named_parameters():
            if param.requires_grad and emb_name in name:
                self.backup[name] = param.data.clone()
                norm = torch.norm(param.grad)
                if norm != 0 and not torch.isnan(norm):
                    r_at = epsilon * param.grad / norm
                    param.data.add_(r_at)

    def restore(self, emb_name=None):
        emb_name = self.emb_name if emb_name is None else emb_name
        for name, param in self.model.named_parameters():
            if param.requires_grad and emb_name in name:
                assert name in self.backup
                param.data = self.backup[name]
        self.backup = {}
