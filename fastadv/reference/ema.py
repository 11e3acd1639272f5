"""Reference weight averaging: the EMA class of Kaggle NLP notebooks (the
EMA / SWA that the seeds pair with AWP, ``003_115846c920ec3016.txt``), written
from its math, and SWA as PyTorch's ``torch.optim.swa_utils`` defines it.
The oracles for ``fastadv.ModelEMA`` and ``fastadv.averaging``.

``EMA(model, decay)``: ``register()`` snapshots every trainable parameter;
``update()``: ``shadow = (1 - decay) * w + decay * shadow``;
``apply_shadow()``: back up ``w`` and rebind it to the shadow;
``restore()``: rebind the backups.

``swa_average(averages, currents, n)``: ``avg += (cur - avg) / (n + 1)``.
"""
import torch


class EMA:
    def __init__(self, model, decay):
        self.model = model
        self.decay = decay
        self.shadow = {}
        self.backup = {}

    def _trainable(self):
        return ((n, p) for n, p in self.model.named_parameters() if p.requires_grad)

    def register(self):
        for name, param in self._trainable():
            self.shadow[name] = param.data.clone()

    def update(self):
        for name, param in self._trainable():
            assert name in self.shadow
            self.shadow[name] = ((1.0 - self.decay) * param.data + self.decay * self.shadow[name]).clone()

    def apply_shadow(self):
        for name, param in self._trainable():
            assert name in self.shadow
            self.backup[name] = param.data
            param.data = self.shadow[name]

    def restore(self):
        for name, param in self._trainable():
            assert name in self.backup
            param.data = self.backup[name]
        self.backup = {}


@torch.no_grad()
def swa_average(averages, currents, n_averaged):
    """The running mean: ``avg += (cur - avg) / (n_averaged + 1)`` per tensor."""
    for avg, cur in zip(averages, currents):
        avg.add_((cur - avg) / (n_averaged + 1))
