"""Training: the LightningModule (one readable step, in the data-flow order of docs/architecture.md), its losses, the callbacks
(adapter export, sample grid, evaluation, EMA), and the feature cache (``feature_store``: what is stored and
under which fingerprint; ``feature_cache``: filling it for a config and opening it for training).

May import: ``config``, ``models``, ``data``, ``knowledge``, ``generation`` and ``evaluation`` (the callbacks
render and score). Only the entry points import it; no entry point is imported here.
"""
