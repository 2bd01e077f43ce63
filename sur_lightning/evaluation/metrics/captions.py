"""Caption-back metrics: caption each generated image, then compare the caption with the prompt.

``Captioner`` wraps a BLIP captioning model from transformers (a hub id or a local folder).
``score_captions`` compares captions with reference prompts by

- BLEU-1 and BLEU-4, corpus level (torchmetrics ``BLEUScore``: whitespace tokens, geometric mean
  of clipped n-gram precisions times the brevity penalty ``min(1, exp(1 - r / c))``);
- ROUGE-1 and ROUGE-L F-measure, mean over captions (torchmetrics ``ROUGEScore``);
- METEOR, mean over captions (``nltk.translate.meteor_score``), which needs the WordNet corpus:
  either nltk's ``corpora/wordnet`` under a directory of ``NLTK_DATA``, or a WordNet dict folder
  (``index.noun``, ``data.noun``, ``lexnames``, ``noun.exc``, ... for noun/verb/adj/adv) given
  as ``wordnet=`` (config key ``metrics.captions.wordnet``). Without it METEOR raises an error
  saying so; it is never skipped silently (``meteor=False`` leaves it out on purpose).

Texts are lower-cased before scoring; references may be one string or a list of strings per caption.

``checker_caption`` is the toy world's captioner, which needs no weights: the shape checker's reading of an
image (``metrics/shapes.py``: count, colour and kind of each component) written in the base's vocabulary,
"two red circles" (several kinds joined by "and", "nothing" for an empty image).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image

WORDNET_CONFIG_KEY = "metrics.captions.wordnet"
CAPTIONER_CONFIG_KEY = "metrics.captioner.model"


def _as_reference_lists(references: Sequence[str | Sequence[str]]) -> list[list[str]]:
    return [[r.lower()] if isinstance(r, str) else [x.lower() for x in r] for r in references]


def load_wordnet(wordnet: str | Path | None = None):
    """A WordNet reader for METEOR: from the dict folder ``wordnet``, or nltk's corpus via ``NLTK_DATA``.

    Raises ``RuntimeError`` naming what is missing and where to point ``NLTK_DATA`` / the config key.
    """
    import nltk
    from nltk.corpus.reader.wordnet import WordNetCorpusReader

    if wordnet is not None:
        folder = Path(wordnet)
        needed = ["lexnames"] + [
            f"{kind}.{pos}" for pos in ("noun", "verb", "adj", "adv") for kind in ("index", "data")
        ]
        needed += [f"{pos}.exc" for pos in ("noun", "verb", "adj", "adv")]
        missing = [name for name in needed if not (folder / name).is_file()]
        if missing:
            raise RuntimeError(
                f"{folder} is not a WordNet dict folder (missing {', '.join(missing)}); set {WORDNET_CONFIG_KEY} "
                "to a folder with WordNet's index.*, data.*, *.exc and lexnames files (e.g. nltk_data/corpora/wordnet)."
            )

        # nltk reads corpora only under its data path: the configured folder is the user's choice, so authorise it.
        if str(folder.resolve()) not in map(str, nltk.data.path):
            nltk.data.path.append(str(folder.resolve()))

        class DictFolderWordNet(WordNetCorpusReader):
            """English WordNet from a plain dict folder; skips the multilingual mapping, which needs nltk's copy."""

            def map_wn(self, version="wordnet"):
                return None

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "multilingual functions are not available": fine for METEOR
            return DictFolderWordNet(str(folder.resolve()), None)
    try:
        nltk.data.find("corpora/wordnet")
    except LookupError as error:
        raise RuntimeError(
            "METEOR needs the WordNet corpus, which is not installed (nltk looked for corpora/wordnet in "
            f"{nltk.data.path}). Copy nltk's wordnet (`python -m nltk.downloader wordnet` on a machine with network "
            "access gives nltk_data/corpora/wordnet.zip) and set NLTK_DATA=/path/to/nltk_data, or set "
            f"{WORDNET_CONFIG_KEY}=/path/to/wordnet/dict; or pass meteor=False to leave METEOR out."
        ) from error
    from nltk.corpus import wordnet as nltk_wordnet

    return nltk_wordnet


def meteor(captions: Sequence[str], references: Sequence[str | Sequence[str]], wordnet=None) -> float:
    """Mean METEOR over captions (nltk); ``wordnet``: a reader, a dict folder, or ``None`` for nltk's corpus."""
    from nltk.translate.meteor_score import meteor_score

    if wordnet is None or isinstance(wordnet, str | Path):
        wordnet = load_wordnet(wordnet)
    scores = [
        meteor_score([r.split() for r in refs], caption.lower().split(), wordnet=wordnet)
        for caption, refs in zip(captions, _as_reference_lists(references))
    ]
    return sum(scores) / len(scores)


def score_captions(
    captions: Sequence[str],
    references: Sequence[str | Sequence[str]],
    meteor_metric: bool = True,
    wordnet: str | Path | None = None,
) -> dict[str, float]:
    """Compare captions with their references.

    ``captions``: N strings; ``references``: N strings or N lists of strings.
    Returns ``{"bleu_1", "bleu_4", "rouge1_f", "rougeL_f"}`` plus ``"meteor"`` when
    ``meteor_metric`` is true (which needs WordNet, see the module docstring); all in [0, 1].
    """
    from torchmetrics.text import BLEUScore, ROUGEScore

    if len(captions) != len(references):
        raise ValueError(f"got {len(captions)} captions but {len(references)} references")
    if not captions:
        raise ValueError("score_captions needs at least one caption")
    predictions = [c.lower() for c in captions]
    targets = _as_reference_lists(references)
    rouge = ROUGEScore(rouge_keys=("rouge1", "rougeL"))(predictions, targets)
    result = {
        "bleu_1": float(BLEUScore(n_gram=1)(predictions, targets)),
        "bleu_4": float(BLEUScore(n_gram=4)(predictions, targets)),
        "rouge1_f": float(rouge["rouge1_fmeasure"]),
        "rougeL_f": float(rouge["rougeL_fmeasure"]),
    }
    if meteor_metric:
        result["meteor"] = meteor(captions, references, wordnet)
    return result


def checker_caption(image, **detect_kwargs) -> str:
    """The shape checker's reading of one image (PIL, uint8 [H, W, 3] or float [3, H, W] in [0, 1]) as a caption
    in the toy base's vocabulary: "two red circles"; "one red circle and two blue squares" for mixed readings
    (largest group first), "two circles" where a component's colour is off the palette, "nothing" for no shape.
    ``detect_kwargs``: those of ``shapes.detect_shapes`` (tolerance, min_area, foreground_threshold)."""
    from collections import Counter

    from sur_lightning.data.synthetic import NUMBER_WORDS, plural
    from sur_lightning.evaluation.metrics.shapes import detect_shapes

    groups = Counter(detect_shapes(image, **detect_kwargs)).most_common()
    if not groups:
        return "nothing"
    words = []
    for (color, kind), count in groups:
        number = NUMBER_WORDS[count] if count < len(NUMBER_WORDS) else str(count)
        words.append(" ".join(w for w in (number, color, plural(kind, count)) if w))
    return " and ".join(words)


class Captioner:
    """BLIP image captioning (transformers ``BlipForConditionalGeneration`` + ``BlipProcessor``).

    ``model``: a hub id ("Salesforce/blip-image-captioning-large") or a local folder written by
    ``save_pretrained``. Weights that cannot be loaded raise a ``RuntimeError`` naming the model and
    the config key ``metrics.captioner.model``. ``__call__`` maps PIL images or a float tensor
    [B, 3, H, W] in [0, 1] to B caption strings (greedy decoding, ``max_new_tokens`` tokens).
    """

    def __init__(
        self,
        model: str = "Salesforce/blip-image-captioning-large",
        device: str = "cpu",
        dtype: torch.dtype = torch.float32,
        max_new_tokens: int = 30,
        prompt: str | None = None,
    ):
        from transformers import BlipForConditionalGeneration, BlipProcessor

        local = os.path.isdir(model)
        try:
            self.processor = BlipProcessor.from_pretrained(model, local_files_only=local)
            self.model = BlipForConditionalGeneration.from_pretrained(model, dtype=dtype, local_files_only=local)
        except (OSError, ValueError) as error:
            raise RuntimeError(
                f"cannot load the BLIP captioner {model!r} ({type(error).__name__}: {str(error)[:300]}). Offline, save it "
                f"with save_pretrained where there is network access and set {CAPTIONER_CONFIG_KEY}=/path/to/folder."
            ) from error
        self.model.to(device).eval()
        self.device, self.dtype = device, dtype
        self.max_new_tokens = max_new_tokens
        self.prompt = prompt  # conditional captioning prefix, e.g. "a picture of"

    @torch.no_grad()
    def __call__(self, images: Sequence[Image.Image] | torch.Tensor) -> list[str]:
        from sur_lightning.evaluation.metrics.clip_score import to_pil_list

        pil = to_pil_list(images)
        text = [self.prompt] * len(pil) if self.prompt else None
        inputs = self.processor(images=pil, text=text, return_tensors="pt").to(self.device)
        inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
        tokens = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False)
        return [c.strip() for c in self.processor.batch_decode(tokens, skip_special_tokens=True)]
