"""starflow_v.py: invertibility and exact log-det, causality in time, video-aware Jacobi, I2V/V2V prefixes, the sliding
window, the flow-score denoiser (its window, its training, its gradients), training, CLI, torchrun, bad inputs, VAEs."""
import dataclasses
import importlib.util
import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch

import common
import starflow_v as sv
from conftest import ROOT

WAN_FAMILIES = ("wan2.1", "wan2.2")

TINY = dict(img_size=(8, 8), frames=3, digit_size=4, patch_size=2, width=32, head_dim=8, layers=(1, 1, 2),
            denoiser_layers=1, denoise="none", guidance=0.0, sampler="sequential")


def _model(dtype=torch.float64, perturb=0.1, seed=0, **kw):
    cfg = sv.Config(**{**TINY, **kw})
    torch.manual_seed(seed)
    m = sv.STARFlowV(cfg, *sv.latent_shape(cfg)).to(dtype).eval()
    with torch.no_grad():  # away from the identity init, so every test sees a non-trivial flow
        for p in m.parameters():
            p.add_(perturb * torch.randn_like(p))
    return m, cfg


def _cond(m, B=2, task=None):
    cfg = m.cfg
    if cfg.txt_dim:
        g = torch.Generator().manual_seed(1)
        mask = torch.ones(B, cfg.txt_len, dtype=torch.bool)
        mask[0, 1:] = False  # a short caption
        return m.make_cond(text=torch.randn(B, cfg.txt_len, cfg.txt_dim, generator=g).double(), text_mask=mask,
                           task=task)
    if cfg.num_classes:
        return m.make_cond(torch.arange(B) % cfg.num_classes, task=task)
    return m.make_cond(batch=B, task=task)


def _video(m, B=2, seed=0):
    return torch.randn(B, m.T, m.C, m.H, m.W, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


CASES = [dict(), dict(cond_deep_only=False), dict(num_classes=0, txt_dim=6, txt_len=3), dict(v2v=0.5, frames=4),
         dict(num_classes=0)]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()) or "class")
def test_invertible_and_sequential_sampler_needs_one_step_per_token(case):
    m, cfg = _model(**case)
    x, cond = _video(m), _cond(m, task=torch.tensor([0, 1]) if cfg.v2v else None)
    z, _, _ = m(x, cond)
    back, nfe = sv.sample(m, cond, cfg, z=z)
    assert (back - x).abs().max() < 1e-9
    assert nfe == m.T * m.N + (len(cfg.layers) - 1) * m.N  # deep: token by token; shallow: all frames at once
    assert (z - m.patchify(x).flatten(1, 2)).abs().max() > 1e-2  # and the flow is not the identity


def test_logdet_equals_brute_force_jacobian():
    m, cfg = _model(cond_deep_only=False)
    x, cond = _video(m, 1), _cond(m, 1)
    _, logdet, _ = m(x, cond)
    J = torch.autograd.functional.jacobian(lambda v: m(v.view_as(x), cond)[0].reshape(-1), x.reshape(-1),
                                           vectorize=True)
    sign, ref = torch.linalg.slogdet(J)
    assert sign > 0 and abs(logdet.item() - ref.item()) < 1e-8
    assert abs(ref.item()) > 0.1  # a volume-preserving map would pass trivially


def test_causal_in_time_and_local_blocks_never_mix_frames():
    m, cfg = _model(frames=4, denoiser_window=2)
    x, cond = _video(m), _cond(m)
    x2 = x.clone()
    x2[:, 2] += 1.0  # change frame 2 only
    N = m.N
    (z, _, _), (z2, _, _) = m(x, cond), m(x2, cond)
    d1, d2 = m.denoiser(m.patchify(x), cond), m.denoiser(m.patchify(x2), cond)
    assert torch.equal(z[:, :2 * N], z2[:, :2 * N])  # earlier frames: bit for bit the same outputs
    assert (z[:, 2 * N:] - z2[:, 2 * N:]).abs().amax((0, 2)).min() > 0  # every later token sees it
    u, _ = m.shallow(m.patchify(x), cond)
    u2, _ = m.shallow(m.patchify(x2), cond)
    moved = (u - u2).abs().amax((0, 2)).view(m.T, N).amax(1)
    assert moved[2] > 0 and moved[[0, 1, 3]].max() == 0  # the local blocks stay inside the frame
    # the denoiser: frame f sees frames f-1 .. f+1 (W = 2): frame 2 changes frames 1, 2, 3 and leaves frame 0
    moved = (d1 - d2).abs().amax((0, 2, 3))
    assert moved[0] == 0 and moved[1:].min() > 0


def test_video_jacobi_warm_start_equals_sequential_with_fewer_evaluations():
    m, cfg = _model(torch.float32, frames=4, layers=(1, 2))
    videos, y, _, _ = sv.moving_digits(cfg, "test")
    x = common.to_float(videos[:8])
    x = x + cfg.noise_std * torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
    cond = m.make_cond(y[:8])
    jac = dict(sampler="jacobi", jacobi_chunk=8, jacobi_chunk_video=16, jacobi_max_iter=16, jacobi_threshold=1e-10)
    N, nfe = m.N, {}
    for name, v in (("moving", x), ("static", x[:, :1].expand_as(x))):  # real videos, and the first frame held
        with torch.no_grad():
            z, _, _ = m(v, cond)  # the prior noise of that video: sampling from it must give the video back
        seq, nfe[name, "seq"] = sv.sample(m, cond, cfg, z=z)
        assert (seq - v).abs().max() < 1e-4
        for warm in (False, True):
            out, nfe[name, warm] = sv.sample(m, cond, dataclasses.replace(cfg, jacobi_warm_start=warm, **jac), z=z)
            assert (out - seq).abs().max() < 1e-3, (name, warm)
        assert nfe[name, False] < nfe[name, "seq"] == m.T * N + N
    # a frame that repeats the one before is found at iteration 0: frame 0 costs its chunks' iterations, every later
    # chunk one evaluation; cold, every chunk iterates (measured: static 35 vs 74, moving 71 vs 72 evaluations)
    first = nfe["static", True] - (m.T - 1) - N  # less the later frames' chunks and the shallow block's N
    assert 0 < first <= N and nfe["static", True] < nfe["static", False] - (m.T - 1), nfe
    # guided: the batched cond/null branches, Jacobi still equal to sequential
    zr = torch.randn(8, m.T * N, m.D, generator=torch.Generator().manual_seed(3))
    g_seq, _ = sv.sample(m, cond, dataclasses.replace(cfg, guidance=2.0), z=zr)
    g_jac, _ = sv.sample(m, cond, dataclasses.replace(cfg, guidance=2.0, **jac), z=zr)
    plain, _ = sv.sample(m, cond, cfg, z=zr)
    assert (g_jac - g_seq).abs().max() < 1e-3 and (g_seq - plain).abs().max() > 1e-3


def test_jacobi_redoes_a_chunk_whose_last_iterate_overflows():
    """An overflowing Jacobi iterate (an under-trained model's garbage guess) must not reach the sample: a chunk still
    non-finite at its last iterate is redone token by token, so the video equals the sequential sampler's (without
    the guard it comes back with an inf)."""
    m, cfg = _model(torch.float32)
    cond = _cond(m)
    z = torch.randn(2, m.T * m.N, m.D, generator=torch.Generator().manual_seed(2))
    seq, _ = sv.sample(m, cond, cfg, z=z)
    run, calls = m.deep.run, []

    def overflow(u, *a, **k):
        mu, log_sigma = run(u, *a, **k)
        calls.append(u.shape[1])
        if len(calls) == 4:  # the first chunk's last iterate (4 tokens, 4 iterations at threshold 0)
            mu = mu.clone()
            mu[0, -1] = float("inf")
        return mu, log_sigma

    m.deep.run = overflow
    jac, _ = sv.sample(m, cond, dataclasses.replace(cfg, sampler="jacobi", jacobi_chunk=4, jacobi_chunk_video=8,
                                                    jacobi_max_iter=8, jacobi_threshold=0.0), z=z)
    assert calls[:8] == [4, 4, 4, 4, 1, 1, 1, 1]  # the chunk, then its redo one token at a time
    assert torch.isfinite(jac).all() and (jac - seq).abs().max() < 1e-4


def test_image_to_video_reproduces_the_first_frame_and_v2v_continues_its_source():
    m, cfg = _model(v2v=0.5, frames=4)
    x, N = _video(m), m.N
    for task, n_ctx in ((0, 1), (1, 2)):  # i2v: one given frame; v2v: the source half, with its task tag
        cond = _cond(m, task=torch.full((2,), task))
        z, _, _ = m(x, cond)
        z_new = z.clone()
        z_new[:, :n_ctx * N] = torch.randn(2, n_ctx * N, m.D, dtype=torch.float64)  # the context's noise is unused
        out, nfe = sv.sample(m, cond, cfg, z=z_new, context=x[:, :n_ctx])
        assert torch.equal(out[:, :n_ctx], x[:, :n_ctx])  # the given frames come back as they went in
        assert (out - x).abs().max() < 1e-9  # and the rest is the flow's continuation of them
        assert nfe == 1 + (m.T - n_ctx) * N + (len(cfg.layers) - 1) * N  # the prefix costs one forward
    with pytest.raises(ValueError, match="leaves nothing to generate"):
        sv.sample(m, cond, cfg, context=x)


def test_sliding_window_reencodes_its_context_and_the_denoiser_stays_local():
    m, cfg = _model(frames=3, denoiser_window=2)
    cond, N, T = _cond(m), m.N, m.T
    z = torch.randn(2, (T + 2) * N, m.D, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    sizes = []
    new_caches = m.deep.new_caches
    m.deep.new_caches = lambda B, S, *a: sizes.append(S) or new_caches(B, S, *a)
    long, _ = sv.sample(m, cond, dataclasses.replace(cfg, long_frames=T + 2, context_frames=T - 1), z=z)
    assert long.shape[1] == T + 2 and sizes == [T * N]  # one window's cache, reused by every window
    first, _ = sv.sample(m, cond, cfg, z=z[:, :T * N])
    torch.testing.assert_close(long[:, :T], first, atol=1e-10, rtol=0)
    # frame T: the window of frames 1..T, i.e. frames 1..T-1 given as context (re-encoded through the flow)
    zz = torch.cat([torch.zeros(2, (T - 1) * N, m.D, dtype=torch.float64), z[:, T * N:(T + 1) * N]], 1)
    nxt, _ = sv.sample(m, cond, cfg, z=zz, context=long[:, 1:T])
    torch.testing.assert_close(long[:, T], nxt[:, -1], atol=1e-9, rtol=0)
    # the denoiser on a long video: T frames at a time, each chunk with its W-1 frames before and one after, so the
    # first chunk is a pass over frames 0..T, and a change at the end reaches back only W frames
    score = sv.learned_score(m, long, cond)
    first = m.unpatchify(m.denoiser(m.patchify(long[:, :T + 1]), cond))[:, :T]
    torch.testing.assert_close(score[:, :T], first, atol=1e-12, rtol=0)
    later = long.clone()
    later[:, -1] += 1.0
    moved = (sv.learned_score(m, later, cond) - score).abs().amax((0, 2, 3, 4))
    assert moved[:3].max() == 0 and moved[3:].min() > 0  # frame 4 is seen by frames 3 (lookahead) and 4


def test_denoiser_loss_reaches_only_the_denoiser():
    m, cfg = _model(torch.float32)
    m.train()
    x, cond = _video(m).float(), _cond(m)
    grads = {}
    for den in (False, True):
        torch.manual_seed(0)  # the same noise
        m.zero_grad()
        loss, logs = sv.train_loss(m, x, cond, cfg.noise_std, den)
        loss.backward()
        grads[den] = {n: p.grad.clone() if p.grad is not None else None for n, p in m.named_parameters()}
    assert logs["fsm"] > 0
    for n, g in grads[True].items():
        if n.startswith("denoiser."):
            assert grads[False][n] is None and g is not None
        else:
            torch.testing.assert_close(g, grads[False][n], atol=1e-6, rtol=1e-5, msg=n)
    assert any(g.abs().max() > 0 for n, g in grads[True].items() if n.startswith("denoiser."))
    opt = sv.make_optimizer(m, dataclasses.replace(cfg, lr=1e-3, denoiser_lr=5e-3))
    assert sorted({g["lr"] for g in opt.param_groups}) == [1e-3, 5e-3]
    assert {g["lr"]: g["betas"] for g in opt.param_groups} == {1e-3: (0.9, 0.95), 5e-3: (0.9, 0.999)}  # train.py l.172
    assert sum(len(g["params"]) for g in opt.param_groups if g["lr"] == 5e-3) == \
        len([n for n, _ in m.named_parameters() if n.startswith("denoiser.")])


@pytest.mark.parametrize("w,k", [(1.0, 1.0), (0.25, 1.0), (1.0, 0.5 / 0.3)])
def test_score_tap_equals_the_input_gradient_target(w, k):
    """ScoreTap reads the target off the NLL's own backward; it must equal k sigma grad NLL by autograd.grad (k: the
    NLL's weight, --cond_noise_level's sigma / 0.3, as ml-starflow's target), and the denoiser's gradients those of its
    MSE, whatever the loss is scaled by (train() weights micro-batches)."""
    m, cfg = _model()
    x, cond, sigma = _video(m, 3), _cond(m, 3), 0.1
    torch.manual_seed(1)
    xn = (x + sigma * torch.randn_like(x)).requires_grad_(True)
    z, logdet, _ = m(xn, cond)
    (g,) = torch.autograd.grad((0.5 * z.square().sum((1, 2)) - logdet).sum(), xn)
    pred = m.unpatchify(m.denoiser(m.patchify(xn.detach()), cond))
    ref = (pred - k * sigma * g).square().mean()
    ref.backward()
    want = {n: w * p.grad.clone() for n, p in m.named_parameters() if n.startswith("denoiser.")}
    m.zero_grad()
    torch.manual_seed(1)
    loss, logs = sv.train_loss(m, x, cond, sigma, True, weight=k)
    (w * loss).backward()
    assert logs["fsm"].item() == pytest.approx(ref.item(), rel=1e-12) and ref > 0
    for n, p in m.named_parameters():
        if n in want:
            torch.testing.assert_close(p.grad, want[n], atol=1e-14, rtol=1e-10, msg=n)


def test_denoiser_learns_the_flow_score_in_a_short_run(tmp_path):
    """A tiny flow trained for a moment, then held fixed (only the denoiser in the optimizer): flow-score matching
    drives the denoiser towards the flow's exact sigma * grad NLL of noisy videos."""
    cfg = sv.Config(img_size=(8, 8), digit_size=4, frames=3, patch_size=2, width=32, head_dim=8, layers=(1, 1),
                    denoiser_layers=2, denoise="none", batch_size=16, lr=3e-3, warmup=5, log_every=10,
                    eval_every=10**6, ckpt_every=10**6, videos_per_digit=1, ema_decay=0, out_dir=str(tmp_path))
    common.seed_all(0)
    m, _ = sv.build(cfg, "cpu")
    data = sv.load_data(cfg)

    def loss_fn(denoiser):
        return lambda net, batch, at: sv.train_loss(net, common.to_float(batch[0]), sv.batch_cond(m, batch),
                                                cfg.noise_std, denoiser)

    common.train(dataclasses.replace(cfg, steps=60), m, loss_fn(False), data, common.Dist())
    test = sv.load_data(cfg, "test")
    x, y = test[torch.arange(64)][:2]
    xn = common.to_float(x) + cfg.noise_std * torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
    cond = m.make_cond(y)
    exact = (xn - sv.exact_denoise(m, xn, cond, cfg.noise_std)) / cfg.noise_std  # sigma grad NLL, by autograd

    def error():
        with torch.no_grad():
            return ((sv.learned_score(m, xn, cond) - exact).square().sum() / exact.square().sum()).item()

    before, flow = error(), {n: p.detach().clone() for n, p in m.named_parameters() if not n.startswith("denoiser.")}
    common.train(dataclasses.replace(cfg, steps=100, lr=5e-3, grad_clip=0), m, loss_fn(True), data, common.Dist(),
                 overwrite=True, optimizer=lambda net: torch.optim.AdamW(net.denoiser.parameters(), lr=5e-3))
    log = [json.loads(s) for s in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert log[-1]["fsm_rel"] < 0.75 * log[0]["fsm_rel"], (log[0], log[-1])  # measured: 0.96 -> 0.57
    assert all(torch.equal(p, flow[n]) for n, p in m.named_parameters() if n in flow)
    assert before == pytest.approx(1.0) and error() < 0.75, error()  # a zero score at init; measured: 1.0 -> 0.60


CLI = [sys.executable, str(ROOT / "starflow_v.py")]
SMALL = ["--img_size", "8", "--digit_size", "4", "--frames", "2", "--patch_size", "2", "--width", "32",
         "--head_dim", "16", "--layers", "1,1", "--denoiser_layers", "1", "--batch_size", "16", "--videos_per_digit",
         "1", "--eval_samples", "8", "--log_every", "2", "--eval_every", "100000", "--ckpt_every", "100000"]


def _cli(args, ok=True, cmd=CLI):
    r = subprocess.run(cmd + args, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert (r.returncode == 0) == ok, r.stderr[-3000:]
    return r


def test_cli_resume_equals_uninterrupted_and_samples(tmp_path):
    sv.main(SMALL + ["--steps", "6", "--out_dir", str(tmp_path / "a")])
    sv.main(SMALL + ["--steps", "6", "--stop_after", "3", "--out_dir", str(tmp_path / "b")])
    assert common.load_checkpoint(tmp_path / "b" / "ckpt.pt")["step"] == 3
    sv.main(SMALL + ["--steps", "6", "--out_dir", str(tmp_path / "b"), "--resume"])
    a, b = (common.load_checkpoint(tmp_path / p / "ckpt.pt") for p in ("a", "b"))
    assert b["step"] == 6
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    if importlib.util.find_spec("matplotlib"):  # the training curves (test_figures checks the drawing itself)
        sv.main(["--plot", str(tmp_path / "a" / "log.jsonl")])
        assert (tmp_path / "a" / "log.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    ckpt = str(tmp_path / "a" / "ckpt.pt")
    sv.main(["--sample", "--ckpt", ckpt, "--n", "5", "--out", str(tmp_path / "s.npz"), "--guidance", "0.5"])
    with np.load(tmp_path / "s.npz") as f:
        assert f["images"].shape == (5, 2, 8, 8, 1) and f["images"].dtype == np.uint8
        assert f["labels"].tolist() == [0, 1, 2, 3, 4] and f["images"].std() > 1
    assert len(list((tmp_path / "s_strips").glob("*.png"))) == 5
    # image-to-video from test videos' first frames: frame 0 stays the given frame (up to its noise), frame 1 does not
    sv.main(["--sample", "--ckpt", ckpt, "--n", "6", "--out", str(tmp_path / "i.npz"), "--task", "i2v",
             "--long_frames", "3"])
    real, labels, _, _ = sv.moving_digits(sv.Config(img_size=(8, 8), digit_size=4, frames=2), "test")
    with np.load(tmp_path / "i.npz") as f:
        v, ref = torch.as_tensor(f["images"]).float(), real[:6].permute(0, 1, 3, 4, 2).float()
        assert v.shape == (6, 3, 8, 8, 1) and f["labels"].tolist() == labels[:6].tolist()
    assert (v[:, 0] - ref[:, 0]).abs().mean() < 15 < (v[:, 1] - ref[:, 1]).abs().mean()  # sigma 0.1: ~10 of 255


def test_torchrun_two_processes_match_single_process(tmp_path):
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
                str(ROOT / "starflow_v.py")]
    exact = ["--noise_std", "0", "--denoiser_layers", "0", "--label_drop", "0", "--denoise", "none"]
    sv.main(SMALL + exact + ["--steps", "3", "--out_dir", str(tmp_path / "one")])
    _cli(SMALL + exact + ["--steps", "3", "--out_dir", str(tmp_path / "two")], cmd=torchrun)
    a, b = (common.load_checkpoint(tmp_path / p / "ckpt.pt") for p in ("one", "two"))
    for k in a["model"]:
        torch.testing.assert_close(a["model"][k], b["model"][k], atol=2e-5, rtol=0, msg=k)
    # FSDP2 with the denoiser (its target an input gradient taken inside the sharded step), against DDP: the same
    # per-rank noise, so the same weights; the FSDP run ends with the sharded evaluation and sampling
    den = ["--steps", "3", "--denoiser_lr", "1e-3", "--lr", "1e-3", "--v2v", "0.5"]  # with V2V pairs and task tags
    _cli(SMALL + den + ["--out_dir", str(tmp_path / "ddp")], cmd=torchrun)
    r = _cli(SMALL + den + ["--out_dir", str(tmp_path / "fsdp"), "--fsdp", "--no-amp", "--eval_every", "3"],
             cmd=torchrun)  # fp32 (--no-amp): exact against DDP
    assert "i2v_frame0_err" in r.stdout and "v2v_target_err" in r.stdout
    c, f = (common.load_checkpoint(tmp_path / p / "ckpt.pt") for p in ("ddp", "fsdp"))
    for k in c["model"]:
        torch.testing.assert_close(c["model"][k], f["model"][k], atol=2e-5, rtol=0, msg=k)
    assert any(not torch.equal(c["model"][k], a["model"][k]) for k in a["model"])
    out = tmp_path / "s.npz"  # sampling under torchrun: the ranks split the videos, one file is written
    _cli(["--sample", "--ckpt", str(tmp_path / "fsdp" / "ckpt.pt"), "--num_samples", "5", "--out", str(out),
          "--sampler", "jacobi"], cmd=torchrun)
    with np.load(out) as f:
        assert f["images"].shape == (5, 2, 8, 8, 1) and sorted(f["labels"].tolist()) == [0, 1, 2, 3, 4]
    assert len(list((tmp_path / "s_strips").glob("*.png"))) == 5 and not list(tmp_path.glob(".s.rank*"))


def test_bad_inputs_give_one_clear_line(tmp_path):
    r = _cli(["--vae_family", "wan2.1", "--vae", "x", "--frames", "6", "--steps", "1"], ok=False)
    assert r.stderr.strip().splitlines()[-1] == "error: --frames 6: the Wan VAE takes 1 + 4k frames (e.g. 5 or 9)"
    with pytest.raises(ValueError, match="latent frame 8x8 is not divisible by patch_size 3"):
        sv.main(["--img_size", "8", "--digit_size", "4", "--patch_size", "3", "--steps", "1",
                 "--out_dir", str(tmp_path / "p")])
    m, cfg = _model(torch.float32)
    with pytest.raises(ValueError, match=r"video frames of shape \(1, 8, 6\), the model takes \(1, 8, 8\)"):
        m(torch.randn(1, 3, 1, 8, 6), m.make_cond(torch.tensor([1])))
    with pytest.raises(ValueError, match=r"class labels must be in \[0, 10\)"):
        m.make_cond(torch.tensor([3, 10]))
    with pytest.raises(ValueError, match="needs a model trained with it"):
        m.make_cond(torch.tensor([3]), task=torch.tensor([1]))
    with pytest.raises(ValueError, match="--context_frames 3 must be below the window of 3"):
        sv.sample(m, m.make_cond(torch.tensor([1])), dataclasses.replace(cfg, long_frames=5, context_frames=3))
    np.savez(tmp_path / "v.npz", images=np.zeros((4, 5, 8, 8, 1), np.uint8))  # 5 frames, the config says 3
    with pytest.raises(ValueError, match=r"images must be uint8 videos \(N, 3, 8, 8, 1\)"):
        sv.load_data(dataclasses.replace(cfg, data=str(tmp_path / "v.npz")))
    state = {"config": dataclasses.asdict(cfg), "kind": "starflow"}
    with pytest.raises(ValueError, match="is a starflow checkpoint, not starflow_v"):
        common.config_from_checkpoint(sv.Config, state)


def test_text_to_video_through_a_latent_folder(tmp_path, capsys):
    """--precompute keeps the captions: videos + text embeddings -> a latent folder (text memory-mapped beside the
    latents) -> a text-conditional model trains on it, evaluates, and samples from --captions."""
    vae = common.train_vae(tmp_path, steps=2, size=8)  # a real (untrained) latent space: 8x8 -> 4x4x4
    cfg = sv.Config(img_size=(8, 8), digit_size=4, frames=2, videos_per_digit=1)
    videos, _, _, _ = sv.moving_digits(cfg)
    g = np.random.default_rng(0)
    text, mask = g.normal(size=(24, 3, 6)).astype(np.float32), np.arange(3)[None] < g.integers(1, 4, (24, 1))
    np.savez(tmp_path / "v.npz", images=videos[:24].permute(0, 1, 3, 4, 2).numpy(), text=text, text_mask=mask)
    model = ["--img_size", "8", "--frames", "2", "--vae", vae, "--vae_family", "sd", "--num_classes", "0",
             "--txt_dim", "6", "--txt_len", "3", "--patch_size", "2", "--width", "32", "--head_dim", "16",
             "--layers", "1,1", "--denoiser_layers", "1", "--noise_std", "0.3"]
    folder = tmp_path / "lat"
    sv.main(model + ["--precompute", str(tmp_path / "v.npz"), "--data", str(folder)])
    assert np.array_equal(np.load(folder / "text.npy"), text)
    assert np.array_equal(np.load(folder / "text_mask.npy"), mask)
    fcfg = sv.Config(**{**dataclasses.asdict(cfg), "data": str(folder), "txt_dim": 6, "txt_len": 3,
                        "num_classes": 0, "vae": vae, "vae_family": "sd"})
    data = sv.load_data(fcfg)
    assert isinstance(data.arrays[3], np.memmap) and data[np.arange(2)][0].shape == (2, 2, 4, 4, 4)
    train, test = (sv.load_data(dataclasses.replace(fcfg, holdout=4), s) for s in ("train", "test"))
    assert len(train) == 20 and len(test) == 4 and np.array_equal(test.arrays[3], text[20:])  # the last 4 held out
    run = tmp_path / "run"
    sv.main(model + ["--data", str(folder), "--steps", "2", "--batch_size", "8", "--out_dir", str(run)])
    assert "train_bpd" in capsys.readouterr().out  # nothing held out: named as what it is
    sv.main(model + ["--data", str(folder), "--holdout", "4", "--eval", "--ckpt", str(run / "ckpt.pt")])
    out = capsys.readouterr()
    res = json.loads(out.out.strip().splitlines()[-1])
    assert res["bpd_n"] == 4 and res["bpd_se"] > 0.01 and "standard error" in out.err  # 4 videos: too few, said so
    sv.main(["--sample", "--ckpt", str(run / "ckpt.pt"), "--n", "3", "--out", str(tmp_path / "s.npz"), "--captions",
             str(tmp_path / "v.npz")])
    with np.load(tmp_path / "s.npz") as f:
        assert f["images"].shape == (3, 2, 8, 8, 1) and f["images"].std() > 1
    with pytest.raises(ValueError, match="needs --captions|samples from --captions"):
        sv.main(["--sample", "--ckpt", str(run / "ckpt.pt"), "--n", "3", "--out", str(tmp_path / "t.npz")])


def test_video_and_image_vae_latents():
    wan = common.AutoencoderKLWan(base_dim=8, z_dim=16, dim_mult=(1, 2, 2), num_res_blocks=1,
                                  temporal_downsample=(True, True))
    vae = common.VideoVAE(wan, [0.1] * 16, [2.0] * 16)
    cfg = sv.Config(img_size=(8, 8), frames=5, channels=3, vae="w", vae_family="wan2.1", num_classes=0,
                    patch_size=1, width=32, head_dim=8, layers=(1, 1), denoiser_layers=1)
    assert sv.latent_shape(cfg, vae) == (16, 2, 2, 2)  # 5 frames -> 1 + 1 latent frames, f = 4 here
    videos = torch.randint(0, 256, (2, 5, 3, 8, 8), dtype=torch.uint8)
    lat = sv.to_model_space(videos, vae, cfg)
    assert lat.shape == (2, 2, 16, 2, 2)
    torch.testing.assert_close(lat, vae.encode(common.to_float(videos).transpose(1, 2)).transpose(1, 2))  # the mean
    torch.testing.assert_close(lat[:, :1], sv.to_model_space(videos[:, :1], vae, cfg))  # causal: frame 0 on its own
    # training samples the posterior (ml-starflow's VAE.encode); Wan2.2's std is left unnormalised as there
    mean, logvar = sv.posterior(videos, vae, "wan2.2")
    torch.testing.assert_close(mean, lat)
    draws = {}
    for fam in WAN_FAMILIES:
        torch.manual_seed(3)
        draws[fam] = sv.to_model_space(videos, vae, dataclasses.replace(cfg, vae_family=fam), sample=True) - lat
    torch.testing.assert_close(draws["wan2.1"], draws["wan2.2"] / 2.0)  # latents_std 2
    assert 0.8 < (draws["wan2.2"] / (0.5 * logvar).exp()).std() < 1.2
    # --frame_scale: frames 1.. scaled after encoding (the spec's ":0.6"), undone before decoding
    c6 = dataclasses.replace(cfg, vae_family="wan2.2", frame_scale=0.6)
    lat6 = sv.to_model_space(videos, vae, c6)
    torch.testing.assert_close(lat6, torch.cat([lat[:, :1], 0.6 * lat[:, 1:]], 1))
    torch.testing.assert_close(sv.decode(lat6, vae, c6), sv.decode(lat, vae, cfg))
    model = sv.STARFlowV(cfg, *sv.latent_shape(cfg, vae))
    loss, _ = sv.train_loss(model, lat, model.make_cond(batch=2), cfg.noise_std, True)
    assert torch.isfinite(loss)
    assert sv.decode(lat, vae, cfg).shape == (2, 5, 3, 8, 8)
    img = common.VAE(common.AutoencoderKL(in_channels=1, out_channels=1, block_out_channels=(32, 32),
                                          layers_per_block=1, latent_channels=4, norm_num_groups=32))
    lat = sv.to_model_space(torch.randint(0, 256, (2, 3, 1, 8, 8), dtype=torch.uint8), img, cfg)  # frame by frame
    assert lat.shape == (2, 3, 4, 4, 4) and sv.decode(lat, img, cfg).shape == (2, 3, 1, 8, 8)


def _preset_tiny(**kw):
    """The t2v-480p preset's structure (text, Wan2.2 latents, final norms, ml-starflow's RoPE, 6 flow blocks, a
    10-frame denoiser window, guidance, Jacobi) at tiny widths: 12 latent frames of 1x2 tokens."""
    p = {**sv.PRESETS["t2v-480p"], "img_size": (16, 32), "frames": 45, "width": 24, "deep_width": 48, "head_dim": 24,
         "layers": (1, 1, 1, 1, 1, 2), "denoiser_layers": 2, "txt_dim": 8, "txt_len": 4, "fsdp": False,
         "grad_ckpt": False, "sampler": "jacobi", "jacobi_chunk": 2, "jacobi_chunk_video": 4, **kw}
    return _model(torch.float32, **p)


def test_no_dense_attention_mask_at_the_preset_structure(monkeypatch):
    """Every SDPA call of a training step (flow + denoiser) and of guided Jacobi sampling at the preset's structure is
    is_causal, mask-free, or a lower-right causal bias (which fused kernels take): no (B, 1, L, L) tensor."""
    m, cfg = _preset_tiny()
    assert (m.T, m.N) == (12, 2) and cfg.denoiser_window == 10
    calls, sdpa = [], torch.nn.functional.scaled_dot_product_attention

    def record(q, k, v, attn_mask=None, is_causal=False, **kw):
        calls.append((attn_mask, is_causal, q.shape[2], k.shape[2]))
        return sdpa(q, k, v, attn_mask=attn_mask, is_causal=is_causal, **kw)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", record)
    m.train()
    x, cond = _video(m).float(), _cond(m)
    cond["null"][1] = True
    loss, _ = sv.train_loss(m, x, cond, cfg.noise_std, True)
    loss.backward()
    training = len(calls)
    m.eval()
    sv.sample(m, _cond(m), dataclasses.replace(cfg, denoise="learned"))
    kinds = {"causal": 0, "free": 0, "bias": 0}
    for mask, causal, lq, lk in calls:
        assert mask is None or isinstance(mask, torch.nn.attention.bias.CausalBias), type(mask)
        kinds["causal" if causal else "free" if mask is None else "bias"] += 1
    L = cfg.txt_len
    assert (True, L + 12 * 2) in {(c, lk) for _, c, lq, lk in calls[:training]}  # the deep block: one causal call
    assert all(v > 0 for v in kinds.values()), kinds  # (mask-free: the denoiser's frames, one-token decoding steps)


@pytest.mark.parametrize("case", [dict(num_classes=0), dict(), dict(num_classes=0, txt_dim=6, txt_len=3, pt_seq_len=8,
                                                                     head_dim=20, width=40, final_norm=True)],
                         ids=["uncond", "class", "text-official-rope"])
def test_denoiser_reach_and_long_video_chunks_equal_one_pass(case):
    """Each of L layers sees frames f-W+1 .. f+1, so output frame f depends on input frames f-L(W-1) .. f+L (3 layers,
    W = 3: 7 depends on 1..10). learned_score's chunks read that whole receptive field (and the first frames, which
    the prefix sees), so a 14-frame video in chunks of T = 3 equals one pass over it."""
    m, cfg = _model(frames=3, denoiser_layers=3, denoiser_window=3, **case)
    assert m.denoiser.reach == (6, 3)
    cond = _cond(m)
    v = torch.randn(2, 14, m.C, m.H, m.W, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    full = m.unpatchify(m.denoiser(m.patchify(v), cond))
    torch.testing.assert_close(sv.learned_score(m, v, cond), full, atol=1e-12, rtol=0)
    if cfg.num_classes or cfg.txt_dim:
        return
    seen = []
    for f in range(14):
        w = v.clone()
        w[:, f] += 1.0
        seen.append(bool((m.unpatchify(m.denoiser(m.patchify(w), cond)) - full)[:, 7].abs().max() > 0))
    assert [f for f in range(14) if seen[f]] == list(range(1, 11))


def test_drop_image_null_caption_padding_and_the_weighted_denoising_step():
    """--drop_image drops the first latent frame of a share of training batches (the model trains on T-1 frames);
    the null condition reads the null caption's embedding; padding is zeroed, not masked; with --cond_noise_level the
    learned step is ml-starflow's x - 0.3 * output (Tweedie whatever sigma)."""
    m, cfg = _model(torch.float32, num_classes=0, txt_dim=6, txt_len=3, drop_image=0.25)
    batch = (torch.randn(4, m.T, m.C, m.H, m.W),)
    torch.manual_seed(0)
    lengths = [sv.training_inputs(cfg, None, batch).shape[1] for _ in range(400)]
    assert set(lengths) == {m.T - 1, m.T} and 0.2 < lengths.count(m.T - 1) / 400 < 0.3
    lv = (torch.full((4, m.T, m.C, m.H, m.W), math.log(0.25)),)  # a latent folder's log-variance, the last array
    dev = sv.training_inputs(dataclasses.replace(cfg, drop_image=0.0), None, batch + lv, logvar=True) - batch[0]
    assert 0.45 < dev.std() < 0.55  # a posterior sample, std exp(logvar / 2)
    loss, _ = sv.train_loss(m, batch[0][:, 1:], _cond(m, 4), cfg.noise_std, True)
    assert torch.isfinite(loss)
    x, cond = _video(m).float(), _cond(m)
    null = m.make_cond(text=torch.zeros(2, 3, 6), null=torch.tensor([True, False]))
    m.set_null_text(torch.randn(3, 6))
    torch.testing.assert_close(m.deep.cond(null)[0], m.deep.cond.proj_txt(m.deep.cond.null_text))
    assert (m.denoiser.cond(null)[0] - m.denoiser.cond(null)[1]).abs().max() > 0
    padded = dict(cond, text=cond["text"].clone())
    padded["text"][0, 1:] += 5.0  # caption 0 is one token long
    z, _, _ = m(x, cond)
    torch.testing.assert_close(m(x, padded)[0], z, atol=0, rtol=0)
    c2 = dataclasses.replace(cfg, cond_noise_level=True, noise_std=0.5, denoise="learned")
    zz = torch.randn(2, m.T * m.N, m.D, generator=torch.Generator().manual_seed(4))
    raw, _ = sv.sample(m, cond, dataclasses.replace(c2, denoise="none"), z=zz)
    out, _ = sv.sample(m, cond, c2, z=zz)
    torch.testing.assert_close(out, raw - 0.3 * sv.learned_score(m, raw, cond))


FIXTURE = ROOT / "tests" / "fixtures" / "starflow_v_tiny.pth"
TINY_OFFICIAL = dict(txt_len=4, denoiser_window=2, vae_family="none", frame_scale=1.0, img_size=(2, 3), frames=4)


def test_official_checkpoint_gives_the_official_numbers(tmp_path):
    """A tiny ml-starflow STARFlow-V (4 blocks, deep block twice as wide, text, final norms, its RoPE with
    pt_seq_len 4 on a 2x3 latent, a 2-layer conditional denoiser with window 2; every weight perturbed), read by
    from_official: the log-likelihood, the latents, the denoiser's output and the sequential sampler (unguided and
    guided, from the same noise) equal the official code's (tests/fixtures/README.md)."""
    io = torch.load(ROOT / "tests" / "fixtures" / "starflow_v_tiny_io.pt", weights_only=True)
    m, cfg = sv.from_official(str(FIXTURE), null_text=io["null_text"], **TINY_OFFICIAL)
    assert (cfg.layers, cfg.width, cfg.deep_width, cfg.head_dim, cfg.pt_seq_len, cfg.txt_dim, cfg.denoiser_layers,
            cfg.final_norm, m.C) == ((1, 1, 1, 1), 24, 48, 24, 4, 8, 2, True, 4)
    tol = dict(rtol=1e-5, atol=1e-4)
    cond = m.make_cond(text=io["text"], text_mask=io["text_mask"])
    with torch.no_grad():
        torch.testing.assert_close(m.log_prob(io["x"], cond), io["logp"], **tol)
        z, _, _ = m(io["x"], cond)
        torch.testing.assert_close(m.unpatchify(z.view(2, m.T, m.N, m.D)), io["z"], **tol)
        torch.testing.assert_close(m.unpatchify(m.denoiser(m.patchify(io["x"]), cond)), io["denoiser"], **tol)
    noise = m.patchify(io["noise"]).flatten(1, 2)
    for w, want in ((0.0, io["sample"]), (float(io["guidance"]), io["sample_guided"])):
        x, _ = sv.sample(m, cond, dataclasses.replace(cfg, sampler="sequential", guidance=w, denoise="none"), z=noise)
        torch.testing.assert_close(x, want, **tol)
    assert (io["sample_guided"] - io["sample"]).abs().max() > 0.1  # guidance (and the null caption) matter
    # --ckpt takes the official file as it is
    m2, cfg2 = sv.from_checkpoint(str(FIXTURE), **TINY_OFFICIAL)
    assert cfg2 == cfg and all(torch.equal(a, b) for (k, a), b in zip(m.state_dict().items(), m2.state_dict().values())
                               if not k.endswith("null_text"))
    # and the CLI: --sample --ckpt of the official file, the null caption from the --captions file
    np.savez(tmp_path / "c.npz", **{k: io[k].numpy() for k in ("text", "text_mask", "null_text")})
    sv.main(["--preset", "t2v-480p", "--sample", "--ckpt", str(FIXTURE), "--txt_dim", "8", "--txt_len", "4",
             "--denoiser_window", "2", "--vae_family", "none", "--frame_scale", "1", "--img_size", "2,3", "--frames",
             "4", "--n", "2", "--out", str(tmp_path / "s.npz"), "--captions", str(tmp_path / "c.npz")])
    with np.load(tmp_path / "s.npz") as f:
        assert f["images"].shape == (2, 4, 2, 3, 4)
    with pytest.raises(ValueError, match="pass the right txt_len"):
        sv.from_official(str(FIXTURE), **{**TINY_OFFICIAL, "txt_len": 5})
    with pytest.raises(ValueError, match="null_text must be"):
        sv.from_official(str(FIXTURE), null_text=torch.zeros(3, 8), **TINY_OFFICIAL)


def test_span_attention_equals_the_masked_one_and_keeps_one_copy_for_backward():
    """common.Attention's spans (the denoiser's band, mask-free calls) give the masked attention's outputs and
    gradients; what backward keeps is the inputs, not every span's concatenated keys (W+1 frames' worth each)."""
    m, cfg = _model(denoiser_window=3, frames=8, denoiser_layers=1)
    den, n, L = m.denoiser, m.N, m.denoiser.L
    attn, S = den.layers[0].attn, L + 8 * m.N
    spans = den.spans(list(range(8)))
    mask = torch.zeros(S, S, dtype=torch.bool)
    for qs, ks in spans:
        for k in ks:
            mask[qs, k] = True
    x = torch.randn(2, S, cfg.width, dtype=torch.float64, requires_grad=True)
    ref = attn(x, mask=mask)
    (gref,) = torch.autograd.grad(ref.square().sum(), x)
    saved = {}

    def pack(t):
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = attn(x, spans=spans)
    (g,) = torch.autograd.grad(out.square().sum(), x)
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=0)
    torch.testing.assert_close(g, gref, atol=1e-12, rtol=0)
    kv = 2 * S * cfg.width * 8  # bytes of the keys and values (fp64)
    assert sum(saved.values()) < 8 * kv, sum(saved.values()) / kv  # measured 5.9; every span's copy kept: 11.4


def test_precompute_keeps_the_wan_posterior_and_training_samples_it(tmp_path):
    """--precompute through a Wan VAE keeps the posterior's mean and log-variance (latents.npy, latents_logvar.npy)
    and the null caption; a model trained on the folder samples the posterior (training_inputs)."""
    st = pytest.importorskip("safetensors.torch")
    ae = common.AutoencoderKLWan(base_dim=8, z_dim=16, dim_mult=(1, 2, 2), num_res_blocks=1,
                                 temporal_downsample=(True, True))
    st.save_file({k: v.contiguous() for k, v in ae.state_dict().items()}, tmp_path / "vae.safetensors")
    g = np.random.default_rng(0)
    videos = g.integers(0, 256, (6, 5, 8, 8, 3), dtype=np.uint8)
    np.savez(tmp_path / "v.npz", images=videos, text=g.normal(size=(6, 2, 4)).astype(np.float32),
             text_mask=np.ones((6, 2), bool), null_text=np.zeros((2, 4), np.float32))
    args = ["--vae", str(tmp_path / "vae.safetensors"), "--vae_family", "wan2.1", "--img_size", "8", "--frames", "5",
            "--channels", "3", "--num_classes", "0", "--txt_dim", "4", "--txt_len", "2"]
    folder = tmp_path / "lat"
    sv.main(args + ["--precompute", str(tmp_path / "v.npz"), "--data", str(folder)])
    cfg = sv.Config(data=str(folder), vae=str(tmp_path / "vae.safetensors"), vae_family="wan2.1", img_size=(8,),
                    frames=5, channels=3, num_classes=0, txt_dim=4, txt_len=2)
    data = sv.load_data(cfg)
    assert data.logvar and data.null_text.shape == (2, 4) and (folder / "null_text.npy").exists()
    mean, logvar = sv.posterior(torch.as_tensor(videos).permute(0, 1, 4, 2, 3), sv.load_vae(cfg, "cpu"), "wan2.1")
    batch = data[np.arange(6)]
    torch.testing.assert_close(batch[0].float(), mean, atol=2e-3, rtol=2e-3)  # stored in fp16
    torch.testing.assert_close(batch[-1].float(), logvar, atol=2e-2, rtol=2e-3)
    torch.manual_seed(0)
    x = sv.training_inputs(cfg, None, batch, logvar=True)
    assert 0.7 < ((x - batch[0].float()) / (0.5 * batch[-1].float()).exp()).std() < 1.3


def test_init_from_the_official_file_fine_tunes_it(tmp_path):
    """--init_from takes the official file: the model fields are its own, training starts from its weights."""
    io = torch.load(ROOT / "tests" / "fixtures" / "starflow_v_tiny_io.pt", weights_only=True)
    folder = tmp_path / "lat"
    folder.mkdir()
    g = torch.Generator().manual_seed(0)
    np.save(folder / "latents.npy", torch.randn(8, 4, 4, 2, 3, generator=g).half().numpy())
    np.save(folder / "text.npy", torch.randn(8, 4, 8, generator=g).numpy())
    np.save(folder / "text_mask.npy", np.ones((8, 4), bool))
    np.save(tmp_path / "null.npy", io["null_text"].numpy())
    run = tmp_path / "run"
    sv.main(["--preset", "t2v-480p", "--init_from", str(FIXTURE), "--null_text", str(tmp_path / "null.npy"),
             "--data", str(folder), "--txt_dim", "8", "--txt_len", "4", "--denoiser_window", "2", "--vae_family",
             "none", "--frame_scale", "1", "--img_size", "2,3", "--frames", "4", "--no-fsdp", "--steps", "2",
             "--batch_size", "4", "--warmup", "1", "--out_dir", str(run)])
    official, cfg = sv.from_official(str(FIXTURE), null_text=io["null_text"], **TINY_OFFICIAL)
    tuned, tcfg = sv.from_checkpoint(str(run / "ckpt.pt"))
    assert (tcfg.layers, tcfg.deep_width, tcfg.pt_seq_len, tcfg.final_norm) == ((1, 1, 1, 1), 48, 4, True)
    a, b = official.state_dict(), tuned.state_dict()
    assert torch.equal(a["blocks.3.cond.null_text"], b["blocks.3.cond.null_text"])
    moved = max((a[k] - b[k]).abs().max().item() for k in a)
    assert 0 < moved < 1e-2  # two steps at lr 5e-5 away from the official weights
