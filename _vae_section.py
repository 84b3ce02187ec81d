import json
import os
import re
import struct
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

# -----------------------------------------------------------------------------
# VAE: a from-scratch AutoencoderKL whose state_dict keys equal diffusers' ones,
# so released VAE weights (diffusers folders, LDM .ckpt/.safetensors) load as-is.


class ResnetBlock2D(nn.Module):
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


class Attention(nn.Module):
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


class MidBlock(nn.Module):
    def __init__(self, c, groups, attention):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock2D(c, c, groups), ResnetBlock2D(c, c, groups)])
        self.attentions = nn.ModuleList([Attention(c, groups)] if attention else [])

    def forward(self, x):
        x = self.resnets[0](x)
        for attn in self.attentions:
            x = attn(x)
        return self.resnets[1](x)


class Downsample(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, stride=2)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # asymmetric pad, as in the original LDM code


class Upsample(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Level(nn.Module):
    """One resolution level: resnets, then an optional down- or upsampler."""

    def __init__(self, cin, cout, n, groups, sampler):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock2D(cin if i == 0 else cout, cout, groups) for i in range(n)])
        self.downsamplers = nn.ModuleList([Downsample(cout)]) if sampler == "down" else None
        self.upsamplers = nn.ModuleList([Upsample(cout)]) if sampler == "up" else None

    def forward(self, x):
        for r in self.resnets:
            x = r(x)
        for s in self.downsamplers or self.upsamplers or []:
            x = s(x)
        return x


class Encoder(nn.Module):
    def __init__(self, cin, chs, layers, zc, groups, attention):
        super().__init__()
        self.conv_in = nn.Conv2d(cin, chs[0], 3, padding=1)
        last = len(chs) - 1
        self.down_blocks = nn.ModuleList(
            [Level(chs[max(i - 1, 0)], c, layers, groups, "down" if i < last else None) for i, c in enumerate(chs)])
        self.mid_block = MidBlock(chs[-1], groups, attention)
        self.conv_norm_out = nn.GroupNorm(groups, chs[-1], eps=1e-6)
        self.conv_act = nn.SiLU()
        self.conv_out = nn.Conv2d(chs[-1], zc, 3, padding=1)

    def forward(self, x):
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        return self.conv_out(self.conv_act(self.conv_norm_out(x)))


class Decoder(nn.Module):
    def __init__(self, zc, cout, chs, layers, groups, attention):
        super().__init__()
        rev, last = list(reversed(chs)), len(chs) - 1
        self.conv_in = nn.Conv2d(zc, rev[0], 3, padding=1)
        self.mid_block = MidBlock(rev[0], groups, attention)
        # the decoder has one more resnet per level than the encoder
        self.up_blocks = nn.ModuleList(
            [Level(rev[max(i - 1, 0)], c, layers + 1, groups, "up" if i < last else None) for i, c in enumerate(rev)])
        self.conv_norm_out = nn.GroupNorm(groups, chs[0], eps=1e-6)
        self.conv_act = nn.SiLU()
        self.conv_out = nn.Conv2d(chs[0], cout, 3, padding=1)

    def forward(self, z):
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(self.conv_act(self.conv_norm_out(x)))


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
        self.encoder = Encoder(in_channels, chs, layers_per_block, 2 * zc, g, a)
        self.decoder = Decoder(zc, out_channels, chs, layers_per_block, g, a)
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
            k = k.replace(a, b) if a in k else k
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
        self.channels = channels if ae is None else ae.config["in_channels"]

    @property
    def in_channels(self):
        return self.channels

    @property
    def latent_channels(self):
        return self.channels if self.ae is None else self.ae.config["latent_channels"]

    @property
    def downsample(self):
        return 1 if self.ae is None else 2 ** (len(self.ae.config["block_out_channels"]) - 1)

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
        out = [self.ae.decode((zb.to(p.device, p.dtype) / self.scaling_factor + self.shift_factor)).to(z.device, z.dtype)
               for zb in z.split(batch_size)]
        return torch.cat(out)


def _read_weights(path):
    if str(path).endswith(".safetensors"):
        return read_safetensors(path)
    return torch.load(path, map_location="cpu", weights_only=True)


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
    path = str(path)
    if os.path.isdir(os.path.join(path, "vae")):  # a whole pipeline folder
        path = os.path.join(path, "vae")
    cfg = {}
    if os.path.isdir(path):
        cfg_path = os.path.join(path, "config.json")
        files = [os.path.join(path, "diffusion_pytorch_model" + e) for e in (".safetensors", ".bin")]
        weights = next((f for f in files if os.path.isfile(f)), None)
        if not os.path.isfile(cfg_path) or weights is None:
            raise FileNotFoundError(f"{path} is not a diffusers VAE folder (needs config.json and {files[0]})")
        with open(cfg_path) as f:
            cfg = json.load(f)
        if cfg.get("_class_name", "AutoencoderKL") != "AutoencoderKL":
            raise ValueError(f"{cfg_path}: only AutoencoderKL is supported, not {cfg['_class_name']}")
    elif os.path.isfile(path):
        weights = path
    else:
        raise FileNotFoundError(f"VAE weights not found: {path}")
    sd = convert_vae_state_dict(_read_weights(weights))
    try:
        arch = infer_vae_config(sd)
    except ValueError as e:
        raise ValueError(f"{weights}: {e}") from None
    arch.update({k: cfg[k] for k in arch if k in cfg})
    if fam["latent_channels"] != arch["latent_channels"]:
        raise ValueError(f"VAE family {family!r} has {fam['latent_channels']} latent channels but {weights} has "
                         f"{arch['latent_channels']}; pass the right family")
    ae = AutoencoderKL(**arch)
    ref = ae.state_dict()

    def few(keys):
        return ", ".join(keys[:3]) + (f" (+{len(keys) - 3} more)" if len(keys) > 3 else "")
    problems = {"missing": [k for k in ref if k not in sd], "unexpected": [k for k in sd if k not in ref],
                "shape": [f"{k} {tuple(sd[k].shape)} != {tuple(v.shape)}"
                          for k, v in ref.items() if k in sd and sd[k].shape != v.shape]}
    if any(problems.values()):
        raise ValueError(f"VAE weights in {weights} do not match the architecture: "
                         + "; ".join(f"{p} {few(ks)}" for p, ks in problems.items() if ks))
    ae.load_state_dict(sd)

    def pick(arg, key):
        return arg if arg is not None else cfg[key] if cfg.get(key) is not None else fam[key]
    return VAE(ae.to(device, dtype), pick(scaling_factor, "scaling_factor"), pick(shift_factor, "shift_factor"))


# --- a tiny VAE trained on the digits, so latent-space flows can be tested end to end on CPU

def train_vae(out_dir, steps=1500, size=16, seed=0, batch_size=64, lr=2e-3, kl_weight=1e-4):
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


# --- stand-ins, removed on merge ---

def load_digits(split="train", size=8):
    """scikit-learn digits, fixed stratified 80/20 split -> uint8 images (N, 1, size, size), int64 labels (N,)."""
    from sklearn.datasets import load_digits as _sk_digits
    from sklearn.model_selection import train_test_split
    d = _sk_digits()
    idx = train_test_split(np.arange(len(d.target)), test_size=0.2, random_state=0, stratify=d.target)
    idx = idx[0 if split == "train" else 1]
    x = torch.tensor(d.images[idx], dtype=torch.float32)[:, None] * (255 / 16)  # (N, 1, 8, 8)
    if size != 8:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return x.round().clamp(0, 255).to(torch.uint8), torch.tensor(d.target[idx], dtype=torch.int64)


def to_float(x):
    """uint8 [0, 255] -> float32 [-1, 1]."""
    return x.float() / 127.5 - 1
