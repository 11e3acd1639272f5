"""``fastadv.FGM``: the seed FGM class (same arguments, methods and protocol)
on fused kernels.

    fgm = FGM(model, emb_name='word_embeddings.', epsilon=1.0)
    loss.backward()
    fgm.attack()            # embedding += epsilon * g / ||g||, backed up
    model(batch).loss.backward()
    fgm.restore()           # bit-exact, in place
    optimizer.step(); model.zero_grad()

Differences from the seed, all on the side of not losing data: ``attack()``
twice without ``restore()`` raises (the seed overwrote its backup with the
perturbed weights); ``restore()`` without ``attack()`` raises; an ``emb_name``
matching nothing raises with close candidates; parameters without a gradient
are skipped; restore copies in place, so ``data_ptr`` never changes.
"""
from __future__ import annotations

import contextlib

from torch import nn

from ..ops.fgm import FGMBackup, fgm_attack_, fgm_restore_
from ._params import EmbeddingAttack, check_size, matching_parameters


class FGM(EmbeddingAttack):
    """Fast Gradient Method on embedding matrices (drop-in for the seed class).

    Args:
        model: the model whose parameters named ``*emb_name*`` are perturbed.
        emb_name: substring selecting the parameters (seed default).
        epsilon: size of the perturbation ``epsilon * g / ||g||``.
        backend: ``'auto'`` (default, or ``FASTADV_BACKEND``), ``'triton'``,
            ``'cuda'`` or ``'torch'``.
        row_sparse: ``'auto'`` touches only the rows of an ``nn.Embedding``
            table that its lookups marked (the gradient is zero elsewhere);
            it is off for tables that are also used elsewhere (tied LM head),
            under multi-process training, and on the torch backend.  ``False``
            always uses the dense path; ``True`` requires a sparse-capable table.
            Row-sparse assumes the table is only read through its
            ``nn.Embedding`` modules' forward; pass ``False`` if your model
            also uses the weight directly (e.g. ``x @ emb.weight.T``).
    """

    def __init__(self, model: nn.Module, emb_name: str = "word_embeddings.", epsilon: float = 1.0,
                 *, backend: str | None = None, row_sparse: bool | str = "auto"):
        super().__init__(model, emb_name, backend, row_sparse)
        self.epsilon = check_size(epsilon)
        self.backup: dict[str, FGMBackup] = {}

    # -- the seed's protocol ------------------------------------------------
    def attack(self, epsilon: float | None = None, emb_name: str | None = None) -> None:
        """Back up and perturb every matching parameter that has a gradient."""
        epsilon = self.epsilon if epsilon is None else check_size(epsilon)
        targets = matching_parameters(self.model, emb_name or self.emb_name)
        pending = [n for n, _ in targets if n in self.backup]
        if pending:
            raise RuntimeError(f"FGM.attack() called again before restore(): {pending} are still "
                               f"perturbed; call restore() first (the original weights are kept)")
        self._track(targets)
        for name, param in targets:
            if param.grad is None:
                continue
            mask, capacity = self._row_state(param)
            self.backup[name] = fgm_attack_(param, param.grad, epsilon, row_mask=mask,
                                            row_capacity=capacity, backend=self.backend)

    def restore(self, emb_name: str | None = None) -> None:
        """Put back, bit-exactly and in place, what ``attack()`` perturbed."""
        if not self.backup:
            raise RuntimeError("FGM.restore() called without a preceding attack(): nothing to restore")
        names = [n for n in self.backup if emb_name is None or emb_name in n]
        if not names:
            raise RuntimeError(f"FGM.restore(emb_name={emb_name!r}): no attacked parameter matches; "
                               f"attacked: {list(self.backup)}")
        for name in names:
            fgm_restore_(self.backup.pop(name))

    @contextlib.contextmanager
    def attacked(self, epsilon: float | None = None, emb_name: str | None = None):
        """``with fgm.attacked(): ...`` attacks, then restores even on exceptions."""
        self.attack(epsilon=epsilon, emb_name=emb_name)
        try:
            yield self
        finally:
            self.restore(emb_name=emb_name)
