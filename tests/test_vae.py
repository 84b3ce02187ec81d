"""common.py section 2: AutoencoderKL parity with diffusers, key conversion, safetensors, load_vae, train_vae."""
import json
import os
import re

import pytest
import torch
import torch.nn.functional as F

import common
from conftest import need


SMALL = dict(block_out_channels=(32, 64), layers_per_block=1, latent_channels=4)
FLUXLIKE = dict(block_out_channels=(32, 64), layers_per_block=2, latent_channels=16,
                use_quant_conv=False, use_post_quant_conv=False)


def diffusers_vae(**kw):
    """A small diffusers AutoencoderKL with every parameter randomised (its init zeroes nothing we rely on)."""
    diffusers = need("diffusers")
    n = len(kw["block_out_channels"])
    torch.manual_seed(0)
    d = diffusers.AutoencoderKL(down_block_types=["DownEncoderBlock2D"] * n, up_block_types=["UpDecoderBlock2D"] * n,
                                norm_num_groups=32, **kw).eval()
    with torch.no_grad():
        for p in d.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return d


def max_diff(ours, d, x, z):
    """Largest |ours - diffusers| over posterior mean, logvar and decode."""
    with torch.no_grad():
        post = d.encode(x).latent_dist
        mean, logvar = ours.encode(x)
        dec = ours.decode(z)
        ref = d.decode(z).sample
    assert dec.abs().max() > 0.1  # a non-trivial output
    return max((mean - post.mean).abs().max(), (logvar - post.logvar).abs().max(), (dec - ref).abs().max()).item()


@pytest.mark.parametrize("kw", [SMALL, FLUXLIKE, dict(SMALL, mid_block_add_attention=False)])
def test_parity_with_diffusers(kw):
    d = diffusers_vae(**kw)
    ours = common.AutoencoderKL(**kw).eval()
    ours.load_state_dict(d.state_dict())  # strict: same key names and shapes
    torch.manual_seed(1)
    x, z = torch.randn(2, 3, 16, 16), torch.randn(2, kw["latent_channels"], 8, 8)
    assert max_diff(ours, d, x, z) <= 1e-4
    assert common.infer_vae_config(d.state_dict()) == dict(common.AutoencoderKL(**kw).config)


def test_ldm_names_both_ways(tmp_path):
    st = need("safetensors.torch")
    d = diffusers_vae(**SMALL)
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint
    sd = d.state_dict()
    ldm = common.to_ldm_state_dict(sd)
    assert "decoder.up.0.block.0.nin_shortcut.weight" in ldm  # LDM up[0] is the highest resolution
    assert ldm["encoder.mid.attn_1.q.weight"].shape == (64, 64, 1, 1)
    # diffusers' own converter agrees with our LDM names
    theirs = convert_ldm_vae_checkpoint(ldm, dict(d.config))
    assert theirs.keys() == sd.keys() and all(torch.equal(theirs[k].reshape(sd[k].shape), sd[k]) for k in sd)
    assert common.convert_vae_state_dict(ldm).keys() == sd.keys()

    st.save_file({k: v.contiguous() for k, v in ldm.items()}, tmp_path / "vae.safetensors")
    vae = common.load_vae(tmp_path / "vae.safetensors")  # architecture inferred from the tensors
    assert vae.ae.config == common.AutoencoderKL(**SMALL).config and vae.scaling_factor == 0.18215
    x, z = torch.randn(2, 3, 16, 16), torch.randn(2, 4, 8, 8)
    assert max_diff(vae.ae, d, x, z) <= 1e-4

    # a full SD .ckpt: lightning wrapper, prefix, other models' and discriminator weights
    full = {"first_stage_model." + k: v for k, v in ldm.items()}
    full.update({"model.diffusion_model.x.weight": torch.zeros(3), "first_stage_model.loss.logvar": torch.zeros(())})
    torch.save({"state_dict": full, "global_step": 7}, tmp_path / "sd.ckpt")
    assert max_diff(common.load_vae(tmp_path / "sd.ckpt").ae, d, x, z) <= 1e-4


def test_legacy_attention_names(tmp_path):
    d = diffusers_vae(**SMALL)
    old = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    legacy = {re.sub(r"to_q|to_k|to_v|to_out\.0", lambda m: old[m[0]], k): v for k, v in d.state_dict().items()}
    assert "encoder.mid_block.attentions.0.query.weight" in legacy
    torch.save({"vae." + k: v for k, v in legacy.items()}, tmp_path / "legacy.bin")
    vae = common.load_vae(tmp_path / "legacy.bin")
    assert max_diff(vae.ae, d, torch.randn(2, 3, 16, 16), torch.randn(2, 4, 8, 8)) <= 1e-4


def test_diffusers_folder(tmp_path):
    d = diffusers_vae(**FLUXLIKE)
    d.register_to_config(scaling_factor=0.5, shift_factor=0.25)
    d.save_pretrained(tmp_path / "pipe" / "vae")
    vae = common.load_vae(tmp_path / "pipe", family="flux")  # a pipeline folder is found through vae/
    assert (vae.scaling_factor, vae.shift_factor) == (0.5, 0.25)  # config.json beats the family default
    assert common.load_vae(tmp_path / "pipe" / "vae", family="flux", scaling_factor=2.0).scaling_factor == 2.0
    assert max_diff(vae.ae, d, torch.randn(2, 3, 16, 16), torch.randn(2, 16, 8, 8)) <= 1e-4
    with pytest.raises(ValueError, match="family 'sd' has 4 latent channels"):
        common.load_vae(tmp_path / "pipe", family="sd")


def test_safetensors_reader_writer(tmp_path):
    st = need("safetensors.torch")
    g = torch.Generator().manual_seed(0)
    tensors = {"f32": torch.randn(3, 5, generator=g), "f16": torch.randn(7, generator=g).half(),
               "bf16": torch.randn(2, 3, generator=g).bfloat16(), "i64": torch.arange(-5, 6),
               "i32": torch.arange(9, dtype=torch.int32).reshape(3, 3), "u8": torch.arange(250, 256, dtype=torch.uint8),
               "bool": torch.tensor([True, False, True]), "scalar": torch.tensor(3.5), "empty": torch.zeros(0, 4)}
    st.save_file(tensors, tmp_path / "a.safetensors", metadata={"format": "pt"})
    ours, theirs = common.read_safetensors(tmp_path / "a.safetensors"), st.load_file(tmp_path / "a.safetensors")
    assert ours.keys() == theirs.keys() == tensors.keys()
    for k in tensors:
        assert ours[k].dtype == theirs[k].dtype and torch.equal(ours[k], theirs[k]), k
    common.write_safetensors(tmp_path / "b.safetensors", tensors, metadata={"step": 3})
    back = st.load_file(tmp_path / "b.safetensors")
    assert all(back[k].dtype == v.dtype and torch.equal(back[k], v) for k, v in tensors.items())
    with st.safe_open(tmp_path / "b.safetensors", "pt") as f:
        assert f.metadata() == {"step": "3"}


def small_file(tmp_path, edit, latent=4):
    """Our own small AutoencoderKL saved with our writer after `edit`ing its state dict (no optional packages)."""
    torch.manual_seed(0)
    ae = common.AutoencoderKL(**dict(SMALL, latent_channels=latent)).eval()
    sd = ae.state_dict()
    edit(sd)
    common.write_safetensors(tmp_path / "w.safetensors", sd)
    return ae, tmp_path / "w.safetensors"


@pytest.mark.parametrize("edit, key", [
    (lambda sd: sd.pop("decoder.up_blocks.1.resnets.0.conv2.bias"), "decoder.up_blocks.1.resnets.0.conv2.bias"),
    (lambda sd: sd.update({"encoder.mid_block.resnets.0.conv1.weight": torch.zeros(64, 64, 1, 1)}),
     "encoder.mid_block.resnets.0.conv1.weight (64, 64, 1, 1) != (64, 64, 3, 3)"),
    (lambda sd: sd.update({"encoder.extra.weight": torch.zeros(1)}), "unexpected encoder.extra.weight"),
    (lambda sd: sd.pop("decoder.conv_in.weight"), "decoder.conv_in.weight"),  # needed to infer the config
])
def test_bad_weights_one_line_error(tmp_path, edit, key):
    _, path = small_file(tmp_path, edit)
    with pytest.raises(ValueError) as e:
        common.load_vae(path)
    msg = str(e.value)
    assert key in msg and "\n" not in msg


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        common.load_vae(tmp_path / "nope.safetensors")
    os.makedirs(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="config.json"):
        common.load_vae(tmp_path / "empty")


def test_vae_scaling_and_identity(tmp_path):
    ae, path = small_file(tmp_path, lambda sd: None, latent=16)
    vae = common.load_vae(path, family="flux")
    assert (vae.scaling_factor, vae.shift_factor) == (0.3611, 0.1159)
    assert (vae.in_channels, vae.latent_channels, vae.downsample) == (3, 16, 2)
    x = torch.rand(5, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        mean, _ = ae.encode(x)
        z = vae.encode(x, batch_size=2)  # batching must not change results
        assert torch.allclose(z, (mean - 0.1159) * 0.3611, atol=1e-5)
        assert torch.allclose(vae.decode(z, batch_size=3), ae.decode(mean), atol=1e-5)
        zs = vae.encode(x, sample=True)
    assert 0 < (zs - z).abs().mean() < 1  # a posterior sample differs from the mean, but not wildly
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        vae.encode(torch.zeros(1, 1, 16, 16))
    with pytest.raises(ValueError, match="family 'sd' has 4 latent channels"):
        common.load_vae(path)
    half = common.load_vae(path, family="flux", dtype=torch.bfloat16)
    zh = half.encode(x)
    assert zh.dtype == torch.float32 and (zh - z).abs().max() < 0.05  # computed in bf16, returned as the input

    ident = common.load_vae(None, family="none", channels=1)
    assert (ident.in_channels, ident.latent_channels, ident.downsample) == (1, 1, 1)
    x1 = torch.randn(3, 1, 8, 8)
    assert torch.equal(ident.encode(x1), x1) and torch.equal(ident.decode(x1), x1)


def test_train_vae(tmp_path, monkeypatch):
    saved = []
    real_write = common.write_safetensors

    def spy(path, tensors, metadata=None):
        saved.append(tensors)
        real_write(path, tensors, metadata)
    monkeypatch.setattr(common, "write_safetensors", spy)

    x = common.to_float(common.load_digits("test", size=16)[0])

    def recon_mse(folder):
        vae = common.load_vae(folder)
        return F.mse_loss(vae.decode(vae.encode(x)), x).item()

    untrained = recon_mse(common.train_vae(tmp_path / "a", steps=0))
    folder = common.train_vae(tmp_path / "b", steps=40)
    trained = recon_mse(folder)
    assert trained < 0.15 * untrained, (trained, untrained)

    # the saved folder reproduces the in-memory model exactly
    with open(os.path.join(folder, "config.json")) as f:
        cfg = json.load(f)
    mem = common.AutoencoderKL(**{k: cfg[k] for k in common.AutoencoderKL(**SMALL).config}).eval()
    mem.load_state_dict(saved[-1])
    vae = common.load_vae(folder)
    z = torch.randn(4, 4, 8, 8)
    assert torch.equal(vae.decode(z), mem.decode(z / cfg["scaling_factor"]).detach())
    z_train = vae.encode(common.to_float(common.load_digits("train", size=16)[0]))
    assert abs(z_train.std().item() - 1) < 1e-3  # scaling_factor gives unit-variance latents

    # cached: same folder, nothing loaded or written; other settings do retrain
    def no_data(*a, **k):
        raise RuntimeError("train_vae loaded data")
    monkeypatch.setattr(common, "load_digits", no_data)
    assert common.train_vae(tmp_path / "b", steps=40) == folder and len(saved) == 2
    with pytest.raises(RuntimeError, match="loaded data"):
        common.train_vae(tmp_path / "b", steps=41)


def test_trained_folder_loads_in_diffusers(tmp_path):
    diffusers = need("diffusers")
    folder = common.train_vae(tmp_path, steps=0)  # untrained, but a complete folder
    d = diffusers.AutoencoderKL.from_pretrained(folder).eval()
    vae = common.load_vae(folder)
    assert d.config.scaling_factor == vae.scaling_factor
    z = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        assert torch.allclose(d.decode(z / vae.scaling_factor).sample, vae.decode(z), atol=1e-5)
