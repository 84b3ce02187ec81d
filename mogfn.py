"""
mogfn.py -- Multi-Objective GFlowNets (MOGFN-PC): one preference-conditional GFlowNet for a whole Pareto front.

Paper: "Multi-Objective GFlowNets", Jain, Raparthy, Hernandez-Garcia, Rector-Brooks, Bengio, Miret, Bengio,
ICML 2023, https://arxiv.org/abs/2210.12765 (MOGFN-PC: Sec. 3.1; trajectory balance: Malkin et al. 2022).
The authors' code, read for facts and cited where it decides a detail:
  [grid]  recursionpharma/gflownet docs/examples/grid_cond_gfn.py (commit f064713): the HyperGrid task of the paper
  [pc]    recursionpharma/gflownet src/gflownet/utils/metrics.py: the Pareto-clusters entropy
  [mogfn] MJ10/mo_gfn torch_seq_moo/ (commit 91eff32): R2 (metrics/r2.py), thermometer code, evaluation protocol

M objectives f(x) in [0, 1]^M (larger = better) are scalarised by a preference w on the simplex,
s(x | w) = sum_i w_i f_i(x), and the reward R(x | w, beta) = s(x | w)^beta already contains the exponent beta. ONE
GFlowNet conditioned on c = (w, beta) samples x with probability p(x | w, beta) = R(x | w, beta) / Z(w, beta).
Training draws w ~ Dirichlet(alpha) and beta ~ Gamma(2, 1) per trajectory (as [grid]) and minimises trajectory
balance with a conditional log Z(c); at test time a sweep of preferences traces out the front.

Contents, in order: the config; the algorithm (preferences and reward -> conditioning and policy -> trajectory
balance -> sampler); the tasks (HyperGrid; N-grams with its transformer and Levenshtein distance); evaluation (exact
distribution, Pareto metrics, baselines, figure); the trainer.

    python mogfn.py                                          # CPU demo: the paper's HyperGrid, minutes
    python mogfn.py --eval --ckpt out/mogfn/ckpt.pt          # every metric beside its baselines: one JSON line
    python mogfn.py --sample --ckpt out/mogfn/ckpt.pt --n 100 --pref 0.3,0.7 --out samples.npz
    python mogfn.py --preset ngrams-2obj
    torchrun --nproc_per_node=2 mogfn.py --preset hypergrid-3obj   # trajectories split across ranks
"""
from __future__ import annotations

import argparse
import itertools
import math
import textwrap
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


OBJECTIVE_NAMES = ("branin", "currin", "shubert", "beale", "sphere")  # defined in the HyperGrid section


@dataclass
class Config(common.TrainConfig):
    task: str = common.opt("hypergrid", choices=("hypergrid", "ngrams"))  # hypergrid | ngrams
    objectives: tuple = common.opt(("branin", "currin"), choices=OBJECTIVE_NAMES)  # hypergrid objectives
    grid: str = common.opt("mogfn", choices=("mogfn", "minmax"))  # hypergrid task: mogfn (the paper's) | minmax
    dim: int = common.opt(2, min=1)  # hypergrid dimensions D
    side: int = common.opt(32, min=2)  # hypergrid side H
    vocab: str = "ARNDCQEGHILKMFPSTWYV"  # n-grams alphabet (the 20 amino acids)
    motifs: tuple = ("AR", "GV")  # n-grams: one objective per motif
    min_len: int = common.opt(4, min=1)  # n-grams: shortest sequence (stop is masked before)
    max_len: int = common.opt(16, min=1)  # n-grams: longest sequence
    alpha: tuple = common.opt((1.5,), gt=0)  # Dirichlet concentration of preferences: one value or one per objective
    beta_dist: str = common.opt("gamma", choices=("gamma", "uniform", "const"))  # how beta is drawn (const: fixed)
    beta: float = common.opt(8.0, gt=0)  # const: the reward exponent; uniform: its lower end
    beta_gamma: tuple = common.opt((2.0, 1.0), gt=0)  # gamma: shape and scale of the distribution of beta
    beta_max: float = common.opt(16.0, gt=0)  # the top of beta's thermometer code (uniform: of its range too)
    beta_eval: tuple = common.opt((1.0, 2.0, 4.0, 8.0, 16.0), gt=0)  # eval: betas of the L1; the largest samples
    scalar: str = common.opt("ws", choices=("ws", "tch"))  # ws (weighted sum) | tch (weighted Tchebycheff, as a reward)
    r_min: float = common.opt(1e-3, gt=0)  # floor of the scalarised reward, so log R stays finite
    cond: str = common.opt("concat", choices=("concat", "film"))  # how (w, beta) enter the policy: concat | film
    therm: int = common.opt(50, min=2)  # thermometer bins per conditioning value
    width: int = common.opt(64, min=1)  # hidden width of the policy and of log Z(w, beta)
    depth: int = common.opt(3, min=1)  # hidden layers (MLP) or transformer blocks
    heads: int = common.opt(4, min=1)  # attention heads (n-grams)
    eps: float = common.opt(0.01, max=1)  # epsilon-uniform exploration while training ([grid]: 0.01)
    replay: float = common.opt(0.0, max=1)  # fraction of each batch replayed from a Pareto archive (P_B trajectories)
    replay_size: int = common.opt(256, min=1)  # archive capacity (the newest non-dominated states stay)
    lr_z: float = common.opt(1e-2, gt=0)  # learning rate of the log Z(w, beta) network
    n_div: int = common.opt(10, min=1)  # eval: preference grid {i / n_div} on the simplex
    eval_n: int = common.opt(128, min=1)  # eval: candidates sampled per preference
    top_k: int = common.opt(10, min=1)  # eval: top-k reward and diversity per preference

    NAME = "mogfn"
    RUNTIME = ("n_div", "eval_n", "top_k", "beta_eval")

    def __post_init__(self):
        super().__post_init__()
        if self.min_len > self.max_len:
            raise ValueError(f"--min_len {self.min_len} exceeds --max_len {self.max_len}")
        if self.beta_dist == "uniform" and self.beta_max <= self.beta:
            raise ValueError(f"--beta_max {self.beta_max} must exceed --beta {self.beta} for --beta_dist uniform")
        if self.beta_dist != "const" and max(self.beta_eval) > self.beta_max:
            raise ValueError(f"--beta_max {self.beta_max} is below the largest --beta_eval {max(self.beta_eval)}: "
                             f"beta's thermometer code would saturate")


# training defaults of every preset: Adam with the L2 weight decay of [grid] (L269), raw weights (no EMA)
_T = dict(batch_size=64, lr=1e-3, lr_schedule="constant", warmup=10, weight_decay=1e-4, grad_clip=10.0, ema_decay=0.0,
          log_every=50, eval_every=1000, ckpt_every=1000)
# HyperGrid: [grid]'s policy (64 wide, 3 layers) and exploration (0.01); 3000 steps of 64 trajectories and a cosine lr
# from 2e-3 fit a CPU in minutes where [grid] trains 5000 steps of 128 at a constant 1e-2
_G = dict(_T, lr=2e-3, lr_schedule="cosine", steps=3000)
PRESETS = {
    "hypergrid-2obj": dict(_G),
    "hypergrid-3obj": dict(_G, objectives=("branin", "currin", "shubert"), n_div=6),
    "hypergrid-4obj": dict(_G, objectives=("branin", "currin", "shubert", "beale"), n_div=4),
    # n-grams as [mogfn]'s sequence tasks: Dirichlet(1), 20^16 sequences, so a large fixed beta puts the mass near
    # the front
    "ngrams-2obj": dict(_T, task="ngrams", motifs=("AR", "GV"), alpha=(1.0,), beta_dist="const", beta=32.0,
                        replay=0.25, lr_z=0.1, width=64, depth=2, eval_n=64, steps=2000),
    "ngrams-3obj": dict(_T, task="ngrams", motifs=("AR", "GV", "KW"), alpha=(1.0,), beta_dist="const", beta=32.0,
                        replay=0.25, lr_z=0.1, width=64, depth=2, eval_n=64, n_div=6, steps=3000),
}


# ----------------------------------------------------------------------------------------------------------------------
# The algorithm, 1: preferences and the reward (MOGFN Sec. 3.1)


def scalarise(f: torch.Tensor, w: torch.Tensor, kind: str) -> torch.Tensor:
    """f, w: (..., M) -> s (...,) in [0, 1]; larger is better.
    ws: the weighted sum, the paper's default. tch: the weighted Tchebycheff distance to the utopian point 1, made a
    reward as 1 - max_i w_i (1 - f_i). Its range is narrow: at w = (0.5, 0.5) it spans [0.50, 0.95] on the reference
    grid against [0.11, 0.92] for ws (best / worst 1.9 vs 8.4), so the same contrast R_best / R_worst needs a beta
    ln 8.4 / ln 1.9 = 3.3 times larger with tch; at beta = 16 either target is still spread over ~270 of the 1023
    states, and half its mass sits on the top-10 states only from beta ~ 110 (tch) or ~ 190 (ws)."""
    if kind == "ws":
        return (w * f).sum(-1)
    return 1 - (w * (1 - f)).amax(-1)


def log_reward(f, w, beta, cfg) -> torch.Tensor:
    """log R(x | w, beta) = beta log max(s, r_min), in log space so a large beta is safe."""
    return beta * scalarise(f, w, cfg.scalar).clamp(min=cfg.r_min).log()


def beta_conditioned(cfg: Config) -> bool:
    return cfg.beta_dist != "const"


def eval_betas(cfg: Config) -> list[float]:
    return sorted(cfg.beta_eval) if beta_conditioned(cfg) else [cfg.beta]


def sample_conditions(cfg: Config, n_obj: int, n: int, rng: np.random.Generator):
    """The training distribution of the condition: w ~ Dirichlet(alpha) ([grid] L109: alpha = 1.5) and beta ~
    Gamma(2, 1) ([grid] L110) or U[beta, beta_max] or fixed. -> w (n, M), beta (n,)."""
    alpha = np.broadcast_to(np.asarray(cfg.alpha, dtype=np.float64), (n_obj,))  # one value or one per objective
    w = torch.as_tensor(rng.dirichlet(alpha, n), dtype=torch.float32)
    if cfg.beta_dist == "gamma":
        beta = rng.gamma(cfg.beta_gamma[0], cfg.beta_gamma[1], n)
    elif cfg.beta_dist == "uniform":
        beta = cfg.beta + (cfg.beta_max - cfg.beta) * rng.random(n)
    else:
        beta = np.full(n, cfg.beta)
    return w, torch.as_tensor(beta, dtype=torch.float32)


# ----------------------------------------------------------------------------------------------------------------------
# The algorithm, 2: the conditional GFlowNet -- P_F(a | s, c) and log Z(c)


def thermometer(v: torch.Tensor, bins: int, vmax: float = 1.0) -> torch.Tensor:
    """(..., K) values in [0, vmax] -> (..., K*bins), as [mogfn] algorithms/mogfn_utils/utils.py L20-23: thresholds
    t_k = k gap, gap = vmax / (bins - 1), and bin k holds clamp((v - t_k) / gap, 0, 1) (the last fills above vmax)."""
    gap = vmax / (bins - 1)
    t = torch.arange(bins, device=v.device, dtype=v.dtype) * gap
    return ((v[..., None] - t) / gap).clamp(0, 1).flatten(-2)


class MOGFN(nn.Module):
    def __init__(self, cfg: Config, task: Task):
        super().__init__()
        self.cfg, self.task = cfg, task
        self.cond_dim = cfg.therm * (task.n_obj + beta_conditioned(cfg))
        self.policy = task.policy(cfg, self.cond_dim)  # (x (B, S), c (B, C)) -> logits (B, A)
        self.logz = nn.Sequential(nn.Linear(self.cond_dim, cfg.width), nn.LeakyReLU(), nn.Linear(cfg.width, 1))
        if cfg.replay > 0:  # a Pareto archive of terminal states seen so far, saved with the weights
            self.register_buffer("archive", torch.zeros(cfg.replay_size, task.state_dim, dtype=torch.long))
            self.register_buffer("archive_n", torch.zeros((), dtype=torch.long))

    def encode(self, w, beta):  # (B, M), (B,) -> c (B, C): thermometer codes of w (on [0, 1]) and beta
        c = [thermometer(w, self.cfg.therm)]  # as [mogfn] (pref_use_therm, beta_use_therm, 50 bins)
        if beta_conditioned(self.cfg):
            c.append(thermometer(beta[:, None], self.cfg.therm, self.cfg.beta_max))
        return torch.cat(c, -1).to(self.logz[0].weight.dtype)  # the weights' dtype (bf16 under FSDP2's bf16)

    def forward(self, xs, acts, cond):  # -> sum log P_F (B,), log Z(c) (B,); one call, so DDP sees all params
        return self.task.log_pf(self.policy, xs, acts, cond), self.logz(cond)[:, 0]


def _uniforms(rng, n: int):
    """One uniform in [0, 1) per row, as float64: a np.random.Generator, or a function that returns them (the trainer
    passes `rank_slice` so that every rank draws the global batch's numbers and keeps its own rows)."""
    return rng if callable(rng) else (lambda: rng.random(n))


@torch.no_grad()
def rollout(model: MOGFN, cond: torch.Tensor, rng, eps: float = 0.0):
    """Sample one trajectory per row of cond, all rows at once, from P_F mixed with eps of uniform over the valid
    actions. -> xs (T+1, B, S) states, acts (T, B) (-1 once ended), terminal x (B, S)."""
    task, B = model.task, len(cond)
    draw = _uniforms(rng, B)
    x = task.reset(B, cond.device)
    done = torch.zeros(B, dtype=torch.bool, device=cond.device)
    xs, acts = [x], []
    for _ in range(task.max_steps):
        valid = task.valid(x)  # (B, A); every row steps (finished ones for nothing), fewer ops than gathering
        p = model.policy(x, cond).float().masked_fill(~valid, -math.inf).softmax(-1)
        p = (1 - eps) * p + eps * valid / valid.sum(-1, keepdim=True)
        u = torch.as_tensor(1 - draw(), device=x.device)[:, None]  # (B, 1) in (0, 1], float64
        cdf = p.double().cumsum(-1)
        a = (cdf < u * cdf[:, -1:]).sum(-1).masked_fill(done, -1)  # inverse CDF; zero-probability actions never hit
        x = task.step(x, a)
        done = done | task.ends(x, a)
        xs.append(x)
        acts.append(a)
        if done.all():
            break
    return torch.stack(xs), torch.stack(acts), x


@torch.no_grad()
def backward_rollout(task: Task, x: torch.Tensor, rng):
    """Trajectories that end in given terminal states, drawn from P_B (replay): walk back to s0, then reverse.
    Same layout as rollout: xs (T+1, B, S), acts (T, B)."""
    B, s0 = len(x), task.reset(1, x.device)
    draw = _uniforms(rng, B)
    states, moves, cur = [x], [], x
    for _ in range(task.max_steps):
        at0 = (cur == s0).all(-1)
        if at0.all():
            break
        prev, a = task.backward(cur, torch.as_tensor(draw(), dtype=torch.float64, device=x.device))
        cur = torch.where(at0[:, None], cur, prev)
        states.append(cur)
        moves.append(torch.where(at0, -1, a))
    S = torch.stack(states)  # (K, B, S): S[k+1] is the parent of S[k]
    A = torch.stack(moves) if moves else torch.zeros(0, B, dtype=torch.long, device=x.device)  # A[k]: S[k+1] -> S[k]
    n = (A >= 0).sum(0)  # (B,) moves
    t = torch.arange(len(S) + 1, device=x.device)[:, None]  # forward time
    xs = S.gather(0, (n[None] - t).clamp(min=0)[..., None].expand(-1, -1, S.shape[-1]))  # (K+1, B, S)
    fwd = A.gather(0, (n[None] - 1 - t[:-1]).clamp(min=0)) if len(A) else torch.zeros_like(t[:-1] + n[None])
    stop = (t[:-1] == n[None]) & task.ended_by_stop(x)[None]  # a state at the grid's edge ends without one
    acts = torch.where(t[:-1] < n[None], fwd, torch.where(stop, task.n_actions - 1, -1))  # (K, B)
    return xs, acts


def _pad(xs, acts, T):  # to T steps: the last state repeated, actions -1
    k = T - acts.shape[0]
    return torch.cat([xs, xs[-1:].expand(k, -1, -1)]), torch.cat([acts, acts.new_full((k, acts.shape[1]), -1)])


# ----------------------------------------------------------------------------------------------------------------------
# The algorithm, 3: trajectory balance, conditioned on c = (w, beta)


def tb_loss(net, model: MOGFN, xs, acts, x, w, beta, cond):
    """(log Z(c) + sum_t log P_F(s_t+1 | s_t, c) - log R(x | w, beta) - sum_t log P_B(s_t | s_t+1))^2, the
    trajectory balance objective (Malkin et al. 2022) with log Z and P_F conditioned on c (MOGFN-PC, Sec. 3.1), mean
    over trajectories."""
    log_pf, log_z = net(xs, acts, cond)
    live = acts >= 0
    pb = model.task.log_pb(xs[1:].flatten(0, 1), acts.flatten()).view(acts.shape)
    log_pb = (pb * live).sum(0)
    log_r = log_reward(model.task.objectives(x), w.to(x.device), beta.to(x.device), model.cfg)
    return (log_z + log_pf - log_r - log_pb).square().mean(), log_z.detach(), log_r.detach()


# ----------------------------------------------------------------------------------------------------------------------
# The algorithm, 4: the sampler


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


# ----------------------------------------------------------------------------------------------------------------------
# Tasks. A task is one class: states, valid actions, a step, the backward policy, the objectives, a policy network.


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

    def ends(self, x_next: torch.Tensor, a: torch.Tensor) -> torch.Tensor:  # (B,) does this step end the trajectory
        return a == self.n_actions - 1

    def ended_by_stop(self, x: torch.Tensor) -> torch.Tensor:  # (B,) terminal states reached by the stop action
        return torch.ones(len(x), dtype=torch.bool, device=x.device)

    def log_pf(self, policy, xs, acts, cond) -> torch.Tensor:
        """Sum of log P_F over each trajectory, every (state, action) pair in one batched forward.
        xs: (T+1, B, S) states, acts: (T, B) with -1 after the end, cond: (B, C)."""
        T, B = acts.shape
        live = (acts >= 0).flatten()  # (T*B,): every step is scored, the ended ones dropped after (no host sync)
        x, c = xs[:-1].flatten(0, 1), cond.expand(T, *cond.shape).flatten(0, 1)  # (T*B, S), (T*B, C)
        valid = self.valid(x) | ~live[:, None]  # an ended row keeps finite logits, so no NaN reaches the gradient
        logp = policy(x, c).masked_fill(~valid, -math.inf).log_softmax(-1)
        logp = logp.gather(1, acts.flatten().clamp(min=0)[:, None])[:, 0]
        return torch.where(live, logp, 0.0).view(T, B).sum(0)


# --- HyperGrid ------------------------------------------------------------------------------------------------------


def _branin(u):  # u in [0, 1]^2 -> the usual domain [-5, 10] x [0, 15] ([grid] L59-64); minimised
    x1, x2 = 15 * u[:, 0] - 5, 15 * u[:, 1]
    return (x2 - 5.1 / (4 * math.pi ** 2) * x1 ** 2 + 5 / math.pi * x1 - 6) ** 2 \
        + 10 * (1 - 1 / (8 * math.pi)) * torch.cos(x1) + 10


def _currin(u):  # on [0, 1]^2 ([grid] L50-56)
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
# [grid] L56, L64: f = (raw - shift) / scale with fixed divisors -- branin flipped, 1 - raw / 308.13, and currin
# maximised, raw / 13.77 (its maximum on the 32-grid is 1.0015). The other objectives are not in [grid]; they are
# min-max scaled over the terminal states and minimised.
MOGFN_SCALE = {"branin": (308.13, -308.13), "currin": (0.0, 13.77)}


class GridPolicy(nn.Module):
    def __init__(self, task, cfg, cond_dim):
        super().__init__()
        self.H = task.H
        self.mlp = MLP(task.D * task.H, cond_dim, cfg.width, cfg.depth, task.n_actions, cfg.cond == "film")

    def forward(self, x, c):  # (B, D) coordinates -> one-hot per coordinate (B, D*H), as [grid] obs()
        return self.mlp(F.one_hot(x, self.H).flatten(1).to(c.dtype), c)


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


class HyperGrid(Task):
    """D coordinates in {0..H-1}, s0 = 0, actions "increment coordinate d" or "stop"; the grid maps affinely onto each
    function's domain (branin, currin, shubert, beale read the first two coordinates, sphere all of them).
    grid = mogfn, the paper's task ([grid]): reaching H-1 in any coordinate ends the trajectory with no stop action
    (L135), so the terminal states are those with at most one coordinate at H-1 (L143) and P_B is uniform over the
    parents that are not terminal (L123); branin and currin are scaled by fixed divisors (MOGFN_SCALE).
    grid = minmax, this file's earlier convention: every state is terminal through an explicit stop, increments are
    masked at the edge, and each objective is min-max scaled over the grid and minimised.
    Small enough that the learned terminal distribution is computed exactly by dynamic programming."""

    def __init__(self, cfg: Config):
        if cfg.dim < 1 or cfg.side ** cfg.dim > 10 ** 7:
            raise ValueError(f"hypergrid of dim {cfg.dim} and side {cfg.side} is out of range")
        if cfg.dim < 2 and any(o != "sphere" for o in cfg.objectives):
            raise ValueError("branin, currin, shubert and beale need dim >= 2")
        self.D, self.H, self.names = cfg.dim, cfg.side, tuple(cfg.objectives)
        self.edge_ends = cfg.grid == "mogfn"
        self.n_actions, self.n_obj, self.state_dim = self.D + 1, len(self.names), self.D
        self.max_steps = self.D * (self.H - 2) + 1 if self.edge_ends else self.D * (self.H - 1) + 1
        s = self.all_states()
        self.terminal = s[self.is_terminal(s)]  # (N, D) in row-major order
        raw = self._raw(self.terminal)
        lo, hi = raw.amin(0), raw.amax(0)
        fixed = [MOGFN_SCALE.get(n) if self.edge_ends else None for n in self.names]
        self.shift = torch.tensor([f[0] if f else hi[i] for i, f in enumerate(fixed)], dtype=torch.float64)
        self.scale = torch.tensor([f[1] if f else lo[i] - hi[i] for i, f in enumerate(fixed)], dtype=torch.float64)

    def all_states(self, device=None) -> torch.Tensor:  # (H^D, D) in row-major order
        g = torch.stack(torch.meshgrid(*[torch.arange(self.H)] * self.D, indexing="ij"), -1)
        return g.reshape(-1, self.D).to(device)

    def is_sink(self, x):  # (B,) states where a trajectory ends on arrival: at the edge, with grid = mogfn
        return (x == self.H - 1).any(-1) & self.edge_ends

    def is_terminal(self, x):  # (B,) reachable terminal states (two coordinates at the edge cannot be reached)
        return ((x == self.H - 1).sum(-1) <= 1) | (not self.edge_ends)

    def _raw(self, x):
        u = x.double() / (self.H - 1)  # [0, 1]^D; each function maps it to its own domain
        return torch.stack([OBJECTIVES[n](u) for n in self.names], -1)

    def objectives(self, x):
        return ((self._raw(x.cpu()) - self.shift) / self.scale).float().to(x.device)

    def reset(self, n, device):
        return torch.zeros(n, self.D, dtype=torch.long, device=device)

    def valid(self, x):  # increment only below the edge; stop is always allowed
        return torch.cat([x < self.H - 1, torch.ones_like(x[:, :1], dtype=torch.bool)], -1)

    def step(self, x, a):
        move = (a >= 0) & (a < self.D)
        return x + move[:, None] * F.one_hot(a.clamp(0, self.D - 1), self.D)

    def ends(self, x_next, a):
        return (a == self.D) | ((a >= 0) & self.is_sink(x_next))

    def ended_by_stop(self, x):
        return ~self.is_sink(x)

    def parents(self, x):  # (B, D): decrementing coordinate d gives a parent that is not itself terminal
        nz = x > 0
        if not self.edge_ends:
            return nz
        edge = (x == self.H - 1).long()
        return nz & (edge.sum(-1, keepdim=True) - edge == 0)  # an edge state's only parent steps back off the edge

    def log_pb(self, x_next, a):  # uniform over the parents ([grid] L123, L242); stop has one parent
        n = self.parents(x_next).sum(-1).clamp(min=1)
        return torch.where(a < self.D, -n.float().log(), torch.zeros_like(n, dtype=torch.float))

    def backward(self, x, u):  # decrement the k-th parent coordinate, k = floor(u * #parents), u in [0, 1)
        par = self.parents(x)
        n = par.sum(-1)
        k = torch.minimum((u * n).long(), (n - 1).clamp(min=0))  # (B,); the min guards u = 1 all the same
        d = ((par.cumsum(-1) - 1 == k[:, None]) & par).float().argmax(-1)
        return x - F.one_hot(d, self.D) * (n > 0)[:, None], d

    def policy(self, cfg, cond_dim):
        return GridPolicy(self, cfg, cond_dim)

    def random(self, n, rng):  # uniform over the terminal states
        return self.terminal[torch.as_tensor(rng.integers(0, len(self.terminal), n))]

    def mutate(self, x, rng):  # one coordinate +-1, kept when that leaves the terminal states
        rows = torch.arange(len(x))
        d = torch.as_tensor(rng.integers(0, self.D, len(x)))
        step = torch.as_tensor(rng.choice([-1, 1], len(x)))
        y = x.clone().index_put_((rows, d), (x[rows, d] + step).clamp(0, self.H - 1))
        return torch.where(self.is_terminal(y)[:, None], y, x)

    def distance(self, a, b):  # Hamming distance between coordinate vectors
        return (a != b).sum(-1).astype(np.float64)


# --- N-grams --------------------------------------------------------------------------------------------------------


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
    """Sequences over the 20 amino acids of length [min_len, max_len]; one objective per motif = overlapping
    occurrences / the most possible; a causal transformer policy; P_B = 1 (a tree)."""

    def __init__(self, cfg: Config):
        if not cfg.motifs:
            raise ValueError("ngrams needs at least one motif")
        bad = [m for m in cfg.motifs if not m or any(ch not in cfg.vocab for ch in m)]
        if bad:
            raise ValueError(f"motif {bad[0]!r} has letters outside the vocabulary {cfg.vocab}")
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
# Evaluation: the exact distribution (HyperGrid)


@torch.no_grad()
def terminal_distribution(model: MOGFN, cond: torch.Tensor) -> torch.Tensor:
    """HyperGrid: the exact P_T(x) of the learned policy (no exploration) for each condition, by dynamic programming
    over the DAG as [grid] compute_exact_dag_distribution: P(reach s) = sum over parents s' of P(reach s')
    P_F(s | s'); P_T(s) = P(reach s) P_F(stop | s), or P(reach s) where arriving ends the trajectory.
    cond (C, cdim) -> (C, N), N terminal states in HyperGrid.terminal order."""
    task = model.task
    dev = cond.device
    s = task.all_states(dev)  # (H^D, D)
    N, C = len(s), len(cond)
    logits = model.policy(s.repeat(C, 1), cond.repeat_interleave(N, 0)).view(C, N, -1).float()
    pf = logits.masked_fill(~task.valid(s)[None], -math.inf).softmax(-1)  # (C, H^D, D+1)
    sink = task.is_sink(s)
    pf = pf.masked_fill(sink[None, :, None], 0.0)  # no action is taken from where a trajectory has ended
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
    p = reach * torch.where(sink, 1.0, pf[..., -1])
    return p[:, task.is_terminal(s)]


def true_distribution(task: HyperGrid, w, beta, cfg) -> torch.Tensor:
    """(C, M), (C,) -> (C, N): p(x | w, beta) = R(x | w, beta) / Z(w, beta) over the terminal states."""
    f = task.objectives(task.terminal)  # (N, M)
    lr = log_reward(f[None], w[:, None], beta[:, None], cfg)
    return lr.double().softmax(-1).float()


# ----------------------------------------------------------------------------------------------------------------------
# Evaluation: Pareto metrics


def pareto_mask(f: torch.Tensor) -> torch.Tensor:
    """(N, M) maximised -> (N,) True on the non-dominated points (duplicates kept once, the first)."""
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
    """Dominated hypervolume of maximised points above `ref` (default 0, as [mogfn] and [grid]) -> (value, standard
    error). Exact for up to 3 objectives; Monte-Carlo in the box [ref, max] above that, with its standard error."""
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


def simplex_grid(m: int, n_div: int) -> torch.Tensor:
    """All w with w_i in {0, 1/n_div, ..., 1} and sum 1 -> (P, m)."""
    pts = [c for c in itertools.product(range(n_div + 1), repeat=m - 1) if sum(c) <= n_div]
    return torch.tensor([[*c, n_div - sum(c)] for c in pts], dtype=torch.float32) / n_div


def r2_indicator(f: torch.Tensor, refs: torch.Tensor | None = None) -> float:
    """R2 as [mogfn] metrics/r2.py L28-44: sum over reference vectors v of min over points y of max_i v_i |1 - y_i|
    (the utopian point 1), divided by the Frobenius norm of the (V, M) matrix of reference vectors (lower is better).
    The reference vectors default to [mogfn]'s, generate_simplex(M, 10): the simplex in steps of 1/9."""
    refs = simplex_grid(f.shape[-1], 9) if refs is None else refs
    d = (refs[:, None] * (1 - f[None]).abs()).amax(-1)  # (V, N)
    return float(d.amin(1).sum() / refs.norm())


def cube_faces(m: int, n: int = 10) -> torch.Tensor:
    """The points of the grid linspace(0, 1, n)^m on the faces {some f_i = 1}, as [pc] get_limits_of_hypercube."""
    g = torch.tensor(list(itertools.product(np.linspace(0, 1, n), repeat=m)), dtype=torch.float64)
    return g[(g == 1).any(-1)]


def pc_entropy(f: torch.Tensor, refs: torch.Tensor | None = None) -> float:
    """Pareto-clusters entropy as [pc] get_PC_entropy (L89-126): each point joins its nearest (Euclidean) reference
    point, by default those of cube_faces(M); the entropy in nats of the cluster sizes (log(p + 1e-8) as there).
    Computed on a Pareto front; higher = the front's points spread over more regions."""
    refs = cube_faces(f.shape[-1]) if refs is None else refs
    k = torch.cdist(f.double(), refs.double()).argmin(-1)
    p = torch.bincount(k, minlength=len(refs)).double() / len(k)
    return float(-(p * (p + 1e-8).log()).sum())


def candidate_metrics(task: Task, x: torch.Tensor, f: torch.Tensor, W: torch.Tensor, cfg: Config) -> dict:
    """The paper's protocol ([mogfn] MOGFN.evaluation): x (P, n, S), f (P, n, M) are the candidates for each of the P
    preferences W -- or (1, n, ...), one pool every preference draws from. Per preference the top-1 by scalarised
    reward joins the candidate set whose Pareto front gives HV (reference point 0) and R2; the top-k give the mean
    reward s (where [mogfn] averages log s) and the mean pairwise distance; PC entropy is that of the Pareto front of
    all candidates ([pc] on the accumulated front)."""
    P, k = len(W), cfg.top_k
    flat = f.flatten(0, 1)
    x, f = x.expand(P, -1, -1), f.expand(P, -1, -1)
    s = scalarise(f, W[:, None], cfg.scalar)  # (P, n)
    top = s.argsort(1, descending=True)[:, :k]  # (P, k)
    top1 = f[torch.arange(P), top[:, 0]]  # (P, M)
    front = top1[pareto_mask(top1)]
    out = {"hv": hypervolume(front)[0], "r2": r2_indicator(front), "pc_entropy": pc_entropy(flat[pareto_mask(flat)]),
           "topk_reward": float(s.gather(1, top).mean())}
    xk = x[torch.arange(P)[:, None], top].numpy()  # (P, k, S)
    i, j = np.triu_indices(xk.shape[1], 1)
    out["topk_diversity"] = float(task.distance(xk[:, i].reshape(-1, xk.shape[-1]),
                                                xk[:, j].reshape(-1, xk.shape[-1])).mean())
    return out


# ----------------------------------------------------------------------------------------------------------------------
# Evaluation: baselines at the same budget, and the whole protocol


def evolution(task: Task, budget: int, rng: np.random.Generator) -> torch.Tensor:
    """A Pareto-archive evolutionary search: mutate random members of the non-dominated set, keep the non-dominated
    set. -> every object it evaluated (budget of them)."""
    pop = task.random(max(budget // 10, 1), rng)
    f, seen = task.objectives(pop), [pop]
    used = len(pop)
    while used < budget:
        keep = pareto_mask(f)
        pop, f = pop[keep], f[keep]
        n = min(len(pop) * 4 + 16, budget - used)
        kids = task.mutate(pop[torch.as_tensor(rng.integers(0, len(pop), n))], rng)
        pop, f, used = torch.cat([pop, kids]), torch.cat([f, task.objectives(kids)]), used + n
        seen.append(kids)
    return torch.cat(seen)


def baselines(model: MOGFN, cfg: Config, W: torch.Tensor, beta: float, seed: int = 0) -> dict:
    """candidate_metrics of the baselines that spend the model's budget (n draws for each of the P preferences):
    random -- n uniform objects per preference; ignore -- the model asked for a preference drawn at random from W
    instead of the given one (a sampler that ignores the preference, from the model's own marginal); evo -- the
    evolutionary search with the same P n reward calls, its every evaluated object one pool all preferences pick from
    (an optimiser reports its archive); on HyperGrid also target -- n exact draws from p(x | w, beta), what a perfect
    MOGFN would score."""
    task, rng = model.task, np.random.default_rng(seed + 1)
    P, n = len(W), cfg.eval_n
    pools = {"random": (task.random(P * n, rng), P),
             "ignore": (sample(model, W[torch.as_tensor(rng.integers(0, P, P * n))], beta, seed + 2)[0], P),
             "evo": (evolution(task, P * n, rng), 1)}
    if isinstance(task, HyperGrid):
        q = true_distribution(task, W, torch.full((P,), beta), cfg).double()
        idx = torch.multinomial(q, n, replacement=True, generator=torch.Generator().manual_seed(seed))  # (P, n)
        pools["target"] = (task.terminal[idx.flatten()], P)
    out = {}
    for name, (x, k) in pools.items():
        m = candidate_metrics(task, x.view(k, -1, x.shape[-1]), task.objectives(x).view(k, -1, task.n_obj), W, cfg)
        out.update({f"{name}_{key}": v for key, v in m.items()})
    return out


@torch.no_grad()
def evaluate(model: MOGFN, cfg: Config, seed: int = 0, with_baselines: bool = False):
    """eval_n candidates per preference of the grid W (n_div), no exploration, at the largest evaluated beta ->
    candidate_metrics. HyperGrid also: the true front's HV and the exact L1 between the learned and the true terminal
    distributions, mean over every (w, beta) of W x eval_betas (as [grid] L342: 11 preferences x {1, 2, 4, 8, 16}).
    with_baselines: the same metrics for the baselines (`baselines`), and on HyperGrid the L1 of the uniform
    distribution (random), of the model's marginal over W (ignore), and of the target's own marginal over W, the
    exact p(x | beta) = mean_w p(x | w, beta) (marginal: the best a sampler blind to w can do, in that sense)."""
    task, dev = model.task, next(model.parameters()).device
    W = simplex_grid(task.n_obj, cfg.n_div)  # (P, M)
    P, n, betas = len(W), cfg.eval_n, eval_betas(cfg)
    x, f = sample(model, W.repeat_interleave(n, 0), betas[-1], seed)
    res = candidate_metrics(task, x.view(P, n, -1), f.view(P, n, -1), W, cfg)
    if with_baselines:
        res.update(baselines(model, cfg, W, betas[-1], seed))
    if isinstance(task, HyperGrid):
        fall = task.objectives(task.terminal)
        res["hv_true"] = hypervolume(fall[pareto_mask(fall)])[0]
        Wb, bb = W.repeat(len(betas), 1), torch.tensor(betas).repeat_interleave(P)  # every (w, beta)
        p = terminal_distribution(model, model.encode(Wb, bb).to(dev)).cpu().view(len(betas), P, -1)
        q = true_distribution(task, Wb, bb, cfg).view(len(betas), P, -1)
        l1 = (p - q).abs().sum(-1)  # (betas, P)
        res["l1"] = float(l1.mean())
        res.update({f"l1_beta{b:g}": float(v) for b, v in zip(betas, l1.mean(1))})
        if with_baselines:
            for name, r in (("random", 1 / q.shape[-1]), ("ignore", p.mean(1, keepdim=True)),
                            ("marginal", q.mean(1, keepdim=True))):
                res[f"{name}_l1"] = float((r - q).abs().sum(-1).mean())
    return res


def plot_front(path, task: Task, model: MOGFN, cfg: Config, metrics: dict | None = None, size: int = 320):
    """Objectives 1 and 2: every terminal state (grey, HyperGrid), the true front (green) and the top-1 candidate of a
    fine preference sweep (red). Labelled, with the headline metrics beside their baselines in the title, when
    matplotlib is installed; else drawn straight into a bare uint8 image."""
    W = simplex_grid(task.n_obj, 50 if task.n_obj == 2 else 8)
    _, f = sample(model, W.repeat_interleave(16, 0), eval_betas(cfg)[-1])
    f = f.view(len(W), 16, -1)
    top1 = f[torch.arange(len(W)), scalarise(f, W[:, None], cfg.scalar).argmax(1)]
    fall = task.objectives(task.terminal) if isinstance(task, HyperGrid) else None
    plt = common.pyplot()
    if plt is not None:
        fig, ax = plt.subplots(figsize=(5.5, 5.5))
        if fall is not None:
            ax.scatter(fall[:, 0], fall[:, 1], s=3, c="0.82", label=f"all {len(fall)} terminal states")
            front = fall[pareto_mask(fall)]
            ax.scatter(front[:, 0], front[:, 1], s=30, c="tab:green", label=f"true Pareto front ({len(front)})")
        ax.scatter(top1[:, 0], top1[:, 1], s=12, c="tab:red", label=f"MOGFN top-1 of 16, {len(W)} preferences")
        names = cfg.objectives if cfg.task == "hypergrid" else [f"motif {m} count" for m in cfg.motifs]
        ax.set_xlabel(f"{names[0]} (scaled, 1 = best)")
        ax.set_ylabel(f"{names[1]} (scaled, 1 = best)")
        m = metrics or {}

        def beside(label, key, others):  # "HV 0.97 (true front 0.98, random 0.95)"
            rest = [f"{name} {m[k]:.3f}" for name, k in others if k in m]
            return f"{label} {m[key]:.3f}" + (f" ({', '.join(rest)})" if rest else "")
        title = [f"{cfg.task}, step {m['step']}" if "step" in m else cfg.task]
        if "hv" in m:
            title.append(beside("HV", "hv", (("true front", "hv_true"), ("exact sampler", "target_hv"),
                                             ("random", "random_hv"), ("ignoring w", "ignore_hv"),
                                             ("evolution", "evo_hv"))))
        if "l1" in m:
            title.append(beside("mean L1 to p(x|w,beta)", "l1", (("uniform", "random_l1"), ("ignoring w", "ignore_l1"),
                                                                  ("target's marginal", "marginal_l1"))))
        ax.set_title("\n".join(textwrap.fill(t, 75) for t in title), fontsize=9)
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


def dry_run(cfg: Config, gpus: int) -> dict:
    """--dry_run: the trainable forward (P_F of whole trajectories and log Z) on the meta device; the rollouts are
    no-grad and hold one (T+1, B, S) trajectory batch."""
    task = make_task(cfg)
    T = task.max_steps

    def loss(model, b):
        xs, acts = torch.zeros(T + 1, b, task.state_dim, dtype=torch.long), torch.zeros(T, b, dtype=torch.long)
        log_pf, log_z = model(xs, acts, torch.rand(b, model.cond_dim))
        return (log_pf + log_z).square().mean()

    return common.dry_run(cfg, lambda: MOGFN(cfg, task), loss, tokens=T, gpus=gpus, block_types=(),
                          sample_bytes=lambda m: {f"rollout_batch{cfg.batch_size}": 8 * (T + 1) * cfg.batch_size
                                                  * task.state_dim})


def build(cfg: Config, device="cpu") -> MOGFN:
    task = make_task(cfg)
    if len(cfg.alpha) not in (1, task.n_obj):
        raise ValueError(f"--alpha needs 1 or {task.n_obj} values, got {len(cfg.alpha)}")
    return MOGFN(cfg, task).to(device)


def optimizer(model: MOGFN, cfg: Config):  # log Z gets its own (larger) learning rate, as [grid]'s optZ
    z = list(model.logz.parameters())
    rest = [p for n, p in model.named_parameters() if not n.startswith("logz.")]
    return torch.optim.Adam([{"params": rest, "lr": cfg.lr}, {"params": z, "lr": cfg.lr_z}],
                            betas=(cfg.beta1, cfg.beta2), weight_decay=cfg.weight_decay)


def rank_slice(rng: np.random.Generator, n_global: int, start: int, count: int):
    """Uniforms for rows [start, start + count) of a global batch of n_global: every rank draws the whole batch's
    numbers, so a batch split across ranks (or --grad_accum micro-batches) samples exactly what one process would."""
    return lambda: rng.random(n_global)[start:start + count]


def update_archive(model: MOGFN, x: torch.Tensor, cfg: Config, d: common.Dist):
    """Add the terminal states of this step (of ALL ranks, so every rank keeps the same archive) and keep the
    non-dominated ones; past replay_size the newest stay, as the reference replay buffer overwrites its oldest entry
    (recursionpharma/gflownet src/gflownet/data/replay_buffer.py L24-27)."""
    if d.distributed:
        parts = [torch.empty_like(x) for _ in range(d.world_size)]
        torch.distributed.all_gather(parts, x.contiguous())
        x = torch.cat(parts)
    pool = torch.cat([model.archive[:int(model.archive_n)], x])  # oldest first
    kept = pool[pareto_mask(model.task.objectives(pool).cpu()).to(pool.device)][-cfg.replay_size:]
    model.archive[:len(kept)] = kept
    model.archive_n.fill_(len(kept))


def train_loss_fn(model: MOGFN, cfg: Config, d: common.Dist):
    """The loss of common.train with no data (data=None): each call rolls out its own trajectories. They are a pure
    function of (seed, step): every rank draws the global batch's randomness and keeps its rows (`at.rows`), so
    --resume and any number of ranks reproduce one process (with --grad_accum and --replay the archive grows after
    each micro-batch, not once per step)."""
    B = cfg.batch_size

    def loss_fn(net, batch, at: common.At):
        start, count = at.rows.start, at.rows.stop - at.rows.start  # this (micro-)batch's slice of the global batch
        rng = np.random.default_rng([cfg.seed, at.step])
        w, beta = sample_conditions(cfg, model.task.n_obj, B, rng)
        w, beta = w[start:start + count].to(d.device), beta[start:start + count].to(d.device)
        with common.full_params(model):  # the rollout calls the policy itself: FSDP2 gathers its weights once
            cond = model.encode(w, beta)
            xs, acts, x = rollout(model, cond, rank_slice(rng, B, start, count), cfg.eps)
        if cfg.replay > 0:
            xs, acts, x = replay(xs, acts, x, np.random.default_rng([cfg.seed, at.step, 1]), start, count)
        loss, log_z, log_r = tb_loss(net, model, xs, acts, x, w, beta, cond)
        return loss, {"log_z": log_z.mean(), "log_r": log_r.mean(), "traj_len": (acts >= 0).sum(0).float().mean()}

    def replay(xs, acts, x, rng, start, count):
        """The global batch's last replay * B rows become P_B trajectories into archived states (TB is off-policy;
        they keep this batch's conditions), wherever the ranks split the batch; then the archive takes x."""
        n_arc = int(model.archive_n)
        first = min(max(B - int(cfg.replay * B) - start, 0), count)  # this slice's first replayed row
        picks = rng.integers(0, max(n_arc, 1), B)[start + first:start + count]
        sampled = x
        if n_arc and first < count:
            bxs, bacts = backward_rollout(model.task, model.archive[torch.as_tensor(picks)],
                                          rank_slice(rng, B, start + first, count - first))
            T = max(len(acts), len(bacts))
            (xs, acts), (bxs, bacts) = _pad(xs, acts, T), _pad(bxs, bacts, T)
            xs, acts = torch.cat([xs[:, :first], bxs], 1), torch.cat([acts[:, :first], bacts], 1)
            x = xs[-1]
        update_archive(model, sampled, cfg, d)
        return xs, acts, x
    return loss_fn


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


def options(p):
    p.add_argument("--pref", type=_preference, default=None, help="--sample: one preference, e.g. 0.3,0.7 "
                   "(default: the evaluation grid, cycled)")
    p.add_argument("--baselines", action=argparse.BooleanOptionalAction, default=True,
                   help="--eval: also report uniform random sampling, a preference-ignoring sampler and "
                        "evolutionary search at the same reward calls")


def cli_sample(model: MOGFN, cfg: Config, args, d: common.Dist, start: int, count: int):
    if args.pref is not None:
        w = check_pref(args.pref, model.task.n_obj).expand(count, -1)  # checked once, not per sample
    else:
        grid = simplex_grid(model.task.n_obj, cfg.n_div)
        w = grid[torch.arange(start, start + count) % len(grid)]
    beta = eval_betas(cfg)[-1]
    x, f = sample(model, w, beta, seed=cfg.seed + 1000 + d.rank)
    return dict(x=x.numpy(), objectives=f.numpy(), rewards=scalarise(f, w, cfg.scalar).numpy(),
                preferences=w.numpy(), beta=np.full(count, beta, np.float32)), f"beta {beta:g}"


def cli_train(cfg: Config, args, overrides: dict, d: common.Dist) -> common.Job:
    model = build(cfg, d.device)
    n_params = sum(p.numel() for p in model.parameters())
    common.print0(f"MOGFN-PC on {cfg.task} with {model.task.n_obj} objectives, {n_params / 1e3:.0f}k parameters")

    def on_eval(step, model, ema):
        model.eval()
        with common.full_params(model):  # every rank gathers (a collective); rank 0 evaluates and plots
            res = evaluate(model, cfg, seed=0, with_baselines=step == cfg.steps) if d.is_main else {}
            if d.is_main:  # the final figure puts the headline numbers beside the baselines at the same budget
                plot_front(Path(cfg.out_dir) / "front.png", model.task, model, cfg, {"step": step, **res})
        model.train()
        return res
    return common.Job(cfg, model, train_loss_fn(model, cfg, d), None, on_eval, lambda m: optimizer(m, cfg),
                      outputs=("front.png",))


def main(argv=None):
    common.cli(argv, Config, PRESETS, __doc__, options=options, dry_run=dry_run,
               load=lambda ckpt, overrides, args, d: from_checkpoint(ckpt, d.device, **overrides), sample=cli_sample,
               evaluate=lambda model, cfg, args, d: evaluate(model, cfg, cfg.seed, args.baselines) if d.is_main else {},
               prepare=cli_train, digits=5)


if __name__ == "__main__":
    common.run(main)
