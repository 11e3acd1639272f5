"""fastadv.integrations.transformers on real Hugging Face models (tiny configs,
random weights, never a hub download), checked against Trainer subclasses
written by hand with the reference classes of fastadv.reference.

Every case runs on CPU; the attacks use the torch backend (the backends are
checked against the references in their own tests) except one FGM case on
the Triton kernels (interpreter).
"""
import contextlib
import copy
import gc
import math
import os
import subprocess
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from transformers import Trainer, TrainerCallback, TrainingArguments  # noqa: E402

import fastadv.reference as ref  # noqa: E402
import fastadv.reference.sift as ref_sift  # noqa: E402
from fastadv import _backend  # noqa: E402
from fastadv.integrations.transformers import (EMA_STATE_NAME, AdversarialTrainer,  # noqa: E402
                                               AdversarialTrainingMixin, EMACallback)
from fastadv.integrations import transformers as integ  # noqa: E402

transformers.logging.set_verbosity_error()
FP32 = dict(rtol=1e-5, atol=1e-6)
V, L, N = 100, 8, 12  # vocabulary, sequence length, examples



@pytest.fixture(scope="module", autouse=True)
def _fast_cpu():
    """Tiny models: one thread (two shared cores are oversubscribed otherwise),
    and the import-time heap out of the collector (each Trainer.train() calls
    gc.collect() through accelerate's free_memory: 0.6 s each here)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    gc.collect()
    gc.freeze()
    yield
    gc.unfreeze()
    torch.set_num_threads(threads)


# -- tiny models ------------------------------------------------------------------

COMMON = dict(vocab_size=V, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
              hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def bert():
    return transformers.BertForSequenceClassification(
        transformers.BertConfig(**COMMON, max_position_embeddings=16, num_labels=3))


def roberta():  # positions offset by padding_idx + 1, three embedding tables
    return transformers.RobertaForTokenClassification(
        transformers.RobertaConfig(**COMMON, max_position_embeddings=L + 2, pad_token_id=1, num_labels=3))


def deberta():  # MLM head multiplying by word_embeddings.weight; rel_embeddings read through .weight
    return transformers.DebertaV2ForMaskedLM(transformers.DebertaV2Config(
        **COMMON, max_position_embeddings=16, relative_attention=True, position_buckets=4,
        pos_att_type=["p2c", "c2p"], position_biased_input=False, norm_rel_ebd="layer_norm", legacy=False,
        pad_token_id=0))


def gpt2():  # tied head: a dense gradient on wte
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=V, n_positions=16, n_embd=16, n_layer=2, n_head=2, resid_pdrop=0.0, embd_pdrop=0.0,
        attn_pdrop=0.0, bos_token_id=0, eos_token_id=0, pad_token_id=0))


def bart():  # learned positions (offset 2), shared embeddings tied to the head
    return transformers.BartForConditionalGeneration(transformers.BartConfig(
        vocab_size=V, d_model=16, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=16,
        dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, pad_token_id=1, bos_token_id=0,
        eos_token_id=2, decoder_start_token_id=2, forced_eos_token_id=None))


# name: (builder, task, pad id, FGM/PGD emb_name (None: the input embeddings), SiFT target or None)
MODELS = {
    "bert": (bert, "seq", 0, None, "embeddings.LayerNorm"),
    "roberta": (roberta, "token", 1, "embeddings.", None),
    "deberta": (deberta, "mlm", 0, "embeddings", "embeddings.LayerNorm"),
    "gpt2": (gpt2, "clm", 0, None, None),
    "bart": (bart, "s2s", 1, "embed", "layernorm_embedding"),
}


def dataset(task, pad, n=N, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, V, (n, L), generator=g)
    lengths = torch.randint(L // 2, L + 1, (n,), generator=g)
    mask = (torch.arange(L) < lengths[:, None]).long()
    ids = ids.masked_fill(mask == 0, pad)
    if task == "seq":
        labels = torch.randint(0, 3, (n,), generator=g)
    elif task == "token":
        labels = torch.randint(0, 3, (n, L), generator=g).masked_fill(mask == 0, -100)
    elif task == "mlm":
        pick = (torch.rand(n, L, generator=g) < 0.4) & (mask == 1)
        pick[:, 0] = True
        labels = ids.masked_fill(~pick, -100)
        ids = ids.masked_fill(pick, 2)
    elif task == "clm":
        labels = ids.masked_fill(mask == 0, -100)
    else:  # s2s
        labels = torch.randint(3, V, (n, 6), generator=g)
        labels[n // 2:, 4:] = -100
    return [{"input_ids": ids[i], "attention_mask": mask[i], "labels": labels[i]} for i in range(n)]


def arguments(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=3, optim="sgd",
                learning_rate=0.1, report_to="none", save_strategy="no", logging_strategy="no",
                disable_tqdm=True, use_cpu=True, seed=0, dataloader_num_workers=0)
    base.update(kw)
    return TrainingArguments(**base)


def fresh(name, seed=0):
    torch.manual_seed(seed)
    return MODELS[name][0]()


def params(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def assert_same_weights(a, b, tol=FP32):
    assert a.keys() == b.keys()
    for n in a:
        torch.testing.assert_close(a[n], b[n], **tol, msg=lambda m, n=n: f"{n}: {m}")


# -- the hand-written reference: the seed classes in a Trainer subclass -------------

def take_grads(model, select):
    """The gradients earlier micro-batches left, taken out of the selected parameters."""
    kept = {}
    for n, p in model.named_parameters():
        if select(n, p) and p.grad is not None:
            kept[n], p.grad = p.grad, None
    return kept


def add_back(model, kept):
    for n, p in model.named_parameters():
        if n in kept:
            p.grad = kept[n] if p.grad is None else p.grad.add_(kept[n])


def put_back(model, kept):
    for n, p in model.named_parameters():
        p.grad = kept.get(n)


class HandTrainer(Trainer):
    """What a user writes by hand around the seed classes (fastadv.reference):
    the parent's training_step for every forward + backward, the seed's protocol
    in between; under gradient accumulation each micro-batch is attacked along
    its own clean gradient (the earlier micro-batches' gradients are set aside
    and given back before its last backward)."""

    def __init__(self, *args, mode=None, opts=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.mode, self.opts, self.adv, self.sift_on = mode, dict(opts or {}), None, False

    def one_pass(self, model, inputs, n):
        return super().training_step(model, inputs, n)

    def training_step(self, model, inputs, num_items_in_batch=None):
        m, o = self.model, self.opts
        if self.mode == "sift":
            if self.adv is None:
                layers = ref_sift.hook_sift_layer(m, m.config.hidden_size, o.get("learning_rate", 1e-4),
                                                  o.get("init_perturbation", 1e-2), o["target_module"])
                self.adv = ref_sift.AdversarialLearner(m, layers)
            self.sift_on = True
            try:
                return self.one_pass(model, inputs, num_items_in_batch)
            finally:
                self.sift_on = False
        if self.mode in ("fgm", "pgd"):
            emb = o.get("emb_name") or next(n for n, p in m.named_parameters()
                                            if p is m.get_input_embeddings().weight)
            if self.adv is None:
                self.adv = (ref.FGM(m, emb_name=emb, epsilon=o.get("epsilon", 1.0)) if self.mode == "fgm" else
                            ref.PGD(m, emb_name=emb, epsilon=o.get("epsilon", 1.0), alpha=o.get("alpha", 0.3)))
            earlier = take_grads(m, lambda n, p: p.requires_grad and emb in n)
            loss = self.one_pass(model, inputs, num_items_in_batch)
            if self.mode == "fgm":
                self.adv.attack()
                add_back(m, earlier)
                self.one_pass(model, inputs, num_items_in_batch)
                self.adv.restore()
                return loss
            k = o.get("K", 3)
            self.adv.attack(is_first_attack=True)
            add_back(m, earlier)
            self.adv.backup_grad()
            for t in range(k):
                if t > 0:
                    self.adv.attack()
                if t != k - 1:
                    m.zero_grad()
                else:
                    self.adv.restore_grad()
                self.one_pass(model, inputs, num_items_in_batch)
            self.adv.restore()
            return loss
        if self.mode == "awp":
            if self.adv is None:
                self.adv = ref.AWP(m, self.optimizer, adv_param=o.get("adv_param", "weight"),
                                   adv_lr=o.get("adv_lr", 1.0), adv_eps=o.get("adv_eps", 0.2),
                                   start_epoch=o.get("start_epoch", 0), adv_step=o.get("adv_step", 1))
            a = self.adv
            if a.adv_lr == 0 or math.floor(self.state.epoch or 0) < a.start_epoch:
                return self.one_pass(model, inputs, num_items_in_batch)
            earlier = take_grads(m, lambda n, p: True)
            loss = self.one_pass(model, inputs, num_items_in_batch)
            a._save()
            for i in range(a.adv_step):
                a._attack_step()
                if i < a.adv_step - 1:
                    m.zero_grad()            # the seed's optimizer.zero_grad()
                else:
                    put_back(m, earlier)     # ... keeping what earlier micro-batches accumulated
                self.one_pass(model, inputs, num_items_in_batch)
            a._restore()
            return loss
        return self.one_pass(model, inputs, num_items_in_batch)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not self.sift_on:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        data = dict(inputs)
        loss, out = super().compute_loss(model, inputs, True, num_items_in_batch)
        adv = self.adv.loss(out.logits, lambda mod, **kw: mod(**kw).logits, "symmetric-kl", **data)
        if self.model_accepts_loss_kwargs and num_items_in_batch is not None:
            adv = adv / self.current_gradient_accumulation_steps  # Trainer will not divide this loss
        loss = loss + adv
        return (loss, out) if return_outputs else loss


def options(name, mode, backend="torch"):
    _, _, _, emb_name, target = MODELS[name]
    if mode in ("fgm", "pgd"):
        o = {"emb_name": emb_name, "epsilon": 1.0}
        if mode == "pgd":
            o.update(alpha=0.3, K=2 if name in ("gpt2", "bart") else 3)
    elif mode == "awp":
        o = {"adv_lr": 1.0, "adv_eps": 0.2, "adv_step": 2 if name == "roberta" else 1}
    else:
        o = {"target_module": target, "init_perturbation": 0.05, "learning_rate": 0.1}
    if backend is not None and mode != "sift":
        o["backend"] = backend
    return o


@contextlib.contextmanager
def shared_sift_draws():
    """The reference SiFT layers take the initial perturbations fastadv drew."""
    import fastadv.sift.sift as fsift
    draws, update = [], fsift.PerturbationLayer.update_delta

    def recording(self, requires_grad=False):
        first = self.adversarial_mode and self.delta is None
        out = update(self, requires_grad)
        if first:
            draws.append(self.delta.detach().clone())
        return out

    initial = ref_sift.PerturbationLayer.initial_delta
    fsift.PerturbationLayer.update_delta = recording
    ref_sift.PerturbationLayer.initial_delta = lambda self: draws.pop(0)
    try:
        yield draws
    finally:
        fsift.PerturbationLayer.update_delta = update
        ref_sift.PerturbationLayer.initial_delta = initial


def run_pair(name, mode, tmp_path, backend="torch", data=None, **args):
    """(fastadv trainer, its weights), (hand-written reference trainer, its weights)."""
    task, pad = MODELS[name][1], MODELS[name][2]
    data = data or dataset(task, pad)
    o = options(name, mode, backend)
    with shared_sift_draws() if mode == "sift" else contextlib.nullcontext():
        ours = AdversarialTrainer(model=fresh(name), args=arguments(tmp_path / "a", **args), train_dataset=data,
                                  adversarial=mode, adversarial_kwargs=o)
        ours.train()
        ref_opts = {k: v for k, v in o.items() if k != "backend"}
        hand = HandTrainer(model=fresh(name), args=arguments(tmp_path / "b", **args), train_dataset=data,
                           mode=mode, opts=ref_opts)
        hand.train()
    return (ours, params(ours.model)), (hand, params(hand.model))


_PLAIN = {}


def plain_weights(name, tmp_path):
    if name not in _PLAIN:
        task, pad = MODELS[name][1], MODELS[name][2]
        t = Trainer(model=fresh(name), args=arguments(tmp_path / "plain"), train_dataset=dataset(task, pad))
        t.train()
        _PLAIN[name] = params(t.model)
    return _PLAIN[name]


CASES = [(m, a) for m in MODELS for a in ("fgm", "pgd", "awp")] + \
        [(m, "sift") for m in MODELS if MODELS[m][4] is not None]


@pytest.mark.parametrize("name,mode", CASES, ids=[f"{m}-{a}" for m, a in CASES])
def test_matches_hand_written_reference(name, mode, tmp_path):
    (ours, w), (hand, w_ref) = run_pair(name, mode, tmp_path)
    assert ours.state.global_step == hand.state.global_step == 3
    assert_same_weights(w, w_ref)
    # not vacuous: the adversarial step changed the training (SiFT's term is tiny on these models)
    plain = plain_weights(name, tmp_path)
    diff = max(float((w[n] - plain[n]).abs().max()) for n in w)
    assert diff > (1e-9 if mode == "sift" else 1e-4), diff
    if mode in ("fgm", "pgd"):  # the attacked tables are the ones the reference attacked, the odd ones among them
        assert ours.attacker.emb_name == hand.adv.emb_name
        attacked = {n for n, p in ours.model.named_parameters() if ours.attacker.emb_name in n}
        assert attacked >= ATTACKED[name], attacked


ATTACKED = {  # tables read in odd ways: through .weight, a tied head, learned positions with an offset
    "bert": {"bert.embeddings.word_embeddings.weight"},
    "roberta": {"roberta.embeddings.word_embeddings.weight", "roberta.embeddings.position_embeddings.weight",
                "roberta.embeddings.token_type_embeddings.weight"},
    "deberta": {"deberta.embeddings.word_embeddings.weight", "deberta.encoder.rel_embeddings.weight"},
    "gpt2": {"transformer.wte.weight"},
    "bart": {"model.encoder.embed_positions.weight", "model.decoder.embed_positions.weight"},
}


@pytest.mark.parametrize("name", ["bert", "gpt2"])  # row-sparse gradient; dense (tied head)
def test_fgm_on_the_triton_kernels(name, tmp_path):
    why = _backend.why_not("triton", torch.device("cpu"))
    if why is not None:
        pytest.skip(why)
    import fastadv.kernels as kernels
    before = sum(n for k, n in kernels.LAUNCHES.items() if k.startswith("triton."))
    (ours, w), (_, w_ref) = run_pair(name, "fgm", tmp_path, backend="triton", max_steps=2)
    assert sum(n for k, n in kernels.LAUNCHES.items() if k.startswith("triton.")) > before
    assert_same_weights(w, w_ref)


# -- gradient accumulation, clipping, bf16 ---------------------------------------------

@pytest.mark.parametrize("name,mode", [("bert", "fgm"), ("bert", "pgd"), ("bert", "awp"), ("gpt2", "fgm"),
                                       ("gpt2", "awp"), ("deberta", "sift")])
def test_accumulation_and_clipping_match_reference(name, mode, tmp_path):
    (ours, w), (hand, w_ref) = run_pair(name, mode, tmp_path, per_device_train_batch_size=2,
                                        gradient_accumulation_steps=3, max_grad_norm=0.05, max_steps=2)
    assert ours.state.global_step == 2
    assert_same_weights(w, w_ref)


class Recorder(TrainerCallback):
    def __init__(self):
        self.grads = None

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("mode", ["fgm", "pgd", "awp"])
def test_accumulation_attacks_each_micro_batch_along_its_own_gradient(mode, tmp_path):
    """The accumulated gradient is the sum over micro-batches of what the seed's
    loop gives on each alone (scaled as Trainer scales each micro-batch's loss)."""
    model = fresh("bert")
    start = copy.deepcopy(model)
    seen = []

    class Watching(AdversarialTrainer):
        def training_step(self, model, inputs, num_items_in_batch=None):
            seen.append(({k: v.clone() for k, v in inputs.items()}, num_items_in_batch))
            return super().training_step(model, inputs, num_items_in_batch)

    rec = Recorder()
    o = options("bert", mode)
    t = Watching(model=model, args=arguments(tmp_path, per_device_train_batch_size=2, gradient_accumulation_steps=3,
                                             max_steps=1, max_grad_norm=0.0),
                 train_dataset=dataset("seq", 0), adversarial=mode, adversarial_kwargs=o, callbacks=[rec])
    t.train()
    assert len(seen) == 3
    expected = {}
    for batch, n_items in seen:
        m = copy.deepcopy(start)
        m.train()
        scale = 1.0 if (t.model_accepts_loss_kwargs and n_items is not None) else 1.0 / 3

        def loss_fn():
            return m(**batch).loss * scale
        loss_fn().backward()
        emb = "bert.embeddings.word_embeddings.weight"
        if mode == "fgm":
            a = ref.FGM(m, emb_name=emb, epsilon=o["epsilon"])
            a.attack()
            loss_fn().backward()
            a.restore()
        elif mode == "pgd":
            a = ref.PGD(m, emb_name=emb, epsilon=o["epsilon"], alpha=o["alpha"])
            a.backup_grad()
            for k in range(o["K"]):
                a.attack(is_first_attack=(k == 0))
                m.zero_grad() if k != o["K"] - 1 else a.restore_grad()
                loss_fn().backward()
            a.restore()
        else:
            a = ref.AWP(m, torch.optim.SGD(m.parameters(), lr=0.1), adv_lr=o["adv_lr"], adv_eps=o["adv_eps"])
            a._save()
            a._attack_step()
            m.zero_grad()
            loss_fn().backward()
            a._restore()
        for n, p in m.named_parameters():
            if p.grad is not None:
                expected[n] = expected[n] + p.grad if n in expected else p.grad.clone()
    assert rec.grads.keys() == expected.keys()
    for n in expected:
        torch.testing.assert_close(rec.grads[n], expected[n], **FP32, msg=lambda s, n=n: f"{n}: {s}")


@pytest.mark.parametrize("mode", ["fgm", "awp"])
def test_bf16_autocast_on_cpu_matches_reference(mode, tmp_path):
    dtypes = []

    def model():
        m = fresh("bert")  # accelerate casts the outputs back to fp32: look inside
        m.classifier.register_forward_hook(lambda mod, i, out: dtypes.append(out.dtype))
        return m

    data = dataset("seq", 0)
    o = options("bert", mode)
    ours = AdversarialTrainer(model=model(), args=arguments(tmp_path / "a", bf16=True), train_dataset=data,
                              adversarial=mode, adversarial_kwargs=o)
    ours.train()
    hand = HandTrainer(model=model(), args=arguments(tmp_path / "b", bf16=True), train_dataset=data,
                       mode=mode, opts={k: v for k, v in o.items() if k != "backend"})
    hand.train()
    assert set(dtypes) == {torch.bfloat16} and len(dtypes) == 2 * 2 * 3  # clean + adversarial, 3 steps, 2 runs
    assert all(p.dtype == torch.float32 for p in ours.model.parameters())  # fp32 master weights
    # the attacks act on the fp32 master weights: the fp32 tolerance holds (here the runs agree exactly)
    assert_same_weights(params(ours.model), params(hand.model))


# -- resume, EMA -------------------------------------------------------------------

def test_resume_mid_epoch_keeps_awp_start_epoch_and_ema(tmp_path):
    data = dataset("seq", 0, n=16)  # 4 steps per epoch; AWP from epoch 1; checkpoint at step 2
    o = {"adv_lr": 1.0, "adv_eps": 0.2, "start_epoch": 1, "backend": "torch"}
    kw = dict(max_steps=-1, num_train_epochs=2, save_strategy="steps", save_steps=2)

    def trainer(out):
        cb = EMACallback(decay=0.8, warmup=True, backend="torch")
        return AdversarialTrainer(model=fresh("bert"), args=arguments(out, **kw), train_dataset=data,
                                  adversarial="awp", adversarial_kwargs=o, callbacks=[cb]), cb

    full, cb_full = trainer(tmp_path / "full")
    epochs = []
    full.add_callback(type("E", (TrainerCallback,), {
        "on_step_begin": lambda self, a, s, c, **k: epochs.append(full.current_epoch())})())
    full.train()
    assert full.state.global_step == 8 and epochs == [0] * 4 + [1] * 4
    assert os.path.isfile(tmp_path / "full" / "checkpoint-2" / EMA_STATE_NAME)

    resumed, cb_resumed = trainer(tmp_path / "full")  # the same output dir, fresh objects
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-2"))
    assert resumed.state.global_step == 8
    assert_same_weights(params(resumed.model), params(full.model))
    assert cb_resumed.ema.num_updates == cb_full.ema.num_updates == 8
    assert_same_weights(cb_resumed.ema.shadow, cb_full.ema.shadow)

    # AWP really ran from epoch 1: the same run without it differs, and so does AWP from epoch 0
    unsaved = {**kw, "save_strategy": "no"}
    no_awp = AdversarialTrainer(model=fresh("bert"), args=arguments(tmp_path / "plain", **unsaved), train_dataset=data)
    no_awp.train()
    first_epoch = AdversarialTrainer(model=fresh("bert"), args=arguments(tmp_path / "e0", **unsaved),
                                     train_dataset=data, adversarial="awp", adversarial_kwargs={**o, "start_epoch": 0})
    first_epoch.train()
    w, w0, w_all = params(full.model), params(no_awp.model), params(first_epoch.model)
    assert max(float((w[n] - w0[n]).abs().max()) for n in w) > 1e-4
    assert max(float((w[n] - w_all[n]).abs().max()) for n in w) > 1e-4


def test_ema_callback_follows_the_reference_ema_and_evaluates_on_it(tmp_path):
    data = dataset("seq", 0)
    model = fresh("bert")
    shadow_ref = ref.EMA(model, 0.7)
    shadow_ref.register()

    class RefEMA(TrainerCallback):
        def on_optimizer_step(self, args, state, control, **kwargs):
            shadow_ref.update()

    cb = EMACallback(decay=0.7, evaluate_with_ema=True, save_with_ema=True, backend="torch")
    t = AdversarialTrainer(model=model, args=arguments(tmp_path), train_dataset=data, eval_dataset=data,
                           adversarial="fgm", adversarial_kwargs={"backend": "torch"}, callbacks=[cb, RefEMA()])
    t.train()
    assert cb.ema.num_updates == 3
    assert_same_weights(cb.ema.shadow, shadow_ref.shadow)

    live = params(t.model)
    metrics = t.evaluate()
    assert_same_weights(params(t.model), live, tol=dict(rtol=0, atol=0))  # live weights back, bit-exact

    loaded = fresh("bert", seed=1)
    loaded.load_state_dict({**model.state_dict(), **cb.ema.shadow})
    plain = Trainer(model=loaded, args=arguments(tmp_path / "plain"), eval_dataset=data)
    expected = plain.evaluate()
    assert metrics["eval_loss"] == pytest.approx(expected["eval_loss"], rel=1e-6)
    live_metrics = Trainer(model=model, args=arguments(tmp_path / "live"), eval_dataset=data).evaluate()
    assert metrics["eval_loss"] != pytest.approx(live_metrics["eval_loss"], rel=1e-6)

    t.save_model(str(tmp_path / "saved"))
    saved = transformers.BertForSequenceClassification.from_pretrained(str(tmp_path / "saved"))
    assert_same_weights({n: p.detach() for n, p in saved.named_parameters()}, cb.ema.shadow,
                        tol=dict(rtol=0, atol=0))
    assert_same_weights(params(t.model), live, tol=dict(rtol=0, atol=0))


def test_ema_callback_with_a_plain_trainer_updates_resumes_and_warns(tmp_path):
    def trainer():
        cb = EMACallback(decay=0.5, evaluate_with_ema=True)
        return Trainer(model=fresh("bert"), args=arguments(tmp_path, save_strategy="steps", save_steps=2),
                       train_dataset=dataset("seq", 0), callbacks=[cb]), cb

    t, cb = trainer()
    with pytest.warns(UserWarning, match="AdversarialTrainer"):
        t.train()
    assert cb.ema.num_updates == 3
    with cb.applied(t.model):
        assert_same_weights(params(t.model), cb.ema.shadow, tol=dict(rtol=0, atol=0))
    # resumed by a plain Trainer: the callback finds the state in output_dir/checkpoint-<step>
    again, cb_again = trainer()
    with pytest.warns(UserWarning, match="AdversarialTrainer"):
        again.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    assert cb_again.ema.num_updates == 3
    assert_same_weights(cb_again.ema.shadow, cb.ema.shadow)


# -- NEFTune --------------------------------------------------------------------

class HookWatch(TrainerCallback):
    def __init__(self):
        self.seen = []

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.seen.append(list(model.get_input_embeddings()._forward_hooks.values()))


@pytest.mark.parametrize("fused", [True, False])
def test_neftune_hook_is_replaced_during_training(fused, tmp_path):
    from transformers.integrations.neftune import neftune_post_forward_hook
    watch = HookWatch()
    t = AdversarialTrainer(model=fresh("gpt2"), args=arguments(tmp_path, neftune_noise_alpha=5.0),
                           train_dataset=dataset("clm", 0), adversarial="fgm", adversarial_kwargs={"backend": "torch"},
                           callbacks=[watch], fused_neftune=fused)
    t.train()
    assert len(watch.seen) == 3
    for hooks in watch.seen:
        assert len(hooks) == 1
        if fused:
            assert isinstance(hooks[0], integ._NEFTuneHook) and hooks[0].alpha == 5.0
        else:
            assert hooks[0] is neftune_post_forward_hook
    assert not t.model.get_input_embeddings()._forward_hooks  # removed after training, as Trainer does
    assert t.neftune_noise_alpha == 5.0


def test_neftune_noise_has_trainers_distribution():
    stats = pytest.importorskip("scipy.stats")
    from transformers.integrations.neftune import neftune_post_forward_hook
    emb = torch.nn.Embedding(V, 64)
    emb.neftune_noise_alpha = 5.0
    ids = torch.randint(0, V, (8, 128))
    clean = emb(ids).detach()
    mag = 5.0 / math.sqrt(128 * 64)
    ours = (integ._NEFTuneHook(5.0)(emb, (ids,), clean) - clean).flatten()
    theirs = (neftune_post_forward_hook(emb, (ids,), clean) - clean).flatten()
    assert float(ours.abs().max()) <= mag * (1 + 1e-5)
    assert stats.kstest((ours / mag).numpy(), "uniform", args=(-1, 2)).pvalue > 1e-3
    assert stats.ks_2samp(ours.numpy(), theirs.numpy()).pvalue > 1e-3
    emb.eval()
    assert integ._NEFTuneHook(5.0)(emb, (ids,), clean) is clean  # no noise in eval mode


# -- the mixin, errors, import without transformers ------------------------------

def test_mixin_keeps_the_users_compute_loss(tmp_path):
    calls = []

    class Weighted(Trainer):  # a user's trainer: label-weighted loss
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            calls.append(type(self).__name__)
            labels = inputs.pop("labels")
            out = model(**inputs)
            w = torch.tensor([1.0, 2.0, 0.5])
            loss = torch.nn.functional.cross_entropy(out.logits, labels, weight=w)
            return (loss, out) if return_outputs else loss

    class Mine(AdversarialTrainingMixin, Weighted):
        pass

    class HandWeighted(HandTrainer, Weighted):
        pass

    data = dataset("seq", 0)
    ours = Mine(model=fresh("bert"), args=arguments(tmp_path / "a"), train_dataset=data, adversarial="fgm",
                adversarial_kwargs={"backend": "torch"})
    ours.train()
    assert calls == ["Mine"] * 6  # clean + adversarial, 3 steps
    hand = HandWeighted(model=fresh("bert"), args=arguments(tmp_path / "b"), train_dataset=data, mode="fgm")
    hand.train()
    assert_same_weights(params(ours.model), params(hand.model))


def test_option_errors(tmp_path):
    args = arguments(tmp_path)
    with pytest.raises(ValueError, match="adversarial must be one of"):
        AdversarialTrainer(model=fresh("bert"), args=args, adversarial="freelb")
    with pytest.raises(TypeError, match="unknown argument.*'eps'"):
        AdversarialTrainer(model=fresh("bert"), args=args, adversarial="fgm", adversarial_kwargs={"eps": 1})
    with pytest.raises(ValueError, match="K"):
        AdversarialTrainer(model=fresh("bert"), args=args, adversarial="pgd", adversarial_kwargs={"K": 0})
    t = AdversarialTrainer(model=fresh("gpt2"), args=args, train_dataset=dataset("clm", 0), adversarial="sift")
    with pytest.raises(ValueError, match="target_module='embeddings.LayerNorm' matches no module"):
        t.train()
    t = AdversarialTrainer(model=fresh("bert"), args=args, adversarial="fgm")
    t.is_deepspeed_enabled = True
    with pytest.raises(NotImplementedError, match="DeepSpeed"):
        t._check_supported()


def test_ddp_two_processes_match_reference_and_stay_in_sync(tmp_path):
    """torchrun, 2 CPU processes (gloo), gradient accumulation 2: on every rank
    AdversarialTrainer gives the hand-written reference's weights, and the
    ranks hold the same weights (the kept gradients are cloned under DDP)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", __file__,
           "--ddp-worker", str(tmp_path)]
    # The workers import the checkout under test, whatever pip installed.
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = os.pathsep.join([root] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else []))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path}
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    lines = [ln.split() for r in (0, 1) for ln in (tmp_path / f"rank{r}.txt").read_text().splitlines()]
    assert len(lines) == 4, lines
    for rank, mode, wrapped, ours_vs_ref, spread in lines:
        assert wrapped == "DistributedDataParallel", lines
        assert float(ours_vs_ref) <= 1e-6 and float(spread) == 0.0, lines


def _ddp_worker(out):
    import pathlib
    import torch.distributed as dist
    torch.set_num_threads(1)
    gc.collect()
    gc.freeze()
    for mode in ("fgm", "awp"):  # the DDP path (kept gradients cloned) is the same for PGD
        (ours, w), (_, w_ref) = run_pair("bert", mode, pathlib.Path(out) / mode, per_device_train_batch_size=2,
                                         gradient_accumulation_steps=2, max_steps=2, ddp_backend="gloo")
        diff = max(float((w[n] - w_ref[n]).abs().max()) for n in w)
        flat = torch.cat([v.flatten() for v in w.values()])
        every = [torch.zeros_like(flat) for _ in range(dist.get_world_size())]
        dist.all_gather(every, flat)
        spread = max(float((e - every[0]).abs().max()) for e in every)
        with open(pathlib.Path(out) / f"rank{dist.get_rank()}.txt", "a") as f:  # one file per rank
            f.write(f"{dist.get_rank()} {mode} {type(ours.model_wrapped).__name__} {diff:.3g} {spread:.3g}\n")
    # Results are in the files: leave without the interpreter's teardown, where a C++ thread of
    # the Trainer's process group still alive at exit aborted a rank now and then ("terminate
    # called without an active exception", SIGABRT) after a run that had passed.
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)


def test_import_without_transformers_and_the_install_hint():
    code = r"""
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name == "transformers" or name.startswith("transformers."):
            raise ImportError("No module named 'transformers'")
sys.meta_path.insert(0, Block())
import fastadv.integrations.transformers as t
for make in (lambda: t.AdversarialTrainer(model=None), lambda: t.EMACallback()):
    try:
        make()
    except ImportError as e:
        assert "pip install fastadv[transformers]" in str(e), e
    else:
        raise SystemExit("no ImportError")
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


if __name__ == "__main__" and "--ddp-worker" in sys.argv:
    _ddp_worker(sys.argv[sys.argv.index("--ddp-worker") + 1])
