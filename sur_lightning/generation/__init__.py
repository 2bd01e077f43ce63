"""Generation: prompts to images through the base model and through connectors, same seeds side by side.

``conditioning`` (the per-UNet-call hook that lets a timestep-aware connector condition every step),
``pipeline`` (diffusers' pipeline over the frozen parts; rendering), ``columns`` (what each grid column is
conditioned by, built from adapter files), ``grids`` and ``manifest`` (what a generate run writes),
``interpolation`` (per-token slerp; blended and text-diff conditionings) and ``tools`` (``explore``'s interpolations,
text diffs, variations and best-of-N).

May import: ``models`` and ``data`` (prompt suites). Imported by ``evaluation``, ``training`` and entry points.
"""
