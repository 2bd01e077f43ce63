"""Evaluation: ``evaluator`` (the requested metrics, loaded once, scoring rendered images), ``report`` (per-split
accuracies, the gap closed with intervals, tables), ``learning_curve`` (adapters exported at several steps,
scored and summarised over training seeds) and ``metrics/`` (CLIP score, FID/KID, captions, LPIPS, shapes).

May import: ``generation``, ``models`` and ``data``. Imported by ``training`` (the evaluation callback) and
entry points; no entry point is imported here.
"""
