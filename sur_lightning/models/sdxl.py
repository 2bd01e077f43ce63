"""The frozen Stable Diffusion XL parts: UNet, VAE, two CLIP text encoders and tokenizers, noise scheduler.

Loads ``stabilityai/stable-diffusion-xl-base-1.0`` (a hub id or a local folder in its layout) with
``from_pretrained``, through ``StableDiffusionBackbone``'s code (its subclass). What SDXL adds to SD1.5's
conditioning (Podell et al., arXiv 2307.01952, and diffusers' SDXL pipeline and training script):

    tokens  [B, 77, 2048]  CLIP ViT-L's penultimate states [B,77,768] ‖ OpenCLIP bigG's penultimate [B,77,1280]
    pooled  [B, 1280]      bigG's projected pooled output (``text_embeds``)
    time_ids [B, 6]        (original height, width, crop top, crop left, target height, width)

The UNet reads the tokens through cross-attention and ``added_cond_kwargs={"text_embeds": pooled,
"time_ids": time_ids}`` through its time embedding. ``random_models.build_tiny_sdxl`` and ``build_random_sdxl``
write random SDXL-shaped models in the same layout (tests, benchmarks), loaded through the same code.
"""

from __future__ import annotations

import torch

from sur_lightning.models.backbone import StableDiffusionBackbone, load_pretrained


class StableDiffusionXLBackbone(StableDiffusionBackbone):
    """Frozen SDXL components, always in eval mode, stored in ``dtype``.

    encode_text(list[str])   -> (tokens [B, 77, d1+d2] float32, pooled [B, P] float32)
    encode_prompt(list[str]) -> tokens [B, 77, d1+d2]   (the ``cross_attention_dim``, 2048 for SDXL)
    encode_images([B,3,H,W] in [-1,1]) -> posterior over [B, 4, H/8, W/8] latents
    time_ids(original_size [B,2], crop_top_left [B,2], target_size (h, w)) -> [B, 6]
    predict(noisy [B,4,h,w], t [B], tokens [B,N,d], pooled [B,P], time_ids [B,6]) -> [B,4,h,w] float32

    ``vae_pretrained``: another VAE to decode and encode with, e.g. ``madebyollin/sdxl-fp16-fix`` (SDXL's own
    VAE overflows in float16; this one does not). Without it, a float16 backbone keeps the VAE in float32,
    as diffusers' ``force_upcast`` does.
    """

    micro_conditioning = True

    def __init__(
        self,
        pretrained: str,
        revision: str | None = None,
        variant: str | None = None,
        dtype: str = "float32",
        vae_pretrained: str | None = None,
        channels_last: bool = False,
        gradient_checkpointing: bool = False,
        compile_unet: bool = False,
    ) -> None:
        # Set before the base class's __init__, which loads the components (``load_vae`` reads it).
        self.vae_pretrained = None if vae_pretrained is None else str(vae_pretrained)
        super().__init__(pretrained, revision, variant, dtype, channels_last, gradient_checkpointing, compile_unet)

    def load_components(self) -> None:
        """SD's components (tokenizer, scheduler, CLIP ViT-L, VAE, UNet), then the second tokenizer and bigG."""
        from transformers import CLIPTextModelWithProjection, CLIPTokenizer

        super().load_components()
        if self.unet.config.addition_embed_type != "text_time":
            raise ValueError(
                f"{self.pretrained}: its UNet has addition_embed_type={self.unet.config.addition_embed_type!r}, not "
                "'text_time': this is not an SDXL model (use backbone=sd15 or a StableDiffusionBackbone)"
            )
        self.tokenizer_2 = self.load(CLIPTokenizer, "tokenizer_2", weights=False)
        self.text_encoder_2 = self.load(CLIPTextModelWithProjection, "text_encoder_2")

    def load_vae(self):
        from diffusers import AutoencoderKL

        if self.vae_pretrained:
            return load_pretrained(
                AutoencoderKL, self.vae_pretrained, "backbone.vae_pretrained", torch_dtype=self.dtype
            )
        vae = super().load_vae()
        if self.dtype == torch.float16 and vae.config.get("force_upcast", False):
            vae.to(torch.float32)
        return vae

    @property
    def pooled_dim(self) -> int:
        """The width of the pooled embedding the UNet's ``text_embeds`` takes (1280 for SDXL)."""
        return int(self.text_encoder_2.config.projection_dim)

    @torch.no_grad()
    def encode_text(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Both encoders' penultimate states concatenated, and the second encoder's projected pooled output,
        exactly as ``StableDiffusionXLPipeline.encode_prompt`` computes them (clip_skip=None)."""
        states = []
        pooled = None
        for tokenizer, encoder in ((self.tokenizer, self.text_encoder), (self.tokenizer_2, self.text_encoder_2)):
            out = encoder(self.tokenize(prompts, tokenizer), output_hidden_states=True)
            states.append(out.hidden_states[-2])
            pooled = out[0]  # the second encoder's text_embeds [B, P]: the one SDXL's UNet reads
        return torch.cat(states, dim=-1).float(), pooled.float()

    def encode_prompt(self, prompts: list[str]) -> torch.Tensor:
        return self.encode_text(prompts)[0]

    def time_ids(
        self, original_size: torch.Tensor, crop_top_left: torch.Tensor, target_size: tuple[int, int]
    ) -> torch.Tensor:
        """[B, 6] SDXL's size and crop conditioning, in diffusers' order (original, crop, target)."""
        target = torch.as_tensor(target_size, dtype=torch.float32).expand(original_size.shape[0], 2)
        return torch.cat([original_size.float(), crop_top_left.float(), target.to(original_size.device)], dim=1).to(
            self.device
        )

    def batch_time_ids(self, batch: dict, latents: torch.Tensor) -> torch.Tensor:
        """The time ids of a training batch: each image's size before resizing and its crop, read from the batch
        (``original_size``, ``crop_top_left`` [B, 2]: the datamodule records them, the feature cache stores them)."""
        if "original_size" not in batch or "crop_top_left" not in batch:
            raise KeyError(
                "SDXL's micro-conditioning needs each image's original_size and crop_top_left in the batch; this "
                "feature cache was built without them (a cache made for an SD1.5 backbone?): rebuild it with data.cache=auto"
            )
        factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        target = (latents.shape[-2] * factor, latents.shape[-1] * factor)
        return self.time_ids(batch["original_size"], batch["crop_top_left"], target)

    def added_conditioning(self, pooled: torch.Tensor | None, time_ids: torch.Tensor | None) -> dict:
        """The pooled embedding and the time ids, through the UNet's time embedding (gradients reach ``pooled``)."""
        if pooled is None or time_ids is None:
            raise ValueError(
                "the SDXL UNet needs the pooled embedding [B, P] and the time ids [B, 6] besides the tokens"
            )
        return {
            "added_cond_kwargs": {
                "text_embeds": pooled.to(self.dtype),
                "time_ids": time_ids.to(self.device, self.dtype),
            }
        }

    def assemble_pipeline(self, scheduler):
        """A ``StableDiffusionXLPipeline`` over these components (no copies, no watermarker)."""
        return assemble_sdxl_pipeline(
            self.vae, self.text_encoder, self.text_encoder_2, self.tokenizer, self.tokenizer_2, self.unet, scheduler
        )


def assemble_sdxl_pipeline(vae, text_encoder, text_encoder_2, tokenizer, tokenizer_2, unet, scheduler):
    from diffusers import StableDiffusionXLPipeline

    return StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=scheduler,
        force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )
