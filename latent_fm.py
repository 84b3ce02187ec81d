"""
latent_fm.py -- Flow Matching in Latent Space (LFM): a DiT velocity field in the latent space of a frozen VAE, with
class, inpainting and semantic-map conditions, classifier-free and ratio-aware adaptive guidance, in one file.

Papers
  "Flow Matching in Latent Space", Q. Dao, H. Phung, B. Nguyen, A. Tran, 2023, https://arxiv.org/abs/2307.08698
  (official code: github.com/VinAIResearch/LFM, read for the facts cited below)
  "RAAG: Ratio Aware Adaptive Guidance", S. Zhu et al., 2025, https://arxiv.org/abs/2508.03442
  The backbone is DiT: "Scalable Diffusion Models with Transformers", W. Peebles, S. Xie, 2023,
  https://arxiv.org/abs/2212.09748

The method. Images x are encoded once by a frozen VAE, z0 ~ q(z | x) (a posterior sample, scaled to unit variance,
e.g. SD-VAE f8 latents x 0.18215). LFM's path runs from data at t = 0 to noise at t = 1:

    z_t = (1 - t) z0 + (sigma_min + (1 - sigma_min) t) eps,   u = dz_t/dt = (1 - sigma_min) eps - z0,
    L = E_{t ~ U(0,1), eps ~ N(0, I)} |v(z_t, t | c) - u|^2,   sigma_min = 1e-5,

and sampling integrates dz/dt = v from t = 1 (z1 ~ N(0, I)) to t = 0 (Euler, Heun, or adaptive Dormand-Prince 5(4)
with atol = rtol = 1e-5 as the paper), then decodes. Conditions (--condition):
  class     a label embedding added to the time embedding, with a null label (dropped with p = 0.1 in training) for
            classifier-free guidance v = v_u + s (v_c - v_u) over all channels (cond and null in one batched forward);
            or RAAG (--guidance_rule raag): per step rho = |v_c - v_u| / |v_u| (per sample, or over the batch as the
            authors' code does), w = 1 + (w_max - 1) exp(-alpha rho), v = v_u + w (v_c - v_u);
  inpaint   the VAE latent of the masked image (hole = black) and the mask on the latent grid in [-1, 1] (1 = fill),
            concatenated with z_t (4 + 4 + 1 = 9 input channels for SD latents); random box / free-form masks;
  semantic  a one-hot segmentation map through a SpatialRescaler (log2(f) bilinear halvings -- three for f8 -- and a
            1x1 conv to the latent channels), trained jointly with the DiT, concatenated with z_t.
On the digits the segmentation map is derived from the image itself (`digit_segmentation`): 0 = background reachable
from the border, 1 = ink (intensity >= 50%), 2 = background enclosed by ink (the loops of 0, 6, 8, 9 and some 4s).

Run
    python latent_fm.py                                   # CPU demo: class-conditional digits in a VAE's latent space
    python latent_fm.py --preset digits-inpaint           # inpainting of 16x16 digits (center box at evaluation)
    python latent_fm.py --preset digits-semantic          # digits from their segmentation maps
    python latent_fm.py --eval --ckpt out/latent_fm/ckpt.pt                      # held-out LFM loss, accuracy, FD, NFE
    python latent_fm.py --sample --ckpt out/latent_fm/ckpt.pt --n 100 --out s.npz --guidance_rule raag --sampler euler
    python latent_fm.py --preset imagenet256 --precompute /data/imagenet/train --data latents/ --vae sd-vae-ft-mse/
    torchrun --nproc_per_node=8 latent_fm.py --preset imagenet256 --data latents/ --vae sd-vae-ft-mse/
    torchrun --nproc_per_node=2 latent_fm.py --preset celebahq256-inpaint --data celebahq256.npz --vae sd-vae-ft-mse/
    python latent_fm.py --preset celebahq256 --dry_run --gpus 8          # paper scale on the meta device: one JSON line
Released checkpoints (VinAIResearch/LFM's DiTs, model_{epoch}.pth; `from_official`), e.g. ImageNet DiT-B/2:
    python latent_fm.py --sample --ckpt model_875.pth --vae sd-vae-ft-mse/ --n 50000 --out imnet.npz  # dopri5, CFG 1.5
Inpainting and semantic models sample from `--cond NPZ` (`images` (N,H,W,C) uint8 + `masks` (N,H,W), 1 = fill; or
`segmentation` (N,H,W) int); on the digits the test split is the default condition.
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
from torch.utils.checkpoint import checkpoint

try:  # installed, this file is flowzoo.<name> beside flowzoo.common; run or copied, common.py sits next to it
    from . import common
except ImportError:
    import common

SIGMA_MIN = 1e-5  # LFM's sigma_min (train_flow_latent.py:149-150)
DIT_SIZES = {"S": (384, 12, 6), "B": (768, 12, 12), "L": (1024, 24, 16), "XL": (1152, 28, 16)}  # width, depth, heads
ARCHS = tuple(f"{s}/{p}" for s in DIT_SIZES for p in (2, 4, 8))  # DiT-S/2 ... DiT-XL/8 (models/DiT.py:354-399)


# ----------------------------------------------------------------------------------------------------------------------
# Config


@dataclass
class Config(common.TrainConfig):
    # data
    data: str = "digits"  # digits | image folder (flat or class subfolders) | .npz: images (N,H,W,C) uint8 [labels segmentation] | --precompute'd latent folder
    img_size: int = common.opt(16, min=1)  # image side in pixels (read from --data unless given)
    channels: int = common.opt(1, min=1)  # image channels (read from --data unless given)
    vae: str = ""  # VAE weights (diffusers folder or single file); empty on the digits = common.digits_vae
    vae_family: str = common.opt("sd", choices=tuple(common.VAE_FAMILIES))  # latent scaling; none = pixel space
    # condition
    condition: str = common.opt("class", choices=("none", "class", "inpaint", "semantic"))  # the flow's condition
    num_classes: int = common.opt(10, min=1)  # classes of --condition class (label num_classes is the null label)
    label_drop: float = common.opt(0.1, max=1)  # probability of the null label in training (classifier-free guidance)
    seg_classes: int = common.opt(3, min=2)  # classes of the one-hot segmentation map (--condition semantic)
    mask: str = common.opt("mixed", choices=("box", "free", "mixed", "lfm"))  # training masks of --condition inpaint
    hflip: bool = False  # random horizontal flips of the training images (and of their --precompute'd latents)
    # model
    arch: str = common.opt("", choices=("",) + ARCHS)  # DiT size, e.g. L/2: sets width, depth, heads, patch_size
    width: int = common.opt(128, min=8)  # transformer width
    depth: int = common.opt(6, min=1)  # DiT blocks
    heads: int = common.opt(4, min=1)  # attention heads
    patch_size: int = common.opt(2, min=1)  # patch side on the latent grid (tokens = (latent side / patch)^2)
    mlp_ratio: float = common.opt(4.0, gt=0)  # MLP hidden width / width
    time_scale: float = common.opt(1000.0, gt=0)  # t x this before the sinusoids: DiT's range; LFM's DiT feeds t (1)
    pos_order: str = common.opt("hw", choices=("hw", "wh"))  # first half of the 2D positions: row (hw) | column (wh)
    grad_ckpt: bool = False  # gradient checkpointing of the DiT blocks
    min_lr: float = 1e-5  # where the cosine schedule ends (LFM's eta_min); --lr_schedule constant is LFM's --no_lr_decay
    # sampler
    sampler: str = common.opt("heun", choices=("euler", "heun", "dopri5"))  # ODE solver from t = 1 to t = 0
    sample_steps: int = common.opt(16, min=1)  # steps of euler / heun
    atol: float = common.opt(1e-5, gt=0)  # dopri5 absolute tolerance
    rtol: float = common.opt(1e-5, gt=0)  # dopri5 relative tolerance
    guidance: float = 1.0  # CFG scale s in v = v_u + s (v_c - v_u): 1 = conditional, 0 = unconditional
    guidance_rule: str = common.opt("cfg", choices=("cfg", "raag"))  # cfg (fixed --guidance) | raag (ratio-adaptive w)
    raag_w_max: float = common.opt(18.0, min=1)  # RAAG's w_max: the scale where the cond/uncond ratio is small
    raag_alpha: float = 12.0  # RAAG's alpha: how fast w falls to 1 as the ratio grows
    raag_ratio: str = common.opt("sample", choices=("sample", "batch"))  # RAAG's ratio per sample | over the batch
    eval_n: int = common.opt(1000, min=10)  # samples for --eval and the end-of-training evaluation (digits)

    NAME = "latent_fm"
    LEGACY = {"time_scale": 1000.0, "pos_order": "hw"}  # model fields of checkpoints from before they existed
    RUNTIME = ("data", "vae", "label_drop", "mask", "hflip", "grad_ckpt", "min_lr", "sampler", "sample_steps", "atol",
               "rtol",
               "guidance", "guidance_rule", "raag_w_max", "raag_alpha", "raag_ratio", "eval_n")

    def __post_init__(self):
        super().__post_init__()
        if self.arch:  # a named size owns these four fields: a differing explicit one is a contradiction
            size, p = self.arch.split("/")
            named = dict(zip(("width", "depth", "heads", "patch_size"), (*DIT_SIZES[size], int(p))))
            for k, v in named.items():
                if getattr(self, k) not in (v, Config.__dataclass_fields__[k].default):
                    raise ValueError(f"--arch {self.arch} sets --{k} {v}, not {getattr(self, k)}: drop one of them")
                setattr(self, k, v)
        if self.width % self.heads or self.width % 4:
            raise ValueError(f"--width {self.width} must be divisible by 4 and by --heads {self.heads}")
        if self.condition != "class" and (self.guidance != 1.0 or self.guidance_rule != "cfg"):
            raise ValueError(f"--guidance {self.guidance} / --guidance_rule {self.guidance_rule} need --condition "
                             f"class, this is {self.condition}: pass --guidance 1 (or a preset of {self.condition})")


_DIGITS = dict(img_size=16, channels=1, vae_family="sd", width=96, depth=4, heads=4, patch_size=2, batch_size=64,
               lr=1e-3, warmup=100, weight_decay=0.0, beta2=0.999, min_lr=1e-5, ema_decay=0.999, log_every=50,
               ckpt_every=500, sample_steps=16, sampler="heun")
# The paper-scale runs (bash_scripts/run.sh, downstream_tasks/readme.md): AdamW with torch's default betas
# (0.9, 0.999) and weight decay 0, no gradient clipping, no warmup, and no --use_ema in the DiT commands (ema_decay 0).
# Precision departs: the official runs are fp32 with TF32 matmuls (train_flow_latent.py:28-29,56); these presets keep
# the trainer's bf16 autocast (--amp, the TrainConfig default; --no-amp gives fp32).
_PAPER = dict(channels=3, img_size=256, vae_family="sd", weight_decay=0.0, beta2=0.999, grad_clip=0.0, warmup=0,
              ema_decay=0.0, log_every=100, eval_every=20000, ckpt_every=5000, sampler="dopri5", eval_n=2000)
PRESETS = {
    # CPU demo: 16x16 digits through the small digits VAE (4x8x8 latents, trained once, cached), 16 tokens of 2x2.
    "digits": dict(_DIGITS, condition="class", steps=2500, eval_every=2500, guidance=1.5),
    # The same model inpainting: random box / free-form masks in training, the center box at evaluation; twice the
    # steps of the others (filling the box's middle keeps improving: class accuracy 0.46 at 2500 steps, 0.67 at 5000).
    "digits-inpaint": dict(_DIGITS, condition="inpaint", steps=5000, eval_every=5000),
    # Digits from the derived 3-class segmentation map (background / ink / enclosed background).
    "digits-semantic": dict(_DIGITS, condition="semantic", seg_classes=3, steps=2500, eval_every=2500),
    # CelebA-HQ 256, DiT-L/2, batch 32, lr 2e-4, --no_lr_decay, unconditional (bash_scripts/run.sh:55-62); sampled with
    # dopri5 (test_args/celeb256_dit.txt:5). NVAE's CelebA-HQ split has 27,000 training images
    # (datasets_prep/lmdb_datasets.py:18-19), 843 full batches of 32: 500 epochs = 421,500 steps; random horizontal
    # flips (datasets_prep/__init__.py:67-76).
    "celebahq256": dict(_PAPER, data="celebahq256.npz", condition="none", arch="L/2", batch_size=32, lr=2e-4,
                        lr_schedule="constant", steps=421_500, hflip=True),
    # ImageNet 256, DiT-B/2, 8 processes x batch 160, lr 1e-4, --no_lr_decay, label dropout 0.1, gradient checkpointing
    # (bash_scripts/run.sh:43-51); CFG 1.5 with dopri5 at the released epoch 875 (test_args/imnet_dit.txt:2,5,7):
    # 875 epochs of 1.28M images at batch 1280 = 875k steps; center crop and random flips (datasets_prep/__init__.py:
    # 25-37). Train on latents from --precompute (with --hflip: the mirrored images' latents too).
    "imagenet256": dict(_PAPER, data="latents", condition="class", num_classes=1000, label_drop=0.1, arch="B/2",
                        batch_size=1280, lr=1e-4, lr_schedule="constant", grad_ckpt=True, steps=875_000, guidance=1.5,
                        hflip=True),
    # CelebA-HQ 256 inpainting: 64 per GPU on 2 GPUs (global batch 128), lr 5e-5, 500 epochs, cosine to eta_min 1e-5
    # (downstream_tasks/readme.md:21-24, train_flow_latent_inpainting.py:81,111); MAT's 24,183 training images ->
    # 188 batches an epoch, 94,000 steps; LaMa's mixed masks as LFM draws them (--mask lfm, datasets_prep/__init__.py:
    # 117-122), no flips (inpainting_dataset.py:20-34). The official model is the ADM U-Net (9 in, 4 out channels);
    # here it is the DiT-L/2 of the celebahq256 preset with 9 input channels.
    "celebahq256-inpaint": dict(_PAPER, data="celebahq256.npz", condition="inpaint", mask="lfm", arch="L/2",
                                batch_size=128, lr=5e-5, lr_schedule="cosine", min_lr=1e-5, steps=94_000),
    # CelebAMask-HQ 256 semantic synthesis: 19-class maps (train_flow_latent_semantic_syn.py:97-99) through the
    # SpatialRescaler (3 halvings, 4 channels, :119), 64 per GPU on 2 GPUs, lr 5e-5, 175 epochs, cosine to 1e-5
    # (downstream_tasks/readme.md:33-36, :137); the first 27,000 images (readme.md:7; celeb_mask.py:18) -> 210 batches
    # an epoch, 36,750 steps; no flips (celeb_mask.py). Official model: the ADM U-Net; here DiT-L/2. The .npz holds
    # `images` and `segmentation` (N, 256, 256) in 0..18.
    "celebahq256-semantic": dict(_PAPER, data="celebamask256.npz", condition="semantic", seg_classes=19, arch="L/2",
                                 batch_size=128, lr=5e-5, lr_schedule="cosine", min_lr=1e-5, steps=36_750),
}


# ----------------------------------------------------------------------------------------------------------------------
# Model: DiT with adaLN-Zero (Peebles & Xie 2023, Sec. 3.2), and the SpatialRescaler of semantic maps


def sincos_2d(width: int, side: int, order: str = "hw") -> torch.Tensor:
    """Fixed 2D sin-cos positions (side^2, width): half the channels encode the row, half the column; `order` says
    which half comes first (LFM's DiT, after MAE, puts the column first: "wh", models/DiT.py:307)."""
    def axis(pos, d):  # (n,) -> (n, d)
        omega = 1.0 / 10000 ** (torch.arange(d // 2, dtype=torch.float64) / (d / 2))
        a = pos[:, None] * omega[None]
        return torch.cat([a.sin(), a.cos()], 1)
    r, c = torch.meshgrid(torch.arange(side, dtype=torch.float64), torch.arange(side, dtype=torch.float64),
                          indexing="ij")
    halves = [axis(r.flatten(), width // 2), axis(c.flatten(), width // 2)]
    return torch.cat(halves if order == "hw" else halves[::-1], 1).float()


def timestep_embedding(t: torch.Tensor, dim: int = 256, scale: float = 1000.0) -> torch.Tensor:
    """(B,) times in [0, 1] -> (B, dim) sinusoids of scale * t. DiT's 1000 lets the frequencies 1 .. 1e-4 resolve the
    whole interval; LFM's own DiT feeds t in [0, 1] as is (scale 1, models/DiT.py:58), which its weights expect."""
    freqs = torch.exp(-math.log(10000) * torch.arange(dim // 2, device=t.device, dtype=torch.float32) / (dim // 2))
    a = scale * t.float()[:, None] * freqs
    return torch.cat([a.cos(), a.sin()], -1)


def modulate(x, shift, scale):
    return x * (1 + scale) + shift


class DiTBlock(nn.Module):
    """x + gate * attn(adaLN(x)), then x + gate * MLP(adaLN(x)); the six (shift, scale, gate) come from the condition
    c and start at zero (adaLN-Zero), so every block starts as the identity."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = common.Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim))
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x, c):  # x (B, T, W), c (B, W)
        sh1, sc1, g1, sh2, sc2, g2 = self.ada(c)[:, None].chunk(6, -1)  # each (B, 1, W)
        x = x + g1 * self.attn(modulate(self.norm1(x), sh1, sc1))
        return x + g2 * self.mlp(modulate(self.norm2(x), sh2, sc2))


class DiT(nn.Module):
    """Patchify (a p x p conv), + fixed 2D sin-cos positions, DiT blocks conditioned on c = emb(t) [+ emb(y)], an
    adaLN final layer, unpatchify. Spatial conditions arrive as extra input channels; the output has `out_ch`."""

    def __init__(self, cfg: Config, in_ch: int, out_ch: int, side: int, num_labels: int):
        super().__init__()
        W, p = cfg.width, cfg.patch_size
        self.p, self.out_ch, self.grad_ckpt, self.time_scale = p, out_ch, cfg.grad_ckpt, cfg.time_scale
        self.x_embed = nn.Conv2d(in_ch, W, p, stride=p)
        self.register_buffer("pos", sincos_2d(W, side // p, cfg.pos_order), persistent=False)  # (T, W)
        self.t_embed = nn.Sequential(nn.Linear(256, W), nn.SiLU(), nn.Linear(W, W))
        self.y_embed = nn.Embedding(num_labels, W) if num_labels else None  # the classes + the null label
        self.blocks = nn.ModuleList([DiTBlock(W, cfg.heads, cfg.mlp_ratio) for _ in range(cfg.depth)])
        self.norm_out = nn.LayerNorm(W, elementwise_affine=False, eps=1e-6)
        self.ada_out = nn.Sequential(nn.SiLU(), nn.Linear(W, 2 * W))
        self.linear_out = nn.Linear(W, p * p * out_ch)
        # DiT's init: xavier linears (the patch conv as a linear), N(0, 0.02) embeddings, zero adaLN and output
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.xavier_uniform_(self.x_embed.weight.view(W, -1))
        nn.init.zeros_(self.x_embed.bias)
        for lin in (self.t_embed[0], self.t_embed[2]):
            nn.init.normal_(lin.weight, std=0.02)
        if self.y_embed is not None:
            nn.init.normal_(self.y_embed.weight, std=0.02)
        for lin in [b.ada[-1] for b in self.blocks] + [self.ada_out[-1], self.linear_out]:
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)

    def forward(self, x, t, y=None):  # x (B, in_ch, h, w), t (B,), y (B,) or None -> (B, out_ch, h, w)
        B, _, h, w = x.shape
        x = x.to(self.x_embed.weight.dtype)  # bf16 weights (FSDP2's policy) take bf16 inputs
        tok = self.x_embed(x).flatten(2).transpose(1, 2) + self.pos.to(x.dtype)  # (B, T, W)
        c = self.t_embed(timestep_embedding(t, scale=self.time_scale).to(tok.dtype))
        if self.y_embed is not None:
            c = c + self.y_embed(y)
        for blk in self.blocks:
            if self.grad_ckpt and self.training:
                tok = checkpoint(blk, tok, c, use_reentrant=False)
            else:
                tok = blk(tok, c)
        sh, sc = self.ada_out(c)[:, None].chunk(2, -1)
        out = self.linear_out(modulate(self.norm_out(tok), sh, sc))  # (B, T, p*p*out_ch)
        p = self.p
        out = out.view(B, h // p, w // p, p, p, self.out_ch).permute(0, 5, 1, 3, 2, 4)
        return out.reshape(B, self.out_ch, h, w)


class SpatialRescaler(nn.Module):
    """One-hot map (B, K, H, W) -> (B, c, H/f, W/f): `stages` bilinear halvings, then a bias-free 1x1 conv (LFM's
    cond_stage_model, train_flow_latent_semantic_syn.py:119). The official loop computes it under torch.no_grad(), so
    its conv never learns (line 181); the paper trains it jointly, and so do we."""

    def __init__(self, classes: int, out_ch: int, stages: int):
        super().__init__()
        self.stages = stages
        self.conv = nn.Conv2d(classes, out_ch, 1, bias=False)

    def forward(self, seg):
        for _ in range(self.stages):
            seg = F.interpolate(seg, scale_factor=0.5, mode="bilinear")
        return self.conv(seg)


class LatentFlow(nn.Module):
    """The velocity field v(z_t, t | condition) on latents (C, S, S) of a VAE with downsampling f."""

    def __init__(self, cfg: Config, C: int, S: int, f: int):
        super().__init__()
        if S % cfg.patch_size:
            raise ValueError(f"the latent side {S} (--img_size {cfg.img_size} / VAE downsampling {f}) is not divisible "
                             f"by --patch_size {cfg.patch_size}")
        self.cfg, self.C, self.S, self.f = cfg, C, S, f
        extra = {"inpaint": C + 1, "semantic": C}.get(cfg.condition, 0)  # spatial condition channels
        self.rescaler = SpatialRescaler(cfg.seg_classes, C, int(math.log2(f))) if cfg.condition == "semantic" else None
        self.dit = DiT(cfg, C + extra, C, S, cfg.num_classes + 1 if cfg.condition == "class" else 0)

    def forward(self, z, t, y=None, spatial=None):
        """z (B, C, S, S), t (B,); y (B,) labels for `class` (num_classes = null); spatial: the inpainting condition
        (B, C + 1, S, S) from `inpaint_condition`, or a one-hot segmentation map (B, K, H, W) for `semantic`."""
        if self.rescaler is not None:
            spatial = self.rescaler(spatial.to(self.rescaler.conv.weight.dtype))
        if spatial is not None:
            z = torch.cat([z, spatial.to(z.dtype)], 1)
        return self.dit(z, t, y)

    def check_labels(self, y: torch.Tensor):
        if y.dtype not in (torch.int32, torch.int64) or (len(y) and not 0 <= int(y.min()) <= int(y.max()) <
                                                         self.cfg.num_classes):
            raise ValueError(f"class labels must be integers in [0, {self.cfg.num_classes}), got "
                             f"{y.min().item()}..{y.max().item()}")


# ----------------------------------------------------------------------------------------------------------------------
# Conditions: masks, the digits' segmentation map, and what the network is fed


def random_masks(n: int, size: int, kind: str = "mixed", generator=None, device=None) -> torch.Tensor:
    """(n, 1, size, size) float, 1 = region to fill. box: a rectangle of sides 1/4..3/4 of the image; free: three thick
    strokes (segments of radius 6-14% of the side, rasterised by their distance to each pixel); mixed: either, 50/50."""
    def u(*s):
        return torch.rand(*s, generator=generator, device=device)
    px = torch.arange(size, device=device) + 0.5  # pixel centres
    side = (0.25 + 0.5 * u(n, 2)) * size
    lo = u(n, 2) * (size - side)
    inside = (px >= lo[..., None]) & (px < (lo + side)[..., None])  # (n, 2, size): rows, columns
    box = inside[:, 0, :, None] & inside[:, 1, None, :]
    a, b, r = u(n, 3, 2) * size, u(n, 3, 2) * size, (0.06 + 0.08 * u(n, 3, 1)) * size
    grid = torch.stack(torch.meshgrid(px, px, indexing="ij"), -1).view(1, 1, -1, 2)  # (1, 1, HW, 2)
    ab = (b - a)[:, :, None]  # (n, 3, 1, 2)
    s = (((grid - a[:, :, None]) * ab).sum(-1) / ab.square().sum(-1).clamp_min(1e-6)).clamp(0, 1)  # (n, 3, HW)
    free = ((grid - a[:, :, None] - s[..., None] * ab).norm(dim=-1) <= r).any(1).view(n, size, size)
    if kind == "lfm":
        return lfm_masks(n, size, generator, device)
    pick = {"box": box, "free": free}.get(kind)
    if pick is None:
        pick = torch.where(u(n, 1, 1) < 0.5, box, free)
    return pick[:, None].float()


def lfm_masks(n: int, size: int, generator=None, device=None) -> torch.Tensor:
    """(n, 1, size, size), 1 = fill: LFM's training masks, LaMa's MixedMaskGenerator at its defaults (get_mask_generator
    (None, None), datasets_prep/__init__.py:120; inpaint_preprocess/mask.py:293-365), lengths in pixels of a 256 image
    scaled to `size`. Half are strokes (:43-66): 0-10 polylines of 1-5 segments, each from the last end point at
    angle 0.01 + {0,1,2,3} rad (2 pi minus it on even polylines), length 10-69, width 5-24, ends clipped to the image;
    half are boxes (:111-123): 0-3 rectangles of sides 30-99 inside a margin of 10. Zero polylines or boxes leave the
    mask empty (1/11 of the strokes, 1/4 of the boxes: 17% of all masks)."""
    def ri(lo, hi, *shape):  # integers in [lo, hi)
        return torch.randint(lo, hi, shape, generator=generator, device=device)
    k = size / 256
    px = torch.arange(size, device=device, dtype=torch.float32) + 0.5
    gy, gx = torch.meshgrid(px, px, indexing="ij")  # (size, size)
    # strokes: polyline i active if i < times; segment j of it if j < its count
    times, segs = ri(0, 11, n), ri(1, 6, n, 10)
    x, y = ri(0, 256, n, 10).float(), ri(0, 256, n, 10).float()
    even = (torch.arange(10, device=device) % 2 == 0)
    stroke = torch.zeros(n, size, size, dtype=torch.bool, device=device)
    for j in range(5):
        ang = 0.01 + ri(0, 4, n, 10).float()
        ang = torch.where(even, 2 * math.pi - ang, ang)
        length, width = 10 + ri(0, 60, n, 10).float(), 5 + ri(0, 20, n, 10).float()
        x2 = (x + length * torch.sin(ang)).clamp(0, 256).floor()
        y2 = (y + length * torch.cos(ang)).clamp(0, 256).floor()
        on = (torch.arange(10, device=device) < times[:, None]) & (j < segs)  # (n, 10)
        a, b = torch.stack([x, y], -1) * k, torch.stack([x2, y2], -1) * k  # (n, 10, 2) in pixels of `size`
        d = b - a
        p = torch.stack([gx, gy], -1).view(1, -1, 2)  # (1, HW, 2)
        for i in range(10):  # one polyline at a time: (n, HW), not (n, 10, HW), at 256 x 256
            if not bool(on[:, i].any()):
                continue
            ai, di = a[:, i, None], d[:, i, None]  # (n, 1, 2)
            s = (((p - ai) * di).sum(-1) / di.square().sum(-1).clamp_min(1e-9)).clamp(0, 1)  # (n, HW)
            dist = (p - ai - s[..., None] * di).norm(dim=-1)
            hit = (dist <= (width[:, i, None] * k / 2)) & on[:, i, None]
            stroke |= hit.view(n, size, size)
        x, y = torch.where(on, x2, x), torch.where(on, y2, y)
    # boxes
    margin, lo = 10, 30
    hi = min(100, 256 - 2 * margin)
    nb = ri(0, 4, n)
    bw, bh = ri(lo, hi, n, 3), ri(lo, hi, n, 3)
    x0 = margin + (torch.rand(n, 3, generator=generator, device=device) * (256 - 2 * margin - bw + 1)).floor()
    y0 = margin + (torch.rand(n, 3, generator=generator, device=device) * (256 - 2 * margin - bh + 1)).floor()
    on = torch.arange(3, device=device) < nb[:, None]
    inx = (gx[None, None] >= x0[..., None, None] * k) & (gx[None, None] < (x0 + bw)[..., None, None] * k)
    iny = (gy[None, None] >= y0[..., None, None] * k) & (gy[None, None] < (y0 + bh)[..., None, None] * k)
    box = (inx & iny & on[..., None, None]).any(1)
    pick = torch.rand(n, 1, 1, generator=generator, device=device) < 0.5
    return torch.where(pick, stroke, box)[:, None].float()


def center_mask(n: int, size: int, device=None) -> torch.Tensor:
    """The central box LFM samples its inpainting figures with (train_flow_latent_inpainting.py:177)."""
    m = torch.zeros(n, 1, size, size, device=device)
    m[..., size // 4:3 * size // 4, size // 4:3 * size // 4] = 1
    return m


def digit_segmentation(images: torch.Tensor) -> torch.Tensor:
    """uint8 digits (N, 1, H, W) -> int64 map (N, H, W): 0 background reachable from the border (4-connected),
    1 ink (>= 50% intensity), 2 background enclosed by ink. A flood fill from the border, batched over the images."""
    ink = images[:, 0] >= 128
    free = ~ink
    out = torch.zeros_like(free)
    out[:, [0, -1], :] = True
    out[:, :, [0, -1]] = True
    out &= free
    while True:
        grown = out.clone()
        grown[:, 1:] |= out[:, :-1]
        grown[:, :-1] |= out[:, 1:]
        grown[:, :, 1:] |= out[:, :, :-1]
        grown[:, :, :-1] |= out[:, :, 1:]
        grown &= free
        if torch.equal(grown, out):
            break
        out = grown
    return torch.where(ink, 1, torch.where(out, 0, 2))


def one_hot_seg(seg: torch.Tensor, classes: int, size: int) -> torch.Tensor:
    """int map (B, H, W) -> float one-hot (B, K, H, W), checked against the model's classes and image size."""
    if seg.ndim != 3 or seg.shape[-2:] != (size, size):
        raise ValueError(f"segmentation map of shape {tuple(seg.shape)} does not match the images: expected "
                         f"(B, {size}, {size}) class indices")
    if seg.is_floating_point() or len(seg) and not 0 <= int(seg.min()) <= int(seg.max()) < classes:
        raise ValueError(f"segmentation map has classes {seg.min().item()}..{seg.max().item()}, but the model has "
                         f"--seg_classes {classes}")
    return F.one_hot(seg.long(), classes).permute(0, 3, 1, 2).float()


def inpaint_condition(vae, images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """images in [-1, 1] (B, C, H, W), mask (B, 1, H, W), 1 = fill -> (B, c + 1, h, w): the latent of the masked image
    (the hole black, as LFM's (1 - m) x in [0, 1]) and the mask on the latent grid scaled to [-1, 1]."""
    B, _, H, W = images.shape
    if mask.shape != (B, 1, H, W):
        raise ValueError(f"inpainting mask of shape {tuple(mask.shape)} does not match the images: expected "
                         f"({B}, 1, {H}, {W}), 1 = region to fill")
    mask = mask.to(images.dtype)
    c = vae.encode(images * (1 - mask) - mask)  # (B, c, h, w), the posterior mean
    return torch.cat([c, F.interpolate(mask, size=c.shape[-2:], mode="nearest") * 2 - 1], 1)


# ----------------------------------------------------------------------------------------------------------------------
# Loss (LFM, Sec. 3: the conditional flow matching objective on latents)


def interpolant(z0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """z_t = (1 - t) z0 + (sigma_min + (1 - sigma_min) t) eps and its velocity u = (1 - sigma_min) eps - z0."""
    t = t.view(-1, *[1] * (z0.ndim - 1))
    return (1 - t) * z0 + (SIGMA_MIN + (1 - SIGMA_MIN) * t) * eps, (1 - SIGMA_MIN) * eps - z0


def drop_labels(y: torch.Tensor, u: torch.Tensor, p: float, null: int) -> torch.Tensor:
    """Classifier-free guidance's label dropout: y_i -> the null label where u_i < p (u ~ U(0, 1), one per example)."""
    return torch.where(u < p, null, y.long())


def lfm_loss(net, z0, y=None, spatial=None, t=None, eps=None, label_drop: float = 0.0, null_label: int | None = None,
             u=None) -> torch.Tensor:
    """Mean over the batch of |v(z_t, t | c) - u|^2 / dim, t ~ U(0, 1), eps ~ N(0, I). label_drop: the labels y become
    null_label (= num_classes) with that probability (u: the uniforms deciding it, drawn if None), as training does."""
    t = torch.rand(len(z0), device=z0.device) if t is None else t
    eps = torch.randn_like(z0) if eps is None else eps
    if label_drop > 0 and y is not None:
        if null_label is None:
            raise ValueError("label_drop needs null_label, the null class index (Config.num_classes)")
        y = drop_labels(y, torch.rand(len(y), device=y.device) if u is None else u, label_drop, null_label)
    zt, target = interpolant(z0, eps, t)
    return F.mse_loss(net(zt, t, y, spatial).to(target.dtype), target)


# ----------------------------------------------------------------------------------------------------------------------
# Sampler: guidance, and ODE solvers from t = 1 (noise) to t = 0 (data)


def raag_weight(rho: torch.Tensor, w_max: float, alpha: float) -> torch.Tensor:
    """RAAG's scale w = 1 + (w_max - 1) exp(-alpha rho): w_max where the predictions agree, 1 where they diverge."""
    return 1 + (w_max - 1) * torch.exp(-alpha * rho)


def guide(v_c: torch.Tensor, v_u: torch.Tensor, cfg: Config) -> torch.Tensor:
    """v = v_u + w (v_c - v_u) over all channels; w = --guidance (cfg) or RAAG's w(rho), rho = |v_c - v_u| / |v_u|."""
    d = v_c - v_u
    if cfg.guidance_rule == "cfg":
        return v_u + cfg.guidance * d
    dims = tuple(range(1, d.ndim)) if cfg.raag_ratio == "sample" else tuple(range(d.ndim))
    norm = functools.partial(torch.linalg.vector_norm, dim=dims)
    rho = norm(d) / norm(v_u).clamp_min(1e-12)  # (B,) or ()
    w = raag_weight(rho, cfg.raag_w_max, cfg.raag_alpha).expand(len(d))
    return v_u + w.view(-1, *[1] * (d.ndim - 1)) * d


def velocity(model: LatentFlow, cfg: Config, y=None, spatial=None):
    """f(t, z) for the solver. Guided class models run the conditional and null branches as one batch of 2B."""
    guided = cfg.condition == "class" and (cfg.guidance != 1.0 or cfg.guidance_rule == "raag")
    if guided:
        y = torch.cat([y, torch.full_like(y, cfg.num_classes)])

    def f(t: float, z: torch.Tensor) -> torch.Tensor:
        if not guided:
            return model(z, torch.full((len(z),), t, device=z.device), y, spatial).to(z.dtype)
        v = model(torch.cat([z, z]), torch.full((2 * len(z),), t, device=z.device), y).to(z.dtype)
        return guide(*v.chunk(2), cfg)
    return f


@torch.no_grad()
def sample(model: LatentFlow, cfg: Config, z1: torch.Tensor, y=None, spatial=None) -> tuple[torch.Tensor, int]:
    """Integrate from z1 ~ N(0, I) at t = 1 to the latent at t = 0; returns (z0, NFE of one batched forward each)."""
    if cfg.condition == "class":
        model.check_labels(y)
    # LFM's convention: noise at t = 1, data at t = 0; dopri5 is torchdiffeq's controller (the official sampler)
    res = common.odeint(velocity(model, cfg, y, spatial), z1, cfg.sampler, cfg.sample_steps, cfg.atol, cfg.rtol,
                        t0=1.0, t1=0.0)
    return res.x, res.nfe


# ----------------------------------------------------------------------------------------------------------------------
# VAE, data and evaluation


@functools.lru_cache(maxsize=2)
def _load_vae(path: str, family: str, device: str, channels: int):
    return common.load_vae(path or None, family, device=device, channels=channels)


def load_vae(cfg: Config, device="cpu"):
    """The frozen VAE of the config (shared by the calls: it never changes); pixel space for --vae_family none."""
    if cfg.vae_family != "none" and not cfg.vae:
        if cfg.data != "digits":
            raise ValueError(f"--vae_family {cfg.vae_family} needs --vae PATH, the VAE that decodes the latents")
        return _load_vae(str(common.digits_vae(cfg.img_size)), cfg.vae_family, str(device), cfg.channels)
    vae = _load_vae(cfg.vae, cfg.vae_family, str(device), cfg.channels)
    if cfg.img_size % vae.downsample:
        raise ValueError(f"--img_size {cfg.img_size} is not divisible by the VAE's downsampling {vae.downsample}")
    return vae


@torch.no_grad()
def encode_moments(vae, x: torch.Tensor, bs: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Images in [-1, 1] -> the posterior's mean and std in the scaled latent space (so z0 = mean + std * eps is
    vae.encode(x, sample=True)), on x's device. common.VAE only returns samples; training draws one every step."""
    if vae.ae is None:
        return x, torch.zeros_like(x)
    p = next(vae.ae.parameters())
    means, stds = [], []
    for xb in x.split(bs):
        m, logvar = vae.ae.encode(xb.to(p.device, p.dtype))
        means.append(((m - vae.shift_factor) * vae.scaling_factor).to(x.device, torch.float32))
        stds.append(((0.5 * logvar).exp() * vae.scaling_factor).to(x.device, torch.float32))
    return torch.cat(means), torch.cat(stds)


def load_images(cfg: Config, split: str = "train"):
    """(images uint8 (N, C, H, W), labels (N,), segmentation (N, H, W) or None), or an ImageFolder."""
    if cfg.data == "digits":
        if cfg.channels != 1:
            raise ValueError(f"digits have 1 channel, the config says --channels {cfg.channels}")
        x, y = common.load_digits(split, cfg.img_size)
        return x, y, digit_segmentation(x)
    path = Path(cfg.data)
    if path.is_dir():
        if cfg.condition == "semantic":
            raise ValueError(f"--condition semantic reads `segmentation` from an .npz, not the folder {path}")
        return common.ImageFolder(path, cfg.img_size, cfg.channels)
    a = common.load_arrays(path, ("images", "labels", "segmentation"))
    images = a["images"]
    if images.ndim != 4 or images.shape[1:] != (cfg.img_size, cfg.img_size, cfg.channels):
        raise ValueError(f"{path}: images must be (N, {cfg.img_size}, {cfg.img_size}, {cfg.channels}) uint8, "
                         f"got {images.shape}")
    x = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))
    y = torch.as_tensor(a["labels"]).long() if "labels" in a else torch.zeros(len(x), dtype=torch.long)
    seg = torch.as_tensor(a["segmentation"]).long() if "segmentation" in a else None
    if cfg.condition == "semantic" and seg is None:
        raise ValueError(f"{path} has no `segmentation` array for --condition semantic")
    return x, y, seg


def check_data(cfg: Config, y, seg):
    if cfg.condition == "class" and len(y) and not 0 <= int(y.min()) <= int(y.max()) < cfg.num_classes:
        raise ValueError(f"the data has labels {int(y.min())}..{int(y.max())} outside [0, --num_classes "
                         f"{cfg.num_classes})")
    if cfg.condition == "semantic":
        one_hot_seg(seg[:1], cfg.seg_classes, cfg.img_size)  # shape
        if int(seg.max()) >= cfg.seg_classes or int(seg.min()) < 0:
            raise ValueError(f"the segmentation maps have classes {int(seg.min())}..{int(seg.max())}, but "
                             f"--seg_classes is {cfg.seg_classes}")


def train_data(cfg: Config, vae) -> torch.utils.data.Dataset:
    """Batches are (mean, std, labels, extra): the posterior moments (encoded once, or --precompute'd latents), with
    the images (inpaint: the masked image is encoded each step) or the segmentation maps (semantic) as `extra`; an
    image folder yields (images uint8, labels), encoded each step."""
    path = Path(cfg.data)
    if path.is_dir() and (path / "mean.npy").exists():  # latents from --precompute, memory-mapped
        if cfg.condition == "inpaint":
            raise ValueError("--condition inpaint encodes the masked images each step: pass images as --data")
        a = common.load_arrays(path, ("mean", "std", "labels", "segmentation", "mean_flip", "std_flip"))
        y = torch.tensor(np.array(a["labels"]) if "labels" in a else np.zeros(len(a["mean"])), dtype=torch.long)
        seg = torch.tensor(np.array(a["segmentation"]), dtype=torch.long) if "segmentation" in a else None
        check_data(cfg, y, seg)
        extra = seg if cfg.condition == "semantic" else torch.zeros(len(y))
        if cfg.hflip and "mean_flip" not in a:
            raise ValueError(f"--hflip needs the mirrored images' latents in {path}: run --precompute with --hflip")
        flips = (a["mean_flip"], a["std_flip"]) if cfg.hflip else ()
        return common.ArrayDataset(a["mean"], a["std"], y, extra, *flips)
    loaded = load_images(cfg)
    if isinstance(loaded, common.ImageFolder):
        if cfg.condition == "class" and len(loaded.classes) > cfg.num_classes:
            raise ValueError(f"{cfg.data} has {len(loaded.classes)} class folders but --num_classes {cfg.num_classes}")
        return loaded
    x, y, seg = loaded
    check_data(cfg, y, seg)
    mean, std = encode_moments(vae, common.to_float(x))
    extra = {"inpaint": x, "semantic": seg}.get(cfg.condition, torch.zeros(len(x)))
    flips = encode_moments(vae, common.to_float(x.flip(-1))) if cfg.hflip else ()
    return common.ArrayDataset(mean, std, y, extra, *flips)


def draw_noise(cfg: Config, n: int, shape, generator, device) -> list[torch.Tensor]:
    """The randomness of n training examples: t ~ U(0, 1), eps ~ N(0, I), the posterior's noise, the label-drop
    uniforms [, the inpainting masks] [, the flip uniforms of --hflip: mirrored where < 0.5]."""
    g = dict(generator=generator, device=device)
    out = [torch.rand(n, **g), torch.randn(n, *shape, **g), torch.randn(n, *shape, **g), torch.rand(n, **g)]
    out += [random_masks(n, cfg.img_size, cfg.mask, **g)] if cfg.condition == "inpaint" else []
    return out + ([torch.rand(n, **g)] if cfg.hflip else [])


def batch_inputs(model: LatentFlow, batch, vae, drop: float = 0.0, hflip: bool = False):
    """A batch + its noise -> (z0 a posterior sample, t, eps, labels or None, spatial condition or None). Batches are
    (mean, std, labels, extra [, mean and std of the mirrored images under hflip]) or, from an image folder, (images
    uint8, labels), encoded here. hflip: examples whose flip uniform (the last noise) is < 0.5 are mirrored."""
    cfg = model.cfg
    if batch[0].dtype == torch.uint8:
        x, y, rest = batch[0], batch[1], list(batch[2:])
        if hflip:
            x = torch.where(rest[-1].view(-1, 1, 1, 1) < 0.5, x.flip(-1), x)
        (mean, std), extra = encode_moments(vae, common.to_float(x)), x
    else:
        mean, std, y, extra, *rest = batch
        mean, std = mean.float(), std.float()
        if hflip:  # the mirrored images' own posterior (a VAE is not equivariant to flips): encoded beforehand
            mean_f, std_f, *rest = rest
            f = rest[-1] < 0.5
            mean = torch.where(f.view(-1, 1, 1, 1), mean_f.float(), mean)
            std = torch.where(f.view(-1, 1, 1, 1), std_f.float(), std)
            if cfg.condition in ("inpaint", "semantic"):
                extra = torch.where(f.view(-1, *[1] * (extra.ndim - 1)), extra.flip(-1), extra)
    t, eps, post, u, *more = rest
    z0 = mean + std * post
    if cfg.condition == "class":
        return z0, t, eps, drop_labels(y, u, drop, cfg.num_classes), None
    if cfg.condition == "inpaint":  # the condition's latent is the posterior mean: an input, not a target
        return z0, t, eps, None, inpaint_condition(vae, common.to_float(extra), more[0])
    if cfg.condition == "semantic":
        return z0, t, eps, None, one_hot_seg(extra, cfg.seg_classes, cfg.img_size)
    return z0, t, eps, None, None


@torch.no_grad()
def heldout_loss(model: LatentFlow, cfg: Config, data, vae, n: int = 1000, bs: int = 250) -> float:
    """The LFM objective on held-out data with fixed t, noise and masks (LFM bounds W2 of the latent distribution
    by it, Sec. 4)."""
    dev = next(model.parameters()).device
    g = torch.Generator(dev).manual_seed(1234)
    idx = torch.arange(min(n, len(data)))
    total = 0.0
    for part in idx.split(bs):
        batch = data[part.numpy()] if isinstance(data, common.ArrayDataset) else \
            torch.utils.data.default_collate([data[int(i)] for i in part])
        batch = [t.to(dev) for t in batch] + draw_noise(cfg, len(part), (model.C, model.S, model.S), g, dev)
        z0, t, eps, y, sp = batch_inputs(model, batch, vae)
        total += lfm_loss(model, z0, y, sp, t, eps).item() * len(part)
    return total / len(idx)


@torch.no_grad()
def generate(model: LatentFlow, cfg: Config, vae, n: int, y=None, spatial=None, seed: int = 0, bs: int = 500):
    """n decoded samples as uint8 (n, C, H, W) (labels y / spatial conditions of length n); returns (images, NFE)."""
    dev = next(model.parameters()).device
    g = torch.Generator().manual_seed(seed)
    out, nfe = [], 0
    for s in range(0, n, bs):
        sl = slice(s, min(n, s + bs))
        z1 = torch.randn(sl.stop - s, model.C, model.S, model.S, generator=g).to(dev)
        z0, nfe = sample(model, cfg, z1, None if y is None else y[sl].to(dev),
                         None if spatial is None else spatial[sl].to(dev))
        out.append(common.to_uint8(vae.decode(z0).clamp(-1, 1)).cpu())
    return torch.cat(out), nfe


def eval_conditions(cfg: Config, vae, n: int, start: int = 0, device="cpu") -> dict:
    """n conditions for evaluation and default sampling, items start..start+n (cycling) of the digits test split, or
    else of --data: labels, originals, central-box masks (inpaint) or segmentation maps (semantic), and the spatial
    inputs. Precomputed latents hold no images, so there only maps can serve."""
    path, seg = Path(cfg.data), None
    if cfg.data == "digits":
        x, y = common.load_digits("test", cfg.img_size)
        seg = digit_segmentation(x)
    elif (path / "mean.npy").exists():
        a = common.load_arrays(path, ("mean", "segmentation"))
        if cfg.condition == "inpaint" or "segmentation" not in a:
            raise ValueError(f"{path} holds latents without images or segmentation maps to condition on: --cond NPZ")
        x, y, seg = None, None, torch.tensor(np.array(a["segmentation"]), dtype=torch.long)
    else:
        loaded = load_images(cfg)
        if isinstance(loaded, common.ImageFolder):
            items = [loaded[i % len(loaded)] for i in range(start, start + n)]
            x, y, start = torch.stack([it[0] for it in items]), torch.tensor([it[1] for it in items]), 0
        else:
            x, y, seg = loaded
    idx = torch.arange(start, start + n) % len(x if x is not None else seg)
    out = {} if x is None else {"labels": y[idx], "images": x[idx]}
    if cfg.condition == "inpaint":
        out["masks"] = center_mask(n, cfg.img_size)
        out["spatial"] = inpaint_condition(vae, common.to_float(out["images"]).to(device),
                                           out["masks"].to(device)).cpu()
    if cfg.condition == "semantic":
        out["segmentation"] = seg[idx]
        out["spatial"] = one_hot_seg(out["segmentation"], cfg.seg_classes, cfg.img_size)
    return out


def evaluate(model: LatentFlow, cfg: Config, vae, n: int | None = None, seed: int = 7) -> dict:
    """Held-out LFM loss (on data other than the digits `train_lfm_loss`, on training examples); with --fid_ref the Inception FID (common.fid) of --fid_n samples; on the digits also:
    class -> accuracy and FD of guided and conditional samples (the real-data
    floor fd_floor); inpaint -> error on the known region against the original (and against another test digit:
    chance), classifier accuracy of the inpainted digits and of the masked inputs; semantic -> agreement of the
    samples' own segmentation maps with the input maps (and chance), accuracy, FD."""
    model.eval()
    n = n or cfg.eval_n
    if cfg.data == "digits":
        x, y = common.load_digits("test", cfg.img_size)
        mean, std = encode_moments(vae, common.to_float(x))
        extra = {"inpaint": x, "semantic": digit_segmentation(x)}.get(cfg.condition, torch.zeros(len(x)))
        held = common.ArrayDataset(mean, std, y, extra)
    else:  # no test split: the first examples of the training data, and the loss is named for what it is
        held = train_data(cfg, vae)
    out = {"lfm_loss" if cfg.data == "digits" else "train_lfm_loss": heldout_loss(model, cfg, held, vae)}
    if cfg.fid_ref:  # the standard Inception FID of fid_n samples for held-out conditions, with the configured guidance
        y = torch.arange(cfg.fid_n) % cfg.num_classes if cfg.condition == "class" else None
        spatial = eval_conditions(cfg, vae, cfg.fid_n)["spatial"] if cfg.condition in ("inpaint", "semantic") else None
        imgs, _ = generate(model, cfg, vae, cfg.fid_n, y, spatial, seed=seed + 4)
        out.update(fid=common.fid(imgs, cfg.fid_ref, cfg.fid_weights, next(model.parameters()).device),
                   fid_n=cfg.fid_n)
    if cfg.data != "digits":
        return out
    metrics = common.digits_metrics
    if cfg.condition in ("class", "none"):
        y = torch.arange(n) % cfg.num_classes if cfg.condition == "class" else None
        imgs, nfe = generate(model, cfg, vae, n, y, seed=seed)
        out.update(metrics(imgs, y), nfe=nfe)
        if cfg.condition == "class" and (cfg.guidance != 1 or cfg.guidance_rule != "cfg"):
            plain = dataclasses.replace(cfg, guidance=1.0, guidance_rule="cfg")
            imgs, _ = generate(model, plain, vae, n, y, seed=seed)
            out.update({f"{k}_unguided": v for k, v in metrics(imgs, y).items() if k != "fd_floor"})
        return out
    c = eval_conditions(cfg, vae, len(common.load_digits("test")[1]))
    imgs, nfe = generate(model, cfg, vae, len(c["labels"]), spatial=c["spatial"], seed=seed)
    out.update(metrics(imgs, c["labels"]), nfe=nfe)
    got, ref = common.to_float(imgs), common.to_float(c["images"])
    if cfg.condition == "inpaint":
        known = 1 - c["masks"]

        def err(a, b, w):
            return float(((a - b).square() * w).sum() / w.sum())
        out.update(known_mse=err(got, ref, known), known_mse_chance=err(got, ref.roll(1, 0), known),
                   hole_mse=err(got, ref, c["masks"]),
                   accuracy_masked_input=metrics(common.to_uint8(ref * known - c["masks"]), c["labels"])["accuracy"])
    else:
        seg = digit_segmentation(imgs)
        out.update(map_accuracy=float((seg == c["segmentation"]).float().mean()),
                   map_accuracy_chance=float((seg == c["segmentation"].roll(1, 0)).float().mean()))
    return out


# ----------------------------------------------------------------------------------------------------------------------
# Official weights: VinAIResearch/LFM's DiT checkpoints (model_{epoch}.pth) and its trainer's content.pth


OFFICIAL_HEADS = {384: 6, 768: 12, 1024: 16, 1152: 16}  # DiT-S/B/L/XL's heads by width (models/DiT.py:354-399)


def read_official(state) -> tuple[dict, dict] | None:
    """(state dict without DDP's `module.` prefix, the training args or {}) of an official file's contents: a released
    model_{epoch}.pth (train_flow_latent.py:211-214) or the trainer's content.pth, whose `model_dict` sits beside an
    argparse.Namespace (:196-203); None for anything else."""
    args = {}
    if isinstance(state, dict) and "model_dict" in state:
        a = state.get("args")
        args = vars(a) if isinstance(a, argparse.Namespace) else dict(a or {})
        state = state["model_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        return None
    sd = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}
    return (sd, args) if "x_embedder.proj.weight" in sd and "t_embedder.mlp.0.weight" in sd else None


def load_any(path) -> dict:
    """A checkpoint of ours or an official file, read with torch.load(weights_only=True); content.pth's pickled
    argparse.Namespace is the one class allowed beyond tensors and containers (no arbitrary objects)."""
    with torch.serialization.safe_globals([argparse.Namespace]):
        return common.load_checkpoint(path)


def from_official(path, device="cpu", *, state=None, **overrides) -> tuple[LatentFlow, Config]:
    """An official LFM DiT file -> our LatentFlow computing the same velocity, and its Config. The architecture comes
    from the tensors; the head count is not in them: `heads` (default: the official size of that width); `overrides`
    may also set run-time fields (sampler, guidance, vae, ...). What differs from our defaults: LFM's DiT feeds t as is
    (time_scale 1), its positions put the column half first (pos_order "wh"), and an unconditional model still adds
    the single row of its label table (num_classes 1, label_dropout 0, models/DiT.py:79-81, 259-264): folded here
    into the time MLP's last bias. Sampler defaults are the official test script's (test_flow_latent.py): dopri5
    (:381) with atol = rtol = 1e-5 (:376-377), its Euler's step 0.01 (:397) as 100 steps, and CFG 1.5 for the
    1000-class ImageNet model (test_args/imnet_dit.txt:7; run_test_cls.sh:17), 1 otherwise (:351)."""
    read = read_official(load_any(path) if state is None else state)
    if read is None:
        raise ValueError(f"{path} is not a VinAIResearch/LFM DiT checkpoint (model_*.pth or content.pth)")
    sd, args = read
    sd = {k: v.float() for k, v in sd.items()}
    W, C, p, _ = sd["x_embedder.proj.weight"].shape
    T = sd["pos_embed"].shape[1]
    side = p * math.isqrt(T)  # latent side
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    out_ch = sd["final_layer.linear.weight"].shape[0] // (p * p)
    if out_ch != C:
        raise ValueError(f"{path}: {C} input but {out_ch} output channels; only LFM's DiT generators are supported")
    rows = sd["y_embedder.embedding_table.weight"].shape[0]
    n_cls = args.get("num_classes") or (rows - 1 if rows > 1 else 1)
    if n_cls > 1 and rows not in (n_cls, n_cls + 1):
        raise ValueError(f"{path}: a label table of {rows} rows for {n_cls} classes")
    size = str(args.get("model_type", "")).removeprefix("DiT-").split("/")[0]
    heads = DIT_SIZES[size][2] if size in DIT_SIZES else OFFICIAL_HEADS.get(W)
    f = int(args.get("f", 8))
    inferred = dict(width=W, depth=depth, patch_size=p, mlp_ratio=sd["blocks.0.mlp.fc1.weight"].shape[0] / W,
                    condition="class" if n_cls > 1 else "none", num_classes=n_cls if n_cls > 1 else 10,
                    time_scale=1.0, pos_order="wh", img_size=side * f, channels=3, vae_family="sd")
    for k, v in overrides.items():
        if k in inferred and v != inferred[k]:
            raise ValueError(f"{path}: the weights say {k}={inferred[k]!r}, not {v!r}")
    heads = overrides.pop("heads", heads)
    if heads is None:
        raise ValueError(f"{path}: width {W} is no official DiT size, so the head count is unknown: pass heads=")
    dflt = dict(data="latents", sampler="dopri5", atol=1e-5, rtol=1e-5, sample_steps=100, guidance=1.0,
                label_drop=float(args.get("label_dropout", 0.1 if n_cls > 1 else 0.0)))
    if n_cls == 1000:
        dflt["guidance"] = 1.5
    cfg = Config(**{**dflt, **inferred, "heads": heads, **overrides})
    # key map: ours <- theirs (timm's Attention / Mlp inside the blocks)
    ours = {"dit.x_embed.": "x_embedder.proj.", "dit.t_embed.": "t_embedder.mlp.", "dit.linear_out.":
            "final_layer.linear.", "dit.ada_out.": "final_layer.adaLN_modulation."}
    for i in range(depth):
        for a, b in (("attn.", "attn."), ("mlp.0.", "mlp.fc1."), ("mlp.2.", "mlp.fc2."), ("ada.", "adaLN_modulation.")):
            ours[f"dit.blocks.{i}.{a}"] = f"blocks.{i}.{b}"
    new = {}
    for k, v in sd.items():
        for a, b in ours.items():
            if k.startswith(b):
                new[a + k[len(b):]] = v
                break
    table = sd["y_embedder.embedding_table.weight"]
    if cfg.condition == "class":  # classes + the null label (row num_classes); a table without one gets a zero row
        new["dit.y_embed.weight"] = torch.cat([table, table.new_zeros(n_cls + 1 - rows, W)])
    else:  # c = t_emb + emb(0) for every input: one more bias
        new["dit.t_embed.2.bias"] = new["dit.t_embed.2.bias"] + table[-1]
    pos = sincos_2d(W, side // p, "wh")
    if not torch.allclose(sd["pos_embed"][0], pos, atol=1e-5):
        raise ValueError(f"{path}: pos_embed is not the fixed 2D sin-cos table of its grid")
    model = LatentFlow(cfg, C, side, f)
    missing = set(model.state_dict()) ^ set(new)
    if missing:
        raise ValueError(f"{path}: unmapped weights {sorted(missing)[:4]}")
    model.load_state_dict(new)
    model.__dict__["vae"] = load_vae(cfg, device) if cfg.vae else None
    return model.to(device).eval(), cfg


# ----------------------------------------------------------------------------------------------------------------------
# Trainer and command line


def latent_dims(cfg: Config) -> tuple[int, int]:
    """(latent channels, VAE downsampling) without loading the VAE: the digits VAE's 4 x /2, a family's f8, pixels."""
    if cfg.vae_family == "none":
        return cfg.channels, 1
    if cfg.data == "digits" and not cfg.vae:
        return 4, 2  # common.digits_vae: size -> 4 x size/2 x size/2
    return {"sd": 4, "sdxl": 4, "flux": 16}[cfg.vae_family], 8


def dry_run(cfg: Config, gpus: int) -> dict:
    """--dry_run: the config on the meta device (common.dry_run) and its training loss as train() runs it (labels with
    dropout, the inpainting condition's latent + mask channels, or a one-hot map through the rescaler)."""
    C, f = latent_dims(cfg)
    S = cfg.img_size // f

    def loss(model, b):
        y = torch.zeros(b, dtype=torch.long) if cfg.condition == "class" else None
        spatial = {"inpaint": lambda: torch.randn(b, C + 1, S, S),
                   "semantic": lambda: torch.randn(b, cfg.seg_classes, cfg.img_size, cfg.img_size)}.get(cfg.condition)
        return lfm_loss(model, torch.randn(b, C, S, S), y, spatial() if spatial else None, label_drop=cfg.label_drop,
                        null_label=cfg.num_classes)
    plain = dataclasses.replace(cfg, grad_ckpt=False)  # the estimate gives both, with and without checkpointing
    return common.dry_run(cfg, lambda: LatentFlow(plain, C, S, f), loss, tokens=(S // cfg.patch_size) ** 2, gpus=gpus,
                          block_types=(DiTBlock,))


def build(cfg: Config, vae) -> LatentFlow:
    return LatentFlow(cfg, vae.latent_channels, cfg.img_size // vae.downsample, vae.downsample)


def from_checkpoint(path: str, device="cpu", **overrides) -> tuple[LatentFlow, Config]:
    """A trained model ready to sample (EMA weights, eval mode) and its config; `overrides` may change run-time fields
    (sampler, guidance, ...). `model.vae` is its frozen VAE, kept out of the module tree (and the state dict). An
    official LFM file (model_*.pth or content.pth) goes to `from_official`."""
    state = load_any(path)
    if read_official(state) is not None:
        return from_official(path, device, state=state, **overrides)
    cfg = common.config_from_checkpoint(Config, state, overrides, what=str(path))
    vae = load_vae(cfg, device)
    model = build(cfg, vae)
    model.__dict__["vae"] = vae
    return common.load_weights(model, state).to(device).eval(), cfg


def precompute(cfg: Config, src: str, d: common.Dist):
    """Encode images (an .npz or a folder) through the VAE once: <--data>/mean.npy, std.npy (the posterior, fp16),
    labels.npy [, segmentation.npy] [, mean_flip.npy, std_flip.npy: the mirrored images', with --hflip]; train then
    reads them memory-mapped and draws z0 = mean + std eps."""
    vae = load_vae(cfg, d.device)
    loaded = load_images(dataclasses.replace(cfg, data=src, channels=vae.in_channels))
    data = loaded if isinstance(loaded, common.ImageFolder) else common.ArrayDataset(loaded[0], loaded[1])

    def encode(b):
        x, out = common.to_float(b[0].to(d.device)), {"labels": b[1]}
        for sfx, xs in [("", x)] + ([("_flip", x.flip(-1))] if cfg.hflip else []):  # --hflip: the mirrors too
            out["mean" + sfx], out["std" + sfx] = (t.half() for t in encode_moments(vae, xs))
        return out
    names = common.encode_folder(cfg.data, data, d, encode, (cfg.img_size, cfg.img_size, vae.in_channels), 64,
                                 cfg.num_workers)
    if d.is_main and not isinstance(loaded, common.ImageFolder) and loaded[2] is not None:
        np.save(Path(cfg.data) / "segmentation.npy", loaded[2].numpy().astype(np.int16))
        names.append("segmentation")
    common.print0(f"wrote {cfg.data}/{{{','.join(n + '.npy' for n in names)}}} ({len(data)} images)")


def conditions_from_npz(cfg: Config, path: str, vae, start: int, count: int, device) -> dict:
    """--cond NPZ for inpaint (`images` (N,H,W,C) uint8 + `masks` (N,H,W), 1 = fill) or semantic (`segmentation`)."""
    a = common.load_arrays(path, ("segmentation",) if cfg.condition == "semantic" else ("images", "masks"))
    idx = (torch.arange(start, start + count) % len(next(iter(a.values())))).numpy()
    if cfg.condition == "semantic":
        seg = torch.as_tensor(np.asarray(a["segmentation"])[idx]).long()
        return {"segmentation": seg, "spatial": one_hot_seg(seg, cfg.seg_classes, cfg.img_size)}
    if "masks" not in a:
        raise ValueError(f"--cond {path} has no `masks` array (N, H, W), 1 = region to fill")
    x = torch.from_numpy(np.ascontiguousarray(np.asarray(a["images"])[idx].transpose(0, 3, 1, 2)))
    m = torch.as_tensor(np.asarray(a["masks"])[idx]).float()[:, None]
    return {"images": x, "masks": m, "spatial": inpaint_condition(vae, common.to_float(x).to(device),
                                                                 m.to(device)).cpu()}


def options(p: argparse.ArgumentParser):
    p.add_argument("--precompute", metavar="IMAGES", default=None,
                   help="encode IMAGES (an .npz or a folder) through --vae into the latent folder --data")
    p.add_argument("--cond", metavar="NPZ", default=None,
                   help="conditions to --sample an inpaint (images + masks) or semantic (segmentation) model from")
    p.add_argument("--init_from", metavar="CKPT", default=None,
                   help="train from these weights (ours or an official model_*.pth / content.pth): the model fields "
                        "are theirs")


def cli_load(ckpt: str, overrides: dict, args, d: common.Dist) -> tuple[LatentFlow, Config]:
    model, cfg = from_checkpoint(ckpt, d.device, **overrides)
    if model.vae is None:
        raise ValueError(f"{ckpt} is an official LFM model: pass --vae PATH (sd-vae-ft-mse) to decode its samples")
    return model, cfg


def cli_sample(model: LatentFlow, cfg: Config, args, d: common.Dist, start: int, count: int):
    vae, arrays, y, spatial = model.vae, {}, None, None
    if cfg.condition == "class":
        y = torch.arange(start, start + count) % cfg.num_classes
        arrays["labels"] = y.numpy()
    elif cfg.condition != "none":
        c = conditions_from_npz(cfg, args.cond, vae, start, count, d.device) if args.cond else \
            eval_conditions(cfg, vae, count, start, d.device)
        spatial = c.pop("spatial")
        arrays.update({k: (v[:, 0].to(torch.uint8) if k == "masks" else v).numpy() for k, v in c.items()
                       if k != "images"})
    imgs, nfe = generate(model, cfg, vae, count, y, spatial, seed=cfg.seed + 1000 + d.rank)
    return {"images": imgs.permute(0, 2, 3, 1).numpy(), **arrays}, f"{cfg.sampler}, {nfe} network evaluations per batch"


def cli_train(cfg: Config, args, overrides: dict, d: common.Dist) -> common.Job:
    if args.init_from:  # fine-tuning: the architecture is the weights' (an official file's as `from_official` reads it)
        src, scfg = from_checkpoint(args.init_from, "cpu", **{k: v for k, v in overrides.items()
                                                              if k in common.model_fields(cfg) and k != "arch"})
        cfg = dataclasses.replace(cfg, arch="", **{k: getattr(scfg, k) for k in common.model_fields(cfg)
                                                   if k != "arch"})
    vae = load_vae(cfg, d.device)
    model = build(cfg, vae)
    if args.init_from:
        model.load_state_dict(src.state_dict())
    examples, shape = train_data(cfg, vae), (model.C, model.S, model.S)
    common.print0(f"LFM ({cfg.condition}): DiT width {cfg.width} x {cfg.depth} blocks, {model.S // cfg.patch_size}^2 "
                  f"tokens of {model.C}x{cfg.patch_size}x{cfg.patch_size} latents, "
                  f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters -> {cfg.out_dir}")

    def data(step):  # each example with its noise, drawn per global batch (any world size, --resume: the same loss)
        return common.batches(examples, cfg.batch_size, d, cfg.seed, step, cfg.num_workers,
                              noise=lambda g, n: draw_noise(cfg, n, shape, g, d.device))

    def loss_fn(net, batch, at):
        z0, t, eps, y, spatial = batch_inputs(model, batch, vae, cfg.label_drop, cfg.hflip)
        return lfm_loss(net, z0, y, spatial, t, eps), {}

    def on_eval(step, model, ema):
        with ema.swap(model), common.full_params(model):
            res = evaluate(model, cfg, vae, n=min(cfg.eval_n, 500))
            if cfg.condition in ("class", "none"):
                y = torch.arange(100) % cfg.num_classes if cfg.condition == "class" else None
                grid, _ = generate(model, cfg, vae, 100, y, seed=0)
            else:  # condition, sample [, original] for 10 held-out items
                c = eval_conditions(cfg, vae, 10, 0, d.device)
                imgs, _ = generate(model, cfg, vae, 10, spatial=c["spatial"], seed=0)
                if cfg.condition == "inpaint":
                    shown = common.to_uint8(common.to_float(c["images"]) * (1 - c["masks"]) - c["masks"])
                else:  # the map as grey levels, in the images' channels
                    shown = (c["segmentation"][:, None] * 255 // (cfg.seg_classes - 1)).to(torch.uint8)
                    shown = shown.expand(-1, imgs.shape[1], -1, -1)
                grid = torch.cat([shown, imgs] + ([c["images"]] if "images" in c else []))
        model.train()
        if d.is_main:
            common.save_grid(Path(cfg.out_dir) / "samples.png", grid)
        return res
    return common.Job(cfg, model, loss_fn, data, on_eval, shard_types=(DiTBlock,))


def main(argv=None):
    common.cli(argv, Config, PRESETS, __doc__, options=options, dry_run=dry_run, load=cli_load, sample=cli_sample,
               evaluate=lambda model, cfg, args, d: evaluate(model, cfg, model.vae), prepare=cli_train, digits=5,
               modes={"precompute": lambda cfg, args, _, d: precompute(cfg, args.precompute, d)})


if __name__ == "__main__":
    common.run(main)
