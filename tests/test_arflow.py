"""arflow.py: hybrid attention (parallel = recurrent, causal across images, bidirectional inside one), guidance,
samplers, the sequence sampler, training, CLI (resume, sample, eval, torchrun), latents, bad inputs; the official
model's outputs and samplers on fixtures, its checkpoint format; bf16 parameters and FSDP2 with them."""
import argparse
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import arflow as af
import common
from conftest import ROOT, need

TINY = dict(data="synthetic.npz", width=32, heads=4, depth=2, img_size=4, channels=2, patch_size=2, num_classes=5)
MODES = ["hybrid", "softmax"]


def _model(attention="hybrid", perturb=0.1, seed=0, **kw):
    cfg = af.Config(**{**TINY, "attention": attention, **kw})
    torch.manual_seed(seed)
    m = af.ARFlow(cfg, cfg.channels, cfg.img_size).eval()
    with torch.no_grad():  # away from adaLN-Zero's identity init, so the attention matters
        for p in m.parameters():
            p.add_(perturb * torch.randn_like(p))
        for b in m.blocks:  # strong, varied gates: lambda_i far from 1, so a misplaced decay shows
            if attention == "hybrid":
                b.attn.gate.weight.mul_(40)
    return m, cfg


def _inputs(cfg, B=3, S=5, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, S, cfg.channels, cfg.img_size, cfg.img_size, generator=g)
    t = torch.rand(B, S, generator=g).sort(1).values
    return x, t, torch.tensor([1, 4, cfg.num_classes])[:B]  # the last one is the null label


@pytest.mark.parametrize("attention", MODES)
def test_parallel_form_equals_recurrent_form(attention):
    m, cfg = _model(attention)
    x, t, y = _inputs(cfg)
    B, S = x.shape[:2]
    with torch.no_grad():
        # one layer: all images at once against one image per call with the carried state
        attn = m.blocks[0].attn
        h, c = torch.randn(B, S, m.N, cfg.width), torch.randn(B, S, cfg.width)
        par = attn(h, c)
        state = m.new_state(B, S)[0]
        rec = torch.cat([attn(h[:, i:i + 1], c[:, i:i + 1], state) for i in range(S)], 1)
        assert (par - rec).abs().max() < 1e-5
        if attention == "hybrid":
            lam = torch.exp(af.F.logsigmoid(attn.gate(h + c[:, :, None])).mean(2) / af.GATE_NORM)  # (B, S, H)
            assert lam.min() < 0.5 < lam.max()  # the decays the test exercises are far from 1
        # the whole network
        par = m(x, t, y)
        state = m.new_state(B, S)
        rec = torch.cat([m(x[:, i:i + 1], t[:, i:i + 1], y, state) for i in range(S)], 1)
        assert (par - rec).abs().max() < 1e-5
        # and the state carries something: image 3 without its predecessors is another output
        alone = m(x[:, 3:4], t[:, 3:4], y, m.new_state(B, S))
        assert (alone[:, 0] - par[:, 3]).abs().max() > 1e-2


@pytest.mark.parametrize("attention", MODES)
def test_image_depends_on_earlier_images_only(attention):
    m, cfg = _model(attention)
    x, t, y = _inputs(cfg)
    x2 = x.clone()
    x2[:, 2] += torch.randn_like(x2[:, 2])  # change image 2 only
    with torch.no_grad():
        a, b = m(x, t, y), m(x2, t, y)
    diff = (a - b).abs().amax((0, 2, 3, 4))  # per image
    assert diff[:2].max() < 1e-6, diff  # images before it do not see it
    assert diff[3:].min() > 1e-2, diff  # images after it do


@pytest.mark.parametrize("attention", MODES)
def test_attention_within_an_image_is_bidirectional(attention):
    m, cfg = _model(attention, img_size=6, data="synthetic.npz")  # 3x3 patches per image
    x, t, y = _inputs(cfg)
    x2 = x.clone()
    x2[:, 1, :, -2:, -2:] += 1.0  # the last patch (bottom right) of image 1
    with torch.no_grad():
        a, b = m(x, t, y), m(x2, t, y)
    assert (a[:, 1, :, :2, :2] - b[:, 1, :, :2, :2]).abs().max() > 1e-2  # reaches the first patch of image 1
    assert (a[:, 0] - b[:, 0]).abs().max() < 1e-6


def test_guidance_w1_is_the_conditional_prediction_and_guides_all_channels():
    m, cfg = _model(channels=4)  # 4 channels, like SD latents: the reference would guide only 3
    y = torch.tensor([0, 3])
    z = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    c = dataclasses.replace(cfg, sampler="sde", sample_steps=6, guidance=1.0)
    plain = af.sample(m, y, c, torch.Generator().manual_seed(5), z=z, guided=False)
    batched = af.sample(m, y, c, torch.Generator().manual_seed(5), z=z, guided=True)  # cond + null batch, w = 1
    torch.testing.assert_close(batched, plain, atol=1e-5, rtol=0)
    # w = 2.5 over a few steps: v_u + w (v_c - v_u) against separate cond and null runs, every channel
    w, null = 2.5, torch.full_like(y, cfg.num_classes)
    sg, sc, su = m.new_state(4, 4), m.new_state(2, 4), m.new_state(2, 4)
    for k, t in enumerate((0.0, 0.3, 0.6)):
        x = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(k))
        v = af.velocity(m, x, t, y, sg, w, guided=True)
        v_c, v_u = af.velocity(m, x, t, y, sc, w, False), af.velocity(m, x, t, null, su, w, False)
        torch.testing.assert_close(v, v_u + w * (v_c - v_u), atol=1e-5, rtol=0)
        assert ((v - v_c).abs().amax((0, 2, 3)) > 1e-3).all()  # every channel is guided


def test_sde_without_noise_is_the_euler_ode():
    m, cfg = _model()
    y = torch.tensor([1, 2, 0])
    z = torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    base = dataclasses.replace(cfg, sample_steps=8, last_step=0.04)
    euler = af.sample(m, y, dataclasses.replace(base, sampler="euler"), z=z)
    quiet = af.sample(m, y, dataclasses.replace(base, sampler="sde", diffusion_norm=0.0), torch.Generator(), z=z)
    assert torch.equal(quiet, euler)
    noisy = af.sample(m, y, dataclasses.replace(base, sampler="sde"), torch.Generator().manual_seed(0), z=z)
    heun = af.sample(m, y, dataclasses.replace(base, sampler="heun"), z=z)
    assert (noisy - euler).abs().max() > 1e-2 and (heun - euler).abs().max() > 1e-3
    ts = af.time_grid(250, 0.04)  # the reference grid: 249 uniform steps to 0.96, then one of 0.04
    assert len(ts) == 251 and abs(ts[-2] - 0.96) < 1e-12 and ts[-1] == 1.0
    assert af.time_grid(4, 0.0) == [0.0, 0.25, 0.5, 0.75, 1.0]


@pytest.mark.parametrize("attention", MODES)
def test_sampling_state_is_flat_in_steps_for_hybrid_only(attention):
    m, cfg = _model(attention)
    y = torch.tensor([1, 2])
    state = m.new_state(2, 40)

    def size():
        return sum(s.len * s.k[0, 0, 0].numel() * 2 if isinstance(s, common.KVCache) else s.S.numel() for s in state)
    x = torch.randn(2, 2, 4, 4)
    sizes = []
    for k in range(30):
        af.velocity(m, x, k / 30, y, state, 1.0, False)
        sizes.append(size())
    if attention == "hybrid":
        assert sizes[1] == sizes[-1]  # the recurrent state does not grow
    else:
        assert sizes[-1] == 30 * sizes[0]  # the KV cache grows by one image per step


def test_sequence_sampler_distinct_same_class_flips_world_size_and_resume():
    g = np.random.default_rng(0)
    n, S, C = 60, 4, 3
    x = g.integers(0, 256, (n, 1, 4, 4), dtype=np.uint8)  # random images: each one and its mirror are unique
    y = np.repeat(np.arange(C), n // C)
    cfg = af.Config(data="synthetic.npz", img_size=4, num_classes=C, seq_len=S, batch_size=8, hflip=True, seed=3,
                    label_drop=0.5)
    one = af.SequenceSampler(x, None, y, cfg, (1, 4, 4))
    ref, mir = torch.from_numpy(x).flatten(1), torch.from_numpy(x).flip(-1).flatten(1)
    flips, classes, nulls = [], set(), []
    for batch in (one.batch(s) for s in range(10)):
        xb, yb, t, eps, null = batch
        assert xb.shape == (8, S, 1, 4, 4) and eps.shape == (8, S, 1, 4, 4) and (t.diff(dim=1) >= 0).all()
        for seq, label in zip(xb, yb):
            hits = [(torch.where((ref == im.flatten()).all(1))[0], torch.where((mir == im.flatten()).all(1))[0])
                    for im in seq]
            idx = [int(a[0]) if len(a) else int(b[0]) for a, b in hits]
            flips += [len(a) == 0 for a, _ in hits]
            assert len(set(idx)) == S and all(y[i] == label for i in idx)  # S distinct images of its class
        classes |= set(yb.tolist())
        nulls += null.tolist()
    assert 0.3 < np.mean(flips) < 0.7 and classes == set(range(C)) and 0.2 < np.mean(nulls) < 0.8
    # the global batch does not depend on the world size; a restart at step 4 is the same stream
    two = [af.SequenceSampler(x, None, y, cfg, (1, 4, 4), rank=r, world=2) for r in range(2)]
    for a, b0, b1 in zip(one.batch(7), two[0].batch(7), two[1].batch(7)):
        assert torch.equal(a, torch.cat([b0, b1]))
    it = one(4)
    for a, b in zip(next(it), one.batch(4)):
        assert torch.equal(a, b)
    plain = af.SequenceSampler(x, None, y, dataclasses.replace(cfg, hflip=False), (1, 4, 4)).batch(0)[0]
    assert all((ref == im.flatten()).all(1).any() for im in plain.flatten(0, 1))  # no flips unless asked
    with pytest.raises(ValueError, match="--seq_len 30: class 0 has only 20 images"):
        af.SequenceSampler(x, None, y, dataclasses.replace(cfg, seq_len=30), (1, 4, 4))


def test_short_training_lowers_heldout_loss(tmp_path):
    cfg = af.Config(out_dir=str(tmp_path), steps=60, batch_size=16, lr=2e-3, warmup=10, width=32, heads=2, depth=2,
                    log_every=0, eval_every=0, ckpt_every=0, ema_decay=0.0)
    d = common.Dist()
    common.seed_all(0)
    model, vae = af.build(cfg, d.device)
    before = af.heldout_loss(model, cfg, vae, d)
    x, x_flip, y, _ = af.load_data(cfg)
    data = af.SequenceSampler(x, x_flip, y, cfg, (1, 8, 8))
    common.train(cfg, model, lambda net, b, at: (af.batch_loss(net, b, 10), {}), data, d)
    after = af.heldout_loss(model, cfg, vae, d)
    assert before - after > 0.6, (before, after)  # measured: 1.72 -> 0.97 (a zero velocity scores 1.72)


def test_sizes_and_presets():
    assert af.ARCHS["XL/2"] == dict(depth=28, width=1152, heads=18, patch_size=2)  # 18 heads of 64
    assert af.ARCHS["B/4"] == dict(depth=12, width=768, heads=12, patch_size=4) and len(af.ARCHS) == 12
    big = af.Config(**af.PRESETS["imagenet128"])
    assert (big.seq_len, big.lr, big.weight_decay, big.grad_clip_value, big.ema_decay) == (5, 1e-4, 0.02, 3.0, 0.9999)
    assert (big.guidance, big.guide_channels) == (1.5, 3)  # the paper's figure, guided as the official sampler
    assert not {"eval_n", "eval_guidance"} & (set(af.PRESETS["imagenet128"]) | set(af.PRESETS["imagenet256"]))
    assert af.latent_shape(big) == (4, 16) and af.latent_shape(af.Config(**af.PRESETS["imagenet256"])) == (4, 32)
    demo = af.Config(**af.PRESETS["digits"])
    assert af.ARFlow(demo, 1, 8).N == 4 and not demo.hflip  # mirrored digits are not digits


SMALL = ["--width", "32", "--heads", "2", "--depth", "1", "--batch_size", "8", "--log_every", "2", "--eval_every",
         "0", "--ckpt_every", "0", "--eval_n", "20", "--eval_guidance", "1,2", "--sample_steps", "4", "--warmup", "2"]


def _run(argv, capsys):
    af.main([str(a) for a in argv])
    return capsys.readouterr().out


def test_cli_resume_equals_uninterrupted_then_sample_and_eval(tmp_path, capsys):
    _run(SMALL + ["--steps", 6, "--out_dir", tmp_path / "a"], capsys)
    _run(SMALL + ["--steps", 6, "--stop_after", 3, "--out_dir", tmp_path / "b"], capsys)
    assert common.load_checkpoint(tmp_path / "b" / "ckpt.pt")["step"] == 3
    _run(SMALL + ["--steps", 6, "--out_dir", tmp_path / "b", "--resume"], capsys)
    a, b = (common.load_checkpoint(tmp_path / p / "ckpt.pt") for p in ("a", "b"))
    assert b["step"] == 6 and a["model"].keys() == b["model"].keys()
    for part in ("model", "ema"):
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), (part, k)
    assert (tmp_path / "a" / "samples.png").exists()
    out = tmp_path / "s.npz"
    _run(["--sample", "--ckpt", tmp_path / "a" / "ckpt.pt", "--n", 12, "--out", out, "--guidance", 2, "--sampler",
          "heun"], capsys)
    with np.load(out) as f:
        assert f["images"].shape == (12, 8, 8, 1) and f["images"].dtype == np.uint8
        assert f["labels"].tolist() == [i % 10 for i in range(12)] and f["images"].std() > 1
    res = json.loads(_run(["--eval", "--ckpt", tmp_path / "a" / "ckpt.pt"], capsys).strip().splitlines()[-1])
    assert {"val_loss", "fd_w1", "accuracy_w2", "fd_floor", "best_guidance"} <= res.keys()
    assert 0 <= res["accuracy_w1"] <= 1 and res["fd_best"] == min(res["fd_w1"], res["fd_w2"])


def test_torchrun_two_processes_match_single_process(tmp_path, capsys):
    _run(SMALL + ["--steps", 4, "--out_dir", tmp_path / "one", "--eval_n", 10], capsys)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone", str(ROOT / "arflow.py")]
    args = [str(a) for a in SMALL + ["--steps", 4, "--out_dir", tmp_path / "two", "--eval_n", 10]]
    r = subprocess.run(cmd + args, capture_output=True, text=True, timeout=300, cwd=ROOT,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    assert "accuracy_w2" in r.stdout  # the end-of-training evaluation ran on both ranks
    a, b = (common.load_checkpoint(tmp_path / p / "ckpt.pt") for p in ("one", "two"))
    for k in a["model"]:
        torch.testing.assert_close(a["model"][k], b["model"][k], atol=2e-5, rtol=0, msg=k)


def test_latents_precompute_flip_and_decode(tmp_path):
    folder = common.train_vae(tmp_path, steps=0)  # an untrained VAE is a latent space: 16x16 digits -> 4x8x8
    x, y = common.load_digits("test", 16)
    np.savez(tmp_path / "imgs.npz", images=x[:20].permute(0, 2, 3, 1).numpy(), labels=y[:20].numpy())
    cfg = af.Config(data=str(tmp_path / "lat"), img_size=16, vae=folder, vae_family="sd", width=32, heads=2, depth=1,
                    sample_steps=3, seq_len=1, hflip=True)
    af.precompute_latents(cfg, str(tmp_path / "imgs.npz"), common.Dist())
    lat, lat_flip, lab, (lv, lv_flip) = af.load_data(cfg)
    vae = af.load_vae(cfg, "cpu")
    imgs = common.to_float(x[:20])
    torch.testing.assert_close(torch.tensor(lat).float(), vae.encode(imgs), atol=2e-2, rtol=0)  # fp16
    torch.testing.assert_close(torch.tensor(lat_flip).float(), vae.encode(imgs.flip(-1)), atol=2e-2, rtol=0)
    scale2 = 2 * np.log(vae.scaling_factor)  # the log-variance of the scaled latent
    torch.testing.assert_close(torch.tensor(lv).float(), vae.ae.encode(imgs)[1] + scale2, atol=2e-2, rtol=0)
    torch.testing.assert_close(torch.tensor(lv_flip).float(), vae.ae.encode(imgs.flip(-1))[1] + scale2, atol=2e-2,
                               rtol=0)
    assert np.array_equal(lab, y[:20].numpy())
    model, _ = af.build(cfg, "cpu")
    assert (model.C, model.side) == (4, 8)
    c64 = dataclasses.replace(cfg, batch_size=64)
    means = af.SequenceSampler(lat, lat_flip, lab, c64, (4, 8, 8)).batch(0)  # posterior means only (old folders)
    pool = torch.cat([torch.tensor(lat), torch.tensor(lat_flip)]).flatten(1)
    hit = [torch.where((pool == b.flatten()).all(1))[0] for b in means[0][:, 0]]
    assert all(len(h) for h in hit) and 0 < sum(int(h[0]) >= 20 for h in hit) < 64  # encoded mirrors are used
    # with the log-variances, a fresh posterior draw mean + std z every batch; all else as before
    drawn = af.SequenceSampler(lat, lat_flip, lab, c64, (4, 8, 8), logvar=(lv, lv_flip)).batch(0)
    unit = af.SequenceSampler(lat, lat_flip, lab, c64, (4, 8, 8), logvar=(0 * lv, 0 * lv_flip)).batch(0)
    assert all(torch.equal(a, b) for a, b in zip(means[1:], drawn[1:]))
    z = (unit[0] - means[0].float())[:, 0]  # the standard normal draw itself (std 1)
    assert 0.9 < z.std() < 1.1
    std = torch.cat([torch.tensor(lv), torch.tensor(lv_flip)]).float().mul(0.5).exp()[torch.stack([h[0] for h in hit])]
    torch.testing.assert_close(drawn[0][:, 0], means[0][:, 0].float() + std * z, atol=1e-5, rtol=0)
    assert (std * z).abs().mean() > 1e-2  # the draws move the latents
    # images encoded as they train (no --precompute): the same posterior draws as the folder's, mirrors included
    fly = af.SequenceSampler(x[:20].numpy(), None, lab, c64, (4, 8, 8), encode=True).batch(0)
    assert len(fly) == 6 and all(torch.equal(a, b) for a, b in zip(fly[1:5], drawn[1:]))
    torch.testing.assert_close(af.to_model_space(fly[0], vae, fly[5]), drawn[0].float(), atol=3e-2, rtol=0)
    torch.testing.assert_close(af.to_model_space(fly[0], vae), means[0].float(), atol=3e-2, rtol=0)  # no draws
    out = af.generate(model.eval(), cfg, torch.tensor([0, 5, 9]), vae, seed=0)
    assert out.shape == (3, 1, 16, 16) and out.dtype == torch.uint8


def test_image_folders_train_pixel_and_latent_models(tmp_path, capsys, monkeypatch):
    """--data an image folder (class subfolders or flat): a pixel model at the images' size and channels; a latent
    model (a tiny random VAE) encodes the images through --vae at every step instead of refusing them."""
    need("PIL")
    rng = np.random.default_rng(0)
    for c in range(2):
        for i in range(4):
            common.save_png(tmp_path / "rgb" / f"class{c}" / f"{i}.png", rng.integers(0, 256, (12, 12, 3), np.uint8))
    x, y = common.load_digits("test", 16)
    for i in range(6):
        common.save_png(tmp_path / "digits" / f"{i}.png", x[i, 0].numpy())  # flat: one class, grey
    tiny = ["--width", 16, "--heads", 2, "--depth", 1, "--seq_len", 2, "--steps", 2, "--batch_size", 4,
            "--sample_steps", 2, "--ckpt_every", 0]
    _run(tiny + ["--data", tmp_path / "rgb", "--patch_size", 4, "--out_dir", tmp_path / "px"], capsys)
    m, cfg = af.from_checkpoint(tmp_path / "px" / "ckpt.pt")
    assert (cfg.img_size, cfg.channels, m.C, m.side) == (12, 3, 3, 12)
    assert (tmp_path / "px" / "samples.png").exists()
    x_, _, y_, _ = af.load_data(cfg)
    assert x_.shape == (8, 3, 12, 12) and y_.tolist() == [0] * 4 + [1] * 4  # images read as batches ask for them
    assert np.array_equal(x_[np.array([5, 1])], np.stack([x_[np.array([5])][0], x_[np.array([1])][0]]))
    vae = common.train_vae(tmp_path, steps=0)  # 1-channel 16x16 -> 4x8x8
    capsys.readouterr()
    latent = tiny + ["--data", tmp_path / "digits", "--vae_family", "sd", "--patch_size", 2]
    assert "encodes images through --vae PATH" in _error(latent + ["--out_dir", tmp_path / "no"], capsys)
    encoded = []
    encode = common.VAE.encode
    monkeypatch.setattr(common.VAE, "encode", lambda self, x, **kw: encoded.append(x.shape) or encode(self, x, **kw))
    _run(latent + ["--vae", vae, "--out_dir", tmp_path / "lat"], capsys)
    m, cfg = af.from_checkpoint(tmp_path / "lat" / "ckpt.pt")
    assert (cfg.img_size, cfg.channels, m.C, m.side) == (16, 1, 4, 8)  # trained on latents of the folder's images
    assert (4 * 2, 1, 16, 16) in encoded  # a training batch: 4 sequences of 2 images, encoded on the fly
    state = common.load_checkpoint(tmp_path / "lat" / "ckpt.pt")
    assert state["step"] == 2 and all(torch.isfinite(v).all() for v in state["model"].values())


def _error(argv, capsys) -> str:
    with pytest.raises(SystemExit) as e:
        common.run(lambda: af.main([str(a) for a in argv]))
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err, err
    return err


def test_bad_inputs_give_one_clear_line(tmp_path, capsys):
    out = ["--out_dir", tmp_path / "o"]
    assert _error(["--patch_size", 3] + out, capsys) == "error: --img_size 8 is not divisible by --patch_size 3"
    assert _error(["--channels", 3] + out, capsys).startswith("error: digits have 1 channel, 10 classes")
    assert _error(["--width", 30, "--heads", 4] + out, capsys) == "error: --width 30 is not divisible by --heads 4"
    assert _error(["--attention", "linear"] + out, capsys) == \
        "error: --attention 'linear' is not one of: hybrid, softmax"
    assert _error(["--seq_len", 500, "--steps", 1] + out, capsys).startswith("error: --seq_len 500: class 0 has only")
    assert _error(["--sample", "--ckpt", tmp_path / "missing.pt"], capsys) == \
        f"error: no checkpoint at {tmp_path / 'missing.pt'}"
    np.savez(tmp_path / "bad.npz", images=np.zeros((4, 8, 8, 3), np.uint8), labels=np.zeros(4, np.int64))
    assert _error(["--data", tmp_path / "bad.npz", "--channels", 1, "--steps", 1] + out, capsys) == \
        f"error: {tmp_path / 'bad.npz'}: images must be (N, 8, 8, 1) uint8, got (4, 8, 8, 3)"
    np.savez(tmp_path / "lab.npz", images=np.zeros((4, 8, 8, 1), np.uint8), labels=np.array([0, 1, 2, 12]))
    assert "needs one label in [0, 10)" in _error(["--data", tmp_path / "lab.npz", "--steps", 1] + out, capsys)
    other = {"kind": "starflow", "config": {}, "model": {}}
    torch.save(other, tmp_path / "other.pt")
    assert _error(["--eval", "--ckpt", tmp_path / "other.pt"], capsys) == \
        "error: --ckpt is a starflow checkpoint, not arflow"
    m, cfg = _model()
    with pytest.raises(ValueError, match=r"class labels must be in \[0, 5\)"):
        af.generate(m, cfg, torch.tensor([3, 5]), None, seed=0)
    with pytest.raises(ValueError, match=r"expected x \(B, S, 2, 4, 4\)"):
        m(torch.randn(1, 2, 3, 4, 4), torch.rand(1, 2), torch.tensor([1]))
    with pytest.raises(ValueError, match="--width 32 is not divisible by --heads 3"):
        dataclasses.replace(cfg, heads=3)


# ----------------------------------------------------------------------------------------------------------------------
# The official model (TheFllood/ARFlow): tiny perturbed weights in its checkpoint format, its outputs (fixtures README)

FIX = ROOT / "tests" / "fixtures"


def _official():
    m, cfg = af.from_official(FIX / "arflow_official.pt")
    return m, cfg, torch.load(FIX / "arflow_official_io.pt", weights_only=True)


def test_official_network_equals_the_official_model():
    m, cfg, io = _official()
    assert (cfg.width, cfg.heads, cfg.depth, cfg.patch_size, cfg.num_classes, cfg.mlp_ratio, cfg.t_scale) == \
        (16, 2, 2, 2, 5, 4.0, 1.0) and (m.C, m.side, cfg.vae_family, cfg.img_size) == (4, 4, "sd", 32)
    with torch.no_grad():
        out = m(io["x"], io["t"], io["y"])  # a sorted-noise sequence of 3 images, one label the null label
    assert (out - io["out"]).abs().max() < 1e-5  # measured 9.5e-7; the per-head q/k/v norm is 0.49 off
    # the stored position table is used: it is not the sin-cos table (the fixture perturbs every parameter)
    assert (m.pos - af.sincos_2d(16, 2)).abs().max() > 0.1


def test_official_sampler_equals_the_official_loop():
    m, cfg, io = _official()
    assert {k: getattr(cfg, k) for k in af.OFFICIAL_SAMPLER} == af.OFFICIAL_SAMPLER
    assert (cfg.sampler, cfg.sample_steps, cfg.guidance, cfg.guide_channels) == ("sde", 250, 4.5, 3)
    c = dataclasses.replace(cfg, sample_steps=io["steps"])  # 5 Euler-Maruyama steps to 0.96, then 0.04
    y, z, noise = io["labels"], io["z"], io["noise"][:, :2]  # the official guided batch's first half of the draws

    def run(**kw):
        return af.sample(m, y, dataclasses.replace(c, **kw), z=z, noise=noise)
    assert (run(guidance=1.5) - io["sde_guided_w1.5"]).abs().max() < 1e-4  # measured 1.0e-6
    assert (run(guidance=1.0) - io["sde"]).abs().max() < 1e-4
    assert (run(guidance=1.0, sampler="euler") - io["euler"]).abs().max() < 1e-4  # official SDE loop at norm 0
    assert (run(guidance=1.0, diffusion_norm=0.0) - io["euler"]).abs().max() < 1e-4
    assert (run(guidance=1.5, guide_channels=0) - io["sde_guided_w1.5"]).abs().max() > 1e-3  # the channels matter


def test_official_checkpoint_formats(tmp_path):
    with pytest.raises(Exception, match="argparse.Namespace"):
        torch.load(FIX / "arflow_official.pt", weights_only=True)
    with torch.serialization.safe_globals([argparse.Namespace]):
        full = torch.load(FIX / "arflow_official.pt", weights_only=True)
    assert set(full) == {"model", "ema", "opt", "args"} and full["args"].model == "ARFlow-XL/2"
    m, _, _ = _official()
    # the EMA weights, not the raw ones
    assert torch.equal(m.blocks[1].attn.z.weight, full["ema"]["blocks.1.attn.g_proj.weight"])
    assert not torch.equal(full["ema"]["blocks.1.attn.g_proj.weight"], full["model"]["blocks.1.attn.g_proj.weight"])
    # a plain state_dict of the official model (what sample.py also accepts), through from_checkpoint too
    torch.save(full["ema"], tmp_path / "plain.pt")
    m2, cfg2 = af.from_checkpoint(tmp_path / "plain.pt", guidance=2.0)
    assert cfg2.guidance == 2.0 and all(torch.equal(a, b) for a, b in zip(m.state_dict().values(),
                                                                          m2.state_dict().values()))
    with pytest.raises(ValueError, match="--width 16; the options say otherwise"):
        af.from_official(tmp_path / "plain.pt", width=32)
    torch.save({"ema": full["ema"], "args": Path("x")}, tmp_path / "other.pt")  # any other class is refused
    with pytest.raises(ValueError, match="cannot read checkpoint"):
        af.from_official(tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not an official ARFlow checkpoint"):
        torch.save({"weights": {}}, tmp_path / "foreign.pt")
        af.from_official(tmp_path / "foreign.pt")


def _latent_folder(path, n=40, classes=5, side=4, seed=0):
    g = np.random.default_rng(seed)
    path.mkdir()
    np.save(path / "latents.npy", g.standard_normal((n, 4, side, side)).astype(np.float16))
    np.save(path / "labels.npy", np.arange(n) % classes)
    return path


def test_init_from_the_official_file(tmp_path, capsys):
    data = _latent_folder(tmp_path / "lat")
    arch = ["--data", data, "--vae_family", "sd", "--img_size", 32, "--num_classes", 5, "--width", 16, "--heads", 2,
            "--depth", 2, "--patch_size", 2, "--t_scale", 1]
    run = ["--steps", 1, "--lr", 1e-12, "--warmup", 0, "--batch_size", 4, "--log_every", 1, "--eval_every", 0,
           "--ckpt_every", 0, "--init_from", FIX / "arflow_official.pt"]
    _run(arch + run + ["--out_dir", tmp_path / "o"], capsys)
    m, _, _ = _official()
    got = common.load_checkpoint(tmp_path / "o" / "ckpt.pt")["model"]
    for k, v in m.state_dict().items():
        torch.testing.assert_close(got[k], v, atol=1e-6, rtol=0, msg=k)  # started from the official weights
    err = _error(arch[:8] + ["--width", 32, "--heads", 2, "--depth", 2, "--patch_size", 2, "--t_scale", 1] + run +
                 ["--out_dir", tmp_path / "p"], capsys)
    assert err.startswith("error: --init_from") and "--width 16" in err, err


# ----------------------------------------------------------------------------------------------------------------------
# bf16 parameters (FSDP2's mixed precision keeps them so, with autocast off)


@pytest.mark.parametrize("attention", MODES)
def test_bf16_parameters_train_and_sample(attention):
    m, cfg = _model(attention)
    x, t, _ = _inputs(cfg)
    eps, y = torch.randn_like(x), torch.tensor([1, 4, 5])
    ref = af.flow_loss(m, x, t, eps, y)
    m = m.to(torch.bfloat16).train()
    loss = af.flow_loss(m, x, t, eps, y)
    loss.backward()
    assert loss.dtype == torch.float32 and abs(loss.item() - ref.item()) < 2e-2 * ref.item()
    assert all(p.grad is not None and p.grad.dtype == torch.bfloat16 and torch.isfinite(p.grad).all()
               for p in m.parameters())
    s = af.sample(m.eval(), torch.tensor([0, 3]), dataclasses.replace(cfg, sample_steps=4, guidance=2.0),
                  torch.Generator().manual_seed(0))
    assert s.dtype == torch.float32 and torch.isfinite(s).all() and s.std() > 0.1


FSDP_BF16 = """
import json, sys
sys.path.insert(0, {root!r})
import arflow, common  # --fsdp with --amp: FSDP2's bf16 parameters and fp32 reductions, on the CPU too
seen = set()
forward = arflow.ARFlowBlock.forward
def spy(self, x, c, *a, **k):
    seen.add(str(self.attn.q.weight.dtype))
    return forward(self, x, c, *a, **k)
arflow.ARFlowBlock.forward = spy
common.run(lambda: arflow.main(sys.argv[1:]))
if common.is_main():
    json.dump(sorted(seen), open({out!r}, "w"))
"""


def test_fsdp2_two_processes_with_bf16_parameters(tmp_path):
    script = tmp_path / "fsdp_bf16.py"
    script.write_text(FSDP_BF16.format(root=str(ROOT), out=str(tmp_path / "dtypes.json")))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone", str(script)]
    args = [str(a) for a in SMALL + ["--steps", 2, "--log_every", 1, "--fsdp", "--eval_n", 10, "--out_dir",
                                     tmp_path / "o"]]
    r = subprocess.run(cmd + args, capture_output=True, text=True, timeout=300, cwd=ROOT,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads((tmp_path / "dtypes.json").read_text()) == ["torch.bfloat16"]  # the blocks ran in bf16
    log = [json.loads(line) for line in (tmp_path / "o" / "log.jsonl").read_text().splitlines()]
    steps = [r for r in log if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2] and all(np.isfinite(r["loss"]) and r["skipped"] == 0 for r in steps)
    assert any("accuracy_w2" in r for r in log)  # the evaluation sampled under FSDP2 too
    ck = common.load_checkpoint(tmp_path / "o" / "ckpt.pt")
    assert ck["step"] == 2 and all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in ck["model"].values())


def test_cli_samples_from_the_official_file(tmp_path, capsys):
    folder = common.train_vae(tmp_path, steps=0)  # a latent space with 4 channels, to decode the official latents
    out = tmp_path / "s.npz"
    _run(["--sample", "--ckpt", FIX / "arflow_official.pt", "--vae", folder, "--vae_family", "sd", "--n", 4,
          "--out", out, "--sample_steps", 3], capsys)
    m, cfg = af.from_official(FIX / "arflow_official.pt", vae=folder, sample_steps=3)
    assert (cfg.guidance, cfg.guide_channels, cfg.sampler) == (4.5, 3, "sde")  # sample.py's settings
    ref = af.generate(m, cfg, torch.arange(4) % 5, af.load_vae(cfg, "cpu"), seed=cfg.seed + 1000)
    with np.load(out) as f:
        assert f["labels"].tolist() == [0, 1, 2, 3] and np.array_equal(f["images"], ref.permute(0, 2, 3, 1).numpy())
        assert f["images"].std() > 1


def test_checkpoints_from_before_the_saved_position_table_still_load(tmp_path):
    m, cfg = _model()
    sd = {k: v for k, v in m.state_dict().items() if k != "pos"}
    torch.save({"kind": "arflow", "config": dataclasses.asdict(cfg), "model": sd, "step": 1}, tmp_path / "old.pt")
    m2, _ = af.from_checkpoint(tmp_path / "old.pt")
    assert torch.equal(m2.pos, af.sincos_2d(cfg.width, 2)) and torch.equal(m2.blocks[0].attn.q.weight,
                                                                          m.blocks[0].attn.q.weight)
