"""
flowzoo/common.py -- the plumbing every model file shares, and nothing model-specific.

    1. Attention: SDPA multi-head attention (`Attention`, `Block`), `causal_mask`, a preallocated `KVCache` with
       rewind, `RoPE` (1D/2D/3D), and `decoding`, the context of per-token sampling loops.
    2. VAE loading: a diffusers-exact `AutoencoderKL` and `load_vae` (diffusers folders and single files with
       diffusers, legacy-diffusers or original LDM key names), a dependency-free safetensors reader/writer; the
       Wan2.1 / Wan2.2 video VAE (`AutoencoderKLWan`, `load_video_vae`), chunked and causal; `train_vae` /
       `digits_vae`, a one-minute VAE on the digits so latent models have a real latent space on CPU.
    3. ODE integration: `odeint` (euler, heun, rk4 from one Butcher-tableau routine; dopri5, adaptive Dormand-Prince
       5(4) with torchdiffeq's step-size controller, so torchdiffeq-sampled models reproduce), forwards or backwards
       in time, returning an `ODEResult` (final state, evaluations, path energy, optionally the path).
    4. Distributed + training: torchrun setup (NCCL/gloo), DDP or FSDP2, EMA; the config CLI (`TrainConfig`, `opt`
       for validated fields, `parse_config`, checkpoint configs checked against the model file); atomic rank-0
       checkpoints; the training loop (`train`: gradient accumulation, non-finite guards, SIGTERM, resume, no
       clobbering; the loss told its step and rows, `At`); data helpers (`batches` with per-example noise, image
       folders, .npz, `encode_folder` for --precompute); PNG grids and JSONL logs; `cli`, which runs every model
       file's modes (train, sample, eval, plot, dry run, the file's own) from the hooks it declares (`Job`); `run`,
       the one-line-error entry point; a digits classifier that stands in for Inception on the demos (accuracy +
       Frechet distance); and the standard Inception FID on your own images (`fid`, `fid_stats`: the FID
       InceptionV3 written out, with a weights file you have locally, reference statistics saved once in
       pytorch-fid's .npz layout).

A model file does `import common` and nothing else of ours.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import inspect
import itertools
import json
import math
import os
import random
import re
import signal
import struct
import sys
import time
import zlib
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Callable, ClassVar

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint
from torch.nn.attention.bias import causal_lower_right

# ----------------------------------------------------------------------------------------------------------------------
# 1. Attention


def causal_mask(t_q: int, t_k: int, device=None) -> torch.Tensor:
    """(t_q, t_k) bool, True = may attend. Queries are the LAST t_q of the t_k positions (decoding after a prefix)."""
    return torch.ones(t_q, t_k, dtype=torch.bool, device=device).tril(diagonal=t_k - t_q)


class KVCache:
    """Preallocated keys/values of one attention layer for incremental decoding.

    `append` writes a chunk in place (no torch.cat per token) and returns the whole prefix; `rewind(n)` forgets the
    last n tokens, which is what Jacobi decoding needs to re-run a chunk on top of a fixed prefix.
    For guidance either batch the branches (batch = 2B) or keep one cache per branch.
    """

    def __init__(self, batch: int, n_heads: int, max_len: int, head_dim: int, device=None, dtype=torch.float32):
        self.k = torch.zeros(batch, n_heads, max_len, head_dim, device=device, dtype=dtype)  # (B, H, T_max, Dh)
        self.v = torch.zeros_like(self.k)
        self.len = 0

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        t = k.shape[2]
        if self.len + t > self.k.shape[2]:
            raise ValueError(f"KV cache overflow: {self.len} + {t} tokens > max_len {self.k.shape[2]}")
        self.k[:, :, self.len:self.len + t] = k
        self.v[:, :, self.len:self.len + t] = v
        self.len += t
        return self.k[:, :, :self.len], self.v[:, :, :self.len]

    def rewind(self, n: int):
        if not 0 <= n <= self.len:
            raise ValueError(f"cannot rewind {n} tokens of a cache holding {self.len}")
        self.len -= n


class RoPE(nn.Module):
    """Rotary position embedding over a 1D, 2D or 3D grid of tokens (raster order).

    The head_dim/2 rotation frequencies are split between the axes (`axes_dims` pairs each; by default evenly, the
    remainder to the first axis, e.g. time for video), so a token at (t, h, w) is rotated by t on one band of
    frequencies, by h on the next and by w on the last. q.k then depends only on the per-axis offsets.
    `prefix` leading positions (a class or text prefix) are left unrotated.
    """

    def __init__(self, head_dim: int, grid: tuple[int, ...], base: float = 10000.0,
                 axes_dims: tuple[int, ...] | None = None, prefix: int = 0):
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"RoPE needs an even head_dim, got {head_dim}")
        pairs = head_dim // 2
        if axes_dims is None:
            axes_dims = tuple(pairs // len(grid) + (i == 0) * (pairs % len(grid)) for i in range(len(grid)))
        if sum(axes_dims) != pairs:
            raise ValueError(f"RoPE axes_dims {axes_dims} must sum to head_dim/2 = {pairs}")
        coords = torch.stack(torch.meshgrid(*[torch.arange(n, dtype=torch.float64) for n in grid], indexing="ij"), -1)
        coords = coords.reshape(-1, len(grid))  # (T, n_axes), raster order
        angles = [coords[:, i:i + 1] * base ** (-torch.arange(d, dtype=torch.float64) / d)
                  for i, d in enumerate(axes_dims) if d > 0]
        angles = torch.cat([torch.zeros(prefix, pairs, dtype=torch.float64), torch.cat(angles, dim=1)])  # (L+T, Dh/2)
        self.register_buffer("cos", angles.cos().float(), persistent=False)
        self.register_buffer("sin", angles.sin().float(), persistent=False)

    def forward(self, x: torch.Tensor, pos: torch.Tensor | slice | None = None) -> torch.Tensor:
        """x: (B, H, T, Dh); pos: positions of the T tokens in the grid (index tensor or slice; default 0..T-1)."""
        pos = slice(0, x.shape[2]) if pos is None else pos
        cos, sin = self.cos[pos].to(x.dtype), self.sin[pos].to(x.dtype)  # (T, Dh/2)
        if cos.shape[0] != x.shape[2]:
            raise ValueError(f"RoPE positions {pos} do not fit {x.shape[2]} tokens in a grid of {self.cos.shape[0]}")
        x1, x2 = x.chunk(2, dim=-1)  # rotate the pairs (x1[i], x2[i]) -- the "half split" layout
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


class Attention(nn.Module):
    """Multi-head self-attention on F.scaled_dot_product_attention, with optional mask, causality, RoPE, KV cache."""

    def __init__(self, dim: int, n_heads: int):
        super().__init__()
        if dim % n_heads:
            raise ValueError(f"width {dim} is not divisible by {n_heads} heads")
        self.n_heads, self.head_dim = n_heads, dim // n_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def new_cache(self, batch: int, max_len: int, device=None, dtype=torch.float32) -> KVCache:
        return KVCache(batch, self.n_heads, max_len, self.head_dim, device, dtype)

    def forward(self, x, mask=None, causal=False, rope: RoPE | None = None, pos=None, cache: KVCache | None = None,
                spans=None):
        """x: (B, T, C). mask: bool, True = attend, broadcastable to (B, H, T, T_keys); a key mask longer than the
        keys seen so far (a full-sequence padding mask during decoding) is cut to them. With a cache, x holds the
        next T tokens after the cached prefix. spans [(query slice, (key slices, ...)), ...], covering the queries in
        order: block-sparse attention as one mask-free SDPA call per span (fused kernels, no dense mask)."""
        B, T, C = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)  # 3 x (B, H, T, Dh)
        if rope is not None:
            q, k = rope(q, pos), rope(k, pos)
        if cache is not None:
            k, v = cache.append(k, v)  # (B, H, T_keys, Dh), the prefix included
        t_k = k.shape[2]
        if spans is not None:  # a span whose keys are two slices copies them: recomputed in backward, so one copy
            grad = torch.is_grad_enabled()  # lives at a time, not all the spans' (W+1 times the keys, a denoiser's)
            y = torch.cat([torch.utils.checkpoint.checkpoint(_span, q, k, v, qs, ks, use_reentrant=False)
                           if grad and len(ks) > 1 else _span(q, k, v, qs, ks) for qs, ks in spans], 2)
            return self.proj(y.transpose(1, 2).reshape(B, T, C))
        if mask is not None:
            mask = mask[..., :t_k]
        if causal and mask is None and t_k != T:  # after a prefix the queries are the last T positions
            mask, causal = (None if T == 1 else causal_lower_right(T, t_k)), False  # a bias fused kernels take
        if causal and mask is not None:  # (is_causal would align the triangle top-left)
            mask, causal = mask & causal_mask(T, t_k, x.device), False
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)  # (B, H, T, Dh)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


def _span(q, k, v, qs: slice, ks: tuple[slice, ...]) -> torch.Tensor:
    """Queries q[..., qs, :] attending to the keys of the slices ks only, mask-free."""
    k, v = (t[:, :, ks[0]] if len(ks) == 1 else torch.cat([t[:, :, s] for s in ks], 2) for t in (k, v))
    return F.scaled_dot_product_attention(q[:, :, qs], k, v)


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, dim: int, n_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = Attention(dim, n_heads)
        self.mlp = nn.Sequential(nn.Linear(dim, int(mlp_ratio * dim)), nn.GELU(), nn.Linear(int(mlp_ratio * dim), dim))

    def forward(self, x, **attn_kwargs):  # (B, T, C)
        x = x + self.attn(self.norm1(x), **attn_kwargs)
        return x + self.mlp(self.norm2(x))


@contextlib.contextmanager
def decoding(device):
    """The context of a token-by-token sampling loop, where per-op overhead is the cost: inference mode (no autograd
    view and version bookkeeping) and, on CPU in fp32, no oneDNN, whose per-call set-up (~10 us for a one-token GELU,
    1.4 us in ATen's kernel) outweighs the work. Tensors made inside are inference tensors: clone what autograd must
    see afterwards (a score step)."""
    dev = torch.device(device).type
    onednn = torch.backends.mkldnn.enabled and (dev != "cpu" or torch.is_autocast_enabled("cpu"))
    with torch.inference_mode(), torch.backends.mkldnn.flags(enabled=onednn, deterministic=None, allow_tf32=None,
                                                             fp32_precision=None):
        yield


# ----------------------------------------------------------------------------------------------------------------------
# 2. VAE loading
# A from-scratch AutoencoderKL whose state_dict keys equal diffusers' ones, so released VAE weights (diffusers folders,
# LDM .ckpt/.safetensors) load as they are.


class VAEResnetBlock(nn.Module):
    """GroupNorm -> SiLU -> conv, twice, plus a (1x1 conv when channels change) skip."""

    def __init__(self, cin, cout, groups):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, cin, eps=1e-6)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, cout, eps=1e-6)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else None

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return (x if self.conv_shortcut is None else self.conv_shortcut(x)) + h


class VAEAttention(nn.Module):
    """Single-head self-attention over the H*W positions, with a residual."""

    def __init__(self, c, groups):
        super().__init__()
        self.group_norm = nn.GroupNorm(groups, c, eps=1e-6)
        self.to_q, self.to_k, self.to_v = nn.Linear(c, c), nn.Linear(c, c), nn.Linear(c, c)
        self.to_out = nn.ModuleList([nn.Linear(c, c)])  # a list only to get diffusers' "to_out.0" key

    def forward(self, x):
        B, C, H, W = x.shape
        h = self.group_norm(x).flatten(2).transpose(1, 2)  # (B, HW, C)
        h = F.scaled_dot_product_attention(self.to_q(h), self.to_k(h), self.to_v(h))  # scale 1/sqrt(C)
        h = self.to_out[0](h).transpose(1, 2).reshape(B, C, H, W)
        return x + h


class VAEMidBlock(nn.Module):
    def __init__(self, c, groups, attention):
        super().__init__()
        self.resnets = nn.ModuleList([VAEResnetBlock(c, c, groups), VAEResnetBlock(c, c, groups)])
        self.attentions = nn.ModuleList([VAEAttention(c, groups)] if attention else [])

    def forward(self, x):
        x = self.resnets[0](x)
        for attn in self.attentions:
            x = attn(x)
        return self.resnets[1](x)


class VAEDownsample(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, stride=2)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # asymmetric pad, as in the original LDM code


class VAEUpsample(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class VAELevel(nn.Module):
    """One resolution level: resnets, then an optional down- or upsampler."""

    def __init__(self, cin, cout, n, groups, sampler):
        super().__init__()
        self.resnets = nn.ModuleList([VAEResnetBlock(cin if i == 0 else cout, cout, groups) for i in range(n)])
        self.downsamplers = nn.ModuleList([VAEDownsample(cout)]) if sampler == "down" else None
        self.upsamplers = nn.ModuleList([VAEUpsample(cout)]) if sampler == "up" else None

    def forward(self, x):
        for r in self.resnets:
            x = r(x)
        for s in self.downsamplers or self.upsamplers or []:
            x = s(x)
        return x


class VAEEncoder(nn.Module):
    def __init__(self, cin, chs, layers, zc, groups, attention):
        super().__init__()
        self.conv_in = nn.Conv2d(cin, chs[0], 3, padding=1)
        last = len(chs) - 1
        self.down_blocks = nn.ModuleList([VAELevel(chs[max(i - 1, 0)], c, layers, groups, "down" if i < last else None)
                                          for i, c in enumerate(chs)])
        self.mid_block = VAEMidBlock(chs[-1], groups, attention)
        self.conv_norm_out = nn.GroupNorm(groups, chs[-1], eps=1e-6)
        self.conv_out = nn.Conv2d(chs[-1], zc, 3, padding=1)

    def forward(self, x):
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


class VAEDecoder(nn.Module):
    def __init__(self, zc, cout, chs, layers, groups, attention):
        super().__init__()
        rev, last = list(reversed(chs)), len(chs) - 1
        self.conv_in = nn.Conv2d(zc, rev[0], 3, padding=1)
        self.mid_block = VAEMidBlock(rev[0], groups, attention)
        # the decoder has one more resnet per level than the encoder
        self.up_blocks = nn.ModuleList([VAELevel(rev[max(i - 1, 0)], c, layers + 1, groups, "up" if i < last else None)
                                        for i, c in enumerate(rev)])
        self.conv_norm_out = nn.GroupNorm(groups, chs[0], eps=1e-6)
        self.conv_out = nn.Conv2d(chs[0], cout, 3, padding=1)

    def forward(self, z):
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


class AutoencoderKL(nn.Module):
    """diffusers' AutoencoderKL (same parameter names and numerics), without tiling/slicing."""

    def __init__(self, in_channels=3, out_channels=3, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                 latent_channels=4, norm_num_groups=32, use_quant_conv=True, use_post_quant_conv=True,
                 mid_block_add_attention=True):
        super().__init__()
        self.config = dict(in_channels=in_channels, out_channels=out_channels,
                           block_out_channels=list(block_out_channels), layers_per_block=layers_per_block,
                           latent_channels=latent_channels, norm_num_groups=norm_num_groups,
                           use_quant_conv=use_quant_conv, use_post_quant_conv=use_post_quant_conv,
                           mid_block_add_attention=mid_block_add_attention)
        chs, zc, g, a = block_out_channels, latent_channels, norm_num_groups, mid_block_add_attention
        self.encoder = VAEEncoder(in_channels, chs, layers_per_block, 2 * zc, g, a)
        self.decoder = VAEDecoder(zc, out_channels, chs, layers_per_block, g, a)
        self.quant_conv = nn.Conv2d(2 * zc, 2 * zc, 1) if use_quant_conv else None
        self.post_quant_conv = nn.Conv2d(zc, zc, 1) if use_post_quant_conv else None

    def encode(self, x):
        """(B, C, H, W) -> posterior (mean, logvar), each (B, latent, H/f, W/f)."""
        h = self.encoder(x)
        if self.quant_conv is not None:
            h = self.quant_conv(h)
        mean, logvar = h.chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)

    def decode(self, z):
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)


# --- safetensors, read and written by hand so loading/saving needs no extra package

_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
              "U8": torch.uint8, "BOOL": torch.bool}
_ST_NAMES = {v: k for k, v in _ST_DTYPES.items()}


def read_safetensors(path):
    """Read a .safetensors file: u64 header length, JSON header, then raw little-endian tensor bytes."""
    with open(path, "rb") as f:
        buf = bytearray(os.path.getsize(path))  # writable, so torch.frombuffer can share it without copying
        f.readinto(buf)
    (n,) = struct.unpack("<Q", buf[:8])
    header = json.loads(buf[8:8 + n])
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype, shape = _ST_DTYPES[info["dtype"]], info["shape"]
        start, end = info["data_offsets"]
        if end == start:  # frombuffer rejects empty buffers
            out[name] = torch.empty(shape, dtype=dtype)
        else:
            out[name] = torch.frombuffer(buf, dtype=dtype, count=int(np.prod(shape)), offset=8 + n + start).view(shape)
    return out


def write_safetensors(path, tensors, metadata=None):
    """Write a dict of tensors in the safetensors format (readable by the `safetensors` package)."""
    header, blobs, offset = {}, [], 0
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    for name, t in tensors.items():
        t = t.detach().cpu().contiguous()
        b = t.reshape(-1).view(torch.uint8).numpy().tobytes()
        header[name] = {"dtype": _ST_NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + len(b)]}
        blobs.append(b)
        offset += len(b)
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)  # pad so tensor data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h)
        for b in blobs:
            f.write(b)


# --- checkpoint key names: original LDM (CompVis) and legacy diffusers -> modern diffusers

# (LDM name, diffusers name) fragments, most specific first; applied by substring in either direction
_LDM_RENAMES = [
    (".mid.block_1.", ".mid_block.resnets.0."),
    (".mid.block_2.", ".mid_block.resnets.1."),
    (".mid.attn_1.norm.", ".mid_block.attentions.0.group_norm."),
    (".mid.attn_1.q.", ".mid_block.attentions.0.to_q."),
    (".mid.attn_1.k.", ".mid_block.attentions.0.to_k."),
    (".mid.attn_1.v.", ".mid_block.attentions.0.to_v."),
    (".mid.attn_1.proj_out.", ".mid_block.attentions.0.to_out.0."),
    (".nin_shortcut.", ".conv_shortcut."),
    (".downsample.conv.", ".downsamplers.0.conv."),
    (".upsample.conv.", ".upsamplers.0.conv."),
    (".norm_out.", ".conv_norm_out."),
    (".block.", ".resnets."),
    ("encoder.down.", "encoder.down_blocks."),
    ("decoder.up.", "decoder.up_blocks."),
]
_LEGACY_RENAMES = [(".attentions.0." + a + ".", ".attentions.0." + b + ".") for a, b in
                   [("query", "to_q"), ("key", "to_k"), ("value", "to_v"), ("proj_attn", "to_out.0")]]
_ATTN_LINEAR = re.compile(r"mid_block\.attentions\.0\.to_(q|k|v|out\.0)\.weight$")


def _rename(sd, pairs, reverse_up):
    """Rename keys by fragment pairs; LDM numbers decoder levels from the lowest resolution, diffusers
    from the highest, so LDM up[i] is diffusers up_blocks[n-1-i]."""
    n = 1 + max([int(m.group(1)) for k in sd if (m := re.match(r"decoder\.up(?:_blocks)?\.(\d+)\.", k))] or [0])
    out = {}
    for k, v in sd.items():
        for a, b in pairs:
            k = k.replace(a, b)
        if reverse_up:
            k = re.sub(r"^decoder\.(up_blocks|up)\.(\d+)\.", lambda m: f"decoder.{m[1]}.{n - 1 - int(m[2])}.", k)
        out[k] = v
    return out


def convert_vae_state_dict(sd):
    """Any known VAE checkpoint layout -> modern diffusers AutoencoderKL key names."""
    sd = sd.get("state_dict", sd)  # lightning .ckpt wrapper
    sd = {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}
    if any(k.startswith("first_stage_model.") for k in sd):  # full SD checkpoint: keep only the VAE
        sd = {k[len("first_stage_model."):]: v for k, v in sd.items() if k.startswith("first_stage_model.")}
    elif sd and all(k.startswith("vae.") for k in sd):
        sd = {k[4:]: v for k, v in sd.items()}
    sd = {k: v for k, v in sd.items() if not k.startswith(("loss.", "model_ema."))}  # discriminator, EMA state
    ldm = any(k.startswith(("encoder.down.", "encoder.mid.", "decoder.up.", "decoder.mid.")) for k in sd)
    sd = _rename(sd, _LDM_RENAMES + _LEGACY_RENAMES, reverse_up=ldm)
    # LDM attention projections are 1x1 convs (C, C, 1, 1); diffusers uses Linear (C, C)
    return {k: v.flatten(1) if _ATTN_LINEAR.search(k) and v.ndim == 4 else v for k, v in sd.items()}


def to_ldm_state_dict(sd):
    """Modern diffusers names -> original LDM names (the inverse of convert_vae_state_dict)."""
    sd = _rename(sd, [(b, a) for a, b in _LDM_RENAMES], reverse_up=True)
    return {k: v[:, :, None, None] if re.search(r"attn_1\.(q|k|v|proj_out)\.weight$", k) else v
            for k, v in sd.items()}


def infer_vae_config(sd):
    """AutoencoderKL kwargs from the tensors of a (diffusers-named) state dict."""
    def get(k):
        if k not in sd:
            raise ValueError(f"cannot infer the VAE architecture: missing tensor {k}")
        return sd[k].shape

    levels = sorted({int(m[1]) for k in sd if (m := re.match(r"encoder\.down_blocks\.(\d+)\.", k))})
    layers = {int(m[1]) for k in sd if (m := re.match(r"encoder\.down_blocks\.0\.resnets\.(\d+)\.", k))}
    return dict(in_channels=get("encoder.conv_in.weight")[1], out_channels=get("decoder.conv_out.weight")[0],
                block_out_channels=[get(f"encoder.down_blocks.{i}.resnets.0.conv1.weight")[0] for i in levels],
                layers_per_block=len(layers), latent_channels=get("decoder.conv_in.weight")[1],
                norm_num_groups=32,  # not visible in the weights; every released VAE uses 32
                use_quant_conv="quant_conv.weight" in sd, use_post_quant_conv="post_quant_conv.weight" in sd,
                mid_block_add_attention="encoder.mid_block.attentions.0.to_q.weight" in sd)


# --- loading

def _vae_files(path, class_name: str, what: str) -> tuple[dict, str]:
    """(config.json or {}, weights file) of a diffusers folder (or a pipeline folder's vae/), or of a single file."""
    path = str(path)
    if os.path.isdir(os.path.join(path, "vae")):  # a whole pipeline folder
        path = os.path.join(path, "vae")
    if os.path.isfile(path):
        return {}, path
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{what} weights not found: {path}")
    cfg_path = os.path.join(path, "config.json")
    files = [os.path.join(path, "diffusion_pytorch_model" + e) for e in (".safetensors", ".bin")]
    weights = next((f for f in files if os.path.isfile(f)), None)
    if not os.path.isfile(cfg_path) or weights is None:
        raise FileNotFoundError(f"{path} is not a diffusers VAE folder (needs config.json and {files[0]})")
    with open(cfg_path) as f:
        cfg = json.load(f)
    if cfg.get("_class_name", class_name) != class_name:
        raise ValueError(f"{cfg_path}: expected an {class_name}, not {cfg['_class_name']}")
    return cfg, weights


def _read_weights(weights: str, convert: Callable) -> dict:
    """A state dict from a .safetensors or torch file, converted to diffusers names; one line naming a bad file."""
    try:
        sd = read_safetensors(weights) if weights.endswith(".safetensors") else \
            torch.load(weights, map_location="cpu", weights_only=True)
        return convert(sd)
    except Exception as e:  # a text file, a torn download, a pickle of something else
        raise ValueError(f"cannot read VAE weights from {weights}: {type(e).__name__}: "
                         f"{str(e).splitlines()[0][:150] if str(e) else ''}") from None


def _load_exact(module: nn.Module, sd: dict, what: str) -> nn.Module:
    """load_state_dict, with missing, unexpected and mis-shaped tensors named in one line."""
    ref = module.state_dict()

    def few(keys):
        return ", ".join(keys[:3]) + (f" (+{len(keys) - 3} more)" if len(keys) > 3 else "")
    problems = {"missing": [k for k in ref if k not in sd], "unexpected": [k for k in sd if k not in ref],
                "shape": [f"{k} {tuple(sd[k].shape)} != {tuple(v.shape)}"
                          for k, v in ref.items() if k in sd and sd[k].shape != v.shape]}
    if any(problems.values()):
        raise ValueError(f"{what} do not match the architecture: "
                         + "; ".join(f"{p} {few(ks)}" for p, ks in problems.items() if ks))
    module.load_state_dict(sd)
    return module


VAE_FAMILIES = {  # latent scale/shift: z_model = (z_vae - shift) * scale, giving roughly unit variance
    "sd": dict(latent_channels=4, scaling_factor=0.18215, shift_factor=0.0),
    "sdxl": dict(latent_channels=4, scaling_factor=0.13025, shift_factor=0.0),
    "flux": dict(latent_channels=16, scaling_factor=0.3611, shift_factor=0.1159),
    "none": dict(latent_channels=None, scaling_factor=1.0, shift_factor=0.0),  # pixel space
}


class VAE(nn.Module):
    """A frozen AutoencoderKL plus latent scaling; ae=None is the identity (pixel space)."""

    def __init__(self, ae, scaling_factor=1.0, shift_factor=0.0, channels=3):
        super().__init__()
        self.ae = ae.eval().requires_grad_(False) if ae is not None else None
        self.scaling_factor, self.shift_factor = float(scaling_factor), float(shift_factor)
        self.in_channels = channels if ae is None else ae.config["in_channels"]
        self.latent_channels = channels if ae is None else ae.config["latent_channels"]
        self.downsample = 1 if ae is None else 2 ** (len(ae.config["block_out_channels"]) - 1)  # H_latent = H / f

    def _check(self, x, c, what):
        if x.ndim != 4 or x.shape[1] != c:
            raise ValueError(f"VAE.{what} expects (B, {c}, H, W) input, got {tuple(x.shape)}")

    @torch.no_grad()
    def encode(self, x, sample=False, batch_size=64):
        """Images in [-1, 1] (B, C, H, W) -> scaled latents (B, latent, H/f, W/f)."""
        self._check(x, self.in_channels, "encode")
        if self.ae is None:
            return x
        p = next(self.ae.parameters())
        out = []
        for xb in x.split(batch_size):  # batches bound the activation memory of big VAEs
            mean, logvar = self.ae.encode(xb.to(p.device, p.dtype))
            z = mean + torch.randn_like(mean) * (0.5 * logvar).exp() if sample else mean
            out.append(((z - self.shift_factor) * self.scaling_factor).to(x.device, x.dtype))
        return torch.cat(out)

    @torch.no_grad()
    def decode(self, z, batch_size=64):
        """Scaled latents -> images (roughly in [-1, 1])."""
        self._check(z, self.latent_channels, "decode")
        if self.ae is None:
            return z
        p = next(self.ae.parameters())
        out = [self.ae.decode(zb.to(p.device, p.dtype) / self.scaling_factor + self.shift_factor).to(z.device, z.dtype)
               for zb in z.split(batch_size)]
        return torch.cat(out)


def load_vae(path, family="sd", scaling_factor=None, shift_factor=None, device="cpu", dtype=torch.float32,
             channels=3):
    """Load a VAE from a diffusers folder or a single weights file (.safetensors/.ckpt/.pt/.pth/.bin).
    Latent scale/shift: explicit argument > the folder's config.json > the family default.
    family "none" is pixel space (path may be None; `channels` sets the image channels)."""
    if family not in VAE_FAMILIES:
        raise ValueError(f"unknown VAE family {family!r}; choose from {', '.join(VAE_FAMILIES)}")
    fam = VAE_FAMILIES[family]
    if family == "none":
        return VAE(None, channels=channels)
    cfg, weights = _vae_files(path, "AutoencoderKL", "VAE")
    sd = _read_weights(weights, convert_vae_state_dict)
    try:
        arch = infer_vae_config(sd)
    except ValueError as e:
        raise ValueError(f"{weights}: {e}") from None
    arch.update({k: cfg[k] for k in arch if k in cfg})
    if fam["latent_channels"] != arch["latent_channels"]:
        raise ValueError(f"VAE family {family!r} has {fam['latent_channels']} latent channels but {weights} has "
                         f"{arch['latent_channels']}; pass the right family")
    ae = _load_exact(AutoencoderKL(**arch), sd, f"VAE weights in {weights}")

    def pick(arg, key):
        return arg if arg is not None else cfg[key] if cfg.get(key) is not None else fam[key]
    return VAE(ae.to(device, dtype), pick(scaling_factor, "scaling_factor"), pick(shift_factor, "shift_factor"))


# --- Wan2.1 / Wan2.2 video VAE, with diffusers' AutoencoderKLWan key names. Every layer is causal in time, so a video
# runs through in chunks (its first frame, then 4 frames at a time; decoding, one latent frame at a time), each layer
# keeping the few frames it still needs in a per-video `cache` dict: memory stays that of one chunk.


class CausalConv3d(nn.Conv3d):
    """Conv3d padded in time at the front only (output frame t sees input frames <= t), "same" padding in space.
    In `cache` the last kernel_t - 1 input frames of one chunk stand in for the zero padding of the next."""

    def __init__(self, cin, cout, k):
        k = (k, k, k) if isinstance(k, int) else k
        super().__init__(cin, cout, k, padding=(0, k[1] // 2, k[2] // 2))

    def forward(self, x, cache=None):  # (B, C, T, H, W); 1x1x1 convs need no cache
        if n := self.kernel_size[0] - 1:
            prev = cache.get(self)
            x = torch.cat([x.new_zeros(*x.shape[:2], n, *x.shape[3:]) if prev is None else prev, x], dim=2)
            cache[self] = x[:, :, -n:].clone()  # a copy, so the chunk itself can be freed
        return super().forward(x)


class WanRMSNorm(nn.Module):
    """x / |x| * sqrt(C) * gamma over channels: RMS norm without eps, in fp32 for half inputs."""

    def __init__(self, c, spatial_dims):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(c, *[1] * spatial_dims))  # (C, 1, 1, 1) for video, (C, 1, 1) for frames

    def forward(self, x):
        return F.normalize(x.float(), dim=1).to(x.dtype) * self.gamma.shape[0] ** 0.5 * self.gamma


class WanResBlock(nn.Module):
    """RMSNorm -> SiLU -> causal conv, twice, plus a (1x1x1 conv when channels change) skip."""

    def __init__(self, cin, cout):
        super().__init__()
        self.norm1, self.conv1 = WanRMSNorm(cin, 3), CausalConv3d(cin, cout, 3)
        self.norm2, self.conv2 = WanRMSNorm(cout, 3), CausalConv3d(cout, cout, 3)
        self.conv_shortcut = CausalConv3d(cin, cout, 1) if cin != cout else None

    def forward(self, x, cache):
        h = self.conv1(F.silu(self.norm1(x)), cache)
        h = self.conv2(F.silu(self.norm2(h)), cache)
        return h + (x if self.conv_shortcut is None else self.conv_shortcut(x))


class WanAttention(nn.Module):
    """Single-head self-attention over the H*W positions of each frame on its own (so it stays causal)."""

    def __init__(self, c):
        super().__init__()
        self.norm = WanRMSNorm(c, 2)
        self.to_qkv, self.proj = nn.Conv2d(c, 3 * c, 1), nn.Conv2d(c, c, 1)

    def forward(self, x):
        B, C, T, H, W = x.shape
        h = self.norm(x.transpose(1, 2).reshape(B * T, C, H, W))  # frames as a batch of images
        q, k, v = self.to_qkv(h).flatten(2).transpose(1, 2).chunk(3, dim=-1)  # 3 x (BT, HW, C)
        h = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B * T, C, H, W)
        return x + self.proj(h).view(B, T, C, H, W).transpose(1, 2)


class WanMidBlock(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.resnets = nn.ModuleList([WanResBlock(c, c), WanResBlock(c, c)])
        self.attentions = nn.ModuleList([WanAttention(c)])

    def forward(self, x, cache):
        return self.resnets[1](self.attentions[0](self.resnets[0](x, cache)), cache)


class WanResample(nn.Module):
    """2x down/upsampling of each frame; the "3d" modes also halve/double time with a conv along time. The first
    frame is never resampled in time, which is why 1 + 4k frames map to 1 + k latent frames."""

    def __init__(self, c, mode, cout=None):
        super().__init__()
        self.mode = mode
        if mode.startswith("up"):  # Wan2.1 halves the channels here (cout = c // 2), Wan2.2 does not
            self.resample = nn.Sequential(nn.Upsample(scale_factor=2.0, mode="nearest-exact"),
                                          nn.Conv2d(c, cout, 3, padding=1))
        else:
            self.resample = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(c, c, 3, stride=2))
        if mode == "up3d":
            self.time_conv = CausalConv3d(c, 2 * c, (3, 1, 1))  # 2C channels = 2 output frames per input frame
        elif mode == "down3d":
            self.time_conv = nn.Conv3d(c, c, (3, 1, 1), stride=(2, 1, 1))  # unpadded: frames (2i, 2i+1, 2i+2) -> i+1

    def forward(self, x, cache):  # (B, C, T, H, W)
        B, C, T, H, W = x.shape
        if self.mode == "up3d":
            if self in cache:  # not the first chunk; time_conv starts on the second one, from zero padding
                x = self.time_conv(x, cache).view(B, 2, C, T, H, W).permute(0, 2, 3, 1, 4, 5)
                x = x.reshape(B, C, 2 * T, H, W)  # frame t -> frames 2t, 2t+1
            cache[self] = True
        x = self.resample(x.transpose(1, 2).flatten(0, 1))
        x = x.view(B, -1, *x.shape[1:]).transpose(1, 2)
        if self.mode == "down3d":
            prev, cache[self] = cache.get(self), x[:, :, -1:].clone()
            if prev is not None:  # the first chunk is the lone first frame: passed through
                x = self.time_conv(torch.cat([prev, x], dim=2))
        return x


def _fold(x, ft, fs):
    """(B, C, T, H, W) -> (B, C*ft*fs*fs, T/ft, H/fs, W/fs): blocks of ft x fs x fs moved into channels."""
    B, C, T, H, W = x.shape
    x = x.reshape(B, C, T // ft, ft, H // fs, fs, W // fs, fs).permute(0, 1, 3, 5, 7, 2, 4, 6)
    return x.reshape(B, C * ft * fs * fs, T // ft, H // fs, W // fs)


def _unfold(x, ft, fs):
    """The inverse of _fold."""
    B, C, T, H, W = x.shape
    x = x.reshape(B, C // (ft * fs * fs), ft, fs, fs, T, H, W).permute(0, 1, 5, 2, 6, 3, 7, 4)
    return x.reshape(B, C // (ft * fs * fs), T * ft, H * fs, W * fs)


class WanDownBlock(nn.Module):
    """Wan2.2 encoder level: resnets and a downsampler, plus a parameter-free shortcut, the input folded into
    channels (_fold) and averaged over channel groups down to the output width."""

    def __init__(self, cin, cout, n, down, t_down):
        super().__init__()
        self.resnets = nn.ModuleList([WanResBlock(cin if i == 0 else cout, cout) for i in range(n)])
        self.downsampler = WanResample(cout, "down3d" if t_down else "down2d") if down else None
        self.ft, self.fs = 1 + t_down, 1 + down

    def forward(self, x, cache):
        h = x
        for r in self.resnets:
            h = r(h, cache)
        if self.downsampler is not None:
            h = self.downsampler(h, cache)
        s = _fold(F.pad(x, (0, 0, 0, 0, -x.shape[2] % self.ft, 0)), self.ft, self.fs)  # the lone first frame: pad
        return h + s.view(s.shape[0], h.shape[1], -1, *s.shape[2:]).mean(2)


class WanUpBlock(nn.Module):
    """Decoder level: n resnets and an upsampler. Wan2.2 (residual) adds a parameter-free shortcut, the input's
    channels repeated and unfolded into space and time (_unfold)."""

    def __init__(self, cin, cout, n, mode, residual):
        super().__init__()
        self.resnets = nn.ModuleList([WanResBlock(cin if i == 0 else cout, cout) for i in range(n)])
        up = WanResample(cout, mode, cout if residual else cout // 2) if mode else None
        self.residual, self.ft = residual, 1 + (mode == "up3d")
        if residual:  # diffusers names the upsampler differently in the two families
            self.upsampler, self.repeats = up, cout * self.ft * 4 // cin
        else:
            self.upsamplers = nn.ModuleList([up] if up else [])

    def forward(self, x, cache):
        h = x
        for r in self.resnets:
            h = r(h, cache)
        up = self.upsampler if self.residual else next(iter(self.upsamplers), None)
        if up is None:
            return h
        h = up(h, cache)
        if self.residual:
            s = _unfold(x.repeat_interleave(self.repeats, dim=1), self.ft, 2)
            h = h + (s if self in cache else s[:, :, self.ft - 1:])  # first chunk: one frame, as the upsampler's
            cache[self] = True
        return h


class WanEncoder(nn.Module):
    def __init__(self, cin, dim, zc, mult, n, t_down, residual):
        super().__init__()
        dims, last = [dim] + [dim * m for m in mult], len(mult) - 1
        self.conv_in = CausalConv3d(cin, dims[0], 3)
        blocks = []
        for i in range(len(mult)):
            a, b, t = dims[i], dims[i + 1], i < last and t_down[i]
            if residual:
                blocks.append(WanDownBlock(a, b, n, i < last, t))
            else:  # Wan2.1: one flat list of resnets and downsamplers
                blocks += [WanResBlock(a if j == 0 else b, b) for j in range(n)]
                blocks += [WanResample(b, "down3d" if t else "down2d")] if i < last else []
        self.down_blocks = nn.ModuleList(blocks)
        self.mid_block = WanMidBlock(dims[-1])
        self.norm_out, self.conv_out = WanRMSNorm(dims[-1], 3), CausalConv3d(dims[-1], zc, 3)

    def forward(self, x, cache):
        x = self.conv_in(x, cache)
        for block in self.down_blocks:
            x = block(x, cache)
        x = self.mid_block(x, cache)
        return self.conv_out(F.silu(self.norm_out(x)), cache)


class WanDecoder(nn.Module):
    def __init__(self, zc, cout, dim, mult, n, t_up, residual):
        super().__init__()
        dims, last = [dim * m for m in [mult[-1], *mult[::-1]]], len(mult) - 1
        self.conv_in = CausalConv3d(zc, dims[0], 3)
        self.mid_block = WanMidBlock(dims[0])
        # Wan2.1's upsamplers halve the channels, so its levels after the first take dims[i] // 2
        self.up_blocks = nn.ModuleList([
            WanUpBlock(dims[i] // (1 if i == 0 or residual else 2), dims[i + 1], n + 1,
                       ("up3d" if t_up[i] else "up2d") if i < last else None, residual) for i in range(len(mult))])
        self.norm_out, self.conv_out = WanRMSNorm(dims[-1], 3), CausalConv3d(dims[-1], cout, 3)

    def forward(self, x, cache):
        x = self.mid_block(self.conv_in(x, cache), cache)
        for block in self.up_blocks:
            x = block(x, cache)
        return self.conv_out(F.silu(self.norm_out(x)), cache)


class AutoencoderKLWan(nn.Module):
    """diffusers' AutoencoderKLWan (same parameter names and numerics) for Wan2.1 and Wan2.2, without tiling/slicing.
    in_channels/out_channels count patchified channels (Wan2.2: 3 x 2 x 2 = 12), as in diffusers' config.
    Spatial factor f = self.downsample (8; Wan2.2 16), 4x in time: 1 + 4k frames <-> 1 + k latent frames."""

    def __init__(self, base_dim=96, decoder_base_dim=None, z_dim=16, dim_mult=(1, 2, 4, 4), num_res_blocks=2,
                 temporal_downsample=(False, True, True), is_residual=False, in_channels=3, out_channels=3,
                 patch_size=1):
        super().__init__()
        decoder_base_dim = decoder_base_dim or base_dim
        self.config = dict(base_dim=base_dim, decoder_base_dim=decoder_base_dim, z_dim=z_dim, dim_mult=list(dim_mult),
                           num_res_blocks=num_res_blocks, temporal_downsample=list(temporal_downsample),
                           is_residual=is_residual, in_channels=in_channels, out_channels=out_channels,
                           patch_size=patch_size)
        args = dim_mult, num_res_blocks
        self.encoder = WanEncoder(in_channels, base_dim, 2 * z_dim, *args, temporal_downsample, is_residual)
        self.quant_conv, self.post_quant_conv = CausalConv3d(2 * z_dim, 2 * z_dim, 1), CausalConv3d(z_dim, z_dim, 1)
        self.decoder = WanDecoder(z_dim, out_channels, decoder_base_dim, *args, temporal_downsample[::-1], is_residual)
        self.patch, self.channels = patch_size, in_channels // patch_size ** 2
        self.downsample = patch_size * 2 ** (len(dim_mult) - 1)  # H_latent = H / downsample

    def _check(self, x, what):
        c = self.channels if what == "encode" else self.config["z_dim"]
        if x.ndim != 5 or x.shape[1] != c:
            raise ValueError(f"Wan VAE {what} expects (B, {c}, T, H, W) input, got shape {tuple(x.shape)}")
        if what == "encode" and x.shape[2] % 4 != 1:
            raise ValueError(f"Wan VAE encode needs 1 + 4k frames (1, 5, 9, ...), got {x.shape[2]}")
        if what == "encode" and (x.shape[3] % self.downsample or x.shape[4] % self.downsample):
            raise ValueError(f"Wan VAE encode needs height and width divisible by {self.downsample}, "
                             f"got {x.shape[3]}x{x.shape[4]}")

    def encode(self, x):
        """(B, C, 1 + 4k, H, W) -> posterior (mean, logvar), each (B, z_dim, 1 + k, H/f, W/f)."""
        self._check(x, "encode")
        if self.patch > 1:  # Wan2.2 packs p x p pixels into channels ordered (channel, column, row): H, W swapped
            x = _fold(x.transpose(3, 4), 1, self.patch).transpose(3, 4)
        cache = {}
        chunks = [x[:, :, :1]] + [x[:, :, i:i + 4] for i in range(1, x.shape[2], 4)]
        h = torch.cat([self.encoder(c, cache) for c in chunks], dim=2)
        mean, logvar = self.quant_conv(h).chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)

    def decode(self, z):
        """(B, z_dim, T, h, w) -> video (B, C, 1 + 4(T-1), h*f, w*f), clamped to [-1, 1]."""
        self._check(z, "decode")
        z, cache = self.post_quant_conv(z), {}
        x = torch.cat([self.decoder(z[:, :, i:i + 1], cache) for i in range(z.shape[2])], dim=2)
        if self.patch > 1:
            x = _unfold(x.transpose(3, 4), 1, self.patch).transpose(3, 4)
        return x.clamp(-1.0, 1.0)


# --- checkpoint key names: original Wan (Wan-Video/Wan2.1 wan/modules/vae.py, Wan2.2 vae2_2.py) <-> diffusers

_WAN_RENAMES = [(".residual.0.", ".norm1."), (".residual.2.", ".conv1."), (".residual.3.", ".norm2."),
                (".residual.6.", ".conv2."), (".shortcut.", ".conv_shortcut."), (".middle.0.", ".mid_block.resnets.0."),
                (".middle.1.", ".mid_block.attentions.0."), (".middle.2.", ".mid_block.resnets.1."),
                (".head.0.", ".norm_out."), (".head.2.", ".conv_out.")]  # by substring, either direction
_WAN_PREFIXES = [("conv1.", "quant_conv."), ("conv2.", "post_quant_conv."), ("encoder.conv1.", "encoder.conv_in."),
                 ("decoder.conv1.", "decoder.conv_in.")]  # whole-name prefixes


def convert_wan_vae_state_dict(sd):
    """Original Wan VAE key names -> diffusers' (diffusers names pass unchanged). Wan2.1 keeps one flat list of
    resnets and resamplers per side, which diffusers cuts into levels on the decoder side; Wan2.2 nests one list per
    level, which diffusers splits into resnets and a resampler."""
    sd = {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}
    if "encoder.conv1.weight" not in sd:
        return sd
    # Wan2.1 decoder: n resnets then an upsampler per level, so the first upsampler's index is n
    n = min([int(m[1]) for k in sd if (m := re.match(r"decoder\.upsamples\.(\d+)\.resample\.", k))] or [1 << 30])
    out = {}
    for k, v in sd.items():
        k = next((b + k[len(a):] for a, b in _WAN_PREFIXES if k.startswith(a)), k)
        if m := re.match(r"(encoder|decoder)\.(down|up)samples\.(\d+)\.(?:(?:down|up)samples\.(\d+)\.)?(.*)", k):
            side, d, i, j, rest = m.groups()
            if j is None and side == "encoder":  # Wan2.1's encoder: diffusers keeps the flat list
                k = f"encoder.down_blocks.{i}.{rest}"
            else:
                wan21 = j is None
                if wan21:
                    i, j = divmod(int(i), n + 1)
                sampler = "upsamplers.0." if wan21 else f"{d}sampler."
                k = f"{side}.{d}_blocks.{i}." + (sampler if rest.startswith(("resample.", "time_conv.")) else
                                                 f"resnets.{j}.") + rest
        for a, b in _WAN_RENAMES:
            k = k.replace(a, b)
        out[k] = v
    return out


def infer_wan_vae_config(sd):
    """AutoencoderKLWan kwargs from the tensors of a (diffusers-named) state dict."""
    def get(k):
        if k not in sd:
            raise ValueError(f"cannot infer the Wan VAE architecture: missing tensor {k}")
        return sd[k].shape

    residual = "encoder.down_blocks.0.resnets.0.conv1.weight" in sd
    levels = 1 + max([int(m[1]) for k in sd if (m := re.match(r"decoder\.up_blocks\.(\d+)\.", k))] or [0])
    n = max([int(m[1]) for k in sd if (m := re.match(r"decoder\.up_blocks\.0\.resnets\.(\d+)\.", k))] or [1])
    # encoder level i: its first resnet and its downsampler
    first = [f"encoder.down_blocks.{i}.resnets.0." if residual else f"encoder.down_blocks.{i * (n + 1)}."
             for i in range(levels)]
    sampler = [f"encoder.down_blocks.{i}.downsampler." if residual else f"encoder.down_blocks.{i * (n + 1) + n}."
               for i in range(levels - 1)]
    base, cin = get("encoder.conv_in.weight")[:2]
    mult = [get(f + "conv1.weight")[0] // base for f in first]
    patch = round((cin / 3) ** 0.5)  # RGB in, patchified to 3 * p * p channels
    if 3 * patch ** 2 != cin:
        raise ValueError(f"cannot infer the Wan VAE patch size from {cin} input channels (expected 3 * p * p)")
    return dict(base_dim=base, decoder_base_dim=get("decoder.conv_out.weight")[1] // mult[0],
                z_dim=get("decoder.conv_in.weight")[1], dim_mult=mult, num_res_blocks=n,
                temporal_downsample=[s + "time_conv.weight" in sd for s in sampler], is_residual=residual,
                in_channels=cin, out_channels=get("decoder.conv_out.weight")[0], patch_size=patch)


# --- loading (video)

# per-channel latent statistics, z_model = (z_vae - mean) / std: WanVAE in Wan-Video/Wan2.1 wan/modules/vae.py and
# Wan2_2_VAE in Wan-Video/Wan2.2 wan/modules/vae2_2.py (diffusers' configs "latents_mean"/"latents_std" repeat them)
WAN21_LATENTS_MEAN = [-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
                      0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921]
WAN21_LATENTS_STD = [2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
                     3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160]
WAN22_LATENTS_MEAN = [-0.2289, -0.0052, -0.1323, -0.2339, -0.2799, 0.0174, 0.1838, 0.1557, -0.1382, 0.0542, 0.2813,
                      0.0891, 0.1570, -0.0098, 0.0375, -0.1825, -0.2246, -0.1207, -0.0698, 0.5109, 0.2665, -0.2108,
                      -0.2158, 0.2502, -0.2055, -0.0322, 0.1109, 0.1567, -0.0729, 0.0899, -0.2799, -0.1230, -0.0313,
                      -0.1649, 0.0117, 0.0723, -0.2839, -0.2083, -0.0520, 0.3748, 0.0152, 0.1957, 0.1433, -0.2944,
                      0.3573, -0.0548, -0.1681, -0.0667]
WAN22_LATENTS_STD = [0.4765, 1.0364, 0.4514, 1.1677, 0.5313, 0.4990, 0.4818, 0.5013, 0.8158, 1.0344, 0.5894, 1.0901,
                     0.6885, 0.6165, 0.8454, 0.4978, 0.5759, 0.3523, 0.7135, 0.6804, 0.5833, 1.4146, 0.8986, 0.5659,
                     0.7069, 0.5338, 0.4889, 0.4917, 0.4069, 0.4999, 0.6866, 0.4093, 0.5709, 0.6065, 0.6415, 0.4944,
                     0.5726, 1.2042, 0.5458, 1.6887, 0.3971, 1.0600, 0.3943, 0.5537, 0.5444, 0.4089, 0.7468, 0.7744]

VIDEO_VAE_FAMILIES = {  # the released architectures (AutoencoderKLWan kwargs) and their latent statistics
    "wan2.1": dict(arch=dict(base_dim=96, z_dim=16), latents_mean=WAN21_LATENTS_MEAN, latents_std=WAN21_LATENTS_STD),
    "wan2.2": dict(arch=dict(base_dim=160, decoder_base_dim=256, z_dim=48, is_residual=True, in_channels=12,
                             out_channels=12, patch_size=2),
                   latents_mean=WAN22_LATENTS_MEAN, latents_std=WAN22_LATENTS_STD),
}


class VideoVAE(nn.Module):
    """A frozen AutoencoderKLWan plus per-channel latent normalisation z = (z_vae - mean) / std.
    ae.encode / ae.decode are the raw (un-normalised) forms."""

    def __init__(self, ae, latents_mean, latents_std):
        super().__init__()
        self.ae = ae.eval().requires_grad_(False)
        self.in_channels, self.latent_channels, self.downsample = ae.channels, ae.config["z_dim"], ae.downsample
        if not len(latents_mean) == len(latents_std) == self.latent_channels:
            raise ValueError(f"need {self.latent_channels} latent means and stds, got {len(latents_mean)}, "
                             f"{len(latents_std)}")
        shape = (1, self.latent_channels, 1, 1, 1)
        self.register_buffer("latents_mean", torch.tensor(latents_mean).view(shape), persistent=False)
        self.register_buffer("latents_std", torch.tensor(latents_std).view(shape), persistent=False)

    @torch.no_grad()
    def encode(self, video, sample=False):
        """Video in [-1, 1] (B, C, 1 + 4k, H, W) -> normalised latents (B, z, 1 + k, H/f, W/f): the posterior
        mean, or a sample of the posterior."""
        p = next(self.ae.parameters())
        mean, logvar = self.ae.encode(video.to(p.device, p.dtype))
        z = mean + torch.randn_like(mean) * (0.5 * logvar).exp() if sample else mean
        return ((z - self.latents_mean) / self.latents_std).to(video.device, video.dtype)

    @torch.no_grad()
    def decode(self, z):
        """Normalised latents (B, z, T, h, w) -> video (B, C, 1 + 4(T-1), h*f, w*f) in [-1, 1]."""
        self.ae._check(z, "decode")  # before the channel-wise scaling can fail less clearly
        p = next(self.ae.parameters())
        x = self.ae.decode(z.to(p.device, p.dtype) * self.latents_std + self.latents_mean)
        return x.to(z.device, z.dtype)


def load_video_vae(path, family="wan2.1", device="cpu", dtype=torch.float32):
    """Load a Wan video VAE: a diffusers folder (config.json + diffusion_pytorch_model.safetensors; a pipeline
    folder's vae/), the original Wan2.1_VAE.pth / Wan2.2_VAE.pth, or a single .safetensors with either naming.
    The architecture comes from the tensors (config.json wins); latent mean/std from config.json, else the family."""
    if family not in VIDEO_VAE_FAMILIES:
        raise ValueError(f"unknown video VAE family {family!r}; choose from {', '.join(VIDEO_VAE_FAMILIES)}")
    fam = VIDEO_VAE_FAMILIES[family]
    cfg, weights = _vae_files(path, "AutoencoderKLWan", "video VAE")
    cfg["temporal_downsample"] = cfg.get("temperal_downsample")  # sic in diffusers
    sd = _read_weights(weights, convert_wan_vae_state_dict)
    try:
        arch = infer_wan_vae_config(sd)
    except ValueError as e:
        raise ValueError(f"{weights}: {e}") from None
    arch.update({k: cfg[k] for k in arch if cfg.get(k) is not None})
    if arch["z_dim"] != fam["arch"]["z_dim"]:
        fits = "".join(f"; pass family={f!r}" for f, v in VIDEO_VAE_FAMILIES.items()
                       if v["arch"]["z_dim"] == arch["z_dim"])
        raise ValueError(f"{weights} holds a Wan VAE with {arch['z_dim']} latent channels, but family {family!r} has "
                         f"{fam['arch']['z_dim']}{fits}")
    ae = _load_exact(AutoencoderKLWan(**arch), sd, f"Wan VAE weights in {weights}")
    mean, std = cfg.get("latents_mean") or fam["latents_mean"], cfg.get("latents_std") or fam["latents_std"]
    return VideoVAE(ae, mean, std).to(device, dtype)


# --- a tiny VAE trained on the digits, so latent-space flows can be tested end to end on CPU

def train_vae(out_dir, steps=250, size=16, seed=0, batch_size=64, lr=2e-3, kl_weight=1e-4):
    """Train a small AutoencoderKL on the digits train split (f=2 -> 4 x size/2 x size/2 latents) and save it
    as a diffusers folder out_dir/vae (reused if already there with the same settings). Returns its path."""
    folder = os.path.join(out_dir, "vae")
    cfg_path, w_path = os.path.join(folder, "config.json"), os.path.join(folder, "diffusion_pytorch_model.safetensors")
    settings = dict(steps=steps, size=size, seed=seed, batch_size=batch_size, lr=lr, kl_weight=kl_weight)
    try:
        with open(cfg_path) as f:
            if json.load(f).get("_flowzoo_train") == settings and os.path.isfile(w_path):
                return folder
    except (OSError, ValueError):
        pass  # no valid cache: train
    try:
        from tqdm import tqdm
    except ImportError:
        raise ImportError("train_vae needs tqdm: pip install tqdm") from None
    x = to_float(load_digits("train", size=size)[0])  # (N, 1, size, size) in [-1, 1]
    with torch.random.fork_rng():  # deterministic without touching the caller's RNG
        torch.manual_seed(seed)
        ae = AutoencoderKL(in_channels=1, out_channels=1, block_out_channels=(32, 64), layers_per_block=1,
                           latent_channels=4, norm_num_groups=32)
        opt = torch.optim.Adam(ae.parameters(), lr=lr)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=max(steps, 1), pct_start=0.1)
        t0, bar = time.time(), tqdm(range(steps), desc="train_vae", mininterval=1.0)
        for step in bar:
            xb = x[torch.randint(len(x), (batch_size,))]
            mean, logvar = ae.encode(xb)
            z = mean + torch.randn_like(mean) * (0.5 * logvar).exp()  # reparameterised posterior sample
            rec = F.mse_loss(ae.decode(z), xb)
            kl = 0.5 * (mean ** 2 + logvar.exp() - 1 - logvar).mean()  # KL to N(0, I), per latent element
            loss = rec + kl_weight * kl
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            bar.set_postfix(rec=f"{rec.item():.4f}", kl=f"{kl.item():.2f}")
        ae.eval()
        with torch.no_grad():  # scale latents to unit variance, as SD's 0.18215 does
            means = torch.cat([ae.encode(xb)[0] for xb in x.split(256)])
        scaling_factor = 1.0 / means.std().item()
    os.makedirs(folder, exist_ok=True)
    config = dict(_class_name="AutoencoderKL", **ae.config, down_block_types=["DownEncoderBlock2D"] * 2,
                  up_block_types=["UpDecoderBlock2D"] * 2, act_fn="silu", sample_size=size,
                  scaling_factor=scaling_factor, shift_factor=0.0, _flowzoo_train=settings)
    # write to temp names then rename, config last: a half-written folder never looks valid
    write_safetensors(w_path + ".tmp", ae.state_dict())
    os.replace(w_path + ".tmp", w_path)
    with open(cfg_path + ".tmp", "w") as f:
        json.dump(config, f, indent=2)
    os.replace(cfg_path + ".tmp", cfg_path)
    print(f"train_vae: {steps} steps in {time.time() - t0:.0f}s, saved {folder}")
    return folder


def digits_vae(size: int = 16) -> str:
    """The small digits VAE of train_vae (size -> 4 x size/2 x size/2 latents), trained once into cache_dir()."""
    return train_vae(cache_dir() / f"digits_vae{size}", size=size)


# ----------------------------------------------------------------------------------------------------------------------
# 3. ODE integration
#
# One solver for every flow that samples by integrating dx/dt = f(t, x): fixed-step explicit Runge-Kutta (Euler, Heun,
# RK4) from one Butcher-tableau routine, and adaptive Dormand-Prince 5(4) with torchdiffeq's step-size controller, so
# that models trained and sampled with torchdiffeq's dopri5 (LFM) give the same numbers here. Time may run either way
# (t0 < t1 or t0 > t1). One step size serves the whole batch, as in torchdiffeq.

ODE_METHODS = ("euler", "heun", "rk4", "dopri5")

# (c, A, b) of the fixed-step methods: stage i is f(t + c_i h, x + h sum_j A_ij k_j), the step is x + h sum_i b_i k_i
TABLEAUS = {
    "euler": ((0.0,), ((),), (1.0,)),
    "heun": ((0.0, 1.0), ((), (1.0,)), (0.5, 0.5)),  # the trapezoid of the slopes at both ends, the end by Euler
    "rk4": ((0.0, 0.5, 0.5, 1.0), ((), (0.5,), (0.0, 0.5), (0.0, 0.0, 1.0)), (1 / 6, 1 / 3, 1 / 3, 1 / 6)),
}

# Dormand-Prince 5(4) (Dormand & Prince 1980): nodes, stage coefficients and 5th-order weights. The embedded 4th-order
# weights and the dense-output midpoint weights are Shampine's (1986, "Some practical Runge-Kutta formulas"), the pair
# torchdiffeq's dopri5 uses: the error estimate, hence every step the controller takes, depends on them.
DP_C = (0.0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0, 1.0)
DP_A = ((), (1 / 5,), (3 / 40, 9 / 40), (44 / 45, -56 / 15, 32 / 9),
        (19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729),
        (9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656),
        (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84))
DP_B5 = DP_A[6] + (0.0,)  # stage 7 is evaluated at the 5th-order solution: the next step's first stage (FSAL)
DP_B4 = (1951 / 21600, 0.0, 22642 / 50085, 451 / 720, -12231 / 42400, 649 / 6300, 1 / 60)
DP_E = tuple(b5 - b4 for b5, b4 in zip(DP_B5, DP_B4))  # 5th minus 4th order: the local error estimate
DP_MID = (6025192743 / 30085553152 / 2, 0.0, 51252292925 / 65400821598 / 2, -2691868925 / 45128329728 / 2,
          187940372067 / 1594534317056 / 2, -1776094331 / 19743644256 / 2, 11237099 / 235043384 / 2)  # x(t + h/2)


@dataclass
class ODEResult:
    x: torch.Tensor  # (B, ...) the state at t1
    nfe: int  # evaluations of f (a guided model's batched cond + null forward is one)
    energy: torch.Tensor  # (B,) the sum over steps of |dx|^2 / |dt|: the path energy of the polyline the solver took
    x0: torch.Tensor  # (B, ...) the state at t0, the start
    path: torch.Tensor | None = None  # (n + 1, B, ...): x0, then the state after each of the n steps, when keep_path


def _combine(x, h, coefs, ks):
    """x + sum_j (h coefs_j) k_j, zero coefficients skipped (x itself when none is left)."""
    terms = [(h * c) * k for c, k in zip(coefs, ks) if c]
    return x + sum(terms) if terms else x


def odeint(f: Callable, x: torch.Tensor, method: str = "euler", steps: int = 100, atol: float = 1e-5,
           rtol: float = 1e-5, t0: float = 0.0, t1: float = 1.0, keep_path: bool = False,
           max_steps: int = 10_000) -> ODEResult:
    """Solve dx/dt = f(t, x) from t0 to t1 for a batch x (B, ...); f gets t as a Python float.

    euler / heun / rk4 take `steps` equal steps on a float64 grid (so t1 is hit exactly); dopri5 ignores `steps` and
    adapts one step size to keep the RMS over all elements of err / (atol + rtol max(|x|, |x_new|)) <= 1, exactly as
    torchdiffeq's dopri5 does (see _dopri5), giving up after `max_steps` tried steps. t0 > t1 integrates backwards
    (LFM samples from t = 1 to t = 0). t0 == t1 returns x without evaluating f."""
    if method not in ODE_METHODS:
        raise ValueError(f"unknown ODE method {method!r}: one of {', '.join(ODE_METHODS)}")
    if method != "dopri5" and (int(steps) != steps or steps < 1):
        raise ValueError(f"{method} needs a positive whole number of steps, got {steps!r}")
    t0, t1 = float(t0), float(t1)
    res = ODEResult(x, 0, x.new_zeros(x.shape[0]), x, [x] if keep_path else None)

    def fc(t, xt):  # counts the evaluations
        res.nfe += 1
        return f(t, xt)

    def advance(x_new, dt):  # an accepted step from res.x over |dt| of time: its |dx|^2 / |dt| joins the energy
        res.energy = res.energy + (x_new - res.x).reshape(x.shape[0], -1).square().sum(1) / abs(dt)
        res.x = x_new
        if keep_path:
            res.path.append(x_new)

    if t0 != t1:
        if method == "dopri5":
            _dopri5(fc, x, t0, t1, atol, rtol, max_steps, advance)
        else:
            _fixed_steps(fc, x, TABLEAUS[method], int(steps), t0, t1, advance)
    if keep_path:
        res.path = torch.stack(res.path)
    return res


def _fixed_steps(f, x, tableau, steps, t0, t1, advance):
    """`steps` explicit Runge-Kutta steps of the tableau (c, A, b) on the grid linspace(t0, t1); h < 0: backwards."""
    c, A, b = tableau
    ts = torch.linspace(t0, t1, steps + 1, dtype=torch.float64).tolist()
    for ta, tb in zip(ts[:-1], ts[1:]):
        h = tb - ta
        ks = []  # the stage slopes, each like x
        for ci, row in zip(c, A):
            ks.append(f(tb if ci == 1.0 else ta + ci * h, _combine(x, h, row, ks)))  # c = 1: the grid point itself
        x = _combine(x, h, b, ks)
        advance(x, h)


def _dopri5(f, x, t0, t1, atol, rtol, max_steps, advance):
    """Adaptive Dormand-Prince 5(4) with torchdiffeq's controller (its solution is itself ~1e-3 from the exact one at
    atol = rtol = 1e-5, so only the same controller reproduces a torchdiffeq-sampled model's numbers):
      - time runs forward in s = +-t (the sign of t1 - t0), and f becomes -f for a decreasing t;
      - the first step is Hairer's estimate (Solving ODEs I, II.4) with the order-4 exponent 1/5 (two evaluations);
      - a step is kept when the RMS over all elements of err / (atol + rtol max(|x|, |x_new|)) is <= 1, err from
        Shampine's embedded 4th-order solution; local extrapolation (x moves on the 5th-order one) and FSAL, so a step
        costs 6 evaluations;
      - the next step is h min(10, max(0.9 ratio^-1/5, 0.2)) after a rejection, but never smaller than h after an
        accepted one (ratio 0: 10 h); steps are not cut at the end point, so f may be evaluated a little past t1;
      - x(t1) comes from the last step's quartic dense output (x, x_new, the midpoint from DP_MID, both slopes).
    Norms are taken in x's dtype, as torchdiffeq does, so float32 states give its float32 decisions."""
    sign = 1.0 if t1 >= t0 else -1.0
    s, s_end = sign * t0, sign * t1

    def g(si, xi):  # dx/ds
        v = f(sign * si, xi)
        return v if sign > 0 else -v

    def rms(v):
        return float(v.abs().square().mean().sqrt())
    k1 = g(s, x)  # like x
    # the first step (Hairer, Norsett & Wanner, Sec. II.4): small enough that an Euler step changes x by ~1% of its
    # scale, then refined by the change of slope over that trial step
    scale = atol + rtol * x.abs()
    d0, d1 = rms(x / scale), rms(k1 / scale)
    h0 = 1e-6 if d0 < 1e-5 or d1 < 1e-5 else 0.01 * d0 / d1
    d2 = rms((g(s + h0, x + h0 * k1) - k1) / scale) / h0
    h1 = max(1e-6, h0 * 1e-3) if d1 <= 1e-15 and d2 <= 1e-15 else (0.01 / max(d1, d2)) ** (1 / 5)
    h = min(100 * h0, h1)
    for _ in range(max_steps):
        k = [k1]  # the 7 stage slopes, each like x
        for i in range(1, 7):
            xi = _combine(x, h, DP_A[i], k)
            k.append(g(s + (h if DP_C[i] == 1.0 else DP_C[i] * h), xi))
        x_new = xi  # stage 7 was evaluated at the 5th-order solution
        err = _combine(torch.zeros_like(x), h, DP_E, k)
        ratio = rms(err / (atol + rtol * torch.maximum(x.abs(), x_new.abs())))
        if math.isnan(ratio):  # torchdiffeq stops here too (its step size becomes NaN)
            raise RuntimeError(f"dopri5: non-finite values at t = {sign * s:.6g} (step {h:.3g}); f or x is not finite")
        if ratio <= 1:
            if s + h < s_end:
                advance(x_new, h)
                s, x, k1 = s + h, x_new, k[6]
            else:  # the step reaches or passes s_end: x(t1) from its dense output p(r), r in [0, 1] across the step
                mid = _combine(x, h, DP_MID, k)
                # p(r) = x + r h k1 + c r^2 + b r^3 + a r^4 with p(1) = x_new, p'(1) = h k7, p(1/2) = mid
                a = 16 * mid - 8 * (x + x_new) + 2 * h * (k[6] - k[0])
                b = 14 * x_new + 18 * x - 32 * mid + h * (5 * k[0] - 3 * k[6])
                c = 16 * mid - 11 * x - 5 * x_new + h * (k[6] - 4 * k[0])
                r = (s_end - s) / ((s + h) - s)
                advance(sum(cf * r ** i for i, cf in enumerate((x, h * k[0], c, b, a))), s_end - s)
                return
        floor = 1.0 if ratio < 1 else 0.2  # an accepted step never shrinks the next one
        h *= 10.0 if ratio == 0 else min(10.0, max(0.9 / ratio ** 0.2, floor))
    raise RuntimeError(f"dopri5 did not reach t = {t1} in {max_steps} steps (stuck at t = {sign * s:.6g} with step "
                       f"{h:.3g}): the field is stiff or not finite")


# ----------------------------------------------------------------------------------------------------------------------
# 4. Distributed and training plumbing

# --- torchrun ---------------------------------------------------------------------------------------------------------


@dataclass
class Dist:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def setup_distributed(device: str = "auto") -> Dist:
    """From torchrun's environment (NCCL on GPU, gloo on CPU); a plain single process when not under torchrun.
    device: auto (CUDA if present) | cpu | cuda | cuda:N (a single process) | mps; an absent device is an error."""
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: no CUDA device is available here (use --device cpu or auto)")
    if device.startswith("cuda:") and int(device[5:]) >= torch.cuda.device_count():
        raise ValueError(f"--device {device}: there are only {torch.cuda.device_count()} CUDA devices")
    if device == "mps" and not torch.backends.mps.is_available():
        raise ValueError("--device mps: the MPS backend is not available here")
    cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if "RANK" not in os.environ:
        return Dist(device=torch.device(device if device not in ("auto", "cuda") else "cuda" if cuda else "cpu"))
    if device == "mps" or device.startswith("cuda:"):
        raise ValueError(f"--device {device} is for a single process; under torchrun each rank uses cuda:LOCAL_RANK")
    rank, local_rank, world = (int(os.environ[k]) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"))
    if cuda:
        torch.cuda.set_device(local_rank)
    dev = torch.device(f"cuda:{local_rank}" if cuda else "cpu")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo", device_id=dev if cuda else None)
    return Dist(rank, local_rank, world, dev)


def is_main() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def print0(*args, **kwargs):
    if is_main():
        print(*args, **kwargs, flush=True)


def progress(iterable, **kwargs):
    """tqdm on rank 0 only."""
    from tqdm import tqdm
    return tqdm(iterable, disable=not is_main(), dynamic_ncols=True, **kwargs)


def all_reduce_mean(x: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        x = x.clone()
        dist.all_reduce(x)
        x /= dist.get_world_size()
    return x


def all_ranks(flag: torch.Tensor) -> bool:
    """True when the flag holds on every rank (under torch.distributed; else the flag): a loop whose forwards are
    collectives (FSDP) must stop on all ranks together."""
    if dist.is_initialized():
        flag = flag.float()
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag)


def seed_all(seed: int):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rank_split(n: int, d: Dist) -> tuple[int, int]:
    """(start, count) of this rank's share of n items: ranks split sampling work evenly."""
    per, extra = divmod(n, d.world_size)
    start = d.rank * per + min(d.rank, extra)
    return start, per + (d.rank < extra)


def wrap_model(model: nn.Module, d: Dist, fsdp: bool = False, shard_types: tuple[type, ...] = (Block,),
               bf16: bool = False) -> nn.Module:
    """DDP, or FSDP2 (`fully_shard` on every module of `shard_types`, then the root; with `bf16` the forward and
    backward run on bf16 copies of the fp32 sharded weights, gradients reduced in fp32: FSDP2 mixed precision).

    FSDP2 shards the parameters in place, so `model` itself stays the module to take state dicts from; the returned
    module is the one to call in the training step. A single process gets the model back unchanged."""
    if not d.distributed:
        return model
    if fsdp:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else \
            MixedPrecisionPolicy()
        for m in model.modules():
            if isinstance(m, shard_types):
                fully_shard(m, mp_policy=mp)
        fully_shard(model, mp_policy=mp)
        return model
    from torch.nn.parallel import DistributedDataParallel
    return DistributedDataParallel(model, device_ids=[d.local_rank] if d.device.type == "cuda" else None)


@contextlib.contextmanager
def full_params(model: nn.Module):
    """Gather an FSDP2 model's parameters once, for code that runs many forwards or calls submodules directly (a
    sampler): every FSDP2 module unshards here and stays unsharded until the block ends, instead of all-gathering
    its weights in each forward -- once per token in an autoregressive sampler. On exit each module reshards and gets
    FSDP2's default back (reshard after forward, except the root). Nested blocks gather nothing more; a no-op for any
    other module."""
    fsdp = [m for m in model.modules() if hasattr(m, "set_reshard_after_forward")]
    if not fsdp or model.__dict__.get("_full_params"):  # a plain module, or nested in another full_params
        yield model
        return
    model.__dict__["_full_params"] = True
    for m in fsdp:  # nor after a backward inside the block (a sampler's score step takes an input gradient)
        m.set_reshard_after_forward(False, recurse=False)
        m.set_reshard_after_backward(False, recurse=False)
        m.unshard()
    try:
        yield model
    finally:
        for m in fsdp:
            m.reshard()
            m.set_reshard_after_forward(m is not model, recurse=False)
            m.set_reshard_after_backward(True, recurse=False)
        model.__dict__["_full_params"] = False


def _full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of an FSDP2 shard (a collective), or the tensor itself."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


class EMA:
    """Exponential moving average of the parameters; works on FSDP2 shards as they are (the average is elementwise)."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.shadow = {n: p.detach().float().clone() for n, p in model.named_parameters()}

    @torch.no_grad()
    def update(self, model: nn.Module, step: int):
        decay = min(self.decay, (1 + step) / (10 + step))  # warm up: early weights are not worth averaging
        params = [p.detach().float() for p in model.parameters()]
        torch._foreach_lerp_(list(self.shadow.values()), params, 1 - decay)

    def state_dict(self) -> dict:
        return {n: _full(t).cpu() for n, t in self.shadow.items()}

    @torch.no_grad()
    def load_state_dict(self, sd: dict):
        for n, t in self.shadow.items():
            src = sd[n].to(t.device if not hasattr(t, "device_mesh") else t.to_local().device)
            if hasattr(t, "device_mesh"):
                from torch.distributed.tensor import distribute_tensor
                src = distribute_tensor(src, t.device_mesh, t.placements)
            t.copy_(src)

    @torch.no_grad()
    def copy_to(self, model: nn.Module):
        """Put the averaged weights in the model (shard by shard under FSDP2)."""
        for p, s in zip(model.parameters(), self.shadow.values()):
            p.copy_(s)

    @contextlib.contextmanager
    def swap(self, model: nn.Module):
        """Run the model with the averaged weights inside the block."""
        params = list(model.parameters())
        backup = [p.detach().clone() for p in params]
        self.copy_to(model)
        try:
            yield model
        finally:
            with torch.no_grad():
                for p, b in zip(params, backup):
                    p.copy_(b)


# --- config CLI -------------------------------------------------------------------------------------------------------


def opt(default, *, choices: tuple | None = None, min: float | None = 0, max: float | None = None,
        gt: float | None = None):
    """A config field with its constraints: `choices` for strings, `min`/`max` (inclusive) and `gt` (exclusive) for
    numbers, applied to each element of a tuple. TrainConfig checks them whenever a config is made -- from the command
    line, a preset, a checkpoint or user code -- so a typo can never fall through to a default. A plain field is a
    number >= 0 (finite, as every float here) or any string; the help text stays the field's trailing `# comment`."""
    return dataclasses.field(default=default, metadata=dict(choices=choices, min=min, max=max, gt=gt))


def _check_field(f: dataclasses.Field, value):
    """One field against its type and constraints -> ValueError naming the option."""
    name, m = f"--{f.name}", {"choices": None, "min": 0, "max": None, "gt": None, **f.metadata}
    if isinstance(f.default, tuple):
        if not isinstance(value, tuple):
            raise ValueError(f"{name} must be a comma-separated list, got {value!r}")
        kind, values = (type(f.default[0]) if f.default else None), value
    else:
        kind, values = type(f.default), (value,)
    for v in values:
        if kind is bool or kind is str:
            if not isinstance(v, kind):
                raise ValueError(f"{name} must be a {kind.__name__}, got {v!r}")
        elif kind in (int, float):
            if isinstance(v, bool) or not isinstance(v, (int, float) if kind is float else int):
                raise ValueError(f"{name} must be {'a number' if kind is float else 'an integer'}, got {v!r}")
            if not math.isfinite(v):
                raise ValueError(f"{name} must be finite, got {v}")
            if m["gt"] is not None and v <= m["gt"]:
                raise ValueError(f"{name} must be > {m['gt']}, got {v}")
            if m["min"] is not None and v < m["min"]:
                raise ValueError(f"{name} must be >= {m['min']}, got {v}")
            if m["max"] is not None and v > m["max"]:
                raise ValueError(f"{name} must be <= {m['max']}, got {v}")
        if m["choices"] is not None and v not in m["choices"]:
            raise ValueError(f"{name} {v!r} is not one of: {', '.join(map(str, m['choices']))}")


@dataclass
class TrainConfig:
    """Training and run-time options shared by every model file (their configs subclass this and may add checks
    across fields in a `__post_init__` that calls this one)."""
    out_dir: str = ""  # output folder (default: out/<model>, or out/<model>-<preset> for other presets)
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    steps: int = opt(2000, min=1)  # optimizer steps (a larger value at --resume recomputes the cosine over the new total)
    batch_size: int = opt(64, min=1)  # global batch, split across ranks (and across --grad_accum micro-batches)
    grad_accum: int = opt(1, min=1)  # micro-batches per optimizer step (the global batch stays --batch_size)
    lr: float = opt(1e-3, gt=0)  # peak learning rate
    lr_schedule: str = opt("cosine", choices=("cosine", "constant"))  # cosine | constant (after linear warmup)
    min_lr: float = 0.0  # where the cosine schedule ends (its floor); groups with their own lr end at the same fraction
    warmup: int = 100  # linear warmup steps
    weight_decay: float = 1e-4  # AdamW weight decay on matrices
    beta1: float = opt(0.9, max=0.9999)  # AdamW beta1
    beta2: float = opt(0.95, max=0.9999)  # AdamW beta2
    grad_clip: float = 1.0  # max global grad norm (0 = off)
    grad_clip_value: float = 0.0  # then clamp every gradient element to [-v, v], after the all-reduce (0 = off)
    ema_decay: float = opt(0.999, max=0.99999)  # EMA of the weights, used for sampling and eval (0 = off)
    seed: int = 0  # base seed (each rank adds its rank)
    log_every: int = 50  # steps between log.jsonl lines (0 = off)
    logger: str = opt("none", choices=("none", "tensorboard", "wandb"))  # also log to TensorBoard | W&B (README)
    eval_every: int = 500  # steps between evaluations / sample grids (0 = only at the end)
    ckpt_every: int = 500  # steps between checkpoints (0 = only at the end)
    amp: bool = True  # bf16 mixed precision: autocast on GPU; under --fsdp, FSDP2's bf16 weights (on CPU too)
    compile: bool = False  # torch.compile the training forward (and a sampler's fixed-shape step, where one has it)
    fsdp: bool = False  # FSDP2 instead of DDP under torchrun
    num_workers: int = 0  # DataLoader workers for image folders
    stop_after: int = 0  # stop with a checkpoint after this many steps of this run (job time limits); 0 = off
    fid_ref: str = ""  # --eval also gives the Inception FID against this image folder, .npz of images or mu/sigma .npz
    fid_weights: str = ""  # the FID's Inception weights: a local pt_inception-2015-12-05-6726825d.pth (pytorch-fid)
    fid_n: int = opt(10000, min=2)  # samples the FID is computed on (published figures use 50000; FID falls with n)

    NAME: ClassVar[str] = "model"  # the model file: default out_dir, and what its checkpoints are checked against
    # fields of a model config that may differ from a checkpoint's (sampler settings and the like)
    RUNTIME: ClassVar[tuple[str, ...]] = ()
    # fields renamed since older checkpoints were written: {old name: new name} (read under the new name)
    RENAMED: ClassVar[dict[str, str]] = {}
    # model fields added since older checkpoints were written: {name: the value those were trained with}
    LEGACY: ClassVar[dict] = {}

    def __post_init__(self):
        for f in fields(self):
            _check_field(f, getattr(self, f.name))
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?|mps", self.device):
            raise ValueError(f"--device {self.device!r} is not one of: auto, cpu, cuda, cuda:N, mps")
        if self.batch_size % self.grad_accum:
            raise ValueError(f"--batch_size {self.batch_size} is not divisible by --grad_accum {self.grad_accum}")
        if self.lr_schedule == "cosine" and self.min_lr >= self.lr:
            raise ValueError(f"--min_lr {self.min_lr} must be below --lr {self.lr} (or use --lr_schedule constant)")
        if self.fid_ref and not self.fid_weights:
            raise ValueError(f"--fid_ref needs --fid_weights, {FID_WEIGHTS_HINT}")


def _field_help(cls) -> dict[str, str]:
    """Help text for each field from its trailing `# comment` in the class source (configs stay plain dataclasses)."""
    out = {}
    for klass in reversed(cls.__mro__):
        try:
            src = inspect.getsource(klass)
        except (OSError, TypeError):
            continue
        out.update(re.findall(r"^\s+(\w+)\s*:[^#\n]*#\s*(.+)$", src, flags=re.M))
    return out


def _parser_type(default):
    if isinstance(default, tuple):
        elem = type(default[0]) if default else str

        def parse(s):
            return tuple(elem(v) for v in s.split(",") if v.strip())
        parse.__name__ = f"comma-separated {elem.__name__}"  # argparse names it in "invalid ... value"
        return parse
    return type(default)


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # argparse takes "-1e-3" for an option (only "-1" and "-.5" look like numbers to it): let the range check speak
        self._negative_number_matcher = re.compile(r"^-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")

    def error(self, message):  # one line, not the whole usage block
        self.exit(2, f"error: {message} (see --help)\n")


def check_writable(path: str | Path, what: str):
    """Fail before any work when `path` cannot be created because one of its parents is a file."""
    for parent in Path(path).absolute().parents:
        if parent.exists():
            if not parent.is_dir():
                raise ValueError(f"{what} {path}: {parent} is a file, not a folder")
            return


def parse_config(cls, presets: dict[str, dict], argv=None, extra: Callable | None = None, doc: str | None = None):
    """A dataclass config -> argparse: every field is an option, `--preset NAME` picks a preset (the first is the
    default) and explicit options override it. Also the run modes every model file has (--resume, --overwrite,
    --sample, --eval). Values are checked as the config is built (see `opt`); the default out_dir is out/<NAME>, or
    out/<NAME>-<preset>. A training run takes the image size and channels of its --data unless an option or a preset
    named with --preset gives them (fit_to_data). Returns (config, args, overrides), `overrides` being the fields given
    on the command line."""
    p = _Parser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    default = next(iter(presets))
    p.add_argument("--preset", choices=list(presets), default=default, help="config preset (default: %(default)s)")
    helps, shown = _field_help(cls), cls(**presets[default])  # defaults as the default preset sets them
    for f in fields(cls):
        value = getattr(shown, f.name)
        h, choices = helps.get(f.name, ""), f.metadata.get("choices")
        if choices and not all(c in h for c in choices):
            h += f" [{' | '.join(choices)}]"
        h += f" (default: {value})" if value != "" else ""
        if isinstance(f.default, bool):
            p.add_argument(f"--{f.name}", action=argparse.BooleanOptionalAction, default=None, help=h)
        else:
            p.add_argument(f"--{f.name}", type=_parser_type(f.default), default=None, help=h,
                           metavar=type(f.default).__name__.upper())
    g = p.add_argument_group("run modes")
    g.add_argument("--resume", action="store_true",
                   help="continue from <out_dir>/ckpt.pt (or --ckpt) with the run's own config, read from the "
                        "checkpoint: options given with it change run-time fields (e.g. --steps), never the model")
    g.add_argument("--overwrite", action="store_true",
                   help="train into an out_dir that holds another run (or --sample over an existing --out)")
    g.add_argument("--sample", action="store_true", help="write --n samples from --ckpt to --out (.npz)")
    g.add_argument("--eval", action="store_true", help="print the paper's metrics of --ckpt as one JSON line")
    g.add_argument("--ckpt", type=str, default=None, help="checkpoint path (default: <out_dir>/ckpt.pt)")
    g.add_argument("--n", "--num_samples", dest="n", type=int, default=64,
                   help="number of samples for --sample (default: %(default)s); under torchrun spell it --num_samples, "
                        "as torchrun's own parser takes --n for one of its options")
    g.add_argument("--out", type=str, default="samples.npz", help="output file for --sample (default: %(default)s)")
    g.add_argument("--plot", metavar="LOG", default=None, help="draw the training curves of a log.jsonl to LOG.png")
    g.add_argument("--dry_run", action="store_true",
                   help="size the config without allocating it and print one JSON line: parameters (total and per "
                        "part), tokens per example, and GiB per GPU under FSDP2 on --gpus GPUs: fp32 weights, "
                        "gradients and AdamW states sharded (16 B/parameter/GPU), the largest block's bf16 weights "
                        "gathered twice, the activations of one micro-batch (batch_size / gpus / grad_accum) counted "
                        "from a bf16 forward on the meta device as a fused attention kernel keeps them, with and "
                        "without gradient checkpointing; the sampler's caches; and any dense attention mask")
    g.add_argument("--gpus", type=int, default=8, help="GPUs the --dry_run estimate is for (default: %(default)s)")
    if extra is not None:
        extra(p)
    args = p.parse_args(argv)
    overrides = {f.name: getattr(args, f.name) for f in fields(cls) if getattr(args, f.name) is not None}
    unknown = set(presets[args.preset]) - {f.name for f in fields(cls)}
    if unknown:
        raise ValueError(f"preset {args.preset} sets unknown fields {sorted(unknown)}")
    cfg = cls(**{**presets[args.preset], **overrides})
    if not (args.resume or args.sample or args.eval or args.plot):  # training: image size and channels of --data
        given = set(overrides) | (set(presets[args.preset]) if args.preset != default else set())
        cfg = fit_to_data(cfg, given, getattr(args, "precompute", None))  # (--precompute: of the images it encodes)
    if not cfg.out_dir:
        cfg.out_dir = f"out/{cls.NAME}" + ("" if args.preset == default else f"-{args.preset}")
    if sum((args.resume, args.sample, args.eval, bool(args.plot), args.dry_run)) > 1 or (args.overwrite and args.resume):
        raise ValueError("pick one of --resume, --sample, --eval, --plot, --dry_run (and --overwrite or --resume, "
                         "not both)")
    if args.resume:  # the run's settings come back from its checkpoint, so no flag has to be repeated
        path = Path(args.ckpt or Path(cfg.out_dir) / "ckpt.pt")
        if path.is_file():  # (a file-specific layout, e.g. wcfm's run folders, resolves its checkpoint itself)
            state = load_checkpoint(path, mmap=True)  # (only its config and step are read here)
            cfg = config_from_checkpoint(cls, state, overrides, what=str(path))
            if state["step"] >= cfg.steps:
                raise ValueError(f"{path} is at step {state['step']}, the end of its --steps {cfg.steps}: pass a "
                                 f"larger --steps to train on")
    for name in ("n", "gpus"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.sample:
        if Path(args.out).suffix != ".npz":
            raise ValueError(f"--out {args.out} must end in .npz")
        check_writable(args.out, "--out")
        if Path(args.out).exists() and not args.overwrite:
            raise ValueError(f"--out {args.out} exists; pass --overwrite to replace it")
    elif not args.eval and not args.plot and not args.dry_run:
        check_writable(cfg.out_dir, "--out_dir")
    return cfg, args, overrides


def model_fields(cfg) -> list[str]:
    """The fields that define the model: those the model file adds, less the RUNTIME ones."""
    base = {f.name for f in fields(TrainConfig)}
    return [f.name for f in fields(cfg) if f.name not in base and f.name not in cfg.RUNTIME]


def saved_config(state: dict, cls) -> dict:
    """A checkpoint's config, with the fields renamed since it was written under their new names (the config class's
    RENAMED: {old name: new name}, e.g. wcfm's data_path -> data) and, for this file's checkpoints, the fields added
    since at the values it was trained with (LEGACY)."""
    renamed = getattr(cls, "RENAMED", {})
    saved = {renamed.get(k, k): v for k, v in state.get("config", {}).items()}
    return {**getattr(cls, "LEGACY", {}), **saved} if state.get("kind") == cls.NAME else saved


def check_config(state: dict, cfg, what: str = "checkpoint"):
    """Refuse a checkpoint of another model file, or of another config of this one (naming the fields that differ)."""
    saved, kind = saved_config(state, cfg), state.get("kind")
    if kind != cfg.NAME and (kind is not None or not set(model_fields(cfg)) <= set(saved)):
        raise ValueError(f"{what} is {f'a {kind}' if kind else 'not a'} checkpoint{', not' if kind else ' of'} "
                         f"{cfg.NAME}")
    diff = [f"{k}={saved.get(k)!r} (now {getattr(cfg, k)!r})" for k in model_fields(cfg)
            if _plain(saved.get(k)) != _plain(getattr(cfg, k))]
    if diff:
        raise ValueError(f"{what} has another model config: " + ", ".join(diff))


def _plain(v):
    return list(v) if isinstance(v, (tuple, list)) else v


def config_from_checkpoint(cls, state: dict, overrides: dict | None = None, what: str = "--ckpt"):
    """Rebuild the config a checkpoint was trained with; command-line overrides may change run-time fields only."""
    if state.get("kind", cls.NAME) != cls.NAME:  # before the saved values meet this file's checks
        raise ValueError(f"{what} is a {state['kind']} checkpoint, not {cls.NAME}")
    names = {f.name for f in fields(cls)}
    saved = {k: tuple(v) if isinstance(v, list) else v for k, v in saved_config(state, cls).items() if k in names}
    cfg = cls(**{**saved, **(overrides or {})})
    check_config(state, cfg, what)
    return cfg


# --- checkpoints ------------------------------------------------------------------------------------------------------


def atomic_save(obj, path: str | Path):
    """torch.save to a temp file in the same folder, fsync, then os.replace: a crash never leaves a torn file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_checkpoint(path: str | Path, mmap: bool = False) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:  # a truncated or foreign file: say so in one line
        raise ValueError(f"cannot read checkpoint {path}: {type(e).__name__}: {str(e).splitlines()[0][:200]}") from None


def _rng_state() -> dict:
    npk = np.random.get_state()
    st = {"torch": torch.get_rng_state(), "python": random.getstate(),
          "numpy": [npk[0], torch.from_numpy(npk[1].astype(np.int64)), *npk[2:]]}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state()
    return st


def _set_rng_state(st: dict):
    torch.set_rng_state(st["torch"])
    random.setstate(tuple(tuple(x) if isinstance(x, list) else x for x in st["python"]))
    np.random.set_state((st["numpy"][0], st["numpy"][1].numpy().astype(np.uint32), *st["numpy"][2:]))
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state(st["cuda"])


class Diverged(RuntimeError):
    """Training produced non-finite gradients or weights it cannot recover from."""


def save_checkpoint(path, model: nn.Module, cfg, step: int, ema: EMA | None = None, opt=None, sched=None):
    """Call on every rank (FSDP2 gathers the shards); rank 0 writes. Plain dicts and tensors only, so the file loads
    with torch.load(weights_only=True). Non-finite weights are refused: a diverged run never overwrites a good file."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)
    full = StateDictOptions(full_state_dict=True, cpu_offload=True)
    state = {"model": get_model_state_dict(model, options=full), "step": step, "kind": cfg.NAME,
             "config": dataclasses.asdict(cfg)}
    if ema is not None:
        state["ema"] = ema.state_dict()
    if opt is not None:
        state["optimizer"] = get_optimizer_state_dict(model, opt, options=full)
    if sched is not None:
        state["scheduler"] = sched.state_dict()
    rngs = [None] * dist.get_world_size() if dist.is_initialized() else None
    if rngs is not None:
        dist.all_gather_object(rngs, _rng_state())
    state["rng"] = rngs or [_rng_state()]
    if is_main():
        bad = [k for part in ("model", "ema") for k, v in state.get(part, {}).items()
               if v.is_floating_point() and not torch.isfinite(v).all()]
        if bad:
            raise Diverged(f"refusing to save non-finite weights ({', '.join(bad[:3])}) to {path}")
        atomic_save(state, path)
    if dist.is_initialized():
        dist.barrier()


def restore_checkpoint(state: dict, model: nn.Module, cfg, ema: EMA | None = None, opt=None, sched=None,
                       what: str = "checkpoint") -> int:
    """Load a training state saved by save_checkpoint (config checked first); returns the step to continue from."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                         set_optimizer_state_dict)
    check_config(state, cfg, what)
    full = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, state["model"], options=full)
    if ema is not None and "ema" in state:
        ema.load_state_dict(state["ema"])
    if opt is not None and "optimizer" in state:
        set_optimizer_state_dict(model, opt, state["optimizer"], options=full)
    if sched is not None and "scheduler" in state:
        sched.load_state_dict(state["scheduler"])
    rank = dist.get_rank() if dist.is_initialized() else 0
    if len(state.get("rng", [])) == (dist.get_world_size() if dist.is_initialized() else 1):
        _set_rng_state(state["rng"][rank])  # exact continuation needs the same world size
    return state["step"]


def load_weights(model: nn.Module, state: dict, ema: bool = True) -> nn.Module:
    """Weights for sampling/eval: the EMA weights when the checkpoint has them."""
    model.load_state_dict(state["model"])
    if ema and "ema" in state:
        model.load_state_dict(state["ema"], strict=False)
    return model


class GracefulStop:
    """SIGTERM/SIGINT set a flag; the training loop saves a checkpoint and exits with 128 + the signal number, the
    status schedulers requeue on (cluster preemption)."""

    def __init__(self):
        self.requested = False
        self.signum = 0
        self._old = {}

    def __enter__(self):
        for s in (signal.SIGTERM, signal.SIGINT):
            self._old[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C means now
        self.requested, self.signum = True, signum
        print0(f"\n{signal.Signals(signum).name}: saving a checkpoint and stopping")

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)


# --- data -------------------------------------------------------------------------------------------------------------


class ArrayDataset(torch.utils.data.Dataset):
    """In-memory (or memory-mapped numpy) arrays indexed along the first axis; a batch is one index op."""

    def __init__(self, *arrays):
        if len({len(a) for a in arrays}) != 1:
            raise ValueError(f"arrays of different lengths: {[len(a) for a in arrays]}")
        self.arrays = arrays

    def __len__(self):
        return len(self.arrays[0])

    def __getitem__(self, idx):
        return tuple(_writable_tensor(a[idx]) if isinstance(a, np.ndarray) else a[idx] for a in self.arrays)


def _writable_tensor(x) -> torch.Tensor:
    """A numpy result as a tensor; a read-only view (a memory-mapped array indexed by an int or a slice) is copied,
    since torch may not share memory it cannot write."""
    x = np.asarray(x)
    return torch.as_tensor(x if x.flags.writeable else x.copy())


def batches(data: torch.utils.data.Dataset, batch_size: int, d: Dist, seed: int = 0, start_step: int = 0,
            num_workers: int = 0, noise: Callable | None = None):
    """Endless per-rank batches. The GLOBAL batch at step s is the same whatever the world size -- a seeded
    permutation per epoch cut into global batches, each rank taking its slice -- so a torchrun run matches a single
    process with the same global batch, and resuming at step s only skips indices, not data.
    (DistributedSampler interleaves ranks instead, which ties the batches to the world size.)
    noise(g, n) -> [tensors of n rows]: per-example noise appended to each batch, drawn for the whole global batch
    from a generator on the training device seeded by (seed, s); each example keeps its own rows wherever it lands,
    so the loss, not only the data, is the same for any number of processes."""
    if batch_size % d.world_size:
        raise ValueError(f"batch_size {batch_size} is not divisible by {d.world_size} ranks")
    if batch_size > len(data):
        raise ValueError(f"batch_size {batch_size} exceeds the {len(data)} examples in the data")
    per_rank, per_epoch = batch_size // d.world_size, len(data) // batch_size
    mine = slice(d.rank * per_rank, (d.rank + 1) * per_rank)
    step = start_step
    while True:
        epoch, first = divmod(step, per_epoch)
        perm = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed * 100003 + epoch))
        # sorted indices (faster for memory-mapped arrays) and their positions in this rank's slice
        parts = [perm[i * batch_size:(i + 1) * batch_size][mine].sort() for i in range(first, per_epoch)]
        loader = (data[p.values.numpy()] for p in parts) if isinstance(data, ArrayDataset) else \
            torch.utils.data.DataLoader(data, batch_sampler=[p.values.tolist() for p in parts],
                                        num_workers=num_workers, pin_memory=d.device.type == "cuda")
        for batch, p in zip(loader, parts):
            if noise is not None:
                g = torch.Generator(d.device).manual_seed(seed * 1_000_003 + step)
                batch = list(batch) + [v[mine][p.indices.to(d.device)] for v in noise(g, batch_size)]
            yield batch
            step += 1


def _need(module: str, why: str):
    import importlib
    try:
        return importlib.import_module(module)
    except ImportError:
        top = module.split(".")[0]
        pip = {"sklearn": "scikit-learn", "PIL": "Pillow"}.get(top, top)
        raise ImportError(f"{why} needs {pip}: pip install {pip}") from None


def cache_dir() -> Path:
    """Where derived files shared by runs go (the digits classifier and VAE): $FLOWZOO_CACHE, else
    ~/.cache/flowzoo -- never the current directory."""
    return Path(os.environ.get("FLOWZOO_CACHE") or Path.home() / ".cache" / "flowzoo")


def load_digits(split: str = "train", size: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's 8x8 digits (1797 images, 10 classes) as uint8 (N, 1, size, size) and int64 labels.

    A fixed stratified 80/20 split. The 17 grey levels (0..16) map to 0..255; size = 8k repeats pixels, so pooling
    recovers the original."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be train or test, got {split!r}")
    datasets = _need("sklearn.datasets", "the digits data")
    x, y = datasets.load_digits(return_X_y=True)
    perm = np.random.default_rng(0).permutation(len(y))
    test = np.zeros(len(y), dtype=bool)
    for c in range(10):  # stratified: 20% of each class
        members = perm[y[perm] == c]
        test[members[: round(0.2 * len(members))]] = True
    keep = test if split == "test" else ~test
    x = torch.tensor(x[keep], dtype=torch.float32).view(-1, 1, 8, 8) / 16.0  # (N, 1, 8, 8) in [0, 1]
    if size != 8:
        x = F.interpolate(x, size=(size, size), mode="nearest")
    return (x * 255).round().clamp(0, 255).to(torch.uint8), torch.tensor(y[keep], dtype=torch.int64)


def mean_se(tot: torch.Tensor) -> tuple[float, float, int]:
    """(sum, sum of squares, count) of per-example values, summed over the ranks here -> (mean, its standard error,
    count)."""
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(tot)
    s1, s2, n = tot.tolist()
    var = max(s2 / n - (s1 / n) ** 2, 0.0) * n / max(n - 1, 1)
    return s1 / n, math.sqrt(var / n), int(n)


def check_heldout(n: int, se: float, metric: str, remedy: str, tol: float = 0.01):
    """One warning line when a held-out metric is too noisy to compare models: its standard error above `tol`."""
    if se > tol:
        print0(f"warning: {metric} on {n} held-out examples has a standard error of {se:.3g}, so differences below "
               f"{2 * se:.2g} are noise; hold out more: {remedy}", file=sys.stderr)


def to_float(x: torch.Tensor) -> torch.Tensor:
    """uint8 images -> float in [-1, 1]."""
    return x.float() / 127.5 - 1


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """float images in [-1, 1] -> uint8."""
    return ((x.float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)


def load_arrays(path: str | Path, keys: tuple[str, ...]) -> dict[str, np.ndarray]:
    """Arrays from an `.npz` (e.g. `images` uint8 (N, H, W, C) and `labels`) or a folder of `.npy` files (memory-mapped,
    for precomputed latents larger than memory)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no data at {path}")
    try:
        if path.is_dir():
            out = {k: np.load(path / f"{k}.npy", mmap_mode="r") for k in keys if (path / f"{k}.npy").exists()}
        else:
            z = np.load(path)
            if not isinstance(z, np.lib.npyio.NpzFile):
                raise ValueError("a single array, not named arrays")
            with z:
                out = {k: z[k] for k in keys if k in z}
    except (ValueError, OSError, EOFError) as e:
        raise ValueError(f"cannot read {path} as an .npz file or a folder of .npy arrays "
                         f"({str(e).splitlines()[0][:120]})") from None
    if keys[0] not in out:
        raise ValueError(f"{path} has no array '{keys[0]}'")
    return out


IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}
GREY_MODES = {"1", "L", "LA", "I", "I;16", "F"}  # PIL modes read as one channel (anything else: RGB)
BUILTIN_DATA = ("digits", "moving-digits")  # --data names that are no path


def _images_in(folder: Path, recursive: bool) -> list[Path]:
    files = folder.rglob("*") if recursive else folder.iterdir()
    return sorted(f for f in files if f.suffix.lower() in IMAGE_EXTS and f.is_file())


class ImageFolder(torch.utils.data.Dataset):
    """root/<class>/*.{png,jpg,...} (one subfolder per class), or a flat root/*.png (one class) -> (uint8 (channels,
    size, size) center-cropped and resized, class index); channels 1 reads the images as grey, 3 as RGB. Needs
    Pillow."""
    EXTS = IMAGE_EXTS

    def __init__(self, root: str | Path, size: int, channels: int = 3):
        root = Path(root)
        if not root.is_dir():
            raise FileNotFoundError(f"no image folder at {root}")
        if channels not in (1, 3):
            raise ValueError(f"an image folder reads 1 (grey) or 3 (RGB) channels, not --channels {channels} ({root})")
        self.classes = sorted(p.name for p in root.iterdir() if p.is_dir())
        self.items = [(f, c) for c, name in enumerate(self.classes) for f in _images_in(root / name, True)]
        if not self.items:  # a flat folder: its images are one class
            self.classes, self.items = [root.name], [(f, 0) for f in _images_in(root, False)]
        if not self.items:
            raise ValueError(f"no images in {root} or its class subfolders ({', '.join(sorted(self.EXTS))})")
        self.size, self.mode = size, "L" if channels == 1 else "RGB"
        _need("PIL", "reading an image folder")
        print0(f"{root}: {len(self.items)} images in {len(self.classes)} class(es), center-cropped and resized to "
               f"{size}x{size}" + (" (grey)" if channels == 1 else ""))

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        from PIL import Image
        f, c = self.items[i]
        img = Image.open(f).convert(self.mode)
        s = min(img.size)
        left, top = (img.width - s) // 2, (img.height - s) // 2
        img = img.crop((left, top, left + s, top + s)).resize((self.size, self.size), Image.BICUBIC)
        a = np.asarray(img).copy()
        return torch.from_numpy(a[..., None] if a.ndim == 2 else a).permute(2, 0, 1), c

    def labels(self) -> np.ndarray:
        """The class index of every image (int64 (N,)), read from the layout, no image opened."""
        return np.array([c for _, c in self.items], dtype=np.int64)


def _npy_shape(f) -> tuple:
    """The shape in an open .npy stream's header (the array itself is not read)."""
    version = np.lib.format.read_magic(f)
    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    return read(f)[0]


def image_shape(path: str | Path) -> tuple[int, int, int] | None:
    """(H, W, C) of the images of --data, peeked without loading them: an .npz's `images` array (its header only;
    (N, H, W, C), or (N, F, H, W, C) videos), a folder's images.npy (memory-mapped), or the first image of an image
    folder (flat or class subfolders; grey modes are 1 channel, the rest RGB, as ImageFolder reads them), or the
    images a latent folder encodes (encode_folder records them). None for a built-in name, a missing path, or a latent
    folder without that record."""
    import zipfile
    path = Path(path)
    if str(path) in BUILTIN_DATA or not path.exists():
        return None
    if path.is_dir():
        if (path / "images.npy").exists():
            shape = np.load(path / "images.npy", mmap_mode="r").shape
        elif any(path.glob("*.npy")):  # precomputed latents: the size of the images they encode, if recorded
            meta = path / "image_shape.json"
            return tuple(json.loads(meta.read_text())) if meta.exists() else None
        else:
            first = next((f for sub in sorted(p for p in path.iterdir() if p.is_dir())
                          for f in _images_in(sub, True)[:1]), None) or next(iter(_images_in(path, False)), None)
            if first is None:
                return None
            Image = _need("PIL.Image", "reading an image folder")
            with Image.open(first) as img:
                return img.height, img.width, 1 if img.mode in GREY_MODES else 3
    else:
        try:
            with zipfile.ZipFile(path) as z, z.open("images.npy") as f:
                shape = _npy_shape(f)
        except (zipfile.BadZipFile, KeyError, OSError, ValueError):
            return None  # not an .npz of images: its loader says what is wrong
    return tuple(int(v) for v in shape[-3:]) if len(shape) >= 4 else None


def fit_to_data(cfg, given=(), source: str | None = None):
    """The config with its image size and channels read from --data (or `source`, the images --precompute encodes) by
    image_shape, except the fields in `given` (the options given on the command line and those of a preset asked for
    by name): `--data my_folder` trains at the folder's size and channels, `--img_size 64` still resizes it. Only a
    config with an `img_size` (or wcfm's `image_size`) field changes; the built-in data, latent folders and anything
    image_shape cannot read are left alone (their loaders check them). A non-square image gives its shorter side (the
    center crop an image folder takes); a tuple img_size (video frames) gets (H, W)."""
    names = {f.name for f in fields(cfg)}
    size_field = next((n for n in ("img_size", "image_size") if n in names), None)
    source = source or (cfg.data if "data" in names else None)
    if size_field is None or not source:
        return cfg
    shape = image_shape(source)
    if shape is None:
        return cfg
    h, w, c = shape
    change = {}
    if size_field not in given:
        change[size_field] = (h, w) if isinstance(getattr(cfg, size_field), tuple) else min(h, w)
    if "channels" in names and "channels" not in given:
        change["channels"] = c
    change = {k: v for k, v in change.items() if getattr(cfg, k) != v}
    if not change:
        return cfg
    print0(f"{source}: {h}x{w} images with {c} channel(s): " +
           " ".join(f"--{k} {','.join(map(str, v)) if isinstance(v, tuple) else v}" for k, v in change.items()) +
           " from the data (give the option to override)")
    return dataclasses.replace(cfg, **change)


def save_npz(path: str | Path, d: Dist, **arrays: np.ndarray):
    """Every rank passes its share; rank 0 writes one file in rank order (parts go through the disk, not through
    a collective, so 50k samples need no more than their size in memory on rank 0)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not d.distributed:
        np.savez(path, **arrays)
        return
    part = path.with_name(f".{path.stem}.rank{d.rank}.npz")
    np.savez(part, **arrays)
    dist.barrier()
    if d.is_main:
        parts = [np.load(path.with_name(f".{path.stem}.rank{r}.npz")) for r in range(d.world_size)]
        np.savez(path, **{k: np.concatenate([p[k] for p in parts]) for k in arrays})
        for r in range(d.world_size):
            path.with_name(f".{path.stem}.rank{r}.npz").unlink()
    dist.barrier()


def save_npy_folder(folder: str | Path, d: Dist, **arrays: np.ndarray):
    """Every rank passes its share; rank 0 writes <folder>/<name>.npy per array in rank order (a latent folder that
    load_arrays memory-maps)."""
    folder = Path(folder)
    save_npz(folder / ".parts.npz", d, **arrays)
    if d.is_main:
        with np.load(folder / ".parts.npz") as z:
            for k in arrays:
                np.save(folder / f"{k}.npy", z[k])
        (folder / ".parts.npz").unlink()
    if d.distributed:
        dist.barrier()


def rank_loader(data, d: Dist, batch_size: int, num_workers: int = 0, n: int | None = None):
    """Batches of this rank's share (rank_split) of the first n (default: all) items of data, in order."""
    start, count = rank_split(len(data) if n is None else n, d)
    return torch.utils.data.DataLoader(torch.utils.data.Subset(data, range(start, start + count)), batch_size,
                                       num_workers=num_workers)


@torch.no_grad()
def encode_folder(folder: str | Path, data, d: Dist, encode: Callable, images: tuple[int, int, int],
                  batch_size: int = 64, num_workers: int = 0) -> list[str]:
    """--precompute's loop: every rank encodes its share of `data`, encode(batch) -> {name: tensor}, and rank 0
    writes <folder>/<name>.npy in row order (save_npy_folder: memory-mapped when training) and the encoded images'
    (H, W, C) to <folder>/image_shape.json, so training on the folder reads the size (image_shape). Returns the
    names of the arrays."""
    parts = [encode(b) for b in progress(rank_loader(data, d, batch_size, num_workers), desc="encoding")]
    if not parts:
        raise ValueError(f"{len(data)} items cannot be shared by {d.world_size} ranks: use fewer processes")
    Path(folder).mkdir(parents=True, exist_ok=True)
    if d.is_main:
        (Path(folder) / "image_shape.json").write_text(json.dumps([int(v) for v in images]))
    save_npy_folder(folder, d, **{k: torch.cat([p[k] for p in parts]).cpu().numpy() for k in parts[0]})
    return list(parts[0])


def gather(t: torch.Tensor, d: Dist) -> torch.Tensor:
    """Every rank's share of a (CPU) tensor, concatenated in rank order, on every rank."""
    if not d.distributed:
        return t
    parts = [None] * d.world_size
    dist.all_gather_object(parts, t.cpu())
    return torch.cat(parts)


# --- images and logs --------------------------------------------------------------------------------------------------


def save_png(path: str | Path, img: np.ndarray):
    """uint8 (H, W) or (H, W, C), C in 1/3/4 -> PNG with zlib only (8-bit, filter 0 per row)."""
    img = np.asarray(img, dtype=np.uint8)
    img = img[..., None] if img.ndim == 2 else img
    h, w, c = img.shape
    color = {1: 0, 3: 2, 4: 6}[c]  # grey, RGB, RGBA

    def chunk(tag, data):
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    raw = b"".join(b"\x00" + img[y].tobytes() for y in range(h))
    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, color, 0, 0, 0)) \
        + chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b"")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_bytes(png)


def image_grid(images: torch.Tensor, nrow: int = 8, pad: int = 1) -> np.ndarray:
    """(N, C, H, W) uint8 or float in [-1, 1] -> one (H', W', C) uint8 image, nrow images per row."""
    x = images if images.dtype == torch.uint8 else to_uint8(images)
    n, c, h, w = x.shape
    rows = math.ceil(n / nrow)
    grid = torch.zeros(c, rows * (h + pad) + pad, nrow * (w + pad) + pad, dtype=torch.uint8)
    for i in range(n):
        r, col = divmod(i, nrow)
        grid[:, pad + r * (h + pad):][:, :h, pad + col * (w + pad):][:, :, :w] = x[i]
    return grid.permute(1, 2, 0).numpy()


def save_grid(path: str | Path, images: torch.Tensor, nrow: int = 10):
    """A PNG grid of (N, C, H, W) images, enlarged (to about 64 pixels) so that tiny digits can be looked at."""
    zoom = max(1, 64 // images.shape[-1])
    images = images.repeat_interleave(zoom, -1).repeat_interleave(zoom, -2)
    save_png(path, image_grid(images, nrow=nrow, pad=2))


def pyplot():
    """matplotlib.pyplot (headless) when it is installed; else None and a one-line note, and the caller writes its
    bare PNG instead (matplotlib is optional: `pip install matplotlib` or the `demo` extra)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        return plt
    except ImportError:
        print0("note: writing a bare figure; pip install matplotlib for the labelled one")
        return None


_LOG_KEYS = {"step", "time", "skipped", "lr", "grad_norm"}  # bookkeeping, not curves of their own


def plot_log(log_path: str | Path, out: str | Path | None = None) -> Path:
    """Training curves of a log.jsonl: the loss (and what the loss function logs), each evaluation metric, and the
    learning rate, against the step; one panel each. Writes out (default: the log's name with .png)."""
    plt = _need("matplotlib.pyplot", "plotting a log")
    log_path = Path(log_path)
    if not log_path.is_file():
        raise FileNotFoundError(f"no log at {log_path}")
    try:
        rows = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]
    except json.JSONDecodeError as e:
        raise ValueError(f"{log_path} is not a JSONL log ({e})") from None
    train = [r for r in rows if "loss" in r]
    series = {}  # name -> (steps, values, from training or evaluation)
    for r in rows:
        for k, v in r.items():
            if k not in _LOG_KEYS and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                series.setdefault(k, ([], [], "loss" in r))[0].append(r["step"])
                series[k][1].append(v)
    if not series:
        raise ValueError(f"{log_path} has no numeric series to plot")
    # an evaluation metric with a single point (a run evaluated once, at the end) is a number, not a curve: those go
    # into one text panel
    once = {k: v[1][0] for k, v in series.items() if not v[2] and len(v[0]) == 1}
    names = sorted((k for k in series if k not in once), key=lambda k: (k != "loss", not series[k][2], k))[:11]
    panels = names + (["lr"] if train and "lr" in train[0] else []) + (["once"] if once else [])
    cols = min(3, len(panels))
    rows_n = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows_n, cols, figsize=(4 * cols, 2.8 * rows_n), squeeze=False)
    for ax, name in zip(axes.flat, panels):
        if name == "once":
            step = series[next(iter(once))][0][0]
            ax.axis("off")
            ax.set_title(f"evaluation at step {step}", fontsize=10)
            ax.text(0, 1, "\n".join(f"{k} = {v:.4g}" for k, v in sorted(once.items())[:14]), va="top",
                    family="monospace", fontsize=9, transform=ax.transAxes)
            continue
        steps, values = ([r["step"] for r in train], [r["lr"] for r in train]) if name == "lr" else series[name][:2]
        ax.plot(steps, values, "-" if len(steps) > 20 else "o-", ms=3)
        ax.set_title(name + ("" if name == "lr" or series[name][2] else " (evaluation)"), fontsize=10)
        ax.set_xlabel("step")
        if name == "loss" and min(values) > 0:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.suptitle(str(log_path), fontsize=9)
    fig.tight_layout()
    out = Path(out) if out else log_path.with_suffix(".png")
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


class JsonlLog:
    """Appends one JSON object per line on rank 0 (a fresh run truncates, a resumed one appends). With `logger`
    ("tensorboard" | "wandb") the same numbers go there too, and `figures` sends the PNGs an evaluation wrote."""

    def __init__(self, path: str | Path, resume: bool = False, logger: str = "none", config=None):
        self.path = Path(path)
        self.sink = None
        if is_main():
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if not resume:
                self.path.write_text("")
            if logger != "none":
                self.sink = (TensorBoardSink if logger == "tensorboard" else WandbSink)(self.path.parent, config, resume)

    def __call__(self, **record):
        if is_main():
            record = {k: (float(v) if isinstance(v, torch.Tensor) else v) for k, v in record.items()}
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
            if self.sink is not None:
                self.sink.scalars(record.get("step", 0), {k: float(v) for k, v in record.items() if k != "step"
                                                          and isinstance(v, (int, float)) and not isinstance(v, bool)})

    def figures(self, step: int, since: float):
        """The PNGs in the run folder written at or after time `since` (an evaluation's sample grid, plots)."""
        if self.sink is not None:
            for png in sorted(self.path.parent.glob("*.png")):
                if png.stat().st_mtime >= since:
                    self.sink.image(step, png.stem, png)

    def close(self):
        if self.sink is not None:
            self.sink.close()


class TensorBoardSink:
    """torch.utils.tensorboard into <out_dir>/tensorboard; images are read back with Pillow (TensorBoard needs it)."""

    def __init__(self, folder: Path, config, resume: bool):
        writer = _need("torch.utils.tensorboard", "--logger tensorboard").SummaryWriter
        self.w = writer(str(folder / "tensorboard"))
        if config is not None and not resume:
            self.w.add_text("config", json.dumps(dataclasses.asdict(config), default=str))

    def scalars(self, step: int, values: dict):
        for k, v in values.items():
            self.w.add_scalar(k, v, step)
        self.w.flush()

    def image(self, step: int, name: str, path: Path):
        img = np.asarray(_need("PIL.Image", "--logger tensorboard's images").open(path).convert("RGB"))
        self.w.add_image(name, img, step, dataformats="HWC")
        self.w.flush()

    def close(self):
        self.w.close()


class WandbSink:
    """Weights & Biases: one run per out_dir (its id kept in <out_dir>/wandb_id, so --resume continues it); the
    project is $WANDB_PROJECT (default flowzoo); WANDB_MODE=offline works without an account or network."""

    def __init__(self, folder: Path, config, resume: bool):
        self.wandb = _need("wandb", "--logger wandb")
        id_file = folder / "wandb_id"
        run_id = id_file.read_text().strip() if resume and id_file.exists() else self.wandb.util.generate_id()
        id_file.write_text(run_id)
        self.run = self.wandb.init(project=os.environ.get("WANDB_PROJECT", "flowzoo"), name=folder.name, id=run_id,
                                   resume="allow", dir=str(folder),
                                   config=dataclasses.asdict(config) if config is not None else None)

    def scalars(self, step: int, values: dict):
        self.run.log(values, step=step)

    def image(self, step: int, name: str, path: Path):
        self.run.log({name: self.wandb.Image(str(path))}, step=step)

    def close(self):
        self.run.finish()


# --- the training loop ------------------------------------------------------------------------------------------------


def make_optimizer(model: nn.Module, cfg: TrainConfig, groups: dict[str, dict] | None = None) -> torch.optim.AdamW:
    """AdamW; weight decay on matrices only (not on biases, norms, or scalars). `groups` gives the parameters whose
    names start with a prefix their own options, e.g. {"denoiser.": {"lr": 1e-4}}: a second optimizer in one.
    Build it after FSDP2 sharding (train() does), which replaces the parameters."""
    named, groups = [(n, p) for n, p in model.named_parameters() if p.requires_grad], groups or {}
    owner = [next((k for k in groups if n.startswith(k)), None) for n, _ in named]
    out = []
    for prefix in (None, *groups):  # the rest at --lr first, then each prefix's parameters with its options
        mine = [p for (_, p), o in zip(named, owner) if o == prefix]
        extra = groups.get(prefix, {})
        out += [{"params": [p for p in mine if p.ndim >= 2], "weight_decay": cfg.weight_decay, **extra},
                {"params": [p for p in mine if p.ndim < 2], "weight_decay": 0.0, **extra}]
    return torch.optim.AdamW([g for g in out if g["params"]], lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                             fused=next(model.parameters()).is_cuda or None)


def lr_lambda(cfg: TrainConfig) -> Callable[[int], float]:
    """Linear warmup, then cosine from --lr to --min_lr at cfg.steps (or constant). A factor of each group's own lr,
    so a group at another lr ends at the same fraction min_lr / lr of it. `--resume --steps N` with a larger N
    stretches the remaining cosine to the new end."""
    floor = cfg.min_lr / cfg.lr if cfg.lr_schedule == "cosine" else 0.0

    def f(step):
        if step < cfg.warmup:
            return floor + (1 - floor) * (step + 1) / cfg.warmup
        if cfg.lr_schedule == "constant":
            return 1.0
        cos = 0.5 * (1 + math.cos(math.pi * min(1.0, (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup))))
        return floor + (1 - floor) * cos
    return f


def check_fresh(out_dir: str | Path, resume: bool, overwrite: bool):
    """A run never clobbers another: an out_dir holding a checkpoint or a log needs --resume or --overwrite."""
    held = [n for n in ("ckpt.pt", "log.jsonl") if (Path(out_dir) / n).exists()]
    if held and not resume and not overwrite:
        raise ValueError(f"{out_dir} already holds a run ({', '.join(held)}): continue it with --resume, replace it "
                         f"with --overwrite, or pick another --out_dir")


def existing(*paths) -> str:
    """The paths that exist, comma-separated: "done" lines name only files that were written."""
    return ", ".join(str(p) for p in paths if Path(p).exists()) or "no files"


def _micro_batches(batch, k: int) -> list:
    """Split each tensor of a batch into k micro-batches along dim 0 (others are repeated)."""
    if k == 1 or not batch:  # (an empty batch: data=None)
        return [batch] * k
    parts = [t.tensor_split(k) if isinstance(t, torch.Tensor) and t.ndim else [t] * k for t in batch]
    return [list(p) for p in zip(*parts)]


def _params_finite(model: nn.Module) -> bool:
    """All weights finite on every rank (under FSDP2 each rank holds other shards)."""
    local = [p.to_local() if hasattr(p, "to_local") else p for p in model.parameters()]
    return all_ranks(torch.isfinite(torch.stack(torch._foreach_norm(local)).sum()))


@dataclass(frozen=True)
class At:
    """Where a loss_fn call sits: the optimizer step (0-based) and the rows of the GLOBAL batch (ranks in order, each
    split into --grad_accum micro-batches) that its micro-batch holds. A model file that makes its own data inside the
    loss (e.g. on-policy rollouts) draws it from these, so any world size and --resume reproduce one process."""
    step: int
    rows: slice


def train(cfg: TrainConfig, model: nn.Module, loss_fn: Callable, data, d: Dist, *, resume: str | None = None,
          overwrite: bool = False, evaluate: Callable | None = None, shard_types: tuple[type, ...] = (Block,),
          optimizer: Callable[[nn.Module], torch.optim.Optimizer] | None = None, max_bad_steps: int = 20):
    """The loop every model file shares.

    loss_fn(net, batch, at) -> (loss, {name: value}) is called with the wrapped network (DDP / FSDP2 / compiled) on
    each of cfg.grad_accum micro-batches (every tensor of the batch split along dim 0; the loss must be a mean over the
    examples, so the weighted micro-losses add up to the full batch's) and `at` (`At`: the step, the rows). data is a
    Dataset, a function start_step -> iterator of this rank's batches, or None (the loss makes its own examples: each
    batch is empty and `at.rows` says which of cfg.batch_size it stands for). evaluate(step, model, ema) ->
    {name: value} runs on every rank every cfg.eval_every steps and at the end; its numbers are printed and logged.
    `shard_types` are the modules FSDP2 shards one by one. optimizer(model) builds the optimizer (default:
    make_optimizer) after DDP / FSDP2 wrapping, since FSDP2 replaces the parameters. Steps with a non-finite gradient
    are skipped and never reach a checkpoint, non-finite weights stop the run; SIGTERM/SIGINT save and exit with
    128 + the signal. Returns (model, ema); `model` is the unwrapped module.
    """
    out = Path(cfg.out_dir)
    ckpt_path = out / "ckpt.pt"
    check_fresh(out, bool(resume), overwrite)
    if d.distributed:  # every rank has looked before rank 0 writes the log (FSDP2's wrap is no collective to wait on)
        torch.distributed.barrier()
    if cfg.warmup >= cfg.steps:
        print0(f"warning: --warmup {cfg.warmup} is not shorter than --steps {cfg.steps}: the learning rate never "
               f"reaches --lr {cfg.lr:g}", file=sys.stderr)
    model.to(d.device)
    net = wrap_model(model, d, cfg.fsdp, shard_types, bf16=cfg.amp)
    ema = EMA(model, cfg.ema_decay)
    opt = (optimizer or (lambda m: make_optimizer(m, cfg)))(model)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg))
    step = 0
    if resume:
        step = restore_checkpoint(load_checkpoint(resume), model, cfg, ema, opt, sched, what=resume)
        print0(f"resumed from {resume} at step {step}")
    else:
        seed_all(cfg.seed + 1 + d.rank)  # per-rank noise; the model was built under the same seed on every rank
    no_sync = getattr(net, "no_sync", None) or (lambda: _fsdp_no_sync(model))  # DDP | FSDP2 (| one process)
    if cfg.compile:
        net = torch.compile(net)
    if isinstance(data, torch.utils.data.Dataset):
        data = batches(data, cfg.batch_size, d, cfg.seed, step, cfg.num_workers)
    elif callable(data):  # a batch generator that knows how to start at a step (e.g. synthetic data)
        data = data(step)
    elif data is None:
        data = itertools.repeat([])
    first_row, n_rows = rank_split(cfg.batch_size, d)
    log = JsonlLog(out / "log.jsonl", resume=bool(resume), logger=cfg.logger, config=cfg)
    amp = torch.autocast("cuda", dtype=torch.bfloat16, enabled=cfg.amp and d.device.type == "cuda" and not cfg.fsdp)

    def every(n, done):  # 0 = off (only at the end)
        return done == cfg.steps or (n > 0 and done % n == 0)

    def diverged(msg):
        good = f"the last good checkpoint is {ckpt_path}" if ckpt_path.exists() else "no checkpoint was written"
        return Diverged(f"{msg}; {good} (try a lower --lr)")

    sums, n_sums, bad, t0 = {}, 0, 0, time.time()
    with GracefulStop() as stop, contextlib.closing(log):
        first_step = step
        bar = progress(range(step, cfg.steps), initial=step, total=cfg.steps)
        for step in bar:
            batch = [t.to(d.device, non_blocking=True) if isinstance(t, torch.Tensor) else t for t in next(data)]
            micro = _micro_batches(batch, cfg.grad_accum)
            sizes = [_batch_len(m) for m in micro] if batch else \
                [len(r) for r in torch.arange(n_rows).tensor_split(cfg.grad_accum)]
            loss, logs, row = 0.0, {}, first_row
            for k, mb in enumerate(micro):
                weight = sizes[k] / sum(sizes)  # mean over the batch = weighted mean of the micro-batch means
                at, row = At(step, slice(row, row + sizes[k])), row + sizes[k]
                with (no_sync() if k < len(micro) - 1 else contextlib.nullcontext()), amp:
                    micro_loss, micro_logs = loss_fn(net, mb, at)
                (micro_loss * weight).backward()
                loss = loss + micro_loss.detach() * weight
                logs = {n: logs.get(n, 0.0) + torch.as_tensor(v, dtype=torch.float32).detach() * weight
                        for n, v in micro_logs.items()}
            gnorm = _full(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip or float("inf")))
            if cfg.grad_clip_value:  # after the norm, so a non-finite gradient is still seen as one
                for p in model.parameters():
                    if p.grad is not None:
                        p.grad.clamp_(-cfg.grad_clip_value, cfg.grad_clip_value)
            flags = torch.stack([(~torch.isfinite(gnorm)).float(),
                                 torch.tensor(float(stop.requested), device=gnorm.device)])
            if d.distributed:  # every rank must agree on skipping a step and on stopping
                dist.all_reduce(flags, op=dist.ReduceOp.MAX)
            nonfinite, stopping = flags.tolist()  # the one host sync per step (two when the step is taken)
            if not nonfinite:
                try:
                    opt.step()
                except RuntimeError as e:  # e.g. Adam's lr / bias correction overflows a float
                    if "overflow" not in str(e):
                        raise
                    raise diverged(f"the optimizer step overflowed at step {step + 1}") from None
                sched.step()
                if not _params_finite(model):  # finite gradients, infinite weights: e.g. a huge --lr
                    raise diverged(f"the weights became non-finite at step {step + 1}")
                ema.update(model, step)
                bad = 0
            else:
                bad += 1
                if bad >= max_bad_steps:
                    raise diverged(f"{bad} non-finite gradients in a row at step {step + 1}")
            opt.zero_grad(set_to_none=True)
            for k, v in {"loss": loss, "grad_norm": gnorm.detach(), **logs}.items():
                sums[k] = sums.get(k, 0.0) + torch.as_tensor(v, dtype=torch.float32, device=d.device).detach()
            n_sums += 1
            done = step + 1
            if every(cfg.log_every, done) and cfg.log_every:
                means = {k: all_reduce_mean(v / n_sums).item() for k, v in sums.items()}
                log(step=done, lr=sched.get_last_lr()[0], time=round(time.time() - t0, 2), skipped=bad, **means)
                bar.set_postfix({k: f"{v:.4g}" for k, v in list(means.items())[:3]})
                sums, n_sums = {}, 0
            if evaluate is not None and every(cfg.eval_every, done):
                t_eval = time.time() - 1  # file times can be a second coarse
                res = evaluate(done, model, ema)
                print0(f"step {done}: " + ", ".join(f"{k} {v:.4g}" for k, v in res.items()
                                                    if isinstance(v, (int, float))))
                log(step=done, **res)
                log.figures(done, since=t_eval)
            stopping = stopping or (cfg.stop_after > 0 and done - first_step >= cfg.stop_after)
            if every(cfg.ckpt_every, done) or stopping:
                save_checkpoint(ckpt_path, model, cfg, done, ema, opt, sched)
            if stopping:
                print0(f"stopped at step {done} with {ckpt_path}; continue with --resume")
                if stop.requested:
                    raise SystemExit(128 + stop.signum)
                break
    return model, ema


def _batch_len(batch) -> int:
    return next((len(t) for t in batch if isinstance(t, torch.Tensor) and t.ndim), 1)


@contextlib.contextmanager
def _fsdp_no_sync(model: nn.Module):
    """FSDP2: accumulate gradients locally until the last micro-batch (a no-op for a plain module)."""
    setter = getattr(model, "set_requires_gradient_sync", None)
    if setter is not None:
        setter(False)
    try:
        yield
    finally:
        if setter is not None:
            setter(True)


@dataclass
class Job:
    """A training run as a model file's `prepare` hook describes it to `cli`, which hands it to `train`."""
    cfg: TrainConfig  # the run's config (e.g. with the architecture of --init_from's weights)
    model: nn.Module
    loss_fn: Callable
    data: object
    evaluate: Callable | None = None
    optimizer: Callable | None = None
    shard_types: tuple[type, ...] = (Block,)
    outputs: tuple[str, ...] = ("samples.png",)  # the figures it writes to out_dir, named in the "done" line


def cli(argv, cls, presets: dict, doc: str, *, dry_run: Callable, load: Callable, sample: Callable,
        evaluate: Callable | None, prepare: Callable, options: Callable | None = None, modes: dict | None = None,
        configure: Callable | None = None, digits: int = 4):
    """The run modes of every model file, dispatched once: --plot, --dry_run, the file's own `modes`
    ({option: fn(cfg, args, overrides, d)}, e.g. --precompute; checked first, so a file may take over --eval),
    --sample / --eval of --ckpt, else training. What is the file's:
        load(ckpt, overrides, args, d) -> (model, cfg)        a checkpoint (ours or an official one) ready to use
        sample(model, cfg, args, d, start, count) -> (arrays, note)   this rank's samples start .. start + count - 1;
            `images` (N, H, W, C) uint8 also go to a PNG grid beside --out
        evaluate(model, cfg, args, d) -> {metric: value}     printed as one JSON line
        prepare(cfg, args, overrides, d) -> Job, or None when the file ran its training itself
    options(parser) adds the file's own options; configure(cfg, args, overrides) -> (cfg, overrides) applies them."""
    cfg, args, overrides = parse_config(cls, presets, argv, extra=options, doc=doc)
    if configure is not None:
        cfg, overrides = configure(cfg, args, overrides)
    if args.plot:
        return print0(f"wrote {plot_log(args.plot)}")
    if args.dry_run:
        return print0(json.dumps(dry_run(cfg, args.gpus)))
    d = setup_distributed(cfg.device)
    for name, fn in (modes or {}).items():
        if getattr(args, name):
            return fn(cfg, args, overrides, d)
    ckpt = args.ckpt or str(Path(cfg.out_dir) / "ckpt.pt")
    if args.sample or args.eval:
        model, cfg = load(ckpt, overrides, args, d)
        if args.eval:
            res = evaluate(model, cfg, args, d)
            return print0(json.dumps({k: round(v, digits) if isinstance(v, float) else v for k, v in res.items()}))
        start, count = rank_split(args.n, d)
        arrays, note = sample(model, cfg, args, d, start, count)
        save_npz(args.out, d, **arrays)
        wrote, images = f"wrote {args.n} samples to {args.out}", arrays.get("images")
        if images is not None and images.ndim == 4:  # and a look at the first ones
            grid = Path(args.out).with_suffix(".png")
            if d.is_main:
                save_grid(grid, torch.from_numpy(images[:100]).permute(0, 3, 1, 2))
            wrote += f" and a grid to {grid}"
        return print0(wrote + (f" ({note})" if note else ""))
    seed_all(cfg.seed)  # the same initial weights on every rank
    t0, job = time.time(), prepare(cfg, args, overrides, d)
    if job is not None:
        cfg = job.cfg
        train(cfg, job.model, job.loss_fn, job.data, d, resume=ckpt if args.resume else None,
              overwrite=args.overwrite, evaluate=job.evaluate, shard_types=job.shard_types, optimizer=job.optimizer)
        out = Path(cfg.out_dir)
        print0(f"done in {time.time() - t0:.0f}s: " + existing(out / "ckpt.pt", *(out / f for f in job.outputs),
                                                               out / "log.jsonl"))


def run(main: Callable):
    """Entry point of a model file: a failure a user can fix (bad option, file, data, divergence) prints as one line
    and exits 2; set FLOWZOO_DEBUG=1 for the traceback."""
    try:
        main()
    except (ValueError, OSError, ImportError, Diverged) as e:
        if os.environ.get("FLOWZOO_DEBUG"):
            raise
        msg = " ".join(str(e).split()) or type(e).__name__  # one line, cut to a readable length
        print(f"error: {msg[:500]}{' ...' if len(msg) > 500 else ''}", file=sys.stderr)
        sys.exit(2)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


# --- paper scale on the meta device ----------------------------------------------------------------------------------


class _FusedAttention(torch.autograd.Function):
    """The dry run's F.scaled_dot_product_attention: the output's shape, and for the backward what a fused kernel
    (FlashAttention, cuDNN) keeps -- q, k, v, the output and the rows' log-sum-exp -- not the (L, L) weights that the
    math path saves."""

    @staticmethod
    def forward(ctx, q, k, v):  # (B, H, L, D): the output is laid out (B, L, H, D), as the kernels write it
        out = q.new_empty(q.shape[0], q.shape[2], q.shape[1], v.shape[-1]).transpose(1, 2)
        ctx.save_for_backward(q, k, v, out, q.new_empty(q.shape[:-1], dtype=torch.float32))
        return out

    @staticmethod
    def backward(ctx, g):
        q, k, v, _, _ = ctx.saved_tensors
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


@contextlib.contextmanager
def record_attention(calls: list, fused: bool = False):
    """Record every F.scaled_dot_product_attention call as dict(q=shape, k=shape, mask=shape | None, mask_bytes,
    causal); with `fused`, compute it as _FusedAttention (shapes and saved memory only: for the meta device)."""
    sdpa = F.scaled_dot_product_attention

    def recorded(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, **kw):
        m = attn_mask
        calls.append(dict(q=tuple(q.shape), k=tuple(k.shape), causal=bool(is_causal),
                          mask=None if m is None else tuple(m.shape),
                          mask_bytes=0 if m is None else m.numel() * m.element_size()))
        return _FusedAttention.apply(q, k, v) if fused else sdpa(q, k, v, attn_mask, dropout_p, is_causal, **kw)

    F.scaled_dot_product_attention = recorded
    try:
        yield calls
    finally:
        F.scaled_dot_product_attention = sdpa


def as_fsdp_bf16(model: nn.Module) -> nn.Module:
    """What FSDP2's MixedPrecisionPolicy(param_dtype=bf16) does to a model's forward, in one process and on any
    device: bf16 parameters, autocast off, and the root's floating-point inputs cast to bf16 (cast_forward_inputs)."""
    def cast(module, args, kwargs):  # into nested lists and dicts too, as FSDP2 does
        return torch.utils._pytree.tree_map_only(torch.Tensor, lambda a: a.bfloat16() if a.is_floating_point() else a,
                                                 (args, kwargs))
    model.to(torch.bfloat16).register_forward_pre_hook(cast, with_kwargs=True)
    return model


def dense_masks(calls: list) -> list:
    """The recorded attention calls that carry an (L_q, L_k) mask for L_q > 1: a mask a fused kernel must read from
    memory (FlashAttention takes none), where a causal flag, no mask, or a block mask would do."""
    return [c for c in calls if c["mask"] is not None and c["mask"][-2] > 1]


def activation_bytes(model: nn.Module, forward: Callable, block_types: tuple[type, ...], calls: list | None = None) -> dict:
    """What a training forward keeps for its backward, counted on whatever device it runs (meta: shapes only):
    the storages autograd saves, each once, parameters excluded. With gradient checkpointing of every `block_types`
    module, a block keeps only its inputs, and the backward holds one block's activations at a time, so
    ckpt = all - sum(blocks) + sum(block inputs) + max(block). Attention counts as a fused kernel keeps it (its
    calls are recorded into `calls`)."""
    params = {p.untyped_storage()._cdata for p in model.parameters()}
    seen, total, per_block, inputs, stack = set(), [0], [], [0], []

    def pack(t):
        st = t.untyped_storage()
        if st._cdata not in params and st._cdata not in seen:
            seen.add(st._cdata)
            total[0] += st.nbytes()
            if stack:
                per_block[stack[0]] += st.nbytes()
        return t

    def pre(module, args):
        if not stack:
            per_block.append(0)
            inputs[0] += sum(a.numel() * a.element_size() for a in args if isinstance(a, torch.Tensor))
        stack.append(len(per_block) - 1)

    def post(module, args, out):
        stack.pop()

    hooks = [h for m in model.modules() if isinstance(m, block_types)
             for h in (m.register_forward_pre_hook(pre), m.register_forward_hook(post))]
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), record_attention(
                [] if calls is None else calls, fused=True):
            forward()
    finally:
        for h in hooks:
            h.remove()
    ckpt = total[0] - sum(per_block) + inputs[0] + max(per_block, default=0)
    return dict(all=total[0], grad_ckpt=ckpt)


def dry_run(cfg: TrainConfig, build: Callable[[], nn.Module], loss: Callable[[nn.Module, int], torch.Tensor], *,
            tokens: int, gpus: int, block_types: tuple[type, ...], sample_bytes: Callable[[nn.Module], dict] | None
            = None, parts: dict[str, str] | None = None) -> dict:
    """A paper-scale config sized without allocating it: build() on the meta device, cast to bf16 as FSDP2's
    MixedPrecisionPolicy(param_dtype=bf16) runs it, and one training step, loss(model, micro_batch) and its
    backward, on shapes alone (so it also proves the step reads no value on the host). Per GPU, for `gpus` GPUs
    under FSDP2: fp32 weights, fp32 gradients and AdamW's two fp32 states, all
    sharded (16 bytes / parameter / gpus); the bf16 weights of the largest sharded block gathered twice (the current
    one and the prefetched next); the activations of a micro-batch (batch_size / gpus / grad_accum) as a fused
    attention kernel keeps them, with and without gradient checkpointing of the blocks; and, from
    sample_bytes(model), the sampler's caches or states. Every attention call is recorded: a dense (L, L) mask is
    listed with its size. `parts` names parameter-name prefixes to count apart, the first match taking a parameter
    (default: the top-level modules; "other" for the rest)."""
    with torch.device("meta"):
        model = as_fsdp_bf16(build())
    named = list(model.named_parameters())
    n_params = sum(p.numel() for _, p in named)
    parts = parts or {n: n for n, _ in model.named_children()}
    by_part = {}
    for n, p in named:  # each parameter to the first part whose prefix it has
        part = next((k for k, pre in parts.items() if n.startswith(pre + ".") or n == pre), "other")
        by_part[part] = by_part.get(part, 0) + p.numel()
    micro = max(1, cfg.batch_size // (gpus * cfg.grad_accum))
    calls = []
    held = {}
    with torch.device("meta"):  # the loss's own inputs (torch.randn and the like) are shapes too
        act = activation_bytes(model, lambda: held.setdefault("loss", loss(model, micro)), block_types, calls)
        with record_attention([], fused=True):  # (recomputed checkpoints call attention again)
            held["loss"].backward()  # the whole step on shapes alone: no value is read on the host, no dtype mismatch
    block = max((sum(p.numel() for p in m.parameters()) for m in model.modules() if isinstance(m, block_types)),
                default=0)
    gib = 2.0 ** 30
    states = 16 * n_params / gpus
    gathered = 2 * 2 * block
    train = dict(weights_grads_adam=states / gib, gathered_bf16=gathered / gib, activations=act["all"] / gib,
                 activations_grad_ckpt=act["grad_ckpt"] / gib, total=(states + gathered + act["all"]) / gib,
                 total_grad_ckpt=(states + gathered + act["grad_ckpt"]) / gib)
    dense = dense_masks(calls)
    out = dict(params=n_params, params_by_part=by_part, tokens_per_example=tokens, gpus=gpus, batch_size=cfg.batch_size,
               micro_batch=micro, train_gib_per_gpu={k: float(f"{v:.4g}") for k, v in train.items()},
               attention_calls=len(calls), dense_masks=len(dense),
               dense_mask_gib=float(f"{sum(c['mask_bytes'] for c in dense) / gib:.4g}"))
    if sample_bytes is not None:
        out["sample_gib"] = {k: float(f"{v / gib:.4g}") for k, v in sample_bytes(model).items()}
    return out


# --- digits metric ----------------------------------------------------------------------------------------------------


class DigitsClassifier(nn.Module):
    """Small MLP on 8x8 digits; its 64-d penultimate features stand in for Inception features."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Flatten(), nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 64), nn.GELU())
        self.head = nn.Linear(64, 10)

    def forward(self, x):  # uint8 (B, 1, H, W) at any size -> (logits (B, 10), features (B, 64))
        x = x.float() / 255.0
        if x.shape[-1] != 8:
            x = F.adaptive_avg_pool2d(x, 8)
        h = self.features(x)
        return self.head(h), h


def digits_classifier(cache: str | Path | None = None) -> DigitsClassifier:
    """Trained once (seconds, deterministic) on the digits train split, then cached (default: cache_dir())."""
    clf = DigitsClassifier()
    cache = Path(cache or cache_dir() / "digits_classifier.pt")
    if cache.is_file():
        try:
            clf.load_state_dict(torch.load(cache, map_location="cpu", weights_only=True))
            return clf.eval()
        except Exception:
            pass  # a stale or torn cache: retrain
    x, y = load_digits("train")
    g = torch.Generator().manual_seed(0)
    with torch.random.fork_rng(), torch.enable_grad():
        torch.manual_seed(0)
        clf = DigitsClassifier()
        opt = torch.optim.AdamW(clf.parameters(), lr=3e-3, weight_decay=1e-2)
        for _ in range(1000):
            i = torch.randint(len(x), (256,), generator=g)
            xi = x[i].float()  # light augmentation: random 1-pixel shifts, so features are not brittle
            xi = torch.roll(xi, shifts=tuple(torch.randint(-1, 2, (2,), generator=g).tolist()), dims=(2, 3))
            loss = F.cross_entropy(clf(xi.to(torch.uint8))[0], y[i])
            opt.zero_grad()
            loss.backward()
            opt.step()
    if is_main():
        atomic_save(clf.state_dict(), cache)
    return clf.eval()


def moments(f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Features (N, D) -> their mean (D,) and unbiased covariance (D, D), in float64."""
    f = torch.as_tensor(f).double()
    return f.mean(0), torch.cov(f.T)


def frechet_from_moments(mu1, s1, mu2, s2) -> float:
    """||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^1/2), with the trace of the root from the symmetric S1^1/2 S2 S1^1/2."""
    mu1, s1, mu2, s2 = (torch.as_tensor(np.asarray(a), dtype=torch.float64) for a in (mu1, s1, mu2, s2))
    e, v = torch.linalg.eigh(s1)
    r1 = (v * e.clamp(min=0).sqrt()) @ v.T
    cross = torch.linalg.eigvalsh(r1 @ s2 @ r1).clamp(min=0).sqrt().sum()
    return float((mu1 - mu2).square().sum() + s1.trace() + s2.trace() - 2 * cross)


def frechet_distance(f1: torch.Tensor, f2: torch.Tensor) -> float:
    """The Frechet distance of two feature sets (N, D), each summarised by its mean and covariance."""
    return frechet_from_moments(*moments(f1), *moments(f2))


@torch.no_grad()
def digits_metrics(images: torch.Tensor, labels: torch.Tensor | None = None,
                   cache: str | Path | None = None) -> dict:
    """Sample quality on digits: classifier accuracy of class-conditional samples (if labels are given) and the
    Frechet distance of classifier features to the test split; `fd_floor` is real-train vs test, the best reachable."""
    clf = digits_classifier(cache)
    x_test, _ = load_digits("test")
    x_train, _ = load_digits("train")
    images = images if images.dtype == torch.uint8 else to_uint8(images)
    logits, feats = clf(images.cpu())
    out = {"fd": frechet_distance(feats, clf(x_test)[1]), "fd_floor": frechet_distance(clf(x_train)[1], clf(x_test)[1])}
    if labels is not None:
        out["accuracy"] = (logits.argmax(1) == labels.cpu()).float().mean().item()
    return out


# --- Inception FID ----------------------------------------------------------------------------------------------------
# The standard FID (Heusel et al. 2017): the Frechet distance above, on the 2048-d pool features of the TensorFlow
# InceptionV3 graph of 2015-12-05 that the original FID code (bioinf-jku/TTUR) used and that pytorch-fid, torch-fidelity
# and clean-fid port. The network is written out here because those packages import torchvision, which cannot be
# installed beside every torch build (CPU torch with PyPI's torchvision fails); tests/test_fid.py checks it against
# torch-fidelity 0.4.0, whose preprocessing (TF1's bilinear resize to 299 of uint8 images) it follows. Its weights are a
# file the user has (nothing downloads): pytorch-fid's pt_inception-2015-12-05-6726825d.pth or torch-fidelity's
# weights-inception-2015-12-05-6726825d.pth, both a state dict with torchvision's Inception3 key names.

FID_WEIGHTS_HINT = ("a local copy of pt_inception-2015-12-05-6726825d.pth (from https://github.com/"
                    "mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth) "
                    "or torch-fidelity's weights-inception-2015-12-05-6726825d.pth")


class _FIDConv(nn.Module):
    """conv (no bias) -> BatchNorm (eps 1e-3) -> ReLU, with torchvision's BasicConv2d key names."""

    def __init__(self, cin, cout, k, stride=1, pad=0):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, stride, pad, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=1e-3)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


class _FIDMixed(nn.Module):
    """One Inception block: branches concatenated along channels. A branch is a chain of steps: a conv (name, cin, cout,
    kernel, stride, pad), a list of convs run side by side and concatenated, or a 3x3 pool ("avg", "max", "max/2")."""

    def __init__(self, *branches):
        super().__init__()
        self.branches = []
        for chain in branches:
            steps = []
            for step in chain:
                if not isinstance(step, str):
                    for name, *args in (step if isinstance(step, list) else [step]):
                        self.add_module(name, _FIDConv(*args))
                    step = [s[0] for s in step] if isinstance(step, list) else step[0]
                steps.append(step)
            self.branches.append(steps)

    def forward(self, x):
        out = []
        for chain in self.branches:
            h = x
            for step in chain:
                if step == "avg":  # TF's average pool leaves the zero padding out of the mean
                    h = F.avg_pool2d(h, 3, 1, 1, count_include_pad=False)
                elif step in ("max", "max/2"):
                    h = F.max_pool2d(h, 3, 1, 1) if step == "max" else F.max_pool2d(h, 3, 2)
                elif isinstance(step, list):
                    h = torch.cat([getattr(self, s)(h) for s in step], 1)
                else:
                    h = getattr(self, step)(h)
            out.append(h)
        return torch.cat(out, 1)


def _fid_block(kind: str, cin: int, c: int = 0) -> _FIDMixed:
    """Mixed_5b-d ("a", c = pool width), 6a ("b"), 6b-e ("c", c = 7x7 width), 7a ("d"), 7b-c ("e"/"e_max": the FID
    graph's last block max-pools where the paper average-pools)."""
    b = "branch"
    if kind == "a":
        return _FIDMixed([(f"{b}1x1", cin, 64, 1)], [(f"{b}5x5_1", cin, 48, 1), (f"{b}5x5_2", 48, 64, 5, 1, 2)],
                         [(f"{b}3x3dbl_1", cin, 64, 1), (f"{b}3x3dbl_2", 64, 96, 3, 1, 1),
                          (f"{b}3x3dbl_3", 96, 96, 3, 1, 1)], ["avg", (f"{b}_pool", cin, c, 1)])
    if kind == "b":
        return _FIDMixed([(f"{b}3x3", cin, 384, 3, 2)],
                         [(f"{b}3x3dbl_1", cin, 64, 1), (f"{b}3x3dbl_2", 64, 96, 3, 1, 1),
                          (f"{b}3x3dbl_3", 96, 96, 3, 2)], ["max/2"])
    row, col = ((1, 7), 1, (0, 3)), ((7, 1), 1, (3, 0))  # 1x7 and 7x1 kernels, stride, padding
    if kind == "c":
        return _FIDMixed([(f"{b}1x1", cin, 192, 1)],
                         [(f"{b}7x7_1", cin, c, 1), (f"{b}7x7_2", c, c, *row), (f"{b}7x7_3", c, 192, *col)],
                         [(f"{b}7x7dbl_1", cin, c, 1), (f"{b}7x7dbl_2", c, c, *col), (f"{b}7x7dbl_3", c, c, *row),
                          (f"{b}7x7dbl_4", c, c, *col), (f"{b}7x7dbl_5", c, 192, *row)],
                         ["avg", (f"{b}_pool", cin, 192, 1)])
    if kind == "d":
        return _FIDMixed([(f"{b}3x3_1", cin, 192, 1), (f"{b}3x3_2", 192, 320, 3, 2)],
                         [(f"{b}7x7x3_1", cin, 192, 1), (f"{b}7x7x3_2", 192, 192, *row),
                          (f"{b}7x7x3_3", 192, 192, *col), (f"{b}7x7x3_4", 192, 192, 3, 2)], ["max/2"])

    def split(name):  # 1x3 and 3x1 side by side
        return [(name + "a", 384, 384, (1, 3), 1, (0, 1)), (name + "b", 384, 384, (3, 1), 1, (1, 0))]
    return _FIDMixed([(f"{b}1x1", cin, 320, 1)], [(f"{b}3x3_1", cin, 384, 1), split(f"{b}3x3_2")],
                     [(f"{b}3x3dbl_1", cin, 448, 1), (f"{b}3x3dbl_2", 448, 384, 3, 1, 1), split(f"{b}3x3dbl_3")],
                     ["max" if kind == "e_max" else "avg", (f"{b}_pool", cin, 192, 1)])


def _resize_tf1(x: torch.Tensor, size: int) -> torch.Tensor:
    """TF1's ResizeBilinear (align_corners=False, no half-pixel centres), which the FID graph applies: output pixel i
    reads input coordinate i * in/out, interpolated a + (b - a) * t along the width, then along the height."""
    for dim in (3, 2):
        n = x.shape[dim]
        pos = torch.arange(size, device=x.device, dtype=torch.float32) * (n / size)
        lo = pos.floor().long()
        t = (pos - lo).to(x.dtype).view(-1, *[1] * (3 - dim))
        a, b = x.index_select(dim, lo), x.index_select(dim, (lo + 1).clamp(max=n - 1))
        x = a + (b - a) * t
    return x


class FIDInception(nn.Module):
    """The FID InceptionV3: uint8 images (B, 3, H, W) at any size -> pool features (B, 2048), in float32."""

    def __init__(self):
        super().__init__()
        stem = dict(Conv2d_1a_3x3=(3, 32, 3, 2), Conv2d_2a_3x3=(32, 32, 3), Conv2d_2b_3x3=(32, 64, 3, 1, 1),
                    Conv2d_3b_1x1=(64, 80, 1), Conv2d_4a_3x3=(80, 192, 3))
        for name, args in stem.items():
            self.add_module(name, _FIDConv(*args))
        blocks = dict(Mixed_5b=("a", 192, 32), Mixed_5c=("a", 256, 64), Mixed_5d=("a", 288, 64), Mixed_6a=("b", 288),
                      Mixed_6b=("c", 768, 128), Mixed_6c=("c", 768, 160), Mixed_6d=("c", 768, 160),
                      Mixed_6e=("c", 768, 192), Mixed_7a=("d", 768), Mixed_7b=("e", 1280), Mixed_7c=("e_max", 2048))
        for name, args in blocks.items():
            self.add_module(name, _fid_block(*args))
        self.fc = nn.Linear(2048, 1008)  # the graph's logits: unused by FID, kept so the released file loads exactly

    def forward(self, x):
        x = (_resize_tf1(x.float(), 299) - 128) / 128  # (B, 3, 299, 299) in [-1, 1)
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(F.max_pool2d(x, 3, 2))), 3, 2)  # (B, 192, 35, 35)
        for name in ("5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e", "7a", "7b", "7c"):
            x = getattr(self, f"Mixed_{name}")(x)
        return x.mean((2, 3))  # (B, 2048)


_FID_NET: dict = {}  # the last network loaded: (weights, mtime, device) -> (FIDInception, sha256 of the file)


def fid_inception(weights: str, device="cpu") -> tuple[FIDInception, str]:
    """The FID Inception with the weights in `weights` (a torch state dict; see above), and the first 8 hex digits of
    the file's sha256 ("6726825d" for the released one). One line says what to pass when the file is missing."""
    if not weights or not Path(weights).is_file():
        raise ValueError(f"no file at --fid_weights {weights}: it takes {FID_WEIGHTS_HINT}" if weights else
                         f"the Inception FID needs --fid_weights, {FID_WEIGHTS_HINT}")
    key = (str(Path(weights).resolve()), Path(weights).stat().st_mtime_ns, str(device))
    if key not in _FID_NET:
        try:
            sd = torch.load(weights, map_location="cpu", weights_only=True)
            if not isinstance(sd, dict):
                raise ValueError(f"a {type(sd).__name__}, not a state dict")
        except Exception as e:  # a TorchScript archive (clean-fid's inception-2015-12-05.pt), a torn download, ...
            raise ValueError(f"cannot read Inception weights from {weights}: {type(e).__name__}: "
                             f"{str(e).splitlines()[0][:150] if str(e) else ''}") from None
        net = FIDInception()
        sd = {**{k: v for k, v in net.state_dict().items() if k.endswith("num_batches_tracked")}, **sd}
        _load_exact(net, sd, f"the Inception weights in {weights}")
        sha = hashlib.sha256(Path(weights).read_bytes()).hexdigest()[:8]
        _FID_NET.clear()
        _FID_NET[key] = net.requires_grad_(False).eval().to(device), sha
    return _FID_NET[key]


def _nchw_uint8(images) -> torch.Tensor:
    """uint8 or [-1, 1] float images, (N, C, H, W) or (N, H, W, C) with C = 1 or 3 -> uint8 (N, C, H, W)."""
    x = torch.as_tensor(np.asarray(images)) if not isinstance(images, torch.Tensor) else images
    if x.dim() == 4 and x.shape[1] not in (1, 3) and x.shape[-1] in (1, 3):
        x = x.permute(0, 3, 1, 2)
    if x.dim() != 4 or x.shape[1] not in (1, 3) or not len(x):
        raise ValueError(f"FID images must be (N, C, H, W) or (N, H, W, C) with C = 1 or 3, got {tuple(x.shape)}")
    return x if x.dtype == torch.uint8 else to_uint8(x)


@torch.no_grad()
def fid_features(images, weights: str, device="cpu", batch_size: int = 50) -> torch.Tensor:
    """Inception pool features (N, 2048), float32 on the CPU, of images as `_nchw_uint8` takes them (grey repeated to
    RGB), or of an iterable of such batches. In float32 even inside autocast."""
    net, _ = fid_inception(weights, device)
    device = torch.device(device)
    if isinstance(images, (torch.Tensor, np.ndarray)):
        images = _nchw_uint8(images).split(batch_size)
    out = []
    with torch.autocast(device.type, enabled=False):
        for x in images:
            x = _nchw_uint8(x).to(device)
            out.append(net(x.expand(-1, 3, -1, -1)).float().cpu())
    return torch.cat(out)


def _image_batches(path: Path, batch_size: int):
    """uint8 (B, H, W, C) batches of --fid_ref images: an .npz's `images` (`arr_0` as in ADM's reference batches), or
    every image file under a folder at its own size (consecutive ones of one size batched together)."""
    if path.is_file():
        with np.load(path) as z:
            key = next((k for k in ("images", "arr_0") if k in z), None)
            if key is None:
                raise ValueError(f"--fid_ref {path} has neither mu/sigma statistics nor images (or arr_0)")
            x = z[key]
        if x.dtype != np.uint8 or x.ndim != 4:
            raise ValueError(f"--fid_ref {path}: '{key}' must be uint8 images (N, H, W, C), got {x.dtype} {x.shape}")
        yield from (x[i:i + batch_size] for i in range(0, len(x), batch_size))
        return
    files = sorted(f for f in path.rglob("*") if f.suffix.lower() in ImageFolder.EXTS)
    if not files:
        raise ValueError(f"--fid_ref {path} holds no images ({', '.join(sorted(ImageFolder.EXTS))})")
    Image = _need("PIL.Image", "an image folder as --fid_ref")
    batch = []
    for f in files:
        img = np.asarray(Image.open(f).convert("RGB"))
        if batch and (len(batch) == batch_size or img.shape != batch[0].shape):
            yield np.stack(batch)
            batch = []
        batch.append(img)
    yield np.stack(batch)


def fid_stats(ref: str, weights: str, device="cpu", batch_size: int = 50) -> dict[str, np.ndarray]:
    """Reference statistics {"mu": (2048,), "sigma": (2048, 2048)}, float64, of --fid_ref, which is either

    - an .npz with `mu` and `sigma`, read as it is: the layout of pytorch-fid's `--save-stats` files, of ADM's
      (guided-diffusion) reference batches and of TTUR's fid_stats_*.npz -- the same network and weights; pytorch-fid
      resizes with torch's bilinear instead of TF's, clean-fid's default mode with PIL's bicubic, so their numbers can
      differ slightly from these; or
    - images: a folder (searched recursively, each image at its own size: store them at the size the samples have) or an
      .npz of `images` uint8 (N, H, W, C) -- the samples' format -- whose statistics are computed once and saved to
      `<ref>.fid_stats.npz` in the layout above (with `n` and `weights`, the weights' sha256 prefix); later calls read
      that file, unless it was made with other weights. Delete it when the images change."""
    path = Path(ref)
    if not ref or not path.exists():
        raise ValueError(f"--fid_ref {ref!r}: no such image folder or .npz" if ref else
                         "the Inception FID needs --fid_ref: an image folder, an .npz of images or of mu/sigma")
    if path.is_file():
        try:
            with np.load(path) as z:
                stats = {k: z[k].astype(np.float64) for k in ("mu", "sigma") if k in z}
        except (ValueError, OSError, EOFError) as e:
            raise ValueError(f"cannot read --fid_ref {path} as an .npz ({str(e).splitlines()[0][:120]})") from None
        if len(stats) == 2:
            if stats["mu"].shape != (2048,) or stats["sigma"].shape != (2048, 2048):
                raise ValueError(f"--fid_ref {path}: mu {stats['mu'].shape} and sigma {stats['sigma'].shape} are not "
                                 f"the (2048,) and (2048, 2048) of Inception pool features")
            return stats
    _, sha = fid_inception(weights, device)
    saved = path.resolve().with_name(path.resolve().name + ".fid_stats.npz")
    if saved.is_file():
        with np.load(saved) as z:
            if "weights" in z and str(z["weights"]) == sha:
                return {k: z[k] for k in ("mu", "sigma")}
    feats = fid_features(_image_batches(path, batch_size), weights, device)
    stats = dict(zip(("mu", "sigma"), (m.numpy() for m in moments(feats))))
    if is_main():
        try:
            tmp = saved.with_name(saved.name + f".tmp{os.getpid()}")
            with open(tmp, "wb") as f:
                np.savez(f, **stats, n=len(feats), weights=np.array(sha))
            os.replace(tmp, saved)
            print0(f"saved the FID statistics of the {len(feats)} images of --fid_ref {path} to {saved}")
        except OSError as e:
            print0(f"could not save the FID statistics of --fid_ref next to it ({e}); they are recomputed each time")
    return stats


def fid(images, ref: str, weights: str, device="cpu", batch_size: int = 50) -> float:
    """The standard Inception FID of `images` (uint8 or [-1, 1] float, (N, C, H, W) or (N, H, W, C), C = 1 or 3)
    against `ref` (--fid_ref, see fid_stats) with the Inception weights file `weights` (--fid_weights). Published FIDs
    use 50,000 samples; FID is biased upwards with fewer, so compare numbers at the same sample count."""
    fid_inception(weights, device)  # first: one line about the weights before any work
    if len(images) < 2:
        raise ValueError(f"the FID needs at least 2 images, got {len(images)}")
    ref_stats = fid_stats(ref, weights, device, batch_size)
    return frechet_from_moments(*moments(fid_features(images, weights, device, batch_size)),
                                ref_stats["mu"], ref_stats["sigma"])
