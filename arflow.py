"""
arflow.py -- ARFlow: an autoregressive flow over noise levels, with hybrid (softmax + gated linear) attention.

Paper: "ARFlow: Autoregressive Flow with Hybrid Linear Attention", Hui, Zhu, Yang, Zhang, Wang, Zhou, Eshraghian, Xie,
2025, https://arxiv.org/abs/2501.16085 (official code: github.com/TheFllood/ARFlow, read for facts, not copied).

A SiT-style flow-matching transformer whose input is a *sequence* of S images. Training: S distinct images of one
class get noise levels t_1 <= ... <= t_S (x_t = t x + (1 - t) eps, so the noisier images come first) and the network
predicts each image's velocity u = x - eps while attending causally to the earlier, noisier images. Sampling: every
denoising step feeds the current noisy image as the next element of the sequence, so step k conditions on the whole
trajectory x_{t_0}, ..., x_{t_k}. Attention is hybrid (HybridAttention below): bidirectional softmax inside an image,
gated linear attention across images with a recurrent state of fixed size, so sampling memory is flat in the number
of steps (training builds the S states at once, at a cost quadratic in S, see HybridAttention).

    python arflow.py                                       # CPU demo: class-conditional 8x8 digits, 7 CPU-minutes
    python arflow.py --eval --ckpt out/arflow/ckpt.pt      # held-out loss; sample accuracy and FD per guidance
    python arflow.py --sample --ckpt out/arflow/ckpt.pt --n 100 --out samples.npz --guidance 2 --sampler heun
    python arflow.py --preset imagenet128 --precompute /data/imagenet/train --data latents128/ --vae sd-vae-ft-ema/
    torchrun --nproc_per_node=8 arflow.py --preset imagenet128 --data latents128/ --vae sd-vae-ft-ema/
    python arflow.py --data my_images/ --num_classes 3     # your image folder (flat or class folders), at its size
    python arflow.py --data my_images/ --vae sd-vae-ft-ema/ --vae_family sd  # ... in latent space, encoded as it trains
    python arflow.py --arch B/4 --attention softmax        # any SiT size; the full-softmax baseline
    python arflow.py --sample --ckpt ARFlow-XL-2.pt --vae sd-vae-ft-ema/ --vae_family sd --n 8 --out s.npz  # released

Samplers (`--sampler`): `sde` Euler-Maruyama with diffusion w(t) = norm (1 - t) and a noise-free last step (the
reference's default), `euler` and `heun` on the probability-flow ODE. `--guidance w` is classifier-free guidance
v = v_u + w (v_c - v_u) (w = 1: none), the conditional and null branches batched with separate recurrent states.

The official checkpoints (train.py's {"model", "ema", "opt", "args"}, or a plain state_dict) load through
from_official, `--ckpt` and `--init_from`, with the official sampler's settings (OFFICIAL_SAMPLER); with the same
weights the network and the samplers equal the official code to 1e-6 in fp32 (tests, fixtures README).
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import math
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

GATE_NORM = 16.0  # log-gates are logsigmoid(.) / 16 (reference gated_retnet_train.py, gate_logit_normalizer)

# SiT/DiT sizes (reference models.py, ARFlow_*): depth, width, heads by name, patch by suffix
ARCHS = {f"{name}/{p}": dict(depth=depth, width=width, heads=heads if (name, p) != ("XL", 2) else 18, patch_size=p)
         for name, (depth, width, heads) in {"S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16),
                                             "XL": (28, 1152, 16)}.items() for p in (2, 4, 8)}


# ----------------------------------------------------------------------------------------------------------------------
# Config


@dataclass
class Config(common.TrainConfig):
    # data
    data: str = "digits"  # digits | image folder (flat or class subfolders) | .npz: images (N,H,W,C) uint8 [labels] | --precompute'd latent folder
    img_size: int = common.opt(8, min=1)  # image side in pixels (read from --data unless given)
    channels: int = common.opt(1, min=1)  # image channels (read from --data unless given)
    num_classes: int = common.opt(10, min=1)  # classes; label num_classes is the null label of guidance
    vae: str = ""  # VAE weights for latent space (diffusers folder or single file); empty = pixel space
    vae_family: str = common.opt("none", choices=("none", "sd", "sdxl", "flux"))  # latent scaling (none = pixels)
    seq_len: int = common.opt(5, min=1)  # S: images per training sequence, all of one class
    hflip: bool = False  # random horizontal flips of each image (off for digits: a mirrored 2 is not a 2)
    # model
    patch_size: int = common.opt(2, min=1)  # patch side; an image (or latent) is (side/patch)^2 tokens
    width: int = common.opt(128, min=4)  # transformer width
    depth: int = common.opt(4, min=1)  # transformer blocks
    heads: int = common.opt(4, min=1)  # attention heads
    mlp_ratio: float = common.opt(4.0, gt=0)  # MLP hidden width / width
    t_scale: float = common.opt(1.0, gt=0)  # the time embedding sees t_scale * t (SiT: 1; DiT's 1000 learns faster)
    attention: str = common.opt("hybrid", choices=("hybrid", "softmax"))  # hybrid (ARFlow) | softmax (full baseline)
    label_drop: float = common.opt(0.1, max=1)  # probability of the null label for a whole sequence
    # sampler
    sampler: str = common.opt("sde", choices=("sde", "euler", "heun"))  # Euler-Maruyama SDE | Euler ODE | Heun ODE
    sample_steps: int = common.opt(250, min=1)  # time steps (network evaluations; Heun: twice as many)
    last_step: float = common.opt(0.04, max=0.5)  # size of the final step to t = 1 (0: a uniform grid)
    diffusion_norm: float = 1.0  # SDE diffusion w(t) = norm * (1 - t); 0 turns the SDE into the Euler ODE
    guidance: float = 1.0  # classifier-free guidance w: v_u + w (v_c - v_u); 1 = off
    guide_channels: int = common.opt(0, min=0)  # guide the first k channels only, the rest conditional (0 = all)
    eval_guidance: tuple = (1.0, 1.5, 2.0, 3.0)  # digits: the guidance values --eval reports FD and accuracy for
    eval_n: int = common.opt(500, min=1)  # digits: samples per guidance value in evaluations

    NAME = "arflow"
    RUNTIME = ("data", "vae", "hflip", "label_drop", "sampler", "sample_steps", "last_step",
               "diffusion_norm", "guidance", "guide_channels", "eval_guidance", "eval_n")

    def __post_init__(self):
        super().__post_init__()
        if self.width % self.heads:
            raise ValueError(f"--width {self.width} is not divisible by --heads {self.heads}")
        if self.width % 4:
            raise ValueError(f"--width {self.width} must be a multiple of 4 (2D sin-cos positions)")
        if self.data == "digits" and (self.channels != 1 or self.num_classes != 10 or self.img_size % 8):
            raise ValueError(f"digits have 1 channel, 10 classes and a side that is a multiple of 8; the config says "
                             f"--channels {self.channels} --num_classes {self.num_classes} --img_size {self.img_size}")
        if self.vae_family == "none" and self.img_size % self.patch_size:
            raise ValueError(f"--img_size {self.img_size} is not divisible by --patch_size {self.patch_size}")
        if self.vae and self.vae_family == "none":
            raise ValueError(f"--vae {self.vae} needs --vae_family (sd, sdxl or flux)")


PRESETS = {
    # CPU demo: 8x8 digits in pixel space, sequences of 5 images of one class, 4 tokens of 4x4 pixels per image (patch 2
    # learns slower per CPU second: FD 5.5 after 1200 steps at width 96). t_scale 1000: at 600 steps, loss 0.553 and
    # FD 23 against 0.596 and FD 27 with SiT's unscaled t. SDE with 50 steps: FD 2.1 (250 steps: 1.9, 5x the time).
    "digits": dict(patch_size=4, width=128, depth=4, heads=4, t_scale=1000.0, steps=2400, batch_size=32, lr=1e-3,
                   warmup=100, weight_decay=0.0, ema_decay=0.999, log_every=50, eval_every=0, ckpt_every=500,
                   sample_steps=50, guidance=1.5, eval_guidance=(1.0, 1.5, 2.0), eval_n=1000),
    # ImageNet 128: XL/2 on SD-VAE latents (16x16x4), reference train.py: S = 5 images per sequence (line 203), a
    # fresh posterior draw of every latent each step (lines 256-259, see precompute_latents), AdamW lr 1e-4, betas
    # (0.9, 0.95) (line 195), weight decay 0.02 on matrices (line 184), gradient values clipped to 3 (line 267), EMA
    # 0.9999 (line 56). Sampling: 250-step SDE (train_utils.py:24-31), guidance 1.5 on the first 3 latent channels
    # (models.py:422): the paper's FID setting, as the official sampler guides. train.py's default global batch is 8
    # sequences (line 323); 64 sequences = 320 images per step, about SiT's 256. Where these presets differ from the
    # reference: bf16 autocast on GPU (the reference trains in fp32 with TF32 matmuls, train.py:9-10; --no-amp for
    # fp32), and common.EMA's warm-up min(0.9999, (1+s)/(10+s)) (the reference averages at 0.9999 from step 0; the two
    # differ for the first ~90k steps, not at 400k).
    "imagenet128": dict(data="latents128", img_size=128, channels=3, num_classes=1000, vae_family="sd", **ARCHS["XL/2"],
                        hflip=True, batch_size=64, lr=1e-4, lr_schedule="constant", warmup=0, beta1=0.9, beta2=0.95,
                        weight_decay=0.02, grad_clip=0.0, grad_clip_value=3.0, ema_decay=0.9999, steps=400_000,
                        log_every=100, eval_every=10_000, ckpt_every=10_000, guidance=1.5, guide_channels=3),
    # ImageNet 256: the same recipe on 32x32x4 latents (reference sample.py --image-size 256).
    "imagenet256": dict(data="latents256", img_size=256, channels=3, num_classes=1000, vae_family="sd", **ARCHS["XL/2"],
                        hflip=True, batch_size=64, lr=1e-4, lr_schedule="constant", warmup=0, beta1=0.9, beta2=0.95,
                        weight_decay=0.02, grad_clip=0.0, grad_clip_value=3.0, ema_decay=0.9999, steps=400_000,
                        log_every=100, eval_every=10_000, ckpt_every=10_000, guidance=1.5, guide_channels=3),
}


# ----------------------------------------------------------------------------------------------------------------------
# Hybrid attention -- the paper's contribution


class ChunkState:
    """The recurrent state of one hybrid attention layer while sampling: S (B, H, Dh, Dh), fp32, fixed size."""

    def __init__(self):
        self.S = None  # S_0 = 0, allocated at the first chunk


class HybridAttention(nn.Module):
    """Hybrid attention over a sequence of images, one chunk = the N tokens of one image. Per head, with q, k, v the
    RMS-normalised projections of the modulated tokens x and d the head width:

        o_i = softmax(q_i k_i^T / sqrt(d)) v_i                   bidirectional softmax inside image i
            + (q_i * exp(G_i)) S_i                               gated linear attention, earlier images only
        S_0 = 0,   S_{i+1} = lambda_i S_i + (k_i / sqrt(d))^T v_i          the chunk-level recurrence
        g_{i,n} = logsigmoid(w_g . (x_{i,n} + c_i)) / 16  <= 0          per-token log-gate, from the token + condition
        lambda_i = exp(mean_n g_{i,n}),   G_{i,n} = sum_{m <= n} g_{i,m}   chunk decay; query-side decay in the chunk
        out = W_o (silu(W_z x) * RMSNorm(o))                           per-head output norm, SiLU output gate

    As the reference (linearattention/gated_retnet_train.py + kernel/gate_recurrent_train.py): RMSNorms without affine
    weights, q/k/v normalised over the whole width before the head split and the output per head, no projection
    biases, keys scaled by 1/sqrt(d) in both terms, the two terms simply added (the softmax term is normalised, the
    linear one is not), the chunk decay the *mean* of the chunk's log-gates, and no key-side decay inside a chunk.
    Equal to the official layer to 1e-6 on a fixture (tests). Where it departs: pure PyTorch instead of Triton, and
    the parallel form builds the states from an (S x S) decay matrix instead of a sequential scan: same numbers, and
    cheap at the S = 5 images of training, but its cost is quadratic in S -- (S^2 Dh^2) per head against the scan's
    (S Dh^2); the per-image softmax and the projections are linear in S. Sampling uses the recurrent form.

    `parallel` (training: all S images at once) and `recurrent` (sampling: one image per call, carrying S) are written
    separately on purpose; the tests check that they agree.
    """

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.q, self.k, self.v = (nn.Linear(dim, dim, bias=False) for _ in range(3))
        self.z = nn.Linear(dim, dim, bias=False)  # output gate
        self.out = nn.Linear(dim, dim, bias=False)
        self.gate = nn.Linear(dim, heads, bias=False)  # w_g: one log-gate per token and head

    def _heads(self, t: torch.Tensor) -> torch.Tensor:  # (B, S, N, C) -> (B, S, H, N, Dh), RMS-normalised
        # over the whole width, then split: the reference's query_ln/key_ln/value_ln are RMSNorm(head_dim) modules
        # applied to the (..., C) projections, and rms_norm.py takes the mean over the last dim, i.e. all C
        # (gated_retnet_train.py:47-49 with rms_norm.py:15); only the output norm (subln) is per head
        B, S, N, C = t.shape
        return F.rms_norm(t, (C,), eps=1e-6).view(B, S, N, self.heads, self.head_dim).transpose(2, 3)

    def forward(self, x: torch.Tensor, c: torch.Tensor, state=None, commit: bool = True) -> torch.Tensor:
        """x (B, S, N, C) modulated tokens, c (B, S, C) per-image condition. Without a state: the parallel form over
        the S images. With one: the recurrent form for S = 1 new image after the state's images (commit=False reads
        the state without adding this image, for a solver's extra evaluations at the same step)."""
        q, k, v = self._heads(self.q(x)), self._heads(self.k(x)), self._heads(self.v(x))
        inner = F.scaled_dot_product_attention(q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1)).view_as(v)
        with torch.autocast("cuda" if x.is_cuda else "cpu", enabled=False):  # the state and decays stay fp32
            gx = F.linear((x + c[:, :, None]).float(), self.gate.weight.float())  # fp32 even with bf16 weights
            g = F.logsigmoid(gx).permute(0, 1, 3, 2) / GATE_NORM  # (B, S, H, N)
            q, k, v = q.float(), k.float() * self.head_dim ** -0.5, v.float()
            cross = self.parallel(q, k, v, g) if state is None else self.recurrent(q, k, v, g, state, commit)
        o = F.rms_norm(inner + cross, (self.head_dim,), eps=1e-6)  # (B, S, H, N, Dh)
        o = o.transpose(2, 3).flatten(3).to(x.dtype)  # (B, S, N, C)
        return self.out(F.silu(self.z(x)) * o)

    @staticmethod
    def parallel(q, k, v, g) -> torch.Tensor:
        """Cross term of all S images at once. Unrolling the recurrence, with Lambda_i = sum_{l <= i} log lambda_l:
        S_i = sum_{j < i} exp(Lambda_{i-1} - Lambda_j) K_j^T V_j, a (S x S) lower-triangular decay matrix applied
        to the per-image K_j^T V_j. Shapes (B, S, H, N, Dh), g (B, S, H, N) -> (B, S, H, N, Dh)."""
        S = q.shape[1]
        kv = k.transpose(-1, -2) @ v  # (B, S, H, Dh, Dh): K_j^T V_j
        log_lam = g.mean(-1)  # (B, S, H)
        Lam = log_lam.cumsum(1)
        expo = (Lam - log_lam)[:, :, None] - Lam[:, None]  # (B, S_i, S_j, H): Lambda_{i-1} - Lambda_j
        earlier = torch.ones(S, S, dtype=torch.bool, device=q.device).tril(-1)[:, :, None]  # j < i
        decay = expo.masked_fill(~earlier, -math.inf).exp()
        states = torch.einsum("bijh,bjhde->bihde", decay, kv)  # (B, S, H, Dh, Dh): S_i
        return (q * g.cumsum(-1).exp()[..., None]) @ states

    @staticmethod
    def recurrent(q, k, v, g, state: ChunkState, commit: bool) -> torch.Tensor:
        """Cross term of one new image from the carried state; then S <- lambda S + K^T V. Shapes as `parallel`, S=1."""
        if q.shape[1] != 1:
            raise ValueError(f"the recurrent form takes one image per call, got {q.shape[1]}")
        q, k, v, g = q[:, 0], k[:, 0], v[:, 0], g[:, 0]  # (B, H, N, Dh), g (B, H, N)
        S = state.S if state.S is not None else q.new_zeros(*q.shape[:2], q.shape[-1], v.shape[-1])
        cross = (q * g.cumsum(-1).exp()[..., None]) @ S
        if commit:
            state.S = g.mean(-1).exp()[..., None, None] * S + k.transpose(-1, -2) @ v
        return cross[:, None]


class SoftmaxAttention(HybridAttention):
    """The full-softmax baseline over the same sequence: every token of image i attends, by softmax, to all tokens of
    images j <= i (block-causal), with the same projections, norms and output gate as HybridAttention but no
    recurrent state: sampling keeps a KV cache (common.KVCache) that grows by one image per step."""

    def __init__(self, dim: int, heads: int):
        super().__init__(dim, heads)
        del self.gate

    def forward(self, x, c, state: common.KVCache | None = None, commit: bool = True):
        B, S, N, C = x.shape
        q, k, v = (self._heads(p(x)).transpose(1, 2).flatten(2, 3) for p in (self.q, self.k, self.v))  # (B,H,SN,Dh)
        if state is None:
            img = torch.arange(S, device=x.device).repeat_interleave(N)
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=img[None, :] <= img[:, None])
        else:
            k, v = state.append(k, v)  # the cached earlier images, then this one
            o = F.scaled_dot_product_attention(q, k, v)
            if not commit:
                state.rewind(N)
        o = F.rms_norm(o, (self.head_dim,), eps=1e-6).view(B, self.heads, S, N, -1).permute(0, 2, 3, 1, 4)
        return self.out(F.silu(self.z(x)) * o.flatten(3))


# ----------------------------------------------------------------------------------------------------------------------
# SiT backbone


def sincos_2d(width: int, grid: int) -> torch.Tensor:
    """(grid^2, width) fixed 2D sin-cos positions (MAE/DiT): half the channels encode the column, half the row."""
    omega = 1.0 / 10000 ** (torch.arange(width // 4, dtype=torch.float64) / (width / 4))
    rows, cols = torch.meshgrid(*[torch.arange(grid, dtype=torch.float64)] * 2, indexing="ij")

    def emb(p):
        a = p.reshape(-1, 1) * omega
        return torch.cat([a.sin(), a.cos()], 1)
    return torch.cat([emb(cols), emb(rows)], 1).float()


class TimestepEmbedder(nn.Module):
    """scale * t -> 256 sinusoidal features (periods 2 pi .. 2 pi 10^4) -> MLP -> width. SiT feeds t in [0, 1] as it
    is (scale 1), so only the slowest features move; DiT's timesteps span [0, 1000]."""

    def __init__(self, width: int, scale: float, freqs: int = 256):
        super().__init__()
        self.register_buffer("freqs", scale * torch.exp(-math.log(10000) * torch.arange(freqs // 2) / (freqs // 2)),
                             persistent=False)
        self.mlp = nn.Sequential(nn.Linear(freqs, width), nn.SiLU(), nn.Linear(width, width))

    def forward(self, t: torch.Tensor) -> torch.Tensor:  # (...) -> (..., width)
        a = t[..., None].float() * self.freqs
        return self.mlp(torch.cat([a.cos(), a.sin()], -1).to(self.mlp[0].weight.dtype))


class ARFlowBlock(nn.Module):
    """DiT block with adaLN-Zero: each image's condition c_s = y_emb + t_emb(t_s) sets the shift, scale and gate of
    the attention and MLP branches for that image's tokens."""

    def __init__(self, cfg: Config):
        super().__init__()
        W = cfg.width
        self.norm1 = nn.LayerNorm(W, elementwise_affine=False, eps=1e-6)
        self.attn = (HybridAttention if cfg.attention == "hybrid" else SoftmaxAttention)(W, cfg.heads)
        self.norm2 = nn.LayerNorm(W, elementwise_affine=False, eps=1e-6)
        hidden = int(cfg.mlp_ratio * W)
        self.mlp = nn.Sequential(nn.Linear(W, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, W))
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(W, 6 * W))

    def forward(self, x, c, state=None, commit=True):  # x (B, S, N, W), c (B, S, W)
        shift1, scale1, gate1, shift2, scale2, gate2 = self.ada(c)[:, :, None].chunk(6, -1)  # each (B, S, 1, W)
        x = x + gate1 * self.attn(self.norm1(x) * (1 + scale1) + shift1, c, state, commit)
        return x + gate2 * self.mlp(self.norm2(x) * (1 + scale2) + shift2)


class ARFlow(nn.Module):
    """Velocity network v(x_t, t, y) over a sequence of S images (B, S, C, H, W) at noise levels t (B, S)."""

    def __init__(self, cfg: Config, channels: int, side: int):
        super().__init__()
        if side % cfg.patch_size:
            raise ValueError(f"size {side} is not divisible by --patch_size {cfg.patch_size}")
        self.cfg, self.C, self.side, self.p = cfg, channels, side, cfg.patch_size
        self.N, W = (side // cfg.patch_size) ** 2, cfg.width
        self.patch = nn.Conv2d(channels, W, cfg.patch_size, stride=cfg.patch_size)
        # saved with the weights: the reference's pos_embed is a frozen parameter that its EMA update still averages
        # (train.py:65), so a released checkpoint holds its own table (models.py:336)
        self.register_buffer("pos", sincos_2d(W, side // cfg.patch_size))  # (N, W)
        self.t_embed = TimestepEmbedder(W, cfg.t_scale)
        self.y_embed = nn.Embedding(cfg.num_classes + 1, W)  # + the null label
        self.blocks = nn.ModuleList([ARFlowBlock(cfg) for _ in range(cfg.depth)])
        self.final_ada = nn.Sequential(nn.SiLU(), nn.Linear(W, 2 * W))
        self.final_norm = nn.LayerNorm(W, elementwise_affine=False, eps=1e-6)
        # the reference predicts 2C channels and drops half (models.py:328, :411; DiT's learned sigma, which a velocity
        # loss never trains): C here
        self.final = nn.Linear(W, cfg.patch_size ** 2 * channels)
        self.init_weights()

    def init_weights(self):  # as DiT/SiT: xavier linears, zero adaLN and output (every block starts as the identity)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        nn.init.xavier_uniform_(self.patch.weight.view(self.patch.weight.shape[0], -1))
        nn.init.zeros_(self.patch.bias)
        nn.init.normal_(self.y_embed.weight, std=0.02)
        for lin in (self.t_embed.mlp[0], self.t_embed.mlp[2]):
            nn.init.normal_(lin.weight, std=0.02)
        for lin in [b.ada[-1] for b in self.blocks] + [self.final_ada[-1], self.final]:
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)

    def new_state(self, batch: int, max_images: int) -> list:
        """Per-layer recurrent states for sampling: a fixed-size ChunkState (hybrid), or a KV cache with room for
        max_images images (softmax baseline)."""
        if self.cfg.attention == "hybrid":
            return [ChunkState() for _ in self.blocks]
        p, H = next(self.parameters()), self.cfg.heads
        return [common.KVCache(batch, H, max_images * self.N, self.cfg.width // H, p.device, p.dtype)
                for _ in self.blocks]

    def forward(self, x, t, y, state: list | None = None, commit: bool = True) -> torch.Tensor:
        """x (B, S, C, H, W), t (B, S), y (B,) labels (num_classes = null) -> v (B, S, C, H, W). With `state`
        (sampling), S = 1 and the image attends to the images before it through the state."""
        if x.ndim != 5 or x.shape[2:] != (self.C, self.side, self.side) or t.shape != x.shape[:2]:
            raise ValueError(f"expected x (B, S, {self.C}, {self.side}, {self.side}) and t (B, S), got input of shape "
                             f"{tuple(x.shape)} and t {tuple(t.shape)}")
        B, S = x.shape[:2]
        h = self.patch(x.flatten(0, 1).to(self.patch.weight.dtype))  # (B*S, W, H/p, W/p)
        h = (h.flatten(2).transpose(1, 2).view(B, S, self.N, -1) + self.pos).to(self.patch.weight.dtype)  # (B,S,N,W)
        c = self.y_embed(y)[:, None] + self.t_embed(t)  # (B, S, W): c_s = y_emb + t_emb(t_s)
        for i, block in enumerate(self.blocks):
            h = block(h, c, None if state is None else state[i], commit)
        shift, scale = self.final_ada(c)[:, :, None].chunk(2, -1)
        h = self.final(self.final_norm(h) * (1 + scale) + shift)  # (B, S, N, p*p*C)
        g, p = self.side // self.p, self.p
        h = h.view(B, S, g, g, p, p, self.C).permute(0, 1, 6, 2, 4, 3, 5)
        return h.reshape(B, S, self.C, self.side, self.side).float()


# ----------------------------------------------------------------------------------------------------------------------
# Data: sequences of S distinct images of one class


def load_data(cfg: Config, split: str = "train") -> tuple:
    """(x, x_flip, labels, logvar) as numpy arrays: uint8 images (N, C, H, W) (an image folder's are read and resized
    as the batches ask for them) or float latents (N, c, h, w) (memory-mapped from a latent folder), the latents of
    the mirrored images (or None: flip x itself), int64 labels (N,), and for latents the posterior log-variances
    (logvar, logvar of the mirrors or None), or None (posterior means only, or images). A latent model encodes images
    through its VAE at every step, drawing from the posterior (to_model_space); --precompute encodes them once."""
    path, x_flip, logvar = Path(cfg.data), None, None
    if cfg.data == "digits":
        x, y = (t.numpy() for t in common.load_digits(split, cfg.img_size))
    elif path.is_dir() and (path / "latents.npy").exists():  # --precompute's latent folder
        a = common.load_arrays(path, ("latents", "labels", "latents_flip", "latents_logvar", "latents_flip_logvar"))
        x, x_flip, y = a["latents"], a.get("latents_flip"), a.get("labels")
        logvar = (a["latents_logvar"], a.get("latents_flip_logvar")) if "latents_logvar" in a else None
    elif path.is_dir():  # an image folder: flat (one class) or one subfolder per class
        folder = common.ImageFolder(path, cfg.img_size, cfg.channels)
        x, y = FolderImages(folder, cfg.channels), folder.labels()
    else:
        a = common.load_arrays(path, ("images", "labels"))
        if a["images"].ndim != 4 or a["images"].shape[1:] != (cfg.img_size, cfg.img_size, cfg.channels):
            raise ValueError(f"{path}: images must be (N, {cfg.img_size}, {cfg.img_size}, {cfg.channels}) uint8, got "
                             f"{a['images'].shape}")
        x, y = np.ascontiguousarray(a["images"].transpose(0, 3, 1, 2)), a.get("labels")
    if x.dtype == np.uint8 and cfg.vae_family != "none" and not cfg.vae:
        raise ValueError(f"--data {path}: a latent model (--vae_family {cfg.vae_family}) encodes images through --vae "
                         f"PATH: give it (or train on a --precompute'd latent folder)")
    y = np.asarray(np.zeros(len(x), np.int64) if y is None else y).astype(np.int64)
    if len(y) != len(x) or y.min() < 0 or y.max() >= cfg.num_classes:
        raise ValueError(f"{path}: needs one label in [0, {cfg.num_classes}) per image (--num_classes), got "
                         f"{len(y)} labels in [{y.min()}, {y.max()}] for {len(x)} images")
    return x, x_flip, y, logvar


class FolderImages:
    """An image folder as a uint8 (N, C, H, W) array for SequenceSampler: indexing by rows reads (and resizes) those
    images only, so a folder larger than memory trains too."""
    dtype = np.dtype(np.uint8)

    def __init__(self, folder: common.ImageFolder, channels: int):
        self.folder, self.shape = folder, (len(folder), channels, folder.size, folder.size)

    def __len__(self):
        return self.shape[0]

    def __getitem__(self, rows):
        rows = np.asarray(rows)
        out = np.empty((rows.size, *self.shape[1:]), np.uint8)
        for k, i in enumerate(rows.reshape(-1)):
            out[k] = self.folder[int(i)][0].numpy()
        return out.reshape(*rows.shape, *self.shape[1:])


class SequenceSampler:
    """Training batches (x (b, S, ...), y (b,), t (b, S), eps (b, S, c, h, w), null (b,)): each sequence holds S
    distinct images of one class (uniform over the classes), randomly mirrored if cfg.hflip, with noise levels
    t ~ sort(U(0,1)^S) ascending, its own noise per image, and a flag for dropping the label of the whole sequence.
    With posterior log-variances (`logvar`, see load_data) each latent is a fresh draw mean + std * z of the VAE's
    posterior at every step, as the reference trainer does (train.py:256-259); without them, the mean. With `encode`
    (images that a latent model encodes as it trains) the batch ends with those draws z, for to_model_space.

    Everything is drawn for the GLOBAL batch from a generator seeded by (seed, step) and each rank keeps its slice
    (only its images are read): the batches are identical for any world size, and resuming at step k replays
    nothing. Call it with a start step for an endless iterator, as common.train does."""

    def __init__(self, x, x_flip, y, cfg: Config, shape: tuple, rank: int = 0, world: int = 1, seed: int | None = None,
                 label_drop: float | None = None, logvar: tuple | None = None, encode: bool = False):
        if cfg.batch_size % world:
            raise ValueError(f"--batch_size {cfg.batch_size} is not divisible by {world} ranks")
        S, counts = cfg.seq_len, np.bincount(y, minlength=cfg.num_classes)
        short = np.flatnonzero((counts > 0) & (counts < S))
        if len(short):
            raise ValueError(f"--seq_len {S}: class {short[0]} has only {counts[short[0]]} images")
        self.classes = torch.from_numpy(np.flatnonzero(counts >= S))  # classes that hold images (all, with S each)
        order = np.argsort(y, kind="stable")
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
        table = np.full((cfg.num_classes, counts.max()), -1, np.int64)  # table[c, :counts[c]] = images of class c
        table[y[order], np.arange(len(y)) - starts[y[order]]] = order
        self.table, self.counts = torch.from_numpy(table), torch.from_numpy(counts)
        self.x, self.x_flip, self.y, self.cfg, self.shape, self.logvar = x, x_flip, y, cfg, tuple(shape), logvar
        self.encode = encode
        self.rank, self.per_rank = rank, cfg.batch_size // world
        self.seed = cfg.seed if seed is None else seed
        self.label_drop = cfg.label_drop if label_drop is None else label_drop

    def __call__(self, start_step: int = 0):
        step = start_step
        while True:
            yield self.batch(step)
            step += 1

    def batch(self, step: int) -> list:
        cfg, B, S = self.cfg, self.cfg.batch_size, self.cfg.seq_len
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        cls = self.classes[torch.randint(len(self.classes), (B,), generator=g)]
        scores = torch.rand(B, self.table.shape[1], generator=g)  # the top S of random scores: S distinct images
        scores = scores.masked_fill(torch.arange(self.table.shape[1]) >= self.counts[cls][:, None], -1.0)
        idx = self.table[cls[:, None], scores.topk(S, dim=1).indices]  # (B, S) image indices
        flip = torch.rand(B, S, generator=g) < 0.5
        t = torch.rand(B, S, generator=g).sort(1).values  # ascending: noisier images first
        null = torch.rand(B, generator=g) < self.label_drop
        eps = torch.randn(B, S, *self.shape, generator=g)
        draw = self.logvar is not None or self.encode
        post = torch.randn(B, S, *self.shape, generator=g) if draw else None  # posterior draws
        mine = slice(self.rank * self.per_rank, (self.rank + 1) * self.per_rank)
        x = self.gather(idx[mine], flip[mine] if cfg.hflip else None, None if self.logvar is None else post[mine])
        return [x, cls[mine], t[mine], eps[mine], null[mine]] + ([post[mine]] if self.encode else [])

    def gather(self, idx: torch.Tensor, flip: torch.Tensor | None, post: torch.Tensor | None = None) -> torch.Tensor:
        flat = idx.flatten().numpy()
        order = np.argsort(flat)  # sorted reads: faster on memory-mapped latents
        back = torch.from_numpy(np.argsort(order))

        def read(a):
            return torch.as_tensor(np.asarray(a[flat[order]]))[back]

        def mirror(t, t_flip):
            if flip is None:
                return t
            # the reference encodes the mirrored image (moments_flip); without those latents, mirror x itself
            mirrored = read(t_flip) if t_flip is not None else t.flip(-1)
            return torch.where(flip.flatten()[:, None, None, None], mirrored, t)
        x = mirror(read(self.x), self.x_flip)
        if post is not None:
            logvar = mirror(read(self.logvar[0]), self.logvar[1]).float()
            x = x.float() + (0.5 * logvar).exp() * post.flatten(0, 1)
        return x.view(*idx.shape, *x.shape[1:])


def posterior(vae, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Images in [-1, 1] -> the VAE posterior's mean in model space (scaled) and the log-variance of that scaled latent
    (AutoencoderKL clamps it to [-30, 20])."""
    p = next(vae.ae.parameters())
    mean, logvar = vae.ae.encode(x.to(p.dtype))
    return (mean - vae.shift_factor) * vae.scaling_factor, logvar + 2 * math.log(vae.scaling_factor)


def to_model_space(x: torch.Tensor, vae, post: torch.Tensor | None = None) -> torch.Tensor:
    """uint8 images (..., C, H, W) -> [-1, 1] pixels or VAE latents: the posterior mean, or with draws `post` (as x)
    mean + std * post, as a --precompute'd folder trains; float inputs are latents already."""
    if x.dtype != torch.uint8:
        return x.float()
    lead, x = x.shape[:-3], common.to_float(x.flatten(0, -4))
    if vae is not None and post is not None:
        with torch.no_grad():  # (in chunks, as VAE.encode: they bound a big VAE's activation memory)
            mean, logvar = (torch.cat(m).float() for m in zip(*(posterior(vae, xb) for xb in x.split(64))))
        x = mean + (0.5 * logvar).exp() * post.flatten(0, -4)
    elif vae is not None:
        x = vae.encode(x)
    return x.view(*lead, *x.shape[1:])


# ----------------------------------------------------------------------------------------------------------------------
# Loss


def flow_loss(net, x, t, eps, y) -> torch.Tensor:
    """Flow matching on the sequence, SiT's linear path: x_t = t x + (1 - t) eps (t = 0 noise, t = 1 data), target
    velocity u = dx_t/dt = x - eps, MSE averaged over the S images (and every element)."""
    tt = t[..., None, None, None]
    return (net(tt * x + (1 - tt) * eps, t, y) - (x - eps)).square().mean()


def batch_loss(net, batch, num_classes: int, vae=None) -> torch.Tensor:
    x, y, t, eps, null, *post = batch  # (post: posterior draws of images encoded here, SequenceSampler(encode=True))
    return flow_loss(net, to_model_space(x, vae, *post), t, eps, torch.where(null, num_classes, y))


# ----------------------------------------------------------------------------------------------------------------------
# Sampler


def time_grid(steps: int, last_step: float) -> list[float]:
    """t_0 = 0 < ... < t_steps = 1: uniform to 1 - last_step, then one step of last_step (the reference's SDE grid,
    transport.py check_interval + the "Mean" last step); last_step = 0 is the uniform grid."""
    if last_step == 0:
        return torch.linspace(0, 1, steps + 1, dtype=torch.float64).tolist()
    return torch.linspace(0, 1 - last_step, steps, dtype=torch.float64).tolist() + [1.0]


@torch.no_grad()
def velocity(model: ARFlow, x, t: float, y, state: list, w: float, guided: bool, commit: bool = True,
             channels: int = 0):
    """The velocity of the next image of the trajectory, x (B, C, H, W) at time t, given the images before it (state).
    Guided: the conditional and null branches run as one batch of 2B whose second half has the null label and its
    own recurrent states, and v = v_u + w (v_c - v_u) on every channel, or on the first `channels` only (the others
    take v_c). The reference guides the first 3 of the 4 latent channels only (models.py:422, after dropping the
    sigma half at :411), DiT's forward_with_cfg leftover; by default we guide them all (guide_channels 0), and
    guide_channels 3 is the reference's sampler."""
    if guided:
        x, y = torch.cat([x, x]), torch.cat([y, torch.full_like(y, model.cfg.num_classes)])
    v = model(x[:, None], torch.full((len(x), 1), t, device=x.device), y, state, commit)[:, 0]
    if not guided:
        return v
    v_c, v_u = v.chunk(2)
    v = v_u + w * (v_c - v_u)
    return torch.cat([v[:, :channels], v_c[:, channels:]], 1) if channels else v


@torch.no_grad()
def sample(model: ARFlow, y: torch.Tensor, cfg: Config, generator=None, z: torch.Tensor | None = None,
           guided: bool | None = None, noise: torch.Tensor | None = None) -> torch.Tensor:
    """Integrate from noise (t = 0) to data (t = 1) -> x (B, C, H, W) in model space. Every step feeds the current
    noisy image as the next chunk and commits it to the state, so step k sees x_{t_0..t_k} at a memory cost that
    does not grow with the steps (hybrid). Heun's second evaluation reads the state without committing.

    sde:   x <- x + dt (v + w(t) score) + sqrt(2 w(t) dt) z, with w(t) = norm (1 - t) and, on the linear path,
           score = (t v - x) / (1 - t), so w(t) score = norm (t v - x); the last step has no noise (reference
           integrators.py sde + transport.py "Mean" last step). norm = 0 is exactly the Euler ODE.
    euler: x <- x + dt v.      heun: x <- x + dt (v(x, t) + v(x + dt v, t + dt)) / 2.
    `noise` (steps - 1, B, C, H, W) gives the SDE's Gaussian draws instead of `generator` (to replay another run)."""
    dev = next(model.parameters()).device
    x = z.clone() if z is not None else torch.randn(len(y), model.C, model.side, model.side, generator=generator,
                                                    device=dev)
    guided = cfg.guidance != 1 if guided is None else guided
    ts = time_grid(cfg.sample_steps, cfg.last_step)
    state = model.new_state(2 * len(y) if guided else len(y), len(ts))  # softmax baseline: a cache for every step
    for k in range(len(ts) - 1):
        t, dt = ts[k], ts[k + 1] - ts[k]
        v = velocity(model, x, t, y, state, cfg.guidance, guided, channels=cfg.guide_channels)
        if cfg.sampler == "heun":
            v2 = velocity(model, x + dt * v, ts[k + 1], y, state, cfg.guidance, guided, False, cfg.guide_channels)
            x = x + dt * (v + v2) / 2
        elif cfg.sampler == "sde":
            x = x + dt * (v + cfg.diffusion_norm * (t * v - x))
            if k < len(ts) - 2:
                eps = torch.randn(x.shape, generator=generator, device=dev) if noise is None else noise[k].to(dev)
                x = x + math.sqrt(2 * cfg.diffusion_norm * (1 - t) * dt) * eps
        else:
            x = x + dt * v
    return x


# ----------------------------------------------------------------------------------------------------------------------
# VAE, generation and evaluation


@functools.lru_cache(maxsize=2)
def _vae(path: str, family: str, device: str):
    return common.load_vae(path, family=family, device=device).eval()


def load_vae(cfg: Config, device):
    """The frozen VAE of a latent model (None in pixel space, or for precomputed latents without --vae)."""
    return _vae(cfg.vae, cfg.vae_family, str(device)) if cfg.vae and cfg.vae_family != "none" else None


def latent_shape(cfg: Config, vae=None) -> tuple[int, int]:
    """(channels, side) of what the flow models: pixels, or latents (the family's f8 when no VAE is loaded)."""
    if cfg.vae_family == "none":
        return cfg.channels, cfg.img_size
    down, ch = (vae.downsample, vae.latent_channels) if vae is not None else \
        (8, common.VAE_FAMILIES[cfg.vae_family]["latent_channels"])
    if cfg.img_size % down:
        raise ValueError(f"--img_size {cfg.img_size} is not divisible by the VAE's downsampling {down}")
    return ch, cfg.img_size // down


def generate(model: ARFlow, cfg: Config, labels: torch.Tensor, vae, seed: int, bs: int = 500) -> torch.Tensor:
    """uint8 images (N, C, H, W) for the given class labels, sampled in batches."""
    if labels.numel() and (labels.min() < 0 or labels.max() >= cfg.num_classes):
        raise ValueError(f"class labels must be in [0, {cfg.num_classes}), got {labels.tolist()}")
    if vae is None and cfg.vae_family != "none":
        raise ValueError("decoding latents to images needs --vae PATH")
    dev = next(model.parameters()).device
    g = torch.Generator(device=dev).manual_seed(seed)
    out = [common.to_uint8(x if vae is None else vae.decode(x)).cpu()
           for x in (sample(model, yb.to(dev), cfg, generator=g) for yb in labels.split(bs))]
    return torch.cat(out) if out else torch.zeros(0, cfg.channels, cfg.img_size, cfg.img_size, dtype=torch.uint8)


@torch.no_grad()
def heldout_loss(model: ARFlow, cfg: Config, vae, d: common.Dist, batches: int = 4) -> float:
    """The flow-matching loss on fixed sequences (digits: the test split; other data: the training data, as nothing
    else is held out), with the labels, averaged over the ranks."""
    x, x_flip, y, logvar = load_data(cfg, "test")
    shape = (model.C, model.side, model.side)
    bs = max(d.world_size, min(cfg.batch_size, 64) // d.world_size * d.world_size)
    sampler = SequenceSampler(x, x_flip, y, dataclasses.replace(cfg, batch_size=bs, hflip=False), shape, d.rank,
                              d.world_size, seed=12345, label_drop=0.0, logvar=logvar)
    dev = next(model.parameters()).device
    losses = [batch_loss(model, [b.to(dev) for b in sampler.batch(i)], cfg.num_classes, vae) for i in range(batches)]
    return common.all_reduce_mean(torch.stack(losses).mean()).item()


def evaluate(model: ARFlow, cfg: Config, vae, d: common.Dist, n: int | None = None) -> dict:
    """Held-out loss (`val_loss`; on data other than the digits `train_loss`: the same on fixed training sequences);
    on digits also class accuracy and Frechet distance (common.digits_metrics) of n class-conditional samples for
    every guidance value in cfg.eval_guidance, and the guidance that minimises FD; with --fid_ref the Inception FID
    of fid_n samples (classes cycled) at the configured guidance."""
    was_training = model.training
    model.eval()
    out = {"val_loss" if cfg.data == "digits" else "train_loss": heldout_loss(model, cfg, vae, d)}
    if cfg.data == "digits":
        start, count = common.rank_split(n or cfg.eval_n, d)
        labels = torch.arange(start, start + count) % cfg.num_classes
        fds, all_labels = {}, common.gather(labels, d)
        for w in cfg.eval_guidance:
            imgs = generate(model, dataclasses.replace(cfg, guidance=w), labels, vae, cfg.seed + 7 + d.rank)
            imgs = common.gather(imgs, d)
            if d.is_main:
                m = common.digits_metrics(imgs, all_labels)
                out.update({f"fd_w{w:g}": m["fd"], f"accuracy_w{w:g}": m["accuracy"], "fd_floor": m["fd_floor"]})
                fds[w] = m["fd"]
        if fds:
            best = min(fds, key=fds.get)
            out.update(best_guidance=best, fd_best=fds[best], accuracy_best=out[f"accuracy_w{best:g}"])
    if cfg.fid_ref:
        start, count = common.rank_split(cfg.fid_n, d)
        labels = torch.arange(start, start + count) % cfg.num_classes
        imgs = common.gather(generate(model, cfg, labels, vae, cfg.seed + 11 + d.rank), d)
        if d.is_main:
            out.update(fid=common.fid(imgs, cfg.fid_ref, cfg.fid_weights, d.device), fid_n=len(imgs))
    model.train(was_training)
    return out


# ----------------------------------------------------------------------------------------------------------------------
# Trainer: build, checkpoints (ours and the official file), --precompute, the command line


def dry_run(cfg: Config, gpus: int) -> dict:
    """--dry_run: the config on the meta device (common.dry_run), the loss on sequences of seq_len latents; sampling
    keeps per layer a gated linear attention state (H, Dh, Dh) in fp32 and the current image's keys and values,
    for both guidance branches."""
    C, side = latent_shape(cfg)

    def loss(model, b):
        S = cfg.seq_len
        return flow_loss(model, torch.randn(b, S, C, side, side), torch.rand(b, S), torch.randn(b, S, C, side, side),
                         torch.zeros(b, dtype=torch.long))

    def states(model):
        dh = cfg.width // cfg.heads
        per = 2 * cfg.depth * (cfg.heads * dh * dh * 4 + 2 * model.N * cfg.width * 2)
        return {"state_per_sample": per, "state_batch256": 256 * per}

    return common.dry_run(cfg, lambda: ARFlow(cfg, C, side), loss, tokens=cfg.seq_len * (side // cfg.patch_size) ** 2,
                          gpus=gpus, block_types=(ARFlowBlock,), sample_bytes=states)


def build(cfg: Config, device) -> tuple[ARFlow, object]:
    vae = load_vae(cfg, device)
    return ARFlow(cfg, *latent_shape(cfg, vae)).to(device), vae


def _read(path) -> dict:
    """torch.load(weights_only=True), with argparse.Namespace allowed: the official trainer stores its args in it."""
    with torch.serialization.safe_globals([argparse.Namespace]):
        return common.load_checkpoint(path)


def from_checkpoint(path, device="cpu", **overrides) -> tuple[ARFlow, Config]:
    """The EMA model of a checkpoint (in eval mode) and its config; overrides may change run-time fields.
    Reads this file's checkpoints and the official ones (see from_official)."""
    state = _read(path)
    if "kind" not in state and ("ema" in state or "pos_embed" in state):
        model, cfg = _official(state, path, overrides)
    else:
        cfg = common.config_from_checkpoint(Config, state, overrides)
        model, _ = build(cfg, "cpu")
        state["model"].setdefault("pos", model.pos)  # files from before the table was saved
        common.load_weights(model, state)
    return model.to(device).eval(), cfg


# the official sampler's defaults: sample.py:92-93 (guidance 4.5, 250 steps) and train_utils.py:24-31 (Euler-Maruyama,
# diffusion "sigma" = 1 - t on the linear path, norm 1, "Mean" last step of 0.04); models.py:422 guides 3 channels
OFFICIAL_SAMPLER = dict(sampler="sde", sample_steps=250, diffusion_norm=1.0, last_step=0.04, guidance=4.5,
                        guide_channels=3)


def from_official(path, **overrides) -> tuple[ARFlow, Config]:
    """ARFlow's released weights (MudeHui/ARFlow-Weights): the official trainer's {"model", "ema", "opt", "args"}
    (args an argparse.Namespace; the EMA weights are used, as sample.py via download.py) or a plain state_dict of
    the official ARFlow, read with weights_only=True. The config comes from the tensors (SD-VAE latents at f8 when
    there are 4 channels), the sampler settings from OFFICIAL_SAMPLER; overrides may change run-time fields."""
    state = _read(path)
    if "kind" in state or not ("ema" in state or "pos_embed" in state):
        raise ValueError(f"{path} is not an official ARFlow checkpoint (no 'ema' or 'pos_embed')")
    return _official(state, path, overrides)


def _official(state: dict, path, overrides: dict) -> tuple[ARFlow, Config]:
    sd = state["ema"] if "ema" in state else state
    try:
        W, N = sd["pos_embed"].shape[-1], sd["pos_embed"].shape[1]
        proj = sd["x_embedder.proj.weight"]  # (W, C, p, p)
        C, p = proj.shape[1], proj.shape[-1]
        arch = dict(width=W, patch_size=p, depth=1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks.")),
                    heads=sd["blocks.0.attn.gt_proj.weight"].shape[0], t_scale=1.0, attention="hybrid",
                    mlp_ratio=sd["blocks.0.mlp.fc1.weight"].shape[0] / W,
                    num_classes=sd["y_embedder.embedding_table.weight"].shape[0] - 1)
    except (KeyError, ValueError) as e:
        raise ValueError(f"{path}: not the official ARFlow layout ({type(e).__name__}: {e})") from None
    side = math.isqrt(N) * p
    data = dict(vae_family="sd", img_size=8 * side, channels=3) if C == 4 else \
        dict(vae_family="none", img_size=side, channels=C)
    clash = {k: v for k, v in overrides.items() if k in arch and v != arch[k]}
    if clash:
        raise ValueError(f"{path} holds {', '.join(f'--{k} {arch[k]}' for k in clash)}; the options say otherwise")
    cfg = Config(**{**dict(data="official"), **data, **arch, **OFFICIAL_SAMPLER, **overrides})
    model = ARFlow(cfg, C, side)
    ours = {"patch.": "x_embedder.proj.", "t_embed.mlp.": "t_embedder.mlp.", "y_embed.": "y_embedder.embedding_table.",
            "final_ada.": "final_layer.adaLN_modulation.", "final.": "final_layer.linear."}
    ours.update({f"blocks.{i}.{a}": f"blocks.{i}.{b}" for i in range(cfg.depth) for a, b in (
        ("attn.q.", "attn.q_proj."), ("attn.k.", "attn.k_proj."), ("attn.v.", "attn.v_proj."),
        ("attn.z.", "attn.g_proj."), ("attn.out.", "attn.out_proj."), ("attn.gate.", "attn.gt_proj."),
        ("mlp.0.", "mlp.fc1."), ("mlp.2.", "mlp.fc2."), ("ada.", "adaLN_modulation."))})
    new = {"pos": sd["pos_embed"][0]}
    try:
        for k in model.state_dict():
            prefix = next((a for a in ours if k.startswith(a)), None)
            if prefix is not None:
                new[k] = sd[ours[prefix] + k[len(prefix):]]
        # the final layer predicts 2C channels per pixel (learned sigma, models.py:328), laid out (p, p, 2C): c < C
        for k in ("final.weight", "final.bias"):
            new[k] = new[k].reshape(p * p, -1, *new[k].shape[1:])[:, :C].flatten(0, 1)
        model.load_state_dict(new)
    except (KeyError, RuntimeError) as e:
        raise ValueError(f"{path}: not the official ARFlow layout ({str(e).splitlines()[0]})") from None
    return model.eval(), cfg


@torch.no_grad()
def precompute_latents(cfg: Config, src: str, d: common.Dist):
    """Encode an image folder (or .npz of images) through the VAE once, the images and their mirror images (the
    reference caches both, cache_imagenet.py:103-113): <cfg.data>/latents.npy, latents_flip.npy (N, c, h, w) the
    posterior means in model space (scaled), latents_logvar.npy, latents_flip_logvar.npy the log-variances of those
    scaled latents (the training draws mean + std * z each step), all fp16, and labels.npy."""
    vae = load_vae(cfg, d.device)
    if vae is None:
        raise ValueError("--precompute needs --vae PATH and --vae_family")
    if Path(src).is_dir():
        data = common.ImageFolder(src, cfg.img_size, vae.in_channels)
    else:
        x, _, y, _ = load_data(dataclasses.replace(cfg, data=src, channels=vae.in_channels, vae="", vae_family="none"))
        data = common.ArrayDataset(torch.from_numpy(x), torch.from_numpy(y))

    def encode(b):
        x = common.to_float(b[0].to(d.device))
        (m, lv), (mf, lvf) = posterior(vae, x), posterior(vae, x.flip(-1))
        return {"latents": m.half(), "latents_logvar": lv.half(), "latents_flip": mf.half(),
                "latents_flip_logvar": lvf.half(), "labels": torch.as_tensor(b[1])}
    names = common.encode_folder(cfg.data, data, d, encode, (cfg.img_size, cfg.img_size, vae.in_channels), 64,
                                 cfg.num_workers)
    common.print0(f"wrote {cfg.data}/{{{','.join(n + '.npy' for n in names)}}}")


def options(p: argparse.ArgumentParser):
    p.add_argument("--arch", choices=list(ARCHS), default=None,
                   help="a SiT size (depth, width, heads, patch); explicit options still override it")
    p.add_argument("--init_from", metavar="CKPT", default=None,
                   help="start training from the (EMA) weights of CKPT: an arflow checkpoint or the official ARFlow "
                        "file; the model options must agree with it")
    p.add_argument("--precompute", metavar="IMAGES", default=None,
                   help="encode IMAGES (image folder or .npz) through --vae into the latent folder --data")


def configure(cfg: Config, args, overrides: dict):
    if args.arch:  # a size, below the explicit options
        overrides = {**ARCHS[args.arch], **overrides}
        cfg = dataclasses.replace(cfg, **overrides)
    return cfg, overrides


def cli_sample(model: ARFlow, cfg: Config, args, d: common.Dist, start: int, count: int):
    labels = torch.arange(start, start + count) % cfg.num_classes
    imgs = generate(model, cfg, labels, load_vae(cfg, d.device), seed=cfg.seed + 1000 + d.rank)
    return ({"images": imgs.permute(0, 2, 3, 1).numpy(), "labels": labels.numpy()},
            f"{cfg.sampler}, {cfg.sample_steps} steps, guidance {cfg.guidance:g}")


def cli_train(cfg: Config, args, overrides: dict, d: common.Dist) -> common.Job:
    model, vae = build(cfg, d.device)
    if args.init_from:
        src, src_cfg = from_checkpoint(args.init_from)
        differ = [f"--{k} {getattr(src_cfg, k)}" for k in ("img_size", "num_classes", "vae_family", "patch_size",
                                                           "width", "depth", "heads", "mlp_ratio", "t_scale",
                                                           "attention") if getattr(src_cfg, k) != getattr(cfg, k)]
        if differ:
            raise ValueError(f"--init_from {args.init_from} holds {', '.join(differ)}; the options say otherwise")
        model.load_state_dict(src.state_dict())
    x, x_flip, y, logvar = load_data(cfg)
    shape = (model.C, model.side, model.side)
    if x.dtype != np.uint8 and tuple(x.shape[1:]) != shape:
        raise ValueError(f"--data {cfg.data}: latents of shape {tuple(x.shape[1:])}, the model expects {shape} "
                         f"(--img_size, --vae_family)")
    data = SequenceSampler(x, x_flip, y, cfg, shape, d.rank, d.world_size, logvar=logvar,
                           encode=vae is not None and x.dtype == np.uint8)
    common.print0(f"ARFlow ({cfg.attention} attention) with {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M "
                  f"parameters: sequences of {cfg.seq_len} images of {model.N} tokens, {len(x)} training images")

    def on_eval(step, model, ema):
        with ema.swap(model), common.full_params(model):
            res = evaluate(model, cfg, vae, d)
            grid = None
            if vae is not None or cfg.vae_family == "none":
                model.eval()
                grid = generate(model, cfg, torch.arange(100) % cfg.num_classes, vae, seed=0)
                model.train()
        if d.is_main and grid is not None:
            common.save_grid(Path(cfg.out_dir) / "samples.png", grid)
        return res
    return common.Job(cfg, model, lambda net, batch, at: (batch_loss(net, batch, cfg.num_classes, vae), {}), data,
                      on_eval, shard_types=(ARFlowBlock,))


def main(argv=None):
    common.cli(argv, Config, PRESETS, __doc__, options=options, configure=configure, dry_run=dry_run,
               load=lambda ckpt, overrides, args, d: from_checkpoint(ckpt, d.device, **overrides), sample=cli_sample,
               evaluate=lambda model, cfg, args, d: evaluate(model, cfg, load_vae(cfg, d.device), d),
               prepare=cli_train,
               modes={"precompute": lambda cfg, args, _, d: precompute_latents(cfg, args.precompute, d)})


if __name__ == "__main__":
    common.run(main)
