"""Evaluation metrics: CLIP score, FID/KID, caption-back text metrics, LPIPS diversity, shape accuracy, prompt suites.

Each module imports its heavy dependency (open_clip, torchmetrics, nltk, transformers) only when used.
"""
