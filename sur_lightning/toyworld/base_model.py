"""The toy world's base model, part by part: a VAE (x4: 64 px -> 4x16x16 latents), a CLIP text encoder on the real
CLIP tokenizer, a small UNet and SD1.5's scheduler config. ``pretrain`` trains them and exports them in Stable
Diffusion's folder layout (``WEIGHT_FILES``), through ``sur_lightning.models.backbone.assemble_pipeline``.
"""

from __future__ import annotations

from pathlib import Path

from sur_lightning.toyworld.world import IMAGE_SIZE

# SD1.5's scheduler_config.json, clip_sample=false included: DDIM/DDPM built with the library's default
# clip x0 to [-1, 1], which in latent space turns every sample yellow-orange.
SD15_SCHEDULER = {
    "_class_name": "PNDMScheduler",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
}


WEIGHT_FILES = (
    "text_encoder/model.safetensors",
    "unet/diffusion_pytorch_model.safetensors",
    "vae/diffusion_pytorch_model.safetensors",
)


def build_vae(block_out_channels=(16, 32, 64), latent_channels: int = 4, norm_num_groups: int = 8):
    """``AutoencoderKL`` downsampling by 2^(len(blocks) - 1): x4 with three blocks."""
    from diffusers import AutoencoderKL

    blocks = len(block_out_channels)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=latent_channels,
        block_out_channels=tuple(block_out_channels),
        down_block_types=("DownEncoderBlock2D",) * blocks,
        up_block_types=("UpDecoderBlock2D",) * blocks,
        layers_per_block=1,
        norm_num_groups=norm_num_groups,
        sample_size=IMAGE_SIZE,
    )


def build_text_encoder(hidden_size: int = 128, num_layers: int = 2, num_heads: int = 4):
    """A ``CLIPTextModel`` over CLIP's 49,408-token vocabulary, 77 positions."""
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(
        CLIPTextConfig(
            vocab_size=49408,
            hidden_size=hidden_size,
            intermediate_size=4 * hidden_size,
            num_hidden_layers=num_layers,
            num_attention_heads=num_heads,
            max_position_embeddings=77,
            projection_dim=hidden_size,
            bos_token_id=49406,
            eos_token_id=49407,
            pad_token_id=49407,
        )
    )


def build_unet(
    block_out_channels=(32, 64),
    cross_attention_dim: int = 128,
    num_heads: int = 4,
    layers_per_block: int = 1,
    text_time_embedding: bool = True,
    sample_size: int = IMAGE_SIZE // 4,
):
    """``UNet2DConditionModel`` with cross-attention at every resolution (the 16² latents included:
    with cross-attention only at 8² the conditioning is lost). ``text_time_embedding`` adds an
    attention-pooled summary of ``encoder_hidden_states`` to the timestep embedding
    (``addition_embed_type="text"``), a global path for attributes such as colour; a connector's output
    reaches the UNet through both paths, exactly like the prompt's."""
    from diffusers import UNet2DConditionModel

    blocks = len(block_out_channels)
    extra = {"addition_embed_type": "text", "addition_embed_type_num_heads": num_heads} if text_time_embedding else {}
    return UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
        block_out_channels=tuple(block_out_channels),
        layers_per_block=layers_per_block,
        down_block_types=("CrossAttnDownBlock2D",) * blocks,
        up_block_types=("CrossAttnUpBlock2D",) * blocks,
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=num_heads,  # diffusers' SD configs name the number of heads so
        norm_num_groups=8,
        **extra,
    )


def build_tokenizer(folder: Path):
    from transformers import CLIPTokenizer

    from sur_lightning.models.backbone import write_clip_tokenizer_files

    files = write_clip_tokenizer_files(folder)
    return CLIPTokenizer(
        str(files / "vocab.json"), str(files / "merges.txt"), model_max_length=77, pad_token="<|endoftext|>"
    )
