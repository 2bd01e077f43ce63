"""sur_lightning: train SUR-adapter and ELLA connectors between frozen LLMs and a frozen Stable Diffusion.

Entry points (``python -m sur_lightning.X``): ``train``, ``generate``, ``evaluate``, ``cache``, ``rewrite``, ``bench``,
``sweep_report``, ``embedding_map``, ``toyworld.pretrain``, ``toyworld.probe`` — short Hydra mains that compose the
library; none imports another, and no library module imports one (tests/test_layout.py).

The library, imported downward only: ``training`` → ``evaluation`` → ``generation`` → ``models``, ``data``,
``knowledge`` (and ``config``, the run's configuration, beside them); ``toyworld`` is the offline proving ground.
"""

__version__ = "0.1.0"

from sur_lightning.config import register_resolvers as _register_resolvers

# Config interpolations (${llm_pooling:...}, ${wandb_run_name:...}): registered before any config is composed.
_register_resolvers()
