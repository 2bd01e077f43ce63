"""Evaluation that spans runs: learning curves (``learning_curve``: adapters exported at several steps, scored and
summarised over training seeds with intervals). May import the library below it (generation, metrics, models,
data); no entry point. The single-run evaluator still lives in ``sur_lightning.evaluate`` until the package
layout of DESIGN.md lands (issue 20)."""
