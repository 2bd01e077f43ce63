"""What people do with a text-conditioned generator beyond one prompt → one image (unCLIP, arXiv 2204.06125):
interpolations, text diffs, variations and best-of-N reranking, on the base's or any connector's conditioning.

Each tool is built from its config (``conf/tool/<name>.yaml``) and ``run(setup)`` renders through the same pipeline
and per-UNet-call conditioning hook as ``python -m sur_lightning.generate``, so a timestep-aware connector (ELLA) is
blended, shifted or re-noised at every sampling step. A run returns a ``Picture``: the grid's columns and rows, and
every image as a ``Rendered`` with what made it in ``info`` (t, strength, score), which ``sur_lightning.explore``
writes as ``grid.png``, ``images/`` and ``manifest.json``.

- ``Interpolation``: k steps from one conditioning to another for one prompt (base → adapter), or from one prompt
  to the next through one conditioning; per-token slerp or lerp; optionally the initial noise slerped too.
- ``TextDiffs``: a prompt's conditioning moved along c(target) − c(source), one image per strength.
- ``Variations``: an image (given, or drawn from the prompt) re-noised to strength s and denoised again with the
  same conditioning (SDEdit through diffusers' img2img pipeline); strength 0 is the VAE's round trip.
- ``BestOfN``: N samples per prompt, the one a scorer ranks highest kept. The scorer is any object with
  ``score(images, prompts) -> [N]`` (CLIP score for real models, a held-apart scorer on the toy world).

An unCLIP column (``explore unclip=<prior export>``, ``columns.unclip_column``) has no text conditioning: there the
tools are the paper's, in its image-embedding space (``generation/unclip.py``): interpolation slerps between two
prompts' prior samples (``between=prompts``) or two images' embeddings (``images=[a, b]``), decoded with one noise;
text diffs slerp the prompt's embedding toward normalise(z(target) − z(source)); variations encode the image with
the image tower and decode its embedding with new noise. Best-of-N reranks its draws as any column's. What a tool
cannot do on such a column (``between=columns``, ``noise_to_seed``) is an error naming it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from PIL import Image, ImageDraw

from sur_lightning.data.prompt_suites import Prompt
from sur_lightning.generation.columns import Column
from sur_lightning.generation.conditioning import ClipConditioning, conditioning_hook
from sur_lightning.generation.interpolation import BlendConditioning, TextDiffConditioning, noise_slerp
from sur_lightning.generation.pipeline import Rendered, placeholder_embeds, render, seeded_noise
from sur_lightning.generation.unclip import (
    DecoderRender,
    decode_embeddings,
    embedding_interpolation,
    embedding_text_diff,
    variations,
)

REFERENCE_COLUMNS = ("base+complex",)  # the upper bound's column: shown by generate, not explored


@dataclass
class Setup:
    """What every tool renders with: the pipeline over the frozen parts, the columns (base, adapters), the prompts,
    the seeds and the sampler's settings (``num_inference_steps``, ``guidance_scale``, ``height``, ``width``)."""

    pipeline: object
    columns: list[Column]
    prompts: list[Prompt]
    seeds: list[int]
    negative_prompt: str = ""
    sampler: dict = field(default_factory=dict)

    def column(self, name: str) -> Column:
        for column in self.columns:
            if column.name == name:
                return column
        raise ValueError(f"no column named {name!r}; the columns are {[c.name for c in self.columns]}")

    @property
    def explored(self) -> list[Column]:
        return [c for c in self.columns if c.name not in REFERENCE_COLUMNS]

    @property
    def adapters(self) -> list[Column]:
        return [c for c in self.columns if "adapter" in c.source]

    progress: object = None  # a tqdm bar counting rendered images, or None

    def render(
        self, conditioning: ClipConditioning, prompts: Sequence[str], seeds: Sequence[int], **kwargs
    ) -> list[Image.Image]:
        images = render(
            self.pipeline, conditioning, prompts, seeds, negative_prompt=self.negative_prompt, **self.sampler, **kwargs
        )
        return self.counted(images)

    def counted(self, images: list[Image.Image]) -> list[Image.Image]:
        if self.progress is not None:
            self.progress.update(len(images))
        return images

    def draw(self, column: Column, prompts: Sequence[str], seeds: Sequence[int]) -> list[Image.Image]:
        """The column's images of (prompt, seed) pairs, whatever draws them: its conditioning through the pipeline,
        an unCLIP column's decoder (through the same pipeline and sampler), or its own ``render``."""
        if column.render is None:
            return self.render(column.conditioning, prompts, seeds)
        if isinstance(column.render, DecoderRender):
            embeds = column.render.embed(list(prompts), [int(s) for s in seeds])
            return self.counted(
                decode_embeddings(self.pipeline, column.render.projection, embeds, seeds, **self.sampler)
            )
        return self.counted(
            column.render(list(prompts), list(seeds), negative_prompt=self.negative_prompt, **self.sampler)
        )


@dataclass
class Picture:
    """A tool's result: ``columns`` {title: one image per row}, ``rows`` (one label each), and every image made,
    with what made it (``Rendered.info``)."""

    columns: dict[str, list[Image.Image]]
    rows: list[str]
    images: list[Rendered]


def unclip_render(column: Column, tool: str) -> DecoderRender | None:
    """The column's ``DecoderRender`` when it is an unCLIP column (prior or oracle -> decoder), None when it is a
    text conditioning. Any other generator of its own (PixelSNAIL) has nothing a tool can move: an error."""
    if column.render is None:
        return None
    if isinstance(column.render, DecoderRender):
        return column.render
    # The stock StableUnCLIPPipeline's column (unclip_sd21_clip exports) draws through diffusers end to end.
    leave_out = "unclip=null" if column.source.get("kind") == "unclip_stock" else "pixelsnail=[]"
    raise ValueError(
        f"tool={tool}: column {column.name!r} ({column.source.get('kind', 'its own sampler')}) has neither a text "
        f"conditioning nor an image embedding this tool can move: leave it out ({leave_out})"
    )


def _grid_columns(titles: Sequence[str], strips: Sequence[Sequence[Image.Image]]) -> dict[str, list[Image.Image]]:
    return {title: [strip[k] for strip in strips] for k, title in enumerate(titles)}


class Interpolation:
    """Strips of ``steps`` images, t = 0 … 1, conditioned by ``interpolate(c_start, c_end, t)`` per token.

    between="columns": for every prompt, from column ``from_column`` (``base``, or ``base+complex``: the base given
                       the complex prompt) to every adapter column, same prompt and seed.
    between="prompts": through every column (base and adapters), from each prompt to the next one.
    method:            ``slerp`` (per token, norm-preserving) or ``lerp``.
    noise_to_seed:     also slerp the initial noise, from the row's seed to this seed's (unCLIP's latent
                       interpolation); None keeps the row's noise along the strip.
    images:            two image files: on unCLIP columns, slerp between their image-tower embeddings (text columns
                       are then left out).

    On an unCLIP column the strip moves in its image-embedding space (``unclip.embedding_interpolation``), decoded
    with the row seed's noise: between=prompts from each prompt's prior sample to the next prompt's (same seed),
    or ``images``. between=columns (a text conditioning into an adapter) and ``noise_to_seed`` do not apply there.
    """

    def __init__(
        self,
        steps: int = 5,
        method: str = "slerp",
        between: str = "columns",
        from_column: str = "base",
        noise_to_seed: int | None = None,
        images: Sequence[str] | None = None,
    ) -> None:
        if images is not None and len(images) != 2:
            raise ValueError(f"tool.images: the two images to interpolate between, got {list(images)}")
        self.images = list(images) if images is not None else None
        if steps < 2:
            raise ValueError(f"tool.steps: an interpolation needs at least 2 steps (both ends), got {steps}")
        if between not in ("columns", "prompts"):
            raise ValueError(f"tool.between must be 'columns' or 'prompts', got {between!r}")
        self.weights = [k / (steps - 1) for k in range(steps)]
        self.method, self.between, self.from_column, self.noise_to_seed = method, between, from_column, noise_to_seed

    def strips(self, setup: Setup) -> list[tuple[str, str, BlendConditioning, Prompt, dict]]:
        """(row label, column name, blend, prompt, info) per strip."""
        if self.between == "columns":
            start = setup.column(self.from_column)
            if not setup.adapters:
                raise ValueError("tool.between=columns interpolates a column into an adapter: give adapters=[...]")
            for end in setup.adapters:  # before rendering anything: both ends need the same token count
                shapes = [tuple(c.conditioning.conditioning([""], 0).shape[1:]) for c in (start, end)]
                if shapes[0] != shapes[1]:
                    raise ValueError(
                        f"tool.between=columns: {start.name} gives {shapes[0][0]} tokens and {end.name} {shapes[1][0]}; "
                        "per-token interpolation needs the same count (base and ELLA cannot be blended): use "
                        "tool.between=prompts, or tool.from_column=<another adapter with that count>"
                    )
            return [
                (
                    f"{start.name} -> {end.name}: {p.prompt}",
                    end.name,
                    BlendConditioning(start.conditioning, end.conditioning, self.weights, method=self.method),
                    p,
                    {"from": start.name, "to": end.name},
                )
                for end in setup.adapters
                for p in setup.prompts
            ]
        if len(setup.prompts) < 2:
            raise ValueError("tool.between=prompts interpolates each prompt into the next: give at least 2 prompts")
        pairs = list(zip(setup.prompts, setup.prompts[1:]))
        return [
            (
                f"{column.name}: {a.prompt} -> {b.prompt}",
                column.name,
                BlendConditioning(
                    column.conditioning, column.conditioning, self.weights, {a.prompt: b.prompt}, self.method
                ),
                a,
                {"from": a.prompt, "to": b.prompt},
            )
            for column in setup.explored
            if column.render is None
            for a, b in pairs
        ]

    def unclip_strips(
        self, setup: Setup, unclip: dict[str, DecoderRender]
    ) -> list[tuple[str, str, Prompt, dict, tuple]]:
        """(row label, column name, prompt, info, (start [E], end [E]) per seed) per strip of the unCLIP columns."""
        if self.noise_to_seed is not None:
            raise ValueError(
                f"tool.noise_to_seed: the unCLIP column(s) {list(unclip)} decode every embedding of a strip from one "
                "seed's noise; set tool.noise_to_seed=null"
            )
        if self.images is not None:
            pictures = [Image.open(path).convert("RGB") for path in self.images]
            names = " -> ".join(str(path).rsplit("/", 1)[-1] for path in self.images)
            prompt = Prompt("images", names, "custom")
            info = {"from": str(self.images[0]), "to": str(self.images[1])}
            strips = []
            for name, decoder in unclip.items():
                start, end = decoder.encode(pictures)
                strips.append((f"{name}: {names}", name, prompt, info, [(start, end)] * len(setup.seeds)))
            return strips
        if self.between == "columns":
            raise ValueError(
                f"tool.between=columns blends a text conditioning into an adapter; the unCLIP column(s) {list(unclip)} "
                "interpolate in their image-embedding space: use tool.between=prompts (two prompts' prior samples) "
                "or tool.images=[a.png,b.png] (two images' embeddings)"
            )
        if len(setup.prompts) < 2:
            raise ValueError("tool.between=prompts interpolates each prompt into the next: give at least 2 prompts")
        strips = []
        for name, decoder in unclip.items():
            for a, b in zip(setup.prompts, setup.prompts[1:]):
                ends = [tuple(decoder.embed([a.prompt, b.prompt], [seed, seed])) for seed in setup.seeds]
                strips.append((f"{name}: {a.prompt} -> {b.prompt}", name, a, {"from": a.prompt, "to": b.prompt}, ends))
        return strips

    def run(self, setup: Setup) -> Picture:
        strips, rows, images = [], [], []
        unclip = {c.name: r for c in setup.explored if (r := unclip_render(c, "interpolate")) is not None}
        for label, column, prompt, info, ends in self.unclip_strips(setup, unclip) if unclip else []:
            for seed, (start, end) in zip(setup.seeds, ends):
                strip = embedding_interpolation(
                    setup.pipeline, unclip[column], start, end, self.weights, seed, self.method, **setup.sampler
                )
                strips.append(setup.counted(strip))
                rows.append(f"{label} ({seed})" if len(setup.seeds) > 1 else label)
                images += [
                    Rendered(
                        column, prompt, seed, image, info={**info, "t": t, "method": self.method, "space": "image"}
                    )
                    for t, image in zip(self.weights, strip)
                ]
        if self.images is not None and not unclip:
            raise ValueError("tool.images interpolates two images' embeddings: give unclip=<prior export>")
        text_strips = [] if self.images is not None else self.strips(setup)
        for label, column, blend, prompt, info in text_strips:
            for seed in setup.seeds:
                latents = None
                if self.noise_to_seed is not None:
                    size = setup.sampler.get("height"), setup.sampler.get("width")
                    latents = noise_slerp(
                        seeded_noise(setup.pipeline, seed, *size),
                        seeded_noise(setup.pipeline, self.noise_to_seed, *size),
                        self.weights,
                    )
                n = len(self.weights)
                strip = setup.render(blend, [prompt.prompt] * n, [seed] * n, latents=latents)
                strips.append(strip)
                rows.append(f"{label} ({seed})" if len(setup.seeds) > 1 else label)
                extra = {"noise_to_seed": self.noise_to_seed} if self.noise_to_seed is not None else {}
                images += [
                    Rendered(column, prompt, seed, image, info={**info, "t": t, "method": self.method, **extra})
                    for t, image in zip(self.weights, strip)
                ]
        return Picture(_grid_columns([f"t={t:.2f}" for t in self.weights], strips), rows, images)


class TextDiffs:
    """Strips over ``strengths``: each prompt's conditioning moved along c(``target``) − c(``source``), through every
    column (base and adapters); s = 0 is the prompt's own image. ``method``: ``add`` (c + s·diff) or ``slerp``
    (unCLIP's: toward the difference's direction).

    On an unCLIP column, the paper's (``unclip.embedding_text_diff``): the prompt's prior sample z_i slerped toward
    normalise(z(target) − z(source)), the captions' prior samples at the same seed, all decoded from the seed's
    noise; s = 0 is the column's own image of the prompt, and ``method`` does not apply (always slerp)."""

    def __init__(
        self, source: str, target: str, strengths: Sequence[float] = (0.0, 0.25, 0.5, 0.75, 1.0), method: str = "add"
    ) -> None:
        if not source or not target:
            raise ValueError("tool.source and tool.target: the two captions whose difference moves the prompt")
        self.source, self.target, self.strengths, self.method = source, target, [float(s) for s in strengths], method

    def run(self, setup: Setup) -> Picture:
        strips, rows, images = [], [], []
        for column in setup.explored:
            decoder = unclip_render(column, "text_diff")
            if decoder is None:
                diff = TextDiffConditioning(column.conditioning, self.source, self.target, self.strengths, self.method)
            for prompt in setup.prompts:
                for seed in setup.seeds:
                    n = len(self.strengths)
                    if decoder is None:
                        strip = setup.render(diff, [prompt.prompt] * n, [seed] * n)
                    else:
                        image, source, target = decoder.embed([prompt.prompt, self.source, self.target], [seed] * 3)
                        strip = setup.counted(
                            embedding_text_diff(
                                setup.pipeline, decoder, image, source, target, self.strengths, seed, **setup.sampler
                            )
                        )
                    strips.append(strip)
                    label = f"{column.name}: {prompt.prompt} + s*({self.target} - {self.source})"
                    rows.append(f"{label} ({seed})" if len(setup.seeds) > 1 else label)
                    method = self.method if decoder is None else "slerp (image embedding)"
                    info = {"source": self.source, "target": self.target, "method": method}
                    images += [
                        Rendered(column.name, prompt, seed, image, info={**info, "strength": s})
                        for s, image in zip(self.strengths, strip)
                    ]
        return Picture(_grid_columns([f"s={s:g}" for s in self.strengths], strips), rows, images)


class Variations:
    """For every column and prompt: the input image (``image``, a file; else the column's own image of the prompt at
    each seed), then ``num_variations`` images re-noised from it to each strength and denoised with the same
    conditioning (diffusers' img2img pipeline over the same components, with the per-call hook). Strength 0 is the
    VAE's round trip (encode, decode), the input as the model can represent it.

    On an unCLIP column, the paper's (``unclip.variations``): the input's image-tower embedding decoded with
    ``num_variations`` new seeds; ``strengths`` do not apply (one strip per prompt and seed)."""

    def __init__(
        self, strengths: Sequence[float] = (0.3, 0.6), num_variations: int = 4, image: str | None = None
    ) -> None:
        if any(not 0.0 <= s <= 1.0 for s in strengths):
            raise ValueError(f"tool.strengths must lie in [0, 1], got {list(strengths)}")
        self.strengths, self.num_variations, self.image = [float(s) for s in strengths], int(num_variations), image

    @staticmethod
    def img2img(pipeline):
        from diffusers import AutoPipelineForImage2Image

        img2img = AutoPipelineForImage2Image.from_pipe(pipeline)
        img2img.set_progress_bar_config(disable=True)
        return img2img

    @staticmethod
    @torch.no_grad()
    def round_trip(pipeline, image: Image.Image) -> Image.Image:
        """The image through the VAE and back (the latent distribution's mode, no noise)."""
        pixels = pipeline.image_processor.preprocess(image).to(pipeline.vae.device, pipeline.vae.dtype)
        latents = pipeline.vae.encode(pixels).latent_dist.mode()
        return pipeline.image_processor.postprocess(pipeline.vae.decode(latents).sample, output_type="pil")[0]

    @torch.no_grad()
    def vary(
        self,
        setup: Setup,
        img2img,
        conditioning: ClipConditioning,
        prompt: str,
        image: Image.Image,
        strength: float,
        seeds: Sequence[int],
    ) -> list[Image.Image]:
        if strength == 0.0:
            return [self.round_trip(setup.pipeline, image)] * len(seeds)
        steps = setup.sampler.get("num_inference_steps", 30)
        if int(steps * strength) < 1:
            raise ValueError(
                f"tool.strengths: strength {strength:g} at sampler.num_inference_steps={steps} leaves "
                f"int({steps} × {strength:g}) = 0 denoising steps: raise sampler.num_inference_steps or the strength"
            )
        prompts = [prompt] * len(seeds)
        features = conditioning.features(prompts)
        negative = conditioning.features([setup.negative_prompt] * len(seeds))
        size = setup.sampler.get("height") or setup.pipeline.unet.config.sample_size * setup.pipeline.vae_scale_factor
        with conditioning_hook(setup.pipeline.unet, conditioning, features, negative):
            return img2img(
                **placeholder_embeds(setup.pipeline, features, len(seeds)),
                image=[image.convert("RGB").resize((size, size))] * len(seeds),
                strength=strength,
                num_inference_steps=steps,
                guidance_scale=setup.sampler.get("guidance_scale", 7.5),
                # CPU generators: a seed gives the same variation on every device.
                generator=[torch.Generator().manual_seed(int(s)) for s in seeds],
                output_type="pil",
            ).images

    def run(self, setup: Setup) -> Picture:
        img2img = self.img2img(setup.pipeline)
        given = Image.open(self.image).convert("RGB") if self.image else None
        titles = ["input"] + [f"#{k + 1}" for k in range(self.num_variations)]
        strips, rows, images = [], [], []
        for column in setup.explored:
            for prompt in setup.prompts:
                for seed in setup.seeds:
                    decoder = unclip_render(column, "variations")
                    source = given or setup.draw(column, [prompt.prompt], [seed])[0]
                    images.append(Rendered(column.name, prompt, seed, source, info={"input": self.image or "drawn"}))
                    seeds = [seed * self.num_variations + k + 1 for k in range(self.num_variations)]
                    if decoder is not None:
                        varied = setup.counted(variations(setup.pipeline, decoder, source, seeds, **setup.sampler))
                        strips.append([source, *varied])
                        rows.append(f"{column.name}: {prompt.prompt} ({seed}) image embedding, new noise")
                        info = {"input_seed": seed, "space": "image embedding"}
                        images += [Rendered(column.name, prompt, s, im, info=info) for s, im in zip(seeds, varied)]
                        continue
                    for strength in self.strengths:
                        varied = self.vary(setup, img2img, column.conditioning, prompt.prompt, source, strength, seeds)
                        strips.append([source, *varied])
                        rows.append(f"{column.name}: {prompt.prompt} ({seed}) s={strength:g}")
                        images += [
                            Rendered(column.name, prompt, s, image, info={"strength": strength, "input_seed": seed})
                            for s, image in zip(seeds, varied)
                        ]
        return Picture(_grid_columns(titles, strips), rows, images)


def mark(image: Image.Image, text: str, chosen: bool = False, cell: int = 128) -> Image.Image:
    """A copy of ``image`` at the grid's cell size with ``text`` written in; a green frame when ``chosen``."""
    marked = image.convert("RGB").resize((cell, cell))
    draw = ImageDraw.Draw(marked)
    draw.rectangle((0, cell - 13, cell, cell), fill="white")
    draw.text((3, cell - 12), text, fill="black")
    if chosen:
        draw.rectangle((0, 0, cell - 1, cell - 1), outline=(0, 170, 0), width=3)
    return marked


class BestOfN:
    """For every column, prompt and seed s: ``n`` samples (seeds s·n … s·n + n − 1), scored by ``scorer``; the best
    is kept. The images come back as three columns per conditioning: ``<column>`` (the first sample, what one draw
    gives), ``<column> best-of-<n>`` and ``<column> all-<n>`` (every candidate with its score, so another reranker
    can be tried on the same samples), so a metric over them says what reranking adds.

    scorer:       any object with ``score(images, prompts) -> Tensor [N]`` (higher is better), e.g.
                  ``evaluation.metrics.clip_score.CLIPScorer`` or ``evaluation.rerank.DenoisingScorer``.
    scorer_text:  what the scorer reads: ``prompt`` (the prompt itself) or ``complex`` (the prompt's complex
                  form, on suites that have one: the toy world's held-apart scorer reads the description).
    """

    def __init__(self, scorer, n: int = 4, scorer_text: str = "prompt") -> None:
        if n < 2:
            raise ValueError(f"tool.n: best-of-N needs at least 2 samples, got {n}")
        if scorer_text not in ("prompt", "complex"):
            raise ValueError(f"tool.scorer_text must be 'prompt' or 'complex', got {scorer_text!r}")
        self.scorer, self.n, self.scorer_text = scorer, int(n), scorer_text

    def text(self, prompt: Prompt) -> str:
        if self.scorer_text == "complex":
            if not prompt.complex:
                raise ValueError(
                    f"tool.scorer_text=complex but prompt {prompt.id} ({prompt.prompt!r}) has no complex form"
                )
            return prompt.complex
        return prompt.prompt

    def choose(self, images: Sequence[Image.Image], text: str) -> tuple[int, list[float]]:
        """(index of the highest score, every score) for the candidates of one prompt."""
        scores = torch.as_tensor(self.scorer.score(list(images), [text] * len(images)), dtype=torch.float64).reshape(-1)
        if scores.numel() != len(images):
            raise ValueError(f"the scorer gave {scores.numel()} scores for {len(images)} images")
        return int(torch.argmax(scores)), scores.tolist()

    def best_column(self, name: str) -> str:
        return f"{name} best-of-{self.n}"

    def all_column(self, name: str) -> str:
        """Every candidate: its metric is one draw's expected score, with N times the images of ``<column>``."""
        return f"{name} all-{self.n}"

    def run(self, setup: Setup) -> Picture:
        strips, rows, images = [], [], []
        # The upper bound (base + complex prompt) once per draw, unranked: a report over the columns then gives
        # the gap each column closes, with and without reranking.
        for column in (c for c in setup.columns if c.name in REFERENCE_COLUMNS):
            for prompt in setup.prompts:
                for seed in setup.seeds:
                    image = setup.render(column.conditioning, [prompt.prompt], [seed * self.n])[0]
                    images.append(Rendered(column.name, prompt, seed * self.n, image, info={"draw": seed}))
        for column in setup.explored:
            for prompt in setup.prompts:
                for seed in setup.seeds:
                    seeds = [seed * self.n + k for k in range(self.n)]
                    candidates = setup.draw(column, [prompt.prompt] * self.n, seeds)
                    best, scores = self.choose(candidates, self.text(prompt))
                    info = {"scores": scores, "candidate_seeds": seeds, "chosen": best, "draw": seed}
                    images.append(Rendered(column.name, prompt, seeds[0], candidates[0], info=info))
                    images.append(
                        Rendered(self.best_column(column.name), prompt, seeds[best], candidates[best], info=info)
                    )
                    images += [
                        Rendered(self.all_column(column.name), prompt, s, image, info={"score": score, "draw": seed})
                        for s, image, score in zip(seeds, candidates, scores)
                    ]
                    strips.append(
                        [
                            mark(image, f"{score:.3g}", k == best)
                            for k, (image, score) in enumerate(zip(candidates, scores))
                        ]
                        + [mark(candidates[best], f"seed {seeds[best]}", True)]
                    )
                    rows.append(f"{column.name}: {prompt.prompt} ({seed})")
        titles = [f"#{k + 1}" for k in range(self.n)] + ["best"]
        return Picture(_grid_columns(titles, strips), rows, images)
