"""``Attack``: the base class of fastadv's input attacks, with torchattacks'
``Attack`` API (v3.5): ``atk(images, labels)``, ``forward``, ``get_logits``,
``set_normalization_used``, ``normalize`` / ``inverse_normalize``, the attack
modes (``set_mode_default``, ``set_mode_targeted_by_label``,
``..._by_function``, ``..._random``, ``..._least_likely``, ``get_mode``),
``set_model_training_mode``, ``set_device``, ``get_target_label``,
``get_output_with_eval_nograd``.

What differs, on purpose:

* gradients come from ``torch.autograd.grad``, so the model's ``.grad`` is never
  touched, and the call works inside ``torch.no_grad()``;
* every module's train/eval flag is restored exactly after the call, also when
  the attack raises (torchattacks only calls ``model.train()`` again when the
  model was in training mode);
* inputs are taken as torchattacks takes them: images in any range (every
  step clips to [0, 1], so an image at 1.026 after a bicubic resize is fine),
  labels anything ``F.cross_entropy`` takes (``[batch]`` class indices, or
  ``[batch, classes]`` one-hot / soft probabilities), ``steps=0`` (the start
  point, a new tensor); what is refused is what makes no sense: ``eps``,
  ``alpha`` or ``steps`` negative or NaN, non-floating images, labels of
  another batch size, soft labels in the random / least-likely modes (which
  need class indices; torchattacks fails there too).  ``atk.check_inputs =
  True`` also checks that the images lie in [0, 1] (after
  ``inverse_normalize``; one host sync per call);
* the random and least-likely target labels are computed for the whole batch
  at once (torchattacks loops over the batch on the host); the random targets
  draw the same numbers from the same generator (the CPU one), so a seeded
  run gives torchattacks' targets;
* ``backend=`` (``"auto"``, ``"triton"``, ``"cuda"``, ``"torch"``) picks the kernels
  of the steps (see :mod:`fastadv.ops.attacks`);
* not included: ``save`` / ``load`` (data-set helpers) and the nesting of
  attacks (``MultiAttack``).
"""
from __future__ import annotations

import numbers

import torch
import torch.nn.functional as F

from .. import _backend
from ..kernels import host
from ..ops._dist import check_not_static_graph
from ..ops.attacks import _dense_batch_major, real_number


def _check_number(name: str, value, minimum: float = 0.0) -> None:
    """A real number (Python / numpy scalar, 0-d tensor) ``>= minimum``."""
    v = real_number(name, value)
    if not v >= minimum:  # also catches NaN
        raise ValueError(f"{name} must be >= {minimum:g}, got {v}")


def _check_steps(steps) -> None:
    if isinstance(steps, torch.Tensor) and steps.dim() == 0 and not steps.is_floating_point() \
            and steps.dtype != torch.bool:
        steps = int(steps)
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral):
        raise TypeError(f"steps must be an int, got {type(steps).__name__}")
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")


def _as_cpu_tensor(values) -> torch.Tensor:
    """``torch.tensor(values)`` (torchattacks' conversion: dtype inferred) on the CPU, a copy."""
    if isinstance(values, torch.Tensor):
        return values.detach().cpu().clone()
    return torch.as_tensor(values).cpu().clone()


class Attack:
    """Base class of the input attacks; subclasses define ``forward(images, labels)``
    and ``_check_params()``.

    Arguments:
        name (str): name of the attack.
        model (torch.nn.Module): model to attack.
        backend (str): ``None`` (the global default: ``FASTADV_BACKEND`` or
            ``auto``), ``"auto"``, ``"triton"``, ``"cuda"`` or ``"torch"``.
    """

    def __init__(self, name: str, model: torch.nn.Module, backend: str | None = None):
        self.attack = name
        self.set_model(model)
        try:
            self.device = next(model.parameters()).device
        except Exception:
            self.device = None
            print("Failed to set device automatically, please try set_device() manual.")

        self.attack_mode = "default"
        self.supported_mode = ["default"]
        self.targeted = False
        self._target_map_function = None

        self.normalization_used = None
        self._normalization_applied = None
        self._norm_cache = {}
        if self.model.__class__.__name__ == "RobModel":
            self._set_rmodel_normalization_used(model)

        self._model_training = False
        self._batchnorm_training = False
        self._dropout_training = False

        self.backend = None if backend is None else _backend.check_name(str(backend).lower())
        self.check_inputs = False  # True: refuse images outside [0, 1] (one host sync per call)

    # ---- to override ------------------------------------------------------------------------------

    def forward(self, inputs, labels=None, *args, **kwargs):
        """The attack on images in [0, 1]; overridden by every attack."""
        raise NotImplementedError

    def _check_params(self) -> None:
        """Raise on bad hyper-parameters (checked at construction and on each call)."""

    # ---- model, device, logits ------------------------------------------------------------------

    def set_model(self, model):
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        check_not_static_graph(model, type(self).__name__)
        self.model = model
        self.model_name = model.__class__.__name__

    def set_device(self, device):
        self.device = device

    def get_logits(self, inputs, labels=None, *args, **kwargs):
        if self._normalization_applied is False:
            inputs = self.normalize(inputs)
        return self.model(inputs)

    # ---- normalisation ------------------------------------------------------------------------------

    def _set_normalization_applied(self, flag):
        self._normalization_applied = flag

    def _set_rmodel_normalization_used(self, model):
        """Normalisation of a MAIR ``RobModel`` (its ``mean`` / ``std``), as torchattacks."""
        mean, std = getattr(model, "mean", None), getattr(model, "std", None)
        if mean is None or std is None:
            return
        mean_t = torch.as_tensor(mean.detach().cpu() if isinstance(mean, torch.Tensor) else mean)
        std_t = torch.as_tensor(std.detach().cpu() if isinstance(std, torch.Tensor) else std)
        if bool((mean_t != 0).all()) or bool((std_t != 1).all()):
            self.set_normalization_used(mean_t, std_t)

    def set_normalization_used(self, mean, std):
        """The model takes inputs normalised by ``(x - mean) / std`` (per channel):
        ``atk(images, labels)`` then takes and returns normalised images, and
        attacks in [0, 1] pixel space.  ``mean`` and ``std`` become tensors as
        in torchattacks (``torch.tensor(mean)``: a list of floats is float32,
        a float64 numpy array stays float64, with torch's type promotion)."""
        mean = _as_cpu_tensor(mean).flatten()
        std = _as_cpu_tensor(std).flatten()
        if mean.numel() != std.numel():
            raise ValueError(f"mean has {mean.numel()} channels, std has {std.numel()}")
        if not bool((std != 0).all()):
            raise ValueError("std must not contain zeros")
        n = mean.numel()
        self.normalization_used = {"mean": mean.reshape(1, n, 1, 1), "std": std.reshape(1, n, 1, 1)}
        self._norm_cache = {}
        self._set_normalization_applied(True)

    def _mean_std(self, device):
        # kept on the device: no host-to-device copy per step
        device = torch.device(device)
        if device not in self._norm_cache:
            self._norm_cache[device] = (self.normalization_used["mean"].to(device),
                                        self.normalization_used["std"].to(device))
        return self._norm_cache[device]

    def normalize(self, inputs):
        mean, std = self._mean_std(inputs.device)
        return (inputs - mean) / std

    def inverse_normalize(self, inputs):
        mean, std = self._mean_std(inputs.device)
        return inputs * std + mean

    # ---- attack modes -----------------------------------------------------------------------------

    def get_mode(self):
        return self.attack_mode

    def set_mode_default(self):
        self.attack_mode = "default"
        self.targeted = False
        print("Attack mode is changed to 'default.'")

    def _set_mode_targeted(self, mode, quiet):
        if "targeted" not in self.supported_mode:
            raise ValueError("Targeted mode is not supported.")
        self.targeted = True
        self.attack_mode = mode
        if not quiet:
            print("Attack mode is changed to '%s'." % mode)

    def set_mode_targeted_by_function(self, target_map_function, quiet=False):
        """Targets ``target_map_function(images, labels)``, e.g. ``lambda x, y: (y + 1) % 10``."""
        self._set_mode_targeted("targeted(custom)", quiet)
        self._target_map_function = target_map_function

    def set_mode_targeted_random(self, quiet=False):
        """Targets drawn uniformly among the classes other than the label."""
        self._set_mode_targeted("targeted(random)", quiet)
        self._target_map_function = self.get_random_target_label

    def set_mode_targeted_least_likely(self, kth_min=1, quiet=False):
        """Targets: the class with the ``kth_min``-th smallest logit, the label excluded."""
        if isinstance(kth_min, bool) or not isinstance(kth_min, numbers.Integral) or kth_min < 1:
            raise ValueError(f"kth_min must be an int >= 1, got {kth_min!r}")
        self._set_mode_targeted("targeted(least-likely)", quiet)
        self._kth_min = int(kth_min)
        self._target_map_function = self.get_least_likely_label

    def set_mode_targeted_by_label(self, quiet=False):
        """The labels given to ``atk(images, labels)`` are the targets."""
        self._set_mode_targeted("targeted(label)", quiet)
        self._target_map_function = "function is a string"

    def set_model_training_mode(self, model_training=False, batchnorm_training=False,
                                dropout_training=False):
        """Run the model in training mode during the attack (batch norm and
        dropout in eval mode unless asked for)."""
        self._model_training = model_training
        self._batchnorm_training = batchnorm_training
        self._dropout_training = dropout_training

    def _change_model_mode(self, given_training):
        if self._model_training:
            self.model.train()
            for _, m in self.model.named_modules():
                if not self._batchnorm_training and "BatchNorm" in m.__class__.__name__:
                    m.eval()
                if not self._dropout_training and "Dropout" in m.__class__.__name__:
                    m.eval()
        else:
            self.model.eval()

    # ---- targets ------------------------------------------------------------------------------------

    def get_target_label(self, inputs, labels=None):
        if self._target_map_function is None:
            raise ValueError("target_map_function is not initialized by set_mode_targeted.")
        if self.attack_mode == "targeted(label)":
            return labels
        return self._target_map_function(inputs, labels)

    @torch.no_grad()
    def get_output_with_eval_nograd(self, inputs):
        given_training = self.model.training
        if given_training:
            self.model.eval()
        outputs = self.get_logits(inputs)
        if given_training:
            self.model.train()
        return outputs

    @torch.no_grad()
    def get_least_likely_label(self, inputs, labels=None):
        outputs = self.get_output_with_eval_nograd(inputs)
        if labels is None:
            labels = outputs.argmax(dim=1)
        self._check_class_indices(labels, outputs, "least-likely")
        n_classes = outputs.shape[-1]
        if self._kth_min > n_classes - 1:
            raise ValueError(f"kth_min={self._kth_min} but only {n_classes - 1} classes differ from the label")
        # the label's logit set to +inf never ranks among the kth_min smallest of the others
        scores = outputs.to(torch.promote_types(outputs.dtype, torch.float32))
        scores = scores.scatter(1, labels.view(-1, 1).long(), float("inf"))
        return scores.kthvalue(self._kth_min, dim=1).indices.long()

    @torch.no_grad()
    def get_random_target_label(self, inputs, labels=None):
        outputs = self.get_output_with_eval_nograd(inputs)
        if labels is None:
            labels = outputs.argmax(dim=1)
        self._check_class_indices(labels, outputs, "random")
        n_classes = outputs.shape[-1]
        if n_classes < 2:
            raise ValueError("random targets need at least two classes")
        # torchattacks draws torch.rand([1]) per sample from the CPU generator, whatever the
        # device: one torch.rand([batch]) on the CPU draws the same numbers (copied without a sync)
        u = torch.rand(labels.shape) * (n_classes - 1)
        r = host.host_to(u.long(), labels.device)
        r = r.clamp_(max=n_classes - 2)  # uniform over the n_classes - 1 other classes
        return (r + (r >= labels.long()).long()).long()

    @staticmethod
    def _check_class_indices(labels, outputs, mode):
        if labels.is_floating_point() or labels.dim() != 1 or labels.shape[0] != outputs.shape[0]:
            raise TypeError(f"the {mode} target mode needs labels of class indices, shape "
                            f"[{outputs.shape[0]}] integers, got {tuple(labels.shape)} {labels.dtype} "
                            f"(one-hot / soft labels: pass labels.argmax(1))")

    # ---- the call -----------------------------------------------------------------------------------

    def _grad(self, adv, labels, target_labels):
        """Gradient of the cost at ``adv`` (``adv.grad`` and the model's grads untouched)."""
        with torch.enable_grad():
            adv.requires_grad_(True)
            try:
                outputs = self.get_logits(adv)
                if self.targeted:
                    cost = -F.cross_entropy(outputs, target_labels)
                else:
                    cost = F.cross_entropy(outputs, labels)
                grad, = torch.autograd.grad(cost, adv, retain_graph=False, create_graph=False)
            finally:
                adv.requires_grad_(False)
        return grad

    def _prepare(self, images, labels):
        """Clean images (detached, on the attack's device, dense with the batch
        outermost), labels, the target labels of a targeted mode (else None),
        and ``layout``: a tensor with the layout of torchattacks' working copy
        (``images.clone()``), into which random starts are drawn so that they
        take the same numbers at the same elements (``torch.empty_like(layout)``)."""
        images = images.detach()
        if self.device is not None:
            images = images.to(self.device)
        layout = images
        if not _dense_batch_major(images):  # contiguous and channels_last stay as they are
            images = images.contiguous()
        labels = labels.detach().to(images.device)
        target_labels = self.get_target_label(images, labels) if self.targeted else None
        return images, labels, target_labels, layout

    @staticmethod
    def _start(images, start):
        """``clip01(images + start)`` in ``images``' layout (a new tensor)."""
        adv = torch.empty_like(images)
        torch.add(images, start, out=adv)
        return adv.clamp_(min=0, max=1)

    def _check_call(self, images, labels):
        if not isinstance(images, torch.Tensor):
            raise TypeError(f"images must be a tensor, got {type(images).__name__}")
        if not images.is_floating_point():
            raise TypeError(f"images must be a floating-point tensor in [0, 1], got {images.dtype} "
                            f"(uint8 images: divide by 255)")
        if images.dim() < 1:
            raise ValueError(f"images must be a batch [N, ...], got shape {tuple(images.shape)}")
        if not isinstance(labels, torch.Tensor):
            raise TypeError(f"labels must be a tensor (class indices, or one-hot / soft labels), "
                            f"got {type(labels).__name__}")
        if labels.is_complex() or labels.dtype == torch.bool:
            raise TypeError(f"labels must be integer class indices or floating-point probabilities, "
                            f"got {labels.dtype}")
        if labels.dim() == 0 or labels.shape[0] != images.shape[0]:
            raise ValueError(f"labels must have the images' batch size {images.shape[0]} in dim 0 "
                             f"([N] class indices or [N, classes] probabilities), got {tuple(labels.shape)}")

    def _check_range(self, images):
        """With ``check_inputs``: images must lie in [0, 1] (one reduction and
        one host sync).  Off by default, as in torchattacks."""
        if not self.check_inputs or images.numel() == 0:
            return
        tol = 0.0
        if self.normalization_used is not None:  # inverse_normalize(normalize(x)) rounds
            mean, std = self.normalization_used["mean"], self.normalization_used["std"]
            tol = 8 * torch.finfo(images.dtype).eps * (1.0 + float((mean.abs() + std.abs()).max().double()))
        bounds = torch.stack(torch.aminmax(images.detach())).cpu()  # the one device-to-host read
        lo, hi = float(bounds[0]), float(bounds[1])
        if not (lo >= -tol and hi <= 1 + tol):
            extra = " after inverse_normalize" if self.normalization_used is not None else ""
            raise ValueError(f"images must have a range [0, 1]{extra} (min: {lo}, max: {hi})")

    def __call__(self, inputs, labels=None, *args, **kwargs):
        self._check_params()
        self._check_call(inputs, labels)
        modes = [(m, m.training) for m in self.model.modules()]
        self._change_model_mode(self.model.training)
        try:
            if self._normalization_applied is True:
                inputs = self.inverse_normalize(inputs)
                self._check_range(inputs)
                self._set_normalization_applied(False)
                try:
                    adv_inputs = self.forward(inputs, labels, *args, **kwargs)
                finally:
                    self._set_normalization_applied(True)
                adv_inputs = self.normalize(adv_inputs)
            else:
                self._check_range(inputs)
                adv_inputs = self.forward(inputs, labels, *args, **kwargs)
        finally:
            for m, training in modes:
                m.training = training
        return adv_inputs

    def __repr__(self):
        info = {k: v for k, v in self.__dict__.items()
                if k not in ("model", "attack", "supported_mode") and not k.startswith("_")}
        info["attack_mode"] = self.attack_mode
        info["normalization_used"] = self.normalization_used is not None
        return self.attack + "(" + ", ".join(f"{k}={v}" for k, v in info.items()) + ")"
