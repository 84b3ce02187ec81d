"""
mogfn.py -- Multi-Objective GFlowNets (MOGFN-PC): one preference-conditional GFlowNet for a whole Pareto front.

Paper: "Multi-Objective GFlowNets", Jain, Raparthy, Hernandez-Garcia, Rector-Brooks, Bengio, Miret, Bengio,
ICML 2023, https://arxiv.org/abs/2210.12765

M objectives f(x) in [0, 1]^M are scalarised by a preference w on the simplex, R(x | w) = s(f(x), w)^beta, and ONE
GFlowNet conditioned on (w, beta) learns to sample x with probability proportional to R(x | w). Training draws
w ~ Dirichlet(alpha) per trajectory and minimises trajectory balance with a conditional log Z(w, beta); at test time a
sweep of preferences over the simplex traces out the front. Trajectories are on-policy with epsilon-uniform
exploration, optionally mixed with P_B trajectories into states of a Pareto archive (replay). Scalarisations: the
weighted sum sum_i w_i f_i (the paper's default) and the weighted Tchebycheff one, turned into a reward to maximise
as 1 - max_i w_i (1 - f_i) (the Tchebycheff distance to the utopian point 1, subtracted from its largest value 1).

Tasks (a task is one class: states, valid actions, a step, the backward policy, the objectives, a policy network):
  HyperGrid  D coordinates in {0..H-1}, actions "increment coordinate d" or "stop". The grid spans [-1, 1]^D, mapped
             affinely onto each function's usual domain (branin, currin, shubert, beale read the first two
             coordinates; sphere all of them), and each objective is min-max normalised over the grid, larger =
             better. A DAG with several parents per state, so P_B is uniform over the parents; small enough that the
             learned terminal distribution is computed exactly by dynamic programming and compared with
             p_true(x) ~ R(x | w).
  NGrams     sequences over the 20 amino acids of length [min_len, max_len]; one objective per motif = overlapping
             occurrences / most possible; a causal transformer policy; P_B = 1 (a tree).

    python mogfn.py                                          # CPU demo: hypergrid-2obj, front + exact L1, minutes
    python mogfn.py --eval --ckpt out/mogfn/ckpt.pt          # HV, R2, top-k, diversity, L1, baselines: one JSON line
    python mogfn.py --sample --ckpt out/mogfn/ckpt.pt --n 100 --pref 0.3,0.7 --out samples.npz
    python mogfn.py --preset ngrams-2obj
    torchrun --nproc_per_node=2 mogfn.py --preset hypergrid-3obj   # trajectories split across ranks
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import common


OBJECTIVE_NAMES = ("branin", "currin", "shubert", "beale", "sphere")  # defined below


@dataclass
class Config(common.TrainConfig):
    task: str = common.opt("hypergrid", choices=("hypergrid", "ngrams"))  # hypergrid | ngrams
    objectives: tuple = common.opt(("branin", "currin"), choices=OBJECTIVE_NAMES)  # hypergrid objectives
    dim: int = common.opt(2, min=1)  # hypergrid dimensions D
    side: int = common.opt(32, min=2)  # hypergrid side H
    vocab: str = "ARNDCQEGHILKMFPSTWYV"  # n-grams alphabet (the 20 amino acids)
    motifs: tuple = ("AR", "GV")  # n-grams: one objective per motif
    min_len: int = common.opt(4, min=1)  # n-grams: shortest sequence (stop is masked before)
    max_len: int = common.opt(16, min=1)  # n-grams: longest sequence
    alpha: tuple = common.opt((1.0,), gt=0)  # Dirichlet concentration of preferences: one value or one per objective
    beta: float = common.opt(8.0, gt=0)  # reward exponent (the lower end when sampled)
    beta_max: float = 0.0  # > beta: draw beta ~ U[beta, beta_max] per trajectory and condition on it
    scalar: str = common.opt("ws", choices=("ws", "tch"))  # ws (weighted sum) | tch (weighted Tchebycheff, as a reward)
    r_min: float = common.opt(1e-3, gt=0)  # floor of the scalarised reward, so log R stays finite
    cond: str = common.opt("concat", choices=("concat", "film"))  # how (w, beta) enter the policy: concat | film
    therm: int = common.opt(16, min=1)  # thermometer bins per conditioning value
    width: int = common.opt(256, min=1)  # hidden width of the policy and of log Z(w, beta)
    depth: int = common.opt(2, min=1)  # hidden layers (MLP) or transformer blocks
    heads: int = common.opt(4, min=1)  # attention heads (n-grams)
    eps: float = common.opt(0.05, max=1)  # epsilon-uniform exploration while training
    replay: float = common.opt(0.0, max=1)  # fraction of each batch replayed from a Pareto archive (P_B trajectories)
    replay_size: int = common.opt(256, min=1)  # archive capacity
    lr_z: float = common.opt(1e-2, gt=0)  # learning rate of the log Z(w, beta) network
    n_div: int = common.opt(10, min=1)  # eval: preference grid {i / n_div} on the simplex
    eval_n: int = common.opt(128, min=1)  # eval: candidates sampled per preference
    top_k: int = common.opt(10, min=1)  # eval: top-k reward and diversity per preference

    NAME = "mogfn"
    RUNTIME = ("n_div", "eval_n", "top_k")

    def __post_init__(self):
        super().__post_init__()
        if self.min_len > self.max_len:
            raise ValueError(f"--min_len {self.min_len} exceeds --max_len {self.max_len}")
        if self.beta_max and self.beta_max <= self.beta:
            raise ValueError(f"--beta_max {self.beta_max} must exceed --beta {self.beta} (or be 0 = fixed beta)")


# training defaults of every preset: constant lr, no weight decay, raw weights (no EMA) for sampling and eval
_T = dict(batch_size=64, lr=1e-3, lr_schedule="constant", warmup=10, weight_decay=0.0, grad_clip=10.0, ema_decay=0.0,
          log_every=50, eval_every=500, ckpt_every=500)
PRESETS = {
    "hypergrid-2obj": dict(_T, steps=2000),
    "hypergrid-3obj": dict(_T, objectives=("branin", "currin", "shubert"), n_div=6, steps=3000),
    "hypergrid-4obj": dict(_T, objectives=("branin", "currin", "shubert", "beale"), n_div=4, steps=3000),
    # n-grams: 20^16 sequences, so a larger beta is needed for the target to put its mass near the front
    "ngrams-2obj": dict(_T, task="ngrams", motifs=("AR", "GV"), beta=32.0, replay=0.25, lr_z=0.1, width=64,
                        eval_n=64, steps=2000),
    "ngrams-3obj": dict(_T, task="ngrams", motifs=("AR", "GV", "KW"), beta=32.0, replay=0.25, lr_z=0.1, width=64,
                        eval_n=64, n_div=6, steps=3000),
}


# ----------------------------------------------------------------------------------------------------------------------
# Objectives and scalarisations


def _branin(u):  # u in [0, 1]^2 -> the usual domain [-5, 10] x [0, 15]; minimised
    x1, x2 = 15 * u[:, 0] - 5, 15 * u[:, 1]
    return (x2 - 5.1 / (4 * math.pi ** 2) * x1 ** 2 + 5 / math.pi * x1 - 6) ** 2 \
        + 10 * (1 - 1 / (8 * math.pi)) * torch.cos(x1) + 10


def _currin(u):  # on [0, 1]^2; minimised (as in the Branin-Currin pair)
    x1, x2 = u[:, 0], u[:, 1].clamp(min=1e-9)
    return (1 - torch.exp(-1 / (2 * x2))) * (2300 * x1 ** 3 + 1900 * x1 ** 2 + 2092 * x1 + 60) \
        / (100 * x1 ** 3 + 500 * x1 ** 2 + 4 * x1 + 20)


def _shubert(u):  # [-10, 10]^2, many local optima; minimised
    x = 20 * u[:, :2] - 10
    j = torch.arange(1, 6, dtype=u.dtype)
    return (j * torch.cos((j + 1) * x[..., None] + j)).sum(-1).prod(-1)


def _beale(u):  # [-4.5, 4.5]^2; minimised
    x1, x2 = 9 * u[:, 0] - 4.5, 9 * u[:, 1] - 4.5
    return (1.5 - x1 + x1 * x2) ** 2 + (2.25 - x1 + x1 * x2 ** 2) ** 2 + (2.625 - x1 + x1 * x2 ** 3) ** 2


def _sphere(u):  # sum of squares on [-1, 1]^D; minimised at the centre
    return (2 * u - 1).square().sum(-1)


OBJECTIVES = {"branin": _branin, "currin": _currin, "shubert": _shubert, "beale": _beale, "sphere": _sphere}


def scalarise(f: torch.Tensor, w: torch.Tensor, kind: str) -> torch.Tensor:
    """f, w: (..., M) -> (...,) in [0, 1]; larger is better."""
    if kind == "ws":
        return (w * f).sum(-1)
    return 1 - (w * (1 - f)).amax(-1)  # weighted Tchebycheff distance to the utopian point 1, as a reward


def log_reward(f, w, beta, cfg) -> torch.Tensor:  # log R(x | w) = beta log s, in log space so large beta is safe
    return beta * scalarise(f, w, cfg.scalar).clamp(min=cfg.r_min).log()


# ----------------------------------------------------------------------------------------------------------------------
# Tasks


class Task:
    """What a new task (molecules, say) implements. States are (B, S) long tensors, actions ints in [0, n_actions)
    with the last one `stop`; objectives are in [0, 1], larger is better."""
    n_actions: int
    n_obj: int
    max_steps: int  # longest trajectory, the stop included
    state_dim: int  # S

    def reset(self, n: int, device) -> torch.Tensor: ...
    def valid(self, x: torch.Tensor) -> torch.Tensor: ...  # (B, A) bool
    def step(self, x: torch.Tensor, a: torch.Tensor) -> torch.Tensor: ...  # a = -1 or stop: row unchanged
    def log_pb(self, x_next: torch.Tensor, a: torch.Tensor) -> torch.Tensor: ...  # (B,) log P_B(x | x_next)
    def backward(self, x: torch.Tensor, u: torch.Tensor): ...  # a P_B draw by uniforms u (B,) -> (parent, action)
    def objectives(self, x: torch.Tensor) -> torch.Tensor: ...  # (B, M)
    def policy(self, cfg: Config, cond_dim: int) -> nn.Module: ...  # (x (B, S), cond (B, C)) -> logits (B, A)
    def random(self, n: int, rng: np.random.Generator) -> torch.Tensor: ...  # uniform objects, for baselines
    def mutate(self, x: torch.Tensor, rng: np.random.Generator) -> torch.Tensor: ...  # a small random edit
    def distance(self, a: np.ndarray, b: np.ndarray) -> np.ndarray: ...  # pairwise rows (P, S), (P, S) -> (P,)

    def log_pf(self, policy, xs, acts, cond) -> torch.Tensor:
        """Sum of log P_F over each trajectory, every (state, action) pair in one batched forward.
        xs: (T+1, B, S) states, acts: (T, B) with -1 after the stop, cond: (B, C)."""
        T, B = acts.shape
        live = acts >= 0
        x, a = xs[:-1][live], acts[live]  # (N, S), (N,)
        c = cond.expand(T, *cond.shape)[live]  # (N, C)
        logits = policy(x, c).masked_fill(~self.valid(x), -math.inf)
        logp = logits.log_softmax(-1).gather(1, a[:, None])[:, 0]
        row = torch.arange(B, device=acts.device).expand(T, B)[live]
        return torch.zeros(B, device=acts.device, dtype=logp.dtype).index_add(0, row, logp)


class MLP(nn.Module):
    """State features -> logits, the condition entering by concatenation or by FiLM on every hidden layer."""

    def __init__(self, d_in, d_cond, width, depth, d_out, film):
        super().__init__()
        self.film = film
        d0 = d_in if film else d_in + d_cond
        self.layers = nn.ModuleList(nn.Linear(d0 if i == 0 else width, width) for i in range(depth))
        self.mods = nn.ModuleList(nn.Linear(d_cond, 2 * width) for _ in range(depth)) if film else None
        self.out = nn.Linear(width, d_out)

    def forward(self, h, c):  # (B, d_in), (B, d_cond) -> (B, d_out)
        h = h if self.film else torch.cat([h, c], -1)
        for i, layer in enumerate(self.layers):
            h = layer(h)
            if self.film:
                g, b = self.mods[i](c).chunk(2, -1)
                h = h * (1 + g) + b
            h = F.leaky_relu(h)
        return self.out(h)


class GridPolicy(nn.Module):
    def __init__(self, task, cfg, cond_dim):
        super().__init__()
        self.H = task.H
        self.mlp = MLP(task.D * task.H, cond_dim, cfg.width, cfg.depth, task.n_actions, cfg.cond == "film")

    def forward(self, x, c):  # (B, D) coordinates -> one-hot per coordinate (B, D*H)
        return self.mlp(F.one_hot(x, self.H).flatten(1).float(), c)


class HyperGrid(Task):
    def __init__(self, cfg: Config):
        if cfg.side < 2:
            raise ValueError(f"hypergrid side H must be >= 2, got {cfg.side}")
        if cfg.dim < 1 or cfg.side ** cfg.dim > 10 ** 7:
            raise ValueError(f"hypergrid of dim {cfg.dim} and side {cfg.side} is out of range")
        unknown = [o for o in cfg.objectives if o not in OBJECTIVES]
        if unknown or not cfg.objectives:
            raise ValueError(f"unknown objective {unknown[0] if unknown else '(none)'}; choose from "
                             f"{', '.join(OBJECTIVES)}")
        if cfg.dim < 2 and any(o != "sphere" for o in cfg.objectives):
            raise ValueError("branin, currin, shubert and beale need dim >= 2")
        self.D, self.H, self.names = cfg.dim, cfg.side, tuple(cfg.objectives)
        self.n_actions, self.n_obj, self.max_steps = self.D + 1, len(self.names), self.D * (self.H - 1) + 1
        self.state_dim = self.D
        # normalise each objective to [0, 1] over the whole grid (larger = better): exact, the grid is enumerable
        raw = self._raw(self.all_states())
        self.lo, self.hi = raw.amin(0), raw.amax(0)

    def all_states(self, device=None) -> torch.Tensor:  # (H^D, D) in row-major order
        g = torch.stack(torch.meshgrid(*[torch.arange(self.H)] * self.D, indexing="ij"), -1)
        return g.reshape(-1, self.D).to(device)

    def _raw(self, x):
        u = x.double() / (self.H - 1)  # [0, 1]^D; each function maps it to its own domain ([-1, 1]^D for sphere)
        return torch.stack([OBJECTIVES[n](u) for n in self.names], -1)

    def objectives(self, x):
        f = (self.hi.to(x.device) - self._raw(x.cpu()).to(x.device)) / (self.hi - self.lo).to(x.device)
        return f.float()

    def reset(self, n, device):
        return torch.zeros(n, self.D, dtype=torch.long, device=device)

    def valid(self, x):  # increment only below the edge; stop is always allowed
        return torch.cat([x < self.H - 1, torch.ones_like(x[:, :1], dtype=torch.bool)], -1)

    def step(self, x, a):
        move = (a >= 0) & (a < self.D)
        return x + move[:, None] * F.one_hot(a.clamp(0, self.D - 1), self.D)

    def log_pb(self, x_next, a):  # uniform over the parents: one per non-zero coordinate; stop has one parent
        parents = (x_next > 0).sum(-1).clamp(min=1)
        return torch.where(a < self.D, -parents.float().log(), torch.zeros_like(parents, dtype=torch.float))

    def backward(self, x, u):  # decrement the k-th non-zero coordinate, k uniform
        nz = x > 0
        k = (u * nz.sum(-1)).long().clamp(max=self.D - 1)  # (B,)
        d = ((nz.cumsum(-1) - 1 == k[:, None]) & nz).float().argmax(-1)
        return x - F.one_hot(d, self.D), d

    def policy(self, cfg, cond_dim):
        return GridPolicy(self, cfg, cond_dim)

    def random(self, n, rng):
        return torch.as_tensor(rng.integers(0, self.H, (n, self.D)))

    def mutate(self, x, rng):
        d = torch.as_tensor(rng.integers(0, self.D, len(x)))
        step = torch.as_tensor(rng.choice([-1, 1], len(x)))
        return x.clone().index_put_((torch.arange(len(x)), d), (x[torch.arange(len(x)), d] + step).clamp(0, self.H - 1))

    def distance(self, a, b):  # Hamming distance between coordinate vectors
        return (a != b).sum(-1).astype(np.float64)


class SeqPolicy(nn.Module):
    """Causal transformer over [cond token, x_1, ..., x_t]; the output at position t scores the action after x_<=t."""

    def __init__(self, task, cfg, cond_dim):
        super().__init__()
        self.V, self.L, self.film = task.V, task.L, cfg.cond == "film"
        self.tok = nn.Embedding(task.V + 1, cfg.width)  # + a padding token, never attended to by live positions
        self.pos = nn.Parameter(torch.randn(task.L + 1, cfg.width) * 0.02)
        self.cond = nn.Sequential(nn.Linear(cond_dim, cfg.width), nn.GELU(), nn.Linear(cfg.width, cfg.width))
        self.mods = nn.ModuleList(nn.Linear(cond_dim, 2 * cfg.width) for _ in range(cfg.depth)) if self.film else None
        self.blocks = nn.ModuleList(common.Block(cfg.width, cfg.heads) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(cfg.width)
        self.head = nn.Linear(cfg.width, task.n_actions)

    def all_logits(self, x, c):  # (B, L) tokens (V = pad), (B, C) -> (B, L+1, A): logits after each prefix
        h = torch.cat([self.cond(c)[:, None], self.tok(x)], 1) + self.pos  # (B, L+1, W)
        for i, blk in enumerate(self.blocks):
            h = blk(h, causal=True)
            if self.film:
                g, b = self.mods[i](c)[:, None].chunk(2, -1)
                h = h * (1 + g) + b
        return self.head(self.norm(h))

    def forward(self, x, c):  # logits at each sequence's current length
        n = (x < self.V).sum(-1)
        return self.all_logits(x, c)[torch.arange(len(x)), n]


class NGrams(Task):
    def __init__(self, cfg: Config):
        if not cfg.motifs:
            raise ValueError("ngrams needs at least one motif")
        bad = [m for m in cfg.motifs if not m or any(ch not in cfg.vocab for ch in m)]
        if bad:
            raise ValueError(f"motif {bad[0]!r} has letters outside the vocabulary {cfg.vocab}")
        if not 1 <= cfg.min_len <= cfg.max_len:
            raise ValueError(f"need 1 <= min_len <= max_len, got {cfg.min_len}, {cfg.max_len}")
        self.vocab, self.V, self.L, self.min_len = cfg.vocab, len(cfg.vocab), cfg.max_len, cfg.min_len
        self.motifs = [torch.tensor([cfg.vocab.index(ch) for ch in m]) for m in cfg.motifs]
        self.n_actions, self.n_obj, self.max_steps = self.V + 1, len(cfg.motifs), self.L + 1
        self.state_dim = self.L
        # the most overlapping occurrences in max_len letters: one every `period` letters, the motif's smallest shift
        # that overlaps itself
        self.most = []
        for m in cfg.motifs:
            k = len(m)
            period = next(p for p in range(1, k + 1) if m[p:] == m[:k - p])
            self.most.append((self.L - k) // period + 1 if self.L >= k else 1)

    def reset(self, n, device):
        return torch.full((n, self.L), self.V, dtype=torch.long, device=device)

    def valid(self, x):
        n = (x < self.V).sum(-1, keepdim=True)  # (B, 1) current length
        return torch.cat([(n < self.L).expand(-1, self.V), n >= self.min_len], -1)

    def step(self, x, a):
        n = (x < self.V).sum(-1)
        put = (a >= 0) & (a < self.V)
        x = x.clone()
        rows = torch.nonzero(put)[:, 0]
        x[rows, n[rows]] = a[rows]
        return x

    def log_pb(self, x_next, a):  # autoregressive: one parent per state
        return torch.zeros(len(a), device=a.device)

    def backward(self, x, u):  # remove the last letter
        i = ((x < self.V).sum(-1) - 1).clamp(min=0)
        rows = torch.arange(len(x), device=x.device)
        a = x[rows, i]
        x = x.clone()
        x[rows, i] = self.V
        return x, a

    def objectives(self, x):
        out = []
        for m, most in zip(self.motifs, self.most):
            k = len(m)
            if k > self.L:
                out.append(torch.zeros(len(x), device=x.device))
                continue
            win = x.unfold(1, k, 1)  # (B, L-k+1, k) all windows, overlapping ones included
            out.append((win == m.to(x.device)).all(-1).sum(-1).float() / most)
        return torch.stack(out, -1)

    def policy(self, cfg, cond_dim):
        return SeqPolicy(self, cfg, cond_dim)

    def log_pf(self, policy, xs, acts, cond):
        """One transformer pass over the finished sequences scores every step of their trajectories."""
        x = xs[-1]  # (B, L)
        n = (x < self.V).sum(-1)  # (B,)
        logits = policy.all_logits(x, cond)  # (B, L+1, A)
        t = torch.arange(self.L + 1, device=x.device)
        valid = torch.cat([(t < self.L)[None, :, None].expand(len(x), -1, self.V),
                           (t >= self.min_len)[None, :, None].expand(len(x), -1, 1)], -1)
        logp = logits.masked_fill(~valid, -math.inf).log_softmax(-1)
        a = torch.cat([x, torch.full_like(x[:, :1], self.V)], 1)  # (B, L+1): the letter taken at t, stop at t = n
        lp = logp.gather(2, a[..., None])[..., 0]
        return torch.where(t[None] <= n[:, None], lp, 0.0).sum(-1)

    def random(self, n, rng):
        lens = rng.integers(self.min_len, self.L + 1, n)
        x = rng.integers(0, self.V, (n, self.L))
        x[np.arange(self.L)[None] >= lens[:, None]] = self.V
        return torch.as_tensor(x)

    def mutate(self, x, rng):  # substitute one letter
        n = (x < self.V).sum(-1).numpy()
        i = torch.as_tensor((rng.random(len(x)) * n).astype(np.int64))
        x = x.clone()
        x[torch.arange(len(x)), i] = torch.as_tensor(rng.integers(0, self.V, len(x)))
        return x

    def distance(self, a, b):  # Levenshtein edit distance, vectorised over the pairs
        la, lb = (a < self.V).sum(-1), (b < self.V).sum(-1)
        P = len(a)
        prev = np.tile(np.arange(self.L + 1), (P, 1))
        for i in range(1, self.L + 1):
            cur = np.empty_like(prev)
            cur[:, 0] = i
            for j in range(1, self.L + 1):
                sub = prev[:, j - 1] + (a[:, i - 1] != b[:, j - 1])
                cur[:, j] = np.minimum(np.minimum(prev[:, j] + 1, cur[:, j - 1] + 1), sub)
            prev = np.where((i <= la)[:, None], cur, prev)
        return prev[np.arange(P), lb].astype(np.float64)


def make_task(cfg: Config) -> Task:
    tasks = {"hypergrid": HyperGrid, "ngrams": NGrams}
    if cfg.task not in tasks:
        raise ValueError(f"unknown task {cfg.task}; choose from {', '.join(tasks)}")
    return tasks[cfg.task](cfg)


# ----------------------------------------------------------------------------------------------------------------------
# The preference-conditional GFlowNet


def thermometer(v: torch.Tensor, bins: int) -> torch.Tensor:
    """(..., K) values in [0, 1] -> (..., K*bins): bin k is clamp(v*bins - k, 0, 1), a smooth, ordered code."""
    k = torch.arange(bins, device=v.device, dtype=v.dtype)
    return (v[..., None] * bins - k).clamp(0, 1).flatten(-2)


class MOGFN(nn.Module):
    def __init__(self, cfg: Config, task: Task):
        super().__init__()
        self.cfg, self.task = cfg, task
        self.cond_dim = cfg.therm * (task.n_obj + (cfg.beta_max > cfg.beta))
        self.policy = task.policy(cfg, self.cond_dim)
        self.logz = nn.Sequential(nn.Linear(self.cond_dim, cfg.width), nn.LeakyReLU(), nn.Linear(cfg.width, 1))
        if cfg.replay > 0:  # a Pareto archive of terminal states seen so far, saved with the weights
            self.register_buffer("archive", torch.zeros(cfg.replay_size, task.state_dim, dtype=torch.long))
            self.register_buffer("archive_n", torch.zeros((), dtype=torch.long))

    def encode(self, w, beta):  # (B, M), (B,) -> (B, C)
        parts = [w]
        if self.cfg.beta_max > self.cfg.beta:
            parts.append(((beta - self.cfg.beta) / (self.cfg.beta_max - self.cfg.beta))[:, None])
        return thermometer(torch.cat(parts, -1), self.cfg.therm)

    def forward(self, xs, acts, cond):  # -> sum log P_F (B,), log Z(w, beta) (B,); one call, so DDP sees all params
        return self.task.log_pf(self.policy, xs, acts, cond), self.logz(cond)[:, 0]


@torch.no_grad()
def rollout(model: MOGFN, cond: torch.Tensor, rng: np.random.Generator, eps: float = 0.0, n_global: int | None = None,
            start: int = 0):
    """Sample trajectories for all rows at once. Each step draws one uniform per row of the GLOBAL batch and uses this
    rank's slice [start, start + B), so a batch split across ranks samples exactly what one process would.
    Returns xs (T+1, B, S), acts (T, B) (-1 once stopped), terminal x (B, S)."""
    task, B = model.task, len(cond)
    n_global = n_global or B
    x = task.reset(B, cond.device)
    done = torch.zeros(B, dtype=torch.bool, device=cond.device)
    xs, acts = [x], []
    for _ in range(task.max_steps):
        live = torch.nonzero(~done)[:, 0]  # the policy runs on unfinished rows only
        valid = task.valid(x[live])
        p = model.policy(x[live], cond[live]).float().masked_fill(~valid, -math.inf).softmax(-1)
        p = (1 - eps) * p + eps * valid / valid.sum(-1, keepdim=True)  # epsilon-uniform over the VALID actions
        u = torch.as_tensor(1 - rng.random(n_global)[start:start + B], device=x.device, dtype=p.dtype)  # (0, 1]
        cdf = p.cumsum(-1)
        a = torch.full_like(done, -1, dtype=torch.long)
        a[live] = (cdf < u[live, None] * cdf[:, -1:]).sum(-1)  # inverse CDF; zero-probability actions never hit
        x = task.step(x, a)
        done = done | (a == task.n_actions - 1)
        xs.append(x)
        acts.append(a)
        if done.all():
            break
    return torch.stack(xs), torch.stack(acts), x


@torch.no_grad()
def backward_rollout(task: Task, x: torch.Tensor, rng: np.random.Generator, n_global: int, start: int = 0):
    """Trajectories that end in given terminal states, drawn from P_B (replay): walk back to s0, then reverse.
    Same output layout as rollout."""
    B, s0 = len(x), task.reset(1, x.device)
    states, acts, cur = [x], [], x
    for _ in range(task.max_steps - 1):
        at0 = (cur == s0).all(-1)
        if at0.all():
            break
        u = torch.as_tensor(rng.random(n_global)[start:start + B], device=x.device, dtype=torch.float)
        prev, a = task.backward(cur, u)
        cur = torch.where(at0[:, None], cur, prev)
        states.append(cur)
        acts.append(torch.where(at0, -1, a))
    S = torch.stack(states)  # (K, B, S): S[k+1] is the parent of S[k]
    A = torch.stack(acts) if acts else torch.zeros(0, B, dtype=torch.long, device=x.device)  # A[k]: S[k+1] -> S[k]
    n = (A >= 0).sum(0)  # (B,) moves before the stop
    t = torch.arange(len(S) + 1, device=x.device)[:, None]  # forward time
    xs = S.gather(0, (n[None] - t).clamp(min=0)[..., None].expand(-1, -1, S.shape[-1]))  # (K+1, B, S)
    fwd = A.gather(0, (n[None] - 1 - t[:-1]).clamp(min=0)) if len(A) else torch.zeros_like(t[:-1] + n[None])
    acts = torch.where(t[:-1] < n[None], fwd, torch.where(t[:-1] == n[None], task.n_actions - 1, -1))  # (K, B)
    return xs, acts


def _pad(xs, acts, T):  # to T steps: the last state repeated, actions -1
    k = T - acts.shape[0]
    return torch.cat([xs, xs[-1:].expand(k, -1, -1)]), torch.cat([acts, acts.new_full((k, acts.shape[1]), -1)])


def sample_conditions(cfg: Config, n_obj: int, n: int, rng: np.random.Generator):
    alpha = np.broadcast_to(np.asarray(cfg.alpha, dtype=np.float64), (n_obj,))  # one value or one per objective
    w = torch.as_tensor(rng.dirichlet(alpha, n), dtype=torch.float32)
    beta = cfg.beta + (cfg.beta_max - cfg.beta) * rng.random(n) if cfg.beta_max > cfg.beta else np.full(n, cfg.beta)
    return w, torch.as_tensor(beta, dtype=torch.float32)


def tb_loss(net, model: MOGFN, xs, acts, x, w, beta, cond):
    """Trajectory balance: (log Z(w, beta) + sum log P_F - log R(x | w) - sum log P_B)^2, mean over trajectories."""
    log_pf, log_z = net(xs, acts, cond)
    live = acts >= 0
    pb = model.task.log_pb(xs[1:].flatten(0, 1), acts.flatten()).view(acts.shape)
    log_pb = (pb * live).sum(0)
    log_r = log_reward(model.task.objectives(x), w.to(x.device), beta.to(x.device), model.cfg)
    return (log_z + log_pf - log_r - log_pb).square().mean(), log_z.detach(), log_r.detach()


def check_pref(w: torch.Tensor, n_obj: int) -> torch.Tensor:
    if w.shape[-1] != n_obj:
        raise ValueError(f"a preference needs {n_obj} weights, got {w.shape[-1]}")
    bad = ((w < 0).any(-1) | ((w.sum(-1) - 1).abs() > 1e-4)).reshape(-1)
    if bad.any():  # name the first offender, not a whole batch
        raise ValueError(f"preference {w.reshape(-1, n_obj)[bad][0].tolist()} is not on the simplex (weights >= 0 "
                         f"summing to 1)")
    return w


@torch.no_grad()
def sample(model: MOGFN, w: torch.Tensor, beta: float | torch.Tensor, seed: int = 0):
    """Candidates for given preferences, no exploration: -> x (B, S), objectives (B, M)."""
    w = check_pref(w.float(), model.task.n_obj)
    beta = torch.as_tensor(beta, dtype=torch.float32).expand(len(w))
    dev = next(model.parameters()).device
    _, _, x = rollout(model, model.encode(w, beta).to(dev), np.random.default_rng(seed))
    return x.cpu(), model.task.objectives(x).cpu()


@torch.no_grad()
def terminal_distribution(model: MOGFN, cond: torch.Tensor) -> torch.Tensor:
    """HyperGrid: the exact P_T(x) of the learned policy (no exploration) for each condition, by dynamic programming
    over the DAG: P(reach s) = sum over parents s' of P(reach s') P_F(s | s'), P_T(s) = P(reach s) P_F(stop | s).
    cond (C, cdim) -> (C, H^D), states in HyperGrid.all_states order."""
    task = model.task
    dev = cond.device
    s = task.all_states(dev)  # (N, D)
    N, C = len(s), len(cond)
    logits = model.policy(s.repeat(C, 1), cond.repeat_interleave(N, 0)).view(C, N, -1).float()
    pf = logits.masked_fill(~task.valid(s)[None], -math.inf).softmax(-1)  # (C, N, D+1)
    strides = torch.tensor([task.H ** (task.D - 1 - d) for d in range(task.D)], device=dev)
    level = s.sum(-1)
    reach = torch.zeros(C, N, device=dev)
    reach[:, 0] = 1.0
    for lv in range(1, int(level.max()) + 1):  # one vectorised update per level of the DAG
        idx = torch.nonzero(level == lv)[:, 0]
        for d in range(task.D):
            has = s[idx, d] > 0
            par = idx[has] - strides[d]
            reach[:, idx[has]] += reach[:, par] * pf[:, par, d]
    return reach * pf[..., -1]


def true_distribution(task: HyperGrid, w, beta, cfg) -> torch.Tensor:  # (C, M), (C,) -> (C, N), p ~ R(x|w)
    f = task.objectives(task.all_states())  # (N, M)
    lr = log_reward(f[None], w[:, None], beta[:, None], cfg)
    return lr.double().softmax(-1).float()


# ----------------------------------------------------------------------------------------------------------------------
# Pareto metrics


def pareto_mask(f: torch.Tensor) -> torch.Tensor:
    """(N, M) maximised -> (N,) True on the non-dominated points (duplicates kept once)."""
    ge = (f[:, None] >= f[None]).all(-1)  # ge[i, j]: i weakly dominates j
    gt = (f[:, None] > f[None]).any(-1)
    dominated = (ge & gt).any(0)
    repeat = (f[:, None] == f[None]).all(-1).tril(-1).any(1)  # an equal point came earlier
    return ~dominated & ~repeat


def _hv_exact(p: np.ndarray, ref: np.ndarray) -> float:
    """Exact hypervolume by slicing along the last objective (2-D base case: a sweep)."""
    p = p[(p > ref).all(1)]
    if len(p) == 0:
        return 0.0
    if p.shape[1] == 1:
        return float(p[:, 0].max() - ref[0])
    if p.shape[1] == 2:
        p = p[np.argsort(-p[:, 0])]
        hv, top = 0.0, ref[1]
        for a, b in p:
            if b > top:
                hv += (a - ref[0]) * (b - top)
                top = b
        return hv
    p = p[np.argsort(-p[:, -1])]
    hv = 0.0
    for i in range(len(p)):  # slab between the i-th and the next highest last coordinate
        lower = p[i + 1, -1] if i + 1 < len(p) else ref[-1]
        if p[i, -1] > lower:
            hv += (p[i, -1] - lower) * _hv_exact(p[:i + 1, :-1], ref[:-1])
    return hv


def hypervolume(f: torch.Tensor | np.ndarray, ref=None, mc: int = 200_000, seed: int = 0) -> tuple[float, float]:
    """Dominated hypervolume of maximised points above `ref` (default 0) -> (value, standard error). Exact for up to 3
    objectives; Monte-Carlo in the box [ref, max] above that, with its standard error."""
    f = np.asarray(f, dtype=np.float64)
    ref = np.zeros(f.shape[1]) if ref is None else np.asarray(ref, dtype=np.float64)
    if f.shape[1] <= 3:
        return _hv_exact(f, ref), 0.0
    f = f[(f > ref).all(1)]
    if len(f) == 0:
        return 0.0, 0.0
    hi = f.max(0)
    u = ref + (hi - ref) * np.random.default_rng(seed).random((mc, f.shape[1]))
    hit = np.zeros(mc, dtype=bool)
    for i in range(0, len(f), 64):
        hit |= (u[:, None] <= f[None, i:i + 64]).all(-1).any(1)
    vol = np.prod(hi - ref)
    p = hit.mean()
    return float(vol * p), float(vol * math.sqrt(p * (1 - p) / mc))


def r2_indicator(f: torch.Tensor, weights: torch.Tensor, utopia: float = 1.0) -> float:
    """R2 = mean over weight vectors w of min over points y of max_i w_i |z*_i - y_i| (lower is better)."""
    d = (weights[:, None] * (utopia - f[None]).abs()).amax(-1)  # (W, N)
    return float(d.amin(1).mean())


def simplex_grid(m: int, n_div: int) -> torch.Tensor:
    """All w with w_i in {0, 1/n_div, ..., 1} and sum 1 -> (P, m)."""
    pts = [c for c in itertools.product(range(n_div + 1), repeat=m - 1) if sum(c) <= n_div]
    return torch.tensor([[*c, n_div - sum(c)] for c in pts], dtype=torch.float32) / n_div


def cluster_entropy(f: torch.Tensor, centres: torch.Tensor) -> float:
    """Pareto-cluster entropy: assign each point to the nearest (by angle) of the preference directions and take the
    entropy of the cluster sizes, divided by log(#clusters): 1 = points spread evenly over the front's directions."""
    fn = F.normalize(f.float() + 1e-9, dim=-1)
    k = (fn @ F.normalize(centres, dim=-1).T).argmax(-1)
    p = torch.bincount(k, minlength=len(centres)).float() / len(k)
    return float(-(p[p > 0] * p[p > 0].log()).sum() / math.log(len(centres)))


# ----------------------------------------------------------------------------------------------------------------------
# Evaluation and baselines


def front_metrics(f: torch.Tensor, weights: torch.Tensor) -> dict:
    front = f[pareto_mask(f)]
    hv, err = hypervolume(front)
    out = {"hv": hv, "r2": r2_indicator(front, weights)}
    if err:
        out["hv_err"] = err
    return out


def baselines(task: Task, budget: int, weights: torch.Tensor, seed: int = 0) -> dict:
    """Context at the same number of reward calls: uniform random objects, and a Pareto-archive evolutionary search
    (mutate a random archive member, keep the non-dominated set)."""
    rng = np.random.default_rng(seed)
    rand = front_metrics(task.objectives(task.random(budget, rng)), weights)
    pop = task.random(max(budget // 10, 1), rng)
    f, used = task.objectives(pop), len(pop)
    while used < budget:
        keep = pareto_mask(f)
        pop, f = pop[keep], f[keep]
        n = min(len(pop) * 4 + 16, budget - used)
        kids = task.mutate(pop[torch.as_tensor(rng.integers(0, len(pop), n))], rng)
        pop, f, used = torch.cat([pop, kids]), torch.cat([f, task.objectives(kids)]), used + n
    evo = front_metrics(f, weights)
    return {**{f"random_{k}": v for k, v in rand.items()}, **{f"evo_{k}": v for k, v in evo.items()}}


@torch.no_grad()
def evaluate(model: MOGFN, cfg: Config, seed: int = 0, with_baselines: bool = False):
    """The paper's protocol: a grid of preferences; eval_n candidates each without exploration; the top-1 by
    scalarised reward per preference forms the candidate set (HV, R2); top-k reward and diversity per preference.
    HyperGrid also: the true front's HV and the exact L1 between learned and true terminal distributions."""
    task, dev = model.task, next(model.parameters()).device
    W = simplex_grid(task.n_obj, cfg.n_div)  # (P, M)
    P, n = len(W), cfg.eval_n
    betas = [cfg.beta] if cfg.beta_max <= cfg.beta else [cfg.beta, (cfg.beta + cfg.beta_max) / 2, cfg.beta_max]
    beta = betas[-1]
    x, f = sample(model, W.repeat_interleave(n, 0), beta, seed)
    x, f = x.view(P, n, -1), f.view(P, n, -1)
    s = scalarise(f, W[:, None], cfg.scalar)  # (P, n)
    top = s.argsort(1, descending=True)[:, :cfg.top_k]  # (P, k)
    top1 = f[torch.arange(P), top[:, 0]]  # (P, M)
    res = {**front_metrics(top1, W), **{f"{k}_all": v for k, v in front_metrics(f.flatten(0, 1), W).items()}}
    res["topk_reward"] = float(s.gather(1, top).mean())
    xk = x[torch.arange(P)[:, None], top].numpy()  # (P, k, S)
    i, j = np.triu_indices(xk.shape[1], 1)
    res["topk_diversity"] = float(task.distance(xk[:, i].reshape(-1, xk.shape[-1]),
                                                xk[:, j].reshape(-1, xk.shape[-1])).mean())
    res["pc_entropy"] = cluster_entropy(f.flatten(0, 1)[pareto_mask(f.flatten(0, 1))], W)
    if isinstance(task, HyperGrid):
        fall = task.objectives(task.all_states())
        res["hv_true"] = hypervolume(fall[pareto_mask(fall)])[0]
        res["hv_ratio"] = res["hv"] / res["hv_true"]
        l1 = []
        for b in betas:
            bb = torch.full((P,), b)
            p = terminal_distribution(model, model.encode(W, bb).to(dev)).cpu()
            l1.append((p - true_distribution(task, W, bb, cfg)).abs().sum(-1))
        res["l1"] = float(torch.cat(l1).mean())
    if with_baselines:
        res.update(baselines(task, P * n, W, seed))
    return res


def plot_front(path, task: Task, model: MOGFN, cfg: Config, metrics: dict | None = None, size: int = 320):
    """Objectives 1 and 2: every grid state (grey, HyperGrid), the true front (green) and the top-1 candidate of a
    fine preference sweep (red). Labelled, with the headline metrics beside their baselines in the title, when
    matplotlib is installed; else drawn straight into a bare uint8 image."""
    W = simplex_grid(task.n_obj, 50 if task.n_obj == 2 else 8)
    _, f = sample(model, W.repeat_interleave(16, 0), cfg.beta_max if cfg.beta_max > cfg.beta else cfg.beta)
    f = f.view(len(W), 16, -1)
    top1 = f[torch.arange(len(W)), scalarise(f, W[:, None], cfg.scalar).argmax(1)]
    fall = task.objectives(task.all_states()) if isinstance(task, HyperGrid) else None
    plt = common.pyplot()
    if plt is not None:
        fig, ax = plt.subplots(figsize=(5.5, 5.5))
        if fall is not None:
            ax.scatter(fall[:, 0], fall[:, 1], s=3, c="0.82", label=f"all {len(fall)} grid states")
            front = fall[pareto_mask(fall)]
            ax.scatter(front[:, 0], front[:, 1], s=30, c="tab:green", label=f"true Pareto front ({len(front)})")
        ax.scatter(top1[:, 0], top1[:, 1], s=12, c="tab:red", label=f"MOGFN top-1 of 16, {len(W)} preferences")
        names = cfg.objectives if cfg.task == "hypergrid" else [f"motif {m} count" for m in cfg.motifs]
        ax.set_xlabel(f"{names[0]} (scaled, 1 = best)")
        ax.set_ylabel(f"{names[1]} (scaled, 1 = best)")
        m = metrics or {}
        title = [f"{cfg.task}, step {m['step']}" if "step" in m else cfg.task]
        if "hv" in m:
            parts = [f"HV {m['hv']:.3f}"] + [f"{label} {m[key]:.3f}" for label, key in
                                             (("true front", "hv_true"), ("random", "random_hv"),
                                              ("evolution", "evo_hv")) if key in m]
            title.append(parts[0] + (f" ({', '.join(parts[1:])})" if len(parts) > 1 else ""))
        if "l1" in m:
            title.append(f"mean L1 to p(x|w) {m['l1']:.3f}")
        ax.set_title("\n".join(title), fontsize=9)
        ax.legend(loc="lower left", fontsize=8)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return
    img = np.full((size, size, 3), 255, np.uint8)
    pad = 16

    def dots(f, color, r):
        px = (pad + f[:, 0].clamp(0, 1).numpy() * (size - 2 * pad)).astype(int)
        py = (size - pad - f[:, 1].clamp(0, 1).numpy() * (size - 2 * pad)).astype(int)
        for dx in range(-r, r + 1):
            for dy in range(-r, r + 1):
                img[np.clip(py + dy, 0, size - 1), np.clip(px + dx, 0, size - 1)] = color

    img[size - pad, pad:size - pad] = img[pad:size - pad, pad] = 0  # axes
    if fall is not None:
        dots(fall, (200, 200, 200), 0)
        dots(fall[pareto_mask(fall)], (0, 160, 0), 2)
    dots(top1, (220, 0, 0), 1)
    common.save_png(path, img)


# ----------------------------------------------------------------------------------------------------------------------
# Trainer


def build(cfg: Config, device="cpu") -> MOGFN:
    if cfg.scalar not in ("ws", "tch"):
        raise ValueError(f"unknown scalarisation {cfg.scalar}; choose ws or tch")
    if cfg.cond not in ("concat", "film"):
        raise ValueError(f"unknown conditioning {cfg.cond}; choose concat or film")
    task = make_task(cfg)
    if len(cfg.alpha) not in (1, task.n_obj) or min(cfg.alpha) <= 0:
        raise ValueError(f"alpha needs 1 or {task.n_obj} positive values, got {cfg.alpha}")
    return MOGFN(cfg, task).to(device)


def optimizer(model: MOGFN, cfg: Config):  # log Z gets its own (larger) learning rate
    z = list(model.logz.parameters())
    rest = [p for n, p in model.named_parameters() if not n.startswith("logz.")]
    return torch.optim.Adam([{"params": rest, "lr": cfg.lr}, {"params": z, "lr": cfg.lr_z}],
                            betas=(cfg.beta1, cfg.beta2), weight_decay=cfg.weight_decay)


def train_step_fn(model: MOGFN, cfg: Config, d: common.Dist):
    """Trajectories are a pure function of (seed, step): every rank draws the global batch's randomness and keeps its
    slice, so --resume and any number of ranks reproduce one process. A batch is (rows of the global batch, step), so
    --grad_accum splits the rows (with --replay the archive then grows after each micro-batch, not once per step)."""

    def loss_fn(net, batch):
        rows, step = batch[0], int(batch[1][0])
        start, count = int(rows[0]), len(rows)  # this (micro-)batch's slice of the global batch
        rng = np.random.default_rng([cfg.seed, step])
        w, beta = sample_conditions(cfg, model.task.n_obj, cfg.batch_size, rng)
        w, beta = w[start:start + count].to(d.device), beta[start:start + count].to(d.device)
        cond = model.encode(w, beta)
        xs, acts, x = rollout(model, cond, rng, cfg.eps, cfg.batch_size, start)
        if cfg.replay > 0:
            xs, acts, x = replay(xs, acts, x, np.random.default_rng([cfg.seed, step, 1]), start, count)
        loss, log_z, log_r = tb_loss(net, model, xs, acts, x, w, beta, cond)
        return loss, {"log_z": log_z.mean(), "log_r": log_r.mean(), "traj_len": (acts >= 0).sum(0).float().mean()}

    def replay(xs, acts, x, rng, start, count):
        """Replace rows by P_B trajectories into archived states (TB is off-policy; they keep this batch's
        preferences), then add the sampled terminal states of ALL ranks to the archive."""
        n_arc = int(model.archive_n)
        first = min(max(cfg.batch_size - int(cfg.replay * cfg.batch_size) - start, 0), count)  # the global batch's
        n_rep = count - first  # last replay * B rows are replayed, wherever the ranks split it
        picks = rng.integers(0, max(n_arc, 1), cfg.batch_size)[start + first:start + count]
        new = x
        if d.distributed:  # every rank keeps the same archive
            parts = [torch.empty_like(x) for _ in range(d.world_size)]
            torch.distributed.all_gather(parts, x.contiguous())
            new = torch.cat(parts)
        if n_arc and n_rep:
            bxs, bacts = backward_rollout(model.task, model.archive[torch.as_tensor(picks)], rng, cfg.batch_size,
                                          start + first)
            T = max(len(acts), len(bacts))
            (xs, acts), (bxs, bacts) = _pad(xs, acts, T), _pad(bxs, bacts, T)
            xs, acts = torch.cat([xs[:, :first], bxs], 1), torch.cat([acts[:, :first], bacts], 1)
            x = xs[-1]
        pool = torch.cat([model.archive[:n_arc], new])
        keep = pareto_mask(model.task.objectives(pool).cpu()).to(pool.device)
        kept = pool[keep][:cfg.replay_size]
        model.archive[:len(kept)] = kept
        model.archive_n.fill_(len(kept))
        return xs, acts, x

    def data(step0):
        start, count = common.rank_split(cfg.batch_size, d)
        for step in itertools.count(step0):
            yield [torch.arange(start, start + count), torch.full((count,), step)]
    return loss_fn, data


def from_checkpoint(path: str, device="cpu", **overrides) -> tuple[MOGFN, Config]:
    """A trained model ready to sample (eval mode) and its config; `overrides` may change run-time fields."""
    state = common.load_checkpoint(path)
    cfg = common.config_from_checkpoint(Config, state, overrides, what=str(path))
    model = build(cfg, device)
    return common.load_weights(model, state, ema=False).eval(), cfg


def _preference(s: str) -> torch.Tensor:
    w = torch.tensor([float(v) for v in s.split(",")])  # a ValueError here makes argparse name --pref
    if not torch.isfinite(w).all():
        raise ValueError(s)
    return w


_preference.__name__ = "preference"  # argparse's "invalid preference value"


def main(argv=None):
    def extra(p):
        p.add_argument("--pref", type=_preference, default=None, help="--sample: one preference, e.g. 0.3,0.7 "
                       "(default: the evaluation grid, cycled)")
        p.add_argument("--baselines", action=argparse.BooleanOptionalAction, default=True,
                       help="--eval: also report uniform random and evolutionary search at the same reward calls")
    cfg, args, overrides = common.parse_config(Config, PRESETS, argv, extra=extra, doc=__doc__)
    if args.plot:
        return common.print0(f"wrote {common.plot_log(args.plot)}")
    d = common.setup_distributed(cfg.device)
    ckpt = args.ckpt or str(Path(cfg.out_dir) / "ckpt.pt")

    if args.sample or args.eval:
        model, cfg = from_checkpoint(ckpt, d.device, **overrides)
        if args.eval:
            res = evaluate(model, cfg, cfg.seed, args.baselines) if d.is_main else {}
            common.print0(json.dumps({k: round(v, 5) if isinstance(v, float) else v for k, v in res.items()}))
            return
        start, count = common.rank_split(args.n, d)
        if args.pref is not None:
            w = check_pref(args.pref, model.task.n_obj).expand(count, -1)  # checked once, not per sample
        else:
            grid = simplex_grid(model.task.n_obj, cfg.n_div)
            w = grid[torch.arange(start, start + count) % len(grid)]
        beta = cfg.beta_max if cfg.beta_max > cfg.beta else cfg.beta
        x, f = sample(model, w, beta, seed=cfg.seed + 1000 + d.rank)
        r = scalarise(f, w, cfg.scalar)
        common.save_npz(args.out, d, x=x.numpy(), objectives=f.numpy(), rewards=r.numpy(), preferences=w.numpy(),
                        beta=np.full(count, beta, np.float32))
        common.print0(f"wrote {args.n} samples to {args.out}")
        return

    common.seed_all(cfg.seed)
    model = build(cfg, d.device)
    n_params = sum(p.numel() for p in model.parameters())
    common.print0(f"MOGFN-PC on {cfg.task} with {model.task.n_obj} objectives, {n_params / 1e3:.0f}k parameters")
    loss_fn, data = train_step_fn(model, cfg, d)

    def on_eval(step, model, ema):
        model.eval()
        res = evaluate(model, cfg, seed=0, with_baselines=step == cfg.steps) if d.is_main else {}
        if d.is_main:  # the final figure puts the headline numbers beside the baselines at the same budget
            plot_front(Path(cfg.out_dir) / "front.png", model.task, model, cfg, {"step": step, **res})
            common.print0(f"step {step}: " + ", ".join(f"{k} {v:.4g}" for k, v in res.items()))
        model.train()
        return res

    t0 = time.time()
    common.train(cfg, model, loss_fn, data, d, resume=ckpt if args.resume else None, overwrite=args.overwrite,
                 evaluate=on_eval, optimizer=optimizer(model, cfg))
    out = Path(cfg.out_dir)
    common.print0(f"done in {time.time() - t0:.0f}s: "
                  + common.existing(out / "ckpt.pt", out / "front.png", out / "log.jsonl"))


if __name__ == "__main__":
    common.run(main)
