"""Hugging Face ``Trainer`` integration: FGM, PGD, AWP and SiFT in the training
step, an EMA callback, fused NEFTune.

    from fastadv.integrations.transformers import AdversarialTrainer, EMACallback

    trainer = AdversarialTrainer(model=model, args=args, train_dataset=ds,   # was: Trainer(...)
                                 adversarial="fgm", adversarial_kwargs={"epsilon": 1.0},
                                 callbacks=[EMACallback(decay=0.999, evaluate_with_ema=True)])
    trainer.train()

Every forward + backward of a step is the parent Trainer's own
``training_step`` (``compute_loss`` under its autocast context, its
gradient-accumulation / ``num_items_in_batch`` normalisation, the
accelerator's backward with its loss scaler and DDP), called once for the
clean loss and once per adversarial pass, with the attack, the gradient
bookkeeping and the bit-exact restore in between.  See docs/transformers.md.

Importing this module works without ``transformers``; constructing anything
in it then raises an ``ImportError`` that says ``pip install fastadv[transformers]``.
"""
from __future__ import annotations

import contextlib
import math
import os
import warnings
from collections.abc import Mapping

import torch
from torch import nn

try:  # the module must import without transformers; using it must not
    import transformers as _hf
    from transformers import Trainer as _Trainer
    from transformers import TrainerCallback as _TrainerCallback
    _IMPORT_ERROR: Exception | None = None
except ImportError as _exc:  # pragma: no cover - exercised in a subprocess by the tests
    _hf = None
    _Trainer = object
    _TrainerCallback = object
    _IMPORT_ERROR = _exc

__all__ = ["AdversarialTrainer", "AdversarialTrainingMixin", "EMACallback", "EMA_STATE_NAME",
           "MODES", "INSTALL_HINT"]

INSTALL_HINT = "pip install fastadv[transformers]"
EMA_STATE_NAME = "fastadv_ema.pt"  # the EMA state, next to the model in each checkpoint folder
MODES = ("fgm", "pgd", "awp", "sift")

# The seed classes' arguments and defaults (seed 001 for FGM / PGD / AWP,
# DeBERTa's hook_sift_layer for SiFT), plus fastadv's keyword options.
_DEFAULTS = {
    "fgm": {"emb_name": None, "epsilon": 1.0, "backend": None, "row_sparse": "auto"},
    "pgd": {"emb_name": None, "epsilon": 1.0, "alpha": 0.3, "K": 3, "backend": None, "row_sparse": "auto"},
    "awp": {"adv_param": "weight", "adv_lr": 1.0, "adv_eps": 0.2, "start_epoch": 0, "adv_step": 1,
            "backend": None},
    "sift": {"hidden_size": None, "learning_rate": 1e-4, "init_perturbation": 1e-2,
             "target_module": "embeddings.LayerNorm", "loss_fn": "symmetric-kl", "backend": None,
             "generator": None},
}
_LOMO = ("lomo", "adalomo")


def _require(what: str) -> None:
    if _IMPORT_ERROR is not None:
        raise ImportError(f"{what} needs Hugging Face transformers (and accelerate), which cannot be imported "
                          f"here ({_IMPORT_ERROR}); install them with `{INSTALL_HINT}`") from _IMPORT_ERROR
    try:
        import accelerate  # noqa: F401  (Trainer needs it; say so before Trainer does)
    except ImportError as exc:
        raise ImportError(f"{what} needs accelerate for transformers.Trainer ({exc}); install it with "
                          f"`{INSTALL_HINT}`") from exc


def _check_options(adversarial, adversarial_kwargs) -> tuple[str | None, dict]:
    if adversarial is None:
        if adversarial_kwargs:
            raise ValueError("adversarial_kwargs given without adversarial=: choose one of " + ", ".join(MODES))
        return None, {}
    if not isinstance(adversarial, str) or adversarial.lower() not in MODES:
        raise ValueError(f"adversarial must be one of {', '.join(map(repr, MODES))} or None, got {adversarial!r}")
    mode = adversarial.lower()
    given = dict(adversarial_kwargs or {})
    unknown = sorted(set(given) - set(_DEFAULTS[mode]))
    if unknown:
        raise TypeError(f"adversarial_kwargs for {mode!r} got unknown argument(s) {unknown}; accepted: "
                        f"{sorted(_DEFAULTS[mode])}")
    options = {**_DEFAULTS[mode], **given}
    if mode == "pgd":
        k = options["K"]
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"PGD's K (attack steps) must be an int >= 1, got {k!r}")
    if mode == "awp":
        s = options["adv_step"]
        if isinstance(s, bool) or not isinstance(s, int) or s < 0:
            raise ValueError(f"AWP's adv_step must be an int >= 0, got {s!r}")
        e = options["start_epoch"]
        if isinstance(e, bool) or not isinstance(e, (int, float)):
            raise TypeError(f"AWP's start_epoch must be a number (Trainer epochs), got {e!r}")
    return mode, options


# -- gradients of the earlier micro-batches -----------------------------------

def _distributed() -> bool:
    import torch.distributed as dist
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class _Accumulated:
    """The gradients that earlier micro-batches of this optimizer step left in
    ``named``, taken out (``.grad`` set to None) so that the clean backward of
    this micro-batch produces its own gradient, the one the seed algorithms
    attack along.  ``add_back()`` adds them to the gradients there now;
    ``put_back()`` puts them back in place of the gradients there now (AWP:
    the seed zeroes the clean gradient before its adversarial backward).

    No copy is made except where the storage is not the gradient's own (a
    view into a DDP bucket, or any distributed run): the next backward would
    overwrite it, so it is cloned, as fastadv.PGD.backup_grad() does.  With
    one micro-batch per step (no accumulation) there is nothing to take and
    every method is a no-op."""

    def __init__(self, named: list[tuple[str, nn.Parameter]]):
        self.named = named
        self.kept: dict[str, torch.Tensor] = {}
        shared = _distributed()
        for n, p in named:
            g = p.grad
            if g is not None:
                self.kept[n] = g.clone() if shared or g._is_view() else g
                p.grad = None
        self.done = not self.kept

    def add_back(self) -> None:
        for n, p in self.named:
            g = self.kept.get(n)
            if g is None:
                continue
            if p.grad is None:
                p.grad = g
            else:
                p.grad.add_(g)
        self.kept, self.done = {}, True

    def put_back(self) -> None:
        for n, p in self.named:
            p.grad = self.kept.get(n)
        self.kept, self.done = {}, True

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if not self.done:  # an exception between take and give back: do not lose them
            self.add_back()
        return False


def _zero_grads(model: nn.Module) -> None:
    """``model.zero_grad()`` with PyTorch's default (``set_to_none=True``): the
    seeds' ``model.zero_grad()`` / ``optimizer.zero_grad()`` between passes."""
    for p in model.parameters():
        p.grad = None


def _logits_of(outputs):
    logits = getattr(outputs, "logits", None)
    if logits is None and isinstance(outputs, Mapping):
        logits = outputs.get("logits")
    if logits is None:
        raise ValueError("SiFT needs the model's logits: its outputs have no 'logits' "
                         f"(got {type(outputs).__name__})")
    return logits


def _sift_logits_fn(model, *args, **kwargs):
    return _logits_of(model(*args, **kwargs))


def _base_model(trainer):
    """The unwrapped model, below a PEFT wrapper if there is one."""
    model = trainer.accelerator.unwrap_model(trainer.model) if hasattr(trainer, "accelerator") else trainer.model
    try:
        from transformers.trainer_utils import _is_peft_model
    except ImportError:  # pragma: no cover - older layouts
        def _is_peft_model(m):
            return type(m).__name__.startswith("Peft")
    if _is_peft_model(model):
        model = model.base_model.model
    return model


class _NEFTuneHook:
    """Trainer's NEFTune hook on fastadv's fused op: in training mode,
    ``output + U[-1, 1) * alpha / sqrt(L * d)`` with ``L`` the padded length
    (no mask: Trainer's rule); in eval mode the output itself."""

    def __init__(self, alpha: float, backend: str | None = None):
        self.alpha = float(alpha)
        self.backend = backend

    def __call__(self, module, inputs, output):
        if not module.training:
            return output
        from ..noise import neftune
        return neftune(output, self.alpha, backend=self.backend)


# -- the trainer ---------------------------------------------------------------

class AdversarialTrainingMixin:
    """Adds FGM / PGD / AWP / SiFT to a ``transformers.Trainer`` (sub)class::

        class MyTrainer(AdversarialTrainingMixin, MyExistingTrainer): pass
        trainer = MyTrainer(model=..., args=..., adversarial="awp",
                            adversarial_kwargs={"adv_lr": 1e-3, "adv_eps": 1e-2, "start_epoch": 1})

    Keyword arguments (the rest go to the Trainer):
        adversarial: ``"fgm"``, ``"pgd"``, ``"awp"``, ``"sift"`` or None (a plain Trainer).
        adversarial_kwargs: the seed class's arguments (see ``_DEFAULTS``):
            FGM ``emb_name``, ``epsilon``; PGD ``emb_name``, ``epsilon``,
            ``alpha``, ``K``; AWP ``adv_param``, ``adv_lr``, ``adv_eps``,
            ``start_epoch`` (in Trainer epochs), ``adv_step``; SiFT
            ``hidden_size``, ``learning_rate``, ``init_perturbation``,
            ``target_module``, ``loss_fn``, ``generator``; all take
            ``backend``, FGM / PGD ``row_sparse``.  ``emb_name=None`` (the
            default) attacks the model's input embedding matrix
            (``get_input_embeddings().weight``) under its parameter name.
        fused_neftune: with ``TrainingArguments.neftune_noise_alpha`` set, add
            NEFTune's noise with fastadv's fused op instead of Trainer's hook
            (same distribution and rule); False keeps Trainer's hook.

    Put the mixin first among the bases: its ``training_step`` calls the next
    class's ``training_step`` once per forward + backward pass, so a
    ``training_step`` overridden below it must be one forward + backward (as
    Trainer's is); a ``compute_loss`` overridden below it is used for the
    clean and for the adversarial losses.
    """

    def __init__(self, *args, adversarial: str | None = None, adversarial_kwargs: dict | None = None,
                 fused_neftune: bool = True, **kwargs):
        _require(type(self).__name__)
        mode, options = _check_options(adversarial, adversarial_kwargs)
        self.adversarial = mode
        self.adversarial_kwargs = options
        self.fused_neftune = bool(fused_neftune)
        self.attacker = None          # the fastadv FGM / PGD / AWP, or SiFT's AdversarialLearner
        self._attacker_model = None
        self._supported_checked = False
        self._sift_active = False
        self._neftune_alpha = None    # set while train() runs with fused NEFTune
        self._neftune_hook = None     # (embedding module, handle)
        super().__init__(*args, **kwargs)

    # -- the training step -----------------------------------------------------
    def training_step(self, model: nn.Module, inputs: dict, num_items_in_batch=None) -> torch.Tensor:
        self._ensure_neftune()
        mode = self.adversarial
        if mode is None:
            return super().training_step(model, inputs, num_items_in_batch)
        self._check_supported()
        if mode == "sift":
            self._get_attacker()
            self._sift_active = True  # compute_loss adds SiFT's term to this step's loss
            try:
                return super().training_step(model, inputs, num_items_in_batch)
            finally:
                self._sift_active = False
        return getattr(self, f"_{mode}_step")(model, inputs, num_items_in_batch)

    def _pass(self, model, inputs, num_items_in_batch):
        """One forward + backward, exactly as the parent trainer makes them."""
        return super().training_step(model, inputs, num_items_in_batch)

    def _fgm_step(self, model, inputs, num_items_in_batch):
        fgm = self._get_attacker()
        with _Accumulated(self._targets(fgm.emb_name)) as earlier:
            loss = self._pass(model, inputs, num_items_in_batch)      # clean loss, its gradient
            with fgm.attacked():                                      # embedding += eps * g / ||g||
                earlier.add_back()
                self._pass(model, inputs, num_items_in_batch)         # adversarial gradient accumulates
        return loss                                                   # restored (bit-exact) on exit

    def _pgd_step(self, model, inputs, num_items_in_batch):
        pgd = self._get_attacker()
        k = self.adversarial_kwargs["K"]
        with _Accumulated(self._targets(pgd.emb_name)) as earlier:
            loss = self._pass(model, inputs, num_items_in_batch)
            with pgd.attacked():
                pgd.attack(is_first_attack=True)
                earlier.add_back()
                if k > 1:
                    pgd.backup_grad()
                for t in range(k):
                    if t > 0:
                        pgd.attack()
                    if t < k - 1:
                        _zero_grads(self.model)
                    elif k > 1:
                        pgd.restore_grad()
                    self._pass(model, inputs, num_items_in_batch)
        return loss

    def _awp_step(self, model, inputs, num_items_in_batch):
        o = self.adversarial_kwargs
        if o["adv_lr"] == 0 or o["adv_step"] == 0 or self.current_epoch() < o["start_epoch"]:
            return self._pass(model, inputs, num_items_in_batch)      # the seed returns before _save()
        awp = self._get_attacker()
        started = False
        with _Accumulated(list(self.model.named_parameters())) as earlier:
            loss = self._pass(model, inputs, num_items_in_batch)
            try:
                for i in range(o["adv_step"]):
                    started = True
                    awp.perturb()                                     # (_save +) one attack step
                    if i < o["adv_step"] - 1:
                        _zero_grads(self.model)
                    else:  # the seed's zero_grad, keeping what earlier micro-batches accumulated
                        earlier.put_back()
                    self._pass(model, inputs, num_items_in_batch)
            except BaseException:
                if started:
                    with contextlib.suppress(RuntimeError):  # nothing had been perturbed yet
                        awp.restore()
                raise
            awp.restore()
        return loss

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not self._sift_active:
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)
        data = dict(inputs)  # compute_loss may pop the labels
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True,
                                             num_items_in_batch=num_items_in_batch)
        o = self.adversarial_kwargs
        adv = self.attacker.loss(_logits_of(outputs), _sift_logits_fn, o["loss_fn"], **data)
        if self._loss_scaled_for_ga(num_items_in_batch):
            # Trainer will not divide this loss by the accumulation steps; SiFT's
            # term is a per-micro-batch mean, so divide it here.
            adv = adv / self._ga_steps()
        loss = loss + adv.to(loss.dtype)
        return (loss, outputs) if return_outputs else loss

    # -- helpers ---------------------------------------------------------------
    def current_epoch(self) -> int:
        """The epoch the seed's loop would pass to AWP: ``floor(state.epoch)``
        (state.epoch is checkpointed, so this survives a resume)."""
        epoch = getattr(self.state, "epoch", None)
        return math.floor(epoch) if epoch is not None else 0

    def _loss_scaled_for_ga(self, num_items_in_batch) -> bool:
        """Trainer's own rule for whether it divides the loss by the accumulation steps."""
        flag = getattr(self, "loss_is_scaled_for_ga", None)
        if flag is not None:
            return bool(flag)
        return bool((getattr(self, "model_accepts_loss_kwargs", False) and num_items_in_batch is not None)
                    or getattr(self, "compute_loss_func", None) is not None)

    def _ga_steps(self) -> int:
        return getattr(self, "current_gradient_accumulation_steps", None) or self.args.gradient_accumulation_steps

    def _targets(self, emb_name: str) -> list[tuple[str, nn.Parameter]]:
        return [(n, p) for n, p in self.model.named_parameters() if p.requires_grad and emb_name in n]

    def _input_embedding_name(self) -> str:
        emb = _base_model(self).get_input_embeddings()
        weight = getattr(emb, "weight", None)
        for n, p in self.model.named_parameters():
            if p is weight:
                return n
        raise ValueError(f"could not find the input embeddings' weight among the parameters of "
                         f"{type(self.model).__name__}; pass adversarial_kwargs={{'emb_name': ...}}")

    def _get_attacker(self):
        model = self.model
        if self.attacker is not None and self._attacker_model is model:
            return self.attacker
        import fastadv
        o = self.adversarial_kwargs
        mode = self.adversarial
        if mode in ("fgm", "pgd"):
            emb_name = o["emb_name"] or self._input_embedding_name()
            if mode == "fgm":
                attacker = fastadv.FGM(model, emb_name=emb_name, epsilon=o["epsilon"], backend=o["backend"],
                                       row_sparse=o["row_sparse"])
            else:
                attacker = fastadv.PGD(model, emb_name=emb_name, epsilon=o["epsilon"], alpha=o["alpha"],
                                       backend=o["backend"], row_sparse=o["row_sparse"])
        elif mode == "awp":
            attacker = fastadv.AWP(model, self.optimizer, adv_param=o["adv_param"], adv_lr=o["adv_lr"],
                                   adv_eps=o["adv_eps"], start_epoch=o["start_epoch"], adv_step=o["adv_step"],
                                   backend=o["backend"])
        else:
            from ..sift import AdversarialLearner, hook_sift_layer
            base = _base_model(self)
            hidden = o["hidden_size"] or getattr(getattr(base, "config", None), "hidden_size", None)
            if hidden is None:
                raise ValueError("SiFT needs hidden_size: pass adversarial_kwargs={'hidden_size': ...}")
            layers = hook_sift_layer(base, hidden, o["learning_rate"], o["init_perturbation"], o["target_module"],
                                     backend=o["backend"], generator=o["generator"])
            if not layers:
                norms = [n for n, m in base.named_modules() if "norm" in type(m).__name__.lower()][:8]
                raise ValueError(f"SiFT: target_module={o['target_module']!r} matches no module of "
                                 f"{type(base).__name__}; SiFT perturbs the input of the embeddings' layer "
                                 f"norm, pass its name (normalisation modules: {norms})")
            attacker = AdversarialLearner(base, layers)
        self.attacker, self._attacker_model = attacker, model
        return attacker

    def _check_supported(self) -> None:
        if self._supported_checked:
            return
        mode = self.adversarial
        several_backwards = mode in ("fgm", "pgd", "awp")
        if several_backwards and getattr(self, "is_deepspeed_enabled", False):
            raise NotImplementedError(
                f"adversarial={mode!r} with DeepSpeed: accelerate's DeepSpeed backward also steps the "
                f"optimizer, so a training step cannot make the second (adversarial) backward; SiFT "
                f"(one backward) is not refused, but untested")
        if several_backwards and getattr(self, "is_fsdp_enabled", False):
            raise NotImplementedError(
                f"adversarial={mode!r} with FSDP: the parameters are sharded, so the perturbation norms "
                f"would be per shard, not the seed's; not supported")
        if several_backwards and str(getattr(self.args.optim, "value", self.args.optim)).lower() in _LOMO:
            raise NotImplementedError(f"adversarial={mode!r} with a LOMO optimizer: LOMO steps inside "
                                      f"backward, so the adversarial backward would step it twice")
        try:
            from transformers.utils import is_sagemaker_mp_enabled
        except ImportError:  # pragma: no cover
            def is_sagemaker_mp_enabled():
                return False
        if is_sagemaker_mp_enabled():
            raise NotImplementedError("adversarial training with SageMaker model parallelism is not supported")
        if mode == "sift" and self.args.n_gpu > 1:
            raise NotImplementedError("SiFT under nn.DataParallel (n_gpu > 1): its perturbation layers keep "
                                      "one replica's input; use DDP (torchrun) instead")
        self._supported_checked = True

    # -- NEFTune ---------------------------------------------------------------
    def _ensure_neftune(self) -> None:
        alpha = self._neftune_alpha
        if alpha is None:
            return
        emb = _base_model(self).get_input_embeddings()
        if self._neftune_hook is not None and self._neftune_hook[0] is emb:
            return
        self._remove_neftune()
        try:  # a Trainer hook there would add the noise a second time
            from transformers.integrations.neftune import neftune_post_forward_hook
        except ImportError:  # pragma: no cover
            neftune_post_forward_hook = None
        for key, fn in list(emb._forward_hooks.items()):
            if fn is neftune_post_forward_hook:
                del emb._forward_hooks[key]
        backend = self.adversarial_kwargs.get("backend")
        self._neftune_hook = (emb, emb.register_forward_hook(_NEFTuneHook(alpha, backend)))

    def _remove_neftune(self) -> None:
        if self._neftune_hook is not None:
            self._neftune_hook[1].remove()
            self._neftune_hook = None

    # -- train / evaluate / save with the EMA ----------------------------------
    def train(self, resume_from_checkpoint=None, trial=None, ignore_keys_for_eval=None, **kwargs):
        if isinstance(resume_from_checkpoint, bool):
            if resume_from_checkpoint:
                from transformers.trainer_utils import get_last_checkpoint
                resume_from_checkpoint = get_last_checkpoint(self.args.output_dir)
                if resume_from_checkpoint is None:
                    raise ValueError(f"No valid checkpoint found in output directory ({self.args.output_dir})")
            else:
                resume_from_checkpoint = None
        for cb in self._ema_callbacks():
            cb._trainer_integrated = True
            cb._resume_from = resume_from_checkpoint
        alpha = getattr(self, "neftune_noise_alpha", None) if self.fused_neftune else None
        if alpha is not None:
            self.neftune_noise_alpha = None  # Trainer registers no hook: ours is added at the first step
            self._neftune_alpha = alpha
        try:
            return super().train(resume_from_checkpoint=resume_from_checkpoint, trial=trial,
                                 ignore_keys_for_eval=ignore_keys_for_eval, **kwargs)
        finally:
            self._remove_neftune()
            if alpha is not None:
                self.neftune_noise_alpha = alpha
                self._neftune_alpha = None

    def _ema_callbacks(self) -> list:
        return [cb for cb in self.callback_handler.callbacks if isinstance(cb, EMACallback)]

    @contextlib.contextmanager
    def _ema_weights(self, flag: str):
        chosen = [cb for cb in self._ema_callbacks() if getattr(cb, flag) and cb.ema is not None]
        if len(chosen) > 1:
            raise RuntimeError(f"{len(chosen)} EMACallbacks have {flag}=True: which average to use is ambiguous")
        if not chosen:
            yield
            return
        with chosen[0].ema.applied(self.model):
            yield

    def evaluate(self, *args, **kwargs):
        """Trainer's ``evaluate``, on the EMA weights when an
        ``EMACallback(evaluate_with_ema=True)`` holds an average (live weights restored after)."""
        with self._ema_weights("evaluate_with_ema"):
            return super().evaluate(*args, **kwargs)

    def predict(self, *args, **kwargs):
        with self._ema_weights("evaluate_with_ema"):
            return super().predict(*args, **kwargs)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False):
        """Trainer's ``save_model``, on the EMA weights when an
        ``EMACallback(save_with_ema=True)`` holds an average.  Checkpoints
        (Trainer's internal calls) keep the live weights: resuming needs them."""
        if _internal_call:
            return super().save_model(output_dir, _internal_call)
        with self._ema_weights("save_with_ema"):
            return super().save_model(output_dir, _internal_call)


class AdversarialTrainer(AdversarialTrainingMixin, _Trainer):
    """``transformers.Trainer`` with ``adversarial="fgm" | "pgd" | "awp" | "sift"``
    and ``adversarial_kwargs`` (see :class:`AdversarialTrainingMixin`)."""


# -- EMA -------------------------------------------------------------------------

class EMACallback(_TrainerCallback):
    """``fastadv.ModelEMA`` of the trained model, updated after every optimizer step.

    Args:
        decay, warmup, dtype, backend: as ``fastadv.ModelEMA`` (``dtype=torch.float32``
            for a bf16 / fp16 model).
        evaluate_with_ema: ``evaluate()`` / ``predict()`` (also the evaluations
            during training) run on the EMA weights, the live ones restored after.
        save_with_ema: ``save_model()`` writes the EMA weights (checkpoints keep
            the live weights and carry the EMA state in ``fastadv_ema.pt``).

    The two flags need :class:`AdversarialTrainer` (or the mixin): a plain
    Trainer has no hook around evaluation or ``save_model``; there, use
    ``with callback.applied(trainer.model): trainer.evaluate()``.  Updates,
    checkpointing and resume work with any Trainer.
    """

    def __init__(self, decay: float = 0.999, warmup: bool = False, *, dtype: torch.dtype | None = None,
                 evaluate_with_ema: bool = False, save_with_ema: bool = False, backend: str | None = None):
        _require("EMACallback")
        if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0.0 <= decay <= 1.0:
            raise ValueError(f"decay must be a number in [0, 1], got {decay!r}")
        self.decay = float(decay)
        self.warmup = bool(warmup)
        self.dtype = dtype
        self.backend = backend
        self.evaluate_with_ema = bool(evaluate_with_ema)
        self.save_with_ema = bool(save_with_ema)
        self.ema = None                    # the fastadv.ModelEMA, made at on_train_begin
        self._resume_from = None           # the checkpoint being resumed (told by the mixin)
        self._trainer_integrated = False

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        from ..averaging import ModelEMA
        self.ema = ModelEMA(model, self.decay, warmup=self.warmup, dtype=self.dtype, backend=self.backend)
        folder = self._resume_from
        if folder is None and state.global_step > 0:  # resumed by a plain Trainer: its default layout
            from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
            folder = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        self._resume_from = None
        if folder is not None:
            path = os.path.join(folder, EMA_STATE_NAME)
            if os.path.isfile(path):
                device = next((p.device for p in model.parameters()), torch.device("cpu"))
                self.ema.load_state_dict(torch.load(path, map_location=device, weights_only=True))
            else:
                warnings.warn(f"EMACallback: resuming from {folder}, which holds no {EMA_STATE_NAME}; the "
                              f"average restarts from the current weights", stacklevel=2)
        if (self.evaluate_with_ema or self.save_with_ema) and not self._trainer_integrated:
            warnings.warn("EMACallback(evaluate_with_ema / save_with_ema) needs AdversarialTrainer or "
                          "AdversarialTrainingMixin; with this Trainer, evaluation and save_model use the live "
                          "weights (use `with callback.applied(trainer.model): ...`)", stacklevel=2)

    def on_optimizer_step(self, args, state, control, **kwargs):
        if self.ema is not None:
            self.ema.update()

    def on_save(self, args, state, control, **kwargs):
        if self.ema is None or not state.is_world_process_zero:
            return
        from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
        folder = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        if os.path.isdir(folder):
            torch.save(self.ema.state_dict(), os.path.join(folder, EMA_STATE_NAME))
        else:
            warnings.warn(f"EMACallback: no checkpoint folder {folder} to write the EMA state into "
                          f"(hyper-parameter search runs are not handled)", stacklevel=2)

    def applied(self, model: nn.Module | None = None):
        """``with callback.applied(): ...`` runs the block on the EMA weights."""
        if self.ema is None:
            raise RuntimeError("EMACallback holds no average yet: it is made when training begins")
        return self.ema.applied(model)

    def state_dict(self) -> dict:
        return self.ema.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.ema.load_state_dict(state)
