"""``fastadv.AWP``: the seed AWP class (same arguments, methods and protocol)
on fused multi-tensor kernels, plus a model-agnostic form.

Seed protocol (HF-style model returning ``(loss, logits)``)::

    awp = AWP(model, optimizer, adv_lr=1, adv_eps=0.2, start_epoch=1, scaler=scaler)
    scaler.scale(loss).backward()
    awp.attack_backward(input_ids, labels, attention_mask, epoch)
    scaler.step(optimizer); scaler.update(); optimizer.zero_grad()

Any model (``closure`` returns the adversarial loss; AWP zeroes the gradients
and runs backward, through the scaler when there is one)::

    awp.attack_backward(closure=lambda: loss_fn(model(x), y), epoch=epoch)

or by hand::

    loss.backward()
    with awp.perturbed():            # _save + one attack step; restored on exit
        optimizer.zero_grad()
        loss_fn(model(x), y).backward()

What changes inside: per attack step one reduction, one finalize and one
update launch per dtype of the perturbed weights, whatever their number; no
host sync; one backup copy of the weights (the seed keeps three: the backup
and both clamp bounds), written by the first step's update kernel; restore
copies back in place, bit-exact (``data_ptr`` never changes).  The backup
buffer is kept between attacks (``release()`` frees it).

Restore writes into the model's parameters as they are at restore time,
looked up by name like the seed's ``_restore``: a parameter reallocated by
user code between attack and restore (``model.double().float()``, ``.to()``,
``load_state_dict(assign=True)``) is restored in its new storage; one whose
shape or dtype changed raises ``StorageMoved`` and keeps its backup.

Differences from the seed, all keeping its results: ``attack_backward``
restores the weights even if the forward or backward raises; a parameter that
gains a gradient after ``_save()`` makes ``_attack_step()`` raise a
``RuntimeError`` naming it (the seed raised ``KeyError``); ``scaler=None``
calls ``backward()`` directly (the seed crashed); ``backup_eps`` stays empty.
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn

from .. import _backend
from ..ops import _dist
from ..ops._live import retarget
from ..ops.awp import awp_step_
from ..ops.multi_tensor import BackupBuffers, group, restore_live_


def _number(value, what: str, minimum=None) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{what} must be a number, got {type(value).__name__}")
    if value != value or value in (float("inf"), float("-inf")):
        raise ValueError(f"{what} must be finite, got {value}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{what} must be >= {minimum}, got {value}")
    return value


class AWP:
    """Adversarial Weight Perturbation (drop-in for the seed class).

    Args:
        model: the model; parameters whose name contains ``adv_param`` and that
            have a gradient are perturbed.
        optimizer: its ``zero_grad()`` is called before each adversarial backward.
        adv_param, adv_lr, adv_eps, start_epoch, adv_step, scaler: as in the seed.
        backend: ``'auto'`` (default, or ``FASTADV_BACKEND``), ``'triton'``,
            ``'cuda'`` or ``'torch'``.
    """

    def __init__(self, model: nn.Module, optimizer, adv_param: str = "weight", adv_lr=1, adv_eps=0.2,
                 start_epoch=0, adv_step: int = 1, scaler=None, *, backend: str | None = None):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        if not isinstance(adv_param, str):
            raise TypeError(f"adv_param must be a string, got {type(adv_param).__name__}")
        if isinstance(adv_step, bool) or not isinstance(adv_step, int) or adv_step < 0:
            raise ValueError(f"adv_step must be an int >= 0, got {adv_step!r}")
        self.model = model
        self.optimizer = optimizer
        self.adv_param = adv_param
        self.adv_lr = _number(adv_lr, "adv_lr")
        self.adv_eps = _number(adv_eps, "adv_eps", 0)
        self.start_epoch = start_epoch
        self.adv_step = adv_step
        self.scaler = scaler
        self.backend = _backend.check_name(backend.lower()) if backend else None
        self.backup: dict[str, torch.Tensor] = {}   # name -> w0 (written by the first step)
        self.backup_eps: dict = {}                  # unused: bounds come from the backup
        self._saved: dict[str, nn.Parameter] = {}   # targets recorded by _save()
        self._buffers = BackupBuffers()             # the one backup copy, kept between attacks
        self._perturbing = False                    # perturb() ran, restore() pending

    # -- the seed's protocol ------------------------------------------------
    def attack_backward(self, x=None, y=None, attention_mask=None, epoch=None, *, closure=None):
        """Seed form: ``attack_backward(x, y, attention_mask, epoch)`` calls
        ``model(input_ids=x, attention_mask=attention_mask, labels=y)`` under
        CUDA autocast and uses the mean of its first output as the loss.
        Closure form: ``attack_backward(closure=fn, epoch=epoch)``, ``fn()``
        returns the loss (no autocast is added).  Either way: nothing when
        ``adv_lr == 0`` or ``epoch < start_epoch`` (``epoch=None`` never
        skips); else ``_save()``, then ``adv_step`` times attack step, forward,
        ``optimizer.zero_grad()``, backward (scaled if ``scaler``); then
        ``_restore()``.  Returns None (seed form) or the last adversarial loss,
        detached (closure form)."""
        if closure is None and x is None:
            raise TypeError("attack_backward needs the model inputs (x, y, attention_mask, epoch) "
                            "or closure=")
        if self.adv_lr == 0 or (epoch is not None and epoch < self.start_epoch):
            return None
        self._save()
        adv_loss = None
        try:
            for _ in range(self.adv_step):
                self._attack_step()
                adv_loss = self._adversarial_loss(x, y, attention_mask, closure)
                self.optimizer.zero_grad()
                if self.scaler is None:
                    adv_loss.backward()
                else:
                    self.scaler.scale(adv_loss).backward()
        finally:
            self._restore()
        return None if closure is None or adv_loss is None else adv_loss.detach()

    def _adversarial_loss(self, x, y, attention_mask, closure):
        if closure is not None:
            with torch.enable_grad():
                return closure().mean()
        device = next(self.model.parameters()).device
        with torch.autocast(device_type=device.type, enabled=device.type == "cuda"):
            out = self.model(input_ids=x, attention_mask=attention_mask, labels=y)
            return out[0].mean()

    def _targets(self):
        candidates = [(n, p) for n, p in _dist.named_parameters(self.model) if p.requires_grad and self.adv_param in n]
        _dist.check_gradients_synced(self.model, candidates, "AWP")
        return [(n, p) for n, p in candidates if p.grad is not None]

    def _save(self) -> None:
        """Record the parameters to perturb (those with a gradient now); the
        backup itself is written by the first attack step's update kernel."""
        for name, param in self._targets():
            if name not in self._saved:
                self._saved[name] = param

    def _attack_step(self) -> None:
        """One step on every saved parameter that has a gradient."""
        targets = list(self._targets())
        unsaved = [n for n, _ in targets if n not in self._saved]
        if unsaved:
            raise RuntimeError(f"AWP: {unsaved} gained a gradient after _save(); call _save() again "
                               f"before _attack_step() (the seed raised KeyError here)")
        if not targets:
            return
        names = [n for n, _ in targets]
        pending = [n for n in self._saved if n not in self.backup]
        write_backup = bool(pending) and set(pending) == set(names)
        if write_backup:  # the first step: its update kernel writes the backup
            # FSDP2: backups of the local shards (the op works on them)
            backups = self._buffers.views([_dist.local(p.data) for _, p in targets])
        else:  # rare: parameters saved later, or saved without a gradient now
            live = dict(_dist.named_parameters(self.model))
            for n in pending:
                self.backup[n] = _dist.local((live[n] if n in live else self._saved[n]).data).clone()
            backups = [self.backup[n] for n in names]
            for (n, p), b in zip(targets, backups):  # the parameter may have moved since the last step
                retarget(n, b, _dist.local(p.data), "two AWP attack steps")
        weights = [p.data for _, p in targets]
        grads = [p.grad.to_dense() if p.grad.is_sparse else p.grad for _, p in targets]
        for idx in group([w.device for w in weights]).values():
            awp_step_([weights[i] for i in idx], [grads[i] for i in idx], [backups[i] for i in idx],
                      adv_lr=self.adv_lr, adv_eps=self.adv_eps, write_backup=write_backup,
                      backend=self.backend)
            if write_backup:  # only now do these backups hold w0
                self.backup.update((names[i], backups[i]) for i in idx)

    def _restore(self) -> None:
        """Copy the backups back (bit-exact) into the model's parameters of
        those names *now* (as the seed does), and forget them.

        A parameter reallocated since the attack (``model.double().float()``,
        ``.to()``, ``load_state_dict(assign=True)``) is restored in its new
        storage when that is exact (same shape and dtype); otherwise
        :class:`~fastadv.ops._live.StorageMoved` names it, nothing is written
        and ``self.backup`` is kept: convert the model back and call
        ``restore()`` again."""
        names = list(self.backup)
        live = dict(_dist.named_parameters(self.model))
        restore_live_(names, [live[n].data if n in live else None for n in names],
                      [self.backup[n] for n in names], between="the AWP attack and its restore",
                      backend=self.backend)
        self.backup = {}
        self.backup_eps = {}
        self._saved = {}
        self._perturbing = False

    # -- model-agnostic form ------------------------------------------------
    def perturb(self) -> None:
        """``_save()`` + one ``_attack_step()`` on the current gradients; call
        it again after another backward for a further step."""
        self._save()
        self._attack_step()
        self._perturbing = True

    def restore(self) -> None:
        """Undo every ``perturb()`` since the last restore (bit-exact, in place).
        A ``perturb()`` that found nothing to perturb (no gradient) still
        counts: its ``restore()`` does nothing."""
        if not (self._saved or self._perturbing):
            raise RuntimeError("AWP.restore() called without a preceding perturb(): nothing to restore")
        self._restore()

    @contextlib.contextmanager
    def perturbed(self):
        """``with awp.perturbed(): ...`` perturbs once, restores even on exceptions."""
        self.perturb()
        try:
            yield self
        finally:
            self._restore()

    def release(self) -> None:
        """Free the backup buffer (it is made again on the next attack).  The
        device work tables are in the multi-tensor ops' shared cache (a few
        bytes per tensor, least recently used dropped first)."""
        if self._saved:
            raise RuntimeError("AWP.release() while weights are perturbed; restore first")
        self._buffers.clear()
