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
stack whose deep block (next to the Gaussian prior) carries the conditioning, latent space, a guidance rule (Sec. 3.2)
and a VAE decoder fine-tuned on noisy latents (Sec. 3.3) in place of the score-based denoising step.

    python starflow.py                                        # CPU demo: class-conditional digits, a few minutes
    python starflow.py --eval --ckpt out/starflow/ckpt.pt     # held-out bits/dim, sample accuracy, Frechet distance
    python starflow.py --sample --ckpt out/starflow/ckpt.pt --n 100 --out samples.npz --guidance 2
    python starflow.py --preset imagenet256 --precompute imagenet/train --data latents/ --vae sd-vae/  # VAE latents
    torchrun --nproc_per_node=8 starflow.py --preset imagenet256 --data latents/ --vae sd-vae/ --fsdp
    python starflow.py --preset t2i256 --precompute captions.npz --data t2i/ --vae sd-vae/  # latents + captions
    python starflow.py --preset digits-latent --finetune_decoder 500   # -> out/starflow-digits-latent/decoder.pt
    python starflow.py --sample --ckpt CKPT --decoder out/starflow-digits-latent/decoder.pt   # no score step
    python starflow.py --sample --ckpt afhq_model_8_768_8_8_0.07.pth   # official ml-tarflow / ml-starflow weights

Text conditioning takes precomputed embeddings (no text encoder here): an .npz with `text` (N, L, txt_dim) float and
optionally `text_mask` (N, L) bool (padding at the end) beside the images, from any encoder, e.g. the last hidden
states of flan-t5-xl. Held-out data: digits' test split; else --val_data, or else a fixed --val_frac of --data.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import re
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


# ----------------------------------------------------------------------------------------------------------------------
# Config


@dataclass
class Config(common.TrainConfig):
    # data
    data: str = "digits"  # digits | image folder (flat or class subfolders) | .npz: images (N,H,W,C) uint8 [labels text text_mask] | --precompute'd latent folder
    val_data: str = ""  # held-out data in the same format ("" = carve --val_frac out of --data; digits: its test split)
    val_frac: float = common.opt(0.02, gt=0, max=0.5)  # fraction of --data held out (a fixed seeded choice of rows)
    img_size: int = common.opt(8, min=1)  # image side in pixels (read from --data unless given)
    channels: int = common.opt(1, min=1)  # image channels (read from --data unless given)
    num_classes: int = 10  # class labels (0 = none); label num_classes is the null label of guidance
    txt_dim: int = 0  # width of precomputed text embeddings (0 = no text conditioning)
    txt_len: int = 0  # text tokens per caption
    vae: str = ""  # VAE weights (diffusers folder or single file) | digits (a small VAE trained once) | "" = pixels
    vae_family: str = common.opt("none", choices=tuple(common.VAE_FAMILIES))  # sd | sdxl | flux | none (pixel space)
    decoder: str = ""  # fine-tuned VAE decoder (--finetune_decoder); sampling then skips the score denoising step
    # model
    param: str = common.opt("starflow", choices=("tarflow", "starflow"))  # tarflow (sigma = exp) | starflow (softplus)
    patch_size: int = common.opt(2, min=1)  # patch side; tokens are patches of the image (or latent)
    width: int = common.opt(64, min=1)  # transformer width
    head_dim: int = common.opt(16, min=1)  # attention head width
    layers: tuple = common.opt((2, 2, 2, 4), min=1)  # layers per flow block; the last (deep) one is next to the prior
    seq_order: str = common.opt("R2L", choices=("R2L", "L2R"))  # R2L: block i reversed if i is odd | L2R: if even
    cond_deep_only: bool = True  # conditioning in the deep block only (STARFlow) or in every block (TARFlow)
    rope: bool = False  # 2D RoPE instead of learned positions
    rope_text: bool = False  # ml-starflow's 3D RoPE of a text model (8 frequency pairs turn with the text position)
    class_cond: str = common.opt("prefix", choices=("prefix", "add"))  # prefix token | added to each token (ml-tarflow)
    txt_null: str = common.opt("learned", choices=("learned", "caption"))  # null caption: learned | a fixed embedding
    text_padding: str = common.opt("mask", choices=("mask", "zero"))  # padded caption tokens: mask | zero (ml-starflow)
    patch_order: str = common.opt("hwc", choices=("hwc", "chw"))  # patch vector (p, p, C) | (C, p, p) as F.unfold
    prior_var: bool = False  # prior N(0, var) with a (T, D) buffer var (ml-tarflow's Model.var)
    final_norm: bool = False  # RMSNorm before each block's output projection (ml-starflow's use_final_norm)
    soft_clip: float = 4.0  # STARFlow's soft clip c*tanh(./c) on the predicted (mu, a); 0 = off
    noise_std: float = 0.1  # Gaussian noise augmentation sigma (TARFlow 0.05-0.15 in pixels, STARFlow 0.3 in latents)
    dequant: str = common.opt("gaussian", choices=("gaussian", "uniform"))  # + noise_std N(0,1) | + U[0,1) grey level
    latent_reg: float = 0.0  # weight of mean z^2 of the states between blocks (ml-starflow latent_norm_regularization)
    label_drop: float = common.opt(0.1, max=1)  # probability of the null condition in training (for guidance)
    grad_ckpt: bool = False  # gradient checkpointing of the transformer layers
    # sampler
    sampler: str = common.opt("jacobi", choices=("sequential", "jacobi"))  # sequential | jacobi
    jacobi_chunk: int = common.opt(16, min=1)  # tokens per Jacobi chunk
    jacobi_max_iter: int = common.opt(16, min=1)  # iterations per chunk at most
    jacobi_threshold: float = 1e-7  # stop when every sample's mean((new - old)^2) / mean(new^2) is below this
    guidance: float = 1.0  # guidance weight w (0 = none); needs a conditional model or --attn_temp != 1
    guidance_rule: str = common.opt("starflow", choices=("starflow", "tarflow"))  # p_c^(1+w)/p_u^w | extrapolation
    guide_what: str = common.opt("ab", choices=("a", "b", "ab"))  # tarflow rule: extrapolate a (log sigma), b (mu)
    guidance_anneal: bool = False  # ramp w linearly over the tokens (TARFlow's annealed schedule)
    guide_all_blocks: bool = False  # guide every conditioned block, not only the deep one
    attn_temp: float = common.opt(1.0, gt=0)  # TARFlow's attention temperature of the unconditional branch
    denoise: bool = True  # score-based denoising of the final sample: x + noise_std^2 * grad log p(x)
    sample_batch: int = 0  # samples per sampling batch (0 = auto: the largest whose KV cache fits, at most 256)

    NAME = "starflow"
    RUNTIME = ("data", "val_data", "val_frac", "vae", "decoder", "dequant", "latent_reg", "sampler", "jacobi_chunk",
               "jacobi_max_iter", "jacobi_threshold", "guidance", "guidance_rule", "guide_what", "guidance_anneal",
               "guide_all_blocks", "attn_temp", "denoise", "sample_batch", "grad_ckpt", "label_drop")
    # what checkpoints written before a model field existed were trained with (common.saved_config fills them in)
    LEGACY = {"seq_order": "R2L", "final_norm": False, "rope_text": False, "class_cond": "prefix",
              "txt_null": "learned", "patch_order": "hwc", "prior_var": False, "text_padding": "mask"}

    def __post_init__(self):
        super().__post_init__()
        if self.width % self.head_dim:
            raise ValueError(f"--width {self.width} is not divisible by --head_dim {self.head_dim}")
        if not self.layers:
            raise ValueError("--layers needs at least one flow block")
        if bool(self.txt_dim) != bool(self.txt_len):
            raise ValueError(f"text needs both --txt_dim and --txt_len (got {self.txt_dim}, {self.txt_len})")
        if self.rope_text and not (self.rope and self.txt_dim and self.head_dim % 4 == 0 and self.head_dim > 16):
            raise ValueError("--rope_text needs --rope, a text model and --head_dim a multiple of 4 above 16")
        if self.vae and self.vae_family == "none":
            raise ValueError(f"--vae {self.vae} needs a latent --vae_family (sd, sdxl or flux)")
        if self.dequant == "uniform" and self.vae_family != "none":
            raise ValueError("--dequant uniform dequantises 8-bit pixels; a latent model takes --dequant gaussian")
        if self.guidance > 0 and not (self.num_classes or self.txt_dim) and self.attn_temp == 1:
            raise ValueError(f"--guidance {self.guidance} needs a class- or text-conditional model (or TARFlow's "
                             f"--attn_temp != 1 for the unconditional branch); pass --guidance 0")


PRESETS = {
    # CPU demo: 8x8 digits in pixel space, 16 tokens of 2x2 pixels, class-conditional. About 3 minutes on 2 cores.
    "digits": dict(steps=2000, batch_size=64, lr=2e-3, warmup=100, eval_every=1000, ckpt_every=500, log_every=50,
                   ema_decay=0.999),
    # The same in the latent space of a small VAE trained on the digits (16x16 -> 8x8x4), as STARFlow does at scale.
    "digits-latent": dict(img_size=16, vae="digits", vae_family="sd", noise_std=0.3, steps=2000, batch_size=64,
                          lr=2e-3, warmup=100, eval_every=1000, ckpt_every=500, log_every=50),
    # STARFlow ImageNet 256 (paper Sec. 4: 1.4B deep-shallow [2,2,2,2,2,18] at width 2048 on SD-VAE f8 latents
    # 32x32x4). Patch 1 as in ml-starflow (configs/starflow_3B_t2i_256x256.yaml:8 `patch_size: 1`, the only image
    # config it ships): 1,024 tokens of 4 dims. noise 0.3 and soft clip 4 as that file's lines 12 and 31.
    "imagenet256": dict(data="latents", img_size=256, channels=3, num_classes=1000, vae_family="sd", patch_size=1,
                        width=2048, head_dim=64, layers=(2, 2, 2, 2, 2, 18), rope=True, noise_std=0.3,
                        batch_size=256, lr=1e-4, warmup=10000, steps=1_000_000, weight_decay=1e-4, grad_clip=1.0,
                        ema_decay=0.9999, eval_every=10000, ckpt_every=5000, log_every=100, jacobi_chunk=32,
                        jacobi_max_iter=32, jacobi_threshold=1e-3, guidance=3.0),
    # STARFlow text-to-image 256, ml-starflow configs/starflow_3B_t2i_256x256.yaml (line): txt_size 128 (6),
    # patch_size 1 (8), channels 3072 (9), layers_per_block 2 2 2 2 2 24 (11), noise_std 0.3 (12), batch_size 1024
    # (13), lr 6.4e-5 (14), rope (17), seq_order L2R (20), use_softplus (22), cond_top_only (23), use_final_norm (24),
    # text google/flan-t5-xl (27: d_model 2048 -> txt_dim), cfg 2.5 (28, the guidance of its training-time samples;
    # sample.py:366 defaults to --cfg 5 at sampling time), drop_label 0.1 (29), soft_clip 4 (31),
    # latent_norm_regularization 1e-4 (32); head_dim 64 is train.py:486's default; padded caption tokens zeroed and
    # attended, no mask (utils/common.py:132, transformer_flow.py:438), so attention stays causal and fused.
    "t2i256": dict(data="captions.npz", img_size=256, channels=3, num_classes=0, txt_dim=2048, txt_len=128,
                   vae_family="sd", patch_size=1, width=3072, head_dim=64, layers=(2, 2, 2, 2, 2, 24),
                   text_padding="zero", seq_order="L2R", final_norm=True, rope=True, soft_clip=4.0, noise_std=0.3,
                   latent_reg=1e-4, label_drop=0.1, batch_size=1024, lr=6.4e-5, warmup=10000, steps=1_000_000,
                   ema_decay=0.9999, eval_every=10000, ckpt_every=5000, log_every=100, jacobi_chunk=32,
                   jacobi_max_iter=32, jacobi_threshold=1e-3, guidance=2.5),
    # TARFlow conditional ImageNet 64 in pixels, ml-tarflow README.md (line): patch_size 2, channels 768, 8 blocks x
    # 8 layers (58), noise_std 0.05, batch 256, lr 1e-4, drop_label 0.1 (59); sampling --cfg 2.3 (104) with annealed
    # guidance (evaluate_fid.py:77) and the denoising step. Conditioning in every block; ml-tarflow adds a class
    # embedding to every token (--class_cond add), here it is a prefix token; head_dim 64 as transformer_flow.py:131.
    "imagenet64-pixel": dict(data="imagenet64", img_size=64, channels=3, num_classes=1000, param="tarflow",
                             patch_size=2, width=768, head_dim=64, layers=(8,) * 8, cond_deep_only=False,
                             soft_clip=0.0, noise_std=0.05, label_drop=0.1, batch_size=256, lr=1e-4, warmup=5000,
                             steps=1_000_000, ema_decay=0.9999, eval_every=10000, ckpt_every=5000, log_every=100,
                             guidance=2.3, guidance_rule="tarflow", guidance_anneal=True, guide_all_blocks=True,
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
    STARFlow feeds text; ml-tarflow instead adds a class embedding to every token (class_cond add, its null the mean
    class embedding: transformer_flow.py MetaBlock.forward).
    """

    def __init__(self, cfg: Config, n_layers: int, seq_len: int, token_dim: int, grid: tuple[int, int], flip: bool,
                 conditioned: bool):
        super().__init__()
        self.cfg, self.flip, self.conditioned, self.seq_len = cfg, flip, conditioned, seq_len
        self.shift = 1 if cfg.param == "tarflow" else 0  # stream position p predicts token p + shift
        self.add_class = conditioned and not cfg.txt_dim and cfg.class_cond == "add"  # (num_classes > 0 here)
        self.prefix = (cfg.txt_len if cfg.txt_dim else 0 if self.add_class else 1) if conditioned else 0
        W = cfg.width
        self.proj_in = nn.Linear(token_dim, W)
        self.layers = nn.ModuleList([common.Block(W, W // cfg.head_dim) for _ in range(n_layers)])
        self.norm_out = nn.RMSNorm(W, eps=1e-6) if cfg.final_norm else None  # eps as ml-starflow's RMSNorm
        self.proj_out = nn.Linear(W, 2 * token_dim)
        nn.init.zeros_(self.proj_out.weight)  # (mu, a) = 0: the block starts as the identity
        nn.init.zeros_(self.proj_out.bias)
        if cfg.param == "starflow":
            self.sos = nn.Parameter(torch.randn(1, 1, token_dim))
        if cfg.rope:
            self.rope = common.RoPE(cfg.head_dim, grid, prefix=self.prefix)
            if cfg.rope_text:
                self.rope.cos, self.rope.sin = _text_rope(cfg.head_dim, grid[0], cfg.txt_len, self.prefix)
        else:
            self.pos = nn.Parameter(torch.randn(seq_len, W) * 0.02)
        if conditioned and cfg.txt_dim:
            self.proj_txt = nn.Linear(cfg.txt_dim, W)
            if cfg.txt_null == "caption":  # ml-starflow: the encoder's embedding of "" (from_official sets it)
                self.register_buffer("null_text", torch.zeros(cfg.txt_len, cfg.txt_dim))
            else:
                self.null_txt = nn.Parameter(torch.randn(1, 1, W) * 0.02)  # the unconditional "caption"
        elif conditioned and cfg.num_classes:
            self.class_emb = nn.Embedding(cfg.num_classes + (not self.add_class), W)  # + the null label (prefix)
            if self.add_class:
                nn.init.normal_(self.class_emb.weight, std=0.01)  # as ml-tarflow transformer_flow.py:140

    # -- conditioning prefix ---------------------------------------------------------------------------------------
    def embed_cond(self, cond: dict) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """cond: {"y": (B,) labels, or "text": (B, L, txt_dim) [+ "text_mask": (B, L) bool]; "null": (B,) bool}.
        Returns the prefix (B, L, W) and a key mask (B, 1, 1, L), None when there is no padding (so attention keeps
        its fused kernels). The null caption is the learned null token at every text position, all visible."""
        if not self.prefix:
            return None, None
        null = cond["null"]
        if self.cfg.txt_dim:
            text = cond["text"]
            if self.cfg.txt_null == "caption":
                text = torch.where(null[:, None, None], self.null_text.to(text.dtype), text)
            c = self.proj_txt(text.to(self.proj_txt.weight.dtype))  # (B, L, W)
            if self.cfg.txt_null == "learned":
                c = torch.where(null[:, None, None], self.null_txt.to(c.dtype).expand_as(c), c)
            keep = cond.get("text_mask")
            return c, None if keep is None else (keep | null[:, None])[:, None, None, :]
        y = torch.where(null, self.cfg.num_classes, cond["y"])
        return self.class_emb(y)[:, None], None  # (B, 1, W)

    def class_add(self, cond: dict) -> torch.Tensor | None:
        """class_cond add: the class embedding (B, 1, W) added to every token, the null label's being the mean of
        them (ml-tarflow MetaBlock.forward and reverse_step); None otherwise."""
        if not self.add_class:
            return None
        emb = self.class_emb(torch.where(cond["null"], 0, cond["y"]))
        return torch.where(cond["null"][:, None], self.class_emb.weight.mean(0), emb)[:, None]

    def head(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Network output (..., W) -> (mu, log sigma) in fp32, each (..., D)."""
        out = F.linear(h if self.norm_out is None else self.norm_out(h), self.proj_out.weight, self.proj_out.bias)
        if self.cfg.soft_clip > 0:
            out = self.cfg.soft_clip * torch.tanh(out / self.cfg.soft_clip)
        a, mu = _fp32(out).chunk(2, -1)
        log_sigma = a if self.cfg.param == "tarflow" else F.softplus(a + INV_SOFTPLUS_1).log()
        return mu, log_sigma

    def run(self, u: torch.Tensor, prefix=None, mask=None, add=None):
        """The network on all stream positions: input u (B, P, D) -> (mu, log sigma), each (B, P, D). Training and
        likelihood path, through the shared transformer blocks (so FSDP's per-block hooks apply)."""
        n = u.shape[1]
        h = self.proj_in(u.to(self.proj_in.weight.dtype))  # the flow's state is fp32; the network may be bf16
        if not self.cfg.rope:
            h = h + self.pos[:n]
        if add is not None:
            h = h + add
        L = 0
        if prefix is not None:
            h, L = torch.cat([prefix.to(h.dtype), h], 1), prefix.shape[1]
        if mask is not None:  # image keys are always visible
            mask = torch.cat([mask, mask.new_ones(h.shape[0], 1, 1, n)], -1)
        pos = slice(0, h.shape[1])
        for layer in self.layers:
            kw = dict(causal=True, mask=mask, rope=getattr(self, "rope", None), pos=pos)
            if self.cfg.grad_ckpt and self.training:
                h = checkpoint(lambda x, lyr=layer, k=kw: lyr(x, **k), h, use_reentrant=False)
            else:
                h = layer(h, **kw)
        return self.head(h[:, L:])

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
        mu, log_sigma = self.run(self.stream(x), prefix, mask, self.class_add(cond))
        if self.shift:  # TARFlow: token 0 maps by the identity
            mu, log_sigma = F.pad(mu, (0, 0, 1, 0)), F.pad(log_sigma, (0, 0, 1, 0))
        z = (_fp32(x) - mu) * torch.exp(-log_sigma)
        return (z.flip(1) if self.flip else z), -log_sigma.sum((1, 2))

    # -- decoding --------------------------------------------------------------------------------------------------
    # The inverse runs the blocks' weights directly (not the blocks' forward): one preallocated K/V buffer per layer
    # in the network's compute dtype (bf16 under autocast; no per-token cast of the cache), positions written in
    # place (a Jacobi iteration rewrites its chunk's slots, nothing to rewind), no mask at all for one-token steps
    # without padding (SDPA's fused kernels), one causal mask built per call and sliced, RoPE tables cast once, the
    # conditioning prefix through the layers once per call, LayerNorm gains folded into the weights, and no module
    # hooks per token (an FSDP2 model is gathered once per sampling call by `sample`, through common.full_params).
    # On CPU a one-token step is all dispatch overhead: bench.py measures it against ml-tarflow's decoder.
    def start(self, nb: int, prefix, mask, device, temp: float = 1.0, n_temp: int = 0, add=None) -> dict:
        """Decoding state for nb sequences; the prefix (nb, L, W) goes into the caches now. `temp` divides the
        attention logits of the last `n_temp` sequences (TARFlow's temperature of the unconditional branch); `add`
        (nb, 1, W) is added to every token's input (class_cond add)."""
        dt = _compute_dtype(self, device)
        Lmax, a = self.prefix + self.seq_len, self.layers[0].attn
        # zeros, not empty: the static-shape step attends to unwritten slots under a mask, and 0 * NaN would leak
        kv = [torch.zeros(2, nb, a.n_heads, Lmax, a.head_dim, device=device, dtype=dt) for _ in self.layers]
        st = dict(dtype=dt, kv=kv, k=[c[0] for c in kv], v=[c[1] for c in kv],  # (K | V, nb, H, positions, Dh)
                  slots=torch.arange(Lmax, device=device),
                  key_mask=None if mask is None else torch.cat([mask, mask.new_ones(nb, 1, 1, self.seq_len)], -1),
                  tril=torch.ones(Lmax, Lmax, dtype=torch.bool, device=device).tril(), qscale=None, cs=None,
                  w=self._weights(dt), add=add)
        if n_temp and temp != 1.0:
            st["qscale"] = torch.cat([torch.ones(nb - n_temp), torch.full((n_temp,), 1 / temp)]).to(
                device, dt).view(nb, 1, 1, 1)
        if self.cfg.rope:
            st["cs"] = (self.rope.cos.to(dt), self.rope.sin.to(dt))
        if self.prefix:
            self._layers(prefix, 0, st)
        return st

    def step(self, u: torch.Tensor, s: int | torch.Tensor, st: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Stream positions s..s+n of input u (nb, n, D), after positions < s are in the caches -> (mu, log sigma).
        s may instead be a 0-d tensor (one token): then no shape depends on the position, and torch.compile captures
        the step once for every token (`reverse(compiled=True)`)."""
        nb, n, D = u.shape  # 2-D matmuls below: F.linear on 3-D inputs costs reshapes per token
        h = F.linear(u.reshape(nb * n, D).to(st["dtype"]), self.proj_in.weight, self.proj_in.bias).view(nb, n, -1)
        if not self.cfg.rope:  # dtypes as in the training forward (fp32 after this add under autocast)
            h = h + (self.pos.index_select(0, s.view(1)) if torch.is_tensor(s) else self.pos[s:s + n])
        if st["add"] is not None:
            h = h + st["add"]
        mu, log_sigma = self.head(self._layers(h, self.prefix + s, st))  # (nb n, D) each
        return mu.view(nb, n, D), log_sigma.view(nb, n, D)

    def _layers(self, h: torch.Tensor, p0: int | torch.Tensor, st: dict) -> torch.Tensor:
        """h (nb, n, W) at absolute positions p0..p0+n (prefix included) through every layer, writing the caches;
        returns (nb n, W).
        Plain matmuls on weights prepared once per call (`_weights`): no module dispatch, no weight cast and no
        LayerNorm affine per token, which dominate small batches."""
        nb, n, W = h.shape
        if torch.is_tensor(p0):  # static shapes (one token): write slot p0 by index, attend to every slot under a mask
            slots, m = p0.view(1), st["slots"].shape[0]
            mask = (st["slots"] <= p0).view(1, m)
            mask = mask if st["key_mask"] is None else mask & st["key_mask"]
        else:
            slots, m = slice(p0, p0 + n), p0 + n
            mask = st["key_mask"][..., :m] if st["key_mask"] is not None else None
            if n > 1:  # the last n queries of m keys: causal among themselves
                mask = st["tril"][p0:m, :m] if mask is None else mask & st["tril"][p0:m, :m]
        cs = None if st["cs"] is None else (st["cs"][0][slots], st["cs"][1][slots])
        h = h.reshape(nb * n, W)
        for (wqkv, bqkv, wo, bo, w1, b1, w2, b2, eps1, eps2), KV, K, V in zip(st["w"], st["kv"], st["k"], st["v"]):
            H, Dh = K.shape[1], K.shape[3]
            qkv = torch.addmm(bqkv, F.layer_norm(h, (W,), eps=eps1), wqkv).view(nb, n, 3, H, Dh).permute(2, 0, 3, 1, 4)
            if cs is not None:  # (3, nb, H, n, Dh): rotate q and k together
                qkv = torch.cat([_rotate(qkv[:2], *cs), qkv[2:]])
            KV[:, :, :, slots] = qkv[1:]  # keys and values in one write
            q = qkv[0] if st["qscale"] is None else qkv[0] * st["qscale"]
            y = F.scaled_dot_product_attention(q, K[:, :, :m], V[:, :, :m], attn_mask=mask)  # (nb, H, n, Dh)
            h = h + torch.addmm(bo, y.transpose(1, 2).reshape(nb * n, W), wo)
            h = h + torch.addmm(b2, F.gelu(torch.addmm(b1, F.layer_norm(h, (W,), eps=eps2), w1)), w2)
        return h  # (nb n, W)

    def _weights(self, dt: torch.dtype) -> list:
        """Per layer: (W_qkv^T, b_qkv, W_o^T, b_o, W_1^T, b_1, W_2^T, b_2, eps_1, eps_2) in dtype dt, each LayerNorm's
        gain and bias folded into the matmul after it: LN(h) W^T + b = norm(h) (g * W)^T + (W beta + b)."""
        out = []
        for layer in self.layers:
            qkv, o, fc1, fc2 = layer.attn.qkv, layer.attn.proj, layer.mlp[0], layer.mlp[2]
            n1, n2 = layer.norm1, layer.norm2
            out.append(((qkv.weight * n1.weight).t().to(dt), (qkv.bias + (qkv.weight * n1.bias).sum(1)).to(dt),
                        o.weight.t().to(dt), o.bias.to(dt),  # (elementwise sums: autocast cannot round them to bf16)
                        (fc1.weight * n2.weight).t().to(dt), (fc1.bias + (fc1.weight * n2.bias).sum(1)).to(dt),
                        fc2.weight.t().to(dt), fc2.bias.to(dt), n1.eps, n2.eps))
        return out

    @torch.no_grad()
    def reverse(self, z: torch.Tensor, cond: dict, guidance: float = 0.0, rule: str = "starflow", what: str = "ab",
                anneal: bool = False, chunk: int = 1, max_iter: int = 1, threshold: float = 0.0,
                attn_temp: float = 1.0, compiled: bool = False) -> tuple[torch.Tensor, int]:
        """z (B, T, D) -> x, and the number of network evaluations. Jacobi decoding over chunks of `chunk` stream
        positions: iterate x_chunk <- mu(x_<) + sigma(x_<) z_chunk on top of the cached prefix. chunk = 1 is the
        sequential sampler. Guidance (`guide` with `rule`, `what`; `anneal` ramps w over the tokens) runs the
        conditional and null branches as one batch; `attn_temp` != 1 tempers the null branch's attention (TARFlow),
        which also gives an unconditional block a second branch to guide against.

        Jacobi stops a chunk when every sample's relative change is below `threshold` (a batch mean lets one
        large-scale sample hide the others' unconverged tokens), treats a non-finite iterate as unconverged (and
        zeroes it so it cannot poison later positions), and redoes a chunk one token at a time if its last iterate
        is still non-finite, so it never returns a non-finite sample where the sequential sampler would not.

        compiled: one-token steps run through torch.compile, positions passed as tensors so that one graph serves
        every token and every call of the same batch size (fusing the LayerNorms, GELUs and adds on a GPU)."""
        B, T = z.shape[0], z.shape[1]
        z = _fp32(z.flip(1) if self.flip else z)
        guided = guidance > 0 and (self.conditioned or attn_temp != 1.0)
        if guided:
            cond = {**{k: torch.cat([v, v]) for k, v in cond.items()},
                    "null": torch.cat([cond["null"], torch.ones_like(cond["null"])])}
        nb = 2 * B if guided else B
        prefix, mask = self.embed_cond(cond)
        st = self.start(nb, prefix, mask, z.device, attn_temp, B if guided else 0, self.class_add(cond))
        x = z.clone()  # x_0 = z_0 for TARFlow; every other token is overwritten
        P, nfe = T - self.shift, 0  # stream positions

        one = torch.compile(self.step, fullgraph=True, dynamic=False) if compiled else None

        def update(s, e):  # one network evaluation of stream positions s..e -> the new tokens s+shift..e+shift
            u = self.stream(x, s, e)
            u = torch.cat([u, u]) if guided else u
            if one is not None and e - s == 1:  # (contiguous: the guided and unguided inputs share the graph)
                mu, log_sigma = one(u.contiguous(), st["slots"][s], st)
            else:
                mu, log_sigma = self.step(u, s, st)
            if guided:
                w = guidance * ((torch.arange(s, e, device=z.device) + 1) / P)[None, :, None] if anneal else guidance
                mu, log_sigma = guide(mu[:B], log_sigma[:B], mu[B:], log_sigma[B:], w, rule, what)
            return torch.addcmul(mu, log_sigma.exp(), z[:, s + self.shift:e + self.shift])

        for s in range(0, P, chunk):
            e = min(s + chunk, P)
            t0, t1 = s + self.shift, e + self.shift
            if e - s == 1:  # one token: exact in one step, no convergence test (no host sync)
                x[:, t0:t1] = update(s, e)
                nfe += 1
                continue
            n_iter = min(max_iter, e - s)  # a chunk of n tokens is exact after n iterations
            for it in range(n_iter):
                new = update(s, e)
                nfe += 1
                finite = torch.isfinite(new).all(2).all(1)  # (B,)
                new = torch.nan_to_num(new, nan=0.0, posinf=0.0, neginf=0.0)
                change = (new - x[:, t0:t1]).double().square().mean((1, 2)) / \
                    new.double().square().mean((1, 2)).clamp(min=1e-12)
                x[:, t0:t1] = new
                # all ranks stop together (ml-starflow all-reduces unconditionally: its sampler needs torch.distributed)
                if it == n_iter - 1 or common.all_ranks((finite & (change < threshold)).all()):
                    break
            if not common.all_ranks(finite.all()):  # rare: finish this chunk exactly, one token at a time
                for p in range(s, e):
                    x[:, p + self.shift:p + self.shift + 1] = update(p, p + 1)
                    nfe += 1
        return (x.flip(1) if self.flip else x), nfe


def _text_rope(head_dim: int, side: int, txt_len: int, prefix: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin (prefix + side^2, head_dim/2) of ml-starflow's 3D RoPE (misc/pe.py, VisionRotaryEmbeddingFast with
    latent_len = txt_len and get_positions '3d'): of the head_dim/2 frequencies the last 8, theta^(-k/8), turn with the
    text position t / L * side (text tokens sit at x = y = 0); the others, theta^(-2k/(head_dim/2 - 8)), with x and
    with y (image tokens at text position 0). fp32 as there. Its rotation pairs interleaved channels (2i, 2i+1);
    from_official permutes the q and k rows of the weights into the half split of `_rotate`, which q.k is blind to."""
    d = head_dim // 2 - 8
    f = 1.0 / 10000 ** (torch.arange(0, d, 2).float() / d)
    px, py = torch.meshgrid(torch.arange(side) / side * side, torch.arange(side) / side * side, indexing="ij")
    img = torch.cat([px.reshape(-1, 1) * f, py.reshape(-1, 1) * f, torch.zeros(side * side, 8)], 1)
    t = torch.arange(prefix) / txt_len * side
    ang = torch.cat([torch.cat([torch.zeros(prefix, d), t[:, None] * (1.0 / 10000 ** (torch.arange(8) / 8))], 1), img])
    return ang.cos(), ang.sin()


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """common.RoPE's rotation ("half split" pairs) with tables already sliced and cast: x (B, H, n, Dh)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def _compute_dtype(module: nn.Module, device) -> torch.dtype:
    """The network's compute dtype: autocast's when it is on (bf16 sampling), else the weights' (bf16 under FSDP's
    mixed precision, fp64 in tests)."""
    dev = torch.device(device).type
    if torch.amp.is_autocast_available(dev) and torch.is_autocast_enabled(dev):  # (not on the meta device)
        return torch.get_autocast_dtype(dev)
    return next(module.parameters()).dtype


def _fp32(x: torch.Tensor) -> torch.Tensor:
    """The affine maps run in (at least) fp32 even when the transformer runs in bf16."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


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
    """Patchify, then K FlowBlocks with alternating token order; the last (deep) block is next to the prior.
    seq_order R2L: block i reads the tokens reversed when i is odd (TARFlow); L2R: when i is even, so the deep block
    of an even stack reads them in raster order (ml-starflow transformer_flow.py:1083 and :1100)."""

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
            FlowBlock(cfg, n, self.T, self.D, (side, side), flip=(i + (cfg.seq_order == "L2R")) % 2 == 1,
                      conditioned=(i == K - 1 or not cfg.cond_deep_only) and bool(cfg.num_classes or cfg.txt_dim))
            for i, n in enumerate(cfg.layers)])
        if cfg.prior_var:  # ml-tarflow's prior variance (all ones in its nvp models; Model.reverse scales z by it)
            self.register_buffer("var", torch.ones(self.T, self.D))

    def patchify(self, x):  # (B, C, H, W) -> (B, T, p*p*C), or (B, T, C*p*p) as F.unfold under patch_order chw
        B, C, H, W = x.shape
        p = self.cfg.patch_size
        if (C, H, W) != (self.C, self.S, self.S):
            raise ValueError(f"input of shape {(C, H, W)}, the model takes {(self.C, self.S, self.S)}")
        order = (0, 2, 4, 3, 5, 1) if self.cfg.patch_order == "hwc" else (0, 2, 4, 1, 3, 5)
        return x.view(B, C, H // p, p, W // p, p).permute(*order).reshape(B, self.T, self.D)

    def unpatchify(self, x):  # (B, T, D) -> (B, C, H, W)
        p, s = self.cfg.patch_size, self.S // self.cfg.patch_size
        if self.cfg.patch_order == "chw":
            return x.view(-1, s, s, self.C, p, p).permute(0, 3, 1, 4, 2, 5).reshape(-1, self.C, self.S, self.S)
        return x.view(-1, s, s, p, p, self.C).permute(0, 5, 1, 3, 2, 4).reshape(-1, self.C, self.S, self.S)

    def make_cond(self, y=None, text=None, text_mask=None, null=None, batch: int | None = None,
                  check: bool = True) -> dict:
        """The conditioning dict every block takes; `null` marks samples given the null condition. text_mask None =
        no padding. check=False skips the label range check (a host sync; the trainer checks the data once)."""
        cfg = self.cfg
        B = batch or (y.shape[0] if y is not None else text.shape[0])
        dev = next(self.parameters()).device
        cond = {"null": torch.zeros(B, dtype=torch.bool, device=dev) if null is None else null}
        if cfg.txt_dim:
            if text is None or text.shape[1:] != (cfg.txt_len, cfg.txt_dim):
                raise ValueError(f"text embeddings must be (B, {cfg.txt_len}, {cfg.txt_dim}), got "
                                 f"{None if text is None else tuple(text.shape)}")
            cond["text"] = text
            if text_mask is not None and cfg.text_padding == "zero":  # ml-starflow utils/common.py:132: zeroed and
                # attended, no key mask, so every attention stays causal and fused (a mask costs (B, L, L) per call)
                cond["text"] = text * text_mask[..., None].to(text.dtype)
            elif text_mask is not None:
                cond["text_mask"] = text_mask.bool()
        elif cfg.num_classes:
            if y is None or (check and (y.min() < 0 or y.max() >= cfg.num_classes)):
                raise ValueError(f"class labels must be in [0, {cfg.num_classes}), got "
                                 f"{None if y is None else (int(y.min()), int(y.max()))}")
            cond["y"] = y
        return cond

    def forward(self, x: torch.Tensor, cond: dict, states: list | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, C, H, W) -> z (B, T, D), log|det| (B,) summed over blocks; `states` collects each block's output."""
        z, logdet = self.patchify(x), 0.0
        for block in self.blocks:
            z, ld = block(z, cond)
            logdet = logdet + ld
            if states is not None:
                states.append(z)
        return z, logdet

    def log_prob(self, x, cond) -> torch.Tensor:
        """Exact log density of x under the flow (B,), in nats, Gaussian prior included."""
        z, logdet = self(x, cond)
        if self.cfg.prior_var:  # N(0, var), the prior ml-tarflow's sampler draws from
            return -0.5 * (_fp32(z).square() / self.var + torch.log(2 * math.pi * self.var)).sum((1, 2)) + logdet
        return -0.5 * _fp32(z).square().sum((1, 2)) - 0.5 * math.log(2 * math.pi) * z[0].numel() + logdet


# ----------------------------------------------------------------------------------------------------------------------
# Loss


def nll_loss(model, x, cond, noise_std: float = 0.0, latent_reg: float = 0.0) -> torch.Tensor:
    """TARFlow's objective: mean over dimensions of 0.5 z^2 - log|det| (up to the Gaussian constant).

    x: clean model-space inputs (pixels in [-1, 1], or scaled VAE latents); `noise_std` adds TARFlow's Gaussian noise
    augmentation x + sigma eps, which training needs (pass cfg.noise_std: the sampler's denoising step assumes it;
    pass 0 for inputs dequantised already, `dequantize_pixels`).
    cond: `model.make_cond(y, null=torch.rand(B) < cfg.label_drop)`, so the null branch of guidance is trained too.
    latent_reg: + latent_reg * sum of mean z^2 over the states between blocks (ml-starflow train.py:259-260, which
    also sums the input's, a constant)."""
    if noise_std > 0:
        x = x + noise_std * torch.randn_like(x)
    states = [] if latent_reg > 0 else None
    z, logdet = model(x, cond, states)
    loss = 0.5 * _fp32(z).square().mean() - logdet.mean() / z[0].numel()
    if latent_reg > 0:
        loss = loss + latent_reg * sum(_fp32(s).square().mean() for s in states[:-1])
    return loss


def dequantize_pixels(u: torch.Tensor, generator=None) -> torch.Tensor:
    """TARFlow's uniform dequantisation of 8-bit pixels: (u + U[0,1)) / 128 - 1, in [-1, 1). Its density, times
    128^D, is a lower bound on the discrete likelihood: the bits/dim published for pixel flows."""
    noise = torch.rand(u.shape, generator=generator).to(u.device) if generator is not None else \
        torch.rand(u.shape, device=u.device)
    return (u.float() + noise) / 128.0 - 1


def bits_per_dim(nll_per_dim, pixels: bool, uniform: bool = False):
    """Per-dimension NLL in nats (without the Gaussian constant) -> bits/dim. Pixels in [-1, 1] from 8 bits add the
    density of the 0..255 scale: log(127.5) per dimension, log(128) for uniformly dequantised ones."""
    scale = (128.0 if uniform else 127.5) if pixels else 1.0
    return (nll_per_dim + 0.5 * math.log(2 * math.pi) + math.log(scale)) / math.log(2)


# ----------------------------------------------------------------------------------------------------------------------
# Sampler


@torch.no_grad()
def sample(model: STARFlow, cond: dict, cfg: Config, generator=None, z: torch.Tensor | None = None
           ) -> tuple[torch.Tensor, int]:
    """Invert the stack: the deep block first (from the prior), then the shallow ones. Returns x in model space
    (B, C, H, W) and the number of sequential network evaluations."""
    B = cond["null"].shape[0]
    dev = next(model.parameters()).device
    if cfg.guidance > 0 and cfg.attn_temp == 1 and not any(b.conditioned for b in model.blocks):
        raise ValueError(f"guidance {cfg.guidance} asked of a model without a condition (pass guidance 0, or "
                         f"attn_temp != 1 for TARFlow's tempered unconditional branch)")
    if z is None:
        z = torch.randn(B, model.T, model.D, device=dev, generator=generator)
    if cfg.prior_var:
        z = z * model.var.sqrt()  # ml-tarflow transformer_flow.py Model.reverse
    chunk, iters = (cfg.jacobi_chunk, cfg.jacobi_max_iter) if cfg.sampler == "jacobi" else (1, 1)
    x, nfe = z, 0
    # --compile: a graph per block shape and batch size (`FlowBlock.reverse`), more than dynamo's default 8 allows
    graphs = torch._dynamo.config.patch(recompile_limit=64) if cfg.compile else contextlib.nullcontext()
    with common.full_params(model), common.decoding(dev), graphs:
        for i, block in reversed(list(enumerate(model.blocks))):
            w = cfg.guidance if (i == len(model.blocks) - 1 or cfg.guide_all_blocks) else 0.0
            x, n = block.reverse(x, cond, w, cfg.guidance_rule, cfg.guide_what, cfg.guidance_anneal, chunk, iters,
                                 cfg.jacobi_threshold, cfg.attn_temp, cfg.compile)
            nfe += n
    x = model.unpatchify(x.clone())  # a normal tensor again: inference tensors cannot enter the score step's autograd
    # the score step undoes the Gaussian training noise; a fine-tuned decoder (STARFlow) takes noisy latents instead
    if cfg.denoise and cfg.noise_std > 0 and cfg.dequant == "gaussian" and not cfg.decoder:
        x = denoise(model, x, cond, cfg.noise_std)
    return x, nfe


def denoise(model: STARFlow, x: torch.Tensor, cond: dict, sigma: float, parts: int = 4) -> torch.Tensor:
    """TARFlow's denoising, Tweedie's formula with the flow's own score: E[x_clean | x] = x + sigma^2 grad log p(x).
    In `parts` sub-batches (ml-tarflow evaluate_fid.py:19 uses batch/4), in fp32, so it fits where sampling fits."""
    out, B = [], x.shape[0]
    n = max(1, -(-B // parts))
    dev = x.device.type
    for i in range(0, B, n):
        c = {k: v[i:i + n] for k, v in cond.items()}
        with torch.enable_grad(), torch.autocast(dev, enabled=False):
            xb = x[i:i + n].detach().float() if x.dtype in (torch.float16, torch.bfloat16) else x[i:i + n].detach()
            xb.requires_grad_(True)
            (score,) = torch.autograd.grad(model.log_prob(xb, c).sum(), xb)
        out.append((xb + sigma ** 2 * score).detach())
    return torch.cat(out)


# ----------------------------------------------------------------------------------------------------------------------
# Data, VAE and evaluation


def load_vae(cfg: Config, device):
    if cfg.vae_family == "none" and not cfg.vae:
        if cfg.decoder:  # checked here, not in the config: `--eval --ckpt --decoder` takes the VAE from the checkpoint
            raise ValueError(f"--decoder {cfg.decoder} needs a latent model (--vae, --vae_family)")
        return None
    if not cfg.vae:
        raise ValueError(f"--vae_family {cfg.vae_family} needs --vae PATH to the VAE weights")
    path = common.digits_vae(cfg.img_size) if cfg.vae == "digits" else cfg.vae  # trained once, about a minute
    vae = common.load_vae(path, family=cfg.vae_family, device=device).eval()
    if cfg.decoder:  # STARFlow's decoder fine-tuned on noisy latents (--finetune_decoder)
        state = common.load_checkpoint(cfg.decoder)
        if state.get("kind") != "starflow-decoder":
            raise ValueError(f"--decoder {cfg.decoder} is not a decoder written by --finetune_decoder")
        vae.ae.load_state_dict({**vae.ae.state_dict(), **state["decoder"]})
    return vae


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


class _Rows(common.ArrayDataset):
    """Rows `rows` (sorted) of an ArrayDataset, without copying memory-mapped arrays; sorted batch indices stay
    sorted, so reads stay sequential."""

    def __init__(self, data: common.ArrayDataset, rows: np.ndarray):
        self.base, self.rows, self.arrays = data, rows, data.arrays

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, idx):
        return self.base[self.rows[idx]]


def load_data(cfg: Config, split: str = "train"):
    """A Dataset of (image uint8 (C, H, W) or latent float (c, h, w), label[, text, text_mask]).

    split: train | val | all. Held out: digits -> its fixed test split; else --val_data when given, or else a fixed
    --val_frac of the rows of --data (seeded by 0, the same on every run and rank), which training never sees."""
    if cfg.data == "digits":
        if cfg.channels != 1:
            raise ValueError(f"digits have 1 channel, the config says {cfg.channels}")
        x, y = common.load_digits("test" if split == "val" else "train", cfg.img_size)
        return common.ArrayDataset(x, y)
    if split == "val" and cfg.val_data:
        return _read(cfg, cfg.val_data)
    data = _read(cfg, cfg.data)
    if split == "all" or (split == "train" and cfg.val_data):
        return data
    n = len(data)
    val = np.sort(np.random.default_rng(0).permutation(n)[:max(1, round(cfg.val_frac * n))])
    rows = val if split == "val" else np.setdiff1d(np.arange(n), val)
    return _Rows(data, rows) if isinstance(data, common.ArrayDataset) else torch.utils.data.Subset(data, rows)


def _read(cfg: Config, src: str):
    path = Path(src)
    keys = ("text", "text_mask") if cfg.txt_dim else ()
    if path.is_dir() and (path / "latents.npy").exists():  # precomputed latents (memory-mapped, text too)
        a = common.load_arrays(path, ("latents", "labels", *keys))
        arrays = [a["latents"], a.get("labels", np.zeros(len(a["latents"]), dtype=np.int64))]
    elif path.is_dir():
        if cfg.txt_dim:
            raise ValueError(f"{path}: an image folder has no captions; a text model takes an .npz or latent folder")
        return common.ImageFolder(path, cfg.img_size, cfg.channels)
    else:
        a = common.load_arrays(path, ("images", "labels", *keys))
        images = a["images"]
        if images.dtype != np.uint8:  # float arrays would pass for latents downstream: say so instead
            raise ValueError(f"{path}: images must be uint8 (N, H, W, C), got {images.dtype} (precomputed latents go "
                             f"in a latent folder: see --precompute)")
        if images.ndim != 4 or images.shape[1:] != (cfg.img_size, cfg.img_size, cfg.channels):
            raise ValueError(f"{path}: images must be (N, {cfg.img_size}, {cfg.img_size}, {cfg.channels}) uint8, "
                             f"got {images.shape}")
        arrays = [np.ascontiguousarray(images.transpose(0, 3, 1, 2)), a.get("labels", np.zeros(len(images), np.int64))]
    if cfg.txt_dim:
        if "text" not in a or a["text"].shape[1:] != (cfg.txt_len, cfg.txt_dim):
            raise ValueError(f"{path}: a text model needs `text` (N, {cfg.txt_len}, {cfg.txt_dim}), got "
                             f"{a['text'].shape if 'text' in a else 'none'}")
        mask = a.get("text_mask")
        arrays += [a["text"], np.ones(a["text"].shape[:2], bool) if mask is None else mask]
    return common.ArrayDataset(*arrays)


def text_padded(data) -> bool:
    """Whether any caption of the data is padded (then attention needs key masks), read once, in slices."""
    base = getattr(data, "base", getattr(data, "dataset", data))
    if not isinstance(base, common.ArrayDataset) or len(base.arrays) < 4:
        return False
    m = base.arrays[3]
    return not all(bool(np.all(m[i:i + 65536])) for i in range(0, len(m), 65536))


def check_labels(cfg: Config, data):
    """Class labels in range, checked once on the data (not per training step: that would be a host sync)."""
    base = getattr(data, "base", getattr(data, "dataset", data))
    if cfg.num_classes and isinstance(base, common.ArrayDataset):
        y = np.asarray(base.arrays[1])
        if len(y) and (y.min() < 0 or y.max() >= cfg.num_classes):
            raise ValueError(f"class labels must be in [0, {cfg.num_classes}), the data has {y.min()}..{y.max()}")


def to_model_space(batch_x: torch.Tensor, vae) -> torch.Tensor:
    """uint8 images -> [-1, 1] (pixel space) or VAE latents; float inputs are precomputed latents already."""
    if batch_x.dtype != torch.uint8:
        return batch_x.float()
    x = common.to_float(batch_x)
    return x if vae is None else vae.encode(x)


def batch_cond(model: STARFlow, batch, drop: float = 0.0, padded: bool = True) -> dict:
    """The condition of a data batch (x, y[, text, text_mask]); `padded` False drops the all-True text masks."""
    cfg = model.cfg
    y = batch[1].long() if cfg.num_classes else None
    text, text_mask = (batch[2], batch[3] if padded else None) if cfg.txt_dim else (None, None)
    B = batch[0].shape[0]
    null = torch.rand(B, device=batch[0].device) < drop
    return model.make_cond(y, text, text_mask, null, batch=B, check=False)


def eval_conditions(cfg: Config, data, n: int) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Labels and captions to sample for an evaluation: digits 0..9 in turn; otherwise those of the first n held-out
    examples (repeated when fewer), so a text model samples from held-out captions."""
    if cfg.data == "digits" or not len(data):
        return torch.arange(n) % max(cfg.num_classes, 1), None, None
    batch = data[np.arange(n) % len(data)] if isinstance(data, common.ArrayDataset) else \
        [torch.stack([torch.as_tensor(data[i][k]) for i in np.arange(n) % len(data)]) for k in range(2)]
    labels = torch.as_tensor(batch[1]).long() if cfg.num_classes else torch.zeros(n, dtype=torch.long)
    if not cfg.txt_dim:
        return labels, None, None
    return labels, torch.as_tensor(batch[2]).float(), torch.as_tensor(batch[3]).bool()


@torch.no_grad()
def heldout_bpd(model: STARFlow, cfg: Config, data, vae, d: common.Dist, dequantize: bool, n_max: int = 2000,
                bs: int = 256) -> tuple[float, float, int]:
    """Bits/dim on held-out data -> (mean, its standard error, examples). Pixels with `dequantize`: uniform dequantisation, x = (u + U[0,1)) / 128 - 1 -- a
    bound on the discrete likelihood (as ml-tarflow's evaluate_bpd.py), the published kind; else the density of the
    data with the training noise (Gaussian noise_std, or uniform under --dequant uniform)."""
    g = torch.Generator(device="cpu").manual_seed(1234)
    tot = torch.zeros(3, device=d.device)
    padded = text_padded(data)
    uniform = dequantize or (cfg.dequant == "uniform" and vae is None)
    for batch in common.rank_loader(data, d, bs, cfg.num_workers, n=min(len(data), n_max)):
        batch = [t.to(d.device) for t in batch]
        if uniform:
            x = dequantize_pixels(batch[0], g)
        else:
            x = to_model_space(batch[0], vae)
            x = x + cfg.noise_std * torch.randn(x.shape, generator=g).to(d.device)
        extra = (math.log(128.0) if uniform else math.log(127.5)) if vae is None and batch[0].dtype == torch.uint8 \
            else 0.0
        cond = batch_cond(model, batch, padded=padded)
        nll = -model.log_prob(x, cond) / x[0].numel() + extra  # nats/dim, per sample
        tot += torch.stack([nll.sum(), nll.square().sum(), torch.tensor(float(len(nll)), device=d.device)])
    mean, se, n = common.mean_se(tot)  # nats/dim over every rank's examples
    return mean / math.log(2), se / math.log(2), n  # bits/dim


def sample_batch(model: STARFlow, cfg: Config, device) -> int:
    """The default sampling batch: the largest whose biggest KV cache (one block's, both guidance branches, in the
    compute dtype) fits a quarter of the free accelerator memory, 4 GiB on CPU; at most 256. E.g. t2i256 in bf16:
    24 layers x (K, V) x 1,152 positions x 3,072 x 2 bytes x 2 branches = 0.68 GB per sample -> about 30 on an
    empty 80 GB H100 (in fp32 at the former fixed batch of 256 the cache alone would be 348 GB)."""
    if cfg.sample_batch:
        return cfg.sample_batch
    dev = torch.device(device)
    amp = cfg.amp and dev.type == "cuda"
    nbytes = 2 if amp else next(model.parameters()).element_size()
    per = max(2 * len(b.layers) * (b.prefix + b.seq_len) * cfg.width * nbytes * (2 if b.conditioned or
                                                                                  cfg.attn_temp != 1 else 1)
              for b in model.blocks)
    budget = torch.cuda.mem_get_info(dev)[0] / 4 if dev.type == "cuda" else 4 * 2 ** 30
    return int(max(1, min(256, budget // per)))


@torch.no_grad()
def generate(model, cfg: Config, labels: torch.Tensor, vae, seed: int, text=None, text_mask=None,
             bs: int | None = None):
    """Samples as uint8 (N, C, H, W) for the given labels (or captions), in batches (`sample_batch`); under --amp on
    a GPU the network and its KV cache run in bf16, the flow's state in fp32. Returns (images, nfe)."""
    dev = next(model.parameters()).device
    g = torch.Generator(device=dev).manual_seed(seed)
    bs = bs or sample_batch(model, cfg, dev)
    padded = text_mask is not None and not bool(text_mask.all())
    out, nfe = [], 0
    for i in range(0, len(labels), bs):
        sl = slice(i, i + bs)
        cond = model.make_cond(labels[sl].to(dev) if cfg.num_classes else None,
                               None if text is None else text[sl].to(dev),
                               text_mask[sl].to(dev) if padded else None, batch=len(labels[sl]))
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=cfg.amp and dev.type == "cuda"):
            x, nfe = sample(model, cond, cfg, generator=g)
        x = x.float() if vae is None else vae.decode(x.float())
        out.append(common.to_uint8(x).cpu())
    return torch.cat(out), nfe


def evaluate(model, cfg: Config, vae, d: common.Dist, n_samples: int = 500) -> dict:
    """Held-out bits/dim (load_data's "val" split): `bpd` with the training noise, and for 8-bit pixels
    `bpd_dequantized` (uniform dequantisation: the published kind); on digits also classifier accuracy and Frechet
    distance of class-conditional samples, with the configured guidance and without."""
    model.eval()
    test = load_data(cfg, "val")
    out = dict(zip(("bpd", "bpd_se", "bpd_n"), heldout_bpd(model, cfg, test, vae, d, dequantize=False)))
    if vae is None and len(test) and test[0][0].dtype == torch.uint8:
        out["bpd_dequantized"], out["bpd_dequantized_se"], _ = heldout_bpd(model, cfg, test, vae, d, dequantize=True)
    common.check_heldout(out["bpd_n"], out["bpd_se"], "bits/dim", "--val_data, or a larger --val_frac")
    if cfg.data == "digits" and cfg.num_classes:
        start, count = common.rank_split(n_samples, d)
        labels = torch.arange(start, start + count) % cfg.num_classes
        for name, w in (("guided", cfg.guidance), ("unguided", 0.0)):
            c = dataclasses.replace(cfg, guidance=w)
            imgs, nfe = generate(model, c, labels, vae, seed=cfg.seed + 7 + d.rank)
            imgs, labs = common.gather(imgs, d), common.gather(labels, d)
            if d.is_main:
                m = common.digits_metrics(imgs, labs)
                out.update({f"{k}_{name}": v for k, v in m.items() if k != "fd_floor"}, fd_floor=m["fd_floor"])
                out[f"nfe_{name}"] = nfe
    if cfg.fid_ref:  # the standard Inception FID, of samples for the held-out conditions, with the configured guidance
        start, count = common.rank_split(cfg.fid_n, d)
        labels, text, mask = (t if t is None else t[start:start + count] for t in eval_conditions(cfg, test, cfg.fid_n))
        imgs = common.gather(generate(model, cfg, labels, vae, cfg.seed + 11 + d.rank, text, mask)[0], d)
        if d.is_main:
            out.update(fid=common.fid(imgs, cfg.fid_ref, cfg.fid_weights, d.device), fid_n=len(imgs))
    model.train()
    return out


# ----------------------------------------------------------------------------------------------------------------------
# Official weights: the state dicts of apple/ml-tarflow and apple/ml-starflow (transformer_flow.Model), as released


def official_source(state) -> str | None:
    """"tarflow" | "starflow" for a state dict the official code saved (flat, tensors, its Model's keys), else None.
    ml-starflow's have a start token, RoPE tables, text projections or final norms; a plain ml-starflow model with
    none of them would pass for ml-tarflow's."""
    if not isinstance(state, dict) or "blocks.0.proj_in.weight" not in state or \
            not all(torch.is_tensor(v) for v in state.values()):
        return None
    star = any(k.startswith("feat_rope.") or k.endswith((".sos_embed", ".proj_txt.weight", ".final_norm.weight"))
               for k in state)
    return "starflow" if star else "tarflow"


def from_official(path, device="cpu", null_text=None, *, state=None, **overrides) -> tuple[STARFlow, Config]:
    """An official checkpoint file (`state`: what was read from it) -> our STARFlow computing the same function, and its
    Config: the architecture from the tensor shapes; `overrides` only for what the weights do not carry (noise_std,
    channels / vae_family / img_size where the patch is ambiguous, head_dim without RoPE tables; ml-starflow's
    param, soft_clip, seq_order) and run-time fields. null_text: ml-starflow's null caption, the text encoder's
    embedding of "" (txt_len, txt_dim) (array, tensor or .npy path), which its guidance feeds the null branch.
    Sampler defaults are the official sampling scripts' (cited below)."""
    sd = common.load_checkpoint(path) if state is None else state
    src = official_source(sd)
    if src is None:
        raise ValueError(f"{path} is not an ml-tarflow / ml-starflow state dict")
    sd = {k: v.float() for k, v in sd.items()}
    if "var" not in sd or (src == "starflow" and "blocks.0.attn_mask" not in sd):  # persistent buffers of its Model
        raise ValueError(f"{path}: no `var` / `attn_mask` buffers to read the token grid and text length from")
    K = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    layers = tuple(len({k.split(".")[3] for k in sd if k.startswith(f"blocks.{i}.attn_blocks.")}) for i in range(K))
    bad = [k for k in sd if k.startswith("learnable_self_denoiser.")] or [i for i in range(K) if not layers[i]]
    if bad:
        raise ValueError(f"{path}: ml-starflow's learnable denoiser / identity blocks are not supported ({bad[0]})")
    W, D = sd["blocks.0.proj_in.weight"].shape
    T = sd["var"].shape[0]  # the grid, for ml-starflow pt_seq_len^2 (its default)
    txt = [i for i in range(K) if f"blocks.{i}.proj_txt.weight" in sd]
    if src == "tarflow":  # ml-tarflow: every block conditioned by an added class embedding, F.unfold patches, var
        n_cls = sd["blocks.0.class_embed"].shape[0] if "blocks.0.class_embed" in sd else 0
        inf = dict(param="tarflow", num_classes=n_cls, txt_dim=0, txt_len=0, class_cond="add", cond_deep_only=False,
                   patch_order="chw", prior_var=True, rope=False, final_norm=False, seq_order="R2L", soft_clip=0.0)
        named = re.search(r"_(\d*\.\d+)\.pth$", str(path))  # train.py:88 names it ..._{noise_std:.2f}.pth
        dflt = dict(noise_std=float(named.group(1)) if named else 0.05, channels=3, vae_family="none", head_dim=64,
                    # evaluate_fid.py: --cfg 0 (:136), annealed (:77), --attn_temp 1 (:137), denoising (:140);
                    # transformer_flow.py Model.reverse (:317): guide_what "ab", every block guided
                    sampler="sequential", guidance=0.0, guidance_rule="tarflow", guide_what="ab",
                    guidance_anneal=True, guide_all_blocks=True, attn_temp=1.0, denoise=True)
    else:  # ml-starflow: text prefix in the deep block (cond_top_only), start token, softplus, channel-last patches
        if f"blocks.{K - 1}.sos_embed" not in sd or (txt and txt not in ([K - 1], list(range(K)))):
            raise ValueError(f"{path}: only ml-starflow models with a start token (sos) and text in the deep block "
                             f"or in every block are supported")
        L = sd["blocks.0.attn_mask"].shape[0] - T if txt else 0
        rope = "blocks.0.pos_embed" not in sd
        inf = dict(num_classes=0, txt_dim=sd[f"blocks.{K - 1}.proj_txt.weight"].shape[1] if txt else 0, txt_len=L,
                   txt_null="caption", text_padding="zero", cond_deep_only=len(txt) == 1 and K > 1, rope=rope,
                   rope_text=rope and bool(txt), final_norm="blocks.0.final_norm.weight" in sd, patch_order="hwc",
                   class_cond="prefix", prior_var=False)
        if "feat_rope.freqs_cos" in sd:
            inf["head_dim"] = sd["feat_rope.freqs_cos"].shape[1]
        # configs/starflow_3B_t2i_256x256.yaml: use_softplus (22), soft_clip 4 (31), seq_order L2R (20), noise 0.3
        # (12), sd-vae-ft-ema (25); train.py:486 head_dim 64. sample.py: --cfg 5 (:366), --jacobi 0 (:360),
        # --attn_temp 1 (:358), no annealing (:180), logits_guided (transformer_flow.py:606), shallow blocks unguided
        # under cond_top_only (:1284), the fine-tuned decoder --finetuned_vae (:368) instead of the score step
        # (utils/inference.py:218)
        dflt = dict(param="starflow", soft_clip=4.0, seq_order="L2R", noise_std=0.3, channels=3, vae_family="sd",
                    head_dim=64, sampler="sequential", guidance=5.0 if txt else 0.0, guidance_rule="starflow",
                    guidance_anneal=False, guide_all_blocks=not inf["cond_deep_only"], attn_temp=1.0, denoise=False)
    inf.update(width=W, layers=layers)
    for k, v in overrides.items():
        if k in inf and v != inf[k]:
            raise ValueError(f"{path}: the weights say {k}={inf[k]!r}, not {v!r}")
    c = {**dflt, **overrides, **inf}
    down, ch = (1, c["channels"]) if c["vae_family"] == "none" else \
        (8, {"sd": 4, "sdxl": 4, "flux": 16}[c["vae_family"]])  # latent_shape's f8 VAEs
    side, p = math.isqrt(T), math.isqrt(D // ch)
    c.setdefault("img_size", side * p * down), c.setdefault("patch_size", p)
    if side * side != T or ch * p * p != D or (c["img_size"], c["patch_size"]) != (side * p * down, p):
        raise ValueError(f"{path}: {T} tokens of {D} dims are not {ch}-channel square patches of a square image of "
                         f"{c['img_size']} (patch {c['patch_size']}); pass channels, vae_family or img_size")
    cfg = Config(**c)
    if cfg.txt_dim and null_text is None and cfg.guidance > 0:
        raise ValueError(f"guidance {cfg.guidance} of an ml-starflow text model needs null_text (--null_text NPY): "
                         f"the text encoder's embedding of the empty caption, ({cfg.txt_len}, {cfg.txt_dim})")
    model = STARFlow(cfg, *latent_shape(cfg))
    missing, unexpected = model.load_state_dict(_official_state(sd, model, src), strict=False)
    if unexpected or [k for k in missing if not k.endswith(".null_text")]:
        raise ValueError(f"{path}: keys the {src} mapping does not place: {(unexpected + missing)[:4]}")
    if null_text is not None:
        nt = torch.as_tensor(np.load(null_text) if isinstance(null_text, (str, Path)) else null_text).float()
        if not cfg.txt_dim or nt.shape != (cfg.txt_len, cfg.txt_dim):
            raise ValueError(f"null_text must be ({cfg.txt_len}, {cfg.txt_dim}) for this text model, got "
                             f"{tuple(nt.shape)}" if cfg.txt_dim else "null_text is for ml-starflow text models")
        for b in model.blocks:
            if hasattr(b, "null_text"):
                b.null_text.copy_(nt)
    model.__dict__["vae"] = load_vae(cfg, device) if cfg.vae or cfg.vae_family == "none" else None  # --vae decodes
    return model.to(device).eval(), cfg


def _official_state(sd: dict, model: STARFlow, src: str) -> dict:
    """The official Model's keys and layouts -> ours (the dropped buffers are constants: causal masks, RoPE tables
    left in ml-starflow's files, and its unused `var`)."""
    subs = ((r"\.attn_blocks\.(\d+)\.attention\.norm\.", r".layers.\1.norm1."),
            (r"\.attn_blocks\.(\d+)\.attention\.", r".layers.\1.attn."),
            (r"\.attn_blocks\.(\d+)\.mlp\.norm\.", r".layers.\1.norm2."),
            (r"\.attn_blocks\.(\d+)\.mlp\.main\.", r".layers.\1.mlp."), (r"\.pos_embed$", ".pos"),
            (r"\.class_embed$", ".class_emb.weight"), (r"\.sos_embed$", ".sos"), (r"\.final_norm\.", ".norm_out."))
    Dh, out = model.cfg.head_dim, {}
    for k, v in sd.items():
        if k.endswith(".attn_mask") or k.startswith("feat_rope.") or (k == "var" and src == "starflow"):
            continue
        for a, b in subs:
            k = re.sub(a, b, k)
        if k.endswith(".pos") and model.blocks[int(k.split(".")[1])].flip:
            v = v.flip(0)  # the official permutes pos_embed with the tokens; ours is indexed by stream position
        elif k.endswith(".class_emb.weight"):
            v = v[:, 0]  # (N, 1, W)
        elif k.endswith(".norm_out.weight"):
            v = 1 + v  # ml-starflow's RMSNorm scales by 1 + weight
        elif ".attn.qkv." in k and model.cfg.rope:  # interleaved RoPE pairs (2i, 2i+1) -> halves (i, i + Dh/2)
            idx = torch.arange(v.shape[0]).view(3, -1, Dh)
            idx[:2] = idx[:2][..., torch.cat([torch.arange(0, Dh, 2), torch.arange(1, Dh, 2)])]
            v = v[idx.reshape(-1)]
        out[k] = v
    return out


# ----------------------------------------------------------------------------------------------------------------------
# Trainer


def dry_run(cfg: Config, gpus: int) -> dict:
    """--dry_run: the config on the meta device (common.dry_run), its training loss as train() runs it, and the KV
    caches of sequential / Jacobi sampling (sample_batch's rule: both guidance branches, bf16) per sample and at the
    default batch on an empty 80 GB GPU."""
    shape = latent_shape(cfg)

    def loss(model, b):
        x = torch.randn(b, shape[0], shape[1], shape[1])
        pad = torch.arange(cfg.txt_len) < (cfg.txt_len + 1) // 2  # captions padded to the full length
        batch = (x, torch.zeros(b, dtype=torch.long), torch.randn(b, cfg.txt_len, cfg.txt_dim), pad.expand(b, -1))
        return nll_loss(model, x, batch_cond(model, batch, cfg.label_drop), cfg.noise_std, cfg.latent_reg)

    def caches(model):
        per = max(2 * len(b.layers) * (b.prefix + b.seq_len) * cfg.width * 2 * (2 if b.conditioned or
                                                                                  cfg.attn_temp != 1 else 1)
                  for b in model.blocks)
        return {"kv_cache_per_sample": per, f"kv_cache_batch{min(256, 20 * 2 ** 30 // per)}":
                per * min(256, 20 * 2 ** 30 // per)}

    parts = {"deep block": f"blocks.{len(cfg.layers) - 1}", "shallow blocks": "blocks"}
    return common.dry_run(cfg, lambda: STARFlow(cfg, *shape), loss, tokens=(shape[1] // cfg.patch_size) ** 2,
                          gpus=gpus, block_types=(common.Block,), sample_bytes=caches, parts=parts)


def build(cfg: Config, device) -> tuple[STARFlow, object]:
    vae = load_vae(cfg, device)
    return STARFlow(cfg, *latent_shape(cfg, vae)).to(device), vae


def precompute_latents(cfg: Config, src: str, d: common.Dist):
    """Encode images (folder or .npz) through the VAE once: <cfg.data>/latents.npy (N, c, h, w) fp16 + labels.npy,
    and the .npz's text.npy + text_mask.npy when it has captions (all memory-mapped when training)."""
    vae = load_vae(cfg, d.device)
    if vae is None:
        raise ValueError("--precompute needs --vae and --vae_family")
    data = load_data(Config(**{**cfg.__dict__, "data": src, "val_data": "", "channels": vae.in_channels}), "all")
    written = common.encode_folder(
        cfg.data, data, d, lambda b: {"latents": vae.encode(common.to_float(b[0].to(d.device))).half(), "labels": b[1]},
        (cfg.img_size, cfg.img_size, vae.in_channels), 64, cfg.num_workers)
    if d.is_main and isinstance(data, common.ArrayDataset) and len(data.arrays) == 4:  # captions, in row order
        np.save(Path(cfg.data) / "text.npy", data.arrays[2])
        np.save(Path(cfg.data) / "text_mask.npy", np.asarray(data.arrays[3], dtype=bool))
        written += ["text", "text_mask"]
    common.print0(f"wrote {cfg.data}/{{{','.join(n + '.npy' for n in written)}}}")


def finetune_decoder(cfg: Config, steps: int, d: common.Dist) -> Path:
    """STARFlow's decoder fine-tuning (paper Sec. 3.3; ml-starflow finetune_decoder.py:156-167): train the VAE decoder
    to map noisy latents z + noise_std * eps to the image, so sampling can decode the flow's noisy samples directly
    instead of taking the score step. Loss: MSE in [-1, 1] (ml-starflow adds LPIPS and a GAN loss, omitted here).
    Writes <out_dir>/decoder.pt, for --decoder. Single process."""
    vae = load_vae(dataclasses.replace(cfg, decoder=""), d.device)
    if vae is None:
        raise ValueError("--finetune_decoder needs a latent model (--vae, --vae_family)")
    data = load_data(cfg)
    if data[0][0].dtype != torch.uint8:
        raise ValueError("--finetune_decoder needs images (an image folder, an .npz or digits), not latents")
    ae = vae.ae
    params = [p for m in (ae.decoder, ae.post_quant_conv) if m is not None for p in m.parameters()]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, common.lr_lambda(dataclasses.replace(cfg, steps=steps)))
    it, log = common.batches(data, cfg.batch_size, d, cfg.seed), []
    for step in common.progress(range(steps), desc="decoder"):
        x = common.to_float(next(it)[0].to(d.device))
        z = vae.encode(x)
        z = z + cfg.noise_std * torch.randn_like(z)
        loss = F.mse_loss(ae.decode(z / vae.scaling_factor + vae.shift_factor), x)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip or float("inf"))
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        log.append(loss.item())
    path = Path(cfg.out_dir) / "decoder.pt"
    keep = ("decoder.", "post_quant_conv.")
    common.atomic_save({"kind": "starflow-decoder", "noise_std": cfg.noise_std, "steps": steps,
                        "decoder": {k: v.detach().cpu() for k, v in ae.state_dict().items() if k.startswith(keep)}},
                       path)
    common.print0(f"decoder MSE {np.mean(log[:20]):.4f} -> {np.mean(log[-20:]):.4f} over {steps} steps; wrote {path}")
    return path


def from_checkpoint(path: str, device="cpu", null_text=None, **overrides) -> tuple[STARFlow, Config]:
    """A trained model ready to sample (EMA weights, eval mode) and its config; `overrides` may change run-time fields
    (sampler, guidance, ...). `model.vae` is the VAE of a latent model (None in pixel space); it is kept out of the
    module tree, so the flow's state dict stays the flow's. An official state dict goes to `from_official`."""
    state = common.load_checkpoint(path)
    if official_source(state):
        return from_official(path, device, null_text, state=state, **overrides)
    if null_text is not None:
        raise ValueError(f"--null_text is for official ml-starflow weights; {path} is a {state.get('kind')} checkpoint")
    cfg = common.config_from_checkpoint(Config, state, overrides, what=str(path))
    model, vae = build(cfg, device)
    model.__dict__["vae"] = vae
    return common.load_weights(model, state).eval(), cfg


def options(p):
    p.add_argument("--precompute", metavar="IMAGES", default=None,
                   help="encode IMAGES (folder or .npz) through --vae into the latent folder --data")
    p.add_argument("--captions", metavar="NPZ", default=None,
                   help="text embeddings (`text`, `text_mask`) to --sample a text-conditional model from")
    p.add_argument("--finetune_decoder", metavar="STEPS", type=int, default=0,
                   help="fine-tune the VAE decoder on noisy latents for STEPS steps -> <out_dir>/decoder.pt")
    p.add_argument("--init_from", metavar="CKPT", default=None,
                   help="train from these weights (ours or an official .pth): the model fields are theirs")
    p.add_argument("--null_text", metavar="NPY", default=None,
                   help="official ml-starflow weights: the (txt_len, txt_dim) embedding of the empty caption")


def cli_load(ckpt: str, overrides: dict, args, d: common.Dist) -> tuple[STARFlow, Config]:
    model, cfg = from_checkpoint(ckpt, d.device, args.null_text, **overrides)
    if model.vae is None and cfg.vae_family != "none":
        raise ValueError(f"a latent model ({cfg.vae_family}) needs --vae PATH to decode its samples")
    return model, cfg


def cli_sample(model: STARFlow, cfg: Config, args, d: common.Dist, start: int, count: int):
    labels = torch.arange(start, start + count) % max(cfg.num_classes, 1)
    text = mask = None
    if cfg.txt_dim:
        if not args.captions:
            raise ValueError("a text-conditional model samples from --captions NPZ (text, text_mask)")
        cap = common.load_arrays(args.captions, ("text", "text_mask"))
        idx = torch.arange(start, start + count) % len(cap["text"])  # captions repeat when n exceeds them
        text = torch.as_tensor(cap["text"][idx.numpy()]).float()
        if "text_mask" in cap:
            mask = torch.as_tensor(cap["text_mask"][idx.numpy()]).bool()
    imgs, nfe = generate(model, cfg, labels, model.vae, seed=cfg.seed + 1000 + d.rank, text=text, text_mask=mask)
    return ({"images": imgs.permute(0, 2, 3, 1).numpy(), "labels": labels.numpy()},
            f"{nfe} sequential network evaluations per batch")


def cli_train(cfg: Config, args, overrides: dict, d: common.Dist) -> common.Job:
    if args.init_from:  # fine-tuning: the architecture is the weights' (an official file's as `from_official` reads it)
        src, scfg = from_checkpoint(args.init_from, "cpu", args.null_text, **overrides)
        if scfg.txt_null == "caption" and cfg.label_drop > 0 and args.null_text is None:
            raise ValueError("--label_drop of an ml-starflow text model needs --null_text (or --label_drop 0)")
        cfg = dataclasses.replace(cfg, **{k: getattr(scfg, k) for k in common.model_fields(cfg)})
    model, vae = build(cfg, d.device)
    if args.init_from:
        model.load_state_dict(src.state_dict())
    data = load_data(cfg)
    check_labels(cfg, data)
    padded = text_padded(data)  # no padding anywhere: no key masks, fused attention kernels
    held_out = load_data(cfg, "val")
    n_params = sum(p.numel() for p in model.parameters())
    common.print0(f"STARFlow ({cfg.param}) with {n_params / 1e6:.2f}M parameters, {model.T} tokens of {model.D} dims, "
                  f"blocks {cfg.layers}; {len(data)} training / {len(held_out)} held-out examples")
    uniform = cfg.dequant == "uniform"

    def loss_fn(net, batch, at):
        if uniform and batch[0].dtype != torch.uint8:
            raise ValueError("--dequant uniform needs 8-bit images")
        x = dequantize_pixels(batch[0]) if uniform else to_model_space(batch[0], vae)
        loss = nll_loss(net, x, batch_cond(model, batch, cfg.label_drop, padded), 0.0 if uniform else cfg.noise_std,
                        cfg.latent_reg)
        # the density of the training inputs: noise-augmented (gaussian) or dequantised (uniform) pixels / latents
        pixels = vae is None and batch[0].dtype == torch.uint8
        return loss, {f"bpd_{cfg.dequant}": bits_per_dim(loss.detach(), pixels, uniform)}

    def on_eval(step, model, ema):
        with ema.swap(model), common.full_params(model):
            res = evaluate(model, cfg, vae, d, n_samples=200)
            labels, text, mask = eval_conditions(cfg, held_out, 100)  # held-out captions for a text model
            imgs, _ = generate(model, cfg, labels, vae, seed=0, text=text, text_mask=mask)
        if d.is_main:
            common.save_grid(Path(cfg.out_dir) / "samples.png", imgs)
        return res
    return common.Job(cfg, model, loss_fn, data, on_eval)


def main(argv=None):
    common.cli(argv, Config, PRESETS, __doc__, options=options, dry_run=dry_run, load=cli_load, sample=cli_sample,
               evaluate=lambda model, cfg, args, d: evaluate(model, cfg, model.vae, d), prepare=cli_train,
               modes={"precompute": lambda cfg, args, _, d: precompute_latents(cfg, args.precompute, d),
                      "finetune_decoder": lambda cfg, args, _, d: finetune_decoder(cfg, args.finetune_decoder, d)})


if __name__ == "__main__":
    common.run(main)
