"""starflow.py with official weights: ml-tarflow / ml-starflow state dicts load through `from_official` and give the
official code's log-likelihoods and samples. The fixtures (tests/fixtures/starflow_*, see the README there) hold tiny
perturbed official models in the official key layout, inputs, noise and what the official code computed from them."""
import dataclasses
import json

import numpy as np
import pytest
import torch

import starflow as sf
from conftest import ROOT

FIX = ROOT / "tests" / "fixtures"
TARFLOW = FIX / "starflow_tarflow_model_2_16_2_2_0.07.pth"  # ml-tarflow's file name carries noise_std
STARFLOW = FIX / "starflow_starflow_model.pth"
LOGP_RTOL, SAMPLE_ATOL = 1e-5, 1e-4  # fp32, the tolerances


def _io(name):
    return torch.load(FIX / f"starflow_{name}_io.pt", weights_only=True)


def _sample(m, cfg, cond, z, **kw):
    return sf.sample(m, cond, dataclasses.replace(cfg, denoise=False, **kw), z=z.clone())[0]


def test_ml_tarflow_weights_compute_the_official_log_likelihood_and_samples():
    io = _io("tarflow")
    m, cfg = sf.from_official(TARFLOW, head_dim=8)  # Model never passes MetaBlock's head_dim; the fixture's is 8
    # inferred from shapes (and the file name); the sampler as evaluate_fid.py runs it
    assert (cfg.param, cfg.patch_size, cfg.img_size, cfg.channels, cfg.width, cfg.layers, cfg.num_classes) == \
        ("tarflow", 2, 8, 3, 16, (2, 2), 3)
    assert (cfg.class_cond, cfg.patch_order, cfg.prior_var, cfg.cond_deep_only, cfg.noise_std) == \
        ("add", "chw", True, False, 0.07)
    assert (cfg.guidance_rule, cfg.guidance_anneal, cfg.guide_all_blocks, cfg.attn_temp, cfg.denoise) == \
        ("tarflow", True, True, 1.0, True)
    null = io["y"] < 0  # ml-tarflow's dropped label: the mean class embedding
    lp = m.log_prob(io["x"], m.make_cond(io["y"].clamp(min=0), null=null))
    assert torch.allclose(lp, io["logp"], rtol=LOGP_RTOL, atol=0)
    assert not torch.allclose(lp, io["logp_var1"], rtol=1e-3)  # the prior's var (perturbed here) counts
    cond = m.make_cond(io["ys"])
    for name, kw in (("sample", dict(guidance=0.0)), ("sample_guided", dict(guidance=1.5)),  # annealed (default)
                     ("sample_guided_temp", dict(guidance=1.0, attn_temp=0.7, guidance_anneal=False))):
        x = _sample(m, cfg, cond, io["z"], **kw)
        assert (x - io[name]).abs().max() < SAMPLE_ATOL, name
    assert (io["sample_guided"] - io["sample"]).abs().max() > 0.1  # guidance matters in the fixture
    x = _sample(m, cfg, m.make_cond(io["ys"], null=torch.ones(4, dtype=torch.bool)), io["z"], guidance=0.0)
    assert (x - io["sample_null"]).abs().max() < SAMPLE_ATOL  # ml-tarflow's y=None


def test_ml_starflow_weights_compute_the_official_log_likelihood_and_samples():
    io = _io("starflow")
    m, cfg = sf.from_official(STARFLOW, null_text=io["null_text"], vae_family="none", channels=4)
    assert (cfg.param, cfg.txt_dim, cfg.txt_len, cfg.head_dim, cfg.layers, cfg.seq_order, cfg.soft_clip) == \
        ("starflow", 8, 3, 32, (1, 2), "L2R", 4.0)
    assert (cfg.rope, cfg.rope_text, cfg.final_norm, cfg.cond_deep_only, cfg.txt_null, cfg.patch_order) == \
        (True, True, True, True, "caption", "hwc")
    assert (cfg.guidance, cfg.guidance_rule, cfg.guidance_anneal, cfg.guide_all_blocks, cfg.denoise) == \
        (5.0, "starflow", False, False, False)  # sample.py's defaults
    lp = m.log_prob(io["x"], m.make_cond(text=io["text"], null=io["null"]))  # the last one given the null caption
    assert torch.allclose(lp, io["logp"], rtol=LOGP_RTOL, atol=0)
    z = m.patchify(io["z"])  # the official noise is an image (B, C, H, W); ours the tokens
    for name, w in (("sample", 0.0), ("sample_guided", 5.0)):
        x = _sample(m, cfg, m.make_cond(text=io["text"]), z, guidance=w)
        assert (x - io[name]).abs().max() < SAMPLE_ATOL, name
    assert (io["sample_guided"] - io["sample"]).abs().max() > 0.1


def test_official_files_need_what_the_weights_do_not_carry_and_refuse_contradictions(tmp_path):
    with pytest.raises(ValueError, match="the weights say width=16"):
        sf.from_official(TARFLOW, head_dim=8, width=32)
    with pytest.raises(ValueError, match="needs null_text"):  # sample.py guides by default: it needs the null caption
        sf.from_official(STARFLOW, vae_family="none", channels=4)
    with pytest.raises(ValueError, match="null_text must be"):
        sf.from_official(STARFLOW, vae_family="none", channels=4, null_text=torch.zeros(2, 8))
    with pytest.raises(ValueError, match="square patches"):  # 12 dims are not 4-channel patches
        sf.from_official(TARFLOW, head_dim=8, channels=4)
    m, cfg = sf.from_official(STARFLOW, guidance=0.0)  # default: SD-VAE latents 4x4x4 -> 32x32 images
    assert (cfg.vae_family, cfg.img_size, cfg.channels, m.C, m.S) == ("sd", 32, 3, 4, 4) and m.vae is None
    torch.save({"blocks.0.weight": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="not an ml-tarflow / ml-starflow state dict"):
        sf.from_official(tmp_path / "other.pth")


def test_cli_samples_evaluates_and_fine_tunes_from_an_official_file(tmp_path, capsys):
    io = _io("tarflow")
    out = tmp_path / "s.npz"
    sf.main(["--sample", "--ckpt", str(TARFLOW), "--head_dim", "8", "--n", "4", "--out", str(out), "--guidance", "1"])
    assert np.load(out)["images"].shape == (4, 8, 8, 3)
    # --init_from: train on from the official weights (a tiny learning rate: the weights barely move)
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "d.npz", images=rng.integers(0, 256, (32, 8, 8, 3), dtype=np.uint8),
             labels=rng.integers(0, 3, 32))
    capsys.readouterr()
    sf.main(["--eval", "--ckpt", str(TARFLOW), "--head_dim", "8", "--data", str(tmp_path / "d.npz")])
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["bpd"] > 0 and res["bpd_dequantized"] > 0  # held-out bits/dim of the official model
    run = tmp_path / "run"
    sf.main(["--init_from", str(TARFLOW), "--head_dim", "8", "--data", str(tmp_path / "d.npz"), "--steps", "1",
             "--lr", "1e-9", "--warmup", "0", "--batch_size", "8", "--eval_every", "0", "--out_dir", str(run),
             "--ema_decay", "0"])
    m, cfg = sf.from_checkpoint(run / "ckpt.pt")
    assert (cfg.class_cond, cfg.patch_order, cfg.prior_var, cfg.width, cfg.noise_std) == ("add", "chw", True, 16, 0.07)
    lp = m.log_prob(io["x"], m.make_cond(io["y"].clamp(min=0), null=io["y"] < 0))
    assert torch.allclose(lp, io["logp"], rtol=1e-4)  # the official function, one negligible step later
