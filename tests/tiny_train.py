"""A tiny model trained through common.train, for the distributed / resume / SIGTERM tests.

    python tests/tiny_train.py OUT_DIR [--fsdp] [--steps N] [--grad_accum K] [--sigterm_at K] [--resume] [--noise]
                                       [--groups] [--late_rank R]
    torchrun --nproc_per_node=2 tests/tiny_train.py OUT_DIR ...
"""
import argparse
import os
import signal
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(4, 16)
        self.block = common.Block(16, 2)
        self.out = nn.Linear(16, 4)

    def forward(self, x):  # (B, T, 4)
        return self.out(self.block(self.inp(x), causal=True))


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("out_dir")
    p.add_argument("--fsdp", action="store_true")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--grad_accum", type=int, default=1)
    p.add_argument("--sigterm_at", type=int, default=-1)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--noise", action="store_true", help="random noise in the loss (exercises RNG restore)")
    p.add_argument("--bf16", action="store_true", help="--amp: under --fsdp, FSDP2 with bf16 weights")
    p.add_argument("--groups", action="store_true",
                   help="the output layer in its own optimizer group (lr, betas), value clipping, a cosine floor")
    p.add_argument("--late_rank", type=int, default=-1,
                   help="this rank starts training 2 s after the others, into a fresh out_dir (no --overwrite)")
    p.add_argument("--count_gathers", action="store_true",
                   help="after training, count FSDP all-gathers of an 8-step decode -> OUT_DIR/gathers.json")
    a = p.parse_args(argv)
    d = common.setup_distributed("cpu")
    cfg = common.TrainConfig(out_dir=a.out_dir, steps=a.steps, batch_size=8, lr=1e-2, warmup=3, log_every=4,
                             eval_every=1000, ckpt_every=1000, fsdp=a.fsdp, ema_decay=0.9, grad_accum=a.grad_accum, amp=a.bf16,
                             **(dict(min_lr=2e-3, grad_clip_value=0.02) if a.groups else {}))
    common.seed_all(0)
    model = Tiny()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, 5, 4, generator=g)
    data = common.ArrayDataset(x, x.flip(1).cumsum(1))
    calls = [0]

    def loss_fn(net, batch, at):
        calls[0] += 1
        if calls[0] == a.sigterm_at:
            os.kill(os.getpid(), signal.SIGTERM)
        xb, yb = batch
        if a.noise:
            xb = xb + 0.1 * torch.randn_like(xb)
        return (net(xb) - yb).square().mean(), {}

    resume = str(Path(a.out_dir) / "ckpt.pt") if a.resume else None
    groups = {"out.": {"lr": 5e-2, "betas": (0.5, 0.9)}} if a.groups else None
    if d.rank == a.late_rank:
        time.sleep(2)
    common.train(cfg, model, loss_fn, data, d, resume=resume, overwrite=a.late_rank < 0,
                 optimizer=lambda m: common.make_optimizer(m, cfg, groups))
    if a.count_gathers:
        count_gathers(model, d, Path(a.out_dir))


def count_gathers(model, d, out: Path):
    """All-gathers of an autoregressive decode (8 forwards) without and with common.full_params."""
    import json
    gathers, all_gather = [0], torch.distributed.all_gather_single

    def counted(*args, **kw):
        gathers[0] += 1
        return all_gather(*args, **kw)

    def decode():
        x = torch.zeros(1, 1, 4)
        with torch.no_grad():
            for _ in range(8):
                x = torch.cat([x, model(x)[:, -1:]], 1)
        return x, gathers[0]

    torch.distributed.all_gather_single = counted
    plain, per_forward = decode()
    gathers[0] = 0
    with common.full_params(model):  # the gathers on entry count too
        with common.full_params(model):  # nested (a sampler inside an evaluation): it gathers nothing more
            once, _ = decode()
        _, in_block = decode()  # and the outer block is still gathered after the inner one ends
    torch.distributed.all_gather_single = all_gather
    sharded = all(p.to_local().numel() < p.numel() for p in model.parameters())  # resharded after the block
    (model(torch.zeros(2, 3, 4)).square().mean()).backward()  # and it still trains
    if d.is_main:
        (out / "gathers.json").write_text(json.dumps(dict(per_forward=per_forward, full_params=in_block,
                                                          same=torch.equal(plain, once), sharded=sharded)))


if __name__ == "__main__":
    common.run(main)
