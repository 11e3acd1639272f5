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
matching no parameter raises with close candidates.  As in the seed, frozen
parameters and parameters without a gradient are skipped, and an ``attack()``
that perturbs nothing still counts (``restore()`` after it is a no-op).
Restore copies in place into the parameters as they are at restore time, so
``data_ptr`` never changes, and a model reallocated in between
(``.double().float()``, ``load_state_dict(assign=True)``) is restored exactly.
"""
from __future__ import annotations

import contextlib

from torch import nn

from ..ops._dist import check_gradients_synced, is_sharded
from ..ops.fgm import FGMBackup, fgm_attack_many_, fgm_restore_
from ._params import EmbeddingAttack, check_size, live_parameter, live_parameters, matching_parameters


class FGM(EmbeddingAttack):
    """Fast Gradient Method on embedding matrices (drop-in for the seed class).

    Args:
        model: the model whose parameters named ``*emb_name*`` are perturbed.
        emb_name: substring selecting the parameters (seed default).
        epsilon: size of the perturbation ``epsilon * g / ||g||``.
        backend: ``'auto'`` (default, or ``FASTADV_BACKEND``), ``'triton'``,
            ``'cuda'`` or ``'torch'``.
        row_sparse: ``'auto'`` / ``True`` (default): on the kernel backends a
            2-D parameter is updated by rows, touching only the rows whose
            gradient holds a non-zero entry, found from the gradient on the
            device (exact for every model, however it reads the table).
            ``False``: the dense kernels.  The torch backend is dense.
    """

    def __init__(self, model: nn.Module, emb_name: str = "word_embeddings.", epsilon: float = 1.0,
                 *, backend: str | None = None, row_sparse: bool | str = "auto"):
        super().__init__(model, emb_name, backend, row_sparse)
        self.epsilon = check_size(epsilon)
        self.backup: dict[str, FGMBackup] = {}
        self._attacked: set[str] = set()  # parameter names attacked, not yet restored

    # -- the seed's protocol ------------------------------------------------
    def attack(self, epsilon: float | None = None, emb_name: str | None = None) -> None:
        """Back up and perturb every matching trainable parameter that has a gradient.

        The attack counts even if it perturbs nothing (no gradient yet, a
        frozen table): ``restore()`` and ``with attacked()`` then work."""
        epsilon = self.epsilon if epsilon is None else check_size(epsilon)
        emb_name = emb_name or self.emb_name
        targets = matching_parameters(self.model, emb_name)
        names = {n for n, _ in targets} or {f"<{emb_name}: nothing trainable>"}
        pending = sorted(names & self._attacked)
        if pending:
            raise RuntimeError(f"FGM.attack() called again before restore(): {pending} are still "
                               f"attacked; call restore() first (the original weights are kept)")
        check_gradients_synced(self.model, targets, "FGM.attack()")
        self._attacked |= names
        # All at once: plain tables (no collective) in one multi-tensor call on a kernel backend (triton,
        # cuda) when there are several (bitwise the per-table attacks), then FSDP2 shards with one all_reduce per
        # call; each kind's backups are kept as soon as it is attacked
        for sharded in (False, True):
            group = [(n, p) for n, p in targets if p.grad is not None and is_sharded(p) == sharded]
            if group:
                states = fgm_attack_many_([p for _, p in group], [p.grad for _, p in group], epsilon,
                                          row_sparse=self.row_sparse, backend=self.backend)
                self.backup.update(zip([n for n, _ in group], states))

    def restore(self, emb_name: str | None = None) -> None:
        """Put back, bit-exactly and in place, what ``attack()`` perturbed."""
        if not self._attacked:
            raise RuntimeError("FGM.restore() called without a preceding attack(): nothing to restore")
        names = [n for n in sorted(self._attacked) if emb_name is None or emb_name in n]
        if not names:
            raise RuntimeError(f"FGM.restore(emb_name={emb_name!r}): no attacked parameter matches; "
                               f"attacked: {sorted(self._attacked)}")
        live = live_parameters(self.model)
        for name in names:
            state = self.backup.get(name)
            if state is not None:
                # Into the parameter as it is now; the backup is dropped only
                # once it has been written back.
                fgm_restore_(state, live_parameter(live, name, "FGM"), name)
                del self.backup[name]
            self._attacked.discard(name)

    @contextlib.contextmanager
    def attacked(self, epsilon: float | None = None, emb_name: str | None = None):
        """``with fgm.attacked(): ...`` attacks, then restores even on exceptions."""
        self.attack(epsilon=epsilon, emb_name=emb_name)
        try:
            yield self
        finally:
            self.restore(emb_name=emb_name)
