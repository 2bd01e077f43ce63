"""The VQ + PixelSNAIL generator end to end on tiny models: +experiment=vqvae_toy fits and resumes a codebook,
+experiment=pixelsnail_toy extracts codes and trains a prior whose loss falls and which resumes, and its export
renders as a column of the requested size and number."""

import json
import math
from pathlib import Path

import pytest
import torch

from sur_lightning.models.pixelsnail import PixelSNAIL
from sur_lightning.train import train

ROOT = Path(__file__).resolve().parents[2]
CONFIG_DIR = str(ROOT / "conf")


def compose(*overrides: str):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return hydra_compose(config_name="train", overrides=list(overrides))


def common(root: Path, cache: Path, run: str) -> list[str]:
    return [
        "threads=1",
        "logger=csv",
        f"paths.root_dir={root}",
        f"paths.cache_dir={cache}",
        f"paths.output_dir={root}/{run}",
        "callbacks.progress_bar=null",
    ]


def vqvae(root: Path, cache: Path, tiny_sd: str, *extra: str):
    return compose(
        "+experiment=vqvae_toy",
        *common(root, cache, "vq"),
        f"backbone.pretrained={tiny_sd}",
        "data=synthetic",
        "data.root.num_images=12",
        "data.resolution=32",
        "data.batch_size=4",
        "data.val_size=4",
        "model.tokenizer.codebook_size=8",
        "trainer.max_steps=2",
        "trainer.val_check_interval=2",
        "callbacks.model_checkpoint.every_n_train_steps=2",
        *extra,
    )


@pytest.fixture(scope="module")
def tokenizer_run(tmp_path_factory, cache_dir, tiny_sd):
    root = tmp_path_factory.mktemp("vq")
    metrics = train(vqvae(root, cache_dir, tiny_sd))
    return root, metrics


def test_both_experiments_compose_with_their_modules():
    assert compose("+experiment=vqvae_toy").model._target_.endswith("VQTokenizerModule")
    cfg = compose("+experiment=pixelsnail_toy")
    assert cfg.model._target_.endswith("PixelSNAILModule") and cfg.data._target_.endswith("CodeDataModule")
    assert cfg.llm.pooling == "none" and cfg.get("connector") is None


def test_vqvae_fits_exports_and_resumes(tokenizer_run, cache_dir, tiny_sd):
    from sur_lightning.models.vq_tokenizer import LatentVQTokenizer

    root, metrics = tokenizer_run
    assert "val/mse" in metrics and math.isfinite(metrics["val/psnr"])  # a random tiny VAE: no quality to expect
    first = LatentVQTokenizer.from_pretrained(root / "vq" / "tokenizer")
    assert first.fitted and first.codebook_size == 8
    checkpoint = torch.load(root / "vq" / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["state_dict"] and all(k.startswith("tokenizer.quantizer.") for k in checkpoint["state_dict"])
    # Resume in place two more steps: the codebook goes on from the checkpoint's, not a fresh k-means.
    cfg = vqvae(root, cache_dir, tiny_sd, "trainer.max_steps=4", f"ckpt_path={root / 'vq'}")
    train(cfg)
    steps = [json.loads(line)["step"] for line in (root / "vq" / "exports.jsonl").read_text().splitlines()]
    assert steps == [2, 4]
    assert LatentVQTokenizer.from_pretrained(root / "vq" / "tokenizer").fitted


def pixelsnail(root: Path, cache: Path, tiny_llm: str, tokenizer: Path, *extra: str):
    return compose(
        "+experiment=pixelsnail_toy",
        *common(root, cache, "prior"),
        "llm=tiny",
        "llm.pooling=none",
        f"llm.pretrained={tiny_llm}",
        f"data.tokenizer={tokenizer}",
        f"data.out={root}/codes",
        "data.batch_size=4",
        "data.val_size=4",
        "data.resolution=32",
        "model.prior.codebook_size=8",
        "model.prior.grid_size=8",
        "model.prior.channels=16",
        "model.prior.dropout=0.0",
        "model.optimizer.lr=1e-2",
        "model.lr_scheduler.num_warmup_steps=0",
        "trainer.max_steps=12",
        "trainer.val_check_interval=4",
        "callbacks.model_checkpoint.every_n_train_steps=4",
        "callbacks.model_export.at_steps=[4]",
        *extra,
    )


def test_pixelsnail_trains_on_extracted_codes_resumes_and_renders_a_column(
    tokenizer_run, cache_dir, tiny_llm, tmp_path, backbone
):
    from sur_lightning.data.prompt_suites import Prompt
    from sur_lightning.generation.columns import sampler_columns
    from sur_lightning.generation.pipeline import render_columns

    vq_root, _ = tokenizer_run
    tokenizer = vq_root / "vq" / "tokenizer"
    synthetic = vq_root / "data" / "shapes"
    cfg = pixelsnail(tmp_path, cache_dir, tiny_llm, tokenizer, f"data.root={synthetic}")
    metrics = train(cfg)
    run = tmp_path / "prior"
    report = json.loads((run / "data_report.json").read_text())
    assert report["counts"]["rows"] == 12 and report["counts"]["used"] == 12
    # The training loss falls from the uniform prior's log K (8 training rows: validation only overfits).
    assert metrics["train/nll"] < math.log(8) - 0.3, metrics
    assert [json.loads(x)["file"] for x in (run / "exports.jsonl").read_text().splitlines()] == [
        "pixelsnail-step4",
        "pixelsnail",
    ]
    saved = PixelSNAIL.from_pretrained(str(run / "pixelsnail" / "prior"))
    # Resume in place: 4 more steps from the checkpoint, the codes read again from the same database.
    train(
        pixelsnail(
            tmp_path,
            cache_dir,
            tiny_llm,
            tokenizer,
            f"data.root={synthetic}",
            "trainer.max_steps=16",
            f"ckpt_path={run}",
        )
    )
    resumed = PixelSNAIL.from_pretrained(str(run / "pixelsnail" / "prior"))
    assert not torch.equal(saved.head.weight, resumed.head.weight)

    # As generate/evaluate build it (pixelsnail=[<export>]): the LLM rebuilt from the export's trained_with.json.
    (column,) = sampler_columns([run / "pixelsnail"])
    assert column.name == "pixelsnail" and column.conditioning is None
    prompts = [Prompt("a", "two red circles", "test"), Prompt("b", "a pair of tomatoes", "test")]
    rendered = render_columns(
        backbone, [column], prompts, [0, 1], out_dir=tmp_path / "grid", progress=False, batch_size=3
    )
    assert len(rendered) == 4 and all(r.image.size == (32, 32) for r in rendered)
    again = render_columns(backbone, [column], prompts[1:], [1], progress=False)
    assert list(again[0].image.getdata()) == list(rendered[3].image.getdata()), (
        "an image depends on its seed, not its batch"
    )


def test_a_prefix_of_rows_gives_the_same_logits():
    torch.manual_seed(0)
    model = PixelSNAIL(
        codebook_size=8,
        grid_size=4,
        channels=8,
        num_blocks=1,
        res_per_block=1,
        num_heads=2,
        pooled_dim=6,
        token_dim=6,
        dropout=0.0,
    ).eval()
    codes = torch.randint(0, 8, (2, 4, 4))
    text = (torch.randn(2, 6), torch.randn(2, 3, 6), torch.ones(2, 3, dtype=torch.bool))
    full = model(codes, *text)
    for rows in range(1, 5):
        torch.testing.assert_close(model(codes[:, :rows], *text), full[:, :, :rows])


def test_tokenizer_evaluation_scores_reconstructions_and_maps_code_histograms(tokenizer_run, tmp_path):
    from sur_lightning.data.prompt_suites import Prompt
    from sur_lightning.evaluation.tokenizer import code_histograms, evaluate_tokenizer, toyworld_images
    from sur_lightning.models.vq_tokenizer import LatentVQTokenizer

    vq_root, _ = tokenizer_run
    tokenizer = LatentVQTokenizer.from_pretrained(vq_root / "vq" / "tokenizer")
    targets = [(1, "red", "circle"), (2, "blue", "square"), (3, "green", "triangle")]
    prompts = [Prompt(f"p{i}", "x", "train" if i else "unseen", target=t) for i, t in enumerate(targets)]
    images, rows = toyworld_images(prompts, [0, 1], size=32)
    assert images.shape == (6, 3, 32, 32) and [p.id for p in rows] == ["p0", "p1", "p2"] * 2
    identity = lambda a, b: (a - b).abs().flatten(1).mean(1)  # a stand-in distance for LPIPS
    report = evaluate_tokenizer(tokenizer, images, rows, tmp_path, lpips=identity)
    overall = report["overall"]
    assert 0 < overall["mse"] < 1 and overall["psnr"] > 0 and -1 <= overall["ssim"] <= 1 and overall["lpips"] >= 0
    assert set(report["splits"]) == {"unseen", "train"} and 1 <= report["codes_used"] <= 8
    assert (tmp_path / "codes_pca.png").exists() and (tmp_path / "codes_tsne.png").exists()
    assert len(report["maps"]["pca"]) == 6 and json.loads((tmp_path / "tokenizer_report.json").read_text())
    # Without LPIPS weights the report says so instead of a number.
    skipped = evaluate_tokenizer(tokenizer, images, rows, tmp_path, lpips_skipped="no weights", projections=["pca"])
    assert skipped["overall"]["lpips"] is None and skipped["lpips_skipped"] == "no weights"
    histograms = code_histograms(torch.tensor([[[0, 1], [1, 1]]]), 3)
    assert histograms.tolist() == [[0.25, 0.75, 0.0]]


@pytest.mark.parametrize("experiment", ["vqvae", "pixelsnail"])
def test_real_data_presets_need_data_root_and_name_it(experiment, tmp_path, cache_dir):
    from omegaconf.errors import MissingMandatoryValue

    cfg = compose(f"+experiment={experiment}")
    assert cfg.trainer.precision == "bf16-mixed" and cfg.trainer.accelerator == "gpu"
    assert cfg.backbone._target_.endswith("StableDiffusionBackbone") and cfg.data.resolution == 64
    with pytest.raises(MissingMandatoryValue, match="data.root"):
        # (pixelsnail's tokenizer is named, else the missing newest vqvae run is reported first, naming data.tokenizer)
        tokenizer = ["data.tokenizer=/nowhere"] if experiment == "pixelsnail" else []
        train(compose(f"+experiment={experiment}", *common(tmp_path, cache_dir, "run"), "trainer=cpu", *tokenizer))


def test_real_data_presets_train_two_steps_on_a_tiny_folder(tmp_path, cache_dir, tiny_sd, tiny_llm):
    from sur_lightning.data.synthetic import generate_dataset
    from sur_lightning.models.vq_tokenizer import LatentVQTokenizer

    folder = generate_dataset(tmp_path / "folder", num_images=10, image_size=32, seed=0)
    tiny = ["trainer=cpu", "trainer.max_steps=2", "trainer.val_check_interval=2", "data.batch_size=4"]
    tiny += ["data.val_size=2", "data.resolution=32", "data.num_workers=0", f"data.root={folder}"]
    tiny += ["callbacks.model_checkpoint.every_n_train_steps=2"]
    vq = compose(
        "+experiment=vqvae",
        *common(tmp_path, cache_dir, "vq"),
        *tiny,
        f"backbone.pretrained={tiny_sd}",
        "model.tokenizer.codebook_size=8",
    )
    train(vq)
    tokenizer = tmp_path / "vq" / "tokenizer"
    assert LatentVQTokenizer.from_pretrained(tokenizer).fitted
    prior = compose(
        "+experiment=pixelsnail",
        *common(tmp_path, cache_dir, "prior"),
        *tiny,
        f"backbone.pretrained={tiny_sd}",
        "llm=tiny",
        "llm.pooling=none",
        f"llm.pretrained={tiny_llm}",
        f"data.tokenizer={tokenizer}",
        f"data.out={tmp_path}/codes",
        "model.prior.codebook_size=8",
        "model.prior.grid_size=8",
        "model.prior.channels=16",
        "model.prior.num_blocks=1",
    )
    metrics = train(prior)
    assert math.isfinite(metrics["train/nll"]) and (tmp_path / "prior" / "pixelsnail" / "prior").is_dir()
