"""Models that read their embedding tables in the ways real model code does,
other than through the ``nn.Embedding`` forward; FGM and PGD must give the
seed's result on every one of them (issue 14)."""
import torch
from torch import nn
from torch.nn import functional as F

from conftest import DEVICE

VOCAB, DIM, CLASSES = 61, 8, 5


class _Base(nn.Module):
    """``embed(ids) -> tanh(proj) -> mean -> head`` plus whatever ``extra`` adds."""
    emb_name = "word_embeddings."

    def __init__(self):
        super().__init__()
        self.word_embeddings = nn.Embedding(VOCAB, DIM)
        self.proj = nn.Linear(DIM, DIM)
        self.head = nn.Linear(DIM, CLASSES)

    def embed(self, ids):
        return self.word_embeddings(ids)

    def extra(self, h, ids):
        return 0.0

    def forward(self, ids, labels):
        h = torch.tanh(self.proj(self.embed(ids)))
        return F.cross_entropy(self.head(h.mean(1)), labels) + self.extra(h, ids)


class TiedDirectHead(_Base):
    """An LM head written as ``h @ W.t()`` (DeBERTa's MLM head, hand-written LMs)."""

    def extra(self, h, ids):
        logits = h @ self.word_embeddings.weight.t()
        return F.cross_entropy(logits.flatten(0, 1), ids.flatten())


class FunctionalLookup(_Base):
    """``F.embedding(ids, table.weight)``: the module's forward never runs."""

    def embed(self, ids):
        return F.embedding(ids, self.word_embeddings.weight)


class IndexedLookup(_Base):
    """``table.weight[ids]``."""

    def embed(self, ids):
        return self.word_embeddings.weight[ids]


class RelativeEmbeddings(_Base):
    """DeBERTa-v2/v3: ``encoder.rel_embeddings`` read through ``.weight``, matched
    together with the word embeddings by ``emb_name="embeddings."``."""
    emb_name = "embeddings."

    def __init__(self):
        super().__init__()
        self.encoder = nn.Module()
        self.encoder.rel_embeddings = nn.Embedding(12, DIM)

    def extra(self, h, ids):
        rel = self.encoder.rel_embeddings.weight[: ids.shape[1]]
        return (torch.einsum("btd,td->bt", h, rel) ** 2).mean()


class BartPositions(nn.Embedding):
    """BART / MBart learned positions: the forward takes a shape, not ids."""

    def __init__(self, positions, dim, offset=2):
        super().__init__(positions + offset, dim)
        self.offset = offset

    def forward(self, input_ids_shape, past_key_values_length=0):
        positions = torch.arange(past_key_values_length, past_key_values_length + input_ids_shape[1],
                                 device=self.weight.device)
        return super().forward(positions + self.offset)


class OptPositions(nn.Embedding):
    """OPT learned positions: the forward takes the attention mask."""

    def __init__(self, positions, dim, offset=2):
        super().__init__(positions + offset, dim)
        self.offset = offset

    def forward(self, attention_mask, past_key_values_length=0):
        positions = (torch.cumsum(attention_mask, dim=1) * attention_mask).long() - 1
        return super().forward(positions[:, past_key_values_length:] + self.offset)


class LearnedPositions(_Base):
    """Token table plus a position subclass; ``emb_name="embed"`` matches both."""
    emb_name = "embed_"

    def __init__(self, kind):
        super().__init__()
        del self.word_embeddings
        self.embed_tokens = nn.Embedding(VOCAB, DIM)
        self.embed_positions = (BartPositions if kind == "bart" else OptPositions)(16, DIM)
        self.kind = kind

    def embed(self, ids):
        if self.kind == "bart":
            pos = self.embed_positions(ids.shape)
        else:
            pos = self.embed_positions(torch.ones_like(ids))
        return self.embed_tokens(ids) + pos


class Bart(LearnedPositions):
    def __init__(self):
        super().__init__("bart")


class Opt(LearnedPositions):
    def __init__(self):
        super().__init__("opt")


ZOO = [TiedDirectHead, FunctionalLookup, IndexedLookup, RelativeEmbeddings, Bart, Opt]


def batch(b=3, t=7):
    return (torch.randint(0, VOCAB, (b, t), device=DEVICE),
            torch.randint(0, CLASSES, (b,), device=DEVICE))


def hook_count(model: nn.Module) -> int:
    """Forward (pre-)hooks on every module plus gradient hooks on every parameter."""
    n = 0
    for m in model.modules():
        n += len(m._forward_pre_hooks) + len(m._forward_hooks)
    for p in model.parameters():
        n += len(getattr(p, "_post_accumulate_grad_hooks", None) or {})
        n += len(p._backward_hooks or {})
    return n
