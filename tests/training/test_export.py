"""ModelExport: the exports of the generators that are not connectors share AdapterExport's bookkeeping (exports.jsonl,
the final folder, the W&B artifact's name) and the run's closing report names the final folder."""

import json
import logging
from types import SimpleNamespace

import torch
from omegaconf import OmegaConf

from sur_lightning.train import report_outputs
from sur_lightning.training.callbacks import ModelExport


class Exporting(torch.nn.Module):
    """Stands in for a module with ``export_pretrained`` (PixelSNAIL, the VQ tokenizer, unCLIP's stages)."""

    def __init__(self):
        super().__init__()
        self.global_step = 0
        self.records = []

    def export_pretrained(self, folder, record):
        folder.mkdir(parents=True)
        (folder / "weights.txt").write_text(str(self.global_step))
        self.records.append(record)
        return folder


def test_model_export_writes_every_step_logs_each_and_keeps_only_the_final_folder(tmp_path, caplog):
    export = ModelExport(dirpath=str(tmp_path), filename="prior", at_steps=[2])
    module = Exporting()
    trainer = SimpleNamespace(global_step=2, loggers=[])
    export.on_train_start(trainer, module)

    module.global_step = 2
    export.on_train_batch_end(trainer, module, None, None, 0)
    assert export.last_folder is None and export.last_path == tmp_path / "prior-step2"

    module.global_step = trainer.global_step = 3
    export.on_train_end(trainer, module)
    assert export.last_folder == export.last_path == tmp_path / "prior"
    assert (tmp_path / "prior" / "weights.txt").read_text() == "3"
    lines = [json.loads(x) for x in (tmp_path / "exports.jsonl").read_text().splitlines()]
    assert [(x["step"], x["file"]) for x in lines] == [(2, "prior-step2"), (3, "prior")]
    # Neither a backbone nor an LLM: the record says so rather than naming a connector's.
    assert module.records[-1]["backbone"] is None and module.records[-1]["llm"] is None
    assert export.artifact_metadata(trainer) == {"step": 3}

    cfg = OmegaConf.create({"paths": {"output_dir": str(tmp_path / "run")}})
    with caplog.at_level(logging.INFO, logger="sur_lightning.train"):
        report_outputs(cfg, trainer, [export], [], {"train/nll": 1.0})
    assert f"export:     {tmp_path / 'prior'} (prior;" in caplog.text
    assert "adapter:" not in caplog.text
