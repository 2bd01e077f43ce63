"""Data: rows of (image, simple prompt, complex prompt) from folders, tables, WebDataset shards or the hub
(``formats``), checked and repaired with nothing lost silently (``images``, ``report``), served as datasets
(``datasets``) in a resumable seeded order (``sampler``) by the DataModule (``datamodule``); synthetic and
dataset-specific sources (``synthetic``, ``pokemon``, ``surd``) and prompt suites (``prompt_suites``).

May import: ``knowledge`` (name dropout renames training prompts). The feature cache reaches the datamodule
through its cache methods only (``datamodule.py``).
"""
