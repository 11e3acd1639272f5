"""Integrations of fastadv with training frameworks.

``fastadv.integrations.transformers``: Hugging Face ``Trainer`` with FGM, PGD,
AWP or SiFT in its training step (``AdversarialTrainer``,
``AdversarialTrainingMixin``), an EMA callback (``EMACallback``) and fused
NEFTune.  Importing it works without ``transformers``; using it needs
``pip install fastadv[transformers]``.  See docs/transformers.md.

Nothing is imported here eagerly (``transformers`` takes seconds to import).
"""
__all__ = ["transformers"]
