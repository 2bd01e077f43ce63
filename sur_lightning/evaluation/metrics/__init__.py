"""Evaluation metrics: CLIP score, FID/KID, caption-back text metrics, LPIPS diversity, shape accuracy.

Each module imports its heavy dependency (open_clip, torchmetrics, nltk, transformers) only when used.
May import: ``data`` (the synthetic shapes' palette). The prompt suites are in ``sur_lightning.data.prompt_suites``.
"""
