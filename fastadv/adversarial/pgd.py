"""``fastadv.PGD``: the seed PGD class (same arguments, methods, K-step loop)
on fused kernels.

    pgd = PGD(model, emb_name='word_embeddings.', epsilon=1.0, alpha=0.3)
    loss.backward()
    pgd.backup_grad()
    for t in range(K):
        pgd.attack(is_first_attack=(t == 0))
        if t != K - 1:
            model.zero_grad()
        else:
            pgd.restore_grad()
        model(batch).loss.backward()
    pgd.restore()

Each ``attack`` is one reduction and one fused step + projection over the
touched rows, decided on the device.  ``backup_grad`` copies nothing: it keeps
the gradient tensors themselves, and the first ``attack`` hands the
intermediate backwards fresh gradients (it sets ``.grad`` to None, which is
what ``zero_grad()`` does by default), so even ``zero_grad(set_to_none=False)``
cannot clear the kept originals; ``restore_grad`` puts them back.
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn

from ..ops._dist import check_gradients_synced, is_sharded, named_parameters
from ..ops.pgd import PGDState, pgd_attack_many_, pgd_restore_
from ._params import (EmbeddingAttack, check_size, distributed, live_parameter, live_parameters,
                      matching_parameters)


class PGD(EmbeddingAttack):
    """Projected gradient descent on embedding matrices (drop-in for the seed).

    Args: as the seed (``model, emb_name, epsilon, alpha``), plus ``backend``
    and ``row_sparse`` as in :class:`fastadv.FGM`.
    """

    def __init__(self, model: nn.Module, emb_name: str = "word_embeddings.", epsilon: float = 1.0,
                 alpha: float = 0.3, *, backend: str | None = None, row_sparse: bool | str = "auto"):
        super().__init__(model, emb_name, backend, row_sparse)
        self.epsilon = check_size(epsilon)
        self.alpha = check_size(alpha, "alpha")
        self.emb_backup: dict[str, PGDState] = {}
        self.grad_backup: dict[str, torch.Tensor] = {}
        self._grads_handed_out = False
        self._attacking = False  # a first attack was made and not restored (perturbing or not)

    def attack(self, is_first_attack: bool = False) -> None:
        """One step: perturb along ``alpha * g / ||g||`` and project onto the
        ``epsilon`` ball around the weights saved by the first attack.

        A step that perturbs nothing (no gradient, a frozen table) still
        counts: the next steps and ``restore()`` work as in the seed."""
        if is_first_attack and self._attacking:
            raise RuntimeError("PGD.attack(is_first_attack=True) while the previous attack is not "
                               "restored: call restore() first (the original weights are kept)")
        if not is_first_attack and not self._attacking:
            raise RuntimeError("PGD.attack(is_first_attack=False) with no attack in progress: the first "
                               "step of each attack passes is_first_attack=True (and restore() ends it)")
        candidates = matching_parameters(self.model, self.emb_name)
        check_gradients_synced(self.model, candidates, "PGD.attack()")
        self._attacking = True
        targets = []
        for name, param in candidates:
            grad = param.grad
            if grad is None:
                continue  # the seed crashes here; nothing to step along
            state = self.emb_backup.get(name)
            if state is None and not is_first_attack:
                continue  # no gradient at the first step: the seed never backed it up
            targets.append((name, param, grad, state))
        # All at once: plain tables (no collective) in one multi-tensor call on a kernel backend (triton,
        # cuda) when there are several (bitwise the per-table steps), then FSDP2 shards with one all_reduce per call;
        # each kind's states are kept as soon as it is stepped
        for sharded in (False, True):
            group = [t for t in targets if is_sharded(t[1]) == sharded]
            if group:
                names, params, grads, states = (list(c) for c in zip(*group))
                states = pgd_attack_many_(params, grads, self.alpha, self.epsilon, states,
                                          row_sparse=self.row_sparse, names=names, backend=self.backend)
                self.emb_backup.update(zip(names, states))
        if is_first_attack and self.grad_backup and not self._grads_handed_out:
            self._hand_out_fresh_grads()

    def restore(self) -> None:
        """Put the embeddings saved by the first attack back, bit-exactly, in
        place, into the parameters as they are now."""
        if not self._attacking:
            raise RuntimeError("PGD.restore() called without a preceding attack(): nothing to restore")
        live = live_parameters(self.model)
        for name in list(self.emb_backup):
            pgd_restore_(self.emb_backup[name], live_parameter(live, name, "PGD"), name)
            del self.emb_backup[name]  # dropped only once written back
        self._attacking = False

    def project(self, param_name: str, param_data: torch.Tensor, epsilon: float) -> torch.Tensor:
        """The seed's projection of ``param_data`` onto the ``epsilon`` ball around
        the saved weights (kept for compatibility: ``attack`` already projects)."""
        state = self.emb_backup[param_name]
        w0 = state.backup
        if state.saved is not None:  # rows never perturbed have no backup: they are w0
            w0 = torch.where(state.saved.bool().unsqueeze(1), state.backup, param_data)
        r = param_data - w0
        norm = torch.linalg.vector_norm(r)
        return w0 + torch.where(norm > epsilon, epsilon * r / norm, r)

    def backup_grad(self) -> None:
        """Keep the current gradients: the tensors themselves, no copy, except
        where the storage is not the gradient's own (a view into a DDP bucket
        with ``gradient_as_bucket_view=True``, or any distributed run), which
        the next backward would overwrite: those are cloned.  Under
        ``torch.compile`` every gradient is cloned (whether a tensor is a view
        cannot be asked while tracing; the values are the same)."""
        clone_all = torch.compiler.is_compiling() or distributed()
        self.grad_backup = {n: (p.grad.clone() if clone_all or p.grad._is_view() else p.grad)
                            for n, p in named_parameters(self.model)
                            if p.requires_grad and p.grad is not None}
        self._grads_handed_out = False

    def _hand_out_fresh_grads(self) -> None:
        for name, param in named_parameters(self.model):
            if name in self.grad_backup:
                param.grad = None
        self._grads_handed_out = True

    def restore_grad(self) -> None:
        """Put the kept gradients back: the next backward accumulates into them."""
        if not self.grad_backup:
            raise RuntimeError("PGD.restore_grad() called without backup_grad()")
        for name, param in named_parameters(self.model):
            if name in self.grad_backup:
                param.grad = self.grad_backup[name]
        self.grad_backup = {}
        self._grads_handed_out = False

    @contextlib.contextmanager
    def attacked(self):
        """``with pgd.attacked(): ...`` restores the embeddings even on exceptions."""
        try:
            yield self
        finally:
            if self._attacking:
                self.restore()
