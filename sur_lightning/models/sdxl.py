"""The frozen Stable Diffusion XL parts: UNet, VAE, two CLIP text encoders and tokenizers, noise scheduler.

Loads ``stabilityai/stable-diffusion-xl-base-1.0`` (a hub id or a local folder in its layout) with
``from_pretrained``, like ``StableDiffusionBackbone`` loads SD1.5. What SDXL adds to SD1.5's conditioning
(Podell et al., arXiv 2307.01952, and diffusers' SDXL pipeline and training script):

    tokens  [B, 77, 2048]  CLIP ViT-L's penultimate states [B,77,768] ‖ OpenCLIP bigG's penultimate [B,77,1280]
    pooled  [B, 1280]      bigG's projected pooled output (``text_embeds``)
    time_ids [B, 6]        (original height, width, crop top, crop left, target height, width)

The UNet reads the tokens through cross-attention and ``added_cond_kwargs={"text_embeds": pooled,
"time_ids": time_ids}`` through its time embedding. ``build_tiny_sdxl`` and ``build_random_sdxl`` write
random SDXL-shaped models in the same layout (tests, benchmarks), loaded through the same code.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from sur_lightning.models.backbone import (
    FrozenModule,
    load_pretrained,
    resolve_dtype,
    write_clip_tokenizer_files,
)
from sur_lightning.models.rng import keeps_global_rng


class StableDiffusionXLBackbone(FrozenModule):
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
        super().__init__()
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

        self.pretrained = str(pretrained)
        self.dtype = resolve_dtype(dtype)
        common = {"revision": revision}
        weights = {**common, "variant": variant, "torch_dtype": self.dtype}
        key = "backbone.pretrained"
        self.tokenizer = load_pretrained(CLIPTokenizer, self.pretrained, key, subfolder="tokenizer", **common)
        self.tokenizer_2 = load_pretrained(CLIPTokenizer, self.pretrained, key, subfolder="tokenizer_2", **common)
        self.noise_scheduler = load_pretrained(DDPMScheduler, self.pretrained, key, subfolder="scheduler", **common)
        self.text_encoder = load_pretrained(CLIPTextModel, self.pretrained, key, subfolder="text_encoder", **weights)
        self.text_encoder_2 = load_pretrained(
            CLIPTextModelWithProjection, self.pretrained, key, subfolder="text_encoder_2", **weights
        )
        if vae_pretrained:
            self.vae = load_pretrained(AutoencoderKL, str(vae_pretrained), "backbone.vae_pretrained", torch_dtype=self.dtype)
        else:
            self.vae = load_pretrained(AutoencoderKL, self.pretrained, key, subfolder="vae", **weights)
            if self.dtype == torch.float16 and self.vae.config.get("force_upcast", False):
                self.vae.to(torch.float32)
        self.unet = load_pretrained(UNet2DConditionModel, self.pretrained, key, subfolder="unet", **weights)
        if self.unet.config.addition_embed_type != "text_time":
            raise ValueError(
                f"{self.pretrained}: its UNet has addition_embed_type={self.unet.config.addition_embed_type!r}, not "
                "'text_time': this is not an SDXL model (use backbone=sd15 or a StableDiffusionBackbone)"
            )
        self.freeze()
        self.channels_last = channels_last
        if channels_last:
            self.unet.to(memory_format=torch.channels_last)
        if gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()
        if compile_unet:
            self.unet.compile()

    @property
    def cross_attention_dim(self) -> int:
        return int(self.unet.config.cross_attention_dim)

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
            ids = tokenizer(
                list(prompts), padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
            ).input_ids.to(self.device)
            out = encoder(ids, output_hidden_states=True)
            states.append(out.hidden_states[-2])
            pooled = out[0]  # the second encoder's text_embeds [B, P]: the one SDXL's UNet reads
        return torch.cat(states, dim=-1).float(), pooled.float()

    def encode_prompt(self, prompts: list[str]) -> torch.Tensor:
        return self.encode_text(prompts)[0]

    @torch.no_grad()
    def encode_images(self, pixel_values: torch.Tensor):
        self.check_vae_encoder()
        return self.vae.encode(pixel_values.to(self.device, self.vae.dtype)).latent_dist

    def scale_latents(self, latents: torch.Tensor) -> torch.Tensor:
        return latents.float() * self.vae.config.scaling_factor

    def time_ids(self, original_size: torch.Tensor, crop_top_left: torch.Tensor, target_size: tuple[int, int]) -> torch.Tensor:
        """[B, 6] SDXL's size and crop conditioning, in diffusers' order (original, crop, target)."""
        target = torch.as_tensor(target_size, dtype=torch.float32).expand(original_size.shape[0], 2)
        return torch.cat([original_size.float(), crop_top_left.float(), target.to(original_size.device)], dim=1).to(self.device)

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

    def predict(
        self,
        noisy_latents: torch.Tensor,
        timesteps: torch.Tensor,
        conditioning: torch.Tensor,
        pooled: torch.Tensor | None = None,
        time_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """UNet prediction; gradients flow to ``conditioning`` and ``pooled`` (the frozen weights get none)."""
        if pooled is None or time_ids is None:
            raise ValueError("the SDXL UNet needs the pooled embedding [B, P] and the time ids [B, 6] besides the tokens")
        if self.channels_last:
            noisy_latents = noisy_latents.to(memory_format=torch.channels_last)
        added = {"text_embeds": pooled.to(self.dtype), "time_ids": time_ids.to(self.device, self.dtype)}
        return self.unet(
            noisy_latents.to(self.dtype), timesteps, encoder_hidden_states=conditioning.to(self.dtype), added_cond_kwargs=added
        ).sample.float()

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


# --------------------------------------------------------------------------------------------
# Random SDXL-shaped models in the hub layout


def _text_encoders(first: tuple[int, int, int, int], second: tuple[int, int, int, int]):
    """CLIP ViT-L-like and OpenCLIP bigG-like encoders: (width, layers, heads, ff) each; the second projects."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    def config(width, layers, heads, ff, act):
        return CLIPTextConfig(
            vocab_size=49408, hidden_size=width, intermediate_size=ff, num_hidden_layers=layers, num_attention_heads=heads,
            max_position_embeddings=77, projection_dim=width, hidden_act=act,
            bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
        )

    # SDXL's ViT-L uses quick_gelu, bigG plain gelu, as in their hub configs.
    return CLIPTextModel(config(*first, "quick_gelu")), CLIPTextModelWithProjection(config(*second, "gelu"))


def save_sdxl(root: Path, unet, vae, text_encoder, text_encoder_2) -> None:
    """Save in SDXL base 1.0's layout: both tokenizers with the real CLIP vocabulary (the second pads with
    "!", as bigG's does), and SDXL's Euler scheduler config (training loads it as DDPM, as with the hub model)."""
    from diffusers import EulerDiscreteScheduler
    from transformers import CLIPTokenizer

    vocab = write_clip_tokenizer_files(root / "_tokenizer_src")
    files = (str(vocab / "vocab.json"), str(vocab / "merges.txt"))
    tokenizer = CLIPTokenizer(*files, model_max_length=77, pad_token="<|endoftext|>")
    tokenizer_2 = CLIPTokenizer(*files, model_max_length=77, pad_token="!")
    scheduler = EulerDiscreteScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        steps_offset=1, timestep_spacing="leading", interpolation_type="linear", prediction_type="epsilon",
    )
    assemble_sdxl_pipeline(vae, text_encoder, text_encoder_2, tokenizer, tokenizer_2, unet, scheduler).save_pretrained(root)


def _sdxl_unet(sample_size: int, blocks, layers, heads, cross_dim: int, pooled_dim: int, time_dim: int, groups: int = 32):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=sample_size,
        block_out_channels=blocks,
        down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (len(blocks) - 1),
        up_block_types=("CrossAttnUpBlock2D",) * (len(blocks) - 1) + ("UpBlock2D",),
        transformer_layers_per_block=layers,
        attention_head_dim=heads,
        cross_attention_dim=cross_dim,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=time_dim,
        projection_class_embeddings_input_dim=pooled_dim + 6 * time_dim,
        norm_num_groups=groups,
    )


@keeps_global_rng
def build_tiny_sdxl(root: str | Path, sample_size: int = 16, seed: int = 0) -> str:
    """Write a small random SDXL into ``root`` (once); return its path. For tests.

    The same classes, folders and conditioning as SDXL base 1.0 at toy widths: text encoders 16 and 32 wide
    (tokens 48 wide), pooled 32, time-id embedding 8; the VAE downsamples by 4 (64 px images, 16x16 latents).
    """
    from diffusers import AutoencoderKL

    root = Path(root)
    spec = {"kind": "sdxl_tiny", "sample_size": sample_size, "seed": seed}
    spec_file = root / "tiny_spec.json"
    if spec_file.exists() and json.loads(spec_file.read_text()) == spec:
        return str(root)
    torch.manual_seed(seed)
    text_encoder, text_encoder_2 = _text_encoders((16, 2, 2, 32), (32, 2, 2, 64))
    unet = _sdxl_unet(sample_size, (32, 64), (1, 1), (2, 4), cross_dim=48, pooled_dim=32, time_dim=8, groups=8)
    vae = AutoencoderKL(
        block_out_channels=(8, 16, 16), down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        layers_per_block=1, latent_channels=4, norm_num_groups=8, sample_size=sample_size * 4, scaling_factor=0.13025,
        force_upcast=True,
    )
    save_sdxl(root, unet, vae, text_encoder, text_encoder_2)
    spec_file.write_text(json.dumps(spec))
    return str(root)


@keeps_global_rng
def build_random_sdxl(root: str | Path, sample_size: int = 32, seed: int = 0) -> str:
    """Write a random SDXL base 1.0 of real proportions into ``root`` (once, float16); return its path. For
    benchmarks, which need the architecture's cost, not its weights: UNet (320, 640, 1280) with 1/2/10
    transformer layers, 2,567 M parameters; VAE 84 M; CLIP ViT-L (123 M) and bigG (695 M) text encoders.
    ``sample_size`` is the latent side (32: 256 px images; SDXL's native is 128, 1024 px).
    """
    from diffusers import AutoencoderKL

    root = Path(root)
    spec = {"kind": "sdxl_random", "sample_size": sample_size, "seed": seed}
    spec_file = root / "random_spec.json"
    if spec_file.exists() and json.loads(spec_file.read_text()) == spec:
        return str(root)
    torch.manual_seed(seed)
    text_encoder, text_encoder_2 = _text_encoders((768, 12, 12, 3072), (1280, 32, 20, 5120))
    unet = _sdxl_unet(sample_size, (320, 640, 1280), (1, 2, 10), (5, 10, 20), cross_dim=2048, pooled_dim=1280, time_dim=256)
    vae = AutoencoderKL(
        block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, latent_channels=4, sample_size=sample_size * 8,
        scaling_factor=0.13025, force_upcast=True,
    )
    save_sdxl(root, unet.half(), vae.half(), text_encoder.half(), text_encoder_2.half())
    spec_file.write_text(json.dumps(spec))
    return str(root)
