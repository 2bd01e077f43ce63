"""ELLA's Timestep-Aware Semantic Connector: size, timestep use, AdaLN init, padding, official weights, gradients."""

import math

import pytest
import torch
import torch.nn.functional as F

from sur_lightning.models.connectors import TextFeatures, load_connector, save_connector
from sur_lightning.models.connectors.ella import (
    AdaLayerNorm,
    TimestepAwareSemanticConnector,
    load_official_state_dict,
)

TINY = {
    "dim": 32,
    "llm_dim": 12,
    "num_blocks": 2,
    "num_heads": 4,
    "num_latents": 8,
    "time_channels": 16,
    "time_embed_dim": 24,
}


def official_shapes(llm_dim, dim, num_blocks, num_latents, time_channels, time_embed_dim, **_):
    """Every parameter of the authors' ``ELLA`` (TencentQQGYLab/ELLA model.py) with its shape, written out."""
    w, e = dim, time_embed_dim
    shapes = {
        "time_embedding.linear_1.weight": (e, time_channels),
        "time_embedding.linear_1.bias": (e,),
        "time_embedding.linear_2.weight": (e, e),
        "time_embedding.linear_2.bias": (e,),
        "connector.latents": (num_latents, w),
        "connector.time_aware_linear.weight": (w, e),
        "connector.time_aware_linear.bias": (w,),
        "connector.proj_in.weight": (w, llm_dim),
        "connector.proj_in.bias": (w,),
    }
    for i in range(num_blocks):
        p = f"connector.perceiver_blocks.{i}."
        shapes |= {
            p + "attn.in_proj_weight": (3 * w, w),
            p + "attn.in_proj_bias": (3 * w,),
            p + "attn.out_proj.weight": (w, w),
            p + "attn.out_proj.bias": (w,),
            p + "mlp.c_fc.weight": (4 * w, w),
            p + "mlp.c_fc.bias": (4 * w,),
            p + "mlp.c_proj.weight": (w, 4 * w),
            p + "mlp.c_proj.bias": (w,),
        }
        for ln in ("ln_1", "ln_2", "ln_ff"):
            shapes |= {p + f"{ln}.linear.weight": (2 * w, e), p + f"{ln}.linear.bias": (2 * w,)}
    return shapes


def random_official_state_dict(seed=0, dtype=torch.float64, **sizes):
    g = torch.Generator().manual_seed(seed)
    return {k: 0.3 * torch.randn(s, generator=g, dtype=dtype) for k, s in official_shapes(**sizes).items()}


def reference_forward(sd, llm, timesteps, mask, num_heads, num_blocks, time_channels):
    """The TSC written out from the spec, on the official parameter names (independent of the module)."""

    def linear(h, name):
        return h @ sd[name + ".weight"].T + sd[name + ".bias"]

    def ada_ln(h, name, t_emb):
        shift, scale = linear(F.silu(t_emb), name + ".linear").chunk(2, dim=-1)
        return F.layer_norm(h, h.shape[-1:], eps=1e-6) * (1 + scale[:, None]) + shift[:, None]

    # diffusers Timesteps(flip_sin_to_cos=True, downscale_freq_shift=0), computed in float32 as diffusers does
    half = time_channels // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
    angles = timesteps.float()[:, None] * freqs[None]
    sinusoid = torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1).to(llm.dtype)
    t_emb = linear(F.silu(linear(sinusoid, "time_embedding.linear_1")), "time_embedding.linear_2")

    x = linear(llm, "connector.proj_in")
    latents = sd["connector.latents"][None] + linear(F.silu(t_emb), "connector.time_aware_linear")[:, None]
    batch, n, width = latents.shape
    head_dim = width // num_heads
    bias = torch.zeros(batch, 1, 1, n + x.shape[1], dtype=llm.dtype)
    if mask is not None:
        bias[:, 0, 0, n:] = torch.where(mask, 0.0, -math.inf)
    for i in range(num_blocks):
        p = f"connector.perceiver_blocks.{i}."
        q_in = ada_ln(latents, p + "ln_1", t_emb)
        kv_in = torch.cat([q_in, ada_ln(x, p + "ln_2", t_emb)], dim=1)
        wq, wk, wv = sd[p + "attn.in_proj_weight"].chunk(3)
        bq, bk, bv = sd[p + "attn.in_proj_bias"].chunk(3)

        def heads(h):
            return h.reshape(batch, h.shape[1], num_heads, head_dim).transpose(1, 2)

        q, k, v = heads(q_in @ wq.T + bq), heads(kv_in @ wk.T + bk), heads(kv_in @ wv.T + bv)
        weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(head_dim) + bias, dim=-1)
        attended = (weights @ v).transpose(1, 2).reshape(batch, n, width)
        latents = latents + linear(attended, p + "attn.out_proj")
        hidden = torch.relu(linear(ada_ln(latents, p + "ln_ff", t_emb), p + "mlp.c_fc")) ** 2
        latents = latents + linear(hidden, p + "mlp.c_proj")
    return latents


def randomise(module, seed=0):
    """Non-zero AdaLN weights etc., so that every path of the connector is exercised."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return module


def tiny(seed=0, **overrides):
    torch.manual_seed(seed)
    return TimestepAwareSemanticConnector(**(TINY | overrides)).double()


def features(batch=2, tokens=5, seed=1, llm_dim=TINY["llm_dim"]):
    g = torch.Generator().manual_seed(seed)
    llm = torch.randn(batch, tokens, llm_dim, generator=g, dtype=torch.float64)
    return TextFeatures(llm=llm, llm_mask=torch.ones(batch, tokens, dtype=torch.bool))


def test_official_configuration_has_66_820_608_parameters():
    with torch.device("meta"):
        model = TimestepAwareSemanticConnector()
    assert sum(p.numel() for p in model.parameters()) == 66_820_608
    # The written-out official parameter table agrees, and maps one-to-one onto ours with the same shapes.
    official = official_shapes(
        llm_dim=2048, dim=768, num_blocks=6, num_latents=64, time_channels=320, time_embed_dim=768
    )
    assert sum(math.prod(s) for s in official.values()) == 66_820_608
    with torch.device("meta"):
        load_official_state_dict(model, {k: torch.empty(s) for k, s in official.items()})


def test_output_shape_and_timestep_dependence():
    model = randomise(tiny()).eval()
    feats = features()
    with torch.no_grad():
        out = model(feats, torch.tensor([10, 900])).conditioning
        early = model(feats, torch.tensor([10, 10])).conditioning
        scalar = model(feats, torch.tensor(10)).conditioning
        first = TextFeatures(llm=feats.llm[:1], llm_mask=feats.llm_mask[:1])
        first_alone = model(first, torch.tensor([10])).conditioning
        fresh = tiny().eval()(feats, torch.tensor([10, 900])).conditioning  # init: AdaLN zero, time only in latents
        fresh_late = tiny().eval()(feats, torch.tensor([900, 900])).conditioning
    assert out.shape == (2, TINY["num_latents"], TINY["dim"])
    assert (out[1] - early[1]).abs().max() > 1e-2  # timestep 900 vs 10 changes sample 1 ...
    torch.testing.assert_close(out[0], early[0])  # ... and nothing else
    torch.testing.assert_close(scalar, early)  # a scalar timestep is broadcast over the batch
    torch.testing.assert_close(first_alone[0], out[0])
    assert (fresh[0] - fresh_late[0]).abs().max() > 1e-3


def test_adaln_is_plain_layer_norm_at_initialisation():
    model = tiny()
    norms = [m for m in model.modules() if isinstance(m, AdaLayerNorm)]
    assert len(norms) == 3 * TINY["num_blocks"]
    g = torch.Generator().manual_seed(0)
    h = 5 * torch.randn(2, 7, TINY["dim"], generator=g, dtype=torch.float64) + 3
    t_emb = torch.randn(2, TINY["time_embed_dim"], generator=g, dtype=torch.float64)
    plain = (h - h.mean(-1, keepdim=True)) / torch.sqrt(h.var(-1, unbiased=False, keepdim=True) + 1e-6)
    for norm in norms:
        assert norm.linear.weight.abs().max() == 0 and norm.linear.bias.abs().max() == 0
        torch.testing.assert_close(norm(h, t_emb), plain)
    # After training moves the linear, the timestep modulates the norm.
    randomise(norms[0])
    assert (norms[0](h, t_emb) - plain).abs().max() > 1e-2


def test_key_padding_mask_ignores_pad_tokens():
    g = torch.Generator().manual_seed(2)
    feats = features(batch=2, tokens=9)
    lengths = [3, 9]  # sample 0: 6 pad tokens, sample 1: none
    llm = 10 * torch.randn(2, 9, TINY["llm_dim"], generator=g, dtype=torch.float64)  # pads: arbitrary values
    mask = torch.zeros(2, 9, dtype=torch.bool)
    for b, n in enumerate(lengths):
        llm[b, :n] = feats.llm[b, :n]
        mask[b, :n] = True
    padded = TextFeatures(llm=llm, llm_mask=mask)
    t = torch.tensor([100, 700])

    def alone(model, b):
        n = lengths[b]
        unpadded = TextFeatures(llm=feats.llm[b : b + 1, :n], llm_mask=feats.llm_mask[b : b + 1, :n])
        return model(unpadded, t[b : b + 1])

    with torch.no_grad():
        masked = randomise(tiny()).eval()
        out = masked(padded, t).conditioning
        for b in range(2):
            torch.testing.assert_close(out[b : b + 1], alone(masked, b).conditioning)
        no_mask = masked(TextFeatures(llm=feats.llm), t).conditioning  # llm_mask None: all tokens real
        torch.testing.assert_close(no_mask, masked(feats, t).conditioning)

        official = randomise(tiny(use_key_padding_mask=False)).eval()
        out = official(padded, t).conditioning
        assert (out[0:1] - alone(official, 0).conditioning).abs().max() > 1e-3  # pads attended
        torch.testing.assert_close(out[1:2], alone(official, 1).conditioning)  # sample 1 has no pads


@pytest.mark.parametrize("use_key_padding_mask", [False, True])
def test_official_keys_load_strictly_and_reproduce_outputs(tmp_path, use_key_padding_mask):
    sd = random_official_state_dict(**TINY)
    model = tiny(use_key_padding_mask=use_key_padding_mask)
    load_official_state_dict(model, sd)
    feats = features(batch=3, tokens=7)
    feats.llm_mask[0, 4:] = False
    t = torch.tensor([0, 321, 999])
    with torch.no_grad():
        out = model.eval()(feats, t).conditioning
    expected = reference_forward(
        sd,
        feats.llm,
        t,
        feats.llm_mask if use_key_padding_mask else None,
        TINY["num_heads"],
        TINY["num_blocks"],
        TINY["time_channels"],
    )
    torch.testing.assert_close(out, expected)

    # From a .safetensors file, as the authors ship them.
    from safetensors.torch import save_file

    path = tmp_path / "ella-tiny.safetensors"
    save_file(sd, str(path))
    from_file = load_official_state_dict(tiny(seed=5, use_key_padding_mask=use_key_padding_mask), path)
    with torch.no_grad():
        torch.testing.assert_close(from_file.eval()(feats, t).conditioning, out)

    with pytest.raises(RuntimeError):  # strict: a missing official key is an error
        load_official_state_dict(tiny(), {k: v for k, v in sd.items() if "ln_ff" not in k})


def test_save_connector_round_trip(tmp_path):
    model = randomise(tiny(use_key_padding_mask=False)).float()
    path, _ = save_connector(model, tmp_path / "ella.safetensors")
    reloaded = load_connector(path)
    assert isinstance(reloaded, TimestepAwareSemanticConnector) and not reloaded.use_key_padding_mask
    feats = features()
    feats.llm = feats.llm.float()
    t = torch.tensor([1, 2])
    with torch.no_grad():
        assert torch.equal(model.eval()(feats, t).conditioning, reloaded(feats, t).conditioning)


def test_gradients_reach_every_parameter():
    model = tiny()  # at initialisation: the zero AdaLN linears must still receive gradient
    feats = features()
    feats.llm_mask[1, 3:] = False
    target = torch.randn(2, TINY["num_latents"], TINY["dim"], generator=torch.Generator().manual_seed(3))
    loss = (model(feats, torch.tensor([5, 500])).conditioning * target.double()).sum()
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert p.grad.abs().sum() > 0, name
