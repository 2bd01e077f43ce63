"""sur_lightning: train SUR-adapter and ELLA connectors between frozen LLMs and a frozen Stable Diffusion."""

__version__ = "0.1.0"

from sur_lightning.config import register_resolvers as _register_resolvers

# Config interpolations (${llm_pooling:...}, ${wandb_run_name:...}): registered before any config is composed.
_register_resolvers()
