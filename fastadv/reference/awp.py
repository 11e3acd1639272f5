"""Seed AWP (``001_4797a51bec1d6b12.txt``; also described in ``002``), written
from its math.

Usage: ``loss.backward(); awp.attack_backward(x, y, attention_mask, epoch);
optimizer.step()``.  The model is called as
``model(input_ids=x, attention_mask=attention_mask, labels=y)`` and its first
output is the loss (the seed unpacks ``adv_loss, logits``).

For every parameter whose name contains ``adv_param``, that requires grad and
has a gradient (``w0`` its value at ``_save``):

* ``_save()``: back up ``w0`` (once) and the bounds ``w0 -/+ adv_eps * |w0|``.
* ``_attack_step()``: unless ``||g||`` is 0 or NaN,
  ``w <- w + adv_lr * g / (||g|| + 1e-6) * (||w|| + 1e-6)`` (evaluated left to
  right, as in the seed), then ``w <- min(max(w, lower), upper)`` (a new tensor
  rebound to ``param.data``).
* ``attack_backward()``: nothing if ``adv_lr == 0`` or ``epoch < start_epoch``;
  else ``_save()``, then ``adv_step`` times: attack step, forward, mean loss,
  ``optimizer.zero_grad()``, backward; finally ``_restore()``.  The gradients
  left in the model are those of the last adversarial loss only (the clean
  gradients are zeroed, as in the seed).  Returns None.
* ``_restore()``: rebind the backups, clear both dicts.

Deviations from the seed, both keeping its results:
* ``torch.cuda.amp.autocast()`` (deprecated) becomes
  ``torch.autocast(device_type=<model's device>)``, enabled only on CUDA with
  its default dtype (fp16), exactly what the seed's CUDA autocast does; on CPU
  the seed's CUDA autocast has no effect, and enabling CPU autocast (bf16)
  would change the results, so it stays disabled there.
* ``scaler=None`` (the seed's default, on which it crashes) calls
  ``adv_loss.backward()`` directly.

Faithful quirk: a parameter that gains a gradient after ``_save`` has no
bounds and makes ``_attack_step`` raise ``KeyError``.  Host syncs: two per
tensor per step; three full extra copies of every weight (backup and bounds).
"""
import torch


class AWP:
    def __init__(self, model, optimizer, adv_param="weight", adv_lr=1, adv_eps=0.2,
                 start_epoch=0, adv_step=1, scaler=None):
        self.model = model
        self.optimizer = optimizer
        self.adv_param = adv_param
        self.adv_lr = adv_lr
        self.adv_eps = adv_eps
        self.start_epoch = start_epoch
        self.adv_step = adv_step
        self.backup = {}
        self.backup_eps = {}
        self.scaler = scaler

    def _targets(self):
        for name, param in self.model.named_parameters():
            if param.requires_grad and param.grad is not None and self.adv_param in name:
                yield name, param

    def attack_backward(self, x, y, attention_mask, epoch):
        if self.adv_lr == 0 or epoch < self.start_epoch:
            return None
        device = next(self.model.parameters()).device
        self._save()
        for _ in range(self.adv_step):
            self._attack_step()
            with torch.autocast(device_type=device.type, enabled=device.type == "cuda"):
                out = self.model(input_ids=x, attention_mask=attention_mask, labels=y)
                adv_loss = out[0].mean()
            self.optimizer.zero_grad()
            if self.scaler is None:
                adv_loss.backward()
            else:
                self.scaler.scale(adv_loss).backward()
        self._restore()

    def _attack_step(self):
        e = 1e-6
        for name, param in self._targets():
            norm1 = torch.norm(param.grad)
            norm2 = torch.norm(param.data.detach())
            if norm1 != 0 and not torch.isnan(norm1):
                param.data.add_(self.adv_lr * param.grad / (norm1 + e) * (norm2 + e))
                lower, upper = self.backup_eps[name]
                param.data = torch.min(torch.max(param.data, lower), upper)

    def _save(self):
        for name, param in self._targets():
            if name not in self.backup:
                self.backup[name] = param.data.clone()
                grad_eps = self.adv_eps * param.abs().detach()
                self.backup_eps[name] = (self.backup[name] - grad_eps,
                                         self.backup[name] + grad_eps)

    def _restore(self):
        for name, param in self.model.named_parameters():
            if name in self.backup:
                param.data = self.backup[name]
        self.backup = {}
        self.backup_eps = {}
