"""Training the text-conditioned PixelSNAIL prior on a code database (``+experiment=pixelsnail_toy``).

``PixelSNAILModule.training_step`` reads, in order::

    batch {codes [B, G, G] (from the code database: code_lmdb.CodeDataModule), simple prompt, id}
      -> frozen LLM (PromptStates: each distinct prompt encoded once):
         text_pooled [B, D] (mean of the real tokens), text_tokens [B, T, D], text_mask [B, T]
      -> caption dropout (the null caption, for classifier-free guidance), drawn from a generator keyed by
         (seed, global step)
      -> PixelSNAIL(codes, text) -> logits [B, K, G, G] -> cross-entropy = train/nll (nats per code)

Only the prior receives gradients. The LLM reads the same simple prompts the connectors read (the toy world's
adapter-train captions). Checkpoints hold the prior alone; ``export_pretrained(folder)`` writes the prior
(``prior/``) and a copy of the tokenizer it was trained on (``tokenizer/``), which
``generation/pixelsnail.py`` loads to draw images.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import lightning as L
import torch
from torch import nn

from sur_lightning.models.pixelsnail import PixelSNAIL, PromptStates
from sur_lightning.training.module import keyed_seed


class PixelSNAILModule(L.LightningModule):
    """prior: a ``PixelSNAIL`` or a partial taking ``pooled_dim`` and ``token_dim`` (the LLM's width, filled in
    here). llm: ``CausalLMFeatures`` giving token states (``llm=smollm2_tokens``). tokenizer: the folder of the
    ``LatentVQTokenizer`` whose codes the database holds (copied into every export). seed: the prior's initial
    weights and the caption-dropout draws."""

    def __init__(
        self,
        prior: PixelSNAIL | Callable[..., PixelSNAIL],
        llm: nn.Module,
        tokenizer: str,
        optimizer: Callable[..., torch.optim.Optimizer],
        lr_scheduler: Callable[..., torch.optim.lr_scheduler.LRScheduler] | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.text = PromptStates(llm)
        if not isinstance(prior, nn.Module):
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                prior = prior(pooled_dim=self.text.hidden_size, token_dim=self.text.hidden_size)
        self.prior = prior
        self.tokenizer = str(tokenizer)
        self.optimizer_factory = optimizer
        self.lr_scheduler_factory = lr_scheduler
        self.seed = seed
        # Checkpoints hold the prior only; the LLM comes back from its config.
        self.strict_loading = False

    def condition(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return tuple(t.to(self.device) for t in self.text(prompts))

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        codes = batch["codes"]
        text_pooled, text_tokens, text_mask = self.condition(batch["simple_prompt"])
        generator = torch.Generator().manual_seed(keyed_seed(self.seed, "caption_dropout", self.global_step))
        loss = self.prior.loss(codes, text_pooled, text_tokens, text_mask, generator=generator)
        self.log("train/nll", loss, prog_bar=True, batch_size=codes.shape[0])
        self.log("train/loss", loss, batch_size=codes.shape[0])
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        codes = batch["codes"]
        loss = self.prior.loss(codes, *self.condition(batch["simple_prompt"]))  # eval mode: no caption dropout
        self.log("val/nll", loss, prog_bar=True, batch_size=codes.shape[0], sync_dist=True)
        return loss

    def configure_optimizers(self):
        optimizer = self.optimizer_factory([p for p in self.prior.parameters() if p.requires_grad])
        if self.lr_scheduler_factory is None:
            return optimizer
        scheduler = self.lr_scheduler_factory(optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k.startswith("prior.")}

    def export_pretrained(self, folder: str | Path, trained_with: dict | None = None) -> Path:
        """``<folder>/prior/`` (config.json + weights), ``<folder>/tokenizer/`` (a copy of the tokenizer) and
        ``trained_with.json`` (``training_record``: the LLM it reads, which the sampler builds again)."""
        folder = Path(folder)
        self.prior.save_pretrained(str(folder / "prior"))
        shutil.copytree(self.tokenizer, folder / "tokenizer", dirs_exist_ok=True)
        (folder / "trained_with.json").write_text(json.dumps(trained_with or {}, indent=2))
        return folder
