"""
W-CFM: Weighted Conditional Flow Matching, next to its I-CFM and OT-CFM baselines, with batched ODE samplers and
SourceFM's pruned, norm-aligned Gaussian source. One file, PyTorch only (scipy optional).

Papers
    Weighted Conditional Flow Matching. S. Calvo-Ordonez, M. Meunier, A. Cartea, C. Reisinger, Y. Gal,
    J. M. Hernandez-Lobato, 2025, arXiv:2507.22270. There is no official code.
    Improving and Generalizing Flow-Based Generative Models with Minibatch Optimal Transport (I-CFM, OT-CFM).
    A. Tong et al., TMLR 2024 (the torchcfm library: its 2D examples and CIFAR-10 recipe are the reference here).
    Is There a Better Source Distribution than Gaussian? Exploring Source Distributions for Image Flow Matching
    (SourceFM; code: github.com/kwanseokk/SourceFM): pruned Gaussian sampling and norm alignment.

The method. Draw x0 ~ mu and x1 ~ nu independently, put x_t = (1 - t) x0 + t x1 + sigma z on the straight path and
regress v(x_t, t) onto u = x1 - x0. I-CFM stops there; OT-CFM re-pairs the minibatch by an exact OT assignment
(O(B^2 d + B^3) per step); W-CFM weights each pair by the Gibbs kernel w = exp(-c(x0, x1) / eps) (O(B d)).
w mu nu / Z is the entropic-OT plan between mu and nu TILTED by tau0(x) = E_y w(x, y) and tau1(y) = E_x w(x, y): the
flow learnt carries mu~ to nu~, and is sampled from mu. So eps = kappa sqrt(d) trades straight, OT-like paths (small
eps) against the tilt, W-CFM's error on the end metric (large eps: I-CFM).

Ambiguities, and the choices made here
  * Cost |x0 - x1|^2 (`--cost euclidean` to compare): the entropic-OT derivation's, and the one for which
    eps = kappa sqrt(d) keeps c / eps fluctuating by O(1) in any dimension.
  * Weights divided by their batch mean, after subtracting the largest log weight: the self-normalised loss under the
    tilted plan (the paper's minimiser, at I-CFM's scale), never underflowing (CIFAR-10 pairs have c ~ 4000: the raw
    exp(-c/eps) is 0 in float32 below kappa ~ 0.7), and exactly 1 as kappa -> inf, where the loss is I-CFM's.
  * kappa: the paper takes the smallest grid kappa where the tilts' Var(tau) / E[tau]^2 "starts to flatten"
    (`--kappa_rule elbow`: the later of the two marginals' points farthest below the chord of log(1 + relvar) against
    log kappa). That still tilts a lot (8 Gaussians -> moons: kappa 6.3, source relvar 0.31, W2 3x I-CFM's), so the
    presets use a tilt budget (`--kappa_rule budget`: the smallest grid kappa from which on both relvars stay
    <= --tilt_budget, 0.01 from the README's sweep). Both see the pairs training sees, norm alignment included.
  * OT-CFM's assignment is a permutation of the batch (torchcfm draws pairs from the plan with replacement); without
    scipy a log-domain Sinkhorn plan with a small regularisation gives each x0 a partner drawn from its row.
  * SourceFM as released. `--norm_align` scales x0 by E|x1| / E|x0| in training and sampling (`X0_NormAlign`);
    `--norm_align_side x1` scales the data by E|x0| / E|x1| and divides samples by it. Both learn the same flow up to
    a global scale, (s x0, x1) = s (x0, x1 / s), but with x1 the net's inputs and targets are 1/s times larger (2x on
    CIFAR-10) while sigma and eps stay absolute: relatively 1/s less path noise, 1/s^2 more tilt. `--prune` (images)
    keeps x0 ~ N(0, I) iff its cosine to every accepted direction (a +-PC of the L2-normalised data that some data
    point reaches, cosine > tau) is <= tau_r: the released sampler's rule (the paper's text reads as the converse),
    under which tau_r = 0.048 was tuned on CIFAR-10. A random cosine has std 1/sqrt(d): 0.048 is 2.66 std at d = 3072,
    and the digits preset keeps 2.66 std, 0.33 at d = 64 (at 0.048 no unit vector survives there: each has a cosine
    >= 1/8 with one of +-64 orthonormal directions). The x0 scale applies after pruning, which tests directions only.
  * The U-Net embeds t in [0, 1] with sinusoids as torchcfm's UNetModel does (no x1000 diffusion-step scaling).

Data: 2D toys generated here (8gaussians and moons as in torchcfm's examples, moon arcs drawn uniformly); images: the
scikit-learn digits (CPU demo), or your own images with `--target cifar10 --data`: a CIFAR-10-style `.npz` (`images`
uint8 (N, H, W, C), optional `labels`) or an image folder (flat, or one subfolder per class), at the size and channels
of the images unless `--image_size` / `--channels` (or `--preset cifar10`: 32) say otherwise.

Run
    python wcfm.py                                   # 8 Gaussians -> moons: I-CFM, OT-CFM, W-CFM at two kappa (CPU)
    python wcfm.py --preset mog-5gaussians           # mixture of Gaussians -> 5 Gaussians, the same comparison
    python wcfm.py --preset digits                   # class-conditional W-CFM U-Net on 8x8 digits (CPU, minutes)
    torchrun --nproc_per_node=8 wcfm.py --preset cifar10 --data cifar10_train.npz   # torchcfm's recipe, GPUs
    python wcfm.py --target cifar10 --data my_images/  # your images (flat or class folders), at their own size
    python wcfm.py --select-kappa [--preset ...]     # the tilt curve, the budget and the elbow choice of kappa
    python wcfm.py --eval [--ckpt out/wcfm/wcfm/ckpt.pt]  # W2 at 1-8 Euler steps / 100 / dopri5, straightness, NPE
    python wcfm.py --sample --ckpt out/wcfm/wcfm/ckpt.pt --n 2000 --out s.npz [--sampler dopri5] [--prune]
    torchrun --nproc_per_node=2 wcfm.py -- --sample --ckpt out/wcfm/wcfm/ckpt.pt --n 2000 --out s.npz
                                      # ("--": torchrun's parser would otherwise claim --n as an abbreviation)
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import math
import re
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

try:  # installed, this file is flowzoo.<name> beside flowzoo.common; run or copied, common.py sits next to it
    from . import common
except ImportError:
    import common

# ----------------------------------------------------------------------------------------------------------------------
# Config

COUPLINGS = ("icfm", "otcfm", "wcfm")
LABELS = {"icfm": "I-CFM", "otcfm": "OT-CFM", "wcfm": "W-CFM"}
HAS_SCIPY = importlib.util.find_spec("scipy") is not None
TOYS = ("gaussian", "8gaussians", "moons", "mog", "5gaussians")  # gaussian: the image source, and torchcfm's CFM one
SAMPLERS = common.ODE_METHODS  # euler, heun, rk4, dopri5
KAPPA_GRID = np.logspace(-2, 3, 26)  # 5 per decade
FEW_STEPS = (1, 2, 4, 8)  # the Euler step counts --eval reports W2 at


@dataclass
class Config(common.TrainConfig):
    source: str = common.opt("8gaussians", choices=TOYS)  # 2D source toy; images always start from N(0, I)
    target: str = common.opt("moons", choices=TOYS + ("digits", "cifar10"))  # a 2D toy | digits | cifar10
    data: str = ""  # --target cifar10: image folder (flat or class subfolders) | .npz: images (N,H,W,C) uint8 [labels]
    image_size: int = common.opt(32, min=1)  # image side (read from --data unless given; folders are resized, digits upsampled)
    channels: int = common.opt(3, min=1)  # image channels of --data (read from it unless given; digits are grey)
    hflip: bool = False  # random horizontal flips of the images (training, and the pruning PCA)
    coupling: str = "wcfm"  # icfm | otcfm | wcfm | wcfm:KAPPA; a comma-separated list trains each side by side
    sigma: float = 0.1  # std of the Gaussian around the straight conditional path
    kappa: float = common.opt(63.1, gt=0)  # W-CFM: eps = kappa * sqrt(d) (set by --kappa_rule unless fixed)
    kappa_rule: str = common.opt("fixed", choices=("fixed", "budget", "elbow"))  # fixed (--kappa) | budget | elbow
    tilt_budget: float = common.opt(0.01, gt=0)  # budget rule: both tilts' Var(tau)/E[tau]^2 stay <= this
    cost: str = common.opt("sqeuclidean", choices=("sqeuclidean", "euclidean"))  # W-CFM cost c(x0, x1)
    ot_solver: str = common.opt("auto", choices=("auto", "exact", "sinkhorn"))  # OT-CFM (auto: exact with scipy)
    norm_align: bool = False  # SourceFM norm alignment: match E|x0| and E|x1| in training, undone at sampling
    norm_align_side: str = common.opt("x0", choices=("x0", "x1"))  # which side it scales: x0 (released) | x1
    width: int = common.opt(64, min=1)  # MLP width (2D) or U-Net base channels (images)
    depth: int = common.opt(3, min=1)  # MLP hidden layers
    ch_mult: tuple = common.opt((1, 2, 2, 2), min=1)  # U-Net channel multipliers per resolution
    num_res_blocks: int = common.opt(2, min=1)  # U-Net residual blocks per resolution
    attn_res: tuple = (16,)  # U-Net resolutions with self-attention
    dropout: float = common.opt(0.1, max=0.99)  # U-Net dropout
    num_classes: int = 0  # class-conditional with this many classes (0 = unconditional)
    p_uncond: float = common.opt(0.1, max=1)  # label dropout, for classifier-free guidance
    sampler: str = common.opt("euler", choices=SAMPLERS)  # euler | heun | rk4 | dopri5
    sample_steps: int = common.opt(100, min=1)  # steps of the fixed-step samplers
    atol: float = common.opt(1e-4, gt=0)  # dopri5 absolute tolerance
    rtol: float = common.opt(1e-4, gt=0)  # dopri5 relative tolerance
    guidance: float = 1.0  # classifier-free guidance weight (1 = plain conditional)
    prune: bool = False  # SourceFM: sample x0 from the pruned Gaussian (image targets)
    prune_tau: float = 0.01  # a direction is accepted if some normalised data point projects above this
    prune_tau_r: float = 0.048  # keep x0 if its cosine to every accepted direction is <= this (CIFAR-10's value)
    eval_n: int = common.opt(2000, min=2)  # samples for --eval (and the side-by-side table)

    NAME = "wcfm"
    RENAMED = {"data_path": "data"}  # checkpoints from before --data_path became --data
    LEGACY = {"channels": 3}  # checkpoints from before --channels: RGB
    RUNTIME = ("sampler", "sample_steps", "atol", "rtol", "guidance", "prune", "prune_tau", "prune_tau_r", "eval_n")

    def __post_init__(self):
        super().__post_init__()
        runs(self.coupling)  # checks every entry
        if self.num_classes and not is_image(self):
            raise ValueError("class conditioning (--num_classes) is for image targets only")
        if self.guidance != 1.0 and not self.num_classes:
            raise ValueError("--guidance needs a class-conditional model (--num_classes > 0)")
        if self.prune and not is_image(self):
            raise ValueError("--prune prunes pixel directions: it is for image targets (digits, cifar10)")
        if self.norm_align_side != "x0" and not self.norm_align:
            raise ValueError(f"--norm_align_side {self.norm_align_side} needs --norm_align")
        if self.data and self.target != "cifar10":  # never ignored: the toys and the digits are built in
            raise ValueError(f"--data is read for --target cifar10 (your own images), not --target {self.target}")


def runs(spec: str) -> list[tuple[str, str, float | None]]:
    """'icfm,otcfm,wcfm,wcfm:6.31' -> [(name, coupling, kappa or None)]: wcfm:K is W-CFM at kappa K."""
    out = []
    for item in (s.strip() for s in spec.split(",")):
        c, colon, k = item.partition(":")
        kappa = (float(k) if re.fullmatch(r"\d*\.?\d+(e[-+]?\d+)?", k) else -1.0) if colon else None
        if c not in COUPLINGS or (colon and (c != "wcfm" or not kappa > 0)):
            raise ValueError(f"--coupling {item!r} is not one of: icfm, otcfm, wcfm, wcfm:KAPPA")
        out.append((item, c, kappa))
    return out


_TOY_2D = dict(steps=20000, batch_size=256, lr=1e-3, lr_schedule="constant", warmup=0, weight_decay=0.0, beta2=0.999,
               grad_clip=0.0, ema_decay=0.999, log_every=200, eval_every=5000, ckpt_every=5000)
PRESETS = {
    # torchcfm's 2D protocol: sigma 0.1, batch 256, 20k plain Adam steps at 1e-3, 3x64 SELU MLP; plus an EMA of the
    # weights for sampling (training is unchanged): the last constant-lr iterate's W2 swings 0.4-0.9 from seed to seed
    # (--ema_decay 0 for the bare protocol). kappa: the tilt-budget choice of --select-kappa for each pair; the demo
    # also trains W-CFM at the paper's elbow (wcfm:KAPPA).
    "8gaussians-moons": dict(_TOY_2D, kappa=63.1, coupling="icfm,otcfm,wcfm,wcfm:6.31"),
    "mog-5gaussians": dict(_TOY_2D, source="mog", target="5gaussians", kappa=25.1,
                           coupling="icfm,otcfm,wcfm,wcfm:3.98"),
    "digits": dict(target="digits", image_size=8, coupling="wcfm", sigma=0.0, kappa=25.1,
                   width=32, ch_mult=(1, 2), num_res_blocks=1, attn_res=(4,), dropout=0.0, num_classes=10,
                   steps=2000, batch_size=64, lr=1e-3, warmup=200, ema_decay=0.999, eval_every=500,
                   ckpt_every=500, eval_n=1000, prune_tau_r=0.33),  # 2.66 std of a random cosine, as 0.048 at 3072
    # torchcfm's CIFAR-10 recipe: 128 channels, [1, 2, 2, 2], attention at 16, dropout 0.1, Adam 2e-4, warmup 5k,
    # grad clip 1, EMA 0.9999, batch 128, sigma 0; kappa by the tilt budget, measured on the data before training
    "cifar10": dict(target="cifar10", image_size=32, hflip=True, coupling="wcfm", sigma=0.0, kappa_rule="budget",
                    width=128, steps=400000, batch_size=128, lr=2e-4, lr_schedule="constant",
                    warmup=5000, weight_decay=0.0, beta2=0.999, grad_clip=1.0, ema_decay=0.9999, eval_every=20000,
                    ckpt_every=20000, sampler="dopri5", atol=1e-5, rtol=1e-5, eval_n=2000),
}


def is_image(cfg: Config) -> bool:  # images start from N(0, I); 2D toys from cfg.source
    return cfg.target in ("digits", "cifar10")


# ----------------------------------------------------------------------------------------------------------------------
# Couplings: independent, exact minibatch OT, and Gibbs weights; the tilt and the choice of kappa


def cost_matrix(x0: torch.Tensor, x1: torch.Tensor, cost: str = "sqeuclidean") -> torch.Tensor:
    """c(x0_i, x1_j) of all pairs, (B0, B1); float64 so large squared norms do not cancel."""
    a, b = x0.flatten(1).double(), x1.flatten(1).double()
    sq = (a.square().sum(1, keepdim=True) + b.square().sum(1) - 2 * a @ b.T).clamp(min=0)
    return sq if cost == "sqeuclidean" else sq.sqrt()


def assignment(c: torch.Tensor) -> torch.Tensor:
    """The exact OT assignment of a square cost matrix: j = perm[i] minimises sum_i c[i, perm[i]]."""
    try:
        from scipy.optimize import linear_sum_assignment
    except ImportError:
        raise ImportError("the exact OT assignment needs scipy: pip install scipy") from None
    _, cols = linear_sum_assignment(c.detach().cpu().numpy())
    return torch.as_tensor(cols, device=c.device)


def sinkhorn(c: torch.Tensor, reg: float, iters: int = 1000, tol: float = 1e-6) -> torch.Tensor:
    """Entropic OT plan between uniform marginals, min <P, c> - reg H(P), in the log domain (no underflow at small
    reg). (n, m) -> plan (n, m) summing to 1."""
    c = c.double()
    n, m = c.shape
    log_a, log_b = c.new_full((n,), -math.log(n)), c.new_full((m,), -math.log(m))
    f, g = torch.zeros_like(log_a), torch.zeros_like(log_b)
    for i in range(iters):
        f = reg * (log_a - torch.logsumexp((g[None] - c) / reg, 1))
        g = reg * (log_b - torch.logsumexp((f[:, None] - c) / reg, 0))  # the columns now match exactly
        if i % 10 == 9 and (torch.logsumexp((f[:, None] + g[None] - c) / reg, 1) - log_a).abs().max() < tol:
            break  # ... and the rows too
    return ((f[:, None] + g[None] - c) / reg).exp()


def ot_partner(x0: torch.Tensor, x1: torch.Tensor, solver: str) -> torch.Tensor:
    """For each x0_i the index of its minibatch-OT partner in x1 (squared Euclidean cost)."""
    c = cost_matrix(x0, x1)
    if solver == "exact":
        return assignment(c)
    plan = sinkhorn(c / c.mean(), reg=0.01, tol=1e-2)  # small regularisation on the cost scaled to mean 1; rows
    # within 1% of uniform is enough to draw partners (~150 iterations, 0.15 s at B = 256 on one core)
    return torch.multinomial(plan.float(), 1).squeeze(1)  # a partner per row: the x0 marginal stays exact


class FlowMatcher:
    """Couples a minibatch, weights its pairs and places points on the straight conditional path."""

    def __init__(self, coupling: str, sigma: float, dim: int, kappa: float = 1.0, cost: str = "sqeuclidean",
                 ot_solver: str = "auto"):
        if coupling not in COUPLINGS:
            raise ValueError(f"coupling must be one of {COUPLINGS}, got {coupling!r}")
        if not kappa > 0:
            raise ValueError(f"eps = kappa * sqrt(d) must be > 0, got kappa = {kappa}")
        self.coupling, self.sigma, self.cost = coupling, sigma, cost
        self.eps = kappa * math.sqrt(dim)
        self.ot_solver = ("exact" if HAS_SCIPY else "sinkhorn") if ot_solver == "auto" else ot_solver

    def describe(self) -> str:
        return {"icfm": "independent pairs",
                "wcfm": f"Gibbs weights / batch mean, c = {self.cost}, eps = {self.eps:.4g}",
                "otcfm": "exact minibatch OT (scipy linear_sum_assignment)" if self.ot_solver == "exact" else
                "minibatch OT by a Sinkhorn plan (reg 0.01 x mean cost; scipy not used)"}[self.coupling]

    def pair_weights(self, u: torch.Tensor) -> torch.Tensor:
        """Gibbs weights of the pairs from their displacements u = x1 - x0, (B, ...) -> (B,), divided by their batch
        mean. exp(l - max l) keeps one weight at 1 (nothing underflows to an all-zero batch) and makes every weight
        exactly 1 when all l agree to float precision (kappa -> inf: I-CFM)."""
        c = u.float().flatten(1).square().sum(1)  # (B,)
        lw = (c if self.cost == "sqeuclidean" else c.sqrt()) * (-1 / self.eps)
        e = (lw - lw.max()).exp_()
        return e / e.mean()

    def couple(self, x0: torch.Tensor, x1: torch.Tensor, y: torch.Tensor | None = None):
        """-> (x0, x1, y): the pairs to train on (OT-CFM re-pairs the batch). Labels y travel with x1."""
        if x0.shape != x1.shape:
            raise ValueError(f"x0 and x1 must have the same shape, got {tuple(x0.shape)} and {tuple(x1.shape)}")
        if self.coupling == "otcfm":
            j = ot_partner(x0, x1, self.ot_solver)
            x1, y = x1[j], (y[j] if y is not None else None)
        return x0, x1, y

    def path(self, x0, x1, t, noise):
        """x_t = (1 - t) x0 + t x1 + sigma * noise and its conditional velocity u = x1 - x0."""
        tb = t.view(-1, *[1] * (x0.dim() - 1))
        return (1 - tb) * x0 + tb * x1 + self.sigma * noise, x1 - x0


def _lme(a: torch.Tensor, dim: int = 0) -> torch.Tensor:  # log mean exp
    return torch.logsumexp(a, dim) - math.log(a.shape[dim])


def tilt_relvar(c: torch.Tensor, eps: float) -> tuple[float, float]:
    """Var(tau) / E[tau]^2 of the tilts tau0(x) = E_y w(x, y) (source, rows) and tau1(y) = E_x w(x, y) (target,
    columns) from a cost matrix c (n, m) of two samples, in log space."""
    lk = -c / eps
    return tuple(float(torch.expm1(_lme(2 * lt) - 2 * _lme(lt))) for lt in (_lme(lk, 1), _lme(lk, 0)))


def log_tilt(x: torch.Tensor, ref: torch.Tensor, eps: float, cost: str, chunk: int = 4096) -> torch.Tensor:
    """log tau(x_i) = log mean_j exp(-c(x_i, ref_j) / eps), (N,): the tilt of x's marginal against the sample ref of
    the other side (c is symmetric, so one function serves both)."""
    return torch.cat([_lme(-cost_matrix(x[i:i + chunk], ref, cost) / eps, 1) for i in range(0, len(x), chunk)])


def elbow(x: list[float], y: list[float]) -> int:
    """Index of the elbow of a decreasing curve: the point farthest below its chord, both axes scaled to [0, 1]."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    return int(np.argmax(1 - (x - x[0]) / (x[-1] - x[0]) - (y - y[-1]) / max(y[0] - y[-1], 1e-300)))


def choose_kappa(rows: list[tuple], rule: str, budget: float) -> float:
    """kappa from the tilt curve rows [(kappa, relvar_source, relvar_target)] on an increasing grid. budget: the
    smallest kappa from which on both relvars stay <= budget (sampling noise makes the tail wiggle). elbow: each
    marginal's elbow of log(1 + relvar) against log kappa; the later of the two."""
    if rule == "elbow":
        logk = [math.log(r[0]) for r in rows]
        return float(rows[max(elbow(logk, [math.log1p(r[i]) for r in rows]) for i in (1, 2))][0])
    over = [i for i, r in enumerate(rows) if max(r[1], r[2]) > budget]
    if over and over[-1] == len(rows) - 1:
        raise ValueError(f"no kappa up to {rows[-1][0]:.4g} keeps the tilt relvar <= --tilt_budget {budget}")
    return float(rows[over[-1] + 1 if over else 0][0])


# ----------------------------------------------------------------------------------------------------------------------
# Loss


def cfm_loss(net, fm: FlowMatcher, x0, x1, y=None, p_uncond: float = 0.0, null: int = 0):
    """E_t E_pairs w * |v(x_t, t, y) - u|^2 (mean over dimensions; w = 1 but for W-CFM) -> (loss, logs)."""
    x0, x1, y = fm.couple(x0, x1, y)
    if y is not None and p_uncond > 0:  # drop labels so that the same net also learns the unconditional field
        y = torch.where(torch.rand(len(y), device=y.device) < p_uncond, null, y)
    t = torch.rand(len(x0), device=x0.device)
    xt, ut = fm.path(x0, x1, t, torch.randn_like(x0))
    err = (net(xt, t, y) - ut).float().square().flatten(1).mean(1)  # (B,)
    if fm.coupling != "wcfm":
        return err.mean(), {}
    return (fm.pair_weights(ut) * err).mean(), {}  # O(B d) on top of I-CFM: W-CFM's whole overhead


# ----------------------------------------------------------------------------------------------------------------------
# Models: an MLP for 2D, a U-Net for images


class MLP(nn.Module):
    """torchcfm's 2D network: [x, t] -> depth x (Linear, SELU) -> Linear."""

    def __init__(self, dim: int, width: int, depth: int):
        super().__init__()
        sizes = [dim + 1] + [width] * depth
        self.net = nn.Sequential(*[m for a, b in zip(sizes, sizes[1:]) for m in (nn.Linear(a, b), nn.SELU())],
                                 nn.Linear(width, dim))

    def forward(self, x, t, y=None):  # (B, D), (B,) -> (B, D)
        return self.net(torch.cat([x, t[:, None]], 1))


def group_norm(ch: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(32, ch // 4), ch)


def time_features(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal features of t in [0, 1], (B,) -> (B, dim), with torchcfm's frequencies 10000^(-k / (dim/2)) and t
    as it is (DDPM code multiplies t by its 1000 steps first; torchcfm, whose recipe this is, does not)."""
    freqs = torch.exp(-math.log(10000) * torch.arange(dim // 2, device=t.device) / (dim // 2))
    a = t.float()[:, None] * freqs
    return torch.cat([a.cos(), a.sin()], 1)


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv, plus the time/label embedding, then GroupNorm-SiLU-dropout-conv, plus a skip."""

    def __init__(self, cin: int, cout: int, emb: int, dropout: float):
        super().__init__()
        self.norm1, self.conv1 = group_norm(cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.emb = nn.Linear(emb, cout)
        self.norm2, self.drop, self.conv2 = group_norm(cout), nn.Dropout(dropout), nn.Conv2d(cout, cout, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)  # each block starts as its skip path
        nn.init.zeros_(self.conv2.bias)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x, emb):  # (B, Cin, H, W), (B, E) -> (B, Cout, H, W)
        h = self.conv1(F.silu(self.norm1(x))) + self.emb(emb)[:, :, None, None]
        return self.skip(x) + self.conv2(self.drop(F.silu(self.norm2(h))))


class AttnBlock(nn.Module):
    """Self-attention over the H*W positions (64 channels per head), residual."""

    def __init__(self, ch: int):
        super().__init__()
        self.norm, self.attn = group_norm(ch), common.Attention(ch, max(1, ch // 64))

    def forward(self, x, emb=None):
        B, C, H, W = x.shape
        h = self.attn(self.norm(x).flatten(2).transpose(1, 2))  # (B, H*W, C)
        return x + h.transpose(1, 2).reshape(B, C, H, W)


class Resample(nn.Module):
    """Halve (stride-2 conv) or double (nearest, then conv) the resolution."""

    def __init__(self, ch: int, up: bool):
        super().__init__()
        self.up, self.conv = up, nn.Conv2d(ch, ch, 3, stride=1 if up else 2, padding=1)

    def forward(self, x, emb=None):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest") if self.up else x)


class Stage(nn.ModuleList):
    def forward(self, x, emb):
        for m in self:
            x = m(x, emb)
        return x


class UNet(nn.Module):
    """The DDPM-style U-Net of torchcfm's CIFAR-10 recipe, with an optional label embedding (index num_classes
    means "no label", which classifier-free guidance needs)."""

    def __init__(self, channels: int, size: int, width: int, mult: tuple, n_res: int, attn_res: tuple,
                 dropout: float, num_classes: int):
        super().__init__()
        emb, self.width, self.num_classes = 4 * width, width, num_classes
        self.time = nn.Sequential(nn.Linear(width, emb), nn.SiLU(), nn.Linear(emb, emb))
        self.label = nn.Embedding(num_classes + 1, emb) if num_classes else None
        self.inp = nn.Conv2d(channels, width, 3, padding=1)
        self.down, self.up, skips, ch, res = nn.ModuleList(), nn.ModuleList(), [width], width, size
        for i, m in enumerate(mult):
            for _ in range(n_res):
                self.down.append(Stage([ResBlock(ch, width * m, emb, dropout)]
                                       + ([AttnBlock(width * m)] if res in attn_res else [])))
                ch = width * m
                skips.append(ch)
            if i < len(mult) - 1:
                self.down.append(Resample(ch, up=False))
                skips.append(ch)
                res //= 2
        self.mid = Stage([ResBlock(ch, ch, emb, dropout), AttnBlock(ch), ResBlock(ch, ch, emb, dropout)])
        for i, m in reversed(list(enumerate(mult))):
            for _ in range(n_res + 1):  # one more block than on the way down: it takes the resampling's skip
                self.up.append(Stage([ResBlock(ch + skips.pop(), width * m, emb, dropout)]
                                     + ([AttnBlock(width * m)] if res in attn_res else [])))
                ch = width * m
            if i > 0:
                self.up.append(Resample(ch, up=True))
                res *= 2
        self.out = nn.Sequential(group_norm(ch), nn.SiLU(), nn.Conv2d(ch, channels, 3, padding=1))
        nn.init.zeros_(self.out[-1].weight)
        nn.init.zeros_(self.out[-1].bias)

    def forward(self, x, t, y=None):  # (B, C, H, W), (B,), (B,) or None -> (B, C, H, W)
        emb = self.time(time_features(t, self.width).to(x.dtype))  # (bf16 under FSDP2's bf16 parameters)
        if self.label is not None:
            emb = emb + self.label(y if y is not None else torch.full_like(t, self.num_classes, dtype=torch.long))
        h = self.inp(x)
        hs = [h]
        for blk in self.down:
            h = blk(h, emb)
            hs.append(h)
        h = self.mid(h, emb)
        for blk in self.up:
            h = blk(h, emb) if isinstance(blk, Resample) else blk(torch.cat([h, hs.pop()], 1), emb)
        return self.out(h)


class Flow(nn.Module):
    """The velocity field v(x, t, y) and the norm-alignment scales: training pairs are (x0 * x0_scale, x1 * x1_scale),
    so sampling starts from x0 * x0_scale and divides the result by x1_scale."""

    def __init__(self, cfg: Config, shape: tuple):
        super().__init__()
        self.shape, self.num_classes = shape, cfg.num_classes
        self.net = MLP(shape[0], cfg.width, cfg.depth) if len(shape) == 1 else \
            UNet(shape[0], shape[1], cfg.width, cfg.ch_mult, cfg.num_res_blocks, cfg.attn_res, cfg.dropout,
                 cfg.num_classes)
        self.register_buffer("x0_scale", torch.ones(()))
        self.register_buffer("x1_scale", torch.ones(()))

    def forward(self, x, t, y=None):
        return self.net(x, t, y)


# ----------------------------------------------------------------------------------------------------------------------
# Samplers: common.odeint (Euler / Heun / RK4 / dopri5 with an NFE counter and the path energy), guidance, and
# SourceFM's pruned source


def velocity(model: Flow, y: torch.Tensor | None = None, guidance: float = 1.0):
    """f(t, x) for the integrators. With labels and guidance w != 1, both branches run as one batch and
    v = v(x, t, null) + w * (v(x, t, y) - v(x, t, null))."""
    def f(t, x):
        tt = torch.full((len(x),), t, device=x.device)
        if y is None or guidance == 1.0:
            return model(x, tt, y)
        v = model(torch.cat([x, x]), torch.cat([tt, tt]), torch.cat([y, torch.full_like(y, model.num_classes)]))
        v_cond, v_null = v.chunk(2)
        return v_null + guidance * (v_cond - v_null)
    return f


class SourcePruner:
    """SourceFM's pruned Gaussian as released (2_pruning/find_pruning_axis_with_pca.py, utils/pruned.py): x0 is kept
    iff its cosine to every accepted direction (a +-PC of the normalised data that some data point reaches) <= tau_r."""

    def __init__(self, data: torch.Tensor, tau: float, tau_r: float, chunk: int = 8192):
        x = F.normalize(data.flatten(1).double(), dim=1)  # (N, D)
        _, vecs = torch.linalg.eigh(torch.cov(x.T))  # (D, D), columns are the principal directions
        v = torch.cat([vecs, -vecs], 1)  # (D, 2D)
        gamma = torch.stack([(x[i:i + chunk] @ v).amax(0) for i in range(0, len(x), chunk)]).amax(0)  # (2D,)
        self.dirs = v[:, gamma > tau].float()  # (D, |A|): the accepted directions
        self.tau_r = tau_r

    def keep(self, x0: torch.Tensor) -> torch.Tensor:
        """(B, ...) -> (B,) bool: True where x0's cosine to every accepted direction is <= tau_r."""
        if self.dirs.shape[1] == 0:
            return torch.ones(len(x0), dtype=torch.bool, device=x0.device)
        return (F.normalize(x0.flatten(1).float(), dim=1) @ self.dirs.to(x0.device)).amax(1) <= self.tau_r

    def sample(self, n: int, shape: tuple, g: torch.Generator) -> tuple[torch.Tensor, float, int]:
        """(n kept draws, rejection rate, number drawn). Candidates come in chunks of n from g."""
        kept, drawn = [], 0
        while sum(len(k) for k in kept) < n:
            z = torch.randn(n, *shape, generator=g)
            kept.append(z[self.keep(z)])
            drawn += n
            if drawn > 1000 * n:
                raise ValueError(f"pruning rejects nearly everything (tau_r {self.tau_r}); raise --prune_tau_r")
        k = torch.cat(kept)
        return k[:n], 1 - len(k) / drawn, drawn


def make_pruner(cfg: Config) -> SourcePruner:  # from the training images, with their flips if --hflip (as released)
    data = common.to_float(load_images(cfg)[0])
    return SourcePruner(torch.cat([data, data.flip(-1)]) if cfg.hflip else data, cfg.prune_tau, cfg.prune_tau_r)


@torch.no_grad()
def draw_source(cfg: Config, shape: tuple, n: int, seed: int, device, pruner: SourcePruner | None = None):
    """(x0 (n, *shape) on device, rejection rate or None)."""
    g = torch.Generator().manual_seed(seed)
    if pruner is not None:
        x0, rate, _ = pruner.sample(n, shape, g)
        return x0.to(device), rate
    x0 = toy(cfg.source, n, g) if len(shape) == 1 else torch.randn(n, *shape, generator=g)
    return x0.to(device), None


@torch.no_grad()
def generate(model: Flow, cfg: Config, x0, y=None, method=None, steps=None, keep_path=False) -> common.ODEResult:
    """Integrate from source draws x0 (scaled by model.x0_scale here). The result lives in the model's space: divide
    .x by model.x1_scale for data."""
    was_training = model.training
    model.eval()
    res = common.odeint(velocity(model, y, cfg.guidance), x0 * model.x0_scale, method or cfg.sampler,
                        steps or cfg.sample_steps, cfg.atol, cfg.rtol, t0=0.0, t1=1.0, keep_path=keep_path)
    model.train(was_training)
    return res


# ----------------------------------------------------------------------------------------------------------------------
# Data


def toy(name: str, n: int, g: torch.Generator) -> torch.Tensor:
    """n points of a 2D toy distribution, (n, 2), from the generator g."""
    u = lambda *s: torch.rand(*s, generator=g)  # noqa: E731
    z = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    if name == "gaussian":
        return z(n, 2)
    if name == "8gaussians":  # torchcfm passes sqrt(0.1) as the covariance matrix, so the std is 0.1 ** 0.25
        a = torch.randint(8, (n,), generator=g) * (math.pi / 4)
        return 5 * torch.stack([a.cos(), a.sin()], 1) + 0.1 ** 0.25 * z(n, 2)
    if name == "moons":  # torchdyn's moons as torchcfm uses them: arcs, a uniform diagonal jitter U(0, 0.2), * 3 - 1
        a, upper = math.pi * u(n), u(n) < 0.5
        x = torch.where(upper, a.cos(), 1 - a.cos())
        y = torch.where(upper, a.sin(), 0.5 - a.sin())
        return (torch.stack([x, y], 1) + 0.2 * u(n, 1)) * 3 - 1
    if name == "mog":  # 3 unequal Gaussians on a triangle of radius 2 (our choice: the paper gives no numbers)
        k = torch.multinomial(torch.tensor([0.5, 0.3, 0.2]), n, replacement=True, generator=g)
        a, sd = math.pi / 2 + k * (2 * math.pi / 3), torch.tensor([0.6, 0.4, 0.3])[k]
        return 2 * torch.stack([a.cos(), a.sin()], 1) + sd[:, None] * z(n, 2)
    if name == "5gaussians":  # 5 equal Gaussians on a circle of radius 4 (our choice likewise)
        a = torch.randint(5, (n,), generator=g) * (2 * math.pi / 5)
        return 4 * torch.stack([a.cos(), a.sin()], 1) + 0.3 * z(n, 2)
    raise ValueError(f"unknown 2D toy {name!r}")


def toy_batches(cfg: Config, d: common.Dist):
    """start_step -> this rank's (x0, x1) batches. Step s draws the GLOBAL batch from a generator seeded by (seed, s)
    and each rank keeps its slice: the data depend on neither the world size nor interruptions (exact --resume)."""
    if cfg.batch_size % d.world_size:
        raise ValueError(f"batch_size {cfg.batch_size} is not divisible by {d.world_size} ranks")
    per = cfg.batch_size // d.world_size

    def it(start: int):
        step = start
        while True:
            g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
            x0, x1 = toy(cfg.source, cfg.batch_size, g), toy(cfg.target, cfg.batch_size, g)
            yield x0[d.rank * per:][:per], x1[d.rank * per:][:per]
            step += 1
    return it


def load_images(cfg: Config, split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 (N, C, H, W) images and int64 labels (zeros when the data have none)."""
    if cfg.target == "digits":
        return common.load_digits(split, size=cfg.image_size)
    if not cfg.data:
        raise ValueError("--target cifar10 needs --data: an .npz with images (N, H, W, C) uint8, or an image folder")
    if Path(cfg.data).is_dir() and not list(Path(cfg.data).glob("*.npy")):
        folder = common.ImageFolder(cfg.data, cfg.image_size, cfg.channels)
        x, y = zip(*(folder[i] for i in range(len(folder))))
        return torch.stack(x), torch.tensor(y)
    arrays = common.load_arrays(cfg.data, ("images", "labels"))
    x = torch.from_numpy(np.ascontiguousarray(arrays["images"])).permute(0, 3, 1, 2).contiguous()
    if x.dtype != torch.uint8 or x.ndim != 4:
        raise ValueError(f"{cfg.data}: images must be uint8 (N, H, W, C), got {x.dtype} {tuple(x.shape)}")
    if x.shape[1:] != data_shape(cfg):  # an .npz is not resized
        raise ValueError(f"{cfg.data}: images must be (N, {cfg.image_size}, {cfg.image_size}, {cfg.channels}) uint8 "
                         f"(--image_size, --channels), got {tuple(arrays['images'].shape)}")
    y = torch.from_numpy(np.asarray(arrays["labels"])).long() if "labels" in arrays else torch.zeros(len(x)).long()
    return x, y


def target_samples(cfg: Config, n: int, seed: int) -> torch.Tensor:
    """n samples of the target in data space: (n, 2) or float (n, C, H, W)."""
    g = torch.Generator().manual_seed(seed)
    if not is_image(cfg):
        return toy(cfg.target, n, g)
    x, _ = load_images(cfg)
    idx = torch.randperm(len(x), generator=g)[:n] if n <= len(x) else torch.randint(len(x), (n,), generator=g)
    return common.to_float(x[idx])


def data_shape(cfg: Config) -> tuple:
    return (2,) if not is_image(cfg) else ((1 if cfg.target == "digits" else cfg.channels), cfg.image_size,
                                           cfg.image_size)


def norm_scales(cfg: Config) -> tuple[float, float]:
    """(x0_scale, x1_scale) of SourceFM's norm alignment, from 4096 draws of each side: x0 side (the released
    X0_NormAlign, E|x1| / E|x0|: 27.1981 / 55.4185 on CIFAR-10) or x1 side (E|x0| / E|x1|); (1, 1) without it."""
    if not cfg.norm_align:
        return 1.0, 1.0
    x1 = target_samples(cfg, 4096, cfg.seed + 5)
    x0 = draw_source(cfg, data_shape(cfg), 4096, cfg.seed + 6, "cpu")[0]
    r = float(x1.flatten(1).norm(dim=1).mean() / x0.flatten(1).norm(dim=1).mean())
    return (r, 1.0) if cfg.norm_align_side == "x0" else (1.0, 1 / r)


def tilt_curve(cfg: Config, n: int = 2048, kappas=KAPPA_GRID) -> list[tuple[float, float, float]]:
    """[(kappa, relvar_source, relvar_target)] on n pairs scaled as training scales them; one cost matrix serves
    every kappa."""
    s0, s1 = norm_scales(cfg)
    x1 = target_samples(cfg, n, cfg.seed + 2) * s1
    x0 = draw_source(cfg, data_shape(cfg), n, cfg.seed + 1, "cpu")[0] * s0
    c, root_d = cost_matrix(x0, x1, cfg.cost).float(), math.sqrt(x0[0].numel())  # float32: 2x faster, 7 digits
    return [(float(k), *tilt_relvar(c, k * root_d)) for k in kappas]


# ----------------------------------------------------------------------------------------------------------------------
# Evaluation: W2 at few and many steps, straightness, NPE, tilt


def w2(a: torch.Tensor, b: torch.Tensor, exact_max: int = 4096) -> tuple[float, str]:
    """2-Wasserstein distance of two equal-size samples: exact (assignment) up to exact_max points with scipy, else an
    entropic (Sinkhorn) estimate whose regularisation is reported."""
    c = cost_matrix(a.cpu(), b.cpu())
    if len(a) == len(b) and len(a) <= exact_max and HAS_SCIPY:
        j = assignment(c)
        return float(c[torch.arange(len(a)), j].mean().sqrt()), "exact"
    reg = 0.005 * float(c.mean())
    return float((sinkhorn(c, reg) * c).sum().sqrt()), f"sinkhorn(eps={reg:.4g})"


def straightness(res: common.ODEResult) -> float:
    """E[sum |dx|^2 / dt] / E|x(1) - x(0)|^2 - 1: 0 for straight constant-speed paths, whatever they connect."""
    return float(res.energy.mean() / (res.x - res.x0).flatten(1).square().sum(1).mean() - 1)


def npe(res: common.ODEResult, w2_sq: float) -> float:
    """Tong et al.'s normalised path energy |E[sum |dx|^2 / dt] - W2^2(x0, x1)| / W2^2(x0, x1) (torchcfm's NPE): 0
    for the OT map's paths; w2_sq is W2^2 between the source and target samples in the model's space."""
    return abs(float(res.energy.mean()) - w2_sq) / w2_sq


@torch.no_grad()
def evaluate(model: Flow, cfg: Config, out_dir: str | None = None) -> dict:
    """The metrics of one model on cfg.eval_n samples (same seeds on every rank, so every rank agrees)."""
    n, dev = cfg.eval_n, next(model.parameters()).device
    x0, rate = draw_source(cfg, model.shape, n, cfg.seed + 1, dev, make_pruner(cfg) if cfg.prune else None)
    target, s0, s1 = target_samples(cfg, n, cfg.seed + 2), float(model.x0_scale), float(model.x1_scale)
    res, ada = generate(model, cfg, x0), generate(model, cfg, x0, method="dopri5")
    w, how = w2(res.x / s1, target)
    out = {"coupling": cfg.coupling, "kappa": cfg.kappa if cfg.coupling == "wcfm" else None, "sampler": cfg.sampler,
           "sample_steps": cfg.sample_steps, "n": n, "w2": w, "w2_method": how, "nfe": res.nfe,
           "w2_dopri5": w2(ada.x / s1, target)[0], "nfe_dopri5": ada.nfe, "tol": [cfg.atol, cfg.rtol],
           "straightness": straightness(res), "npe": npe(res, w2(res.x0, target * s1)[0] ** 2)}
    for k in FEW_STEPS:
        out[f"w2_euler{k}"] = w2(generate(model, cfg, x0, method="euler", steps=k).x / s1, target)[0]
    if not is_image(cfg):  # two target samples are this far apart: the floor of w2 at this n
        out["w2_floor"] = w2(target, target_samples(cfg, n, cfg.seed + 3))[0]
    if cfg.coupling == "wcfm":
        m, eps = min(n, 2048), cfg.kappa * math.sqrt(x0[0].numel())
        _, out["tilt_relvar_source"], out["tilt_relvar_target"] = tilt_curve(cfg, m, [cfg.kappa])[0]
        if not is_image(cfg):  # what W-CFM learns: the tilted source to the tilted target, by importance resampling
            g = torch.Generator().manual_seed(cfg.seed + 9)
            pool0 = draw_source(cfg, (2,), 4 * n, cfg.seed + 10, "cpu")[0]
            pool1 = target_samples(cfg, 8 * n, cfg.seed + 11)
            tilted = lambda pool, s, ref: pool[torch.multinomial(torch.softmax(  # noqa: E731
                log_tilt(pool * s, ref, eps, cfg.cost), 0), n, replacement=True, generator=g)]
            x1t = [tilted(pool1[i::2], s1, pool0[:m] * s0) for i in (0, 1)]  # disjoint pools: an unbiased floor
            out["w2_tilted"] = w2(generate(model, cfg, tilted(pool0, s0, pool1[:m] * s1).to(dev)).x / s1, x1t[0])[0]
            out["w2_tilted_floor"] = w2(*x1t)[0]
    out.update({"prune_rejection_rate": rate} if rate is not None else {})
    if is_image(cfg):
        grid = Path(out_dir or cfg.out_dir) / "eval_grid.png"  # the class-free grid: the null label when conditional
        if common.is_main():
            common.save_png(grid, common.image_grid((res.x[:64] / s1).clamp(-1, 1).cpu(), nrow=8))
        out["grid"] = str(grid)
    if cfg.target == "digits":
        y = torch.arange(n, device=dev) % cfg.num_classes if cfg.num_classes else None
        imgs = generate(model, cfg, x0, y).x / s1 if y is not None else res.x / s1
        out.update(common.digits_metrics(imgs.clamp(-1, 1).cpu(), y.cpu() if y is not None else None))
    if cfg.fid_ref and is_image(cfg):  # the standard Inception FID of fid_n samples (labels cycled when conditional)
        xf, _ = draw_source(cfg, model.shape, cfg.fid_n, cfg.seed + 12, dev, make_pruner(cfg) if cfg.prune else None)
        y = torch.arange(cfg.fid_n, device=dev) % cfg.num_classes if cfg.num_classes else None
        imgs = torch.cat([generate(model, cfg, xb, yb).x / s1 for xb, yb in
                          zip(xf.split(cfg.eval_n), y.split(cfg.eval_n) if y is not None else [None] * len(xf))])
        out.update(fid=common.fid(imgs.clamp(-1, 1).cpu(), cfg.fid_ref, cfg.fid_weights, dev), fid_n=cfg.fid_n)
    return out


def scatter(img: np.ndarray, pts: np.ndarray, lo: np.ndarray, hi: np.ndarray, color, size: int = 1):
    """Splat 2D points into an (H, W, 3) image (y up) over the box [lo, hi]."""
    h, w, _ = img.shape
    ij = np.round((pts - lo) / (hi - lo) * [w - 1, h - 1]).astype(int)
    ok = (ij >= 0).all(1) & (ij[:, 0] < w) & (ij[:, 1] < h)
    for dx in range(size):
        for dy in range(size):
            img[np.clip(h - 1 - ij[ok, 1] - dy, 0, h - 1), np.clip(ij[ok, 0] + dx, 0, w - 1)] = color


def comparison_png(path, panels: dict, size: int = 320):
    """One panel per run: source points (black), trajectories (olive), samples (blue), and each run's W2, NPE and
    dopri5 NFE in its title (with matplotlib; a bare rasterised image without it)."""
    allpts = np.concatenate([p["path"].reshape(-1, 2) for p in panels.values()])
    lo, hi = np.percentile(allpts, 0.1, 0), np.percentile(allpts, 99.9, 0)
    lo, hi = lo - 0.05 * (hi - lo), hi + 0.05 * (hi - lo)
    lo, hi = np.minimum(lo, hi - (hi - lo).max()), np.maximum(hi, lo + (hi - lo).max())  # square box
    plt = common.pyplot()
    if plt is not None:
        fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 4.4), squeeze=False)
        for ax, (name, p) in zip(axes[0], panels.items()):
            (m, path_), (c, _, k) = (p["metrics"], p["path"]), name.partition(":")
            ax.plot(path_[:, :256, 0], path_[:, :256, 1], color=(0.75, 0.75, 0.47), lw=0.5, alpha=0.6)
            ax.scatter(*path_[0].T, s=3, c="k", label="source x0")
            ax.scatter(*path_[-1].T, s=3, c="tab:blue", label="samples x1")
            ax.set_title(f"{LABELS[c]}{' kappa ' + k if k else ''}: W2 {m['w2']:.3f} (floor {m['w2_floor']:.3f})\n"
                         f"NPE {m['npe']:.3f}, dopri5 NFE {m['nfe_dopri5']}", fontsize=9)
            ax.set(xlim=(lo[0], hi[0]), ylim=(lo[1], hi[1]), aspect="equal", xticks=[], yticks=[])
        axes[0][0].legend(loc="lower left", fontsize=8, markerscale=3)
        fig.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=0.88, wspace=0.04)  # room for two-line titles
        fig.savefig(path, dpi=100)
        return plt.close(fig)
    img = np.full((size, size * len(panels), 3), 255, np.uint8)
    for k, p in enumerate(panels.values()):
        tile = img[:, k * size:(k + 1) * size]
        scatter(tile, p["path"][:, :256].reshape(-1, 2), lo, hi, (190, 190, 120))
        scatter(tile, p["path"][0], lo, hi, (0, 0, 0), 2)
        scatter(tile, p["path"][-1], lo, hi, (40, 70, 220), 2)
        tile[:, -1] = 160
    common.save_png(path, img)


# ----------------------------------------------------------------------------------------------------------------------
# Training and the command line


def build(cfg: Config) -> Flow:  # the velocity field of this config, untrained
    return Flow(cfg, data_shape(cfg))


def train_one(cfg: Config, d: common.Dist, resume: str | None, overwrite: bool = False) -> Flow:
    common.seed_all(cfg.seed)
    model = build(cfg)
    data = common.ArrayDataset(*load_images(cfg)) if is_image(cfg) else toy_batches(cfg, d)
    s0, s1 = norm_scales(cfg)  # measured once, stored in the model: sampling applies them too
    model.x0_scale.fill_(s0)
    model.x1_scale.fill_(s1)
    fm = FlowMatcher(cfg.coupling, cfg.sigma, math.prod(model.shape), cfg.kappa, cfg.cost, cfg.ot_solver)
    common.print0(f"{cfg.coupling}: {fm.describe()}; {sum(p.numel() for p in model.parameters()):,} parameters "
                  f"-> {cfg.out_dir}")

    def loss_fn(net, batch, at):
        if is_image(cfg):
            x1, y = common.to_float(batch[0]), (batch[1] if cfg.num_classes else None)
            if cfg.hflip:
                x1 = torch.where(torch.rand(len(x1), 1, 1, 1, device=x1.device) < 0.5, x1.flip(-1), x1)
            x0 = torch.randn_like(x1)
        else:
            (x0, x1), y = batch, None
        return cfm_loss(net, fm, x0 * s0, x1 * s1, y, cfg.p_uncond, cfg.num_classes)

    def periodic_eval(step, model, ema):
        n = min(cfg.eval_n, 1000 if not is_image(cfg) else 64)
        with ema.swap(model):
            res = generate(model, cfg, draw_source(cfg, model.shape, n, cfg.seed + 1, d.device)[0])
        x = (res.x / s1).cpu()
        if not is_image(cfg):
            return {"eval_w2": w2(x, target_samples(cfg, n, cfg.seed + 2))[0], "eval_straightness": straightness(res)}
        if d.is_main:
            common.save_png(Path(cfg.out_dir) / f"samples_{step:07d}.png", common.image_grid(x.clamp(-1, 1)))
        return {"eval_straightness": straightness(res)}

    model, ema = common.train(cfg, model, loss_fn, data, d, resume=resume, overwrite=overwrite,
                              evaluate=periodic_eval)
    ema.copy_to(model)
    return model.eval()


def from_checkpoint(path: str, device="cpu", **overrides) -> tuple[Flow, Config]:
    """A trained model ready to sample (EMA weights, eval mode) and its config; `overrides` may change run-time fields
    (sampler, steps, guidance, pruning)."""
    state = common.load_checkpoint(path)
    cfg = common.config_from_checkpoint(Config, state, overrides, what=str(path))
    model = common.load_weights(build(cfg), state).to(device).eval()
    return model, cfg


def dry_run(cfg: Config, gpus: int) -> dict:
    """--dry_run: the config on the meta device (common.dry_run); sampling holds dopri5's 7 stages of the state."""
    shape = data_shape(cfg)
    fm = FlowMatcher(runs(cfg.coupling)[0][1], cfg.sigma, math.prod(shape), cfg.kappa, cfg.cost, "sinkhorn")

    def loss(model, b):
        x0, x1 = torch.randn(b, *shape), torch.randn(b, *shape)
        y = torch.zeros(b, dtype=torch.long) if cfg.num_classes else None
        return cfm_loss(model, fm, x0, x1, y, cfg.p_uncond, cfg.num_classes)[0]

    return common.dry_run(cfg, lambda: build(cfg), loss, tokens=math.prod(shape[1:]), gpus=gpus,
                          block_types=(Stage,), sample_bytes=lambda m: {f"dopri5_batch{cfg.eval_n}": 8 * 4 * cfg.eval_n
                                                                         * math.prod(shape)})


def options(p: argparse.ArgumentParser):
    p.add_argument("--select-kappa", dest="select_kappa", action="store_true",
                   help="print the tilt curve Var(tau)/E[tau]^2 over the kappa grid and the budget / elbow choices")


def print_table(cfg: Config, table: dict, out: Path):
    """The side-by-side demo's trade-off: W2 by Euler steps and at dopri5, path measures, and the cost of a step."""
    print(f"\n{cfg.source} -> {cfg.target}, {cfg.steps} steps each, {cfg.eval_n} samples (W2 floor "
          f"{next(iter(table.values()))['w2_floor']:.3f}); figure: {out / 'compare.png'}\n{'run':12}"
          + "".join(f"{'W2@' + str(k):>8}" for k in FEW_STEPS + (cfg.sample_steps,))
          + f"{'W2 dopri5 (NFE)':>17}{'straightness':>14}{'NPE':>8}{'ms/step':>9}")
    for name, m in table.items():
        print(f"{name:12}" + "".join(f"{m[f'w2_euler{k}']:8.3f}" for k in FEW_STEPS) + f"{m['w2']:8.3f}"
              + f"{m['w2_dopri5']:11.3f} ({m['nfe_dopri5']:3d}){m['straightness']:14.3f}{m['npe']:8.3f}"
              + f"{m['ms_per_step'] or math.nan:9.2f}")


def configure(cfg: Config, args, overrides: dict):
    if not is_image(cfg):
        torch.set_num_threads(1)  # a 64-wide MLP gains nothing from intra-op threads, and loses a lot on shared cores
    if cfg.kappa_rule != "fixed" and "kappa" in overrides:
        raise ValueError(f"--kappa is chosen by --kappa_rule {cfg.kappa_rule}: add --kappa_rule fixed to set it")
    if args.sample and len(runs(cfg.coupling)) > 1 and not args.ckpt:
        raise ValueError(f"this config trains {cfg.coupling}: pick one with --ckpt")
    return cfg, overrides


def run_dirs(cfg: Config) -> dict[str, Path]:
    """Each run's folder: out_dir itself, or one subfolder per run when --coupling names several."""
    out, named = Path(cfg.out_dir), runs(cfg.coupling)
    return {name: out / name.replace(":", "_kappa") if len(named) > 1 else out for name, _, _ in named}


def select_kappa(cfg: Config, args, overrides: dict, d: common.Dist):
    """--select-kappa: the tilt's Var(tau) / E[tau]^2 on 2048 pairs, as training would scale them."""
    rows = tilt_curve(cfg)
    budget, knee = choose_kappa(rows, "budget", cfg.tilt_budget), choose_kappa(rows, "elbow", 0)
    common.print0(f"{'N(0, I)' if is_image(cfg) else cfg.source} -> {cfg.target}, cost {cfg.cost}, norm_align "
                  f"{cfg.norm_align and cfg.norm_align_side}\n{'kappa':>10}{'relvar_source':>15}{'relvar_target':>15}")
    for k, r0, r1 in rows:
        common.print0(f"{k:10.4g}{r0:15.4g}{r1:15.4g}" + {budget: "  <- budget", knee: "  <- elbow"}.get(k, ""))
    common.print0(f"kappa = {budget:.4g} by the budget (both relvar <= {cfg.tilt_budget:g} from there on), "
                  f"{knee:.4g} by the elbow (the later one of log(1 + relvar) against log kappa)")


def eval_runs(cfg: Config, args, overrides: dict, d: common.Dist):
    """--eval: --ckpt, or every run of the config (one JSON object per run)."""
    ckpts = {"ckpt": args.ckpt} if args.ckpt else {n: str(f / "ckpt.pt") for n, f in run_dirs(cfg).items()}
    metrics = {c: evaluate(*from_checkpoint(p, d.device, **overrides), out_dir=str(Path(p).parent))
               for c, p in ckpts.items()}
    common.print0(json.dumps(metrics if len(metrics) > 1 else next(iter(metrics.values()))))


def cli_sample(model: Flow, cfg: Config, args, d: common.Dist, start: int, count: int):
    x0, rate = draw_source(cfg, model.shape, count, cfg.seed + 7919 * (d.rank + 1), d.device,
                           make_pruner(cfg) if cfg.prune else None)
    y = (torch.arange(start, start + count, device=d.device) % cfg.num_classes) if cfg.num_classes else None
    res = generate(model, cfg, x0, y)
    x = (res.x / model.x1_scale).cpu()
    arrays = {"samples": x.numpy()} if len(model.shape) == 1 else \
        {"images": common.to_uint8(x).permute(0, 2, 3, 1).numpy()}
    pruned = f", pruning rejected {rate:.1%} of Gaussian draws" if rate is not None else ""
    return {**arrays, **({"labels": y.cpu().numpy()} if y is not None else {})}, f"{cfg.sampler}, {res.nfe} NFE{pruned}"


def train_runs(cfg: Config, args, overrides: dict, d: common.Dist):
    """Training: one run, or several side by side (one per --coupling entry) and the comparison figure."""
    named, folder = runs(cfg.coupling), run_dirs(cfg)
    multi, out = len(named) > 1, Path(cfg.out_dir)
    if cfg.kappa_rule != "fixed" and any(c == "wcfm" and k is None for _, c, k in named):
        cfg = dataclasses.replace(cfg, kappa=choose_kappa(tilt_curve(cfg), cfg.kappa_rule, cfg.tilt_budget))
        common.print0(f"kappa = {cfg.kappa:.4g} by --kappa_rule {cfg.kappa_rule} (see --select-kappa)")
    subs = {name: dataclasses.replace(cfg, coupling=c, kappa=k or cfg.kappa, out_dir=str(folder[name]),
                                      kappa_rule="fixed" if k else cfg.kappa_rule) for name, c, k in named}
    for sub in subs.values():  # before any training: never clobber one run after training another
        common.check_fresh(sub.out_dir, args.resume, args.overwrite)
    if args.resume and not args.ckpt and not any((Path(s.out_dir) / "ckpt.pt").exists() for s in subs.values()):
        raise FileNotFoundError(f"no checkpoint to resume in {out}")
    panels = {}  # the side-by-side comparison (2D)
    for name, sub in subs.items():
        ckpt = Path(sub.out_dir) / "ckpt.pt"
        resume = str(args.ckpt or ckpt) if args.resume and (ckpt.exists() or not multi) else None
        t0 = time.time()
        model = train_one(sub, d, resume, args.overwrite)
        ms = 1e3 * (time.time() - t0) / sub.steps  # wall time per step of this run, data, EMA and evals included
        if not multi or is_image(cfg):
            continue
        if common.load_checkpoint(ckpt)["step"] < sub.steps:
            break  # stopped early (SIGTERM, --stop_after): --resume picks up from here
        x0, _ = draw_source(sub, model.shape, 512, sub.seed + 1, d.device)
        path = (generate(model, sub, x0, keep_path=True).path / model.x1_scale).cpu().numpy()
        panels[name] = {"metrics": {**evaluate(model, sub), "ms_per_step": None if resume else ms}, "path": path}
    if len(panels) == len(named) > 1 and d.is_main:
        comparison_png(out / "compare.png", panels)
        table = {name: p["metrics"] for name, p in panels.items()}
        (out / "compare.json").write_text(json.dumps(table, indent=1))
        print_table(cfg, table, out)
    common.print0("done: " + common.existing(*[Path(s.out_dir) / f for s in subs.values() for f in ("ckpt.pt",
                                               "log.jsonl")], out / "compare.png"))


def main(argv=None):
    common.cli(argv, Config, PRESETS, __doc__, options=options, configure=configure, dry_run=dry_run,
               load=lambda ckpt, overrides, args, d: from_checkpoint(ckpt, d.device, **overrides), sample=cli_sample,
               evaluate=None, prepare=train_runs, modes={"select_kappa": select_kappa, "eval": eval_runs})


if __name__ == "__main__":
    common.run(main)
