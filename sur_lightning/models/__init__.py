"""The models: the frozen parts and the trainable connectors.

``backbone`` (Stable Diffusion: UNet, VAE, CLIP text encoder, tokenizer, schedulers, loaded through the same
``from_pretrained`` code as the hub model) and ``sdxl`` (its subclass for SDXL), ``llm`` (frozen causal LMs and
T5 encoders as feature extractors, several teachers at once), ``sentence`` (sentence encoders), ``random_models``
(the tiny and random models built from configs, for tests, the demo and benchmarks), ``eta`` (SUR's mixing weight)
and ``connectors/`` (SUR-adapter, ELLA's TSC, saving and loading them).

May import: nothing else of sur_lightning. Everything above imports it.
"""
