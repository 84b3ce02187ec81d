"""
starflow.py -- TARFlow and STARFlow: transformer autoregressive normalizing flows, in one file.

Papers:
  "Normalizing Flows are Capable Generative Models" (TARFlow), Zhai et al. 2024, https://arxiv.org/abs/2412.06329
  "STARFlow: Scaling Latent Normalizing Flows for High-resolution Image Synthesis", Gu et al. 2025,
  https://arxiv.org/abs/2506.06276

A stack of autoregressive affine flows over patch tokens. Each FlowBlock is a causal transformer that predicts, for
token t, a shift mu_t and a scale sigma_t from the tokens before it, and maps z_t = (x_t - mu_t) / sigma_t; the token
order flips from block to block. The log-determinant is -sum log sigma, so the exact likelihood is one forward pass.
Sampling inverts the blocks one token at a time (x_t = mu_t + sigma_t z_t) with a KV cache, or in parallel chunks by
Jacobi iteration. STARFlow adds a learned start token (token 0 is transformed too), sigma = softplus, a deep-shallow
stack whose deep block (next to the Gaussian prior) carries the conditioning, latent space, and a guidance rule.

    python starflow.py                                        # CPU demo: class-conditional digits, a few minutes
    python starflow.py --eval --ckpt out/starflow/ckpt.pt     # bits/dim, sample accuracy and Frechet distance
    python starflow.py --sample --ckpt out/starflow/ckpt.pt --n 100 --out samples.npz --guidance 2
    torchrun --nproc_per_node=8 starflow.py --preset imagenet256 --data latents/ --vae sd-vae/ --vae_family sd
    python starflow.py --preset imagenet256 --precompute imagenet/train --data latents/ --vae sd-vae/  # VAE latents

Text conditioning takes precomputed embeddings (no text encoder here): an .npz with `text` (N, L, txt_dim) float and
`text_mask` (N, L) bool beside the images, from any encoder, e.g. the last hidden states of a T5 or Gemma model.
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

import common

INV_SOFTPLUS_1 = math.log(math.e - 1)  # softplus(a + 0.5413) = 1 at a = 0: every block starts as the identity


# ----------------------------------------------------------------------------------------------------------------------
# Config


@dataclass
class Config(common.TrainConfig):
    # data
    data: str = "digits"  # digits | .npz: images (N,H,W,C) uint8 [labels, text, text_mask] | image or latent folder
    img_size: int = common.opt(8, min=1)  # image side in pixels
    channels: int = common.opt(1, min=1)  # image channels
    num_classes: int = 10  # class labels (0 = none); label num_classes is the null label of guidance
    txt_dim: int = 0  # width of precomputed text embeddings (0 = no text conditioning)
    txt_len: int = 0  # text tokens per caption
    vae: str = ""  # VAE weights (diffusers folder or single file) | digits (a small VAE trained once) | "" = pixels
    vae_family: str = common.opt("none", choices=tuple(common.VAE_FAMILIES))  # sd | sdxl | flux | none (pixel space)
    # model
    param: str = common.opt("starflow", choices=("tarflow", "starflow"))  # tarflow (sigma = exp) | starflow (softplus)
    patch_size: int = common.opt(2, min=1)  # patch side; tokens are patches of the image (or latent)
    width: int = common.opt(64, min=1)  # transformer width
    head_dim: int = common.opt(16, min=1)  # attention head width
    layers: tuple = common.opt((2, 2, 2, 4), min=1)  # layers per flow block; the last (deep) one is next to the prior
    cond_deep_only: bool = True  # conditioning in the deep block only (STARFlow) or in every block (TARFlow)
    rope: bool = False  # 2D RoPE instead of learned positions
    soft_clip: float = 4.0  # STARFlow's soft clip c*tanh(./c) on the predicted (mu, a); 0 = off
    noise_std: float = 0.1  # Gaussian noise augmentation sigma (TARFlow 0.05-0.15 in pixels, STARFlow 0.3 in latents)
    label_drop: float = common.opt(0.1, max=1)  # probability of the null condition in training (for guidance)
    grad_ckpt: bool = False  # gradient checkpointing of the transformer layers
    # sampler
    sampler: str = common.opt("jacobi", choices=("sequential", "jacobi"))  # sequential | jacobi
    jacobi_chunk: int = common.opt(16, min=1)  # tokens per Jacobi chunk
    jacobi_max_iter: int = common.opt(16, min=1)  # iterations per chunk at most
    jacobi_threshold: float = 1e-7  # stop when mean((new - old)^2) / mean(new^2) falls below this
    guidance: float = 1.0  # guidance weight w (0 = none)
    guidance_rule: str = common.opt("starflow", choices=("starflow", "tarflow"))  # p_c^(1+w)/p_u^w | extrapolation
    guide_what: str = common.opt("ab", choices=("a", "b", "ab"))  # tarflow rule: extrapolate a (log sigma), b (mu)
    guidance_anneal: bool = False  # ramp w linearly over the tokens (TARFlow's annealed schedule)
    guide_all_blocks: bool = False  # guide every conditioned block, not only the deep one
    denoise: bool = True  # score-based denoising of the final sample: x + noise_std^2 * grad log p(x)

    NAME = "starflow"
    RUNTIME = ("data", "vae", "sampler", "jacobi_chunk", "jacobi_max_iter", "jacobi_threshold", "guidance",
               "guidance_rule", "guide_what", "guidance_anneal", "guide_all_blocks", "denoise", "grad_ckpt",
               "label_drop")

    def __post_init__(self):
        super().__post_init__()
        if self.width % self.head_dim:
            raise ValueError(f"--width {self.width} is not divisible by --head_dim {self.head_dim}")
        if not self.layers:
            raise ValueError("--layers needs at least one flow block")
        if bool(self.txt_dim) != bool(self.txt_len):
            raise ValueError(f"text needs both --txt_dim and --txt_len (got {self.txt_dim}, {self.txt_len})")
        if self.vae and self.vae_family == "none":
            raise ValueError(f"--vae {self.vae} needs a latent --vae_family (sd, sdxl or flux)")


PRESETS = {
    # CPU demo: 8x8 digits in pixel space, 16 tokens of 2x2 pixels, class-conditional. About 3 minutes on 2 cores.
    "digits": dict(steps=2000, batch_size=64, lr=2e-3, warmup=100, eval_every=1000, ckpt_every=500, log_every=50,
                   ema_decay=0.999),
    # The same in the latent space of a small VAE trained on the digits (16x16 -> 8x8x4), as STARFlow does at scale.
    "digits-latent": dict(img_size=16, vae="digits", vae_family="sd", noise_std=0.3, steps=2000, batch_size=64,
                          lr=2e-3, warmup=100, eval_every=1000, ckpt_every=500, log_every=50),
    # STARFlow ImageNet 256: SD-VAE f8 latents 32x32x4, 1.4B deep-shallow [2,2,2,2,2,18] at width 2048.
    "imagenet256": dict(data="latents", img_size=256, channels=3, num_classes=1000, vae_family="sd", width=2048,
                        head_dim=64, layers=(2, 2, 2, 2, 2, 18), rope=True, noise_std=0.3, batch_size=256, lr=1e-4,
                        warmup=10000, steps=1_000_000, weight_decay=1e-4, grad_clip=1.0, ema_decay=0.9999,
                        eval_every=10000, ckpt_every=5000, log_every=100, jacobi_chunk=32, jacobi_max_iter=32,
                        jacobi_threshold=1e-3, guidance=3.0),
    # STARFlow text-to-image 256: deep block 24 layers at width 3072, text prefix of precomputed embeddings.
    "t2i256": dict(data="captions.npz", img_size=256, channels=3, num_classes=0, txt_dim=2304, txt_len=128,
                   vae_family="sd", width=3072, head_dim=64, layers=(2, 2, 2, 2, 2, 24), rope=True, noise_std=0.3,
                   batch_size=512, lr=1e-4, warmup=10000, steps=1_000_000, ema_decay=0.9999, eval_every=10000,
                   ckpt_every=5000, log_every=100, jacobi_chunk=32, jacobi_max_iter=32, jacobi_threshold=1e-3,
                   guidance=4.0),
    # TARFlow in pixels: ImageNet 64x64, 8 flow blocks of 8 layers, conditioning in every block, annealed guidance.
    "imagenet64-pixel": dict(data="imagenet64", img_size=64, channels=3, num_classes=1000, param="tarflow",
                             patch_size=2, width=1024, head_dim=64, layers=(8,) * 8, cond_deep_only=False,
                             soft_clip=0.0, noise_std=0.05, batch_size=256, lr=1e-4, warmup=5000, steps=1_000_000,
                             ema_decay=0.9999, eval_every=10000, ckpt_every=5000, log_every=100,
                             guidance_rule="tarflow", guidance_anneal=True, guide_all_blocks=True,
                             sampler="sequential"),
}


# ----------------------------------------------------------------------------------------------------------------------
# Model


class FlowBlock(nn.Module):
    """One autoregressive affine flow over T tokens of width D (in this block's token order):

        z_t = (x_t - mu_t) / sigma_t,   (mu_t, a_t) = transformer(x_<t),   log|det| = -sum_t log sigma_t

    TARFlow: the outputs are shifted right, so token 0 passes through unchanged; sigma = exp(a).
    STARFlow: a learned start token is prepended to the inputs, so token 0 is transformed too; sigma = softplus(a +
    0.5413). The conditioning (class token or text) is a prefix the causal attention sees from every position, as
    STARFlow feeds text; TARFlow instead adds a class embedding to every token, which the prefix subsumes.
    """

    def __init__(self, cfg: Config, n_layers: int, seq_len: int, token_dim: int, grid: tuple[int, int], flip: bool,
                 conditioned: bool):
        super().__init__()
        self.cfg, self.flip, self.conditioned, self.seq_len = cfg, flip, conditioned, seq_len
        self.shift = 1 if cfg.param == "tarflow" else 0  # stream position p predicts token p + shift
        self.prefix = (cfg.txt_len if cfg.txt_dim else 1 if cfg.num_classes else 0) if conditioned else 0
        W = cfg.width
        self.proj_in = nn.Linear(token_dim, W)
        self.layers = nn.ModuleList([common.Block(W, W // cfg.head_dim) for _ in range(n_layers)])
        self.proj_out = nn.Linear(W, 2 * token_dim)
        nn.init.zeros_(self.proj_out.weight)  # (mu, a) = 0: the block starts as the identity
        nn.init.zeros_(self.proj_out.bias)
        if cfg.param == "starflow":
            self.sos = nn.Parameter(torch.randn(1, 1, token_dim))
        if cfg.rope:
            self.rope = common.RoPE(cfg.head_dim, grid, prefix=self.prefix)
        else:
            self.pos = nn.Parameter(torch.randn(seq_len, W) * 0.02)
        if conditioned and cfg.txt_dim:
            self.proj_txt = nn.Linear(cfg.txt_dim, W)
            self.null_txt = nn.Parameter(torch.randn(1, 1, W) * 0.02)  # the unconditional "caption"
        elif conditioned and cfg.num_classes:
            self.class_emb = nn.Embedding(cfg.num_classes + 1, W)  # + the null label

    # -- conditioning prefix ---------------------------------------------------------------------------------------
    def embed_cond(self, cond: dict) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """cond: {"y": (B,) labels, or "text": (B, L, txt_dim) + "text_mask": (B, L) bool; "null": (B,) bool}.
        Returns the prefix (B, L, W) and a key mask (B, 1, 1, L) (None when every key is visible)."""
        if not self.prefix:
            return None, None
        null = cond["null"]
        if self.cfg.txt_dim:
            c = self.proj_txt(cond["text"])  # (B, L, W)
            keep = cond["text_mask"].clone()
            c = torch.where(null[:, None, None], self.null_txt.expand_as(c), c)
            keep[null] = False
            keep[:, 0] |= null  # the null caption is one learned token
            return c, keep[:, None, None, :]
        y = torch.where(null, self.cfg.num_classes, cond["y"])
        return self.class_emb(y)[:, None], None  # (B, 1, W)

    def run(self, u: torch.Tensor, start: int, prefix=None, mask=None, caches=None):
        """The network on stream positions start..start+n of input u (B, n, D) -> (mu, log sigma), each (B, n, D).
        With caches the prefix and earlier positions are already in them."""
        B, n, _ = u.shape
        h = self.proj_in(u.to(self.proj_in.weight.dtype))  # the flow's state is fp32; the network may be bf16
        if not self.cfg.rope:
            h = h + self.pos[start:start + n]
        L = 0
        if prefix is not None:
            h, L = torch.cat([prefix, h], 1), prefix.shape[1]
        if mask is not None:  # image keys are always visible
            mask = torch.cat([mask, mask.new_ones(B, 1, 1, self.seq_len)], -1)
        p0 = 0 if prefix is not None else self.prefix + start  # absolute position of h[:, 0]
        pos = slice(p0, p0 + h.shape[1])
        for i, layer in enumerate(self.layers):
            kw = dict(causal=True, mask=mask, rope=getattr(self, "rope", None), pos=pos,
                      cache=None if caches is None else caches[i])
            if self.cfg.grad_ckpt and self.training:
                h = checkpoint(lambda x, lyr=layer, k=kw: lyr(x, **k), h, use_reentrant=False)
            else:
                h = layer(h, **kw)
        out = self.proj_out(h[:, L:])  # (B, n, 2D)
        if self.cfg.soft_clip > 0:
            out = self.cfg.soft_clip * torch.tanh(out / self.cfg.soft_clip)
        a, mu = _fp32(out).chunk(2, -1)
        log_sigma = a if self.cfg.param == "tarflow" else F.softplus(a + INV_SOFTPLUS_1).log()
        return mu, log_sigma

    def stream(self, x: torch.Tensor, s: int = 0, e: int | None = None) -> torch.Tensor:
        """Positions s..e of the network's input: STARFlow [sos, x_0..x_{T-2}] (position p predicts x_p);
        TARFlow x_0..x_{T-2} (position p predicts x_{p+1})."""
        e = x.shape[1] - self.shift if e is None else e
        if self.shift:
            return x[:, s:e]
        if s > 0:
            return x[:, s - 1:e - 1]
        return torch.cat([self.sos.expand(x.shape[0], 1, -1).to(x.dtype), x[:, :e - 1]], 1)

    def forward(self, x: torch.Tensor, cond: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, T, D) -> z (B, T, D) in fp32 (or fp64), log|det dz/dx| (B,)."""
        x = x.flip(1) if self.flip else x
        prefix, mask = self.embed_cond(cond)
        mu, log_sigma = self.run(self.stream(x), 0, prefix, mask)
        if self.shift:  # TARFlow: token 0 maps by the identity
            mu, log_sigma = F.pad(mu, (0, 0, 1, 0)), F.pad(log_sigma, (0, 0, 1, 0))
        z = (_fp32(x) - mu) * torch.exp(-log_sigma)
        return (z.flip(1) if self.flip else z), -log_sigma.sum((1, 2))

    # -- inverse ---------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def reverse(self, z: torch.Tensor, cond: dict, guidance: float = 0.0, rule: str = "starflow", what: str = "ab",
                anneal: bool = False, chunk: int = 1, max_iter: int = 1, threshold: float = 0.0
                ) -> tuple[torch.Tensor, int]:
        """z (B, T, D) -> x, and the number of network evaluations. Jacobi decoding over chunks of `chunk` stream
        positions: iterate x_chunk <- mu(x_<) + sigma(x_<) z_chunk on top of the cached prefix, rewinding the cache
        between iterations. chunk = 1 is the sequential sampler (one step per token is then exact). Guidance (`guide`
        with `rule`, `what`; `anneal` ramps w over the tokens) runs the conditional and null branches as one batch."""
        B, T = z.shape[0], z.shape[1]
        z = _fp32(z.flip(1) if self.flip else z)
        guided = guidance > 0 and self.prefix > 0
        if guided:
            cond = {**{k: torch.cat([v, v]) for k, v in cond.items()},
                    "null": torch.cat([cond["null"], torch.ones_like(cond["null"])])}
        nb = 2 * B if guided else B
        prefix, mask = self.embed_cond(cond)
        dtype = self.proj_in.weight.dtype
        caches = [layer.attn.new_cache(nb, self.prefix + T, z.device, dtype) for layer in self.layers]
        x = z.clone()  # x_0 = z_0 for TARFlow; every other token is overwritten
        P, nfe = T - self.shift, 0  # stream positions
        for s in range(0, P, chunk):
            e = min(s + chunk, P)
            for it in range(min(max_iter, e - s)):  # a chunk of n tokens is exact after n iterations
                u = self.stream(x, s, e).to(dtype)
                u = torch.cat([u, u]) if guided else u
                mu, log_sigma = self.run(u, s, prefix if s == 0 else None, mask, caches)
                nfe += 1
                if guided:
                    w = guidance * ((torch.arange(s, e, device=z.device) + 1) / P)[None, :, None] if anneal \
                        else guidance
                    mu, log_sigma = guide(mu[:B], log_sigma[:B], mu[B:], log_sigma[B:], w, rule, what)
                t0, t1 = s + self.shift, e + self.shift
                new = mu + log_sigma.exp() * z[:, t0:t1]
                delta = (new - x[:, t0:t1]).square().mean() / new.square().mean().clamp(min=1e-12)
                x[:, t0:t1] = new
                if it == min(max_iter, e - s) - 1 or _all_ranks_done(delta < threshold):
                    break
                for c in caches:  # forget this iteration's keys (and a prefix written with chunk 0): recompute them
                    c.rewind(e - s + (self.prefix if s == 0 else 0))
        return (x.flip(1) if self.flip else x), nfe


def _fp32(x: torch.Tensor) -> torch.Tensor:
    """The affine maps run in (at least) fp32 even when the transformer runs in bf16."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def _all_ranks_done(done: torch.Tensor) -> bool:
    """Jacobi's stop flag, agreed by all ranks only when distributed (FSDP needs every rank in the same forwards).
    (ml-starflow all-reduces unconditionally, so its sampler runs only under torch.distributed.)"""
    if torch.distributed.is_initialized():
        done = done.float()
        torch.distributed.all_reduce(done, op=torch.distributed.ReduceOp.MIN)
    return bool(done)


def guide(mu_c, log_sigma_c, mu_u, log_sigma_u, w, rule: str = "starflow", what: str = "ab"):
    """Guided (mu, log sigma) of one step from the conditional (c) and unconditional (u) Gaussians.

    starflow (STARFlow's guidance): sample p_c^(1+w) / p_u^w, itself Gaussian. With s = min(sigma_c/sigma_u, 1)^2,
        sigma = sigma_c / sqrt(1 + w - w s),  mu = ((1 + w) mu_c - w s mu_u) / (1 + w - w s).
    (s caps the ratio so the precision 1 + w - w s stays >= 1; for sigma_c <= sigma_u it is the exact product.)
    tarflow (TARFlow's guidance): extrapolate the predictions, a <- a_c + w (a_c - a_u), mu <- mu_c + w (mu_c - mu_u).
    """
    if rule == "starflow":
        s = torch.exp(2 * (log_sigma_c - log_sigma_u)).clamp(max=1.0)
        prec = 1 + w - w * s
        return ((1 + w) * mu_c - w * s * mu_u) / prec, log_sigma_c - 0.5 * torch.log(prec)
    if "b" in what:
        mu_c = mu_c + w * (mu_c - mu_u)
    if "a" in what:
        log_sigma_c = log_sigma_c + w * (log_sigma_c - log_sigma_u)
    return mu_c, log_sigma_c


class STARFlow(nn.Module):
    """Patchify, then K FlowBlocks with alternating token order; the last (deep) block is next to the prior."""

    def __init__(self, cfg: Config, latent_channels: int, latent_size: int):
        super().__init__()
        if latent_size % cfg.patch_size:
            raise ValueError(f"size {latent_size} is not divisible by patch_size {cfg.patch_size}")
        if cfg.param not in ("tarflow", "starflow"):
            raise ValueError(f"param must be tarflow or starflow, got {cfg.param!r}")
        if cfg.width % cfg.head_dim:
            raise ValueError(f"width {cfg.width} is not divisible by head_dim {cfg.head_dim}")
        self.cfg, self.C, self.S = cfg, latent_channels, latent_size
        side = latent_size // cfg.patch_size
        self.T, self.D = side * side, latent_channels * cfg.patch_size ** 2
        K = len(cfg.layers)
        self.blocks = nn.ModuleList([
            FlowBlock(cfg, n, self.T, self.D, (side, side), flip=i % 2 == 1,
                      conditioned=(i == K - 1 or not cfg.cond_deep_only) and bool(cfg.num_classes or cfg.txt_dim))
            for i, n in enumerate(cfg.layers)])

    def patchify(self, x):  # (B, C, H, W) -> (B, T, p*p*C)
        B, C, H, W = x.shape
        p = self.cfg.patch_size
        if (C, H, W) != (self.C, self.S, self.S):
            raise ValueError(f"input of shape {(C, H, W)}, the model takes {(self.C, self.S, self.S)}")
        return x.view(B, C, H // p, p, W // p, p).permute(0, 2, 4, 3, 5, 1).reshape(B, self.T, self.D)

    def unpatchify(self, x):  # (B, T, p*p*C) -> (B, C, H, W)
        p, s = self.cfg.patch_size, self.S // self.cfg.patch_size
        return x.view(-1, s, s, p, p, self.C).permute(0, 5, 1, 3, 2, 4).reshape(-1, self.C, self.S, self.S)

    def make_cond(self, y=None, text=None, text_mask=None, null=None, batch: int | None = None) -> dict:
        """The conditioning dict every block takes; `null` marks samples given the null condition."""
        cfg = self.cfg
        B = batch or (y.shape[0] if y is not None else text.shape[0])
        dev = next(self.parameters()).device
        cond = {"null": torch.zeros(B, dtype=torch.bool, device=dev) if null is None else null}
        if cfg.txt_dim:
            if text is None or text.shape[1:] != (cfg.txt_len, cfg.txt_dim):
                raise ValueError(f"text embeddings must be (B, {cfg.txt_len}, {cfg.txt_dim}), got "
                                 f"{None if text is None else tuple(text.shape)}")
            cond["text"] = text
            cond["text_mask"] = torch.ones(text.shape[:2], dtype=torch.bool, device=dev) if text_mask is None \
                else text_mask.bool()
        elif cfg.num_classes:
            if y is None or y.min() < 0 or y.max() >= cfg.num_classes:
                raise ValueError(f"class labels must be in [0, {cfg.num_classes}), got "
                                 f"{None if y is None else (int(y.min()), int(y.max()))}")
            cond["y"] = y
        return cond

    def forward(self, x: torch.Tensor, cond: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, C, H, W) -> z (B, T, D), log|det| (B,) summed over blocks."""
        z, logdet = self.patchify(x), 0.0
        for block in self.blocks:
            z, ld = block(z, cond)
            logdet = logdet + ld
        return z, logdet

    def log_prob(self, x, cond) -> torch.Tensor:
        """Exact log density of x under the flow (B,), in nats, Gaussian prior included."""
        z, logdet = self(x, cond)
        return -0.5 * _fp32(z).square().sum((1, 2)) - 0.5 * math.log(2 * math.pi) * z[0].numel() + logdet


# ----------------------------------------------------------------------------------------------------------------------
# Loss


def nll_loss(model, x, cond, noise_std: float = 0.0) -> torch.Tensor:
    """TARFlow's objective: mean over dimensions of 0.5 z^2 - log|det| (up to the Gaussian constant).

    x: clean model-space inputs (pixels in [-1, 1], or scaled VAE latents); `noise_std` adds TARFlow's Gaussian noise
    augmentation x + sigma eps, which training needs (pass cfg.noise_std: the sampler's denoising step assumes it).
    cond: `model.make_cond(y, null=torch.rand(B) < cfg.label_drop)`, so the null branch of guidance is trained too."""
    if noise_std > 0:
        x = x + noise_std * torch.randn_like(x)
    z, logdet = model(x, cond)
    return 0.5 * _fp32(z).square().mean() - logdet.mean() / z[0].numel()


def bits_per_dim(nll_per_dim, pixels: bool):
    """Per-dimension NLL in nats (without the Gaussian constant) -> bits/dim. For pixels in [-1, 1] from 8 bits the
    density of the 0..255 scale adds log(127.5) per dimension."""
    nats = nll_per_dim + 0.5 * math.log(2 * math.pi) + (math.log(127.5) if pixels else 0.0)
    return nats / math.log(2)


# ----------------------------------------------------------------------------------------------------------------------
# Sampler


@torch.no_grad()
def sample(model: STARFlow, cond: dict, cfg: Config, generator=None, z: torch.Tensor | None = None
           ) -> tuple[torch.Tensor, int]:
    """Invert the stack: the deep block first (from the prior), then the shallow ones. Returns x in model space
    (B, C, H, W) and the number of sequential network evaluations."""
    B = cond["null"].shape[0]
    dev = next(model.parameters()).device
    if z is None:
        z = torch.randn(B, model.T, model.D, device=dev, generator=generator)
    chunk, iters = (cfg.jacobi_chunk, cfg.jacobi_max_iter) if cfg.sampler == "jacobi" else (1, 1)
    x, nfe = z, 0
    for i, block in reversed(list(enumerate(model.blocks))):
        w = cfg.guidance if (i == len(model.blocks) - 1 or cfg.guide_all_blocks) else 0.0
        x, n = block.reverse(x, cond, w, cfg.guidance_rule, cfg.guide_what, cfg.guidance_anneal, chunk, iters,
                             cfg.jacobi_threshold)
        nfe += n
    x = model.unpatchify(x)
    if cfg.denoise and cfg.noise_std > 0:
        x = denoise(model, x, cond, cfg.noise_std)
    return x, nfe


def denoise(model: STARFlow, x: torch.Tensor, cond: dict, sigma: float) -> torch.Tensor:
    """TARFlow's denoising, Tweedie's formula with the flow's own score: E[x_clean | x] = x + sigma^2 grad log p(x)."""
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        (score,) = torch.autograd.grad(model.log_prob(x, cond).sum(), x)
    return (x + sigma ** 2 * score).detach()


# ----------------------------------------------------------------------------------------------------------------------
# Data, VAE and evaluation


def load_vae(cfg: Config, device):
    if cfg.vae_family == "none" and not cfg.vae:
        return None
    if not cfg.vae:
        raise ValueError(f"--vae_family {cfg.vae_family} needs --vae PATH to the VAE weights")
    path = common.digits_vae(cfg.img_size) if cfg.vae == "digits" else cfg.vae  # trained once, about a minute
    return common.load_vae(path, family=cfg.vae_family, device=device).eval()


def latent_shape(cfg: Config, vae=None) -> tuple[int, int]:
    """(channels, side) of what the flow models: pixels, or the VAE latents (the family's f8 when no VAE is loaded,
    e.g. when training on precomputed latents)."""
    if cfg.vae_family == "none":
        return cfg.channels, cfg.img_size
    down, ch = (vae.downsample, vae.latent_channels) if vae is not None else \
        {"sd": (8, 4), "sdxl": (8, 4), "flux": (8, 16)}[cfg.vae_family]
    if cfg.img_size % down:
        raise ValueError(f"img_size {cfg.img_size} is not divisible by the VAE's downsampling {down}")
    return ch, cfg.img_size // down


def load_data(cfg: Config, split: str = "train"):
    """A Dataset of (image uint8 (C, H, W) or latent float (c, h, w), label[, text, text_mask])."""
    if cfg.data == "digits":
        if cfg.channels != 1:
            raise ValueError(f"digits have 1 channel, the config says {cfg.channels}")
        x, y = common.load_digits(split, cfg.img_size)
        return common.ArrayDataset(x, y)
    path = Path(cfg.data)
    if path.is_dir() and (path / "latents.npy").exists():  # precomputed latents (memory-mapped)
        a = common.load_arrays(path, ("latents", "labels"))
        return common.ArrayDataset(a["latents"], a.get("labels", np.zeros(len(a["latents"]), dtype=np.int64)))
    if path.is_dir():
        return common.ImageFolder(path, cfg.img_size)
    a = common.load_arrays(path, ("images", "labels", "text", "text_mask"))
    images = a["images"]
    if images.dtype != np.uint8:  # float arrays would pass for latents downstream: say so instead
        raise ValueError(f"{path}: images must be uint8 (N, H, W, C), got {images.dtype} (precomputed latents go in "
                         f"a latent folder: see --precompute)")
    if images.ndim != 4 or images.shape[1:] != (cfg.img_size, cfg.img_size, cfg.channels):
        raise ValueError(f"{path}: images must be (N, {cfg.img_size}, {cfg.img_size}, {cfg.channels}) uint8, got "
                         f"{images.shape}")
    arrays = [np.ascontiguousarray(images.transpose(0, 3, 1, 2)), a.get("labels", np.zeros(len(images), np.int64))]
    if cfg.txt_dim:
        arrays += [a["text"].astype(np.float32), a["text_mask"].astype(bool)]
    return common.ArrayDataset(*arrays)


def _loader(data, start: int, count: int, bs: int, workers: int = 0):
    """Batches of data[start:start+count] in order (this rank's share of an evaluation)."""
    part = torch.utils.data.Subset(data, range(start, start + count))
    return torch.utils.data.DataLoader(part, batch_size=bs, num_workers=workers)


def to_model_space(batch_x: torch.Tensor, vae) -> torch.Tensor:
    """uint8 images -> [-1, 1] (pixel space) or VAE latents; float inputs are precomputed latents already."""
    if batch_x.dtype != torch.uint8:
        return batch_x.float()
    x = common.to_float(batch_x)
    return x if vae is None else vae.encode(x)


def batch_cond(model: STARFlow, batch, drop: float = 0.0) -> dict:
    cfg = model.cfg
    y = batch[1].long() if cfg.num_classes else None
    text, text_mask = (batch[2], batch[3]) if cfg.txt_dim else (None, None)
    B = batch[0].shape[0]
    null = torch.rand(B, device=batch[0].device) < drop
    return model.make_cond(y, text, text_mask, null, batch=B)


@torch.no_grad()
def heldout_bpd(model: STARFlow, cfg: Config, data, vae, d: common.Dist, dequantize: bool, n_max: int = 2000,
                bs: int = 256) -> float:
    """Bits/dim on held-out data. Pixels: with uniform dequantisation, x = (u + U[0,1)) / 128 - 1 -- a proper bound
    on the discrete likelihood (as ml-tarflow's evaluate_bpd.py); else with the training noise."""
    g = torch.Generator(device="cpu").manual_seed(1234)
    start, count = common.rank_split(min(len(data), n_max), d)
    tot = torch.zeros(2, device=d.device)
    for batch in _loader(data, start, count, bs, cfg.num_workers):
        batch = [t.to(d.device) for t in batch]
        if dequantize:
            u = batch[0].float()
            x = (u + torch.rand(u.shape, generator=g).to(d.device)) / 128.0 - 1
            extra = math.log(128.0)
        else:
            x = to_model_space(batch[0], vae)
            x = x + cfg.noise_std * torch.randn(x.shape, generator=g).to(d.device)
            extra = math.log(127.5) if vae is None else 0.0
        cond = batch_cond(model, batch)
        nll = -model.log_prob(x, cond) / x[0].numel() + extra  # nats/dim, per sample
        tot += torch.stack([nll.sum(), torch.tensor(float(len(nll)), device=d.device)])
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(tot)
    return (tot[0] / tot[1]).item() / math.log(2)


@torch.no_grad()
def generate(model, cfg: Config, labels: torch.Tensor, vae, seed: int, text=None, text_mask=None, bs: int = 256):
    """Samples as uint8 (N, C, H, W) for the given labels (or captions), in batches; returns (images, nfe)."""
    dev = next(model.parameters()).device
    g = torch.Generator(device=dev).manual_seed(seed)
    out, nfe = [], 0
    for i in range(0, len(labels), bs):
        sl = slice(i, i + bs)
        cond = model.make_cond(labels[sl].to(dev) if cfg.num_classes else None,
                               None if text is None else text[sl].to(dev),
                               None if text_mask is None else text_mask[sl].to(dev), batch=len(labels[sl]))
        x, nfe = sample(model, cond, cfg, generator=g)
        x = x if vae is None else vae.decode(x)
        out.append(common.to_uint8(x).cpu())
    return torch.cat(out), nfe


def evaluate(model, cfg: Config, vae, d: common.Dist, n_samples: int = 500) -> dict:
    """Held-out bits/dim (+ dequantised for pixels); on digits also classifier accuracy and Frechet distance of
    class-conditional samples, with the configured guidance and without."""
    model.eval()
    test = load_data(cfg, "test") if cfg.data == "digits" else load_data(cfg)
    out = {"bpd": heldout_bpd(model, cfg, test, vae, d, dequantize=False)}
    if vae is None and cfg.data != "latents":
        out["bpd_dequantized"] = heldout_bpd(model, cfg, test, vae, d, dequantize=True)
    if cfg.data == "digits" and cfg.num_classes:
        start, count = common.rank_split(n_samples, d)
        labels = torch.arange(start, start + count) % cfg.num_classes
        for name, w in (("guided", cfg.guidance), ("unguided", 0.0)):
            c = dataclasses.replace(cfg, guidance=w)
            imgs, nfe = generate(model, c, labels, vae, seed=cfg.seed + 7 + d.rank)
            imgs, labs = _gather(imgs, d), _gather(labels, d)
            if d.is_main:
                m = common.digits_metrics(imgs, labs)
                out.update({f"{k}_{name}": v for k, v in m.items() if k != "fd_floor"}, fd_floor=m["fd_floor"])
                out[f"nfe_{name}"] = nfe
    model.train()
    return out


def _gather(t: torch.Tensor, d: common.Dist) -> torch.Tensor:
    if not d.distributed:
        return t
    parts = [None] * d.world_size
    torch.distributed.all_gather_object(parts, t.cpu())
    return torch.cat(parts)


# ----------------------------------------------------------------------------------------------------------------------
# Trainer


def build(cfg: Config, device) -> tuple[STARFlow, object]:
    vae = load_vae(cfg, device)
    return STARFlow(cfg, *latent_shape(cfg, vae)).to(device), vae


def precompute_latents(cfg: Config, src: str, d: common.Dist):
    """Encode an image folder (or .npz) through the VAE once: <cfg.data>/latents.npy (N, c, h, w) + labels.npy."""
    vae = load_vae(cfg, d.device)
    if vae is None:
        raise ValueError("--precompute needs --vae and --vae_family")
    data = load_data(Config(**{**cfg.__dict__, "data": src}))
    out = Path(cfg.data)
    out.mkdir(parents=True, exist_ok=True)
    start, count = common.rank_split(len(data), d)
    lat, lab = [], []
    for xb, yb, *_ in common.progress(_loader(data, start, count, 64, cfg.num_workers), desc="encoding"):
        lat.append(vae.encode(common.to_float(xb.to(d.device))).half().cpu())
        lab.append(yb)
    common.save_npz(out / "latents.npz", d, latents=torch.cat(lat).numpy(), labels=torch.cat(lab).numpy())
    if d.is_main:
        with np.load(out / "latents.npz") as z:
            np.save(out / "latents.npy", z["latents"])
            np.save(out / "labels.npy", z["labels"])
        (out / "latents.npz").unlink()
        common.print0(f"wrote {out}/latents.npy and labels.npy")


def from_checkpoint(path: str, device="cpu", **overrides) -> tuple[STARFlow, Config]:
    """A trained model ready to sample (EMA weights, eval mode) and its config; `overrides` may change run-time fields
    (sampler, guidance, ...). `model.vae` is the VAE of a latent model (None in pixel space); it is kept out of the
    module tree, so the flow's state dict stays the flow's."""
    state = common.load_checkpoint(path)
    cfg = common.config_from_checkpoint(Config, state, overrides, what=str(path))
    model, vae = build(cfg, device)
    model.__dict__["vae"] = vae
    return common.load_weights(model, state).eval(), cfg


def main(argv=None):
    def extra(p):
        p.add_argument("--precompute", metavar="IMAGES", default=None,
                       help="encode IMAGES (folder or .npz) through --vae into the latent folder --data")
        p.add_argument("--captions", metavar="NPZ", default=None,
                       help="text embeddings (`text`, `text_mask`) to --sample a text-conditional model from")
    cfg, args, overrides = common.parse_config(Config, PRESETS, argv, extra=extra, doc=__doc__)
    if args.plot:
        return common.print0(f"wrote {common.plot_log(args.plot)}")
    d = common.setup_distributed(cfg.device)
    ckpt = args.ckpt or str(Path(cfg.out_dir) / "ckpt.pt")

    if args.precompute:
        return precompute_latents(cfg, args.precompute, d)

    if args.sample or args.eval:
        model, cfg = from_checkpoint(ckpt, d.device, **overrides)
        vae = model.vae
        if args.eval:
            res = evaluate(model, cfg, vae, d)
            common.print0(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in res.items()}))
            return
        start, count = common.rank_split(args.n, d)
        labels = torch.arange(start, start + count) % max(cfg.num_classes, 1)
        text = mask = None
        if cfg.txt_dim:
            if not args.captions:
                raise ValueError("a text-conditional model samples from --captions NPZ (text, text_mask)")
            cap = common.load_arrays(args.captions, ("text", "text_mask"))
            idx = torch.arange(start, start + count) % len(cap["text"])  # captions repeat when n exceeds them
            text, mask = (torch.as_tensor(cap[k][idx.numpy()]) for k in ("text", "text_mask"))
            text = text.float()
        imgs, nfe = generate(model, cfg, labels, vae, seed=cfg.seed + 1000 + d.rank, text=text, text_mask=mask)
        common.save_npz(args.out, d, images=imgs.permute(0, 2, 3, 1).numpy(), labels=labels.numpy())
        if d.is_main:  # and a look at the first ones
            common.save_png(Path(args.out).with_suffix(".png"), common.image_grid(imgs[:100], nrow=10))
        common.print0(f"wrote {args.n} samples to {args.out} and a grid to {Path(args.out).with_suffix('.png')} "
                      f"({nfe} sequential network evaluations per batch)")
        return

    common.seed_all(cfg.seed)  # the same initial weights on every rank
    model, vae = build(cfg, d.device)
    data = load_data(cfg)
    n_params = sum(p.numel() for p in model.parameters())
    common.print0(f"STARFlow ({cfg.param}) with {n_params / 1e6:.2f}M parameters, {model.T} tokens of {model.D} dims, "
                  f"blocks {cfg.layers}")

    def loss_fn(net, batch):
        x = to_model_space(batch[0], vae)
        loss = nll_loss(net, x, batch_cond(model, batch, cfg.label_drop), cfg.noise_std)
        return loss, {"bpd": bits_per_dim(loss.detach(), vae is None)}

    def on_eval(step, model, ema):
        with ema.swap(model), common.full_params(model):
            res = evaluate(model, cfg, vae, d, n_samples=200)
            labels = torch.arange(100) % max(cfg.num_classes, 1)
            imgs, _ = generate(model, cfg, labels[:100], vae, seed=0)
        if d.is_main:
            zoom = max(1, 64 // imgs.shape[-1])  # tiny images: enlarge the grid so it can be looked at
            imgs = imgs.repeat_interleave(zoom, -1).repeat_interleave(zoom, -2)
            common.save_png(Path(cfg.out_dir) / "samples.png", common.image_grid(imgs, nrow=10, pad=2))
        common.print0(f"step {step}: " + ", ".join(f"{k} {v:.4g}" for k, v in res.items()))
        return res

    common.train(cfg, model, loss_fn, data, d, resume=ckpt if args.resume else None, overwrite=args.overwrite,
                 evaluate=on_eval)
    out = Path(cfg.out_dir)
    common.print0("done: " + common.existing(out / "ckpt.pt", out / "samples.png", out / "log.jsonl"))


if __name__ == "__main__":
    common.run(main)
