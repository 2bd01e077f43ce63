"""PixelSNAIL training and forward speed on one thread, per width and depth (docs/pixelsnail.md).

python experiments/pixelsnail_speed/speed.py
"""

import time

import torch

torch.set_num_threads(1)
from sur_lightning.models.pixelsnail import PixelSNAIL

for ch, nb, rpb in [(64, 2, 2), (32, 1, 2), (32, 2, 1), (48, 2, 1), (32, 2, 2)]:
    torch.manual_seed(0)
    m = PixelSNAIL(
        codebook_size=256,
        grid_size=16,
        channels=ch,
        num_blocks=nb,
        res_per_block=rpb,
        num_heads=4,
        pooled_dim=576,
        token_dim=576,
    )
    opt = torch.optim.AdamW(m.parameters(), 1e-3)
    B = 32
    codes = torch.randint(0, 256, (B, 16, 16))
    tp = torch.randn(B, 576)
    tt = torch.randn(B, 12, 576)
    tm = torch.ones(B, 12, dtype=torch.bool)
    for i in range(6):
        if i == 2:
            t = time.perf_counter()
        loss = m.loss(codes, tp, tt, tm)
        opt.zero_grad()
        loss.backward()
        opt.step()
    step = (time.perf_counter() - t) / 4
    m.eval()
    t = time.perf_counter()
    with torch.no_grad():
        for _ in range(8):
            m(
                torch.randint(0, 256, (64, 16, 16)),
                tp[:1].expand(64, -1),
                tt[:1].expand(64, -1, -1),
                tm[:1].expand(64, -1),
            )
    fwd = (time.perf_counter() - t) / 8
    print(
        f"ch{ch} blocks{nb} res{rpb}: params {sum(p.numel() for p in m.parameters()) / 1e6:.2f}M  train {step:.3f}s/step b32 ({1 / step:.2f} it/s); fwd b64 {fwd * 1000:.0f} ms -> sample 256 pos x b64 (CFG=2x) ~{fwd * 256 * 2:.0f}s",
        flush=True,
    )
