"""Wan2.1 / Wan2.2 video VAE: parity with diffusers.AutoencoderKLWan, original key names, causality, chunked long
videos, latent normalisation, loading errors."""
import json
import os
import re

import pytest
import torch

import common
from conftest import need

# small random versions of both families: their real latent widths (so the family constants apply), real
# compression (4x in time; 8x / 16x in space) with a spatial-only level, Wan2.2's wider decoder. Wan2.2's time
# downsampling sits on the other levels here, so that a decoder level doubling time also halves channels: only
# then do the two frames of its shortcut differ, and the first chunk's choice between them matters
CONFIGS = {
    "wan2.1": dict(base_dim=8, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2,
                   temperal_downsample=[False, True, True]),
    "wan2.2": dict(base_dim=8, decoder_base_dim=12, z_dim=48, dim_mult=[1, 2, 4, 4], num_res_blocks=1,
                   temperal_downsample=[True, True, False], is_residual=True, in_channels=12, out_channels=12,
                   patch_size=2, scale_factor_spatial=16, latents_mean=common.WAN22_LATENTS_MEAN,
                   latents_std=common.WAN22_LATENTS_STD),
}
SIZE = {"wan2.1": 16, "wan2.2": 32}  # pixels: 2 x 2 latents


@pytest.fixture(scope="module", params=list(CONFIGS))
def ref(request, tmp_path_factory):
    """(family, diffusers AutoencoderKLWan with every parameter randomised, pipeline folder holding it in vae/)."""
    diffusers = need("diffusers")
    torch.manual_seed(0)
    d = diffusers.AutoencoderKLWan(**CONFIGS[request.param]).eval()
    with torch.no_grad():
        for p in d.parameters():
            p.add_(0.1 * torch.randn_like(p))
    folder = tmp_path_factory.mktemp(request.param.replace(".", ""))
    d.save_pretrained(folder / "vae")
    return request.param, d, folder


def video(family, frames, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(1, 3, frames, SIZE[family], SIZE[family], generator=g) * 2 - 1


def max_diff(ae, d, x):
    """Largest |ours - diffusers| over posterior mean, logvar and the decode of random latents."""
    with torch.no_grad():
        post = d.encode(x).latent_dist
        mean, logvar = ae.encode(x)
        z = torch.randn_like(mean)
        ref, dec = d.decode(z).sample, ae.decode(z)
    assert dec.shape == x.shape and (ref.abs() < 0.99).float().mean() > 0.5  # the clamp hides little
    return max((mean - post.mean).abs().max(), (logvar - post.logvar).abs().max(), (dec - ref).abs().max()).item()


def to_original(sd):
    """diffusers' Wan VAE key names -> the original ones: the inverse of convert_wan_vae_state_dict, for tests."""
    residual = any(k.startswith("encoder.down_blocks.0.resnets.") for k in sd)
    n = 1 + max(int(m[1]) for k in sd if (m := re.match(r"decoder\.up_blocks\.0\.resnets\.(\d+)\.", k)))
    out = {}
    for k, v in sd.items():
        for a, b in common._WAN_RENAMES:  # before the prefixes, which bring back top-level ".conv1."
            k = k.replace(b, a)
        k = next((a + k[len(b):] for a, b in common._WAN_PREFIXES if k.startswith(b)), k)
        if m := re.match(r"(encoder|decoder)\.(down|up)_blocks\.(\d+)\."
                         r"(?:resnets\.(\d+)\.|\w+sampler\.|upsamplers\.0\.)?(.*)", k):
            side, d, i, j, rest = m.groups()
            j = int(j) if j is not None else n - (side == "encoder")  # the sampler comes after the level's resnets
            if residual:
                k = f"{side}.{d}samples.{i}.{d}samples.{j}.{rest}"
            elif side == "encoder":
                k = f"encoder.downsamples.{i}.{rest}"
            else:
                k = f"decoder.upsamples.{int(i) * (n + 1) + j}.{rest}"
        out[k] = v
    return out


def test_parity_diffusers_folder(ref):
    family, d, folder = ref
    vae = common.load_video_vae(folder, family)  # the pipeline folder: its vae/ is found
    assert vae.ae.config == common.infer_wan_vae_config(d.state_dict())
    assert vae.downsample == {"wan2.1": 8, "wan2.2": 16}[family] and vae.latent_channels == d.config.z_dim
    for frames in (1, 5, 9):
        assert max_diff(vae.ae, d, video(family, frames)) <= 1e-4


def test_parity_original_names(ref, tmp_path):
    family, d, _ = ref
    sd = d.state_dict()
    orig = to_original(sd)
    # spot checks against the names in Wan-Video's wan/modules/vae.py and vae2_2.py
    assert {"conv1.weight", "conv2.weight", "encoder.conv1.weight", "decoder.head.2.weight",
            "decoder.middle.1.to_qkv.weight"} <= orig.keys()
    assert {"wan2.1": "decoder.upsamples.3.time_conv.weight",  # 3 resnets, then the level's upsampler
            "wan2.2": "encoder.downsamples.1.downsamples.1.time_conv.weight"}[family] in orig
    assert common.convert_wan_vae_state_dict(orig).keys() == sd.keys()
    if family == "wan2.1":  # diffusers' own single-file converter (it knows only the Wan2.1 layout) agrees
        from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers
        theirs = convert_wan_vae_to_diffusers(orig)
        assert theirs.keys() == sd.keys() and all(theirs[k] is sd[k] for k in sd)
    torch.save(orig, tmp_path / f"{family}_VAE.pth")
    vae = common.load_video_vae(tmp_path / f"{family}_VAE.pth", family)  # architecture inferred from the tensors
    assert vae.ae.config == common.infer_wan_vae_config(sd)
    assert max_diff(vae.ae, d, video(family, 5)) <= 1e-4
    st = need("safetensors.torch")  # a single .safetensors, original names (as ComfyUI ships them)
    st.save_file({k: v.contiguous() for k, v in orig.items()}, tmp_path / "vae.safetensors")
    assert max_diff(common.load_video_vae(tmp_path / "vae.safetensors", family).ae, d, video(family, 1)) <= 1e-4


def test_causal(ref):
    family, d, folder = ref
    ae = common.load_video_vae(folder, family).ae
    x = video(family, 9)
    x2 = x.clone()
    x2[:, :, 5] = -x2[:, :, 5]  # frame 5 is in the second 4-frame chunk -> latent frame 2
    with torch.no_grad():
        (m, _), (m2, _) = ae.encode(x), ae.encode(x2)
        assert torch.equal(m[:, :, :2], m2[:, :, :2]) and not torch.allclose(m[:, :, 2], m2[:, :, 2])
        z = torch.randn_like(m)
        z2 = z.clone()
        z2[:, :, 1] += 1.0  # latent frame 1 decodes to frames 1..4
        y, y2 = ae.decode(z), ae.decode(z2)
        assert torch.equal(y[:, :, :1], y2[:, :, :1]) and not torch.allclose(y[:, :, 1:5], y2[:, :, 1:5])


def test_long_video_chunked(ref):
    family, d, folder = ref
    vae = common.load_video_vae(folder / "vae", family)
    x = video(family, 33)  # 1 + 8 chunks of 4 frames -> 9 latent frames
    assert max_diff(vae.ae, d, x) <= 1e-4
    with torch.no_grad():
        assert vae.encode(x).shape == (1, d.config.z_dim, 9, 2, 2)


def test_normalisation(ref):
    family, d, folder = ref
    vae = common.load_video_vae(folder, family)
    means = {"wan2.1": common.WAN21_LATENTS_MEAN, "wan2.2": common.WAN22_LATENTS_MEAN}
    stds = {"wan2.1": common.WAN21_LATENTS_STD, "wan2.2": common.WAN22_LATENTS_STD}
    mean_c, std_c = (torch.tensor(v[family]).view(1, -1, 1, 1, 1) for v in (means, stds))
    x = video(family, 5)
    with torch.no_grad():
        raw, logvar = vae.ae.encode(x)
        z = vae.encode(x)
        torch.testing.assert_close(z, (raw - mean_c) / std_c)
        torch.testing.assert_close(vae.decode(z), vae.ae.decode(raw), atol=1e-5, rtol=0)  # decode undoes it
        torch.manual_seed(3)
        zs = vae.encode(x, sample=True)
        torch.manual_seed(3)
        eps = torch.randn_like(raw)
    torch.testing.assert_close(zs, (raw + eps * (0.5 * logvar).exp() - mean_c) / std_c)
    assert not torch.allclose(zs, z)


def test_bad_inputs(ref):
    family, _, folder = ref
    vae = common.load_video_vae(folder, family)
    s, f, z = SIZE[family], vae.downsample, vae.latent_channels
    cases = [(vae.encode, torch.zeros(1, 3, 4, s, s), "1 + 4k frames"),
             (vae.encode, torch.zeros(1, 3, 5, s, s - 4), f"divisible by {f}, got {s}x{s - 4}"),
             (vae.encode, torch.zeros(1, 4, 5, s, s), "(B, 3, T, H, W)"),
             (vae.encode, torch.zeros(3, 5, s, s), "(B, 3, T, H, W)"),
             (vae.decode, torch.zeros(1, z + 1, 2, 2, 2), f"(B, {z}, T, H, W)")]
    for fn, x, msg in cases:
        with pytest.raises(ValueError) as e:
            fn(x)
        assert msg in str(e.value) and "\n" not in str(e.value)


def test_bad_files(ref, tmp_path):
    family, d, folder = ref
    other = {"wan2.1": "wan2.2", "wan2.2": "wan2.1"}[family]
    sd = d.state_dict()

    def fails(exc, path, msg, fam=family):
        with pytest.raises(exc) as e:
            common.load_video_vae(path, fam)
        assert msg in str(e.value) and "\n" not in str(e.value), str(e.value)

    fails(FileNotFoundError, tmp_path / "nope.pth", "not found")
    fails(ValueError, folder, "choose from wan2.1, wan2.2", fam="wan2.3")
    fails(ValueError, folder, f"pass family={family!r}", fam=other)  # the weights' family named
    os.makedirs(tmp_path / "empty")
    fails(FileNotFoundError, tmp_path / "empty", "config.json")
    cfg = json.loads((folder / "vae" / "config.json").read_text())
    os.makedirs(tmp_path / "kl")
    (tmp_path / "kl" / "config.json").write_text(json.dumps(dict(cfg, _class_name="AutoencoderKL")))
    (tmp_path / "kl" / "diffusion_pytorch_model.safetensors").write_bytes(
        (folder / "vae" / "diffusion_pytorch_model.safetensors").read_bytes())
    fails(ValueError, tmp_path / "kl", "AutoencoderKLWan")

    missing = "decoder.up_blocks.1.resnets.0.norm1.gamma"
    broken = [({k: v for k, v in sd.items() if k != missing}, f"missing {missing}"),
              ({k: v for k, v in sd.items() if k != "encoder.conv_in.weight"}, "missing tensor encoder.conv_in.weight"),
              (dict(sd, **{"decoder.norm_out.gamma": torch.ones(3)}), "shape decoder.norm_out.gamma (3,)"),
              (dict(sd, **{"encoder.extra.weight": torch.ones(1)}), "unexpected encoder.extra.weight")]
    for i, (bad, msg) in enumerate(broken):
        torch.save(bad, tmp_path / f"bad{i}.pth")
        fails(ValueError, tmp_path / f"bad{i}.pth", msg)
