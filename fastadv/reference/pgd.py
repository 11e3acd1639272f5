"""Seed PGD (``001_4797a51bec1d6b12.txt``), written from its math.

Protocol (K steps per batch)::

    loss.backward(); pgd.backup_grad()
    for t in range(K):
        pgd.attack(is_first_attack=(t == 0))
        model.zero_grad() if t != K - 1 else pgd.restore_grad()
        model(...).backward()
    pgd.restore()

``attack()``: for every parameter whose name contains ``emb_name`` and that
requires grad, on the first attack back up ``w0 = param``; then, unless
``||g||`` is 0 or NaN, ``w <- w + alpha * g / ||g||`` followed by the
projection ``r = w - w0``, ``r <- epsilon * r / ||r||`` when
``||r|| > epsilon``, ``w <- w0 + r`` (a new tensor rebound to ``param.data``,
as in the seed; the projection is skipped with the step, as in the original
post the seed copies, whose indentation the seed text lost).

``backup_grad()`` clones every existing gradient of the model;
``restore_grad()`` rebinds ``param.grad`` to those clones themselves (no copy),
for every parameter that has a gradient at that moment, so the last backward
accumulates into the backed-up tensors.  ``restore()`` rebinds the backups.

Faithful quirks: ``attack()`` fails (``AttributeError`` from ``torch.norm``)
on a matching parameter whose ``grad`` is None; ``restore_grad()`` raises
``KeyError`` for a parameter that had no gradient at ``backup_grad()`` time.
Host syncs: two per tensor in ``attack`` plus one in ``project``.
"""
import torch


class PGD:
    def __init__(self, model, emb_name="word_embeddings.", epsilon=1.0, alpha=0.3):
        self.model = model
        self.emb_name = emb_name
        self.epsilon = epsilon
        self.alpha = alpha
        self.emb_backup = {}
        self.grad_backup = {}

    def _targets(self):
        for name, param in self.model.named_parameters():
            if param.requires_grad and self.emb_name in name:
                yield name, param

    def attack(self, is_first_attack=False):
        for name, param in self._targets():
            if is_first_attack:
                self.emb_backup[name] = param.data.clone()
            norm = torch.norm(param.grad)
            if norm != 0 and not torch.isnan(norm):
                param.data.add_(self.alpha * param.grad / norm)
                param.data = self.project(name, param.data, self.epsilon)

    def restore(self):
        for name, param in self._targets():
            assert name in self.emb_backup
            param.data = self.emb_backup[name]
        self.emb_backup = {}

    def project(self, param_name, param_data, epsilon):
        r = param_data - self.emb_backup[param_name]
        if torch.norm(r) > epsilon:
            r = epsilon * r / torch.norm(r)
        return self.emb_backup[param_name] + r

    def backup_grad(self):
        for name, param in self.model.named_parameters():
            if param.requires_grad and param.grad is not None:
                self.grad_backup[name] = param.grad.clone()

    def restore_grad(self):
        for name, param in self.model.named_parameters():
            if param.requires_grad and param.grad is not None:
                param.grad = self.grad_backup[name]
