"""Finding the parameters an attack perturbs, and tracking which embedding rows
can hold a gradient (shared by FGM and later by PGD)."""
from __future__ import annotations

import difflib

import torch
from torch import nn

from .. import _backend


def check_size(value, what: str = "epsilon") -> float:
    """A perturbation size: a finite number >= 0."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{what} must be a number, got {type(value).__name__}")
    if not (value >= 0 and value != float("inf")):
        raise ValueError(f"{what} must be finite and >= 0, got {value}")
    return float(value)


def matching_parameters(model: nn.Module, emb_name: str) -> list[tuple[str, nn.Parameter]]:
    """``(name, param)`` for every trainable parameter whose name contains
    ``emb_name`` (the seeds' rule); a clear error naming close candidates if none."""
    if not isinstance(emb_name, str) or not emb_name:
        raise TypeError(f"emb_name must be a non-empty string, got {emb_name!r}")
    found = [(n, p) for n, p in model.named_parameters() if p.requires_grad and emb_name in n]
    if found:
        return found
    names = [n for n, _ in model.named_parameters()]
    close = difflib.get_close_matches(emb_name, names, n=5, cutoff=0.3)
    embeddings = [f"{n}.weight" for n, m in model.named_modules() if isinstance(m, nn.Embedding)]
    hint = close or embeddings or names[:5]
    raise ValueError(f"emb_name={emb_name!r} matches no trainable parameter of "
                     f"{type(model).__name__}; close candidates: {hint}")


def embedding_owners(model: nn.Module, param: nn.Parameter) -> list[nn.Embedding] | None:
    """The ``nn.Embedding`` modules whose weight is ``param``, or None when the
    parameter is also registered anywhere else (a tied LM head: its gradient is
    dense) or is not an embedding table at all."""
    owners, other_use = [], False
    for module in model.modules():
        for pname, p in module.named_parameters(recurse=False):
            if p is param:
                if isinstance(module, nn.Embedding) and pname == "weight" and not module.sparse:
                    owners.append(module)
                else:
                    other_use = True
    return owners if owners and not other_use else None


def distributed() -> bool:
    import torch.distributed as dist
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class RowTracker:
    """Marks, without a host sync, the rows of an embedding table that may hold
    a non-zero gradient: the ids its ``nn.Embedding`` modules looked up since
    the gradient was last ``None`` (every lookup before the next backward).

    The mask errs only on the side of too many rows (a row marked with a zero
    gradient costs a read; the kernels unmark it).  It starts with every row
    marked, since lookups made before tracking started are unknown.
    """

    def __init__(self, param: nn.Parameter, modules: list[nn.Embedding]):
        self.param = param
        self.rows = param.shape[0]
        # Lookups before tracking started (even a forward whose backward is
        # still to come) are unknown: start with every row marked.  The first
        # attack unmarks the rows without gradient; the next forward after the
        # gradient is reset starts an exact set.
        self.mask = self._fresh(marked=True)
        self.count = self.rows
        # Reset the set once per gradient: at the first lookup after the
        # gradient became None, not at later lookups before the backward
        # (shared encoder/decoder tables, sentence pairs, recomputation).
        self._reset_done = False
        self.handles = [m.register_forward_pre_hook(self._mark, with_kwargs=True) for m in modules]
        self.handles.append(param.register_post_accumulate_grad_hook(self._accumulated))

    def _fresh(self, marked: bool) -> torch.Tensor:
        fill = torch.ones if marked else torch.zeros
        return fill(self.rows, dtype=torch.uint8, device=self.param.device)

    def _accumulated(self, param) -> None:
        self._reset_done = False  # a gradient exists: its next reset starts a new set

    def _mark(self, module, args, kwargs):
        if not (torch.is_grad_enabled() and self.param.requires_grad):
            return
        if self.mask.device != self.param.device:  # the model moved: rows unknown
            self.mask, self.count = self._fresh(marked=True), self.rows
        ids = args[0] if args else kwargs.get("input")
        if not isinstance(ids, torch.Tensor):  # a call we cannot read: every row may change
            self.mask.fill_(1)
            self.count = self.rows
            return
        if self.param.grad is None and not self._reset_done:
            self.mask.zero_()  # a new gradient starts: earlier lookups are gone
            self.count = 0
            self._reset_done = True
        self.mask.index_fill_(0, ids.reshape(-1).to(device=self.mask.device, dtype=torch.long), 1)
        self.count = min(self.rows, self.count + ids.numel())

    def state(self) -> tuple[torch.Tensor, int]:
        """The mask and a host-side bound on the number of marked rows."""
        if self.mask.device != self.param.device:
            self.mask, self.count = self._fresh(marked=True), self.rows
        return self.mask, self.count

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []


class EmbeddingAttack:
    """What FGM and PGD share: argument checks, the matching parameters, and a
    :class:`RowTracker` per row-sparse table."""

    def __init__(self, model: nn.Module, emb_name: str, backend: str | None, row_sparse):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        if row_sparse not in (True, False, "auto"):
            raise ValueError(f"row_sparse must be True, False or 'auto', got {row_sparse!r}")
        self.model = model
        self.emb_name = emb_name
        self.backend = _backend.check_name(backend.lower()) if backend else None
        self.row_sparse = row_sparse
        self._trackers: dict[int, RowTracker] = {}
        self._track(matching_parameters(model, emb_name))

    def _track(self, targets) -> None:
        for name, param in targets:
            if self.row_sparse is False or id(param) in self._trackers:
                continue
            owners = embedding_owners(self.model, param)
            if owners is None:
                if self.row_sparse is True:
                    raise ValueError(f"row_sparse=True but {name} is not used only as the weight of "
                                     f"dense-gradient nn.Embedding modules (tied head or other use)")
                continue
            self._trackers[id(param)] = RowTracker(param, owners)

    def _row_state(self, param) -> tuple[torch.Tensor | None, int | None]:
        """(row mask, bound on marked rows), or (None, None) for the dense path."""
        tracker = self._trackers.get(id(param))
        if tracker is None or distributed() or _backend.resolve(self.backend, param.device) == "torch":
            return None, None
        return tracker.state()

    def remove_hooks(self) -> None:
        """Detach the forward hooks that track embedding rows (the dense path is used after)."""
        for tracker in self._trackers.values():
            tracker.remove()
        self._trackers = {}
