"""
W-CFM: Weighted Conditional Flow Matching, next to its I-CFM and OT-CFM baselines, with batched ODE samplers and
SourceFM's pruned Gaussian source. One file, PyTorch only (scipy optional).

Papers
    Weighted Conditional Flow Matching. S. Calvo-Ordonez, M. Meunier, A. Cartea, C. Reisinger, Y. Gal,
    J. M. Hernandez-Lobato, 2025, arXiv:2507.22270. There is no official code.
    Improving and Generalizing Flow-Based Generative Models with Minibatch Optimal Transport (I-CFM, OT-CFM).
    A. Tong et al., TMLR 2024 (the torchcfm library: its 2D examples and CIFAR-10 recipe are the reference here).
    Is There a Better Source Distribution than Gaussian? Exploring Source Distributions for Image Flow Matching
    (SourceFM): directionally pruned Gaussian sampling and norm-aligned training.

The method. Draw x0 ~ mu (source) and x1 ~ nu (target) independently, put x_t = (1 - t) x0 + t x1 + sigma z on the
straight path and regress v(x_t, t) onto u = x1 - x0. I-CFM stops there; OT-CFM first re-pairs the minibatch by an
exact OT assignment; W-CFM keeps the independent pairs and weights each one by the Gibbs kernel
w = exp(-c(x0, x1) / eps). The weighted product measure w(x, y) mu(x) nu(y) / Z is the entropic-OT plan of (mu~, nu~),
whose marginals are mu tilted by tau0(x) = E_y w(x, y) (and nu by tau1(y) = E_x w(x, y)): W-CFM learns an
entropic-OT flow at the price of the per-pair cost, O(B d), where OT-CFM pays O(B^2 d + B^3) per step. The tilt is
small when eps is large against the spread of the cost; eps = kappa * sqrt(d).

Ambiguities, and the choices made here
  * The cost. Public descriptions disagree on c = |x0 - x1|^2 or |x0 - x1|. Default `sqeuclidean`: the entropic-OT
    derivation uses the W2 (quadratic) cost, whose Gibbs kernel is exp(-|x - y|^2 / eps), and the eps = kappa sqrt(d)
    scaling only makes sense for it -- a squared distance between independent points is a sum of d terms whose spread
    grows like sqrt(d), so c / eps fluctuates by O(1) in any dimension (from N(0, I_d), |x0|^2 alone tilts the source
    by Var/E^2 ~ exp(2 / kappa^2) - 1 whatever d), while the plain distance's spread stays O(1) and kappa sqrt(d)
    would flatten its weights to 1 in high dimension. `--cost euclidean` is there to compare.
  * Normalisation. The loss is E[w * |v - u|^2] either way; whether w is divided by its batch mean is not stated
    consistently. Default `mean`: w_i = exp(l_i - logmeanexp(l)) = B softmax(l)_i, l = -c / eps. It is the
    self-normalised estimate of the loss under the tilted plan (same minimiser, same scale as I-CFM so learning rates
    transfer), and it never underflows, as the softmax subtracts the largest l first: CIFAR-10 pairs have c ~ 4000
    and sqrt(d) ~ 55, so exp(-c / eps) itself is 0 in float32 for any kappa below ~0.7. `--weights raw` uses
    exp(-c / eps) as written.
  * kappa. The paper picks kappa on a log-spaced grid as the smallest value where the relative variance of the
    marginal tilt, Var(tau) / E[tau]^2, starts to flatten. `--select-kappa` prints that curve for both marginals and
    takes, for each, the elbow of log(1 + relvar) against log kappa as the grid point farthest below the chord
    ("Kneedle", no threshold to tune); kappa is the larger of the two, so that both tilts have flattened. The log
    squashes the saturated start (relvar -> n - 1 when one pair holds all the weight) and is linear near 0, where
    flat means a negligible tilt. On plain relvar the chord rule stops too early: kappa = 1 on 8 Gaussians -> moons,
    where the source tilt still has relvar 2.6 and W2 is 1.3 instead of ~0.8 at the kappa = 6.3 chosen here.
  * OT-CFM uses the exact assignment as a permutation of the batch (torchcfm draws pairs from the plan with
    replacement); without scipy it falls back to a log-domain Sinkhorn plan with a small regularisation and draws a
    partner for each x0 from its row. Under torchrun each rank couples / normalises its own share of the batch.
  * SourceFM pruning: R = {k : gamma_k <= tau} are the directions no (normalised) data point reaches, and a Gaussian x0
    is kept iff max_{k in R} <v_k, x0/|x0|> <= tau_r -- as in the paper (their released code stores the complement).

Data: 2D toys are generated here (8gaussians and moons as torchcfm's examples define them, except that the moons'
arc positions are drawn uniformly instead of on an even grid per batch); images are the scikit-learn digits (CPU
demo) or a CIFAR-10-style `.npz` (`images` uint8 (N, H, W, C), optional `labels`) or image folder.

Run
    python wcfm.py                                   # 8 Gaussians -> moons: I-CFM, OT-CFM, W-CFM side by side (CPU)
    python wcfm.py --preset mog-5gaussians           # mixture of Gaussians -> 5 Gaussians, the same comparison
    python wcfm.py --preset digits                   # class-conditional W-CFM U-Net on 8x8 digits (CPU, minutes)
    torchrun --nproc_per_node=8 wcfm.py --preset cifar10 --data_path cifar10_train.npz   # torchcfm's recipe, GPUs
    python wcfm.py --select-kappa [--preset ...]     # the tilt curve and the elbow choice of kappa
    python wcfm.py --eval [--ckpt out/wcfm/wcfm/ckpt.pt]        # W2, NPE, NFE (+ FD for digits) as one JSON line
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
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import common

# ----------------------------------------------------------------------------------------------------------------------
# Config

COUPLINGS = ("icfm", "otcfm", "wcfm")
LABELS = {"icfm": "I-CFM", "otcfm": "OT-CFM", "wcfm": "W-CFM"}
TOYS = ("gaussian", "8gaussians", "moons", "checkerboard", "circles", "2spirals", "mog", "5gaussians")
SAMPLERS = ("euler", "midpoint", "heun", "rk4", "dopri5")


@dataclass
class Config(common.TrainConfig):
    source: str = common.opt("8gaussians", choices=TOYS)  # 2D source toy; images always start from N(0, I)
    target: str = common.opt("moons", choices=TOYS + ("digits", "cifar10"))  # a 2D toy | digits | cifar10
    data_path: str = ""  # cifar10: an .npz with images uint8 (N, H, W, C) [+ labels], or a folder of class folders
    image_size: int = common.opt(32, min=1)  # image side (folders are resized, digits upsampled)
    hflip: bool = False  # random horizontal flips of the images (training, and the pruning PCA)
    coupling: str = "wcfm"  # icfm | otcfm | wcfm; a comma-separated list trains each side by side
    sigma: float = 0.1  # std of the Gaussian around the straight conditional path
    kappa: float = common.opt(2.5, gt=0)  # W-CFM: eps = kappa * sqrt(d) (see --select-kappa)
    cost: str = common.opt("sqeuclidean", choices=("sqeuclidean", "euclidean"))  # W-CFM cost c(x0, x1)
    weights: str = common.opt("mean", choices=("mean", "raw"))  # W-CFM weights: / their batch mean | exp(-c/eps)
    ot_solver: str = common.opt("auto", choices=("auto", "exact", "sinkhorn"))  # OT-CFM (auto: exact with scipy)
    norm_align: bool = False  # SourceFM: train on x1 * E|x0|/E|x1|, undone at sampling
    width: int = common.opt(64, min=1)  # MLP width (2D) or U-Net base channels (images)
    depth: int = common.opt(3, min=1)  # MLP hidden layers
    ch_mult: tuple = common.opt((1, 2, 2, 2), min=1)  # U-Net channel multipliers per resolution
    num_res_blocks: int = common.opt(2, min=1)  # U-Net residual blocks per resolution
    attn_res: tuple = (16,)  # U-Net resolutions with self-attention
    dropout: float = common.opt(0.1, max=0.99)  # U-Net dropout
    num_classes: int = 0  # class-conditional with this many classes (0 = unconditional)
    p_uncond: float = common.opt(0.1, max=1)  # label dropout, for classifier-free guidance
    sampler: str = common.opt("euler", choices=SAMPLERS)  # euler | midpoint | heun | rk4 | dopri5
    sample_steps: int = common.opt(100, min=1)  # steps of the fixed-step samplers
    atol: float = common.opt(1e-4, gt=0)  # dopri5 absolute tolerance
    rtol: float = common.opt(1e-4, gt=0)  # dopri5 relative tolerance
    guidance: float = 1.0  # classifier-free guidance weight (1 = plain conditional)
    prune: bool = False  # SourceFM: sample x0 from the directionally pruned Gaussian
    prune_tau: float = 0.01  # a direction is pruned if no normalised data point projects above this
    prune_tau_r: float = 0.048  # reject x0 if its direction projects above this on a pruned direction
    eval_n: int = common.opt(2000, min=2)  # samples for --eval (and the side-by-side table)

    NAME = "wcfm"
    RUNTIME = ("sampler", "sample_steps", "atol", "rtol", "guidance", "prune", "prune_tau", "prune_tau_r", "eval_n")

    def __post_init__(self):
        super().__post_init__()
        bad = [c for c in self.coupling.split(",") if c.strip() not in COUPLINGS]
        if bad:
            raise ValueError(f"--coupling {bad[0].strip()!r} is not one of: {', '.join(COUPLINGS)}")
        if self.num_classes and not is_image(self):
            raise ValueError("class conditioning (--num_classes) is for image targets only")
        if self.guidance != 1.0 and not self.num_classes:
            raise ValueError("--guidance needs a class-conditional model (--num_classes > 0)")

    @property
    def couplings(self) -> list[str]:  # "icfm,otcfm,wcfm" trains the three side by side
        return [c.strip() for c in self.coupling.split(",")]


_TOY_2D = dict(steps=20000, batch_size=256, lr=1e-3, lr_schedule="constant", warmup=0, weight_decay=0.0, beta2=0.999,
               grad_clip=0.0, ema_decay=0.999, log_every=200, eval_every=5000, ckpt_every=5000,
               coupling="icfm,otcfm,wcfm")
PRESETS = {
    # torchcfm's 2D protocol: sigma 0.1, batch 256, 20k plain Adam steps at 1e-3, 3x64 SELU MLP; plus an EMA of the
    # weights for sampling (training is unchanged): the last constant-lr iterate's W2 swings 0.4-0.9 from seed to seed
    # (--ema_decay 0 for the bare protocol). kappa: the --select-kappa choice for each pair of distributions.
    "8gaussians-moons": dict(_TOY_2D, kappa=6.3),
    "mog-5gaussians": dict(_TOY_2D, source="mog", target="5gaussians", kappa=4.0),
    "digits": dict(target="digits", image_size=8, coupling="wcfm", sigma=0.0, kappa=2.5,
                   width=32, ch_mult=(1, 2), num_res_blocks=1, attn_res=(4,), dropout=0.0, num_classes=10,
                   steps=2000, batch_size=64, lr=1e-3, warmup=200, ema_decay=0.999, eval_every=500,
                   ckpt_every=500, eval_n=1000, prune_tau_r=0.33),  # 0.048 * sqrt(3072 / 64): see SourcePruner
    # torchcfm's CIFAR-10 recipe: 128 channels, [1, 2, 2, 2], attention at 16, dropout 0.1, Adam 2e-4, warmup 5k,
    # grad clip 1, EMA 0.9999, batch 128, sigma 0
    "cifar10": dict(target="cifar10", image_size=32, hflip=True, coupling="wcfm",
                    sigma=0.0, kappa=2.5, width=128, steps=400000, batch_size=128, lr=2e-4, lr_schedule="constant",
                    warmup=5000, weight_decay=0.0, beta2=0.999, grad_clip=1.0, ema_decay=0.9999, eval_every=20000,
                    ckpt_every=20000, sampler="dopri5", atol=1e-5, rtol=1e-5, eval_n=2000),
}


def is_image(cfg: Config) -> bool:
    return cfg.target in ("digits", "cifar10")


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
    if name == "checkerboard":  # the 8 dark squares of a 4x4 board on [-4, 4]^2
        cell = torch.randint(8, (n,), generator=g)
        row = cell // 2
        col = 2 * (cell % 2) + row % 2
        return torch.stack([col, row], 1) * 2 - 4 + 2 * u(n, 2)
    if name == "circles":  # two concentric circles, radii 2 and 4
        a, r = 2 * math.pi * u(n), 2 + 2 * (u(n) < 0.5)
        return r[:, None] * torch.stack([a.cos(), a.sin()], 1) + 0.1 * z(n, 2)
    if name == "2spirals":
        s = torch.sqrt(u(n)) * 3 * math.pi
        arm = torch.where(u(n) < 0.5, 1.0, -1.0)[:, None]
        return arm * torch.stack([-s.cos() * s, s.sin() * s], 1) / 2 + 0.2 * z(n, 2)
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
    if not cfg.data_path:
        raise ValueError("--target cifar10 needs --data_path: an .npz with images (N, 32, 32, 3) uint8, or a folder")
    if Path(cfg.data_path).is_dir() and not list(Path(cfg.data_path).glob("*.npy")):
        folder = common.ImageFolder(cfg.data_path, cfg.image_size)
        x, y = zip(*(folder[i] for i in range(len(folder))))
        return torch.stack(x), torch.tensor(y)
    arrays = common.load_arrays(cfg.data_path, ("images", "labels"))
    x = torch.from_numpy(np.ascontiguousarray(arrays["images"])).permute(0, 3, 1, 2).contiguous()
    if x.dtype != torch.uint8 or x.ndim != 4:
        raise ValueError(f"{cfg.data_path}: images must be uint8 (N, H, W, C), got {x.dtype} {tuple(x.shape)}")
    y = torch.from_numpy(np.asarray(arrays["labels"])).long() if "labels" in arrays else torch.zeros(len(x)).long()
    return x, y


def target_samples(cfg: Config, n: int, seed: int) -> torch.Tensor:
    """n samples of the target as the model sees them (before norm alignment): (n, 2) or float (n, C, H, W)."""
    g = torch.Generator().manual_seed(seed)
    if not is_image(cfg):
        return toy(cfg.target, n, g)
    x, _ = load_images(cfg)
    idx = torch.randperm(len(x), generator=g)[:n] if n <= len(x) else torch.randint(len(x), (n,), generator=g)
    return common.to_float(x[idx])


# ----------------------------------------------------------------------------------------------------------------------
# Couplings: independent, exact minibatch OT, and Gibbs weights


def cost_matrix(x0: torch.Tensor, x1: torch.Tensor, cost: str = "sqeuclidean") -> torch.Tensor:
    """c(x0_i, x1_j) of all pairs, (B0, B1); float64 so large squared norms do not cancel."""
    a, b = x0.flatten(1).double(), x1.flatten(1).double()
    sq = (a.square().sum(1, keepdim=True) + b.square().sum(1) - 2 * a @ b.T).clamp(min=0)
    return sq if cost == "sqeuclidean" else sq.sqrt()


def has_scipy() -> bool:
    return importlib.util.find_spec("scipy") is not None


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
                 weights: str = "mean", ot_solver: str = "auto"):
        if coupling not in COUPLINGS:
            raise ValueError(f"coupling must be one of {COUPLINGS}, got {coupling!r}")
        if not kappa > 0:
            raise ValueError(f"eps = kappa * sqrt(d) must be > 0, got kappa = {kappa}")
        self.coupling, self.sigma, self.cost, self.weights = coupling, sigma, cost, weights
        self.eps = kappa * math.sqrt(dim)
        self.ot_solver = ("exact" if has_scipy() else "sinkhorn") if ot_solver == "auto" else ot_solver

    def describe(self) -> str:
        if self.coupling == "otcfm":
            return ("exact minibatch OT (scipy linear_sum_assignment)" if self.ot_solver == "exact"
                    else "minibatch OT by a Sinkhorn plan (reg 0.01 x mean cost; scipy not used)")
        if self.coupling == "wcfm":
            return f"Gibbs weights exp(-c/eps), c = {self.cost}, eps = {self.eps:.4g}, weights = {self.weights}"
        return "independent pairs"

    def pair_weights(self, u: torch.Tensor) -> torch.Tensor:
        """Gibbs weights of the pairs from their displacements u = x1 - x0, (B, ...) -> (B,): exp(-c/eps), or that
        divided by its batch mean -- a softmax, which subtracts the largest log weight first, so nothing underflows
        even at c/eps ~ 1e4."""
        c = u.float().flatten(1).square().sum(1)  # (B,)
        c = c if self.cost == "sqeuclidean" else c.sqrt()
        return torch.exp(-c / self.eps) if self.weights == "raw" else torch.softmax(-c / self.eps, 0) * len(c)

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


def tilt_relvar(x0: torch.Tensor, x1: torch.Tensor, eps: float, cost: str = "sqeuclidean") -> tuple[float, float]:
    """Var(tau) / E[tau]^2 of the tilts tau0(x) = E_y w(x, y) (source) and tau1(y) = E_x w(x, y) (target), from
    samples, entirely in log space."""
    lk = -cost_matrix(x0, x1, cost) / eps  # (n, m)

    def lme(a, dim=0):  # log mean exp
        return torch.logsumexp(a, dim) - math.log(a.shape[dim])

    def relvar(log_tau):  # E[tau^2] / E[tau]^2 - 1
        return float(torch.expm1(lme(2 * log_tau) - 2 * lme(log_tau)))
    return relvar(lme(lk, 1)), relvar(lme(lk, 0))


def elbow(x: list[float], y: list[float]) -> int:
    """Index of the elbow of a decreasing curve: the point farthest below its chord, both axes scaled to [0, 1]."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    xs, ys = (x - x[0]) / (x[-1] - x[0]), (y - y[-1]) / max(y[0] - y[-1], 1e-300)
    return int(np.argmax(1 - xs - ys))  # the chord runs from (0, 1) to (1, 0)


def select_kappa(x0: torch.Tensor, x1: torch.Tensor, cost: str, grid=None) -> tuple[float, list[tuple]]:
    """The paper's rule on a log-spaced grid: (kappa, [(kappa, eps, relvar_source, relvar_target)]). Each marginal's
    elbow is taken on log(1 + relvar) against log kappa; kappa is the larger one, where both tilts have flattened."""
    grid = np.logspace(-2, 3, 26) if grid is None else grid
    d = x0[0].numel()
    rows = [(k, k * math.sqrt(d), *tilt_relvar(x0, x1, k * math.sqrt(d), cost)) for k in grid]
    logk = [math.log(r[0]) for r in rows]
    best = max(elbow(logk, [math.log1p(r[i]) for r in rows]) for i in (2, 3))
    return rows[best][0], rows


# ----------------------------------------------------------------------------------------------------------------------
# Models: an MLP for 2D, a U-Net for images


class MLP(nn.Module):
    """torchcfm's 2D network: [x, t] -> depth x (Linear, SELU) -> Linear."""

    def __init__(self, dim: int, width: int, depth: int):
        super().__init__()
        layers, d_in = [], dim + 1
        for _ in range(depth):
            layers += [nn.Linear(d_in, width), nn.SELU()]
            d_in = width
        self.net = nn.Sequential(*layers, nn.Linear(width, dim))

    def forward(self, x, t, y=None):  # (B, D), (B,) -> (B, D)
        return self.net(torch.cat([x, t[:, None]], 1))


def group_norm(ch: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(32, ch // 4), ch)


def time_features(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal features of t in [0, 1], (B,) -> (B, dim); t is scaled by 1000 as if it counted diffusion steps."""
    freqs = torch.exp(-math.log(10000) * torch.arange(dim // 2, device=t.device) / (dim // 2))
    a = 1000 * t.float()[:, None] * freqs
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
        emb = self.time(time_features(t, self.width))
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
    """The velocity field v(x, t, y), and the norm-alignment scale that sampling must undo."""

    def __init__(self, cfg: Config, shape: tuple):
        super().__init__()
        self.shape, self.num_classes = shape, cfg.num_classes
        self.net = MLP(shape[0], cfg.width, cfg.depth) if len(shape) == 1 else \
            UNet(shape[0], shape[1], cfg.width, cfg.ch_mult, cfg.num_res_blocks, cfg.attn_res, cfg.dropout,
                 cfg.num_classes)
        self.register_buffer("x1_scale", torch.ones(()))  # SourceFM norm alignment: E|x0| / E|x1|, else 1

    def forward(self, x, t, y=None):
        return self.net(x, t, y)


# ----------------------------------------------------------------------------------------------------------------------
# Loss


def cfm_loss(net, fm: FlowMatcher, x0, x1, y=None, p_uncond: float = 0.0, null: int = 0):
    """E_t E_pairs w * |v(x_t, t, y) - u|^2 (mean over dimensions) -> (loss, logs)."""
    x0, x1, y = fm.couple(x0, x1, y)
    if y is not None and p_uncond > 0:  # drop labels so that the same net also learns the unconditional field
        y = torch.where(torch.rand(len(y), device=y.device) < p_uncond, null, y)
    t = torch.rand(len(x0), device=x0.device)
    xt, ut = fm.path(x0, x1, t, torch.randn_like(x0))
    err = (net(xt, t, y) - ut).float().square().flatten(1).mean(1)  # (B,)
    if fm.coupling != "wcfm":
        return err.mean(), {}
    return torch.dot(fm.pair_weights(ut), err) / len(err), {}  # four O(B d) ops: W-CFM's overhead over I-CFM


# ----------------------------------------------------------------------------------------------------------------------
# Samplers: explicit Runge-Kutta with an NFE counter, guidance, and SourceFM's pruned source

TABLEAUS = {  # (c, A, b) of explicit Runge-Kutta methods
    "euler": ([0], [[]], [1]),
    "midpoint": ([0, 1 / 2], [[], [1 / 2]], [0, 1]),
    "heun": ([0, 1], [[], [1]], [1 / 2, 1 / 2]),
    "rk4": ([0, 1 / 2, 1 / 2, 1], [[], [1 / 2], [0, 1 / 2], [0, 0, 1]], [1 / 6, 1 / 3, 1 / 3, 1 / 6]),
}
DOPRI5_C = [0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1, 1]
DOPRI5_A = [[], [1 / 5], [3 / 40, 9 / 40], [44 / 45, -56 / 15, 32 / 9],
            [19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729],
            [9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656],
            [35 / 384, 0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84]]
DOPRI5_B = DOPRI5_A[-1] + [0]  # 5th order; the 7th stage sits at the new point, so it is the next step's first (FSAL)
DOPRI5_E = [b - b4 for b, b4 in zip(DOPRI5_B, [5179 / 57600, 0, 7571 / 16695, 393 / 640, -92097 / 339200,
                                               187 / 2100, 1 / 40])]  # 5th minus 4th order: the error estimate


@dataclass
class ODEResult:
    x: torch.Tensor  # the state at t = 1
    nfe: int  # evaluations of the velocity field
    energy: torch.Tensor  # per-sample sum over steps of |dx|^2 / dt, (B,)
    path: torch.Tensor | None = None  # (steps + 1, B, ...) when asked for


def _stages(f, t, x, h, c, A, k1):
    ks = [k1]
    for ci, row in zip(c[1:], A[1:]):
        ks.append(f(t + ci * h, x + h * sum(a * k for a, k in zip(row, ks) if a)))
    return ks


def odeint(f, x, method="euler", steps=100, atol=1e-4, rtol=1e-4, keep_path=False) -> ODEResult:
    """Integrate dx/dt = f(t, x) over t in [0, 1] for a whole batch. Fixed-step methods take `steps` equal steps;
    dopri5 adapts one step size for the batch to keep the RMS of err / (atol + rtol |x|) below 1."""
    nfe = 0

    def fc(t, x):
        nonlocal nfe
        nfe += 1
        return f(t, x)

    energy, path, t = x.new_zeros(len(x)), [x] if keep_path else None, 0.0

    def advance(x_new, h):
        nonlocal energy
        energy = energy + (x_new - x).flatten(1).square().sum(1) / h
        if keep_path:
            path.append(x_new)
        return x_new

    if method in TABLEAUS:
        c, A, b = TABLEAUS[method]
        h = 1.0 / steps
        for i in range(steps):
            t = i * h
            ks = _stages(fc, t, x, h, c, A, fc(t, x))
            x = advance(x + h * sum(bi * k for bi, k in zip(b, ks) if bi), h)
    elif method == "dopri5":
        k1 = fc(0.0, x)
        scale = atol + rtol * x.abs()
        rms = lambda v: float((v / scale).square().mean().sqrt())  # noqa: E731
        h = min(1.0, 0.01 * rms(x) / max(rms(k1), 1e-12))  # a cautious first step; the controller grows it fast
        while t < 1.0:
            h = min(h, 1.0 - t)
            ks = _stages(fc, t, x, h, DOPRI5_C, DOPRI5_A, k1)
            x_new = x + h * sum(bi * k for bi, k in zip(DOPRI5_B, ks) if bi)
            err = h * sum(e * k for e, k in zip(DOPRI5_E, ks) if e)
            r = float((err / (atol + rtol * torch.maximum(x.abs(), x_new.abs()))).square().mean().sqrt())
            if r <= 1.0:
                t = 1.0 if h >= 1.0 - t else t + h
                x, k1 = advance(x_new, h), ks[-1]
            h *= min(10.0, max(0.2, 0.9 * r ** -0.2)) if r > 0 else 10.0
            if nfe > 60000:  # 10k steps: the field is stiff or not finite; stop instead of crawling
                raise RuntimeError(f"dopri5 took over 10000 steps, stuck at t = {t:.4g} with h = {h:.2g}")
    else:
        raise ValueError(f"unknown sampler {method!r}: one of {', '.join(SAMPLERS)}")
    return ODEResult(x, nfe, energy, torch.stack(path) if keep_path else None)


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
    """SourceFM's directionally pruned Gaussian. PCA of the L2-normalised data gives directions V; with
    V_ext = [V, -V], gamma_k = max over the data of <v_k, x/|x|>. R = {k : gamma_k <= tau} are directions no data
    point reaches, and x0 ~ N(0, I) is kept iff max_{k in R} <v_k, x0/|x0|> <= tau_r. The paper's tau_r = 0.048 is
    for CIFAR-10: a random direction projects with std 1/sqrt(d), so other sizes scale it by sqrt(3072 / d)."""

    def __init__(self, data: torch.Tensor, tau: float, tau_r: float, chunk: int = 8192):
        x = F.normalize(data.flatten(1).double(), dim=1)  # (N, D)
        _, vecs = torch.linalg.eigh(torch.cov(x.T))  # (D, D), columns are the principal directions
        v = torch.cat([vecs, -vecs], 1)  # (D, 2D)
        gamma = torch.stack([(x[i:i + chunk] @ v).amax(0) for i in range(0, len(x), chunk)]).amax(0)  # (2D,)
        self.dirs = v[:, gamma <= tau].float()  # (D, |R|): the pruned directions
        self.tau_r = tau_r

    def keep(self, x0: torch.Tensor) -> torch.Tensor:
        """(B, ...) -> (B,) bool: True where x0 points into no pruned direction."""
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


@torch.no_grad()
def draw_source(cfg: Config, shape: tuple, n: int, seed: int, device, pruner: SourcePruner | None = None):
    """(x0 (n, *shape) on device, rejection rate or None)."""
    g = torch.Generator().manual_seed(seed)
    if pruner is not None:
        x0, rate, _ = pruner.sample(n, shape, g)
        return x0.to(device), rate
    x0 = toy(cfg.source, n, g) if len(shape) == 1 else torch.randn(n, *shape, generator=g)
    return x0.to(device), None


def make_pruner(cfg: Config) -> SourcePruner:
    """SourceFM directions from the training data (2D: n target samples; images: with flips if --hflip)."""
    if not is_image(cfg):
        if cfg.source != "gaussian":
            raise ValueError("--prune prunes a Gaussian source; this model's source is " + cfg.source)
        data = toy(cfg.target, 20000, torch.Generator().manual_seed(cfg.seed))
    else:
        data = common.to_float(load_images(cfg)[0])
        data = torch.cat([data, data.flip(-1)]) if cfg.hflip else data
    return SourcePruner(data, cfg.prune_tau, cfg.prune_tau_r)


@torch.no_grad()
def generate(model: Flow, cfg: Config, x0, y=None, method=None, keep_path=False) -> ODEResult:
    """Integrate from x0 in the model's space (norm alignment is undone by the caller: divide by model.x1_scale)."""
    was_training = model.training
    model.eval()
    res = odeint(velocity(model, y, cfg.guidance), x0, method or cfg.sampler, cfg.sample_steps, cfg.atol, cfg.rtol,
                 keep_path)
    model.train(was_training)
    return res


# ----------------------------------------------------------------------------------------------------------------------
# Evaluation: W2, path energy, NFE, tilt


def w2(a: torch.Tensor, b: torch.Tensor, exact_max: int = 4096) -> tuple[float, str]:
    """2-Wasserstein distance of two equal-size samples: exact (assignment) up to exact_max points with scipy, else an
    entropic (Sinkhorn) estimate whose regularisation is reported."""
    c = cost_matrix(a.cpu(), b.cpu())
    if len(a) == len(b) and len(a) <= exact_max and has_scipy():
        j = assignment(c)
        return float(c[torch.arange(len(a)), j].mean().sqrt()), "exact"
    reg = 0.005 * float(c.mean())
    return float((sinkhorn(c, reg) * c).sum().sqrt()), f"sinkhorn(eps={reg:.4g})"


def npe(res: ODEResult, x0: torch.Tensor) -> float:
    """Normalised path energy E[sum |dx|^2/dt] / E|x1 - x0|^2 - 1: 0 for straight constant-speed paths."""
    return float(res.energy.mean() / (res.x - x0).flatten(1).square().sum(1).mean() - 1)


@torch.no_grad()
def evaluate(model: Flow, cfg: Config, out_dir: str | None = None) -> dict:
    """The metrics of one model on cfg.eval_n samples (same seeds on every rank, so every rank agrees)."""
    n = cfg.eval_n
    dev = next(model.parameters()).device
    pruner = make_pruner(cfg) if cfg.prune else None
    x0, rate = draw_source(cfg, model.shape, n, cfg.seed + 1, dev, pruner)
    target = target_samples(cfg, n, cfg.seed + 2)
    scale = model.x1_scale
    res = generate(model, cfg, x0)
    ada = generate(model, cfg, x0, method="dopri5")
    w, how = w2(res.x / scale, target)
    out = {"coupling": cfg.coupling, "sampler": cfg.sampler, "sample_steps": cfg.sample_steps, "n": n, "w2": w,
           "w2_method": how, "npe": npe(res, x0), "nfe": res.nfe, "w2_dopri5": w2(ada.x / scale, target)[0],
           "nfe_dopri5": ada.nfe, "tol": [cfg.atol, cfg.rtol]}
    # Tong et al.'s NPE compares the path energy with W2^2 between the source and target samples instead
    ot = w2(x0.cpu(), target.cpu() * scale.cpu())[0] ** 2
    out["npe_ot"] = abs(float(res.energy.mean()) - ot) / ot
    if not is_image(cfg):  # two target samples are this far apart: the floor of w2 at this n
        out["w2_floor"] = w2(target, target_samples(cfg, n, cfg.seed + 3))[0]
    if cfg.coupling == "wcfm":
        src = draw_source(cfg, model.shape, min(n, 2048), cfg.seed + 4, "cpu")[0]
        tgt = target[:len(src)] * scale.cpu()
        out["tilt_relvar_source"], out["tilt_relvar_target"] = tilt_relvar(
            src, tgt, cfg.kappa * math.sqrt(src[0].numel()), cfg.cost)
        b = min(cfg.batch_size, len(src))  # the pairs of one training batch carry this effective sample size / B:
        w = FlowMatcher("wcfm", cfg.sigma, src[0].numel(), cfg.kappa, cfg.cost).pair_weights(tgt[:b] - src[:b])
        out["ess"] = float(w.sum() ** 2 / w.square().sum() / b)
    if rate is not None:
        out["prune_rejection_rate"] = rate
    if is_image(cfg):
        grid = Path(out_dir or cfg.out_dir) / "eval_grid.png"  # the class-free grid: the null label when conditional
        if common.is_main():
            common.save_png(grid, common.image_grid((res.x[:64] / scale).clamp(-1, 1).cpu(), nrow=8))
        out["grid"] = str(grid)
    if cfg.target == "digits":
        y = torch.arange(n, device=dev) % cfg.num_classes if cfg.num_classes else None
        imgs = generate(model, cfg, x0, y).x / scale if y is not None else res.x / scale
        out.update(common.digits_metrics(imgs.clamp(-1, 1).cpu(), y.cpu() if y is not None else None))
    return out


# ----------------------------------------------------------------------------------------------------------------------
# The side-by-side figure


def scatter(img: np.ndarray, pts: np.ndarray, lo: np.ndarray, hi: np.ndarray, color, size: int = 1):
    """Splat 2D points into an (H, W, 3) image (y up) over the box [lo, hi]."""
    h, w, _ = img.shape
    ij = np.round((pts - lo) / (hi - lo) * [w - 1, h - 1]).astype(int)
    ok = (ij >= 0).all(1) & (ij[:, 0] < w) & (ij[:, 1] < h)
    for dx in range(size):
        for dy in range(size):
            img[np.clip(h - 1 - ij[ok, 1] - dy, 0, h - 1), np.clip(ij[ok, 0] + dx, 0, w - 1)] = color


def comparison_png(path, panels: dict, size: int = 320):
    """One panel per coupling: source points (black), trajectories (olive), samples (blue), and each coupling's W2,
    straightness and dopri5 NFE in its title (with matplotlib; a bare rasterised image without it)."""
    allpts = np.concatenate([p["path"].reshape(-1, 2) for p in panels.values()])
    lo, hi = np.percentile(allpts, 0.1, 0), np.percentile(allpts, 99.9, 0)
    lo, hi = lo - 0.05 * (hi - lo), hi + 0.05 * (hi - lo)
    lo, hi = np.minimum(lo, hi - (hi - lo).max()), np.maximum(hi, lo + (hi - lo).max())  # square box
    plt = common.pyplot()
    if plt is not None:
        fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 4.4), squeeze=False)
        for ax, (name, p) in zip(axes[0], panels.items()):
            m, path_ = p["metrics"], p["path"]
            ax.plot(path_[:, :256, 0], path_[:, :256, 1], color=(0.75, 0.75, 0.47), lw=0.5, alpha=0.6)
            ax.scatter(*path_[0].T, s=3, c="k", label="source x0")
            ax.scatter(*path_[-1].T, s=3, c="tab:blue", label="samples x1")
            ax.set_title(f"{LABELS[name]}: W2 {m['w2']:.3f} (floor {m['w2_floor']:.3f})\n"
                         f"straightness {m['npe']:.3f}, dopri5 NFE {m['nfe_dopri5']}", fontsize=9)
            ax.set(xlim=(lo[0], hi[0]), ylim=(lo[1], hi[1]), aspect="equal", xticks=[], yticks=[])
        axes[0][0].legend(loc="lower left", fontsize=8, markerscale=3)
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return
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


def build(cfg: Config) -> Flow:
    shape = (2,) if not is_image(cfg) else \
        ((1 if cfg.target == "digits" else 3), cfg.image_size, cfg.image_size)
    return Flow(cfg, shape)


def train_one(cfg: Config, d: common.Dist, resume: str | None, overwrite: bool = False) -> Flow:
    common.seed_all(cfg.seed)
    model = build(cfg)
    if is_image(cfg):
        x, y = load_images(cfg)
        data = common.ArrayDataset(x, y)
    else:
        data = toy_batches(cfg, d)
    dim = math.prod(model.shape)
    if cfg.norm_align:  # measured once, stored in the model: sampling divides by it
        probe = target_samples(cfg, 4096, cfg.seed + 5)
        src = draw_source(cfg, model.shape, 4096, cfg.seed + 6, "cpu")[0]
        model.x1_scale.fill_(src.flatten(1).norm(dim=1).mean() / probe.flatten(1).norm(dim=1).mean())
    fm = FlowMatcher(cfg.coupling, cfg.sigma, dim, cfg.kappa, cfg.cost, cfg.weights, cfg.ot_solver)
    common.print0(f"{cfg.coupling}: {fm.describe()}; {sum(p.numel() for p in model.parameters()):,} parameters "
                  f"-> {cfg.out_dir}")

    def loss_fn(net, batch):
        if is_image(cfg):
            x1, y = common.to_float(batch[0]), (batch[1] if cfg.num_classes else None)
            if cfg.hflip:
                x1 = torch.where(torch.rand(len(x1), 1, 1, 1, device=x1.device) < 0.5, x1.flip(-1), x1)
            x0 = torch.randn_like(x1)
        else:
            (x0, x1), y = batch, None
        return cfm_loss(net, fm, x0, x1 * model.x1_scale, y, cfg.p_uncond, cfg.num_classes)

    def periodic_eval(step, model, ema):
        with ema.swap(model):
            x0, _ = draw_source(cfg, model.shape, 1000 if not is_image(cfg) else 64, cfg.seed + 1, d.device)
            res = generate(model, cfg, x0)
        x = (res.x / model.x1_scale).cpu()
        if is_image(cfg):
            if d.is_main:
                common.save_png(Path(cfg.out_dir) / f"samples_{step:07d}.png", common.image_grid(x.clamp(-1, 1)))
            return {"eval_npe": npe(res, x0)}
        return {"eval_w2": w2(x, target_samples(cfg, 1000, cfg.seed + 2))[0], "eval_npe": npe(res, x0)}

    model, ema = common.train(cfg, model, loss_fn, data, d, resume=resume, overwrite=overwrite,
                              evaluate=periodic_eval)
    common.load_weights(model, {"model": model.state_dict(), "ema": ema.state_dict()})
    return model.eval()


def from_checkpoint(path: str, device="cpu", **overrides) -> tuple[Flow, Config]:
    """A trained model ready to sample (EMA weights, eval mode) and its config; `overrides` may change run-time fields
    (sampler, steps, guidance, pruning)."""
    state = common.load_checkpoint(path)
    cfg = common.config_from_checkpoint(Config, state, overrides, what=str(path))
    model = common.load_weights(build(cfg), state).to(device).eval()
    return model, cfg


def add_args(p: argparse.ArgumentParser):
    p.add_argument("--select-kappa", dest="select_kappa", action="store_true",
                   help="print the tilt curve Var(tau)/E[tau]^2 over a kappa grid and the elbow choice")


def main(argv=None):
    cfg, args, overrides = common.parse_config(Config, PRESETS, argv, extra=add_args, doc=__doc__)
    if args.plot:
        return common.print0(f"wrote {common.plot_log(args.plot)}")
    couplings = cfg.couplings
    d = common.setup_distributed(cfg.device)
    if not is_image(cfg) and d.device.type == "cpu":
        torch.set_num_threads(1)  # a 64-wide MLP gains nothing from intra-op threads, and loses a lot on shared cores
    out = Path(cfg.out_dir)
    multi = len(couplings) > 1

    if args.select_kappa:
        model = build(cfg)
        x1 = target_samples(cfg, 2048, cfg.seed + 2)
        x0 = draw_source(cfg, model.shape, len(x1), cfg.seed + 1, "cpu")[0]
        best, rows = select_kappa(x0, x1, cfg.cost)
        common.print0(f"{'N(0, I)' if is_image(cfg) else cfg.source} -> {cfg.target}, d = {x0[0].numel()}, "
                      f"cost = {cfg.cost}, n = {len(x1)}\n"
                      f"{'kappa':>10} {'eps':>10} {'relvar_source':>14} {'relvar_target':>14}")
        for k, eps, r0, r1 in rows:
            common.print0(f"{k:10.4g} {eps:10.4g} {r0:14.4g} {r1:14.4g}" + ("   <- elbow" if k == best else ""))
        common.print0(f"kappa = {best:.4g} (eps = {best * math.sqrt(x0[0].numel()):.4g}): the later of the two elbows "
                      "of log(1 + relvar) against log kappa")
        return

    if args.sample or args.eval:
        ckpts = {"ckpt": args.ckpt} if args.ckpt else \
            {c: str(out / c / "ckpt.pt" if multi else out / "ckpt.pt") for c in couplings}
        if args.sample:
            if multi and not args.ckpt:
                raise ValueError(f"this config trains {', '.join(couplings)}: pick one with --ckpt")
            model, mcfg = from_checkpoint(next(iter(ckpts.values())), d.device, **overrides)
            start, count = common.rank_split(args.n, d)
            pruner = make_pruner(mcfg) if mcfg.prune else None
            x0, rate = draw_source(mcfg, model.shape, count, mcfg.seed + 7919 * (d.rank + 1), d.device, pruner)
            y = (torch.arange(start, start + count, device=d.device) % mcfg.num_classes) if mcfg.num_classes else None
            res = generate(model, mcfg, x0, y)
            x = (res.x / model.x1_scale).cpu()
            arrays = {"samples": x.numpy()} if len(model.shape) == 1 else \
                {"images": common.to_uint8(x).permute(0, 2, 3, 1).numpy()}
            if y is not None:
                arrays["labels"] = y.cpu().numpy()
            common.save_npz(args.out, d, **arrays)
            common.print0(f"wrote {args.n} samples to {args.out} ({mcfg.sampler}, {res.nfe} NFE"
                          + (f", pruning rejected {rate:.1%} of Gaussian draws" if rate is not None else "") + ")")
        else:
            metrics = {}
            for c, path in ckpts.items():
                model, mcfg = from_checkpoint(path, d.device, **overrides)
                metrics[c] = evaluate(model, mcfg, out_dir=str(Path(path).parent))
            common.print0(json.dumps(metrics if multi and not args.ckpt else next(iter(metrics.values()))))
        return

    subs = [dataclasses.replace(cfg, coupling=c, out_dir=str(out / c) if multi else cfg.out_dir) for c in couplings]
    for sub in subs:  # before any training: never clobber one run after training another
        common.check_fresh(sub.out_dir, args.resume, args.overwrite)
    if args.resume and not args.ckpt and not any((Path(s.out_dir) / "ckpt.pt").exists() for s in subs):
        raise FileNotFoundError(f"no checkpoint to resume in {out}")
    panels = {}  # the side-by-side comparison (2D)
    for c, sub in zip(couplings, subs):
        ckpt = Path(sub.out_dir) / "ckpt.pt"
        resume = str(args.ckpt or ckpt) if args.resume and (ckpt.exists() or not multi) else None
        model = train_one(sub, d, resume, args.overwrite)
        if not multi or is_image(cfg):
            continue
        if common.load_checkpoint(ckpt)["step"] < sub.steps:
            break  # stopped early (SIGTERM, --stop_after): --resume picks up from here
        x0, _ = draw_source(sub, model.shape, 512, sub.seed + 1, d.device)
        path = generate(model, sub, x0, keep_path=True).path.cpu().numpy()
        panels[c] = {"metrics": evaluate(model, sub), "path": path}
    if len(panels) == len(couplings) > 1 and d.is_main:
        comparison_png(out / "compare.png", panels)
        table = {c: {k: p["metrics"][k] for k in ("w2", "npe", "npe_ot", "nfe_dopri5", "w2_dopri5")}
                 for c, p in panels.items()}
        (out / "compare.json").write_text(json.dumps(table, indent=1))
        print(f"\n{cfg.source} -> {cfg.target}, {cfg.steps} steps each, {cfg.eval_n} samples "
              f"(W2 floor {panels[couplings[0]]['metrics']['w2_floor']:.3f}); figure: {out / 'compare.png'}")
        print(f"{'coupling':10} {'W2':>7} {'NPE':>7} {'NPE_ot':>7} {'NFE(dopri5)':>12}")
        for c, m in table.items():
            print(f"{c:10} {m['w2']:7.3f} {m['npe']:7.3f} {m['npe_ot']:7.3f} {m['nfe_dopri5']:12d}")
    common.print0("done: " + common.existing(*[Path(s.out_dir) / n for s in subs for n in ("ckpt.pt", "log.jsonl")],
                                             out / "compare.png"))


if __name__ == "__main__":
    common.run(main)
