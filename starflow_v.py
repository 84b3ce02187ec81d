"""
starflow_v.py -- STARFlow-V: a causal video normalizing flow with a learned flow-score denoiser, in one file.

Paper: "STARFlow-V: End-to-End Video Generative Modeling with Normalizing Flows", Gu, Shen, Chen, Dinh, Wang,
Bautista, Berthelot, Susskind, Zhai, 2025, https://arxiv.org/abs/2511.20462 (official code:
github.com/apple/ml-starflow, read for facts, not copied). It builds on STARFlow (starflow.py; Gu et al. 2025,
https://arxiv.org/abs/2506.06276).

A video's latents (B, T, C, h, w) become T*N patch tokens in (t, h, w) raster order. The flow is global-local:
  * local: shallow autoregressive affine flows run on each frame alone (frames folded into the batch), alternating the
    token order within the frame, so they never mix frames;
  * global: one deep autoregressive flow over the whole space-time sequence, causal token by token, with 3D RoPE
    (frame, row, column) and the condition (class token or text embeddings, plus a task tag) as a prefix.
Each block maps z_t = (x_t - mu_t) / sigma_t with (mu_t, sigma_t) predicted from x_<t (STARFlow: learned start token,
sigma = softplus, soft clip), so the likelihood is exact; training is the NLL of latents with Gaussian noise sigma.
Flow-score matching: a light transformer, banded across frames (each layer sees W-1 frames back and one ahead, so L
layers see L ahead), learns -sigma * grad log p of the noisy latents from the input gradient of the same NLL; sampling
inverts the flow and takes one Tweedie step x + sigma^2 grad log p with it. Video-aware Jacobi decodes the deep block
in parallel chunks, each chunk after the first frame warm-started from the frame before. Because the flow is causal
and invertible, image-to-video and video-to-video are a prefix pushed forward through the flow; long videos slide a
window that re-encodes its last frames.

    python starflow_v.py                                       # CPU demo: moving digits of a given class, minutes
    python starflow_v.py --eval --ckpt out/starflow_v/ckpt.pt  # bits/dim, per-frame accuracy, consistency, motion
    python starflow_v.py --sample --ckpt out/starflow_v/ckpt.pt --n 20 --out v.npz             # + v_strips/*.png
    python starflow_v.py --sample --ckpt out/starflow_v/ckpt.pt --n 20 --out i2v.npz --task i2v  # from test frames
    python starflow_v.py --sample --ckpt out/starflow_v/ckpt.pt --n 4 --out long.npz --long_frames 12
    python starflow_v.py --preset moving-digits-vae            # the same on a per-frame image VAE's latents
    python starflow_v.py --preset t2v-480p --precompute videos.npz --data latents/ --vae Wan2.2-TI2V-5B-Diffusers/
    torchrun --nproc_per_node=8 starflow_v.py --preset t2v-480p --data latents/ --vae Wan2.2-TI2V-5B-Diffusers/

Video data: an .npz with `images` (N, F, H, W, C) uint8, `labels`, and optionally `text` (N, L, txt_dim) / `text_mask`
(N, L) precomputed caption embeddings and `task` (N,) 0 = T2V, 1 = V2V (the first half of the latent frames is the
source, the rest the target). Samples are written the same way, so a sample file is valid training data.
"""
from __future__ import annotations

import dataclasses
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

INV_SOFTPLUS_1 = math.log(math.e - 1)  # softplus(a + 0.5413) = 1 at a = 0: every block starts as the identity
TASKS = ("t2v", "v2v")  # the task tag of the prefix; i2v needs none (a first frame is the start of any video)
WAN = ("wan2.1", "wan2.2")


# ----------------------------------------------------------------------------------------------------------------------
# Config


@dataclass
class Config(common.TrainConfig):
    # data
    data: str = "moving-digits"  # moving-digits | .npz: images (N,F,H,W,C) uint8 [labels text text_mask task] | --precompute'd latent folder
    img_size: tuple = common.opt((12, 12), min=1)  # frame height,width in pixels (one value: square; read from --data unless given)
    frames: int = common.opt(4, min=1)  # frames per video (a Wan VAE needs 1 + 4k, giving 1 + k latent frames)
    channels: int = common.opt(1, min=1)  # image channels (read from --data unless given)
    digit_size: int = common.opt(8, min=1)  # moving-digits: side of the digit on the canvas
    videos_per_digit: int = common.opt(8, min=1)  # moving-digits: random trajectories per training digit
    speeds: tuple = common.opt((1, 2), min=0)  # moving-digits: speeds per axis (pixels a frame), random signs
    num_classes: int = 10  # class labels (0 = none); the null label of guidance is extra
    txt_dim: int = 0  # width of precomputed text embeddings (0 = no text conditioning)
    txt_len: int = 0  # text tokens per caption
    vae: str = ""  # "" = pixels | digits (small per-frame image VAE, trained once) | image or Wan video VAE weights
    vae_family: str = common.opt("none", choices=("none", "sd", "sdxl", "flux") + WAN)  # image (per frame) | Wan
    frame_scale: float = common.opt(1.0, gt=0)  # Wan latents: frames 1.. are multiplied by this after encoding
    # model
    patch_size: int = common.opt(2, min=1)  # patch side; tokens are patches of each latent frame
    width: int = common.opt(64, min=1)  # transformer width of the shallow blocks and the denoiser
    deep_width: int = 0  # transformer width of the deep block (0 = --width)
    head_dim: int = common.opt(16, min=2)  # attention head width (even: RoPE)
    layers: tuple = common.opt((2, 2, 6), min=1)  # layers per flow block: shallow (per frame) ones, the deep one last
    cond_deep_only: bool = True  # condition only the deep block (STARFlow-V); else every block, frame by frame
    soft_clip: float = 4.0  # soft clip c*tanh(./c) on the predicted (mu, a); 0 = off
    noise_std: float = 0.1  # Gaussian noise sigma on the latents in training (the denoiser removes it)
    label_drop: float = common.opt(0.1, max=1)  # probability of the null condition in training (for guidance)
    v2v: float = common.opt(0.0, max=1)  # moving-digits: share of V2V training videos (a source, then it reversed)
    drop_image: float = common.opt(0.0, max=1)  # share of training batches that drop the first latent frame
    cond_noise_level: bool = False  # weight the NLL (and so the denoiser's target) by noise_std / 0.3
    final_norm: bool = False  # RMSNorm before every output projection (else: none, the denoiser a LayerNorm)
    pt_seq_len: int = common.opt(0, min=0)  # 0: RoPE on the integer grid; > 0: ml-starflow's RoPE (make_rope)
    grad_ckpt: bool = False  # gradient checkpointing of the transformer layers
    # flow-score matching denoiser
    denoiser_layers: int = 2  # layers of the learned causal denoiser (0 = none)
    denoiser_window: int = common.opt(2, min=1)  # each denoiser layer: frame f attends to frames f-W+1 .. f+1
    denoiser_lr: float = common.opt(2e-3, gt=0)  # the denoiser's learning rate (its own AdamW parameter group)
    # sampler
    sampler: str = common.opt("jacobi", choices=("sequential", "jacobi"))  # sequential (KV cache) | jacobi
    jacobi_chunk: int = common.opt(16, min=1)  # tokens per Jacobi chunk in the first frame and the shallow blocks
    jacobi_chunk_video: int = common.opt(32, min=1)  # tokens per Jacobi chunk of the deep block after the first frame
    jacobi_warm_start: bool = True  # start each chunk after frame 0 from the tokens one frame earlier
    jacobi_max_iter: int = common.opt(32, min=1)  # iterations per chunk at most (>= the chunks: exact at worst)
    jacobi_threshold: float = 1e-7  # stop when every sample's mean((new - old)^2) / mean(new^2) is below this
    guidance: float = 1.0  # STARFlow guidance weight w in the deep block (0 = none)
    denoise: str = common.opt("learned", choices=("learned", "exact", "none"))  # final step: denoiser | flow grad
    long_frames: int = 0  # latent frames to sample, beyond the trained length by a sliding window (0 = trained)
    context_frames: int = 0  # latent frames each new window re-encodes as context (0 = window - 1)
    eval_samples: int = common.opt(200, min=1)  # moving digits: videos sampled per task in an evaluation
    holdout: int = common.opt(0, min=0)  # other data: its last N items stay out of training, for held-out bits/dim

    NAME = "starflow_v"
    RUNTIME = ("data", "vae", "videos_per_digit", "label_drop", "drop_image", "v2v", "speeds", "grad_ckpt",
               "denoiser_lr", "sampler",
               "jacobi_chunk", "jacobi_chunk_video", "jacobi_warm_start", "jacobi_max_iter", "jacobi_threshold",
               "guidance", "denoise", "long_frames", "context_frames", "eval_samples",
               "holdout")

    def __post_init__(self):
        super().__post_init__()
        if len(self.img_size) == 1:
            self.img_size = (self.img_size[0],) * 2
        if len(self.img_size) != 2:
            raise ValueError(f"--img_size takes height,width, got {self.img_size}")
        for w in (self.width, self.deep_width or self.width):
            if w % self.head_dim:
                raise ValueError(f"width {w} is not divisible by --head_dim {self.head_dim}")
        if self.head_dim % 2:
            raise ValueError(f"--head_dim {self.head_dim} must be even (rotary positions)")
        if self.pt_seq_len and (self.head_dim % 4 or self.head_dim < 20):
            raise ValueError(f"--pt_seq_len's RoPE gives time 8 frequency pairs and rows and columns an equal number: "
                             f"--head_dim {self.head_dim} must be a multiple of 4, at least 20")
        if self.frame_scale != 1 and self.vae_family not in WAN:
            raise ValueError(f"--frame_scale {self.frame_scale} scales Wan latent frames: it needs --vae_family "
                             f"wan2.1 or wan2.2")
        if bool(self.txt_dim) != bool(self.txt_len):
            raise ValueError(f"text needs both --txt_dim and --txt_len (got {self.txt_dim}, {self.txt_len})")
        if self.vae_family in WAN and (self.frames - 1) % 4:
            k = (self.frames - 1) // 4
            raise ValueError(f"--frames {self.frames}: the Wan VAE takes 1 + 4k frames (e.g. {1 + 4 * k} or "
                             f"{5 + 4 * k})")
        if self.vae and self.vae_family == "none":
            raise ValueError(f"--vae {self.vae} needs a --vae_family (sd, sdxl, flux for images; wan2.1, wan2.2)")
        if self.denoise == "learned" and not self.denoiser_layers:
            raise ValueError("--denoise learned needs a learned denoiser (--denoiser_layers > 0); else --denoise exact "
                             "or none")
        if self.denoiser_layers and self.noise_std <= 0:
            raise ValueError("the learned denoiser (--denoiser_layers > 0) needs --noise_std > 0 to learn from")
        if self.v2v and self.data == "moving-digits" and self.frames % 2:
            raise ValueError(f"--v2v splits a video into source and target halves: --frames {self.frames} is odd")
        if self.data == "moving-digits" and self.digit_size > min(self.img_size):
            raise ValueError(f"--digit_size {self.digit_size} does not fit the {self.img_size} canvas")


PRESETS = {
    # CPU demo: 8x8 digits moving with constant velocity (bouncing off the walls) on a 12x12 canvas, 4 frames, in pixel
    # space; patches of 2x2 make 36 tokens a frame, 144 a video. Label-conditional. About 40 minutes on 2 CPU cores.
    # (A 4-layer deep block reaches T2V consistency 0.89 in 6000 steps and 0.73 in 3000, against 0.92 here; README.
    # Patches of 4x4 on a 16x16 canvas are 2.5x cheaper but model each 16-pixel patch as independent pixels given
    # the tokens before it, which blurs the digits: frame accuracy 0.28 unguided at 1500 steps against 0.54 here.)
    "moving-digits": dict(img_size=(12, 12), patch_size=2, width=64, layers=(2, 2, 6), steps=6000, batch_size=32,
                          lr=2e-3, denoiser_lr=2e-3, warmup=100, eval_every=3000, ckpt_every=500, log_every=50,
                          guidance=1.0),  # w = 3: +0.01 accuracy and consistency for a worse FD (README)
    # The same with 16x16 digits on a 32x32 canvas encoded frame by frame by the small digits VAE (32x32 -> 4x16x16).
    "moving-digits-vae": dict(img_size=(32, 32), digit_size=16, vae="digits", vae_family="sd", noise_std=0.3,
                              patch_size=4, width=64, layers=(2, 2, 4), steps=2000, batch_size=32, lr=2e-3,
                              warmup=100, eval_every=2000, ckpt_every=500, log_every=50, guidance=3.0),
    # STARFlow-V 7B text-to-video 480p, from ml-starflow configs/starflow-v_7B_t2v_caus_480p.yaml (line numbers):
    "t2v-480p": dict(
        data="latents", channels=3, num_classes=0,
        img_size=(480, 848),  # l.5 img_size 640: area 640^2 at 16:9 -> 480x848 (dataset.py aspect_ratio_to_image_size)
        frames=81,  # l.8 vid_size '81:16' (81 frames at 16 fps -> 21 latent frames)
        vae_family="wan2.2",  # l.41 vae Wan-AI/Wan2.2-TI2V-5B-Diffusers; l.10 channel_size 48 (its latent channels)
        frame_scale=0.6,  # l.41 the spec's ":0.6" (utils/model_setup.py l.122, l.155-156)
        patch_size=1,  # l.11
        width=3072,  # l.12 channels (shallow blocks; also the denoiser's width, transformer_flow.py l.1109-1112)
        deep_width=4096,  # l.13 top_block_channels
        head_dim=64,  # transformer_flow.py l.1007 (Model default)
        pt_seq_len=32, final_norm=True,  # l.27, l.32 (l.23 rope)
        layers=(2, 2, 2, 2, 2, 24),  # l.14 blocks 6, l.15 layers_per_block 2 2 2 2 2 24
        noise_std=0.5, cond_noise_level=True,  # l.16, l.36 (train.py l.256: the loss weighted by 0.5 / 0.3)
        txt_dim=2048, txt_len=256,  # l.43 text google/flan-t5-xl (d_model 2048), l.7 txt_size 256
        label_drop=0.1, drop_image=0.25,  # l.45 drop_label, l.46 drop_image (train.py l.230)
        soft_clip=4.0,  # l.51
        denoiser_layers=8,  # transformer_flow.py l.1110 (num_layers=8) for l.33 learnable_self_denoiser
        denoiser_window=10,  # l.35 denoiser_window (with l.37 temporal_causal 2: one frame of lookahead a layer)
        denoiser_lr=1e-4,  # train.py l.172 (its own AdamW; betas: make_optimizer)
        batch_size=192, lr=5e-5, min_lr=1e-6,  # l.17, l.20, l.21
        grad_clip=1.0,  # l.48
        fsdp=True, grad_ckpt=True,  # l.3 fsdp, l.39 gradient_checkpoint
        # sampling as the released model's script (scripts/test_sample_video.sh l.20-23; l.44 cfg 2.5 is overridden
        # by it, and without it by sample.py l.366's default 5): guidance 3.5, threshold 1e-3, chunks of 32 tokens
        guidance=3.5, jacobi_chunk=32, jacobi_threshold=1e-3, jacobi_max_iter=32,  # (max_iter: sample.py l.362)
        jacobi_chunk_video=128,  # transformer_flow.py l.779: 4x the chunk after the first frame
        context_frames=16,  # sample.py l.374 (--context_length; its window is the 21 trained latent frames)
        steps=300_000, warmup=5000, ema_decay=0.9999, eval_every=10000, ckpt_every=2000, log_every=100),  # ours
}


# ----------------------------------------------------------------------------------------------------------------------
# Model


class CondPrefix(nn.Module):
    """The prefix a transformer attends to from every position: [task tag] + a class token or the text embeddings.
    The null condition (guidance, label dropout) swaps the class for a learned null label, the caption for the null
    caption `null_text` (as ml-starflow: the text encoder's embedding of the empty caption, train.py l.241 with
    utils/common.py l.161; set from the data or from_official, zeros = all padding); the task tag stays. As there,
    padding is zeroed (utils/common.py l.132) and attended: no key mask, so attention stays causal or mask-free."""

    def __init__(self, cfg: Config, width: int):
        super().__init__()
        self.cfg = cfg
        self.tasks = cfg.v2v > 0
        self.len = int(self.tasks) + (cfg.txt_len if cfg.txt_dim else 1 if cfg.num_classes else 0)
        if self.tasks:
            self.task_emb = nn.Embedding(len(TASKS), width)
        if cfg.txt_dim:
            self.proj_txt = nn.Linear(cfg.txt_dim, width)
            self.register_buffer("null_text", torch.zeros(cfg.txt_len, cfg.txt_dim))
        elif cfg.num_classes:
            self.class_emb = nn.Embedding(cfg.num_classes + 1, width)  # + the null label

    def forward(self, cond: dict) -> torch.Tensor:
        """-> prefix (B, L, W)."""
        null, parts = cond["null"], []
        if self.tasks:
            parts.append(self.task_emb(cond["task"])[:, None])
        if self.cfg.txt_dim:
            t = cond["text"].to(self.null_text.dtype) * cond["text_mask"][..., None]  # (B, L, txt_dim)
            t = torch.where(null[:, None, None], self.null_text, t)
            parts.append(self.proj_txt(t.to(self.proj_txt.weight.dtype)))
        elif self.cfg.num_classes:
            parts.append(self.class_emb(torch.where(null, self.cfg.num_classes, cond["y"]))[:, None])
        return torch.cat(parts, 1)


class TableRoPE(common.RoPE):
    """common.RoPE's rotation (pairs (i, i + Dh/2)) with a given angle table (positions, Dh/2)."""

    def __init__(self, angles: torch.Tensor):
        nn.Module.__init__(self)
        self.register_buffer("cos", angles.cos().float(), persistent=False)
        self.register_buffer("sin", angles.sin().float(), persistent=False)


def make_rope(cfg: Config, grid: tuple[int, int], frames: int, prefix: int) -> common.RoPE:
    """Rotary positions of [prefix, frames x grid tokens] (frames 0: one frame of a shallow block, at time 0).
    pt_seq_len 0: the integer (frame, row, column) grid, frequencies split evenly, the prefix unrotated.
    pt_seq_len > 0: ml-starflow's (misc/pe.py get_positions l.39-73, VisionRotaryEmbeddingFast l.75-151): rows and
    columns share (Dh/2 - 8)/2 frequencies base^(-2j/(Dh/2-8)) (l.103, l.110), time 8 frequencies base^(-j/8) (l.118);
    rows and columns at index * pt_seq_len / sqrt(h w) (l.51-52), time at the frame index, the prefix at row = column
    = 0 and time j / L * pt_seq_len (l.67-70). Its interleaved pairs (2i, 2i+1) are our (i, i + Dh/2): from_official
    permutes the q, k weights to match."""
    if not cfg.pt_seq_len:
        return common.RoPE(cfg.head_dim, (frames, *grid) if frames else grid, prefix=prefix)
    (h, w), n, P = grid, grid[0] * grid[1], cfg.head_dim // 2
    f64 = dict(dtype=torch.float64)
    s = cfg.pt_seq_len / math.sqrt(h * w)
    rows, cols = torch.meshgrid(torch.arange(h, **f64) * s, torch.arange(w, **f64) * s, indexing="ij")
    T = max(frames, 1)
    pos = torch.stack([rows.flatten().repeat(T), cols.flatten().repeat(T),
                       torch.arange(T, **f64).repeat_interleave(n) if frames else torch.zeros(n, **f64)], 1)
    if prefix:
        pre = torch.zeros(prefix, 3, **f64)
        pre[:, 2] = torch.arange(prefix, **f64) / prefix * cfg.pt_seq_len
        pos = torch.cat([pre, pos])
    fs = 10000.0 ** (-torch.arange(0, P - 8, 2, **f64) / (P - 8))
    ft = 10000.0 ** (-torch.arange(8, **f64) / 8)
    return TableRoPE(torch.cat([pos[:, :1] * fs, pos[:, 1:2] * fs, pos[:, 2:] * ft], 1))  # (L + T*n, P)


class FlowBlock(nn.Module):
    """One autoregressive affine flow over a token sequence (B, S, D) in this block's order:

        z_s = (x_s - mu_s) / sigma_s,   (mu_s, a_s) = transformer([sos, x_0 .. x_{s-1}]),   sigma = softplus(a + 0.5413)

    log|det| = -sum log sigma. A shallow block sees one frame (S = N tokens, 2D RoPE, `flip` reverses the order
    within the frame); the deep block sees a whole video (S = T*N, 3D RoPE over (frame, row, column), never flipped, so
    it is causal in time). A conditioned block puts the CondPrefix before the tokens."""

    def __init__(self, cfg: Config, n_layers: int, width: int, token_dim: int, grid: tuple[int, int], flip: bool,
                 conditioned: bool, temporal: bool):
        super().__init__()
        self.cfg, self.flip, self.temporal, self.grid = cfg, flip, temporal, grid
        self.cond = CondPrefix(cfg, width) if conditioned else None
        self.L = self.cond.len if conditioned else 0
        self.proj_in = nn.Linear(token_dim, width)
        self.layers = nn.ModuleList([common.Block(width, width // cfg.head_dim) for _ in range(n_layers)])
        self.norm = nn.RMSNorm(width, eps=1e-6) if cfg.final_norm else None  # transformer_flow.py l.425-427, l.557
        self.proj_out = nn.Linear(width, 2 * token_dim)
        nn.init.zeros_(self.proj_out.weight)  # (mu, a) = 0: the block starts as the identity
        nn.init.zeros_(self.proj_out.bias)
        self.sos = nn.Parameter(torch.randn(1, 1, token_dim))
        self._ropes = {}  # RoPE tables per sequence length (non-persistent; windows and long videos vary the length)

    def rope(self, S: int, device) -> common.RoPE:
        key = (S, str(device))
        if key not in self._ropes:
            frames = S // (self.grid[0] * self.grid[1]) if self.temporal else 0
            self._ropes[key] = make_rope(self.cfg, self.grid, frames, self.L).to(device)
        return self._ropes[key]

    def prefix(self, cond: dict):
        return self.cond(cond) if self.cond is not None else None

    def run(self, u: torch.Tensor, start: int, S: int, prefix=None, caches=None):
        """The network on stream positions start..start+n (u: (B, n, D)) of a length-S sequence -> (mu, log sigma),
        each (B, n, D) in fp32. With caches, the prefix and the earlier positions are already in them."""
        B, n, _ = u.shape
        h = self.proj_in(u.to(self.proj_in.weight.dtype))  # the flow's state is fp32; the network may be bf16
        L = 0
        if prefix is not None:
            h, L = torch.cat([prefix.to(h.dtype), h], 1), prefix.shape[1]
        p0 = 0 if prefix is not None else self.L + start  # absolute position of h[:, 0]
        # causal over [prefix, tokens] as ml-starflow (the prefix too): is_causal, or a lower-right bias after a cache
        kw = dict(causal=True, rope=self.rope(S, u.device), pos=slice(p0, p0 + h.shape[1]))
        for i, layer in enumerate(self.layers):
            c = None if caches is None else caches[i]
            if self.cfg.grad_ckpt and self.training:
                h = checkpoint(lambda x, lyr=layer, c=c: lyr(x, cache=c, **kw), h, use_reentrant=False)
            else:
                h = layer(h, cache=c, **kw)
        h = h[:, L:]
        out = self.proj_out(h if self.norm is None else self.norm(h))  # (B, n, 2D)
        if self.cfg.soft_clip > 0:
            out = self.cfg.soft_clip * torch.tanh(out / self.cfg.soft_clip)
        a, mu = _fp32(out).chunk(2, -1)
        return mu, F.softplus(a + INV_SOFTPLUS_1).log()

    def stream(self, x: torch.Tensor, s: int, e: int) -> torch.Tensor:
        """Network inputs at positions s..e: [sos, x_0 .. x_{S-2}][s:e] (position p predicts token p)."""
        if s > 0:
            return x[:, s - 1:e - 1]
        return torch.cat([self.sos.expand(x.shape[0], 1, -1).to(x.dtype), x[:, :e - 1]], 1)

    def forward(self, x: torch.Tensor, cond: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, S, D) -> z (B, S, D) in fp32, log|det dz/dx| (B,)."""
        x = x.flip(1) if self.flip else x
        mu, log_sigma = self.run(self.stream(x, 0, x.shape[1]), 0, x.shape[1], self.prefix(cond))
        z = (_fp32(x) - mu) * torch.exp(-log_sigma)
        return (z.flip(1) if self.flip else z), -log_sigma.sum((1, 2))

    def new_caches(self, batch: int, S: int, device, dtype) -> list[common.KVCache]:
        return [layer.attn.new_cache(batch, self.L + S, device, dtype) for layer in self.layers]

    @torch.no_grad()
    def reverse(self, z: torch.Tensor, cond: dict, guidance: float = 0.0, chunk: int = 1, chunk_video: int = 1,
                frame: int = 0, warm: bool = False, max_iter: int = 1, threshold: float = 0.0,
                known: torch.Tensor | None = None, caches=None) -> tuple[torch.Tensor, int]:
        """z (B, S, D) -> x, and the number of network evaluations. Chunked Jacobi: iterate x_chunk <- mu(x_<) +
        sigma(x_<) z_chunk on top of the cached prefix, rewinding the cache between iterations; chunk = 1 is the
        sequential sampler (exact after one step). Video-aware (deep block, `frame` = tokens per frame): after the
        first frame the chunks hold `chunk_video` tokens, and with `warm` iteration 0 starts from the tokens one frame
        earlier at the same places. `known` (B, n, D): inputs given for positions 0..n (image-to-video, video-to-video,
        a sliding window's context), pushed through in one forward to fill the cache. Guidance: batched cond/null.
        As in starflow.py, a chunk stops when every sample's relative change is below `threshold` (a batch mean let 14
        of 64 videos of the trained demo stop unconverged, off by up to 0.07), a non-finite iterate counts as
        unconverged and is zeroed, and a chunk still non-finite at its last iterate is redone token by token, so
        Jacobi never returns a non-finite video where the sequential sampler would not."""
        B, S = z.shape[:2]
        if self.flip and known is not None:
            raise ValueError("a known prefix needs the block's natural order (the deep block)")
        z = _fp32(z.flip(1) if self.flip else z)
        guided = guidance > 0 and self.cond is not None
        if guided:
            cond = {**{k: torch.cat([v, v]) for k, v in cond.items()},
                    "null": torch.cat([cond["null"], torch.ones_like(cond["null"])])}
        prefix = self.prefix(cond)
        dtype = self.proj_in.weight.dtype
        if caches is None:
            caches = self.new_caches(2 * B if guided else B, S, z.device, dtype)
        for c in caches:  # a fresh window
            c.rewind(c.len)

        def net(s, e, first):
            u = self.stream(x, s, e).to(dtype)
            mu, log_sigma = self.run(torch.cat([u, u]) if guided else u, s, S, prefix if first else None, caches)
            return guide(mu[:B], log_sigma[:B], mu[B:], log_sigma[B:], guidance) if guided else (mu, log_sigma)

        x, s, nfe = z.clone(), 0, 0
        if known is not None and known.shape[1]:
            s = known.shape[1]
            x[:, :s] = known
            net(0, s, True)  # fills the cache; the outputs would only map the known x back to its z
            nfe += 1
        while s < S:
            e = min(s + (chunk if not frame or s < frame else chunk_video), S)
            if warm and frame and s >= frame:  # the last decoded frame, tiled over the chunk, as iteration 0's guess
                x[:, s:e] = x[:, s - frame + torch.arange(e - s, device=x.device) % frame]
            if e - s == 1:  # one token: exact in one step, no convergence test (no host sync)
                mu, log_sigma = net(s, e, s == 0)
                x[:, s:e] = mu + log_sigma.exp() * z[:, s:e]
                nfe, s = nfe + 1, e
                continue
            n_iter = min(max_iter, e - s)  # a chunk of n tokens is exact after n iterations
            for it in range(n_iter):
                mu, log_sigma = net(s, e, s == 0)
                nfe += 1
                new = mu + log_sigma.exp() * z[:, s:e]
                finite = torch.isfinite(new).all(2).all(1)  # (B,)
                new = torch.nan_to_num(new, nan=0.0, posinf=0.0, neginf=0.0)
                change = (new - x[:, s:e]).double().square().mean((1, 2)) / \
                    new.double().square().mean((1, 2)).clamp(min=1e-12)
                x[:, s:e] = new
                if it == n_iter - 1 or common.all_ranks((finite & (change < threshold)).all()):
                    break
                for c in caches:  # forget this iteration's keys (and a prefix written with chunk 0): recompute them
                    c.rewind(e - s + (self.L if s == 0 else 0))
            if not common.all_ranks(finite.all()):  # rare: redo this chunk exactly, one token at a time
                for c in caches:
                    c.rewind(e - s + (self.L if s == 0 else 0))
                for p in range(s, e):
                    mu, log_sigma = net(p, p + 1, p == 0)
                    x[:, p:p + 1] = mu + log_sigma.exp() * z[:, p:p + 1]
                    nfe += 1
            s = e
        return (x.flip(1) if self.flip else x), nfe


def _fp32(x: torch.Tensor) -> torch.Tensor:
    """The affine maps run in (at least) fp32 even when the transformer runs in bf16."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def guide(mu_c, log_sigma_c, mu_u, log_sigma_u, w):
    """STARFlow guidance: sample p_c^(1+w) / p_u^w, a Gaussian. With s = min(sigma_c/sigma_u, 1)^2,
    sigma = sigma_c / sqrt(1 + w - w s),  mu = ((1 + w) mu_c - w s mu_u) / (1 + w - w s)."""
    s = torch.exp(2 * (log_sigma_c - log_sigma_u)).clamp(max=1.0)
    prec = 1 + w - w * s
    return ((1 + w) * mu_c - w * s * mu_u) / prec, log_sigma_c - 0.5 * torch.log(prec)


class Denoiser(nn.Module):
    """Flow-score matching's light denoiser: predicts k sigma * grad NLL(x~) (minus the score, k = --cond_noise_level's
    sigma/0.3 else 1) of noisy latent tokens (B, T, N, D). Every layer attends within a frame and across frames
    f-W+1 .. f+1 (and the condition prefix, whose queries see the prefix and frames 0, 1), as ml-starflow's
    NonCausalBlock (transformer_flow.py l.943-957 with temporal_causal 2). Stacked, L layers make output frame f
    depend on input frames f - L(W-1) .. f + L: L frames of lookahead, not one. Attention is one mask-free call per
    frame (common.Attention's spans): no dense mask at any length."""

    def __init__(self, cfg: Config, token_dim: int, grid: tuple[int, int]):
        super().__init__()
        self.cfg, self.grid = cfg, grid
        W = cfg.width
        self.cond = CondPrefix(cfg, W) if (cfg.num_classes or cfg.txt_dim or cfg.v2v) else None
        self.L = self.cond.len if self.cond is not None else 0
        self.proj_in = nn.Linear(token_dim, W)
        self.layers = nn.ModuleList([common.Block(W, W // cfg.head_dim) for _ in range(cfg.denoiser_layers)])
        self.norm = nn.RMSNorm(W, eps=1e-6) if cfg.final_norm else nn.LayerNorm(W)  # (official: l.938, else none)
        self.proj_out = nn.Linear(W, token_dim)
        nn.init.zeros_(self.proj_out.weight)  # predicts a zero score at first
        nn.init.zeros_(self.proj_out.bias)
        self._ropes = {}

    @property
    def reach(self) -> tuple[int, int]:
        """(frames behind, frames ahead) that one output frame depends on through all the layers."""
        return len(self.layers) * (self.cfg.denoiser_window - 1), len(self.layers)

    def spans(self, fidx: list[int]) -> list:
        """Attention spans of [prefix, frames with the (increasing) indices fidx]: (query slice, key slices) for the
        prefix and each frame. Bands of increasing indices are contiguous: at most two key slices a query."""
        n, L, W = self.grid[0] * self.grid[1], self.L, self.cfg.denoiser_window
        upto = lambda t: sum(f <= t for f in fidx)  # frames of index <= t
        out = [(slice(0, L), (slice(0, L + upto(1) * n),))] if L else []
        for i, f in enumerate(fidx):
            a, b = upto(f - W), upto(f + 1)  # the frames of index f-W+1 .. f+1
            keys = (slice(0, L + b * n),) if a == 0 else (slice(0, L), slice(L + a * n, L + b * n))
            out.append((slice(L + i * n, L + (i + 1) * n), tuple(k for k in keys if k.stop > k.start)))
        return out

    def forward(self, x: torch.Tensor, cond: dict, fidx: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, T, N, D) -> (B, T, N, D) in fp32. fidx (T,): the frames' indices in the video (default 0..T-1; a
        chunk of a long video: its time positions and attention bands)."""
        B, T, n, _ = x.shape
        fidx = torch.arange(T, device="cpu") if fidx is None else fidx.cpu()  # host indices: they shape the bands
        h = self.proj_in(x.flatten(1, 2).to(self.proj_in.weight.dtype))  # (B, T*N, W)
        if self.cond is not None:
            h = torch.cat([self.cond(cond).to(h.dtype), h], 1)
        key = (int(fidx[-1]) + 1, str(x.device))
        if key not in self._ropes:
            self._ropes[key] = make_rope(self.cfg, self.grid, key[0], self.L).to(x.device)
        pos = torch.cat([torch.arange(self.L, device="cpu"),
                         self.L + (fidx[:, None] * n + torch.arange(n, device="cpu")).flatten()])
        kw = dict(spans=self.spans(fidx.tolist()), rope=self._ropes[key], pos=pos.to(x.device))
        for layer in self.layers:
            if self.cfg.grad_ckpt and self.training:
                h = checkpoint(lambda x, lyr=layer: lyr(x, **kw), h, use_reentrant=False)
            else:
                h = layer(h, **kw)
        return _fp32(self.proj_out(self.norm(h[:, self.L:]))).view_as(x)


class STARFlowV(nn.Module):
    """Patchify each latent frame; shallow FlowBlocks per frame, the deep FlowBlock over the whole video; denoiser."""

    def __init__(self, cfg: Config, channels: int, height: int, width: int, frames: int):
        super().__init__()
        p = cfg.patch_size
        if height % p or width % p:
            raise ValueError(f"latent frame {height}x{width} is not divisible by patch_size {p}")
        self.cfg, self.C, self.H, self.W, self.T = cfg, channels, height, width, frames
        self.grid = (height // p, width // p)
        self.N, self.D = self.grid[0] * self.grid[1], channels * p * p  # tokens per frame, token width
        K = len(cfg.layers)
        has_cond = bool(cfg.num_classes or cfg.txt_dim or cfg.v2v)
        # the shallow block next to the deep one reads each frame backwards, then the orders alternate
        self.blocks = nn.ModuleList([FlowBlock(cfg, n, cfg.width, self.D, self.grid, flip=(K - 1 - i) % 2 == 1,
                                               conditioned=has_cond and not cfg.cond_deep_only, temporal=False)
                                     for i, n in enumerate(cfg.layers[:-1])])
        self.blocks.append(FlowBlock(cfg, cfg.layers[-1], cfg.deep_width or cfg.width, self.D, self.grid, flip=False,
                                     conditioned=has_cond, temporal=True))
        self.denoiser = Denoiser(cfg, self.D, self.grid) if cfg.denoiser_layers else None

    @torch.no_grad()
    def set_null_text(self, emb: torch.Tensor):
        """The null caption's embedding (txt_len, txt_dim) in every conditioned block and the denoiser."""
        for m in self.modules():
            if isinstance(m, CondPrefix) and m.cfg.txt_dim:
                m.null_text.copy_(emb)

    @property
    def deep(self) -> FlowBlock:
        return self.blocks[-1]

    def patchify(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, C, H, W) -> (B, T, N, p*p*C)
        B, T, C, H, W = x.shape
        if (C, H, W) != (self.C, self.H, self.W):
            raise ValueError(f"video frames of shape {(C, H, W)}, the model takes {(self.C, self.H, self.W)}")
        p, (gh, gw) = self.cfg.patch_size, self.grid
        return x.reshape(B, T, C, gh, p, gw, p).permute(0, 1, 3, 5, 4, 6, 2).reshape(B, T, self.N, self.D)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, N, p*p*C) -> (B, T, C, H, W)
        B, T = x.shape[:2]
        p, (gh, gw) = self.cfg.patch_size, self.grid
        return x.reshape(B, T, gh, gw, p, p, self.C).permute(0, 1, 6, 2, 4, 3, 5).reshape(B, T, self.C, self.H, self.W)

    def shallow(self, tokens: torch.Tensor, cond: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """The local flows on every frame at once: (B, T, N, D) -> deep-block inputs (B, T*N, D), log|det| (B,)."""
        B, T = tokens.shape[:2]
        u, logdet, fcond = tokens.reshape(B * T, self.N, self.D), 0.0, fold_cond(cond, T)
        for block in self.blocks[:-1]:
            u, ld = block(u, fcond)
            logdet = logdet + ld.view(B, T).sum(1)
        return u.reshape(B, T * self.N, self.D), logdet

    def forward(self, x: torch.Tensor, cond: dict, fsm_sigma: float = 0.0):
        """x (B, T, C, H, W) -> z (B, T*N, D), log|det| (B,), and with fsm_sigma > 0 the flow-score-matching tap
        (unit, fsm, fsm_rel) of ScoreTap: the denoiser reads the detached tokens in this same forward (one call for
        DDP/FSDP) and learns in this same backward."""
        tokens = self.patchify(x)
        tap = None
        if fsm_sigma > 0:
            pred = self.denoiser(tokens.detach(), cond)
            tokens, *tap = ScoreTap.apply(tokens, pred, fsm_sigma)
        u, logdet = self.shallow(tokens, cond)
        z, ld = self.deep(u, cond)
        return z, logdet + ld, tap

    def log_prob(self, x: torch.Tensor, cond: dict) -> torch.Tensor:
        """Exact log density (B,) in nats, Gaussian prior included."""
        z, logdet, _ = self(x, cond)
        return -0.5 * _fp32(z).square().sum((1, 2)) - 0.5 * math.log(2 * math.pi) * z[0].numel() + logdet

    def make_cond(self, y=None, text=None, text_mask=None, null=None, task=None, batch: int | None = None,
                  check: bool = True) -> dict:
        """The conditioning dict: labels y (B,), or text (B, L, txt_dim) + text_mask; `task` (B,) indexes TASKS
        (default t2v); `null` marks samples given the null condition. check=False skips the range checks of labels
        and tasks (host syncs; the training step's data is checked once, when it is loaded)."""
        cfg = self.cfg
        B = batch or (y.shape[0] if y is not None else text.shape[0])
        dev = next(self.parameters()).device
        cond = {"null": torch.zeros(B, dtype=torch.bool, device=dev) if null is None else null.to(dev)}
        if cfg.txt_dim:
            if text is None or text.shape[1:] != (cfg.txt_len, cfg.txt_dim):
                raise ValueError(f"text embeddings must be (B, {cfg.txt_len}, {cfg.txt_dim}), got "
                                 f"{None if text is None else tuple(text.shape)}")
            cond["text"] = text.to(dev)
            cond["text_mask"] = torch.ones(text.shape[:2], dtype=torch.bool, device=dev) if text_mask is None \
                else text_mask.bool().to(dev)
        elif cfg.num_classes:
            if y is None or (check and (y.min() < 0 or y.max() >= cfg.num_classes)):
                raise ValueError(f"class labels must be in [0, {cfg.num_classes}), got "
                                 f"{None if y is None else (int(y.min()), int(y.max()))}")
            cond["y"] = y.to(dev)
        if cfg.v2v:
            task = torch.zeros(B, dtype=torch.long) if task is None else task
            if check and (task.min() < 0 or task.max() >= len(TASKS)):
                raise ValueError(f"task must index {TASKS}, got {task.tolist()}")
            cond["task"] = task.long().to(dev)
        elif task is not None and check and task.any():
            raise ValueError("video-to-video needs a model trained with it (--v2v > 0)")
        return cond


def fold_cond(cond: dict, T: int) -> dict:
    """The condition of each frame when frames are folded into the batch (B -> B*T)."""
    return {k: v.repeat_interleave(T, 0) for k, v in cond.items()}


# ----------------------------------------------------------------------------------------------------------------------
# Loss


class ScoreTap(torch.autograd.Function):
    """Flow-score matching for the price of the NLL's own backward (ml-starflow reads x.grad after the main backward;
    this is the same inside one loss, so train()'s single backward, gradient accumulation and DDP/FSDP need nothing
    else). Forward: the identity on the noisy tokens x~ (B, T, N, D), plus `unit`, a scalar 0 the loss adds, and two
    buffers for the log. Backward: the gradient arriving at x~ is w k grad_x~ NLL_i / (B * numel) (the NLL is a mean,
    weighted by k; w, whatever train() scaled the loss by, is the gradient arriving at the unweighted `unit`), so

        target = k sigma grad NLL(x~) = -k sigma grad log p(x~) = sigma * g * B * numel / w,
        fsm = mean((pred - target)^2)

    as ml-starflow's train.py l.276-280 (its x.grad * numel * sigma), and the prediction gets w * d fsm / d pred. The
    target is a detached gradient and the denoiser reads x~ detached: the MSE reaches only the denoiser's weights, the
    NLL only the flow's."""

    @staticmethod
    def forward(ctx, tokens, pred, sigma):
        ctx.save_for_backward(pred)
        ctx.sigma = sigma
        ctx.logs = tokens.new_zeros(()), tokens.new_zeros(())  # fsm, fsm_rel: written by the backward
        ctx.mark_non_differentiable(*ctx.logs)
        return tokens.view_as(tokens), tokens.new_zeros(()), *ctx.logs

    @staticmethod
    def backward(ctx, g, w, *_):
        (pred,) = ctx.saved_tensors
        w = w.clamp(min=1e-30)
        target = ctx.sigma * g * (g.shape[0] * g[0].numel()) / w
        err = pred - target
        fsm = err.square().mean()
        # the target's scale grows as the flow sharpens (about 0.1 at the identity init, about 1 once it fits the
        # data), so the error relative to it is the figure that shows the denoiser learning
        ctx.logs[0].copy_(fsm.detach())
        ctx.logs[1].copy_(fsm.detach() / target.square().mean().clamp(min=1e-12))
        return g, w * 2 * err / err.numel(), None


def train_loss(net, x: torch.Tensor, cond: dict, noise_std: float, denoiser: bool,
               weight: float = 1.0) -> tuple[torch.Tensor, dict]:
    """NLL of the noisy latents x~ = x + sigma eps (mean over dimensions, nats) times `weight` k (--cond_noise_level:
    sigma / 0.3, train.py l.256), plus, with `denoiser`, flow-score matching: the denoiser regresses target = k sigma
    grad_x~ NLL(x~), the flow's own score scaled to about unit variance (for the true score of x~ it is k eps on
    average), taken from this step's backward by ScoreTap. It trains in its own AdamW parameter group
    (make_optimizer): the reference's second optimizer in one. (ml-starflow's train.py hard-codes `needs_update =
    False`, l.248, so neither of its optimizers ever steps; here both do.)"""
    x = x + noise_std * torch.randn_like(x)
    z, logdet, tap = net(x, cond, fsm_sigma=noise_std if denoiser else 0.0)
    nll = (0.5 * _fp32(z).square().sum((1, 2)) - logdet).mean() / z[0].numel()
    loss, logs = weight * nll, {"nll": nll.detach()}
    if denoiser:
        unit, fsm, fsm_rel = tap
        loss = loss + unit  # 0; its gradient tells ScoreTap the loss scale
        logs.update(fsm=fsm, fsm_rel=fsm_rel)  # filled in by the backward, before train() reads the log
    return loss, logs


def make_optimizer(model: STARFlowV, cfg: Config) -> torch.optim.AdamW:
    """AdamW with the denoiser in its own parameter groups at --denoiser_lr and AdamW's default betas (0.9, 0.999)
    as ml-starflow's denoiser optimizer (train.py l.172; the flow's are --beta1/--beta2, l.167: 0.9, 0.95) (weight
    decay on matrices only). The parameter sets and losses are disjoint, so this is two optimizers but for train()'s
    one global-norm clip."""
    return common.make_optimizer(model, cfg, {"denoiser.": {"lr": cfg.denoiser_lr, "betas": (0.9, 0.999)}})


def loss_weight(cfg: Config) -> float:
    """k: the NLL's weight, and so the scale of the denoiser's target k sigma grad NLL."""
    return cfg.noise_std / 0.3 if cfg.cond_noise_level else 1.0


# ----------------------------------------------------------------------------------------------------------------------
# Sampler


@torch.no_grad()
def sample(model: STARFlowV, cond: dict, cfg: Config, z: torch.Tensor | None = None, generator=None,
           context: torch.Tensor | None = None) -> tuple[torch.Tensor, int]:
    """Latent videos (B, T_out, C, H, W) and the number of network evaluations.

    The deep block first (from the prior: video-aware Jacobi, or token by token with the KV cache), then the shallow
    blocks of the new frames, every frame in parallel, then the denoising step. `context` (B, n, C, H, W): model-space
    frames carrying the training noise, given as a causal prefix: pushed forward through the shallow blocks, their
    deep-block inputs fill the cache and generation goes on from frame n (image-to-video: n = 1; video-to-video: the
    source half, with the v2v task in `cond`); they come back as they went in (before the denoising step). Past the
    trained length (cfg.long_frames) a window of T frames slides: each new window resets the cache and re-encodes the
    last context_frames frames, so memory is that of one window. z: (B, T_out*N, D) prior noise (context: unused)."""
    B, N, D, T = cond["null"].shape[0], model.N, model.D, model.T
    dev = next(model.parameters()).device
    n_ctx = 0 if context is None else context.shape[1]
    v2v = bool(cond.get("task", torch.zeros(1)).any())
    total = T if v2v else (cfg.long_frames or T)  # a V2V pair is one window: its source half and its target half
    c = cfg.context_frames or T - 1
    if n_ctx >= total:
        raise ValueError(f"a context of {n_ctx} frames leaves nothing to generate in {total} frames")
    if total > T and c >= T:
        raise ValueError(f"--context_frames {c} must be below the window of {T} latent frames")
    if z is None:
        z = torch.randn(B, total * N, D, device=dev, generator=generator)
    jacobi = cfg.sampler == "jacobi"
    it = dict(chunk=cfg.jacobi_chunk if jacobi else 1, max_iter=cfg.jacobi_max_iter if jacobi else 1,
              threshold=cfg.jacobi_threshold)
    deep = model.deep
    guided = cfg.guidance > 0 and deep.cond is not None
    frames, nfe, known, done = [], 0, None, n_ctx
    with common.decoding(dev):  # (inference tensors inside: the exact score step below needs a clone)
        caches = deep.new_caches(2 * B if guided else B, min(T, total) * N, dev, deep.proj_in.weight.dtype)
        if n_ctx:
            known, _ = model.shallow(model.patchify(context), cond)  # the deep-block inputs of the given frames
            frames.append(context)
        while done < total:
            start = 0 if done == n_ctx else done - c  # later windows restart c frames back, with those frames known
            end = min(start + T, total)
            x, n = deep.reverse(z[:, start * N:end * N], cond, cfg.guidance, chunk_video=cfg.jacobi_chunk_video
                                if jacobi else 1, frame=N, warm=jacobi and cfg.jacobi_warm_start, known=known,
                                caches=caches, **it)
            known, k = x[:, x.shape[1] - c * N:], end - done  # the next window's context
            u, fcond = x[:, (done - start) * N:].reshape(B * k, N, D), fold_cond(cond, k)
            for block in reversed(model.blocks[:-1]):  # local blocks: all new frames at once, no cross-frame state
                u, m = block.reverse(u, fcond, **it)
                n += m
            frames.append(model.unpatchify(u.view(B, k, N, D)))
            nfe, done = nfe + n, end
    x = torch.cat(frames, 1)  # (outside inference mode: a normal tensor)
    if cfg.denoise == "learned":  # (the config guarantees a denoiser and sigma > 0)
        # Tweedie, x + sigma^2 grad log p = x - (sigma / k) * (k sigma grad NLL), the denoiser's output. With
        # --cond_noise_level (k = sigma / 0.3) this is ml-starflow's x - 0.3 * output (inference.py l.192); without
        # it that step would be x + 0.3 sigma grad log p, Tweedie only at sigma = 0.3: we keep the formula
        x = x - cfg.noise_std / loss_weight(cfg) * learned_score(model, x, cond)
    elif cfg.denoise == "exact" and cfg.noise_std > 0:
        if x.shape[1] > T:
            raise ValueError("--denoise exact needs the video in one window; long videos take --denoise learned")
        x = exact_denoise(model, x, cond, cfg.noise_std)
    return x, nfe


def learned_score(model: STARFlowV, x: torch.Tensor, cond: dict) -> torch.Tensor:
    """The denoiser's output (k sigma grad NLL) on latent videos (B, T', C, H, W), T frames of output at a time. Each
    chunk reads its whole receptive field (Denoiser.reach: L(W-1) frames before, L after) at their own time positions,
    plus the first L+1 frames when it starts later (the prefix's queries see frames 0, 1, and every frame sees the
    prefix), so a long video chunked equals one pass over all of it, in one chunk's memory."""
    tokens, Tn, den = model.patchify(x), x.shape[1], model.denoiser
    back, ahead = den.reach
    out = []
    for s in range(0, Tn, model.T):
        e = min(s + model.T, Tn)
        a, b = max(0, s - back), min(Tn, e + ahead)
        pin = min(ahead + 1, a) if den.L else 0
        idx = torch.cat([torch.arange(pin), torch.arange(a, b)])
        out.append(den(tokens[:, idx.to(x.device)], cond, fidx=idx)[:, pin + s - a:pin + e - a])
    return model.unpatchify(torch.cat(out, 1))


def exact_denoise(model: STARFlowV, x: torch.Tensor, cond: dict, sigma: float) -> torch.Tensor:
    """The fallback (TARFlow/STARFlow): Tweedie with the flow's exact score, x + sigma^2 grad log p(x), by autograd."""
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        (score,) = torch.autograd.grad(model.log_prob(x, cond).sum(), x)
    return (x + sigma ** 2 * score).detach()


# ----------------------------------------------------------------------------------------------------------------------
# Data, VAE and evaluation


def _bounce(q, span):
    """Positions q moving freely -> inside [0, span], reflected at both walls (a triangle wave; span 0 stays put)."""
    if isinstance(q, np.ndarray):
        m = np.mod(q, np.maximum(2 * span, 1))
        return np.where(m <= span, m, 2 * span - m)
    m = torch.remainder(q, (2 * span).clamp(min=1))
    return torch.where(m <= span, m, 2 * span - m)


def moving_digits(cfg: Config, split: str = "train"):
    """scikit-learn digits moving on a canvas: start anywhere, a velocity of +-speed pixels a frame on each axis,
    bouncing off the walls. -> videos uint8 (n, F, 1, H, W), labels (n,), boxes (n, F, 2) (the digit's top-left
    corner), task (n,). V2V training videos (share cfg.v2v) are a source half, then the same frames reversed."""
    digits, labels = common.load_digits(split, cfg.digit_size)
    reps = cfg.videos_per_digit if split == "train" else 1
    digits, labels = digits.repeat_interleave(reps, 0), labels.repeat_interleave(reps)
    rng = np.random.default_rng([cfg.seed, split == "test"])
    n, d, (H, W), T = len(labels), cfg.digit_size, cfg.img_size, cfg.frames
    span = np.array([H - d, W - d])
    p0, v = rng.integers(0, span + 1, (n, 2)), rng.choice(cfg.speeds, (n, 2)) * rng.choice([-1, 1], (n, 2))
    boxes = torch.as_tensor(_bounce(p0[:, None] + v[:, None] * np.arange(T)[None, :, None], span))  # (n, T, 2)
    task = torch.as_tensor((rng.random(n) < cfg.v2v) & (split == "train")).long()
    half = T // 2
    boxes[task == 1, half:] = boxes[task == 1, :half].flip(1)
    videos = torch.zeros(n, T, 1, H, W, dtype=torch.uint8)
    i, t = torch.arange(n)[:, None].expand(n, T), torch.arange(T)[None].expand(n, T)
    for dy in range(d):  # paste the digit: d*d vectorised writes
        for dx in range(d):
            videos[i, t, 0, boxes[..., 0] + dy, boxes[..., 1] + dx] = digits[:, None, 0, dy, dx].expand(n, T)
    return videos, labels, boxes, task


def load_vae(cfg: Config, device):
    if cfg.vae_family == "none":
        return None
    if not cfg.vae:
        raise ValueError(f"--vae_family {cfg.vae_family} needs --vae PATH to the VAE weights")
    if cfg.vae_family in WAN:
        return common.load_video_vae(cfg.vae, cfg.vae_family, device=device)
    path = common.digits_vae(cfg.digit_size) if cfg.vae == "digits" else cfg.vae  # trained once, about a minute
    return common.load_vae(path, family=cfg.vae_family, device=device).eval()


def latent_shape(cfg: Config, vae=None) -> tuple[int, int, int, int]:
    """(channels, height, width, frames) of what the flow models: pixels, per-frame image latents or Wan latents
    (a family's default factors when no VAE is loaded, e.g. training on precomputed latents)."""
    H, W = cfg.img_size
    if cfg.vae_family == "none":
        return cfg.channels, H, W, cfg.frames
    down, ch = (vae.downsample, vae.latent_channels) if vae is not None else \
        {"sd": (8, 4), "sdxl": (8, 4), "flux": (8, 16), "wan2.1": (8, 16), "wan2.2": (16, 48)}[cfg.vae_family]
    if H % down or W % down:
        raise ValueError(f"img_size {H}x{W} is not divisible by the VAE's downsampling {down}")
    return ch, H // down, W // down, 1 + (cfg.frames - 1) // 4 if cfg.vae_family in WAN else cfg.frames


def posterior(x: torch.Tensor, vae, family: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """uint8 videos (B, F, C, H, W) -> (mean, logvar) of the normalised latents (B, T, c, h, w) (logvar None: pixels
    or an image VAE, whose mean is used). Wan2.2 as ml-starflow (misc/wan_vae2.py l.962-967): the normalised mean
    plus exp(logvar / 2) unnormalised (it does not divide the std by latents_std); Wan2.1 as diffusers' posterior
    sample, normalised (utils/model_setup.py l.160-166)."""
    v = common.to_float(x)
    if vae is None:
        return v, None
    if not isinstance(vae, common.VideoVAE):
        return vae.encode(v.flatten(0, 1)).unflatten(0, v.shape[:2]), None
    p = next(vae.ae.parameters())
    mean, logvar = (t.to(v.device, torch.float32) for t in vae.ae.encode(v.transpose(1, 2).to(p.device, p.dtype)))
    logvar = logvar.clamp(-30.0, 20.0)
    if family == "wan2.1":
        logvar = logvar - 2 * vae.latents_std.log()
    return ((mean - vae.latents_mean) / vae.latents_std).transpose(1, 2), logvar.transpose(1, 2)


def to_model_space(x: torch.Tensor, vae, cfg: Config, logvar: torch.Tensor | None = None,
                   sample: bool = False) -> torch.Tensor:
    """uint8 videos (B, F, C, H, W) -> [-1, 1] pixels, per-frame image latents, or Wan latents (B, T, c, h, w); float
    input is precomputed latents (posterior means, with `logvar`) already. `sample`: a posterior sample (training, as
    ml-starflow's VAE.encode), else the mean. Wan latent frames 1.. are then scaled by --frame_scale (the official
    spec's ":0.6", utils/model_setup.py l.155-156)."""
    if x.dtype == torch.uint8:
        x, logvar = posterior(x, vae, cfg.vae_family)
    x = x.float()
    if sample and logvar is not None:
        x = x + (0.5 * logvar.float()).exp() * torch.randn_like(x)
    if cfg.frame_scale != 1:
        x = torch.cat([x[:, :1], x[:, 1:] * cfg.frame_scale], 1)
    return x


def decode(x: torch.Tensor, vae, cfg: Config) -> torch.Tensor:
    """Model-space videos (B, T, c, h, w) -> pixel videos (B, F, C, H, W) in about [-1, 1]."""
    if vae is None:
        return x
    if isinstance(vae, common.VideoVAE):
        x = torch.cat([x[:, :1], x[:, 1:] / cfg.frame_scale], 1)
        return vae.decode(x.transpose(1, 2)).transpose(1, 2)
    return vae.decode(x.flatten(0, 1)).unflatten(0, x.shape[:2])


def load_data(cfg: Config, split: str = "train"):
    """A Dataset of (video uint8 (F, C, H, W) or latents float (T, c, h, w), label, task[, text, text_mask][, latent
    log-variance]). Data other than moving digits: split "test" is its last --holdout items, "train" the rest."""
    if cfg.data == "moving-digits":
        if cfg.channels != 1:
            raise ValueError(f"digits have 1 channel, the config says {cfg.channels}")
        videos, labels, _, task = moving_digits(cfg, split)
        return common.ArrayDataset(videos, labels, task)
    path = Path(cfg.data)
    if path.is_dir():  # precomputed latents (memory-mapped, the text embeddings too)
        a = common.load_arrays(path, ("latents", "labels", "task", "text", "text_mask", "latents_logvar", "null_text"))
        x = a["latents"]
    else:
        a = common.load_arrays(path, ("images", "labels", "task", "text", "text_mask", "null_text"))
        x, want = a["images"], (cfg.frames, *cfg.img_size, cfg.channels)
        if x.dtype != np.uint8 or x.ndim != 5 or x.shape[1:] != want:
            raise ValueError(f"{path}: images must be uint8 videos (N, {', '.join(map(str, want))}) (frames, height, "
                             f"width, channels), got {x.dtype} {x.shape}")
        x = np.ascontiguousarray(x.transpose(0, 1, 4, 2, 3))
    n = len(x)
    task = a.get("task", np.zeros(n, np.int64))
    if task.any() and not cfg.v2v:
        raise ValueError(f"{path} holds V2V pairs (task 1): train with --v2v > 0 to give the model its task tag")
    arrays = [x, a.get("labels", np.zeros(n, np.int64)), task]
    if cfg.txt_dim:
        if "text" not in a or "text_mask" not in a:
            raise ValueError(f"{path} has no `text` and `text_mask` for the text-conditional model (--txt_dim "
                             f"{cfg.txt_dim})")
        arrays += [a["text"], a["text_mask"]]  # memory-mapped in a latent folder: cast per batch, not here
        if "null_text" in a and a["null_text"].shape != (cfg.txt_len, cfg.txt_dim):
            raise ValueError(f"{path}: null_text (the empty caption's embedding) must be ({cfg.txt_len}, "
                             f"{cfg.txt_dim}), got {a['null_text'].shape}")
    if "latents_logvar" in a:  # the posterior's log-variance: training samples from it
        arrays.append(a["latents_logvar"])
    if cfg.holdout >= n:
        raise ValueError(f"--holdout {cfg.holdout} leaves nothing of the {n} items of {path} to train on")
    part = slice(n - cfg.holdout, n) if split == "test" and cfg.holdout else slice(0, n - cfg.holdout)
    data = common.ArrayDataset(*[a[part] for a in arrays])
    data.null_text = a.get("null_text") if cfg.txt_dim else None
    data.logvar = "latents_logvar" in a
    return data


def training_inputs(cfg: Config, vae, batch, logvar: bool = False) -> torch.Tensor:
    """A training batch's model-space videos: a posterior sample (with the latent folder's `latents_logvar`, the
    batch's last array, when `logvar`), frames 1.. scaled, and with probability --drop_image the whole batch without
    its first latent frame (train.py l.230-232), so the model also learns videos that start mid-motion."""
    x = to_model_space(batch[0], vae, cfg, batch[-1] if logvar else None, sample=True)
    if cfg.drop_image and x.shape[1] > 1 and torch.rand(()) < cfg.drop_image:
        x = x[:, 1:]
    return x


def batch_cond(model: STARFlowV, batch, drop: float = 0.0) -> dict:
    cfg, B = model.cfg, batch[0].shape[0]
    null = torch.rand(B, device=batch[0].device) < drop if drop > 0 else None
    return model.make_cond(batch[1].long() if cfg.num_classes else None, *(batch[3:5] if cfg.txt_dim else (None,) * 2),
                           null=null, task=batch[2] if cfg.v2v else None, batch=B, check=False)


@torch.no_grad()
def heldout_bpd(model: STARFlowV, cfg: Config, data, vae, d: common.Dist, n_max: int = 1000,
                bs: int = 128) -> tuple[float, float, int]:
    """Bits/dim of held-out videos with the training noise (pixels: on the 0..255 scale): (mean, its standard
    error, number of videos)."""
    g = torch.Generator().manual_seed(1234)
    tot = torch.zeros(3, device=d.device)
    for batch in common.rank_loader(data, d, bs, cfg.num_workers, n=min(len(data), n_max)):
        batch = [t.to(d.device) for t in batch]
        x = to_model_space(batch[0], vae, cfg)
        x = x + cfg.noise_std * torch.randn(x.shape, generator=g).to(d.device)
        nll = -model.log_prob(x, batch_cond(model, batch)) / x[0].numel() + (math.log(127.5) if vae is None else 0.0)
        tot += torch.stack([nll.sum(), nll.square().sum(), torch.tensor(float(len(nll)), device=d.device)])
    mean, se, n = common.mean_se(tot)  # nats/dim over every rank's examples
    return mean / math.log(2), se / math.log(2), n  # bits/dim


@torch.no_grad()
def generate(model: STARFlowV, cfg: Config, labels: torch.Tensor, vae, seed: int, text=None, text_mask=None,
             task: str = "t2v", context: torch.Tensor | None = None, bs: int = 64) -> tuple[torch.Tensor, int]:
    """uint8 videos (n, F, C, H, W) for the labels (or captions), in batches. task i2v: `context` holds the first
    frames (n, 1, C, H, W) uint8; v2v: the source videos (n, F_src, C, H, W). Returns (videos, nfe of a batch)."""
    dev = next(model.parameters()).device
    g = torch.Generator(device=dev).manual_seed(seed)
    out, nfe = [], 0
    for i in range(0, len(labels), bs):
        sl, n = slice(i, i + bs), len(labels[i:i + bs])
        cond = model.make_cond(labels[sl].to(dev) if cfg.num_classes else None,
                               None if text is None else text[sl].to(dev),
                               None if text_mask is None else text_mask[sl].to(dev),
                               task=torch.ones(n, dtype=torch.long) if task == "v2v" else None, batch=n)
        ctx = None
        if task != "t2v":
            ctx = to_model_space(context[sl].to(dev), vae, cfg)
            want = 1 if task == "i2v" else model.T // 2
            if ctx.shape[1] != want:
                raise ValueError(f"{task} takes {want} latent frames of context, got {ctx.shape[1]}")
            ctx = ctx + cfg.noise_std * torch.randn(ctx.shape, generator=g, device=dev)  # the training noise level
        x, nfe = sample(model, cond, cfg, generator=g, context=ctx)
        out.append(common.to_uint8(decode(x, vae, cfg)).cpu())
    return torch.cat(out), nfe


@torch.no_grad()
def video_metrics(videos: torch.Tensor, labels: torch.Tensor, digit: int) -> dict:
    """Digits metrics of uint8 videos (B, F, 1, H, W), frame by frame. The classifier takes whole digits, so each frame
    is cropped to the digit_size window of most ink (the digit's box) first; then
      accuracy     per-frame accuracy of the asked class; fd: Frechet distance of the crops to real test digits,
      consistency  share of videos whose frames all get one class,
      speed        mean centre-of-mass step, pixels per frame,
      path_err     mean distance (pixels, frames 2..F-1) of the centre of mass from the path the first two frames
                   imply under the demo's physics (constant velocity, bouncing off the walls)."""
    B, Fr, _, H, W = videos.shape
    x = videos.flatten(0, 1).float()  # (B*F, 1, H, W)
    ink = F.avg_pool2d(x, digit, stride=1)  # (B*F, 1, H-d+1, W-d+1)
    idx = ink.flatten(1).argmax(1)
    r, c = idx // ink.shape[-1], idx % ink.shape[-1]
    crops = x.unfold(2, digit, 1).unfold(3, digit, 1)[torch.arange(len(x)), :, r, c]  # (B*F, 1, d, d)
    clf = common.digits_classifier()
    pred = clf(crops.to(torch.uint8))[0].argmax(1).view(B, Fr)
    m = common.digits_metrics(crops.to(torch.uint8), labels.repeat_interleave(Fr))
    grid = torch.arange(digit, dtype=torch.float32)
    mass = crops.sum((1, 2, 3)).clamp(min=1e-6)
    com = torch.stack([(crops.sum(3)[:, 0] * grid).sum(1), (crops.sum(2)[:, 0] * grid).sum(1)], 1) / mass[:, None]
    com = (com + torch.stack([r, c], 1)).view(B, Fr, 2)
    box = torch.stack([r, c], 1).view(B, Fr, 2).float()
    out = dict(accuracy=m["accuracy"], consistency=(pred == pred[:, :1]).all(1).float().mean().item(), fd=m["fd"],
               speed=(com[:, 1:] - com[:, :-1]).norm(dim=-1).mean().item() if Fr > 1 else 0.0)
    if Fr > 2:
        t = torch.arange(Fr, dtype=torch.float32)[None, :, None]
        span = torch.tensor([H - digit, W - digit], dtype=torch.float32)
        path = com[:, :1] + _bounce(box[:, :1] + (com[:, 1:2] - com[:, :1]) * t, span) - box[:, :1]
        out["path_err"] = (com - path)[:, 2:].norm(dim=-1).mean().item()
    return out


def evaluate(model: STARFlowV, cfg: Config, vae, d: common.Dist) -> dict:
    """Held-out bits/dim; on moving digits also video_metrics of T2V, I2V (from test videos' first frames: how far
    frame 0 strays from the given one, 0..255) and V2V (if trained: error of the target against the true one)
    samples, and the same metrics of real test videos (real_*: what a perfect model would score)."""
    model.eval()
    held = cfg.data == "moving-digits" or cfg.holdout > 0  # else: bits/dim of the first training items, so named
    key = "bpd" if held else "train_bpd"
    out = dict(zip((key, f"{key}_se", f"{key}_n"), heldout_bpd(model, cfg, load_data(cfg, "test"), vae, d)))
    if held:
        common.check_heldout(out["bpd_n"], out["bpd_se"], "bits/dim", "a larger --holdout")
    if cfg.data == "moving-digits":
        real, labels, _, _ = moving_digits(cfg, "test")
        n_samples = cfg.eval_samples
        start, count = common.rank_split(n_samples, d)
        idx = torch.arange(start, start + count) % len(labels)
        half = model.T // 2
        for task in ("t2v", "i2v") + (("v2v",) if cfg.v2v else ()):
            ctx = real[idx, :1] if task == "i2v" else real[idx, :half] if task == "v2v" else None
            vids, nfe = generate(model, cfg, labels[idx], vae, seed=cfg.seed + 7 + d.rank, task=task, context=ctx)
            vids, labs, ref = common.gather(vids, d), common.gather(labels[idx], d), common.gather(real[idx], d)
            if d.is_main:
                if task == "v2v":  # judge the target half; the truth is the source reversed
                    out["v2v_target_err"] = (vids[:, half:].float() - ref[:, :half].flip(1).float()).abs().mean().item()
                    vids = vids[:, half:]
                m = video_metrics(vids, labs, cfg.digit_size)
                if task == "i2v":
                    m["frame0_err"] = (vids[:, 0].float() - ref[:, 0].float()).abs().mean().item()
                out.update({f"{task}_{k}": v for k, v in m.items()}, **{f"{task}_nfe": nfe})
        if d.is_main:
            out.update({f"real_{k}": v for k, v in video_metrics(real[:n_samples], labels[:n_samples],
                                                                 cfg.digit_size).items()})
    model.train()
    return out


def strip(video: torch.Tensor, zoom: int = 1) -> np.ndarray:
    """uint8 video (F, C, H, W) -> one (H', W', C) image, its frames left to right."""
    video = video.repeat_interleave(zoom, -1).repeat_interleave(zoom, -2)
    return common.image_grid(video, nrow=len(video), pad=zoom)


# ----------------------------------------------------------------------------------------------------------------------
# Trainer


def dry_run(cfg: Config, gpus: int) -> dict:
    """--dry_run: the config on the meta device (common.dry_run), train_loss with the denoiser's flow-score tap; the
    sampler's KV caches (bf16, both guidance branches): the deep block's over the video and the caption, the shallow
    blocks' over one frame. (Counted without --grad_ckpt; common.dry_run estimates the checkpointed figure.)"""
    cfg = dataclasses.replace(cfg, grad_ckpt=False)
    C, H, W, T = latent_shape(cfg)

    def loss(model, b):
        pad = torch.arange(cfg.txt_len) < (cfg.txt_len + 1) // 2
        cond = model.make_cond(torch.zeros(b, dtype=torch.long) if cfg.num_classes else None,
                               torch.randn(b, cfg.txt_len, cfg.txt_dim) if cfg.txt_dim else None,
                               pad.expand(b, -1) if cfg.txt_dim else None, batch=b, check=False)
        return train_loss(model, torch.randn(b, T, C, H, W), cond, cfg.noise_std, bool(cfg.denoiser_layers),
                          loss_weight(cfg))[0]

    def caches(model):
        n = model.N
        per = 8 * (cfg.layers[-1] * (T * n + cfg.txt_len) * (cfg.deep_width or cfg.width)
                   + sum(cfg.layers[:-1]) * n * cfg.width)
        return {"kv_cache_per_sample": per, "kv_cache_batch8": 8 * per}

    parts = {"deep block": f"blocks.{len(cfg.layers) - 1}", "shallow blocks": "blocks", "denoiser": "denoiser"}
    return common.dry_run(cfg, lambda: STARFlowV(cfg, C, H, W, T), loss, tokens=T * (H // cfg.patch_size) *
                          (W // cfg.patch_size), gpus=gpus, block_types=(common.Block,), sample_bytes=caches,
                          parts=parts)


def build(cfg: Config, device) -> tuple[STARFlowV, object]:
    vae = load_vae(cfg, device)
    return STARFlowV(cfg, *latent_shape(cfg, vae)).to(device), vae


def from_checkpoint(path: str, device="cpu", null_text=None, **overrides) -> tuple[STARFlowV, Config]:
    """A trained model ready to sample (EMA weights, eval mode) and its config; `overrides` may change run-time fields
    (sampler, guidance, long_frames, ...). `model.vae` is the VAE (None in pixel space), kept out of the module tree.
    An ml-starflow checkpoint goes to from_official (null_text: see there)."""
    if _is_official(path):
        return from_official(path, device, null_text, **overrides)
    state = common.load_checkpoint(path)
    cfg = common.config_from_checkpoint(Config, state, overrides, what=str(path))
    model, vae = build(cfg, device)
    model.__dict__["vae"] = vae
    model = common.load_weights(model, state).eval()
    if null_text is not None:
        model.set_null_text(torch.as_tensor(np.load(null_text) if isinstance(null_text, (str, Path)) else null_text))
    return model, cfg


def _is_official(path) -> bool:
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # not a plain tensor file (or not a file): common.load_checkpoint says what it is
        return False
    return isinstance(sd, dict) and "blocks.0.proj_in.weight" in sd


def from_official(path: str, device="cpu", null_text: torch.Tensor | None = None,
                  **overrides) -> tuple[STARFlowV, Config]:
    """ml-starflow's STARFlow-V checkpoint (a plain state dict, e.g. starflow-v_7B_t2v_caus_480p_v3.pth, read as its
    sample.py l.82-83 does) -> (STARFlowV in eval mode, Config). From the tensors: the widths, layers per block, the
    denoiser's layers, head_dim (feat_rope's buffer), txt_dim, the final norms, the latent channels (given
    patch_size, default 1) and pt_seq_len (the blocks' attn_mask buffer is pt_seq_len^2 + txt_len square); the rest is
    the t2v-480p preset (its yaml and the released model's sampling script) unless overridden, e.g. txt_len,
    denoiser_window, img_size, frames, guidance. `null_text` (txt_len, txt_dim): the text encoder's embedding of the
    empty caption with the templates the model was trained with (train.py l.241; zeros if not given; an array, tensor
    or .npy path), for guidance.
    Layouts: qkv rows of q and k permuted from interleaved RoPE pairs to ours (make_rope); RMSNorm weights + 1
    (ml-starflow's (1 + w), transformer_flow.py l.158-184)."""
    sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)  # (7B: read as the tensors are taken)
    if not isinstance(sd, dict) or "blocks.0.proj_in.weight" not in sd:
        raise ValueError(f"{path} is not an ml-starflow checkpoint (no blocks.0.proj_in.weight)")
    K = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    top, den = f"blocks.{K - 1}.", "learnable_self_denoiser."
    if K % 2:  # Model: the top block's permutation is permutations[num_blocks % 2] (transformer_flow.py l.1100)
        raise ValueError(f"{path}: {K} flow blocks make ml-starflow's deep block flip each frame; ours needs an even "
                         f"number")

    def n_layers(pre):
        return len({k[len(pre):].split(".")[0] for k in sd if k.startswith(pre)})

    p = overrides.get("patch_size", 1)
    kw = {**PRESETS["t2v-480p"], "fsdp": False, "grad_ckpt": False,
          "width": sd["blocks.0.proj_in.weight"].shape[0], "deep_width": sd[top + "proj_in.weight"].shape[0],
          "layers": tuple(n_layers(f"blocks.{i}.attn_blocks.") for i in range(K)),
          "channels": sd["blocks.0.proj_in.weight"].shape[1] // p ** 2,
          "head_dim": sd["feat_rope.freqs_cos"].shape[1] if "feat_rope.freqs_cos" in sd else 64,
          "txt_dim": sd[top + "proj_txt.weight"].shape[1] if top + "proj_txt.weight" in sd else 0,
          "final_norm": top + "final_norm.weight" in sd, "denoiser_layers": n_layers(den + "attn_blocks."),
          **overrides}
    if not kw["txt_dim"]:
        kw["txt_len"] = 0
    side = sd[top + "attn_mask"].shape[0] - kw["txt_len"]
    if "pt_seq_len" not in overrides:
        kw["pt_seq_len"] = math.isqrt(max(side, 0))
        if kw["pt_seq_len"] ** 2 != side:
            raise ValueError(f"{path}: the attn_mask buffer ({side + kw['txt_len']} positions) is not pt_seq_len^2 + "
                             f"--txt_len {kw['txt_len']}: pass the right txt_len")
    if kw["denoiser_layers"] and not kw["final_norm"]:
        raise ValueError(f"{path}: a denoiser without use_final_norm (no norm at all) is not supported")
    if kw["denoiser_layers"] and kw["txt_dim"] and den + "proj_txt.weight" not in sd:
        raise ValueError(f"{path}: an unconditional denoiser (conditional_denoiser 0) is not supported")
    cfg = Config(**kw)
    vae = load_vae(cfg, device) if cfg.vae else None
    model = STARFlowV(cfg, *latent_shape(cfg, vae))
    Dh, out, used = cfg.head_dim, {}, set()
    perm = torch.cat([torch.arange(0, Dh, 2), torch.arange(1, Dh, 2)])  # interleaved pairs -> (i, i + Dh/2)

    def take(key):
        used.add(key)
        return sd[key].float()  # (a bf16 file: the norms' + 1 in fp32)

    def layer(src, dst, W):
        for a, b in (("attention.norm", "norm1"), ("attention.proj", "attn.proj"), ("mlp.norm", "norm2"),
                     ("mlp.main.0", "mlp.0"), ("mlp.main.2", "mlp.2")):
            for t in ("weight", "bias"):
                out[f"{dst}{b}.{t}"] = take(f"{src}{a}.{t}")
        for t in ("weight", "bias"):
            w = take(f"{src}attention.qkv.{t}")
            q, k, v = w.split(W)
            q, k = (m.unflatten(0, (W // Dh, Dh))[:, perm].flatten(0, 1) for m in (q, k))
            out[f"{dst}attn.qkv.{t}"] = torch.cat([q, k, v])

    def block(src, dst, n, W, sos=True):
        for j in range(n):
            layer(f"{src}attn_blocks.{j}.", f"{dst}layers.{j}.", W)
        for a, b in (("proj_in", "proj_in"), ("proj_out", "proj_out"), ("proj_txt", "cond.proj_txt")):
            if f"{src}{a}.weight" in sd:
                out[f"{dst}{b}.weight"], out[f"{dst}{b}.bias"] = take(f"{src}{a}.weight"), take(f"{src}{a}.bias")
        if f"{src}final_norm.weight" in sd:
            out[f"{dst}norm.weight"] = take(f"{src}final_norm.weight") + 1
        if sos:
            out[f"{dst}sos"] = take(f"{src}sos_embed")

    for i, n in enumerate(cfg.layers):
        block(f"blocks.{i}.", f"blocks.{i}.", n, cfg.deep_width or cfg.width if i == K - 1 else cfg.width)
    if cfg.denoiser_layers:
        block(den, "denoiser.", cfg.denoiser_layers, cfg.width, sos=False)
    left = [k for k in sd if k not in used and not k.endswith("attn_mask") and k not in
            ("feat_rope.freqs_cos", "feat_rope.freqs_sin", "var")]
    if left:
        raise ValueError(f"{path}: tensors this model has no place for: {', '.join(left[:5])}"
                         f"{' ...' if len(left) > 5 else ''}")
    if isinstance(null_text, (str, Path)):
        null_text = np.load(null_text)
    emb = torch.zeros(cfg.txt_len, cfg.txt_dim) if null_text is None else torch.as_tensor(null_text).float()
    if emb.shape != (cfg.txt_len, cfg.txt_dim):
        raise ValueError(f"null_text must be ({cfg.txt_len}, {cfg.txt_dim}) (txt_len, txt_dim), got {tuple(emb.shape)}")
    out.update({k: emb for k in model.state_dict() if k.endswith("null_text")})
    model.load_state_dict(out)
    model.__dict__["vae"] = vae
    return model.to(device).eval(), cfg


def precompute_latents(cfg: Config, src: str, d: common.Dist):
    """Encode an .npz of videos through the VAE once: <cfg.data>/latents.npy (N, T, c, h, w) + labels.npy, task.npy
    (and the captions' text.npy, text_mask.npy for a text model)."""
    vae = load_vae(cfg, d.device)
    if vae is None:
        raise ValueError("--precompute needs --vae and --vae_family")
    data = load_data(dataclasses.replace(cfg, data=src))
    keys = ("labels", "task") + (("text", "text_mask") if cfg.txt_dim else ())

    def encode(b):  # the posterior's mean and (Wan) log-variance, unscaled: training samples and scales them
        mean, logvar = posterior(b[0].to(d.device), vae, cfg.vae_family)
        wan = {"latents_logvar": logvar.half()} if isinstance(vae, common.VideoVAE) else {}
        return {"latents": mean.half(), **dict(zip(keys, b[1:1 + len(keys)], strict=True)), **wan}
    names = common.encode_folder(cfg.data, data, d, encode, (*cfg.img_size, cfg.channels), 4, cfg.num_workers)
    if d.is_main and data.null_text is not None:
        np.save(Path(cfg.data) / "null_text.npy", data.null_text)
    common.print0(f"wrote {cfg.data}/{{{','.join(n + '.npy' for n in names)}}}")


def sampling_context(args, cfg: Config, start: int, count: int):
    """Labels and (i2v/v2v) context frames for --sample: from --context NPZ, else moving-digits test videos."""
    labels = torch.arange(start, start + count) % max(cfg.num_classes, 1)
    if args.task == "t2v":
        return labels, None
    half = (cfg.frames // 2) if args.task == "v2v" else 1
    if args.context:
        a = common.load_arrays(args.context, ("images", "labels"))
        v = torch.as_tensor(a["images"])
        v = v[:, None] if v.ndim == 4 else v[:, :1] if args.task == "i2v" else v  # (N, H, W, C): first frames
        idx = torch.arange(start, start + count) % len(v)
        if "labels" in a:
            labels = torch.as_tensor(a["labels"])[idx]
        return labels, v[idx].permute(0, 1, 4, 2, 3)
    if cfg.data != "moving-digits":
        raise ValueError(f"--task {args.task} needs --context NPZ with images: first frames (N, H, W, C) or source "
                         f"videos (N, F, H, W, C)")
    real, real_labels, _, _ = moving_digits(cfg, "test")
    idx = torch.arange(start, start + count) % len(real)
    return real_labels[idx], real[idx, :half]


def options(p):
    p.add_argument("--precompute", metavar="VIDEOS", default=None,
                   help="encode VIDEOS (.npz) through --vae into the latent folder --data")
    p.add_argument("--captions", metavar="NPZ", default=None,
                   help="text embeddings (`text`, `text_mask`) to --sample a text-conditional model from")
    p.add_argument("--task", choices=("t2v", "i2v", "v2v"), default="t2v",
                   help="--sample task: text/class-to-video, image-to-video, video-to-video (default: %(default)s)")
    p.add_argument("--init_from", metavar="CKPT", default=None,
                   help="train from these weights (ours or an official .pth): the model fields are theirs")
    p.add_argument("--null_text", metavar="NPY", default=None,
                   help="official ml-starflow weights: the (txt_len, txt_dim) embedding of the empty caption")
    p.add_argument("--context", metavar="NPZ", default=None,
                   help="i2v first frames (N,H,W,C) or v2v source videos (N,F,H,W,C) as `images` (default on "
                        "moving digits: test videos)")


def cli_sample(model: STARFlowV, cfg: Config, args, d: common.Dist, start: int, count: int):
    labels, context = sampling_context(args, cfg, start, count)
    text = mask = None
    if cfg.txt_dim:
        if not args.captions:
            raise ValueError("a text-conditional model samples from --captions NPZ (text, text_mask)")
        cap = common.load_arrays(args.captions, ("text", "text_mask", "null_text"))
        if "null_text" in cap:  # the null caption (guidance), e.g. for an official checkpoint
            model.set_null_text(torch.as_tensor(cap["null_text"]).float())
        idx = (torch.arange(start, start + count) % len(cap["text"])).numpy()  # captions repeat
        text, mask = torch.as_tensor(cap["text"][idx]).float(), torch.as_tensor(cap["text_mask"][idx])
    vids, nfe = generate(model, cfg, labels, model.vae, seed=cfg.seed + 1000 + d.rank, text=text, text_mask=mask,
                         task=args.task, context=context)
    folder = Path(args.out).with_name(Path(args.out).stem + "_strips")
    for i, v in enumerate(vids):  # every rank writes its own samples' strips
        common.save_png(folder / f"{start + i:05d}.png", strip(v, zoom=max(1, 64 // v.shape[-1])))
    return ({"images": vids.permute(0, 1, 3, 4, 2).numpy(), "labels": labels.numpy()},
            f"videos, PNG strips in {folder}/, {nfe} network evaluations per batch")


def cli_train(cfg: Config, args, overrides: dict, d: common.Dist) -> common.Job:
    if args.init_from:  # fine-tuning: the architecture is the weights' (an official file's as from_official reads it)
        src, scfg = from_checkpoint(args.init_from, "cpu", args.null_text, **overrides)
        cfg = dataclasses.replace(cfg, **{k: getattr(scfg, k) for k in common.model_fields(cfg)})
    model, vae = build(cfg, d.device)
    if args.init_from:
        model.load_state_dict(src.state_dict())
    data = load_data(cfg)
    if getattr(data, "null_text", None) is not None:
        model.set_null_text(torch.as_tensor(data.null_text))
    n_params = sum(p.numel() for p in model.parameters())
    common.print0(f"STARFlow-V with {n_params / 1e6:.2f}M parameters: {model.T} latent frames of {model.N} tokens of "
                  f"{model.D} dims, blocks {cfg.layers}, denoiser {cfg.denoiser_layers} layers")
    denoiser = model.denoiser is not None

    def loss_fn(net, batch, at):
        return train_loss(net, training_inputs(cfg, vae, batch, getattr(data, "logvar", False)),
                          batch_cond(model, batch, cfg.label_drop), cfg.noise_std, denoiser, loss_weight(cfg))

    def on_eval(step, model, ema):
        with ema.swap(model), common.full_params(model):
            res = evaluate(model, cfg, vae, d)
            if cfg.data == "moving-digits":  # a look: one T2V row per class, then I2V rows from test videos
                real, labels, _, _ = moving_digits(cfg, "test")
                looks, _ = generate(model, cfg, torch.arange(10) % max(cfg.num_classes, 1), vae, seed=0)
                i2v, _ = generate(model, cfg, labels[:10], vae, seed=0, task="i2v", context=real[:10, :1])
                looks = torch.cat([looks, i2v])
            else:  # the first training items' conditions
                first = data[np.arange(min(4, len(data)))]
                looks, _ = generate(model, cfg, first[1], vae, seed=0, text=first[3] if cfg.txt_dim else None,
                                    text_mask=first[4] if cfg.txt_dim else None)
        if d.is_main:
            zoom = max(1, 64 // cfg.img_size[1])
            common.save_png(Path(cfg.out_dir) / "samples.png", np.concatenate([strip(v, zoom) for v in looks], 0))
        return res
    return common.Job(cfg, model, loss_fn, data, on_eval, lambda m: make_optimizer(m, cfg))


def main(argv=None):
    common.cli(argv, Config, PRESETS, __doc__, options=options, dry_run=dry_run,
               load=lambda ckpt, overrides, args, d: from_checkpoint(ckpt, d.device, args.null_text, **overrides),
               sample=cli_sample, evaluate=lambda model, cfg, args, d: evaluate(model, cfg, model.vae, d),
               prepare=cli_train,
               modes={"precompute": lambda cfg, args, _, d: precompute_latents(cfg, args.precompute, d)})


if __name__ == "__main__":
    common.run(main)
