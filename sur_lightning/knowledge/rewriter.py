"""An LLM that writes prompts: detailed rewrites of simple prompts, or simple prompts of detailed captions.

LLM-inference distillation: instead of (or beside) one hidden state, distil what the LLM *writes*. The
rewriter turns "a pair of tomatoes" into a detailed prompt; ``loss.align_target=rewrite|both`` then aligns
the connector's output to CLIP(rewrite) as SUR aligns it to CLIP(complex prompt). With
``data.simple_from=llm`` the same machinery writes the simple prompt of a dataset that only has detailed
captions (pokemon-llava-captions).

Generation is greedy by default, batched, with a progress bar. Every rewrite is appended to one JSONL
(``cache_file``) keyed by (prompt, model, template hash), so a second run, another rank or another job of
a sweep reads it instead of loading the LLM. The template hash covers everything that changes the output:
the chat messages, the decoding settings and the retrieval setup.

Read what the LLM says before training on it: ``python -m sur_lightning.rewrite`` (the entry point).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from omegaconf import OmegaConf
from tqdm.auto import tqdm

TASKS = ("expand", "simplify")


PLACEHOLDER = "{prompt}"


def plain_messages(messages) -> list[dict[str, str]]:
    """Chat messages from a config: a list of {role, content}; every content a string."""
    if OmegaConf.is_config(messages):
        messages = OmegaConf.to_container(messages, resolve=True)
    out = []
    for i, message in enumerate(messages or []):
        if (
            not isinstance(message, dict)
            or set(message) != {"role", "content"}
            or not isinstance(message["content"], str)
        ):
            raise ValueError(
                f"rewriter template message {i}: expected {{role, content}} with a string content, got {message!r}"
            )
        out.append({"role": str(message["role"]), "content": message["content"]})
    if not out or PLACEHOLDER not in out[-1]["content"]:
        raise ValueError(
            f"rewriter template: the last message must contain {PLACEHOLDER!r}, got {out[-1:] or 'no messages'}"
        )
    return out


def clean_generation(text: str) -> str:
    """The first non-empty line of what the LLM wrote, without surrounding quotes or a trailing label."""
    for line in text.strip().splitlines():
        line = line.strip().strip("\"'`").strip()
        if line:
            return line
    return ""


class PromptRewriter:
    """A frozen causal/chat LM that rewrites prompts, following a few-shot chat template per task.

    rewrite(prompts: list[str], task="expand") -> list[str]   one rewrite per prompt, in order

    pretrained:   a causal LM folder or hub id (the offline default converts SmolLM2-135M-Instruct).
    templates:    {task: [{role, content}, ...]}; the last message holds ``{prompt}``. Tasks: ``expand``
                  (simple → detailed, for ``loss.align_target``) and ``simplify`` (caption → simple prompt,
                  for ``data.simple_from=llm``). Models with a chat template use it; others get the
                  messages as ``role: content`` lines.
    rag:          optional ``sur_lightning.knowledge.rag.Retriever``: its facts go into the prompt before templating.
    cache_file:   the JSONL of rewrites shared by runs and ranks (None: keep them in memory only).
    """

    def __init__(
        self,
        pretrained: str,
        templates: dict,
        max_new_tokens: int = 60,
        batch_size: int = 16,
        do_sample: bool = False,
        cache_file: str | None = None,
        dtype: str = "float32",
        device: str = "auto",
        rag=None,
        wait_timeout_s: float = 7200.0,
        poll_s: float = 5.0,
    ) -> None:
        self.pretrained = str(pretrained)
        templates = (
            OmegaConf.to_container(templates, resolve=True) if OmegaConf.is_config(templates) else dict(templates)
        )
        unknown = set(templates) - set(TASKS)
        if unknown:
            raise ValueError(f"rewriter.templates: unknown task(s) {sorted(unknown)}; the tasks are {TASKS}")
        self.templates = {task: plain_messages(messages) for task, messages in templates.items()}
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size
        self.do_sample = do_sample
        self.cache_file = Path(cache_file) if cache_file else None
        self.dtype = dtype
        self.device = device
        self.rag = rag
        self.wait_timeout_s = wait_timeout_s
        self.poll_s = poll_s
        self.model = None
        self.tokenizer = None
        self.generated = 0  # prompts this process sent through the LLM (0 when every rewrite was cached)
        self.memory: dict[tuple[str, str, str], str] = {}
        self.unreadable_lines = 0

    # ---------------------------------------------------------------- cache

    def template_hash(self, task: str) -> str:
        """Everything but the prompt and the model that decides what the LLM writes."""
        rag = self.rag.fingerprint() if self.rag is not None else None
        spec = {
            "messages": self.template(task),
            "max_new_tokens": self.max_new_tokens,
            "do_sample": self.do_sample,
            "rag": rag,
        }
        return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]

    def template(self, task: str) -> list[dict[str, str]]:
        if task not in self.templates:
            raise ValueError(
                f"rewriter: no template for task {task!r} (rewriter.templates has {sorted(self.templates)})"
            )
        return self.templates[task]

    def read_cache(self) -> None:
        """Load every rewrite of the cache file; lines that do not parse are counted and reported, not fatal."""
        if self.cache_file is None or not self.cache_file.exists():
            return
        bad = []
        with self.cache_file.open(encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                    self.memory[(row["prompt"], row["model"], row["template"])] = str(row["rewrite"])
                except (json.JSONDecodeError, KeyError, TypeError):
                    bad.append(number)
        if len(bad) != self.unreadable_lines:
            self.unreadable_lines = len(bad)
            # A line cut by a killed writer is the usual cause; its prompt is simply rewritten again.
            print(
                f"rewriter: {len(bad)} unreadable line(s) in {self.cache_file} skipped (first: line {bad[0]})",
                flush=True,
            )

    def append_cache(self, rows: list[dict]) -> None:
        if self.cache_file is None:
            return
        self.cache_file.parent.mkdir(parents=True, exist_ok=True)
        # One write per batch, each line complete: concurrent appenders do not interleave inside a line.
        with self.cache_file.open("a", encoding="utf-8") as f:
            f.write("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))

    def cached(self, prompts: Sequence[str], task: str) -> dict[str, str]:
        key = self.template_hash(task)
        return {p: self.memory[(p, self.pretrained, key)] for p in prompts if (p, self.pretrained, key) in self.memory}

    # ---------------------------------------------------------------- generation

    def rewrite(self, prompts: Sequence[str], task: str = "expand", rank: int | None = None) -> list[str]:
        """One rewrite per prompt. Cached ones are read; the rest are generated (rank 0) or awaited (other ranks)."""
        from sur_lightning.config import process_rank

        self.read_cache()
        unique = list(dict.fromkeys(prompts))
        known = self.cached(unique, task)
        missing = [p for p in unique if p not in known]
        if missing:
            rank = process_rank() if rank is None else rank
            if rank == 0 or self.cache_file is None:
                known.update(self.generate(missing, task))
            else:
                known.update(self.wait_for(missing, task, rank))
        return [known[p] for p in prompts]

    def wait_for(self, prompts: list[str], task: str, rank: int) -> dict[str, str]:
        """Other ranks: rank 0 writes the rewrites; poll its cache file instead of loading a second LLM."""
        started = time.monotonic()
        print(
            f"rank {rank}: waiting for rank 0 to rewrite {len(prompts)} prompt(s) into {self.cache_file} ...",
            flush=True,
        )
        while True:
            self.read_cache()
            known = self.cached(prompts, task)
            if len(known) == len(prompts):
                return known
            if time.monotonic() - started > self.wait_timeout_s:
                raise TimeoutError(
                    f"rank {rank}: {len(prompts) - len(known)} rewrite(s) still missing from {self.cache_file} after "
                    f"{self.wait_timeout_s:.0f} s (rewriter.wait_timeout_s); first: {next(p for p in prompts if p not in known)!r}"
                )
            time.sleep(self.poll_s)

    def load(self) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from sur_lightning.models.backbone import load_pretrained, resolve_dtype

        self.tokenizer = load_pretrained(AutoTokenizer, self.pretrained, "rewriter.pretrained")
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        # Generation continues after the last token: pad on the left so every row's last token is real.
        self.tokenizer.padding_side = "left"
        model = load_pretrained(
            AutoModelForCausalLM, self.pretrained, "rewriter.pretrained", dtype=resolve_dtype(self.dtype)
        )
        device = ("cuda" if torch.cuda.is_available() else "cpu") if self.device == "auto" else self.device
        self.model = model.to(device).eval().requires_grad_(False)

    def model_input(self, prompt: str, task: str) -> str:
        """The text the LLM continues: the task's messages with the prompt (and its retrieved facts) filled in."""
        if self.rag is not None:
            prompt = self.rag.augment([prompt])[0]
        messages = [dict(m, content=m["content"].replace(PLACEHOLDER, prompt)) for m in self.template(task)]
        if self.tokenizer.chat_template:
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"

    @torch.no_grad()
    def generate(self, prompts: list[str], task: str) -> dict[str, str]:
        if self.model is None:
            self.load()
        key = self.template_hash(task)
        out: dict[str, str] = {}
        empty = 0
        batches = [prompts[i : i + self.batch_size] for i in range(0, len(prompts), self.batch_size)]
        for batch in tqdm(batches, desc=f"Rewriting ({task})", unit="batch"):
            texts = [self.model_input(p, task) for p in batch]
            # Chat templates already hold the special tokens; don't add a second BOS.
            tokens = self.tokenizer(
                texts, return_tensors="pt", padding=True, add_special_tokens=not self.tokenizer.chat_template
            )
            tokens = tokens.to(self.model.device)
            generated = self.model.generate(
                **tokens,
                max_new_tokens=self.max_new_tokens,
                do_sample=self.do_sample,
                pad_token_id=self.tokenizer.pad_token_id,
            )
            decoded = self.tokenizer.batch_decode(generated[:, tokens.input_ids.shape[1] :], skip_special_tokens=True)
            rows = []
            for prompt, text in zip(batch, decoded):
                rewrite = clean_generation(text)
                if not rewrite:
                    # Nothing usable written: the prompt stands for itself, so no row is lost (counted below).
                    empty += 1
                    rewrite = prompt
                out[prompt] = rewrite
                self.memory[(prompt, self.pretrained, key)] = rewrite
                rows.append(
                    {"prompt": prompt, "model": self.pretrained, "template": key, "task": task, "rewrite": rewrite}
                )
            self.append_cache(rows)
        self.generated += len(prompts)
        if empty:
            print(
                f"rewriter: the LLM wrote nothing for {empty} of {len(prompts)} prompt(s); those keep their own text",
                flush=True,
            )
        return out
