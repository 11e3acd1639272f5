"""Fine-tune a tiny BERT with Hugging Face's Trainer, with and without FGM / AWP.

    python examples/hf_adversarial.py            # about a minute on a laptop CPU
    python examples/hf_adversarial.py --epochs 6 --seed 1

The dataset is generated here (nothing is downloaded): short "reviews" made
of filler words and sentiment words that agree, some through a negation
("not bad" in a positive review); the label is the review's polarity.  The model is a 2-layer BERT built from a
config with random weights.  Each run prints its accuracy on a held-out test
set and on the same test set with 30 % of the filler words replaced by
words never seen in training, whose embeddings stay random (a shift that
adversarial training on the embeddings is meant to make the model robust to).  The one change from a plain Trainer is
``Trainer(...)`` -> ``AdversarialTrainer(..., adversarial="fgm")``.

Accuracies on data this small move by a few points with the seed: compare
runs across seeds before concluding anything.
"""
from __future__ import annotations

import argparse
import os
import random
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from transformers import BertConfig, BertForSequenceClassification, TrainingArguments  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

from fastadv.integrations.transformers import AdversarialTrainer, EMACallback  # noqa: E402

POSITIVE = "good great fine nice lovely superb excellent pleasant enjoyable brilliant".split()
NEGATIVE = "bad awful poor boring dull terrible weak annoying horrible mediocre".split()
FILLER = ("the a movie film plot actor acting story scene it was is and but very quite really this that "
          "with some script music ending cast director").split()
UNSEEN = "plot-wise frankly overall honestly somewhat frame cinema screen popcorn sequel".split()  # test only
NEGATION = "not never".split()
SPECIAL = ["[PAD]", "[CLS]", "[SEP]"]
WORDS = SPECIAL + POSITIVE + NEGATIVE + FILLER + NEGATION + UNSEEN
VOCAB = {w: i for i, w in enumerate(WORDS)}
MAX_LEN = 24


def review(rng: random.Random) -> tuple[list[str], int]:
    """One to three sentiment words among filler words, all saying the same
    thing, some of them through a negation ("not bad" in a positive review)."""
    positive = rng.random() < 0.5
    while True:
        words = []
        for _ in range(rng.randint(1, 3)):
            negated = rng.random() < 0.3
            words += [rng.choice(FILLER) for _ in range(rng.randint(1, 4))]
            if negated:
                words.append(rng.choice(NEGATION))
            words.append(rng.choice(POSITIVE if positive != negated else NEGATIVE))
        words += [rng.choice(FILLER) for _ in range(rng.randint(0, 3))]
        if len(words) <= MAX_LEN - 2:
            return words, int(positive)


def encode(words: list[str], label: int) -> dict:
    ids = [VOCAB["[CLS]"]] + [VOCAB[w] for w in words] + [VOCAB["[SEP]"]]
    mask = [1] * len(ids) + [0] * (MAX_LEN - len(ids))
    ids = ids + [VOCAB["[PAD]"]] * (MAX_LEN - len(ids))
    return {"input_ids": torch.tensor(ids), "attention_mask": torch.tensor(mask), "labels": torch.tensor(label)}


def make_data(seed: int, n_train=1000, n_test=500):
    rng = random.Random(seed)
    train = [encode(*review(rng)) for _ in range(n_train)]
    test_reviews = [review(rng) for _ in range(n_test)]
    test = [encode(w, y) for w, y in test_reviews]
    shifted = []
    for words, y in test_reviews:  # filler words replaced by words never seen in training
        noisy = [rng.choice(UNSEEN) if w in FILLER and rng.random() < 0.3 else w for w in words]
        shifted.append(encode(noisy, y))
    return train, test, shifted


def tiny_bert(seed: int):
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=len(WORDS), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=128, max_position_embeddings=MAX_LEN, num_labels=2, pad_token_id=0)
    return BertForSequenceClassification(config)


def accuracy(eval_pred):
    logits, labels = eval_pred
    return {"accuracy": float((np.argmax(logits, -1) == labels).mean())}


RUNS = {  # name: AdversarialTrainer keyword arguments
    "plain Trainer": {},
    "FGM": {"adversarial": "fgm", "adversarial_kwargs": {"epsilon": 0.1}},
    "AWP (from epoch 1)": {"adversarial": "awp",
                           "adversarial_kwargs": {"adv_lr": 0.01, "adv_eps": 0.001, "start_epoch": 1}},
    "FGM + EMA": {"adversarial": "fgm", "adversarial_kwargs": {"epsilon": 0.1}, "ema": True},
}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=float, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (tiny models run fastest on one)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    hf_logging.set_verbosity_error()
    train, test, shifted = make_data(args.seed)
    print(f"{len(train)} training / {len(test)} test reviews, vocabulary {len(WORDS)}, tiny BERT "
          f"(2 layers, hidden 64), {args.epochs:g} epochs")
    print(f"{'run':<20} {'test acc':>9} {'shifted acc':>12} {'time':>7}")
    for name, options in RUNS.items():
        options = dict(options)
        callbacks = [EMACallback(decay=0.99, warmup=True, evaluate_with_ema=True)] if options.pop("ema", False) else []
        with tempfile.TemporaryDirectory() as out:
            training_args = TrainingArguments(
                output_dir=out, num_train_epochs=args.epochs, per_device_train_batch_size=32,
                per_device_eval_batch_size=128, learning_rate=2e-3, warmup_steps=10, weight_decay=0.01,
                save_strategy="no", logging_strategy="no", report_to="none", disable_tqdm=True, use_cpu=True,
                seed=args.seed, dataloader_num_workers=0)
            trainer = AdversarialTrainer(model=tiny_bert(args.seed), args=training_args, train_dataset=train,
                                         compute_metrics=accuracy, callbacks=callbacks, **options)
            start = time.time()
            trainer.train()
            elapsed = time.time() - start
            acc = trainer.evaluate(test)["eval_accuracy"]
            acc_shifted = trainer.evaluate(shifted)["eval_accuracy"]
        print(f"{name:<20} {acc:>9.3f} {acc_shifted:>12.3f} {elapsed:>6.1f}s", flush=True)


if __name__ == "__main__":
    main()
