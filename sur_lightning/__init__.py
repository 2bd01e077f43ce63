"""sur_lightning: train SUR-adapter and ELLA connectors between frozen LLMs and a frozen Stable Diffusion."""

__version__ = "0.1.0"
