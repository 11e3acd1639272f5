"""Time a full Trainer fine-tuning step with FGM / AWP: the seed classes in a
hand-written Trainer subclass vs fastadv's AdversarialTrainer (issue 11's
speed check; needs a GPU, models built from configs with random weights).

    python examples/bench_hf_step.py                       # GPU: BERT-base 16x512 and DeBERTa-v3-large, FGM and AWP
    python examples/bench_hf_step.py --models bert-base --modes fgm --steps 10
    python examples/bench_hf_step.py --dry-run             # CPU, tiny configs: checks the script runs

For each (model, mode) it runs a plain Trainer step, the seed classes
(fastadv.reference) in a Trainer subclass, and AdversarialTrainer, bf16 on
GPU, and prints step time (median of the timed steps, CUDA-synchronised),
peak memory, and the adversarial overhead over the plain step; one JSON
line per run goes to --out.

Read the overheads knowing what is in them: FGM's overhead is one extra
forward + backward (the same in both) plus the attack and restore (what
fastadv changes); AWP's is one extra forward + backward plus save, attack
step and restore over every weight.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import Trainer, TrainerCallback, TrainingArguments  # noqa: E402

import fastadv.reference as ref  # noqa: E402
from fastadv.integrations.transformers import AdversarialTrainer  # noqa: E402


def make_model(name: str, dry: bool):
    if name == "bert-base":
        cfg = transformers.BertConfig(num_labels=2)
        if dry:
            cfg = transformers.BertConfig(vocab_size=500, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                          intermediate_size=64, num_labels=2)
        return transformers.BertForSequenceClassification(cfg)
    if name == "deberta-v3-large":
        kw = dict(vocab_size=128100, hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                  intermediate_size=4096, max_position_embeddings=512, relative_attention=True,
                  position_buckets=256, norm_rel_ebd="layer_norm", pos_att_type=["p2c", "c2p"], share_att_key=True,
                  position_biased_input=False, type_vocab_size=0, num_labels=2)
        if dry:
            kw.update(vocab_size=500, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                      intermediate_size=64, position_buckets=8)
        return transformers.DebertaV2ForSequenceClassification(transformers.DebertaV2Config(**kw))
    raise ValueError(name)


class SeedTrainer(Trainer):
    """The seed classes in a Trainer subclass, as users write it (one micro-batch per step)."""

    def __init__(self, *args, mode, **kwargs):
        super().__init__(*args, **kwargs)
        self.mode, self.adv = mode, None

    def training_step(self, model, inputs, num_items_in_batch=None):
        m = self.model
        loss = super().training_step(model, inputs, num_items_in_batch)
        if self.mode == "fgm":
            self.adv = self.adv or ref.FGM(m, emb_name="word_embeddings.", epsilon=1.0)
            self.adv.attack()
            super().training_step(model, inputs, num_items_in_batch)
            self.adv.restore()
        else:
            self.adv = self.adv or ref.AWP(m, self.optimizer, adv_lr=1e-3, adv_eps=1e-2)
            self.adv._save()
            self.adv._attack_step()
            m.zero_grad()
            super().training_step(model, inputs, num_items_in_batch)
            self.adv._restore()
        return loss


class StepTimer(TrainerCallback):
    def __init__(self, warmup: int, cuda: bool):
        self.warmup, self.cuda, self.times, self.t0, self.peak = warmup, cuda, [], None, None

    def _sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == self.warmup and self.cuda:
            torch.cuda.reset_peak_memory_stats()
        self._sync()
        self.t0 = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self._sync()
        if state.global_step > self.warmup:
            self.times.append(time.perf_counter() - self.t0)
        if self.cuda:
            self.peak = torch.cuda.max_memory_allocated()


def run(model_name, mode, impl, a):
    cuda = torch.cuda.is_available() and not a.dry_run
    torch.manual_seed(0)
    model = make_model(model_name, a.dry_run)
    vocab = model.config.vocab_size
    n = a.batch * (a.steps + a.warmup)
    ids = torch.randint(5, vocab, (n, a.seq))
    data = [{"input_ids": ids[i], "attention_mask": torch.ones(a.seq, dtype=torch.long),
             "labels": torch.tensor(i % 2)} for i in range(n)]
    timer = StepTimer(a.warmup, cuda)
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(output_dir=out, per_device_train_batch_size=a.batch, max_steps=a.steps + a.warmup,
                                 bf16=cuda, use_cpu=not cuda, report_to="none", save_strategy="no",
                                 logging_strategy="no", disable_tqdm=True, learning_rate=1e-5,
                                 dataloader_num_workers=0)
        kw = dict(model=model, args=args, train_dataset=data, callbacks=[timer])
        if impl == "plain":
            trainer = Trainer(**kw)
        elif impl == "seed":
            trainer = SeedTrainer(**kw, mode=mode)
        else:
            opts = ({"emb_name": "word_embeddings.", "epsilon": 1.0} if mode == "fgm" else
                    {"adv_lr": 1e-3, "adv_eps": 1e-2})
            trainer = AdversarialTrainer(**kw, adversarial=mode, adversarial_kwargs=opts)
        trainer.train()
    row = {"model": model_name, "mode": mode, "impl": impl, "batch": a.batch, "seq": a.seq,
           "step_ms": 1e3 * statistics.median(timer.times), "peak_mb": timer.peak / 2**20 if timer.peak else None,
           "device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__,
           "transformers": transformers.__version__}
    del trainer, model
    if cuda:
        torch.cuda.empty_cache()
    return row


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=["bert-base", "deberta-v3-large"])
    p.add_argument("--modes", nargs="+", default=["fgm", "awp"])
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--out", default="hf_step_bench.jsonl")
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny configs, 2 steps: checks the script")
    a = p.parse_args()
    if a.dry_run:
        a.batch, a.seq, a.steps, a.warmup = 2, 16, 2, 1
    elif not torch.cuda.is_available():
        p.error("no GPU: use --dry-run to check the script on CPU")
    transformers.logging.set_verbosity_error()
    print(f"{'model':<18} {'mode':<5} {'impl':<8} {'step ms':>9} {'peak MB':>9} {'overhead ms':>12}")
    with open(a.out, "a") as f:
        for model_name in a.models:
            plain = run(model_name, None, "plain", a)
            f.write(json.dumps(plain) + "\n")
            print(f"{model_name:<18} {'-':<5} {'plain':<8} {plain['step_ms']:>9.1f} {plain['peak_mb'] or 0:>9.0f}")
            for mode in a.modes:
                for impl in ("seed", "fastadv"):
                    row = run(model_name, mode, impl, a)
                    row["overhead_ms"] = row["step_ms"] - plain["step_ms"]
                    f.write(json.dumps(row) + "\n")
                    print(f"{model_name:<18} {mode:<5} {impl:<8} {row['step_ms']:>9.1f} {row['peak_mb'] or 0:>9.0f} "
                          f"{row['overhead_ms']:>12.1f}", flush=True)


if __name__ == "__main__":
    main()
