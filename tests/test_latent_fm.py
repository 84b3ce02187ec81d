"""latent_fm.py: interpolant, guidance and RAAG, conditions, a trained tiny inpainter, training, CLI."""
import dataclasses
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

import common
import latent_fm as lf
from conftest import ROOT

# pixel space (the identity VAE) keeps most tests to seconds; test_latent_space_through_a_vae covers the VAE path
PIXEL = dict(data="digits", img_size=8, vae_family="none", width=32, depth=2, heads=2, patch_size=2, sample_steps=8)


def _model(perturb=0.05, seed=0, dtype=torch.float64, **kw):
    cfg = lf.Config(**{**PIXEL, **kw})
    vae = lf.load_vae(cfg)
    torch.manual_seed(seed)
    m = lf.build(cfg, vae).to(dtype).eval()
    with torch.no_grad():  # off the zero (adaLN-Zero) init, so the output depends on every input
        for p in m.parameters():
            p.add_(perturb * torch.randn_like(p))
    return m, cfg, vae


def test_interpolant_and_target_are_lfms_closed_forms():
    g = torch.Generator().manual_seed(0)
    z0, eps = torch.randn(5, 4, 3, 3, generator=g, dtype=torch.float64), torch.randn(5, 4, 3, 3, generator=g,
                                                                                      dtype=torch.float64)
    t = torch.tensor([0.0, 0.25, 0.5, 0.9, 1.0], dtype=torch.float64)
    zt, u = lf.interpolant(z0, eps, t)
    s = 1e-5
    for i, ti in enumerate(t.tolist()):
        torch.testing.assert_close(zt[i], (1 - ti) * z0[i] + (s + (1 - s) * ti) * eps[i], atol=1e-12, rtol=0)
    torch.testing.assert_close(u, (1 - s) * eps - z0, atol=1e-12, rtol=0)
    torch.testing.assert_close(zt[0], z0[0] + s * eps[0], atol=1e-12, rtol=0)  # t = 0: data (+ sigma_min noise)
    torch.testing.assert_close(zt[-1], eps[-1], atol=1e-12, rtol=0)  # t = 1: pure noise
    h = 1e-6  # u is dz_t/dt
    fd = (lf.interpolant(z0, eps, t + h)[0] - lf.interpolant(z0, eps, t - h)[0]) / (2 * h)
    torch.testing.assert_close(fd, u, atol=1e-7, rtol=0)
    # and the loss is the mean squared error against that target
    net = lambda z, tt, y, sp: torch.zeros_like(z)  # noqa: E731
    assert abs(lf.lfm_loss(net, z0, t=t, eps=eps).item() - u.square().mean().item()) < 1e-12


def test_guidance_s1_is_conditional_s0_unconditional_batched_in_one_forward():
    m, cfg, _ = _model()
    z = torch.randn(3, 1, 8, 8, dtype=torch.float64)
    y = torch.tensor([1, 4, 7])
    tt = torch.full((3,), 0.3, dtype=torch.float64)
    v_c, v_u = m(z, tt, y), m(z, tt, torch.full_like(y, 10))
    assert (v_c - v_u).abs().max() > 1e-3  # the label matters
    calls = []
    m.register_forward_hook(lambda mod, args, out: calls.append(len(args[0])))
    for s, want in ((1.0, v_c), (0.0, v_u), (2.5, v_u + 2.5 * (v_c - v_u))):
        calls.clear()
        c = dataclasses.replace(cfg, guidance=s)
        got = lf.velocity(m, c, y)(0.3, z)
        torch.testing.assert_close(got, want, atol=1e-10, rtol=0)
        assert calls == ([3] if s == 1.0 else [6])  # guided: cond and null branches in one forward of 2B
    # RAAG with w_max = 1 is plain conditional sampling
    raag = dataclasses.replace(cfg, guidance_rule="raag", raag_w_max=1.0)
    torch.testing.assert_close(lf.velocity(m, raag, y)(0.3, z), v_c, atol=1e-10, rtol=0)


def test_raag_weight_follows_its_formula_and_limits():
    rho = torch.tensor([0.0, 0.05, 0.3, 1e3], dtype=torch.float64)
    w = lf.raag_weight(rho, 18.0, 12.0)
    torch.testing.assert_close(w, 1 + 17 * torch.exp(-12 * rho))
    assert w[0] == 18.0 and abs(w[-1] - 1.0) < 1e-12 and (w.diff() < 0).all()  # w_max at rho = 0, -> 1 as rho grows
    m, cfg, _ = _model()
    z, y = torch.randn(4, 1, 8, 8, dtype=torch.float64), torch.tensor([0, 3, 5, 9])
    tt = torch.full((4,), 0.7, dtype=torch.float64)
    v_c, v_u = m(z, tt, y), m(z, tt, torch.full_like(y, 10))
    d = v_c - v_u
    for per in ("sample", "batch"):
        c = dataclasses.replace(cfg, guidance_rule="raag", raag_w_max=6.0, raag_alpha=3.0, raag_ratio=per)
        if per == "sample":
            rho = d.flatten(1).norm(dim=1) / v_u.flatten(1).norm(dim=1)
        else:
            rho = (d.norm() / v_u.norm()).expand(4)
        want = v_u + (1 + 5 * torch.exp(-3 * rho)).view(4, 1, 1, 1) * d
        torch.testing.assert_close(lf.velocity(m, c, y)(0.7, z), want, atol=1e-10, rtol=0)
    assert rho.std() == 0 and d.flatten(1).norm(dim=1).std() > 0  # per-batch: one ratio; per-sample would differ


def test_inpaint_and_semantic_outputs_depend_on_the_condition_and_the_rescaler_learns():
    m, cfg, vae = _model(condition="inpaint")
    assert m.dit.x_embed.in_channels == 1 + 1 + 1  # z_t, masked image latent, mask
    x = common.to_float(common.load_digits("test", 8)[0][:4]).double()
    z, tt = torch.randn(4, 1, 8, 8, dtype=torch.float64), torch.full((4,), 0.5, dtype=torch.float64)
    box, free = lf.center_mask(4, 8).double(), lf.random_masks(4, 8, "free", torch.Generator().manual_seed(0)).double()
    a, b = (m(z, tt, None, lf.inpaint_condition(vae, x, mk)) for mk in (box, free))
    c = m(z, tt, None, lf.inpaint_condition(vae, x.roll(1, 0), box))
    assert (a - b).abs().max() > 1e-3 and (a - c).abs().max() > 1e-3  # the mask and the image both matter
    m, cfg, vae = _model(condition="semantic", seg_classes=3)
    seg = lf.digit_segmentation(common.load_digits("test", 8)[0][:4])
    assert set(seg.unique().tolist()) <= {0, 1, 2}
    oh = lf.one_hot_seg(seg, 3, 8).double()
    other = lf.one_hot_seg(seg.roll(1, 0), 3, 8).double()
    assert (m(z, tt, None, oh) - m(z, tt, None, other)).abs().max() > 1e-3
    m.train()
    lf.lfm_loss(m, z, None, oh).backward()  # trained jointly (the official loop runs it under no_grad)
    assert m.rescaler.conv.weight.grad.abs().sum() > 0


def test_digit_segmentation_finds_enclosed_background():
    img = torch.zeros(1, 1, 6, 6, dtype=torch.uint8)
    img[0, 0, 1:5, 1:5] = 255  # a ring of ink around a 2x2 hole
    img[0, 0, 2:4, 2:4] = 0
    seg = lf.digit_segmentation(img)[0]
    assert seg[2:4, 2:4].eq(2).all() and seg[0].eq(0).all() and seg[1, 1:5].eq(1).all()
    img[0, 0, 2, 1] = 0  # open the ring: the hole joins the outside
    assert not lf.digit_segmentation(img).eq(2).any()


@pytest.fixture(scope="module")
def tiny_inpainter(tmp_path_factory):
    """A tiny pixel-space inpainting DiT trained for 150 steps (seconds), with its held-out loss before and after."""
    out = str(tmp_path_factory.mktemp("inpaint"))
    cfg = lf.Config(**{**PIXEL, "condition": "inpaint", "sampler": "euler", "out_dir": out, "steps": 150,
                       "batch_size": 64, "lr": 2e-3, "warmup": 20, "ema_decay": 0.99, "log_every": 0, "eval_every": 0,
                       "ckpt_every": 0})
    common.seed_all(0)
    vae = lf.load_vae(cfg)
    model = lf.build(cfg, vae)
    x, y = common.load_digits("test", 8)
    test = common.ArrayDataset(*lf.encode_moments(vae, common.to_float(x)), y, x)
    before = lf.heldout_loss(model, cfg, test, vae)

    def loss_fn(net, batch, at):
        z0, t, eps, yy, sp = lf.batch_inputs(model, batch, vae)
        return lf.lfm_loss(net, z0, yy, sp, t, eps), {}
    d = common.Dist()
    data = lambda step: common.batches(lf.train_data(cfg, vae), cfg.batch_size, d, cfg.seed, step,  # noqa: E731
                                       noise=lambda g, n: lf.draw_noise(cfg, n, (1, 8, 8), g, d.device))
    model, ema = common.train(cfg, model, loss_fn, data, d)
    common.load_weights(model, {"model": model.state_dict(), "ema": ema.state_dict()})
    return model.eval(), cfg, vae, before, lf.heldout_loss(model, cfg, test, vae)


def test_short_training_lowers_the_heldout_loss(tiny_inpainter):
    *_, before, after = tiny_inpainter
    assert before - after > 0.5, (before, after)  # measured: 1.72 -> 0.43


def test_trained_tiny_inpainter_reproduces_the_known_region(tiny_inpainter):
    model, cfg, vae, *_ = tiny_inpainter
    x = common.load_digits("test", 8)[0]
    mask = lf.center_mask(len(x), 8)
    imgs, _ = lf.generate(model, cfg, vae, len(x), spatial=lf.inpaint_condition(vae, common.to_float(x), mask))
    got, ref, known = common.to_float(imgs), common.to_float(x), 1 - mask
    err = ((got - ref).square() * known).sum() / known.sum()
    chance = ((got - ref.roll(1, 0)).square() * known).sum() / known.sum()  # against another test digit
    assert err < 0.1 * chance, (err, chance)  # measured: 0.010 vs 0.38


def test_cosine_schedule_is_lfms_cosine_annealing_to_min_lr():
    """LFM's schedule is torch's CosineAnnealingLR(T_max = steps, eta_min = min_lr); common's cosine with --min_lr
    gives its learning rates, through the schedule itself (no optimizer hooks)."""
    cfg = lf.Config(**{**PIXEL, "lr": 1e-2, "min_lr": 1e-3, "warmup": 0, "steps": 10})
    lrs = []
    for make in (lambda o: torch.optim.lr_scheduler.LambdaLR(o, common.lr_lambda(cfg)),
                 lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=cfg.steps, eta_min=cfg.min_lr)):
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.lr)
        sched, got = make(opt), []
        for _ in range(cfg.steps + 1):
            got.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
        lrs.append(got)
    assert np.allclose(lrs[0], lrs[1], rtol=1e-9, atol=0) and lrs[0][-1] == pytest.approx(1e-3)


SMALL = ["--data", "digits", "--img_size", "8", "--vae_family", "none", "--width", "32", "--depth", "1", "--heads",
         "2", "--batch_size", "16", "--log_every", "2", "--eval_every", "0", "--ckpt_every", "0", "--eval_n", "20",
         "--sample_steps", "4", "--sampler", "euler"]


def test_cli_resume_equals_uninterrupted_and_sample_npz(tmp_path):
    lf.main(SMALL + ["--steps", "6", "--out_dir", str(tmp_path / "a")])
    lf.main(SMALL + ["--steps", "6", "--stop_after", "3", "--out_dir", str(tmp_path / "b")])
    assert common.load_checkpoint(tmp_path / "b" / "ckpt.pt")["step"] == 3
    lf.main(SMALL + ["--steps", "6", "--out_dir", str(tmp_path / "b"), "--resume"])
    a, b = (common.load_checkpoint(tmp_path / p / "ckpt.pt") for p in ("a", "b"))
    assert b["step"] == 6
    for part in ("model", "ema"):
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), (part, k)
    out = tmp_path / "s.npz"
    lf.main(["--sample", "--ckpt", str(tmp_path / "a" / "ckpt.pt"), "--n", "12", "--out", str(out), "--guidance_rule",
             "raag"])
    with np.load(out) as f:
        assert f["images"].shape == (12, 8, 8, 1) and f["images"].dtype == np.uint8
        assert f["labels"].tolist() == [i % 10 for i in range(12)]
        assert f["images"].std() > 1


def _run(args, ok=True, cmd=(sys.executable, str(ROOT / "latent_fm.py"))):
    r = subprocess.run(list(cmd) + args, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert (r.returncode == 0) == ok, r.stderr[-3000:]
    return r


def test_torchrun_two_processes_match_one(tmp_path):
    lf.main(SMALL + ["--steps", "4", "--out_dir", str(tmp_path / "one")])
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
                str(ROOT / "latent_fm.py")]
    _run(SMALL + ["--steps", "4", "--out_dir", str(tmp_path / "two")], cmd=torchrun)
    a, b = (common.load_checkpoint(tmp_path / p / "ckpt.pt") for p in ("one", "two"))
    for k in a["model"]:
        torch.testing.assert_close(a["model"][k], b["model"][k], atol=2e-5, rtol=0, msg=k)
    assert any((a["model"][k] != 0).any() and k.endswith("linear_out.weight") for k in a["model"])  # it trained
    # the noise travels with its example: the logged losses (all-reduced over ranks) agree, not only the weights
    logs = [[json.loads(s)["loss"] for s in (tmp_path / p / "log.jsonl").read_text().splitlines() if '"loss"' in s]
            for p in ("one", "two")]
    assert len(logs[0]) == 2 and np.allclose(logs[0], logs[1], rtol=1e-5, atol=0), logs


def test_bad_inputs_give_one_clear_line(tmp_path):
    m, cfg, vae = _model(condition="inpaint", dtype=torch.float32)
    x = common.to_float(common.load_digits("test", 8)[0][:2])
    with pytest.raises(ValueError, match=r"^inpainting mask of shape \(2, 1, 4, 4\) does not match the images: "
                                         r"expected \(2, 1, 8, 8\), 1 = region to fill$"):
        lf.inpaint_condition(vae, x, torch.ones(2, 1, 4, 4))
    m, cfg, vae = _model(dtype=torch.float32)
    with pytest.raises(ValueError, match=r"^class labels must be integers in \[0, 10\), got 3\.\.10$"):
        lf.sample(m, cfg, torch.randn(2, 1, 8, 8), torch.tensor([3, 10]))
    seg = torch.zeros(2, 8, 8, dtype=torch.long)
    seg[0, 0, 0] = 4
    with pytest.raises(ValueError, match=r"^segmentation map has classes 0\.\.4, but the model has --seg_classes 3$"):
        lf.one_hot_seg(seg, 3, 8)
    with pytest.raises(ValueError, match="need --condition class"):
        lf.Config(condition="inpaint", guidance=2.0)
    # through the command line: a --cond file whose masks do not fit the images, and the one-line "error:" output
    lf.main(["--preset", "digits-inpaint"] + SMALL + ["--steps", "1", "--out_dir", str(tmp_path / "inp")])
    x8 = common.load_digits("test", 8)[0][:3].permute(0, 2, 3, 1).numpy()
    np.savez(tmp_path / "c.npz", images=x8, masks=np.ones((3, 4, 4), np.uint8))
    with pytest.raises(ValueError, match=r"^inpainting mask of shape \(3, 1, 4, 4\) does not match"):
        lf.main(["--sample", "--ckpt", str(tmp_path / "inp" / "ckpt.pt"), "--cond", str(tmp_path / "c.npz"),
                 "--n", "3", "--out", str(tmp_path / "o.npz")])
    r = _run(SMALL + ["--patch_size", "3", "--steps", "1", "--out_dir", str(tmp_path / "p")], ok=False)
    assert r.stderr.strip().splitlines()[-1] == ("error: the latent side 8 (--img_size 8 / VAE downsampling 1) is not "
                                                 "divisible by --patch_size 3")


def test_latent_space_through_a_vae(tmp_path):
    folder = common.train_vae(tmp_path, steps=20)  # a real (if rough) latent space: 16x16 digits -> 4x8x8
    cfg = lf.Config(data="digits", img_size=16, vae=folder, vae_family="sd", width=32, depth=1, heads=2,
                    condition="semantic", sampler="euler", sample_steps=2)
    vae = lf.load_vae(cfg)
    model = lf.build(cfg, vae).eval()
    assert (model.C, model.S, model.rescaler.stages) == (4, 8, 1)  # log2 of the VAE's downsampling 2
    x, y = common.load_digits("test", 16)
    mean, std = lf.encode_moments(vae, common.to_float(x[:8]))
    torch.testing.assert_close(mean, vae.encode(common.to_float(x[:8])), atol=1e-5, rtol=0)
    assert 0 < std.mean() < 1
    imgs, nfe = lf.generate(model, cfg, vae, 3, spatial=lf.one_hot_seg(lf.digit_segmentation(x[:3]), 3, 16))
    assert imgs.shape == (3, 1, 16, 16) and imgs.dtype == torch.uint8 and nfe == 2
    # precomputed latents: an .npz of images -> mean/std/labels/segmentation .npy, read back as the training data
    seg = lf.digit_segmentation(x[:10]).numpy()
    np.savez(tmp_path / "imgs.npz", images=x[:10].permute(0, 2, 3, 1).numpy(), labels=y[:10].numpy(), segmentation=seg)
    lat_cfg = dataclasses.replace(cfg, data=str(tmp_path / "latents"))
    lf.precompute(lat_cfg, str(tmp_path / "imgs.npz"), common.Dist())
    m, s, lab, sg = lf.train_data(lat_cfg, vae)[np.arange(10)]
    torch.testing.assert_close(m.float(), lf.encode_moments(vae, common.to_float(x[:10]))[0], atol=2e-2, rtol=0)
    assert torch.equal(lab, y[:10]) and torch.equal(sg.long(), torch.as_tensor(seg).long())
    noise = lf.draw_noise(cfg, 10, (4, 8, 8), torch.Generator().manual_seed(0), "cpu")
    z0, t, eps, _, sp = lf.batch_inputs(model, [m, s, lab, sg] + noise, vae)
    assert sp.shape == (10, 3, 16, 16) and torch.equal(z0, m.float() + s.float() * noise[2])  # a posterior sample


def test_trained_tiny_inpainter_fills_the_hole_from_the_visible_ring(tiny_inpainter):
    """What the model puts in the hole, not only the known region: the filled centre is closer to the true digit's
    centre than another test digit's centre is (a draw that ignored the ring), for the same digits."""
    model, cfg, vae, *_ = tiny_inpainter
    x = common.load_digits("test", 8)[0]
    mask = lf.center_mask(len(x), 8)
    imgs, _ = lf.generate(model, cfg, vae, len(x), spatial=lf.inpaint_condition(vae, common.to_float(x), mask))
    got, ref = common.to_float(imgs), common.to_float(x)
    hole = ((got - ref).square() * mask).sum() / mask.sum()
    chance = ((ref.roll(1, 0) - ref).square() * mask).sum() / mask.sum()
    # a fill that ignored the ring would be a draw of the digits' marginal: as far as another digit (ratio ~1)
    assert hole < 0.9 * chance, (hole, chance)  # measured: 0.84 vs 1.12 after 150 steps


# --- the official LFM DiT (tests/fixtures/README.md: tiny random weights, official outputs) -------------------------

FIX = ROOT / "tests" / "fixtures"


@pytest.fixture(scope="module")
def official():
    io = torch.load(FIX / "latent_fm_io.pt", weights_only=True)
    mc, cc = lf.from_official(FIX / "latent_fm_class_model_5.pth", heads=2)
    mu, cu = lf.from_official(FIX / "latent_fm_uncond_content.pth", heads=2)
    return io, (mc, cc), (mu, cu)


def test_official_checkpoints_load_with_the_official_config(official):
    io, (mc, cc), (mu, cu) = official
    # model_5.pth: DDP's module. prefix, 10 classes + the null row; content.pth: an unconditional run's args
    assert (cc.condition, cc.num_classes, cc.width, cc.depth, cc.patch_size, cc.img_size) == ("class", 10, 16, 2, 2, 64)
    assert (cu.condition, cu.depth, cu.label_drop) == ("none", 1, 0.0)
    for c in (cc, cu):  # the official test script's sampler, and what its network expects
        assert (c.sampler, c.atol, c.rtol, c.sample_steps, c.time_scale, c.pos_order) == ("dopri5", 1e-5, 1e-5, 100,
                                                                                           1.0, "wh")
    assert lf.from_official(FIX / "latent_fm_class_model_5.pth", heads=2, guidance=1.5)[1].guidance == 1.5
    m, c = lf.from_checkpoint(str(FIX / "latent_fm_uncond_content.pth"), heads=2)  # --ckpt takes the official files
    assert c == cu and all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), mu.state_dict().values()))
    with pytest.raises(ValueError, match="head count is unknown"):
        lf.from_official(FIX / "latent_fm_class_model_5.pth")
    with pytest.raises(ValueError, match=r"the weights say width=16, not 32"):
        lf.from_official(FIX / "latent_fm_class_model_5.pth", heads=2, width=32)


class _Evil:
    pass


def test_official_content_file_is_read_without_unpickling_arbitrary_objects(tmp_path):
    """content.pth pickles an argparse.Namespace: that class is allowed, nothing else beyond tensors and containers."""
    state = torch.load(FIX / "latent_fm_uncond_content.pth", weights_only=False)
    assert lf.load_any(FIX / "latent_fm_uncond_content.pth")["args"] == state["args"]
    torch.save({**state, "args": _Evil()}, tmp_path / "content.pth")
    with pytest.raises(ValueError, match="Weights only load failed"):
        lf.load_any(tmp_path / "content.pth")


def test_official_velocity_is_ours(official):
    io, (mc, cc), (mu, cu) = official
    z, t, y = io["z1"], io["t"], io["y"]
    with torch.no_grad():
        for got, want in ((mc(z, t, y), io["v_class"]), (mc(z, t, torch.full_like(y, 10)), io["v_null"]),
                          (mu(z, t), io["v_uncond"])):
            assert (got - want).abs().max() < 1e-5  # measured: 0, 0, 4.3e-6
        # the fields that make it so: t as is, the column half of the positions first
        for k, v in (("time_scale", 1000.0), ("pos_order", "hw")):
            other = lf.LatentFlow(dataclasses.replace(cc, **{k: v}), 4, 8, 8)
            other.load_state_dict(mc.state_dict())
            assert (other(z, t, y) - io["v_class"]).abs().max() > 0.1, k


@pytest.mark.parametrize("sampler", ["euler", "dopri5"])
def test_official_sampling_is_ours_with_and_without_guidance(official, sampler):
    """sample() from the official noise equals LFM's test_flow_latent.py sampling (torchdiffeq's odeint: dopri5 at
    atol = rtol = 1e-5, or Euler with step 0.01), with the same number of network evaluations."""
    io, (mc, cc), (mu, cu) = official
    for name, m, c, y, w in (("class", mc, cc, io["y"], 1.0), ("cfg", mc, cc, io["y"], 1.5),
                             ("uncond", mu, cu, None, 1.0)):
        x0, nfe = lf.sample(m, dataclasses.replace(c, sampler=sampler, guidance=w), io["z1"], y)
        assert (x0 - io[f"x0_{name}_{sampler}"]).abs().max() < 1e-4, name  # measured: <= 3.1e-5 (samples ~4)
        assert nfe == int(io[f"nfe_{name}_{sampler}"]), name


def test_lfm_masks_are_lamas_mixed_masks():
    g = torch.Generator().manual_seed(0)
    m = lf.random_masks(1000, 32, "lfm", generator=g)
    empty = (m.flatten(1).sum(1) == 0).float().mean().item()
    assert 0.13 < empty < 0.21, empty  # 1/2 x 1/11 + 1/2 x 1/4 = 0.17 have no polyline / box
    assert set(m.unique().tolist()) == {0.0, 1.0} and 0.05 < m.mean() < 0.25
    assert (lf.random_masks(1000, 32, "mixed", generator=g).flatten(1).sum(1) > 0).all()  # ours: never empty


def test_hflip_mirrors_examples_with_their_own_latents():
    m, cfg, vae = _model(dtype=torch.float32, condition="inpaint", hflip=True)
    x = common.load_digits("test", 8)[0][:6]
    data = lf.train_data(dataclasses.replace(cfg, data="digits"), vae)
    assert len(data[np.arange(2)]) == 6  # mean, std, labels, images, and the mirrored images' mean and std
    mean, std, y, imgs, mean_f, std_f = data[np.arange(6)]
    torch.testing.assert_close(mean_f, lf.encode_moments(vae, common.to_float(imgs.flip(-1)))[0])
    noise = lf.draw_noise(cfg, 6, (1, 8, 8), torch.Generator().manual_seed(0), "cpu")
    noise[-1] = torch.tensor([0.1, 0.9, 0.2, 0.8, 0.3, 0.7])  # the flip uniforms: the even examples are mirrored
    z0, t, eps, _, sp = lf.batch_inputs(m, [mean, std, y, imgs, mean_f, std_f] + noise, vae, hflip=True)
    flip = torch.tensor([1, 0, 1, 0, 1, 0]).bool().view(-1, 1, 1, 1)
    torch.testing.assert_close(z0, torch.where(flip, mean_f + std_f * noise[2], mean + std * noise[2]))
    mirrored = torch.where(flip, imgs.flip(-1), imgs)
    torch.testing.assert_close(sp, lf.inpaint_condition(vae, common.to_float(mirrored), noise[4]))
    assert not torch.equal(mirrored, imgs) and x.shape == imgs.shape


def test_lfm_loss_takes_label_dropout():
    m, cfg, _ = _model()
    z0, y = torch.randn(4, 1, 8, 8, dtype=torch.float64), torch.tensor([1, 2, 3, 4])
    t, eps = torch.rand(4, dtype=torch.float64), torch.randn(4, 1, 8, 8, dtype=torch.float64)
    plain, null = (lf.lfm_loss(m, z0, yy, None, t, eps) for yy in (y, torch.full_like(y, 10)))
    assert abs(plain - null) > 1e-4
    assert lf.lfm_loss(m, z0, y, None, t, eps, label_drop=1.0, null_label=10) == null
    half = lf.lfm_loss(m, z0, y, None, t, eps, label_drop=0.5, null_label=10, u=torch.tensor([0.1, 0.9, 0.2, 0.8]))
    assert half == lf.lfm_loss(m, z0, torch.tensor([10, 2, 10, 4]), None, t, eps)
    with pytest.raises(ValueError, match="null_label"):
        lf.lfm_loss(m, z0, y, label_drop=0.1)


def test_paper_presets_are_the_published_runs():
    P = lf.PRESETS
    assert P["celebahq256"]["steps"] == 27_000 // 32 * 500 and P["celebahq256"]["hflip"]
    assert P["imagenet256"]["hflip"] and not P["celebahq256-inpaint"].get("hflip", False)
    inp = P["celebahq256-inpaint"]
    assert (inp["batch_size"], inp["steps"], inp["mask"]) == (128, 24_183 // 128 * 500, "lfm")
    sem = P["celebahq256-semantic"]
    assert (sem["seg_classes"], sem["batch_size"], sem["steps"]) == (19, 128, 27_000 // 128 * 175)


def test_checkpoints_from_before_time_scale_and_pos_order_still_load(tmp_path):
    lf.main(SMALL + ["--steps", "1", "--out_dir", str(tmp_path)])
    state = common.load_checkpoint(tmp_path / "ckpt.pt")
    for k in lf.Config.LEGACY:
        del state["config"][k]
    torch.save(state, tmp_path / "old.pt")
    m, cfg = lf.from_checkpoint(str(tmp_path / "old.pt"))
    assert (cfg.time_scale, cfg.pos_order) == (1000.0, "hw")
    assert all(torch.equal(v, state["ema"][k]) for k, v in m.state_dict().items() if k in state["ema"])
    lf.main(["--resume", "--ckpt", str(tmp_path / "old.pt"), "--steps", "2"])  # --resume restores its config too
    assert common.load_checkpoint(tmp_path / "ckpt.pt")["step"] == 2


def test_eval_on_own_data_names_its_loss_for_the_training_examples(tmp_path):
    """Nothing of an .npz is held out: --eval reports the loss as train_lfm_loss, never as a held-out figure."""
    x, y = common.load_digits("train", 8)
    np.savez(tmp_path / "d.npz", images=x[:40].permute(0, 2, 3, 1).numpy(), labels=y[:40].numpy())
    cfg = lf.Config(data=str(tmp_path / "d.npz"), img_size=8, vae_family="none", width=32, depth=1, heads=2)
    torch.manual_seed(0)
    vae = lf.load_vae(cfg)
    out = lf.evaluate(lf.build(cfg, vae), cfg, vae)
    assert "lfm_loss" not in out and 0 < out["train_lfm_loss"] < 10
