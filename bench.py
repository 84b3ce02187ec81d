"""
bench.py -- flowzoo's speed table for the current device. A benchmark, not a test: nothing here asserts a timing.

    python bench.py                 # every group on the default device (CUDA if present)
    python bench.py --only common   # one group
    python bench.py --device cpu

Each group yields rows (model, variant, train step ms, samples/s, peak memory MB, note) and ratios between variants;
model files add their group with the @bench decorator below.

--gpu (the last section of this file): one JSON line for one GPU, within --budget_s (default 480 s):

    python bench.py --gpu                      # H200: the six paper-size bf16 train steps (ms, tokens/s, MFU),
                                               # STARFlow sequential vs Jacobi vs compiled sampling and STARFlow-V
                                               # sequential vs Jacobi at batch 1/16/64, the Wan VAEs at 480p
    python bench.py --gpu --device cpu --tiny  # the same code path, every model shrunk (under a minute on a CPU)
    python bench.py --gpu --peak_tflops 756    # MFU against an H100 PCIe's dense bf16 peak (default: H200 SXM's)
"""
import argparse
import contextlib
import copy
import dataclasses
import gc
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np

import torch

import common

GROUPS = {}


def bench(name):
    def register(fn):
        GROUPS[name] = fn
        return fn
    return register


def timeit(fn, device, warmup=2, iters=5) -> float:
    """Median wall time of fn() in ms (CUDA synchronised)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t) * 1e3)
    return sorted(times)[len(times) // 2]


def peak_mb(device) -> float | None:
    if device.type != "cuda":
        return None
    mb = torch.cuda.max_memory_allocated() / 2**20
    torch.cuda.reset_peak_memory_stats()
    return mb


@bench("common")
def bench_common(device):
    """The shared transformer: a training step, and decoding with the preallocated KV cache vs recomputing."""
    dim, heads, depth, T, B = (256, 4, 4, 64, 16) if device.type == "cpu" else (1024, 16, 8, 256, 16)
    torch.manual_seed(0)
    blocks = torch.nn.ModuleList([common.Block(dim, heads) for _ in range(depth)]).to(device)
    x = torch.randn(B, T, dim, device=device)
    opt = torch.optim.AdamW(blocks.parameters(), lr=1e-4)

    def forward(h, **kw):
        for b in blocks:
            h = b(h, causal=True, **kw)
        return h

    def step():
        forward(x).square().mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    ms = timeit(step, device)
    yield dict(model="common", variant=f"Block x{depth} d{dim} train step", ms=ms, per_s=B / ms * 1e3,
               mem=peak_mb(device), note=f"B={B} T={T}")

    @torch.no_grad()
    def decode_cached():
        caches = [b.attn.new_cache(B, T, device) for b in blocks]
        for t in range(T):
            h = x[:, t:t + 1]
            for b, c in zip(blocks, caches):
                h = b(h, causal=True, cache=c)

    @torch.no_grad()
    def decode_recompute():
        for t in range(T):
            forward(x[:, :t + 1])

    cached, recompute = timeit(decode_cached, device, 1, 3), timeit(decode_recompute, device, 1, 3)
    yield dict(model="common", variant="decode, KV cache", ms=cached, per_s=B / cached * 1e3, mem=peak_mb(device),
               note=f"{T} tokens")
    yield dict(model="common", variant="decode, recompute prefix", ms=recompute, per_s=B / recompute * 1e3,
               mem=peak_mb(device), note=f"{T} tokens")
    yield dict(ratio="KV-cache decoding speed-up over recomputing the prefix", value=recompute / cached)


STEPS = int(os.environ.get("TARFLOW_BENCH_STEPS", 200))  # training steps of the two TARFlows compared
PARTS = os.environ.get("STARFLOW_BENCH_PARTS", "train,samplers,tarflow,gpu").split(",")


def _train(model, loss, steps: int, device, batch: int = 64, lr: float = 2e-3, seed: int = 0):
    """The same short loop for every model here: AdamW on 8x8 digits with Gaussian noise 0.05, labels dropped 10%."""
    x, y = common.load_digits("train", 8)
    x, y = common.to_float(x).to(device), y.to(device)
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        i = torch.randint(len(x), (batch,), generator=g).to(device)
        drop = (torch.rand(batch, generator=g) < 0.1).to(device)
        loss(model, x[i] + 0.05 * torch.randn_like(x[i]), y[i], drop).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return model.eval()


def _trained_demo(sf, device):
    """The demo model, trained: $STARFLOW_BENCH_CKPT or out/starflow/ckpt.pt, else 300 steps here."""
    ckpt = Path(os.environ.get("STARFLOW_BENCH_CKPT", "out/starflow/ckpt.pt"))
    if ckpt.exists():
        model, cfg = sf.from_checkpoint(ckpt, device)
        return model, cfg, f"checkpoint {ckpt}"
    cfg = sf.Config()
    torch.manual_seed(0)
    model = sf.STARFlow(cfg, *sf.latent_shape(cfg)).to(device)

    def loss(m, x, y, drop):
        return sf.nll_loss(m, x, m.make_cond(y, null=drop))
    return _train(model, loss, 300, device), cfg, "trained 300 steps here"


@bench("starflow")
def bench_starflow(device):
    """Train step of the digits demo; sequential vs Jacobi vs the compiled sequential step on a trained model at
    batch 1/16/64 with and without guidance; sequential decoding vs ml-tarflow's on the same TARFlow config; on GPU
    the 1.4B bf16 train step."""
    import starflow as sf
    cfg = sf.Config()
    torch.manual_seed(0)
    model = sf.STARFlow(cfg, *sf.latent_shape(cfg)).to(device)
    x = torch.randn(cfg.batch_size, cfg.channels, cfg.img_size, cfg.img_size, device=device)
    y = torch.arange(cfg.batch_size, device=device) % cfg.num_classes
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step():
        sf.nll_loss(model, x, model.make_cond(y)).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    if "train" in PARTS:
        ms = timeit(step, device)
        yield dict(model="starflow", variant="digits train step", ms=ms, per_s=cfg.batch_size / ms * 1e3,
                   mem=peak_mb(device), note=f"B={cfg.batch_size}")
    if "samplers" in PARTS:
        yield from _samplers(sf, device)
    if "tarflow" in PARTS:
        yield from _vs_ml_tarflow(sf, device)
    if "gpu" in PARTS and device.type == "cuda":
        yield from _big(sf, device)


def _samplers(sf, device):
    """Sequential vs Jacobi vs the compiled sequential step on a trained model, each ratio with the condition it was
    measured under."""
    model, cfg, how = _trained_demo(sf, device)
    for B in (1, 16, 64):
        cond = model.make_cond(torch.arange(B, device=device) % 10)
        z = torch.randn(B, model.T, model.D, device=device, generator=torch.Generator(device).manual_seed(0))
        for w in (0.0, 1.0):
            res = {}
            for name in ("sequential", "jacobi", "compiled"):  # compiled: the sequential sampler under --compile
                c = dataclasses.replace(cfg, sampler="sequential" if name == "compiled" else name, guidance=w,
                                        denoise=False, compile=name == "compiled")
                res[name] = sf.sample(model, cond, c, z=z)  # (and the compilation, before the timing)
                res[name + "_ms"] = timeit(lambda: sf.sample(model, cond, c, z=z), device, 1, 5)
                yield dict(model="starflow", variant=f"sample B={B} w={w:g}, {name}", ms=res[name + "_ms"],
                           per_s=B / res[name + "_ms"] * 1e3, mem=peak_mb(device),
                           note=f"{res[name][1]} network evals; {how}")
            diff = (res["jacobi"][0] - res["sequential"][0]).abs().max().item()
            yield dict(ratio=f"starflow Jacobi over sequential, B={B}, guidance {w:g}, {how} (max |diff| {diff:.1e})",
                       value=res["sequential_ms"] / res["jacobi_ms"])
            diff = (res["compiled"][0] - res["sequential"][0]).abs().max().item()
            yield dict(ratio=f"starflow compiled one-token step over eager, sequential, B={B}, guidance {w:g} "
                             f"(max |diff| {diff:.1e})", value=res["sequential_ms"] / res["compiled_ms"])


def _vs_ml_tarflow(sf, device):
    """Sequential decoding against the official ml-tarflow code: identical TARFlow config, the same training loop."""
    ref = Path(os.environ.get("TARFLOW_REF", "/tmp/tarflow_ref"))
    if (ref / "transformer_flow.py").exists():
        sys.path.insert(0, str(ref))
        try:
            import transformer_flow as tf_ref
        finally:
            sys.path.remove(str(ref))
        tcfg = sf.Config(param="tarflow", patch_size=1, width=128, head_dim=64, layers=(2, 2, 2, 2),
                         cond_deep_only=False, soft_clip=0.0, noise_std=0.05, sampler="sequential", denoise=False,
                         guidance_rule="tarflow")
        torch.manual_seed(0)
        ours = _train(sf.STARFlow(tcfg, 1, 8).to(device),
                      lambda m, x, y, drop: sf.nll_loss(m, x, m.make_cond(y, null=drop)), STEPS, device)
        torch.manual_seed(0)
        theirs = tf_ref.Model(in_channels=1, img_size=8, patch_size=1, channels=128, num_blocks=4,
                              layers_per_block=2, nvp=True, num_classes=10).to(device)

        def ref_loss(m, x, y, drop):
            z, _, logdets = m(x, torch.where(drop, -1, y))  # y < 0: ml-tarflow's null label (mean class embedding)
            return m.get_loss(z, logdets)
        theirs = _train(theirs, ref_loss, STEPS, device)
        x, y = common.load_digits("train", 8)
        x, y = common.to_float(x[:64]).to(device), y[:64].to(device)
        ref_step = timeit(lambda: ref_loss(theirs.train(), x, y, y < 0).backward(), device, 2, 5)
        our_step = timeit(lambda: sf.nll_loss(ours.train(), x, ours.make_cond(y)).backward(), device, 2, 5)
        ours.eval(), theirs.eval()
        yield dict(ratio="starflow train step (fwd+bwd) speed over ml-tarflow's, same TARFlow config, B=64",
                   value=ref_step / our_step)
        for B in (1, 16, 64):
            labels = torch.arange(B, device=device) % 10
            z = torch.randn(B, 64, 1, device=device, generator=torch.Generator(device).manual_seed(0))
            cond = ours.make_cond(labels)
            for w in (0.0, 2.0):
                c = dataclasses.replace(tcfg, guidance=w)
                t_ours = timeit(lambda: sf.sample(ours, cond, c, z=z), device, 1, 5)
                with torch.no_grad():
                    t_ref = timeit(lambda: theirs.reverse(z.clone(), labels, guidance=w), device, 1, 5)
                yield dict(model="starflow", variant=f"TARFlow decode B={B} w={w:g}, ours", ms=t_ours,
                           per_s=B / t_ours * 1e3, mem=peak_mb(device), note="8x8 digits, p1, w128, 4x2 layers")
                yield dict(model="ml-tarflow", variant=f"TARFlow decode B={B} w={w:g}, official", ms=t_ref,
                           per_s=B / t_ref * 1e3, mem=peak_mb(device), note="same config, same training loop")
                yield dict(ratio=f"starflow sequential decoding speed over ml-tarflow's, B={B}, guidance {w:g} "
                                 f"(both trained {STEPS} steps)", value=t_ref / t_ours)


def _big(sf, device):
    big = sf.Config(**{**sf.PRESETS["imagenet256"], "grad_ckpt": False})
    model = sf.STARFlow(big, 4, 32).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    B = 32
    x = torch.randn(B, 4, 32, 32, device=device)
    cond = model.make_cond(torch.arange(B, device=device) % 1000)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)

    def big_step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = sf.nll_loss(model, x, cond)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    ms = timeit(big_step, device, 2, 5)
    tokens_s = B * model.T / ms * 1e3
    peak = 989e12 if "H100" in torch.cuda.get_device_name() or "H200" in torch.cuda.get_device_name() else float("nan")
    yield dict(model="starflow", variant=f"{n_params / 1e9:.2f}B bf16 train step", ms=ms, per_s=tokens_s,
               mem=peak_mb(device), note=f"tokens/s; B={B}, T={model.T}")
    yield dict(ratio="starflow 1.4B model FLOP utilisation (6 N tokens/s / 989 TFLOPs dense bf16)",
               value=6 * n_params * tokens_s / peak)


@bench("wcfm")
def bench_wcfm(device):
    """2D MLP training step per coupling at batch 128/256/512/2048: W-CFM's overhead over I-CFM (goal <= 5%) against
    OT-CFM's exact assignment, whose cost grows with B; plus the side-by-side demo's few-step table when
    out/wcfm/compare.json exists (W2 at 1 and 2 Euler steps, at 100, at dopri5 with its NFE)."""

    import wcfm
    cfg = wcfm.Config(**wcfm.PRESETS["8gaussians-moons"])
    for B in (128, 256, 512, 2048):
        g = torch.Generator().manual_seed(0)
        x0, x1 = wcfm.toy(cfg.source, B, g).to(device), wcfm.toy(cfg.target, B, g).to(device)
        steps = {}
        for c in wcfm.COUPLINGS:
            torch.manual_seed(0)
            model = wcfm.build(cfg).to(device)
            opt = torch.optim.Adam(model.parameters(), lr=1e-3)
            fm = wcfm.FlowMatcher(c, cfg.sigma, 2, cfg.kappa)

            def step(model=model, opt=opt, fm=fm):
                wcfm.cfm_loss(model, fm, x0, x1)[0].backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
            steps[c] = (step, fm)
        # I-CFM and W-CFM differ by a few %: interleave their timings so load drifts on a shared machine hit both alike
        runs = {c: [] for c in steps}
        for _ in range(7):
            for c in ("icfm", "wcfm"):
                runs[c].append(timeit(steps[c][0], device, 2, 21))
        runs["otcfm"].append(timeit(steps["otcfm"][0], device, 1, 5 if B < 2048 else 3))
        ms = {c: sorted(v)[len(v) // 2] for c, v in runs.items()}
        for c in wcfm.COUPLINGS:
            yield dict(model="wcfm", variant=f"2D train step B={B}, {c}", ms=ms[c], per_s=B / ms[c] * 1e3,
                       mem=peak_mb(device), note=steps[c][1].describe().split(" (")[0][:48])
        for c in ("wcfm", "otcfm"):
            yield dict(ratio=f"wcfm {c} / icfm train step time at B={B}", value=ms[c] / ms["icfm"])
    table = Path("out/wcfm/compare.json")
    if table.exists():
        for name, m in json.loads(table.read_text()).items():
            yield dict(ratio=f"wcfm demo {name}: W2 at 1 / 2 / 100 Euler steps {m['w2_euler1']:.3f} / "
                             f"{m['w2_euler2']:.3f} / {m['w2']:.3f}, dopri5 {m['w2_dopri5']:.3f} at NFE",
                       value=m["nfe_dopri5"])


@bench("mogfn")
def bench_mogfn(device):
    """MOGFN-PC on hypergrid-2obj: a training step, and trajectories/s of the vectorised environment vs one Python
    environment object per trajectory (the policy batched in both; only the environment stepping differs)."""
    import mogfn as mg
    cfg = mg.Config(**{**mg.PRESETS["hypergrid-2obj"], "device": device.type})
    torch.manual_seed(0)
    m = mg.build(cfg, device)
    note = "random weights: short trajectories (run `python mogfn.py` first for trained ones)"
    if Path("out/mogfn/ckpt.pt").is_file():
        common.load_weights(m, common.load_checkpoint("out/mogfn/ckpt.pt"), ema=False)
        note = "trained weights (out/mogfn)"
    trained = copy.deepcopy(m)  # the sampling rows below time the checkpoint's weights, not a few more steps
    loss_fn, opt = mg.train_loss_fn(trained, cfg, common.Dist(device=device)), mg.optimizer(trained, cfg)
    at = common.At(0, slice(0, cfg.batch_size))

    def step():
        loss, _ = loss_fn(trained, [], at)
        opt.zero_grad()
        loss.backward()
        opt.step()
    ms = timeit(step, device)
    yield dict(model="mogfn", variant=f"hypergrid-2obj train step B={cfg.batch_size}", ms=ms,
               per_s=cfg.batch_size / ms * 1e3, mem=peak_mb(device), note=note)

    class PyGrid:  # the per-object way: a Python list of coordinates per trajectory, stepped one at a time
        def __init__(self):
            self.x, self.done = [0] * cfg.dim, False

    @torch.no_grad()
    def per_object(cond):
        envs = [PyGrid() for _ in range(len(cond))]
        while not all(e.done for e in envs):
            live = [i for i, e in enumerate(envs) if not e.done]
            x = torch.tensor([envs[i].x for i in live], device=device)
            mask = torch.tensor([[c < cfg.side - 1 for c in envs[i].x] + [True] for i in live], device=device)
            p = m.policy(x, cond[live]).masked_fill(~mask, -math.inf).softmax(-1).cpu()
            for j, i in enumerate(live):
                a = int(torch.multinomial(p[j], 1))
                if a == cfg.dim:
                    envs[i].done = True
                else:
                    envs[i].x[a] += 1
    for B in (64, 1024):
        w, beta = mg.sample_conditions(cfg, 2, B, np.random.default_rng(0))
        cond = m.encode(w, beta).to(device)
        vec = timeit(lambda: mg.rollout(m, cond, np.random.default_rng(0)), device)
        obj = timeit(lambda: per_object(cond), device, warmup=1, iters=3)
        yield dict(model="mogfn", variant=f"sample B={B}, vectorised env", ms=vec, per_s=B / vec * 1e3,
                   mem=peak_mb(device), note=note)
        yield dict(model="mogfn", variant=f"sample B={B}, per-object Python env", ms=obj, per_s=B / obj * 1e3,
                   mem=peak_mb(device), note=note)
        yield dict(ratio=f"mogfn vectorised environment over per-object Python stepping at B={B}", value=obj / vec)


@bench("latent_fm")
def bench_latent_fm(device):
    """LFM on the digits demo: a training step; sampling time per image (NFE, wall) for Euler / Heun / dopri5 with and
    without guidance (cond and null always in one batched forward of 2B); and, with the demo checkpoint
    (out/latent_fm/ckpt.pt), RAAG against plain CFG: FD and accuracy against the number of Euler steps, each rule at
    the setting of its grid with the lowest FD."""
    import dataclasses

    import latent_fm as lf
    ckpt = Path("out/latent_fm/ckpt.pt")
    if ckpt.exists():
        model, cfg = lf.from_checkpoint(str(ckpt), device)
        vae, note = model.vae, "demo checkpoint"
    else:
        cfg = lf.Config(**lf.PRESETS["digits"])
        vae = lf.load_vae(cfg, device)
        torch.manual_seed(0)
        model = lf.build(cfg, vae).to(device).eval()
        with torch.no_grad():  # off the zero init, so sampling is not trivially linear
            for p in model.parameters():
                p.add_(0.02 * torch.randn_like(p))
        note = "random weights (run `python latent_fm.py` first for trained ones)"
    B = cfg.batch_size
    x, y = common.load_digits("train", cfg.img_size)
    mean, std = lf.encode_moments(vae, common.to_float(x[:B].to(device)))
    y = y[:B].to(device)
    trained = copy.deepcopy(model).train()  # the samplers below time and score the checkpoint's weights
    opt = torch.optim.AdamW(trained.parameters(), lr=1e-4)

    def step():
        z0 = mean + std * torch.randn_like(std)
        lf.lfm_loss(trained, z0, y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    ms = timeit(step, device)
    yield dict(model="latent_fm", variant=f"digits train step B={B}", ms=ms, per_s=B / ms * 1e3, mem=peak_mb(device),
               note=f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params, 16 tokens")
    n = 100
    labels = torch.arange(n, device=device) % 10
    z1 = torch.randn(n, model.C, model.S, model.S, generator=torch.Generator().manual_seed(0)).to(device)
    per_nfe = {}
    for sampler, steps in (("euler", 16), ("heun", 16), ("dopri5", 0)):
        for s in (1.0, cfg.guidance if cfg.guidance != 1 else 1.5):
            c = dataclasses.replace(cfg, sampler=sampler, sample_steps=steps or 16, guidance=s)
            nfe = lf.sample(model, c, z1, labels)[1]
            t = timeit(lambda: vae.decode(lf.sample(model, c, z1, labels)[0]), device, 1, 3)
            per_nfe[(sampler, s)] = t / nfe
            yield dict(model="latent_fm", variant=f"sample B={n}, {sampler}{steps or ''}, s={s}", ms=t,
                       per_s=n / t * 1e3, mem=peak_mb(device),
                       note=f"{nfe} NFE, {t / n:.2f} ms/image{', 2B per forward' if s != 1 else ''}; {note}")
    g = cfg.guidance if cfg.guidance != 1 else 1.5
    yield dict(ratio="latent_fm guided / unguided time per network evaluation (Euler; one forward of 2B vs B)",
               value=per_nfe[("euler", g)] / per_nfe[("euler", 1.0)])
    if not ckpt.exists():
        return
    for row in raag_table(model, cfg, vae):
        yield row


# On the digits demo rho = |v_c - v_u| / |v_u| runs from ~0.25 at t = 1 to ~0.08 at t = 0 (measured), so the code
# defaults (18, 12) give w ~1.9 early and ~7.5 late; the grid spans gentler settings too.
CFG_GRID = (1.25, 1.5, 2.0)
RAAG_GRID = ((2.0, 4.0), (3.0, 12.0), (5.0, 12.0), (18.0, 12.0))


def raag_table(model, cfg, vae, steps=(4, 8, 16, 32), n=1000):
    """FD / accuracy against Euler steps for CFG (grid over s) and RAAG (grid over w_max, alpha; per-sample ratio);
    prints the sweep and the table, yields one ratio row per cell."""
    import dataclasses

    import latent_fm as lf
    y = torch.arange(n) % 10
    best = {}
    for k in steps:
        for rule, grid in (("cfg", CFG_GRID), ("raag", RAAG_GRID)):
            results = []
            for setting in grid:
                kw = dict(guidance=setting) if rule == "cfg" else dict(raag_w_max=setting[0], raag_alpha=setting[1])
                c = dataclasses.replace(cfg, sampler="euler", sample_steps=k, guidance_rule=rule, **kw)
                t0 = time.time()
                imgs, _ = lf.generate(model, c, vae, n, y, seed=7)
                m = common.digits_metrics(imgs, y)
                results.append((setting, m))
                print(f"  euler {k:2d} {rule:4s} {setting!s:12s} FD {m['fd']:.2f} acc {m['accuracy']:.3f} "
                      f"({time.time() - t0:.0f}s)", flush=True)
            best[(k, rule)] = min(results, key=lambda r: r[1]["fd"])
    floor = best[(steps[0], "cfg")][1]["fd_floor"]
    print(f"\nRAAG vs CFG on the digits demo, {n} samples, Euler steps; FD (real-data floor {floor:.2f}) / accuracy at "
          f"each rule's best setting (lowest FD of its grid)")
    print(f"{'steps':>5} | {'CFG s':>6} {'FD':>6} {'acc':>6} | {'RAAG (w_max, a)':>16} {'FD':>6} {'acc':>6}")
    for k in steps:
        (s, mc), (wa, mr) = best[(k, "cfg")], best[(k, "raag")]
        print(f"{k:>5} | {s:>6} {mc['fd']:6.2f} {mc['accuracy']:6.3f} | {str(wa):>16} {mr['fd']:6.2f} "
              f"{mr['accuracy']:6.3f}")
        yield dict(ratio=f"latent_fm Euler {k}: CFG s={s} FD {mc['fd']:.2f} acc {mc['accuracy']:.3f}; RAAG {wa} FD "
                         f"{mr['fd']:.2f} acc {mr['accuracy']:.3f}; RAAG/CFG FD", value=mr["fd"] / mc["fd"])


@bench("arflow")
def bench_arflow(device):
    """ARFlow: a training step with hybrid attention against the full-softmax baseline over the same S images, at the
    digits demo size and as S grows (hybrid: linear in S; softmax: quadratic in its attention); then sampling time and
    memory against the number of steps (hybrid: a fixed-size state; softmax: a KV cache that grows every step)."""
    import dataclasses

    import arflow as af

    def model(cfg, perturb=0.02):
        torch.manual_seed(0)
        m = af.ARFlow(cfg, cfg.channels, cfg.img_size).to(device)
        with torch.no_grad():  # off the identity init, so every branch computes something
            for p in m.parameters():
                p.add_(perturb * torch.randn_like(p))
        return m

    def train_ms(cfg, B):
        m = model(cfg)
        g = torch.Generator().manual_seed(0)
        S, C, H = cfg.seq_len, cfg.channels, cfg.img_size
        x, eps = (torch.randn(B, S, C, H, H, generator=g).to(device) for _ in range(2))
        t = torch.rand(B, S, generator=g).sort(1).values.to(device)
        y = torch.arange(B, device=device) % cfg.num_classes
        opt = torch.optim.AdamW(m.parameters(), lr=1e-4)

        def step():
            af.flow_loss(m, x, t, eps, y).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return timeit(step, device, 1, 3), m

    # 1. the digits demo (8x8, 16 tokens per image, S = 5)
    demo = af.Config(**af.PRESETS["digits"])
    ms = {}
    for att in ("hybrid", "softmax"):
        ms[att], _ = train_ms(dataclasses.replace(demo, attention=att), demo.batch_size)
        yield dict(model="arflow", variant=f"digits train step, {att}", ms=ms[att],
                   per_s=demo.batch_size / ms[att] * 1e3, mem=peak_mb(device),
                   note=f"B={demo.batch_size} sequences x S=5 images x 4 tokens")
    yield dict(ratio="arflow digits train step, full softmax / hybrid at S=5", value=ms["softmax"] / ms["hybrid"])

    # 2. growth with S at 64 tokens per image (16x16, patch 2): where the cross-image attention is a real cost
    big = dataclasses.replace(af.Config(data="synthetic.npz", img_size=16, channels=4, num_classes=10),
                              width=128 if device.type == "cpu" else 512, heads=4 if device.type == "cpu" else 8,
                              depth=2 if device.type == "cpu" else 8)
    B = 4 if device.type == "cpu" else 16
    grid = (5, 10, 20, 40) if device.type == "cpu" else (5, 10, 20, 40, 80)
    times = {att: {} for att in ("hybrid", "softmax")}
    for S in grid:
        for att in times:
            times[att][S], _ = train_ms(dataclasses.replace(big, attention=att, seq_len=S), B)
            yield dict(model="arflow", variant=f"train step S={S}, {att}", ms=times[att][S],
                       per_s=B * S / times[att][S] * 1e3, mem=peak_mb(device),
                       note=f"images/s; B={B}, 64 tokens/image, width {big.width}, depth {big.depth}")
    for att in times:
        yield dict(ratio=f"arflow {att} train step time S={grid[-1]} / S=5 (S x{grid[-1] // 5})",
                   value=times[att][grid[-1]] / times[att][5])
    yield dict(ratio="arflow full softmax / hybrid train step at S=5 (64 tokens/image)",
               value=times["softmax"][5] / times["hybrid"][5])
    yield dict(ratio=f"arflow full softmax / hybrid train step at S={grid[-1]} (64 tokens/image)",
               value=times["softmax"][grid[-1]] / times["hybrid"][grid[-1]])

    # 3. sampling: time and memory against the number of steps (guided: 2B rows), 64 tokens per image
    Bs = 16
    y = torch.arange(Bs, device=device) % 10
    res = {}
    for att in ("hybrid", "softmax"):
        m = model(dataclasses.replace(big, attention=att)).eval()
        for steps in (25, 50, 100, 200):
            cfg = dataclasses.replace(big, attention=att, sampler="euler", sample_steps=steps, guidance=2.0)
            z = torch.randn(Bs, 4, 16, 16, device=device)
            peak_mb(device)  # reset the peak
            t = timeit(lambda m=m, cfg=cfg, z=z: af.sample(m, y, cfg, z=z), device, 0, 1)
            state = m.new_state(2 * Bs, steps + 1)
            state_mb = sum((s.k.numel() + s.v.numel()) * s.k.element_size() if att == "softmax"
                           else 2 * Bs * big.heads * (big.width // big.heads) ** 2 * 4 for s in state) / 2**20
            res[att, steps] = (t, state_mb)
            yield dict(model="arflow", variant=f"sample {steps} steps, {att}", ms=t, per_s=Bs / t * 1e3,
                       mem=peak_mb(device), note=f"B={Bs} guided; attention state {state_mb:.2f} MB")
    for att in ("hybrid", "softmax"):
        yield dict(ratio=f"arflow {att} sampling time 200 / 25 steps (x8 steps)",
                   value=res[att, 200][0] / res[att, 25][0])
        yield dict(ratio=f"arflow {att} attention-state memory 200 / 25 steps",
                   value=res[att, 200][1] / res[att, 25][1])


def _svmem(cfg_kw, frames, window_frames, device):
    """(peak sampling memory MB, deep KV-cache MB) of a guided batch of 16 videos. CUDA: max allocated above the
    model. CPU: the peak of the running sum of the profiler's allocation records (RSS high-water marks are set by the
    imports long before sampling, so they cannot see it)."""
    import starflow_v as sv
    from torch.profiler import ProfilerActivity, profile
    cfg = sv.Config(**{**cfg_kw, "frames": window_frames})
    torch.manual_seed(0)
    model = sv.STARFlowV(cfg, *sv.latent_shape(cfg)).to(device).eval()
    c = dataclasses.replace(cfg, long_frames=frames if frames > window_frames else 0, guidance=1.0)
    cond = model.make_cond(torch.arange(16, device=device) % 10)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        sv.sample(model, cond, c)
        peak = torch.cuda.max_memory_allocated() - base
    else:
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            sv.sample(model, cond, c)
        live = peak = 0
        for e in sorted((e for e in prof.events() if e.self_cpu_memory_usage), key=lambda e: e.time_range.start):
            live += e.self_cpu_memory_usage
            peak = max(peak, live)
    cache = sum(2 * cc.k.numel() * cc.k.element_size() for cc in model.deep.new_caches(
        32, window_frames * model.N, device, torch.float32))
    return peak / 2**20, cache / 2**20


@bench("starflow_v")
def bench_starflow_v(device):
    """STARFlow-V: the demo's train step with and without flow-score matching; sampling a video at the demo size,
    sequential (KV cache) vs Jacobi vs video-aware Jacobi with warm start (network evaluations and wall time, batch 1
    and 16, deep-block evaluations in the note); peak sampling memory against the number of generated frames with the
    sliding window (flat) and against the window (linear); on GPU, sampling at a larger size."""
    import starflow_v as sv
    ckpt = Path("out/starflow_v/ckpt.pt")
    if ckpt.exists():  # Jacobi's speed depends on the trained model's dependencies, so prefer the demo checkpoint
        model, cfg = sv.from_checkpoint(str(ckpt), device)
        note = "demo checkpoint"
    else:
        cfg = sv.Config(**sv.PRESETS["moving-digits"])
        torch.manual_seed(0)
        model = sv.STARFlowV(cfg, *sv.latent_shape(cfg)).to(device)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.02 * torch.randn_like(p))
        note = "random weights (run `python starflow_v.py` first for trained ones)"

    # 1. train step, demo batch, on a copy: the samplers below must time the checkpoint's weights, not a few more steps
    videos, labels, _, _ = sv.moving_digits(cfg, "train")
    B = cfg.batch_size
    x, y = common.to_float(videos[:B]).to(device), labels[:B].to(device)
    trained = copy.deepcopy(model).train()
    opt = sv.make_optimizer(trained, cfg)
    ms = {}
    for den in (False, True):
        def step(den=den):
            loss, _ = sv.train_loss(trained, x, trained.make_cond(y), cfg.noise_std, den)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        ms[den] = timeit(step, device, 1, 3)
        yield dict(model="starflow_v", variant=f"demo train step{', + flow-score matching' if den else ''}",
                   ms=ms[den], per_s=B / ms[den] * 1e3, mem=peak_mb(device), note=f"videos/s; B={B}, {model.T} "
                   f"frames x {model.N} tokens")
    yield dict(ratio="starflow_v train step with / without flow-score matching (ScoreTap)",
               value=ms[True] / ms[False])

    # 2. sampling: sequential vs Jacobi vs warm-started Jacobi. From the prior, and from the noise of real test
    # videos (z = f(x)), whose frames repeat most of the frame before them
    test, test_labels, _, _ = sv.moving_digits(cfg, "test")
    jac = dict(sampler="jacobi", jacobi_chunk=16, jacobi_chunk_video=32, jacobi_max_iter=32, jacobi_threshold=1e-7)
    variants = {"sequential": dict(sampler="sequential"), "jacobi cold": dict(jac, jacobi_warm_start=False),
                "jacobi warm": dict(jac, jacobi_warm_start=True)}
    for B in (1, 16):
        cond = model.make_cond(test_labels[:B].to(device))
        with torch.no_grad():
            xr = common.to_float(test[:B]).to(device)
            xr = xr + cfg.noise_std * torch.randn(xr.shape, generator=torch.Generator().manual_seed(0)).to(device)
            z_real = model(xr, cond)[0]
            z_static = model(xr[:, :1].expand_as(xr), cond)[0]  # the first frame held: a fully redundant video
        z_prior = torch.randn(z_real.shape, generator=torch.Generator().manual_seed(1)).to(device)
        for zname, z in (("prior", z_prior), ("real videos", z_real), ("static videos", z_static)):
            res = {}
            for name, kw in variants.items():
                c = dataclasses.replace(cfg, denoise="none", guidance=0.0, **kw)
                deep_nfe = []
                orig = model.deep.reverse

                def spy(*a, orig=orig, log=deep_nfe, **k):
                    out = orig(*a, **k)
                    log.append(out[1])
                    return out
                model.deep.reverse = spy
                res[name] = sv.sample(model, cond, c, z=z)
                del model.deep.reverse
                t = timeit(lambda c=c, cond=cond, z=z: sv.sample(model, cond, c, z=z), device, 1, 3)
                res[name + "_ms"] = t
                diff = (res[name][0] - res["sequential"][0]).abs().max().item()
                yield dict(model="starflow_v", variant=f"sample B={B}, {name}, z {zname}", ms=t, per_s=B / t * 1e3,
                           mem=peak_mb(device), note=f"{res[name][1]} evals ({deep_nfe[0]} deep); max |diff| to "
                           f"sequential {diff:.1e}; {note}")
            yield dict(ratio=f"starflow_v evals cold / warm Jacobi, B={B}, z {zname}",
                       value=res["jacobi cold"][1] / res["jacobi warm"][1])
            yield dict(ratio=f"starflow_v wall time sequential / warm Jacobi, B={B}, z {zname}",
                       value=res["sequential_ms"] / res["jacobi warm_ms"])

    # 3. memory against frames: a 4-frame window sliding over 4..32 frames (flat), and windows of 4..16 frames
    kw = {k: v for k, v in sv.PRESETS["moving-digits"].items() if k in ("img_size", "patch_size", "layers")}
    kw["width"] = 256  # wide enough that the KV cache and activations, not small temporaries, set the peak
    flat, lin = {}, {}
    for frames, window in [(4, 4), (8, 4), (16, 4), (32, 4), (8, 8), (16, 16)]:
        mb, cache = _svmem(kw, frames, window, device)
        (flat if window == 4 else lin)[frames] = mb
        if frames == window:
            lin[frames] = mb
        what = "profiled peak of live tensors" if device.type != "cuda" else "peak allocation above the model"
        yield dict(model="starflow_v", variant=f"sample {frames} frames, window {window}", ms=float("nan"),
                   per_s=float("nan"), mem=mb, note=f"B=16 guided, width 256; {what}; deep KV "
                   f"cache {cache:.2f} MB")
    yield dict(ratio="starflow_v peak sampling memory, 32 / 4 frames with a 4-frame window", value=flat[32] / flat[4])
    yield dict(ratio="starflow_v peak sampling memory, window 16 / window 4 (16 / 4 frames)", value=lin[16] / lin[4])

    if device.type != "cuda":
        return
    # 4. GPU: a larger video (32x32 canvas, patch 2: 256 tokens a frame, 8 frames) at batch 1
    big = sv.Config(img_size=(32, 32), digit_size=16, frames=8, patch_size=2, width=512, head_dim=64,
                    layers=(2, 2, 8), denoiser_layers=2)
    torch.manual_seed(0)
    m = sv.STARFlowV(big, *sv.latent_shape(big)).to(device).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.02 * torch.randn_like(p))
    cond = m.make_cond(torch.tensor([3], device=device))
    z = torch.randn(1, m.T * m.N, m.D, device=device)
    res = {}
    for name, kw in variants.items():
        gpu = {**kw, "jacobi_chunk": 64, "jacobi_chunk_video": 256, "jacobi_max_iter": 256} if "jacobi" in name else kw
        c = dataclasses.replace(big, denoise="none", guidance=0.0, **gpu)
        res[name] = timeit(lambda c=c: sv.sample(m, cond, c, z=z), device, 1, 3)
        yield dict(model="starflow_v", variant=f"GPU 8x32x32 sample B=1, {name}", ms=res[name], per_s=1e3 / res[name],
                   mem=peak_mb(device), note=f"{sv.sample(m, cond, c, z=z)[1]} evals, random weights")
    yield dict(ratio="starflow_v GPU B=1 wall time sequential / warm Jacobi", value=res["sequential"] /
               res["jacobi warm"])


def _wanvae_peak(arch, T, size, device):
    """(peak MB above the weights and the input, ms) of one encode + decode of a (1, C, T, size, size) video."""
    import resource
    torch.manual_seed(0)
    ae = common.AutoencoderKLWan(**arch).to(device).eval()
    x = torch.rand(1, ae.channels, T, size, size, device=device) * 2 - 1
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    t = time.perf_counter()
    with torch.no_grad():
        ae.decode(ae.encode(x)[0])
    if device.type == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return (peak - base) / 2**20, (time.perf_counter() - t) * 1e3


@bench("wanvae")
def bench_wanvae(device):
    """Wan2.1 video VAE encode + decode of 17 and 65 frames: chunked causal processing keeps peak memory flat
    apart from the video itself. CPU: a fresh process per run (max RSS is a per-process high-water mark)."""
    import multiprocessing as mp
    cuda = device.type == "cuda"
    arch, size = (common.VIDEO_VAE_FAMILIES["wan2.1"]["arch"], 256) if cuda else (dict(base_dim=32), 64)
    peak = {}
    for T in (17, 65):
        if cuda:
            mb, ms = _wanvae_peak(arch, T, size, device)
        else:
            with mp.get_context("spawn").Pool(1) as pool:
                mb, ms = pool.apply(_wanvae_peak, (arch, T, size, device))
        peak[T] = mb
        video = 2 * 3 * T * size * size * 4 / 2**20  # input + output video, fp32
        yield dict(model="wanvae", variant=f"Wan2.1{'' if cuda else ' base_dim 32'} enc+dec {T}x{size}x{size}",
                   ms=ms, per_s=T / ms * 1e3, mem=mb,
                   note=f"{'' if cuda else 'max RSS '}above weights+input; video in+out {video:.1f} MB; 1 run, cold")
    yield dict(ratio="wanvae peak memory 65 / 17 frames", value=peak[65] / peak[17])


# ======================================================================================================================
# --gpu: the paper-size figures of one GPU as one JSON line. Every entry is measured on its own: peak memory
# reset, one warmup call (compilation and allocator growth happen there), then timed calls with CUDA synchronised; an
# exception (an OOM, a compile error) becomes that entry's {"error": ...} and the rest still run; an entry whose kind
# took longer last time than the budget has left is {"skipped": "budget"}. Models have random weights: nothing
# downloads.

H200_BF16_TFLOPS = 989.0  # NVIDIA H200 (as H100) SXM dense bf16 tensor-core peak, TFLOP/s (1979 is with 2:4 sparsity)
SAMPLERS = ("sequential", "jacobi", "compiled")
FLOPS_METHOD = ("torch.utils.flop_counter.FlopCounterMode over one forward + backward of the same micro-batch on the "
                "meta device (shapes only), gradient checkpointing off: model FLOPs, recomputation excluded; matmul, "
                "convolution and attention FLOPs, attention counted in full (causal masks not halved), the optimizer "
                "step not counted. mogfn: counted over one real step on the device (its rollouts read the host)")


@dataclasses.dataclass
class TrainSpec:
    """One file's paper-preset training step. make_loss(model, cfg) draws a micro-batch on the model's device once and
    returns the closure of its loss, so that the meta device can run it too (the FLOP count)."""
    preset: str
    cfg: object
    build: object  # cfg -> model, on the current default device
    make_loss: object
    batch: int  # micro-batch per GPU
    tokens: int  # tokens per micro-batch; 0 where tokens make no sense (items/s only)
    unit: str  # what an item is
    note: str
    meta_flops: bool = True  # False: the step reads values on the host (rollouts), so one real step is counted


def _null(B, p, dev):
    return torch.rand(B, device=dev) < p  # the label / caption dropout of training


def _labels(B, cfg, dev):
    """Random class labels, the null label (num_classes) at the training dropout rate."""
    return torch.where(_null(B, cfg.label_drop, dev), cfg.num_classes, torch.randint(cfg.num_classes, (B,), device=dev))


def _spec_starflow(tiny: bool, device) -> TrainSpec:
    import starflow as sf
    small = dict(img_size=32, width=32, head_dim=16, layers=(1,) * 5 + (2,))
    cfg = sf.Config(**{**sf.PRESETS["imagenet256"], **(small if tiny else {})})
    C, S = sf.latent_shape(cfg)
    B, T = (2 if tiny else 32), (S // cfg.patch_size) ** 2

    def make_loss(m, cfg):
        dev = next(m.parameters()).device
        x = torch.randn(B, C, S, S, device=dev)
        cond = m.make_cond(torch.randint(cfg.num_classes, (B,), device=dev), null=_null(B, cfg.label_drop, dev),
                           check=False)
        return lambda: sf.nll_loss(m, x, cond, cfg.noise_std, cfg.latent_reg)
    return TrainSpec("imagenet256", cfg, lambda c: sf.STARFlow(c, C, S), make_loss, B, B * T, "images",
                     "micro-batch 32: the preset's batch 256 on 8 GPUs")


def _spec_starflow_v(tiny: bool, device) -> TrainSpec:
    import starflow_v as sv
    small = dict(img_size=(32, 48), frames=9, width=48, deep_width=72, head_dim=24, layers=(1,) * 5 + (2,),
                 denoiser_layers=2, txt_dim=8, txt_len=4)
    cfg = sv.Config(**{**sv.PRESETS["t2v-480p"], **(small if tiny else {})})
    C, H, W, T = sv.latent_shape(cfg)
    B, N = 1, (H // cfg.patch_size) * (W // cfg.patch_size)

    def make_loss(m, cfg):
        dev = next(m.parameters()).device
        x = torch.randn(B, T, C, H, W, device=dev)
        pad = (torch.arange(cfg.txt_len, device=dev) < (cfg.txt_len + 1) // 2).expand(B, -1)  # captions half padding
        cond = m.make_cond(text=torch.randn(B, cfg.txt_len, cfg.txt_dim, device=dev), text_mask=pad,
                           null=_null(B, cfg.label_drop, dev), batch=B, check=False)
        return lambda: sv.train_loss(m, x, cond, cfg.noise_std, bool(cfg.denoiser_layers), sv.loss_weight(cfg))[0]
    return TrainSpec("t2v-480p", cfg, lambda c: sv.STARFlowV(c, C, H, W, T), make_loss, B, B * T * N, "videos",
                     f"the whole model (every layer), bf16 weights, gradients and AdamW states (8 bytes a "
                     f"parameter; no fp32 master copy: FSDP2 would shard one over the nodes), gradient checkpointing "
                     f"as the preset; micro-batch 1 video of {T} latent frames x {N} tokens + {cfg.txt_len} caption "
                     f"tokens")


def _spec_arflow(tiny: bool, device) -> TrainSpec:
    import arflow as af
    cfg = af.Config(**{**af.PRESETS["imagenet256"], **(dict(img_size=32, width=32, depth=2, heads=2) if tiny else {})})
    C, side = af.latent_shape(cfg)
    B, S = (2 if tiny else 8), cfg.seq_len

    def make_loss(m, cfg):
        dev = next(m.parameters()).device
        x, eps = torch.randn(B, S, C, side, side, device=dev), torch.randn(B, S, C, side, side, device=dev)
        t = torch.rand(B, S, device=dev).sort(1).values
        y = _labels(B, cfg, dev)
        return lambda: af.flow_loss(m, x, t, eps, y)
    return TrainSpec("imagenet256", cfg, lambda c: af.ARFlow(c, C, side), make_loss, B,
                     B * S * (side // cfg.patch_size) ** 2, "sequences",
                     f"micro-batch 8 sequences of {S} images: the preset's 64 on 8 GPUs")


def _spec_latent_fm(tiny: bool, device) -> TrainSpec:
    import types

    import latent_fm as lf
    small = dict(arch="", width=32, depth=2, heads=2, img_size=32)
    cfg = lf.Config(**{**lf.PRESETS["imagenet256"], **(small if tiny else {})})
    sd_vae = types.SimpleNamespace(latent_channels=4, downsample=8)  # the SD VAE's latent shape (no weights needed)
    S, B = cfg.img_size // sd_vae.downsample, (2 if tiny else 160)

    def make_loss(m, cfg):
        dev = next(m.parameters()).device
        z0 = torch.randn(B, sd_vae.latent_channels, S, S, device=dev)
        y = _labels(B, cfg, dev)
        return lambda: lf.lfm_loss(m, z0, y)
    return TrainSpec("imagenet256", cfg, lambda c: lf.build(c, sd_vae), make_loss, B, B * (S // cfg.patch_size) ** 2,
                     "images", "DiT-B/2, micro-batch 160: the paper's 8 processes x 160")


def _spec_wcfm(tiny: bool, device) -> TrainSpec:
    import wcfm
    small = dict(image_size=8, width=32, ch_mult=(1, 2), attn_res=(4,), num_res_blocks=1)
    cfg = wcfm.Config(**{**wcfm.PRESETS["cifar10"], **(small if tiny else {})})
    shape, B = wcfm.data_shape(cfg), (2 if tiny else 128)
    # kappa only scales W-CFM's pair weights, not the work: the preset's, before its budget rule measures the data
    fm = wcfm.FlowMatcher("wcfm", cfg.sigma, math.prod(shape), cfg.kappa)

    def make_loss(m, cfg):
        dev = next(m.parameters()).device
        x0, x1 = torch.randn(B, *shape, device=dev), torch.randn(B, *shape, device=dev)
        y = torch.zeros(B, dtype=torch.long, device=dev) if cfg.num_classes else None
        return lambda: wcfm.cfm_loss(m, fm, x0, x1, y, cfg.p_uncond, cfg.num_classes)[0]
    return TrainSpec("cifar10", cfg, wcfm.build, make_loss, B, 0, "images",
                     "the 35.7M U-Net at torchcfm's batch 128 on one GPU (a U-Net has no tokens: images/s)")


def _spec_mogfn(tiny: bool, device) -> TrainSpec:
    import mogfn as mg
    # the largest preset: a transformer policy over 16-token sequences (127k parameters; the hypergrids' are MLPs)
    small = dict(width=16, depth=1, batch_size=2)
    cfg = mg.Config(**{**mg.PRESETS["ngrams-3obj"], **(small if tiny else {}), "device": torch.device(device).type})

    def make_loss(m, cfg):
        dev = next(m.parameters()).device
        loss_fn = mg.train_loss_fn(m, cfg, common.Dist(device=dev))
        return lambda: loss_fn(m, [], common.At(0, slice(0, cfg.batch_size)))[0]
    return TrainSpec("ngrams-3obj", cfg, lambda c: mg.build(c, device), make_loss, cfg.batch_size, 0, "trajectories",
                     "one step: the policy's rollouts (no grad) and the trajectory-balance loss; a 127k-parameter "
                     "model, so its MFU is tiny by nature", meta_flops=False)


TRAIN_SPECS = {"starflow": _spec_starflow, "starflow_v": _spec_starflow_v, "arflow": _spec_arflow,
               "latent_fm": _spec_latent_fm, "wcfm": _spec_wcfm, "mogfn": _spec_mogfn}


@dataclasses.dataclass
class GpuRun:
    device: torch.device
    dtype: torch.dtype
    tiny: bool
    peak_tflops: float
    deadline: float  # time.perf_counter() at which the budget ends
    samplers: tuple
    cost: dict = dataclasses.field(default_factory=dict)  # seconds the last entry of each kind took


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _cast(model, dtype):
    """bf16 as FSDP2's MixedPrecisionPolicy(param_dtype=bf16) runs a model (common.as_fsdp_bf16), or fp32 as it is."""
    return common.as_fsdp_bf16(model) if dtype == torch.bfloat16 else model


def _gb(device) -> float | None:
    mb = peak_mb(device)  # (and resets the peak)
    return None if mb is None else round(mb / 1024, 3)


def _call_ms(fn, device) -> float:
    _sync(device)
    t = time.perf_counter()
    fn()
    _sync(device)
    return (time.perf_counter() - t) * 1e3


def _measure(fn, device, min_iters: int, target_s: float = 3.0, warmup: bool = True) -> dict:
    """Median ms of at least min_iters timed calls, up to 5 while they fit in about target_s, after one warmup call.
    warmup=False times the first call too: an eager sampler's call is thousands of identical steps, whose one-time
    costs are a rounding error once the train steps have warmed CUDA up (and a 7B sequential call takes many
    seconds)."""
    first = _call_ms(fn, device)
    iters = max(min_iters, min(5, int(target_s * 1e3 / max(first, 1e-3))))
    if warmup:
        return dict(ms=timeit(fn, device, 0, iters), first_call_ms=round(first, 2), iters=iters)
    times = sorted([first] + [_call_ms(fn, device) for _ in range(iters - 1)])
    return dict(ms=times[len(times) // 2], iters=iters)


def _entry(run: GpuRun, kind: str, fn) -> dict:
    """fn()'s dict, {"error": ...} if it raised, {"skipped": "budget"} if the last entry of its kind would not fit."""
    start = time.perf_counter()
    if start + run.cost.get(kind, 0.0) > run.deadline:
        return {"skipped": "budget"}
    if run.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    try:
        out = fn()
    except Exception as e:  # noqa: BLE001 -- one failure is that entry's result, the script goes on
        out = {"error": f"{type(e).__name__}: {e}"[:500]}
    gc.collect()  # (the entry's models and, after an error, its traceback's tensors)
    if run.device.type == "cuda":
        torch.cuda.empty_cache()
    run.cost[kind] = time.perf_counter() - start
    out["wall_s"] = round(run.cost[kind], 2)
    print(f"[bench --gpu] {kind}: {json.dumps(out)[:300]}", file=sys.stderr, flush=True)
    return out


def count_flops(spec: TrainSpec, dtype) -> int:
    """Model FLOPs of one training micro-batch (forward + backward) on the meta device; see FLOPS_METHOD."""
    from torch.utils.flop_counter import FlopCounterMode
    cfg = dataclasses.replace(spec.cfg, grad_ckpt=False) if hasattr(spec.cfg, "grad_ckpt") else spec.cfg
    with torch.device("meta"):
        model = _cast(spec.build(cfg), dtype).train()
        loss = spec.make_loss(model, cfg)
        with FlopCounterMode(display=False) as counter:
            loss().backward()
    return counter.get_total_flops()


def _train_entry(run: GpuRun, spec: TrainSpec) -> dict:
    from torch.utils.flop_counter import FlopCounterMode
    dev = run.device
    flops = count_flops(spec, run.dtype) if spec.meta_flops else None
    torch.manual_seed(0)
    with dev:
        model = _cast(spec.build(spec.cfg), run.dtype).train()
    loss = spec.make_loss(model, spec.cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=dev.type == "cuda")

    def step():
        loss().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    if flops is None:  # one real step, counted (its first call's costs are outside the timing below too)
        with FlopCounterMode(display=False) as counter:
            step()
        flops = counter.get_total_flops()
    t = _measure(step, dev, min_iters=2)
    per_s = 1e3 / t["ms"]
    out = dict(preset=spec.preset, params=sum(p.numel() for p in model.parameters()), batch=spec.batch,
               unit=spec.unit, **t, items_per_s=spec.batch * per_s)
    if spec.tokens:
        out.update(tokens_per_step=spec.tokens, tokens_per_s=spec.tokens * per_s)
    out.update(flops_per_step=flops, achieved_tflops=flops * per_s / 1e12,
               mfu=flops * per_s / (run.peak_tflops * 1e12), grad_ckpt=bool(getattr(spec.cfg, "grad_ckpt", False)),
               peak_mem_gb=_gb(dev), note=spec.note)
    return out


# --- sampling: STARFlow and STARFlow-V, sequential (KV cache) vs Jacobi vs the compiled one-token step -------------

def _off_identity(model):
    """Random weights, but the zero-initialised output layers (every flow starts as the identity, which Jacobi
    would solve in one iteration) drawn N(0, 0.02^2), so each token depends on the ones before it."""
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.normal_(0, 0.02)
    return model


@dataclasses.dataclass
class SampleSpec:
    info: dict  # what was measured, for the JSON
    cfgs: dict  # sampler name -> config (or the reason it has none)
    cond: object  # B -> the condition
    z: object  # B -> prior noise
    sample: object  # (cfg, cond, z) -> (x, nfe)
    kv_bytes: int  # KV cache per sample (both guidance branches, bf16)


def _sample_starflow(run: GpuRun) -> SampleSpec:
    import starflow as sf
    small = dict(img_size=32, width=32, head_dim=16, layers=(1,) * 5 + (2,), jacobi_threshold=1e-7)
    cfg = sf.Config(**{**sf.PRESETS["imagenet256"], **(small if run.tiny else {}), "denoise": False})
    torch.manual_seed(0)
    with run.device:
        m = _cast(_off_identity(sf.STARFlow(cfg, *sf.latent_shape(cfg))), run.dtype).eval()
    kv = max(2 * len(b.layers) * (b.prefix + b.seq_len) * cfg.width * 2 * (2 if b.conditioned else 1)
             for b in m.blocks)  # (starflow.dry_run's count)
    cfgs = {"sequential": dataclasses.replace(cfg, sampler="sequential"),
            "jacobi": dataclasses.replace(cfg, sampler="jacobi"),
            "compiled": dataclasses.replace(cfg, sampler="sequential", compile=True)}
    info = dict(preset="imagenet256", params=sum(p.numel() for p in m.parameters()), tokens=m.T, blocks=len(m.blocks),
                guidance=cfg.guidance, jacobi=dict(chunk=cfg.jacobi_chunk, max_iter=cfg.jacobi_max_iter,
                                                   threshold=cfg.jacobi_threshold),
                note="the preset's model with random weights: Jacobi's iteration counts are not a trained model's; "
                     "the score-based denoising step is not included; compiled: the sequential sampler under "
                     "--compile (one-token step through torch.compile, compilation in first_call_ms)")
    return SampleSpec(info, cfgs, lambda B: m.make_cond(torch.arange(B, device=run.device) % cfg.num_classes),
                      lambda B: torch.randn(B, m.T, m.D, device=run.device,
                                            generator=torch.Generator(run.device).manual_seed(0)),
                      lambda c, cond, z: sf.sample(m, cond, c, z=z), kv)


def _sample_starflow_v(run: GpuRun) -> SampleSpec:
    import starflow_v as sv
    small = dict(img_size=(32, 48), frames=9, width=48, deep_width=72, head_dim=24, layers=(1,) * 5 + (2,),
                 denoiser_layers=2, txt_dim=8, txt_len=4, jacobi_threshold=1e-7)
    # 5 frames (2 latent frames, 3,180 tokens) of the preset's 81: its 33,390 tokens one at a time through a 24-layer
    # 4096-wide deep block would take minutes per video, past this script's whole budget
    cfg = sv.Config(**{**sv.PRESETS["t2v-480p"], **(small if run.tiny else {"frames": 5}), "denoise": "none"})
    C, H, W, T = sv.latent_shape(cfg)
    torch.manual_seed(0)
    with run.device:
        m = _cast(_off_identity(sv.STARFlowV(cfg, C, H, W, T)), run.dtype).eval()
    n, wd = m.N, cfg.deep_width or cfg.width
    kv = 8 * (cfg.layers[-1] * (T * n + cfg.txt_len) * wd + sum(cfg.layers[:-1]) * n * cfg.width)  # (dry_run's)
    cfgs = {"sequential": dataclasses.replace(cfg, sampler="sequential"),
            "jacobi": dataclasses.replace(cfg, sampler="jacobi"),
            "compiled": "starflow_v.py's sampler has no compiled step (--compile compiles its training forward)"}
    info = dict(preset="t2v-480p", params=sum(p.numel() for p in m.parameters()), frames=cfg.frames,
                latent_frames=T, tokens=T * n, caption_tokens=cfg.txt_len, guidance=cfg.guidance,
                jacobi=dict(chunk=cfg.jacobi_chunk, chunk_video=cfg.jacobi_chunk_video, max_iter=cfg.jacobi_max_iter,
                            threshold=cfg.jacobi_threshold, warm_start=cfg.jacobi_warm_start),
                note="the preset's whole model, random weights, on a short clip (the preset's 81 frames are 33,390 "
                     "tokens: sequential decoding would not fit the budget); denoiser step not included")

    def cond(B):
        text = torch.randn(B, cfg.txt_len, cfg.txt_dim, device=run.device,
                           generator=torch.Generator(run.device).manual_seed(1))
        return m.make_cond(text=text)
    return SampleSpec(info, cfgs, cond, lambda B: torch.randn(B, T * n, m.D, device=run.device,
                                                              generator=torch.Generator(run.device).manual_seed(0)),
                      lambda c, cond, z: sv.sample(m, cond, c, z=z), kv)


SAMPLE_SPECS = {"starflow": _sample_starflow, "starflow_v": _sample_starflow_v}


def _sample_entry(run: GpuRun, spec: SampleSpec, name: str, B: int, seq: dict, warmup: bool) -> dict:
    c = spec.cfgs[name]
    cond, z, held = spec.cond(B), spec.z(B), {}
    peak_mb(run.device)

    def call():
        held["out"] = spec.sample(c, cond, z)
    t = _measure(call, run.device, min_iters=1, warmup=warmup)
    x, nfe = held["out"]
    out = dict(**t, samples_per_s=B * 1e3 / t["ms"], nfe=nfe, peak_mem_gb=_gb(run.device))
    if name == "sequential":
        seq[B] = x
    elif B in seq:  # sanity: the same noise and condition give the same samples (to bf16 / Jacobi's threshold)
        out.update(max_abs_diff_vs_sequential=(x.float() - seq[B].float()).abs().max().item(),
                   sequential_max_abs=seq[B].float().abs().max().item())
    return out


def _sampling(run: GpuRun) -> dict:
    """Batch-major (every sampler of both files at B=1, then 16, then 64), so a budget cut drops large batches. A
    sequential call of the 7B STARFlow-V takes tens of seconds, so only the compiled sampler has a warmup call (a
    graph per batch size: that first call is the compilation, in first_call_ms)."""
    out, specs, seq = {}, {}, {}
    for f, make in SAMPLE_SPECS.items():
        def build(f=f, make=make):
            specs[f] = make(run)
            info = dict(specs[f].info, kv_cache_gb_per_sample=round(specs[f].kv_bytes / 2**30, 3))
            if run.device.type == "cuda":  # batches whose guided KV cache fits half the GPU
                total = torch.cuda.get_device_properties(run.device).total_memory
                info["batches_dropped_for_memory"] = [B for B in (16, 64) if B * specs[f].kv_bytes > total / 2]
            return info
        out[f] = {"model": _entry(run, f"sample model {f}", build)}
        seq[f] = {}
    batches = (1, 2) if run.tiny else (1, 16, 64)
    for B in batches:
        for f, spec in specs.items():
            row = out[f][f"B={B}"] = {}
            for name in SAMPLERS:
                if isinstance(spec.cfgs[name], str):
                    row[name] = {"skipped": spec.cfgs[name]}
                elif name not in run.samplers:
                    row[name] = {"skipped": "not asked (--samplers)"}
                elif B in out[f]["model"].get("batches_dropped_for_memory", ()):
                    row[name] = {"skipped": f"memory: the KV cache of {B} samples is "
                                            f"{B * spec.kv_bytes / 2**30:.0f} GB"}
                else:
                    row[name] = _entry(run, f"sample {f} {name}", lambda: _sample_entry(
                        run, spec, name, B, seq[f], warmup=name == "compiled"))
        for f in seq:
            seq[f].pop(B, None)
    for f in out:
        if f not in specs:
            out[f]["skipped"] = "its model did not build"
    return out


# --- the Wan VAE at 480p -----------------------------------------------------------------------------------------

def _wanvae_entry(run: GpuRun, family: str) -> dict:
    arch = dict(common.VIDEO_VAE_FAMILIES[family]["arch"])
    (H, W), T = ((32, 32), 5) if run.tiny else ((480, 832), 17)
    if run.tiny:
        arch.update(base_dim=8, decoder_base_dim=8)
    torch.manual_seed(0)
    with run.device:
        ae = common.AutoencoderKLWan(**arch).to(run.dtype).eval()
    x = torch.rand(1, ae.channels, T, H, W, device=run.device, dtype=run.dtype) * 2 - 1
    peak_mb(run.device)
    base = torch.cuda.memory_allocated() if run.device.type == "cuda" else 0

    @torch.no_grad()
    def call():
        ae.decode(ae.encode(x)[0])
    t = _measure(call, run.device, min_iters=1)
    peak = _gb(run.device)
    return dict(arch="tiny (base_dim 8)" if run.tiny else "released", frames=T, height=H, width=W, **t,
                frames_per_s=T * 1e3 / t["ms"], peak_mem_gb=peak,
                peak_mem_above_weights_and_input_gb=None if peak is None else round(peak - base / 2**30, 3))


def gpu_bench(device: torch.device, tiny: bool, dtype: str, peak_tflops: float, budget_s: float,
              samplers: tuple) -> dict:
    """Everything of --gpu, in priority order: train steps, the Wan VAE, then sampling (the longest)."""
    torch.backends.cuda.matmul.allow_tf32 = True  # (fp32 matmuls left: the flows' affine maps, losses)
    torch.backends.cudnn.allow_tf32 = True
    t0 = time.perf_counter()
    run = GpuRun(device, {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype], tiny, peak_tflops, t0 + budget_s,
                 samplers)
    out = dict(device=str(device), gpu=torch.cuda.get_device_name(device) if device.type == "cuda" else None,
               torch=torch.__version__, cuda=torch.version.cuda, tiny=tiny, dtype=dtype,
               precision=f"{dtype} parameters, gradients and AdamW states everywhere (" + (
                   "common.as_fsdp_bf16: FSDP2 param_dtype=bf16 compute, autocast off" if dtype == "bf16" else
                   "as built") + "); TF32 for what runs in fp32",
               peak_tflops=peak_tflops, peak_note="MFU denominator: H200 SXM dense bf16 unless --peak_tflops",
               flops_method=FLOPS_METHOD, budget_s=budget_s)
    if tiny:
        out["tiny_note"] = ("every model shrunk (width, depth, image size) at micro-batch 2 (sampling: batches 1 and "
                            "2, Jacobi to convergence); the notes describe the full size")
    out["train"] = {f: _entry(run, f"train {f}", lambda make=make: _train_entry(run, make(tiny, device)))
                    for f, make in TRAIN_SPECS.items()}
    out["wanvae"] = {fam: _entry(run, f"wanvae {fam}", lambda fam=fam: _wanvae_entry(run, fam))
                     for fam in common.VIDEO_VAE_FAMILIES}
    out["sample"] = _sampling(run)
    out["elapsed_s"] = round(time.perf_counter() - t0, 1)
    return out


def _positive(s: str) -> float:
    v = float(s)
    if not v > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {s}")
    return v


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", choices=list(GROUPS), nargs="*", help="groups to run (default: all)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    gpu = p.add_argument_group("--gpu", "one JSON line of paper-size figures (the last section of bench.py)")
    gpu.add_argument("--gpu", action="store_true", help="print the one JSON line instead of the table")
    gpu.add_argument("--tiny", action="store_true", help="every model shrunk, batches 1/2: the code path in seconds")
    gpu.add_argument("--dtype", choices=("bf16", "fp32"), help="parameters and compute (default bf16)")
    gpu.add_argument("--peak_tflops", type=_positive, help=f"the MFU denominator (default {H200_BF16_TFLOPS:g}: "
                     "H200 dense bf16)")
    gpu.add_argument("--budget_s", type=_positive, help="seconds; later entries are skipped past it (default 480)")
    gpu.add_argument("--samplers", choices=SAMPLERS, nargs="+", help="samplers timed (default: all three; on a CPU "
                     "sequential and jacobi: inductor's C++ compilation of the compiled step takes minutes there)")
    args = p.parse_args(argv)
    try:
        device = torch.device(args.device)
    except RuntimeError as e:
        p.error(f"--device {args.device}: {e}")
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device here")
    gpu_only = [f"--{k}" for k in ("tiny", "dtype", "peak_tflops", "budget_s", "samplers") if getattr(args, k)]
    if not args.gpu:
        if gpu_only:
            p.error(f"{', '.join(gpu_only)} only go with --gpu")
        return table(args, device)
    if args.only is not None:
        p.error("--only selects groups of the table; --gpu runs its own fixed list")
    if device.type != "cuda" and not args.tiny:
        p.error("--gpu at paper size needs a CUDA device; on a CPU pass --tiny")
    with contextlib.redirect_stdout(sys.stderr):  # stdout carries the one JSON line only
        out = gpu_bench(device, args.tiny, args.dtype or "bf16", args.peak_tflops or H200_BF16_TFLOPS,
                        args.budget_s or 480.0, tuple(args.samplers or (SAMPLERS if device.type == "cuda" else
                                                                        ("sequential", "jacobi"))))
    print(json.dumps(out))


def table(args, device):
    """The speed table of the @bench groups."""
    print(f"device: {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}, "
          f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    print(f"{'model':<10} {'variant':<40} {'ms':>10} {'items/s':>10} {'peak MB':>9}  note")
    ratios = []
    for name in args.only or GROUPS:
        for row in GROUPS[name](device):
            if "ratio" in row:
                ratios.append(row)
                continue
            mem = f"{row['mem']:.0f}" if row["mem"] is not None else "-"
            print(f"{row['model']:<10} {row['variant']:<40} {row['ms']:>10.2f} {row['per_s']:>10.1f} {mem:>9}  "
                  f"{row['note']}")
    for r in ratios:
        print(f"ratio: {r['ratio']}: {r['value']:.2f}x")


if __name__ == "__main__":
    main()
