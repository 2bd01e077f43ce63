"""Random-weight models in the hub's folder layouts, built from configs: tiny ones for the tests and the demo,
ones of real proportions for benchmarks (no real weights ship offline; a benchmark needs the architecture's cost).

Each builder writes its folder once (a second call with the same arguments returns it at once) and marks it with
a spec file (``RANDOM_MODEL_SPECS``); the production loaders then read it like a hub model:

    build_tiny_stable_diffusion    SD1.5's classes and layout at toy widths     (backbone=tiny)
    build_random_stable_diffusion  SD1.5's proportions, or a mid-size design    (backbone=sd15_random, mid_random)
    build_tiny_sdxl                SDXL base 1.0's classes and layout, toy widths (backbone=sdxl_tiny)
    build_random_sdxl              SDXL base 1.0's proportions                   (backbone=sdxl_random)
    build_tiny_causal_lm           a small LLaMA with the CLIP tokenizer         (llm=tiny)
    build_tiny_t5_encoder          a small T5 encoder with the CLIP tokenizer    (llm=t5_tiny)
    build_tiny_bert                a small BERT with MiniLM's tokenizer          (the retriever's tests)
    build_tiny_clip_vision         a small CLIP vision model with projection     (+experiment=unclip_sd21 tests)
    build_tiny_stable_unclip       StableUnCLIPPipeline's classes and layout      (+experiment=unclip_sd21_clip tests)

Every builder keeps the global generator as it was (``rng.keeps_global_rng``), so a run's connector starts from
the same weights whether the model was built before or now.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from sur_lightning.models.backbone import assemble_pipeline, write_clip_tokenizer_files
from sur_lightning.models.rng import keeps_global_rng
from sur_lightning.models.sdxl import assemble_sdxl_pipeline
from sur_lightning.models.sentence import minilm_path

# The spec file each builder writes into the folder it fills: it marks a random test model.
RANDOM_MODEL_SPECS = ("tiny_spec.json", "random_spec.json")


def is_random_test_model(pretrained: str | Path) -> bool:
    """Whether ``pretrained`` is a folder written by one of the random-weight builders (backbone=tiny, sdxl_tiny,
    sd15_random, mid_random, sdxl_random): its images are noise by construction. False for hub ids and real
    or trained folders (the toy world's base)."""
    return any((Path(pretrained) / name).is_file() for name in RANDOM_MODEL_SPECS)


def built_before(spec_file: Path, spec: dict) -> bool:
    """Whether ``spec_file`` records ``spec``: the folder already holds this very model."""
    return spec_file.exists() and json.loads(spec_file.read_text()) == spec


def clip_tokenizer(root: Path, pad_token: str = "<|endoftext|>", **kwargs):
    """The real CLIP BPE tokenizer (49,408 tokens), its files written into ``root/_tokenizer_src``."""
    from transformers import CLIPTokenizer

    files = write_clip_tokenizer_files(root / "_tokenizer_src")
    return CLIPTokenizer(str(files / "vocab.json"), str(files / "merges.txt"), pad_token=pad_token, **kwargs)


def clip_text_config(width: int, layers: int, heads: int, ff: int, act: str = "quick_gelu"):
    """A CLIP text encoder's config over CLIP's vocabulary and 77 positions (``act``: ViT-L's quick_gelu by default)."""
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=49408,
        hidden_size=width,
        intermediate_size=ff,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        max_position_embeddings=77,
        projection_dim=width,
        hidden_act=act,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
    )


# --------------------------------------------------------------------------------------------
# Stable Diffusion 1.5's layout


def tiny_unet(sample_size: int, width: int, cross_attention_dim: int, **extra):
    """A 2-level UNet of ``width``/2·``width`` channels, cross-attention in its outer level; ``extra``: more of
    ``UNet2DConditionModel``'s arguments (unCLIP's class embedding)."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
        block_out_channels=(width, 2 * width),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=4,
        norm_num_groups=8,
        **extra,
    )


def tiny_vae(sample_size: int):
    """A 3-level VAE of 8/16/16 channels (latents at 1/4 of the image side, the toy base's layout)."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=(8, 16, 16),
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        layers_per_block=1,
        norm_num_groups=8,
        sample_size=sample_size * 4,
    )


@keeps_global_rng
def build_tiny_stable_diffusion(
    root: str | Path,
    width: int = 32,
    text_dim: int = 32,
    text_layers: int = 2,
    sample_size: int = 16,
    seed: int = 0,
) -> str:
    """Write a small random Stable Diffusion in the diffusers layout into ``root`` (once); return its path.

    Same classes and file layout as ``stable-diffusion-v1-5``: model_index.json, unet/, vae/,
    text_encoder/, tokenizer/ (real CLIP vocabulary), scheduler/ (SD1.5's DDPM settings).
    The VAE downsamples by 4, so 64 px images give 16x16 latents.
    """
    from transformers import CLIPTextModel

    root = Path(root)
    spec = {"width": width, "text_dim": text_dim, "text_layers": text_layers, "sample_size": sample_size, "seed": seed}
    if built_before(root / "tiny_spec.json", spec):
        return str(root)

    torch.manual_seed(seed)
    unet = tiny_unet(sample_size, width, text_dim)
    vae = tiny_vae(sample_size)
    text_encoder = CLIPTextModel(clip_text_config(text_dim, text_layers, heads=2, ff=2 * text_dim))
    save_stable_diffusion(root, unet, vae, text_encoder)
    (root / "tiny_spec.json").write_text(json.dumps(spec))
    return str(root)


@keeps_global_rng
def build_random_stable_diffusion(root: str | Path, shape: str = "sd15", sample_size: int = 32, seed: int = 0) -> str:
    """Write a random Stable Diffusion of real proportions into ``root`` (once, fp16); return its path. For
    benchmarks, which need the cost of the real architecture, not its weights (none ship offline):

    ``sd15``: SD1.5's UNet (320-640-1280-1280, 860 M), VAE (83 M) and CLIP ViT-L/14 text encoder (123 M);
    ``mid``:  the same design at (64, 128, 256), 2 blocks, a 256-wide 4-layer text encoder.
    ``sample_size`` is the latent side (32: 256 px images).
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    shapes = {
        "sd15": {
            "blocks": (320, 640, 1280, 1280),
            "text": (768, 12, 12, 3072),
            "vae": (128, 256, 512, 512),
            "heads": 8,
        },
        "mid": {"blocks": (64, 128, 256), "text": (256, 4, 4, 1024), "vae": (32, 64, 128), "heads": 4},
    }
    if shape not in shapes:
        raise ValueError(f"backbone shape must be one of {sorted(shapes)}, got {shape!r}")
    root = Path(root)
    spec = {"shape": shape, "sample_size": sample_size, "seed": seed}
    if built_before(root / "random_spec.json", spec):
        return str(root)
    size = shapes[shape]
    blocks, text = size["blocks"], size["text"]
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=sample_size,
        block_out_channels=blocks,
        down_block_types=("CrossAttnDownBlock2D",) * (len(blocks) - 1) + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (len(blocks) - 1),
        cross_attention_dim=text[0],
        attention_head_dim=size["heads"],
    )
    vae = AutoencoderKL(
        block_out_channels=size["vae"],
        down_block_types=("DownEncoderBlock2D",) * len(size["vae"]),
        up_block_types=("UpDecoderBlock2D",) * len(size["vae"]),
        layers_per_block=2,
        latent_channels=4,
        sample_size=sample_size * 2 ** (len(size["vae"]) - 1),
    )
    text_encoder = CLIPTextModel(clip_text_config(*text))
    save_stable_diffusion(root, unet.half(), vae.half(), text_encoder.half())
    (root / "random_spec.json").write_text(json.dumps(spec))
    return str(root)


def save_stable_diffusion(root: Path, unet, vae, text_encoder) -> None:
    """Save models in SD1.5's folder layout, with the real CLIP tokenizer and SD1.5's scheduler config."""
    from diffusers import PNDMScheduler

    tokenizer = clip_tokenizer(root, model_max_length=77)
    # SD1.5 ships a PNDM config; training loads it as DDPM, exactly as with the hub model.
    scheduler = PNDMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        set_alpha_to_one=False,
        skip_prk_steps=True,
        steps_offset=1,
        prediction_type="epsilon",
    )
    assemble_pipeline(vae, text_encoder, tokenizer, unet, scheduler).save_pretrained(root)


# --------------------------------------------------------------------------------------------
# SDXL base 1.0's layout


def sdxl_text_encoders(first: tuple[int, int, int, int], second: tuple[int, int, int, int]):
    """CLIP ViT-L-like and OpenCLIP bigG-like encoders: (width, layers, heads, ff) each; the second projects."""
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    # SDXL's ViT-L uses quick_gelu, bigG plain gelu, as in their hub configs.
    return CLIPTextModel(clip_text_config(*first, "quick_gelu")), CLIPTextModelWithProjection(
        clip_text_config(*second, "gelu")
    )


def sdxl_unet(
    sample_size: int, blocks, layers, heads, cross_dim: int, pooled_dim: int, time_dim: int, groups: int = 32
):
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


def save_sdxl(root: Path, unet, vae, text_encoder, text_encoder_2) -> None:
    """Save in SDXL base 1.0's layout: both tokenizers with the real CLIP vocabulary (the second pads with
    "!", as bigG's does), and SDXL's Euler scheduler config (training loads it as DDPM, as with the hub model)."""
    from diffusers import EulerDiscreteScheduler

    tokenizer = clip_tokenizer(root, model_max_length=77)
    tokenizer_2 = clip_tokenizer(root, pad_token="!", model_max_length=77)
    scheduler = EulerDiscreteScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        steps_offset=1,
        timestep_spacing="leading",
        interpolation_type="linear",
        prediction_type="epsilon",
    )
    assemble_sdxl_pipeline(vae, text_encoder, text_encoder_2, tokenizer, tokenizer_2, unet, scheduler).save_pretrained(
        root
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
    if built_before(root / "tiny_spec.json", spec):
        return str(root)
    torch.manual_seed(seed)
    text_encoder, text_encoder_2 = sdxl_text_encoders((16, 2, 2, 32), (32, 2, 2, 64))
    unet = sdxl_unet(sample_size, (32, 64), (1, 1), (2, 4), cross_dim=48, pooled_dim=32, time_dim=8, groups=8)
    vae = AutoencoderKL(
        block_out_channels=(8, 16, 16),
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=sample_size * 4,
        scaling_factor=0.13025,
        force_upcast=True,
    )
    save_sdxl(root, unet, vae, text_encoder, text_encoder_2)
    (root / "tiny_spec.json").write_text(json.dumps(spec))
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
    if built_before(root / "random_spec.json", spec):
        return str(root)
    torch.manual_seed(seed)
    text_encoder, text_encoder_2 = sdxl_text_encoders((768, 12, 12, 3072), (1280, 32, 20, 5120))
    unet = sdxl_unet(
        sample_size, (320, 640, 1280), (1, 2, 10), (5, 10, 20), cross_dim=2048, pooled_dim=1280, time_dim=256
    )
    vae = AutoencoderKL(
        block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=2,
        latent_channels=4,
        sample_size=sample_size * 8,
        scaling_factor=0.13025,
        force_upcast=True,
    )
    save_sdxl(root, unet.half(), vae.half(), text_encoder.half(), text_encoder_2.half())
    (root / "random_spec.json").write_text(json.dumps(spec))
    return str(root)


# --------------------------------------------------------------------------------------------
# Text models: a causal LM, a T5 encoder, a BERT sentence encoder


@keeps_global_rng
def build_tiny_causal_lm(root: str | Path, hidden_size: int = 32, num_layers: int = 2, seed: int = 0) -> str:
    """Write a small random LLaMA (with the CLIP BPE tokenizer) into ``root`` (once); return its path.

    For tests and quick config checks: it loads through ``CausalLMFeatures`` exactly like a hub LLM.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    root = Path(root)
    spec = {"hidden_size": hidden_size, "num_layers": num_layers, "seed": seed}
    if built_before(root / "tiny_spec.json", spec):
        return str(root)
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=49408,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
    )
    LlamaForCausalLM(config).save_pretrained(root)
    clip_tokenizer(root).save_pretrained(root)
    (root / "tiny_spec.json").write_text(json.dumps(spec))
    return str(root)


@keeps_global_rng
def build_tiny_t5_encoder(root: str | Path, d_model: int = 32, num_layers: int = 2, seed: int = 0) -> str:
    """Write a small random T5 encoder into ``root`` (once) in the hub layout; return its path.

    For tests and offline config checks: it loads through ``T5EncoderFeatures`` exactly like
    ``google/flan-t5-xl``. No T5 SentencePiece vocabulary ships offline, so it uses the CLIP BPE
    tokenizer (real vocabulary, 49,408 tokens); T5's own tokenizer comes with the hub model.
    """
    from transformers import T5Config, T5EncoderModel

    root = Path(root)
    spec = {"d_model": d_model, "num_layers": num_layers, "seed": seed}
    if built_before(root / "tiny_spec.json", spec):
        return str(root)
    torch.manual_seed(seed)
    config = T5Config(
        vocab_size=49408,
        d_model=d_model,
        d_kv=d_model // 4,
        d_ff=2 * d_model,
        num_layers=num_layers,
        num_heads=4,
        feed_forward_proj="gated-gelu",  # as flan-t5 (T5 v1.1)
        is_encoder_decoder=False,
        use_cache=False,
        pad_token_id=49407,
        eos_token_id=49407,
    )
    T5EncoderModel(config).save_pretrained(root)
    clip_tokenizer(root).save_pretrained(root)
    (root / "tiny_spec.json").write_text(json.dumps(spec))
    return str(root)


@keeps_global_rng
def build_tiny_bert(root: str | Path, hidden_size: int = 32, num_layers: int = 2, seed: int = 0) -> str:
    """Write a small random BERT encoder with all-MiniLM-L6-v2's WordPiece tokenizer into ``root`` (once); return its path.

    For tests: it loads through ``SentenceEncoderFeatures`` exactly like a hub encoder, in a fraction of MiniLM's time.
    """
    from transformers import AutoTokenizer, BertConfig, BertModel

    root = Path(root)
    spec = {"hidden_size": hidden_size, "num_layers": num_layers, "seed": seed}
    if built_before(root / "tiny_spec.json", spec):
        return str(root)
    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=2,
        intermediate_size=2 * hidden_size,
        max_position_embeddings=512,
    )
    BertModel(config).save_pretrained(root)
    tokenizer.save_pretrained(root)
    (root / "tiny_spec.json").write_text(json.dumps(spec))
    return str(root)


@keeps_global_rng
def build_random_causal_lm_like(root: str | Path, like: str | Path, seed: int = 0) -> str:
    """Write a causal LM of ``like``'s architecture and tokenizer with freshly initialised weights into ``root``
    (once); return its path.

    The control of the text-encoder ablation (``llm=smollm2_random``): the same shape, width and tokens as the
    real model, none of what it learned, so a gain that survives it is parameters, not knowledge.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    root = Path(root)
    spec = {"like": str(like), "seed": seed}
    if built_before(root / "random_spec.json", spec):
        return str(root)
    torch.manual_seed(seed)
    config = AutoConfig.from_pretrained(like)
    AutoModelForCausalLM.from_config(config).save_pretrained(root)
    AutoTokenizer.from_pretrained(like).save_pretrained(root)
    (root / "random_spec.json").write_text(json.dumps(spec))
    return str(root)


@keeps_global_rng
def build_tiny_clip_vision(root: str | Path, hidden_size: int = 32, projection_dim: int = 16, seed: int = 0) -> str:
    """Write a small random ``CLIPVisionModelWithProjection`` (32 px, patch 8) into ``root`` (once); return its path.

    For tests of the real-model unCLIP prior (``+experiment=unclip_sd21``): it loads through
    ``models.image_tower.ClipVisionTower`` exactly like ``openai/clip-vit-large-patch14``.
    """
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    root = Path(root)
    spec = {"hidden_size": hidden_size, "projection_dim": projection_dim, "seed": seed}
    if built_before(root / "tiny_spec.json", spec):
        return str(root)
    torch.manual_seed(seed)
    config = CLIPVisionConfig(
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=32,
        patch_size=8,
        projection_dim=projection_dim,
    )
    CLIPVisionModelWithProjection(config).save_pretrained(root)
    (root / "tiny_spec.json").write_text(json.dumps(spec))
    return str(root)


@keeps_global_rng
def build_tiny_stable_unclip(root: str | Path, embedding_dim: int = 32, sample_size: int = 8, seed: int = 0) -> str:
    """Write a small random ``StableUnCLIPPipeline`` into ``root`` (once); return its path.

    The classes and folders of ``stabilityai/stable-diffusion-2-1-unclip-small``: prior_tokenizer/ and tokenizer/
    (the real CLIP vocabulary), prior_text_encoder/ (``CLIPTextModelWithProjection``, hidden and projection width
    ``embedding_dim``, as ViT-L/14's 768 and 768), prior/ (a random ``PriorTransformer`` over 77 tokens),
    prior_scheduler/ (the stock one: DDPM, squared cosine, predicting the sample, x_0 clipped to ±5),
    image_normalizer/, image_noising_scheduler/, text_encoder/ (``CLIPTextModel``), unet/ (class_embed_type
    "projection" reading the noised image embedding and its noise level, 2 * ``embedding_dim``), scheduler/
    (DDIM, v-prediction) and vae/. The VAE downsamples by 4: ``sample_size`` 8 draws 32 px images.
    """
    from diffusers import (
        DDIMScheduler,
        DDPMScheduler,
        PriorTransformer,
        StableUnCLIPPipeline,
    )
    from diffusers.pipelines.stable_diffusion.stable_unclip_image_normalizer import StableUnCLIPImageNormalizer
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    root = Path(root)
    spec = {"embedding_dim": embedding_dim, "sample_size": sample_size, "seed": seed}
    if built_before(root / "tiny_spec.json", spec):
        return str(root)
    torch.manual_seed(seed)
    width = embedding_dim
    tokenizer = clip_tokenizer(root, model_max_length=77)
    pipeline = StableUnCLIPPipeline(
        prior_tokenizer=tokenizer,
        prior_text_encoder=CLIPTextModelWithProjection(clip_text_config(width, 2, heads=2, ff=2 * width)),
        prior=PriorTransformer(
            num_attention_heads=2, attention_head_dim=8, num_layers=1, embedding_dim=embedding_dim, num_embeddings=77
        ),
        prior_scheduler=DDPMScheduler(
            num_train_timesteps=1000,
            beta_schedule="squaredcos_cap_v2",
            prediction_type="sample",
            variance_type="fixed_small_log",
            clip_sample=True,
            clip_sample_range=5.0,
        ),
        image_normalizer=StableUnCLIPImageNormalizer(embedding_dim=embedding_dim),
        image_noising_scheduler=DDPMScheduler(beta_schedule="squaredcos_cap_v2"),
        tokenizer=tokenizer,
        text_encoder=CLIPTextModel(clip_text_config(width, 2, heads=2, ff=2 * width)),
        unet=tiny_unet(
            sample_size,
            width,
            width,
            class_embed_type="projection",
            projection_class_embeddings_input_dim=2 * embedding_dim,
        ),
        scheduler=DDIMScheduler(
            beta_schedule="scaled_linear",
            beta_start=0.00085,
            beta_end=0.012,
            prediction_type="v_prediction",
            set_alpha_to_one=False,
            steps_offset=1,
        ),
        vae=tiny_vae(sample_size),
    )
    pipeline.save_pretrained(root)
    (root / "tiny_spec.json").write_text(json.dumps(spec))
    return str(root)
