"""starflow.py: invertibility, exact log-det, KV cache, Jacobi = sequential, guidance, denoising, training, CLI."""
import dataclasses
import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch

import common
import starflow as sf
from conftest import ROOT

TINY = dict(width=32, head_dim=8, layers=(1, 1, 2), img_size=4, channels=2, patch_size=2, denoise=False)


def _model(param="starflow", dtype=torch.float64, perturb=0.1, seed=0, **kw):
    cfg = sf.Config(**{**TINY, "param": param, **kw})
    torch.manual_seed(seed)
    m = sf.STARFlow(cfg, *sf.latent_shape(cfg)).to(dtype).eval()
    with torch.no_grad():  # away from the identity init, so every test sees a non-trivial flow
        for p in m.parameters():
            p.add_(perturb * torch.randn_like(p))
    return m, cfg


def _cond(m, B=3, text=False):
    if text:
        g = torch.Generator().manual_seed(1)
        t = torch.randn(B, m.cfg.txt_len, m.cfg.txt_dim, generator=g).to(next(m.parameters()).dtype)
        mask = torch.ones(B, m.cfg.txt_len, dtype=torch.bool)
        mask[0, 2:] = False  # a short caption
        return m.make_cond(text=t, text_mask=mask)
    return m.make_cond(torch.arange(B) % m.cfg.num_classes)


CASES = [dict(param="tarflow"), dict(param="starflow"), dict(param="starflow", cond_deep_only=False, rope=True),
         dict(param="tarflow", cond_deep_only=False, rope=True),
         dict(param="starflow", num_classes=0, txt_dim=6, txt_len=4),
         dict(param="starflow", num_classes=0, guidance=0.0),
         dict(param="tarflow", seq_order="L2R", final_norm=True, rope=True),
         dict(param="tarflow", class_cond="add", cond_deep_only=False, patch_order="chw", prior_var=True),  # ml-tarflow
         dict(param="starflow", num_classes=0, txt_dim=6, txt_len=4, txt_null="caption", rope=True, rope_text=True,
              head_dim=32, final_norm=True, seq_order="L2R")]  # ml-starflow


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_invertible_fp32_and_sequential_equals_full_forward(case):
    m, cfg = _model(dtype=torch.float32, **case)
    x = torch.randn(3, cfg.channels, cfg.img_size, cfg.img_size)
    cond = _cond(m, text=bool(cfg.txt_dim)) if (cfg.num_classes or cfg.txt_dim) else m.make_cond(batch=3)
    z, _ = m(x, cond)
    x_back, nfe = sf.sample(m, cond, dataclasses.replace(cfg, sampler="sequential", guidance=0), z=z)
    assert (x_back - x).abs().max() < 1e-4
    T = m.T
    assert nfe == sum(T - b.shift for b in m.blocks)  # one network step per token per block
    assert (z - m.patchify(x)).abs().max() > 1e-2  # and the flow is not the identity


@pytest.mark.parametrize("param", ["tarflow", "starflow"])
def test_logdet_equals_brute_force_jacobian(param):
    m, cfg = _model(param, rope=True)
    x = torch.randn(1, cfg.channels, cfg.img_size, cfg.img_size, dtype=torch.float64)
    cond = m.make_cond(torch.tensor([2]))
    _, logdet = m(x, cond)
    J = torch.autograd.functional.jacobian(lambda v: m(v.view_as(x), cond)[0].reshape(-1), x.reshape(-1),
                                           vectorize=True)
    sign, ref = torch.linalg.slogdet(J)
    assert sign > 0 and abs(logdet.item() - ref.item()) < 1e-8
    assert abs(ref.item()) > 0.1  # a volume-preserving map would pass trivially


@pytest.mark.parametrize("case", CASES[:5] + CASES[6:], ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_kv_cache_steps_equal_full_causal_forward(case):
    """The decoder's own attention (prefix cached once, one token or a chunk per step, no mask where it can) equals
    the training forward through the shared blocks."""
    m, cfg = _model(dtype=torch.float64, **case)
    block = m.blocks[-1]
    x = torch.randn(2, m.T, m.D, dtype=torch.float64)
    cond = _cond(m, 2, text=bool(cfg.txt_dim))
    prefix, mask = block.embed_cond(cond)
    add = block.class_add(cond)
    mu, ls = block.run(block.stream(x), prefix, mask, add)
    P = m.T - block.shift
    for n in (1, 3):  # one token per step (sequential), and chunks of 3 (Jacobi's causal mask inside a chunk)
        st = block.start(2, prefix, mask, "cpu", add=add)
        steps = [block.step(block.stream(x, p, min(p + n, P)), p, st) for p in range(0, P, n)]
        torch.testing.assert_close(torch.cat([s[0] for s in steps], 1), mu, atol=1e-10, rtol=0)
        torch.testing.assert_close(torch.cat([s[1] for s in steps], 1), ls, atol=1e-10, rtol=0)


@pytest.mark.parametrize("param", ["tarflow", "starflow"])
def test_jacobi_equals_sequential_with_fewer_steps(param):
    m, cfg = _model(param, dtype=torch.float32, perturb=0.03, layers=(1, 2), img_size=8, patch_size=2)
    cond = m.make_cond(torch.arange(4) % 10)
    z = torch.randn(4, m.T, m.D, generator=torch.Generator().manual_seed(0))
    for w in (0.0, 2.0):
        seq, nfe_seq = sf.sample(m, cond, dataclasses.replace(cfg, sampler="sequential", guidance=w), z=z)
        jac, nfe_jac = sf.sample(m, cond, dataclasses.replace(cfg, sampler="jacobi", guidance=w, jacobi_chunk=8,
                                                               jacobi_max_iter=8, jacobi_threshold=1e-7), z=z)
        assert (jac - seq).abs().max() < 1e-3
        assert nfe_jac < nfe_seq


def test_guidance_zero_equals_unguided_and_rule_is_the_gaussian_product():
    m, cfg = _model(dtype=torch.float64)
    cond = m.make_cond(torch.tensor([1, 5]))
    z = torch.randn(2, m.T, m.D, dtype=torch.float64)
    plain, _ = sf.sample(m, cond, dataclasses.replace(cfg, guidance=0.0), z=z)
    for rule in ("starflow", "tarflow"):  # a vanishing weight through the batched cond/null branch
        tiny, _ = sf.sample(m, cond, dataclasses.replace(cfg, guidance=1e-12, guidance_rule=rule), z=z)
        torch.testing.assert_close(tiny, plain, atol=1e-9, rtol=0)
    strong, _ = sf.sample(m, cond, dataclasses.replace(cfg, guidance=3.0), z=z)
    assert (strong - plain).abs().max() > 1e-3
    # p_c^(1+w) / p_u^w on a grid, normalised numerically, against the closed form (sigma_c < sigma_u: exact product)
    w, mu_c, s_c, mu_u, s_u = 1.5, 0.3, 0.7, -0.4, 1.1
    t = torch.linspace(-12, 12, 200001, dtype=torch.float64)
    def log_normal(m, s):
        return -0.5 * ((t - m) / s) ** 2 - math.log(s)

    logp = (1 + w) * log_normal(mu_c, s_c) - w * log_normal(mu_u, s_u)
    p = torch.softmax(logp, 0)
    mean = (p * t).sum()
    std = (p * (t - mean) ** 2).sum().sqrt()
    args = (torch.tensor(v, dtype=torch.float64) for v in (mu_c, math.log(s_c), mu_u, math.log(s_u)))
    mu, log_sigma = sf.guide(*args, w)
    assert abs(mu - mean) < 1e-6 and abs(log_sigma.exp() - std) < 1e-6


def test_denoising_step_is_tweedie_with_the_flow_score():
    m, cfg = _model(dtype=torch.float64)
    x = torch.randn(2, cfg.channels, cfg.img_size, cfg.img_size, dtype=torch.float64)
    cond = m.make_cond(torch.tensor([0, 3]))
    out = sf.denoise(m, x, cond, sigma=0.3)
    eps, (b, c, i, j) = 1e-5, (1, 1, 2, 3)  # finite-difference score of one coordinate
    e = torch.zeros_like(x)
    e[b, c, i, j] = eps
    fd = (m.log_prob(x + e, cond)[b] - m.log_prob(x - e, cond)[b]) / (2 * eps)
    assert abs(out[b, c, i, j] - (x[b, c, i, j] + 0.09 * fd)) < 1e-7
    assert (out - x).abs().max() > 1e-3


@pytest.fixture(scope="module")
def undertrained(tmp_path_factory):
    """A TARFlow (sigma = exp, soft clipping off) trained for 150 steps on the digits: a rough model, the kind on which
    Jacobi once returned NaN. Returns (model, cfg, held-out dequantised bits/dim before, after)."""
    cfg = sf.Config(out_dir=str(tmp_path_factory.mktemp("tarflow")), param="tarflow", soft_clip=0.0,
                    cond_deep_only=False, steps=150, batch_size=64, lr=3e-3, warmup=10, patch_size=2, width=48,
                    head_dim=16, layers=(1, 2), noise_std=0.05, log_every=50, eval_every=10**6, ckpt_every=10**6,
                    denoise=False)
    d = common.Dist()
    common.seed_all(0)
    model, vae = sf.build(cfg, d.device)
    test = sf.load_data(cfg, "val")
    before = sf.heldout_bpd(model, cfg, test, vae, d, dequantize=True)[0]

    def loss_fn(net, batch, at):
        x = sf.to_model_space(batch[0], vae)
        return sf.nll_loss(net, x, sf.batch_cond(model, batch, cfg.label_drop), cfg.noise_std), {}

    common.train(cfg, model, loss_fn, sf.load_data(cfg), d)
    after = sf.heldout_bpd(model, cfg, test, vae, d, dequantize=True)
    return model.eval(), cfg, before, after


def test_short_training_lowers_heldout_bpd(undertrained, capsys):
    _, _, before, (after, se, n) = undertrained
    assert before - after > 1.2, (before, after)  # measured: 8.84 -> 6.97 dequantised bits/dim
    assert n == 359 and 0 < se < 0.05 * (before - after)  # the digits test split; measured: se 0.016
    common.check_heldout(n, se, "bits/dim", "--val_data", tol=se / 2)
    common.check_heldout(n, se, "bits/dim", "--val_data", tol=se * 2)
    assert capsys.readouterr().err.count("warning: bits/dim on 359 held-out examples has a standard error") == 1


def test_jacobi_on_an_undertrained_tarflow_matches_sequential_and_stays_finite(undertrained, monkeypatch):
    model, cfg, _, _ = undertrained
    cond = model.make_cond(torch.arange(64) % 10)
    z = torch.randn(64, model.T, model.D, generator=torch.Generator().manual_seed(1))
    guided = dict(guidance=3.0, guidance_rule="tarflow", guide_all_blocks=True)
    seq, _ = sf.sample(model, cond, dataclasses.replace(cfg, sampler="sequential", **guided), z=z)
    jac, nfe = sf.sample(model, cond, dataclasses.replace(cfg, sampler="jacobi", **guided), z=z)
    assert torch.isfinite(seq).all() and torch.isfinite(jac).all()
    # per-sample stopping: measured 5e-5 (the former batch-mean test stopped while a few samples still moved: 2.0e-3)
    assert (jac - seq).abs().max() < 5e-4
    # an iterate that overflows (here forced at every Jacobi iteration) never reaches the sample: the chunk is redone
    # one token at a time, exactly the sequential sampler
    step = sf.FlowBlock.step

    def overflowing(self, u, s, st):
        mu, log_sigma = step(self, u, s, st)
        if u.shape[1] > 1:
            log_sigma = log_sigma.clone()
            log_sigma[:, -1] = 1e4
        return mu, log_sigma
    monkeypatch.setattr(sf.FlowBlock, "step", overflowing)
    jac, _ = sf.sample(model, cond, dataclasses.replace(cfg, sampler="jacobi", **guided), z=z)
    assert torch.isfinite(jac).all() and (jac - seq).abs().max() < 1e-5


CLI = [sys.executable, str(ROOT / "starflow.py")]
SMALL = ["--patch_size", "2", "--width", "32", "--head_dim", "16", "--layers", "1,1", "--batch_size", "16",
         "--log_every", "2", "--eval_every", "100000", "--ckpt_every", "100000", "--noise_std", "0",
         "--label_drop", "0"]


def _cli(args, ok=True, cmd=CLI):
    r = subprocess.run(cmd + args, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert (r.returncode == 0) == ok, r.stderr[-3000:]
    return r


def test_cli_resume_equals_uninterrupted_and_sample_npz(tmp_path):
    _cli(SMALL + ["--steps", "6", "--out_dir", str(tmp_path / "a")])
    _cli(SMALL + ["--steps", "6", "--stop_after", "3", "--out_dir", str(tmp_path / "b")])
    assert common.load_checkpoint(tmp_path / "b" / "ckpt.pt")["step"] == 3
    _cli(SMALL + ["--steps", "6", "--out_dir", str(tmp_path / "b"), "--resume"])
    a, b = (common.load_checkpoint(tmp_path / p / "ckpt.pt") for p in ("a", "b"))
    assert b["step"] == 6
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    out = tmp_path / "s.npz"
    _cli(["--sample", "--ckpt", str(tmp_path / "a" / "ckpt.pt"), "--n", "12", "--out", str(out), "--guidance", "0.5"])
    with np.load(out) as f:
        assert f["images"].shape == (12, 8, 8, 1) and f["images"].dtype == np.uint8
        assert f["labels"].tolist() == [i % 10 for i in range(12)]
        assert f["images"].std() > 1  # not a constant image


def test_torchrun_two_processes_match_single_process(tmp_path):
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
                str(ROOT / "starflow.py")]
    _cli(SMALL + ["--steps", "4", "--out_dir", str(tmp_path / "one")])
    _cli(SMALL + ["--steps", "4", "--out_dir", str(tmp_path / "two")], cmd=torchrun)
    # FSDP2 in fp32 (--no-amp: exact), with the end-of-training evaluation (bits/dim, sampling) on the sharded model
    r = _cli(SMALL + ["--steps", "4", "--out_dir", str(tmp_path / "fsdp"), "--fsdp", "--no-amp", "--eval_every", "4"],
             cmd=torchrun)
    assert "accuracy_guided" in r.stdout
    a, b, c = (common.load_checkpoint(tmp_path / p / "ckpt.pt") for p in ("one", "two", "fsdp"))
    for k in a["model"]:
        torch.testing.assert_close(a["model"][k], b["model"][k], atol=2e-5, rtol=0, msg=k)
        torch.testing.assert_close(a["model"][k], c["model"][k], atol=2e-5, rtol=0, msg=k)
    # sampling under torchrun: the ranks split the samples, one file is written
    out = tmp_path / "s.npz"
    _cli(["--sample", "--ckpt", str(tmp_path / "two" / "ckpt.pt"), "--num_samples", "7", "--out", str(out)],
         cmd=torchrun)
    with np.load(out) as f:
        assert f["images"].shape == (7, 8, 8, 1) and sorted(f["labels"].tolist()) == sorted(i % 10 for i in range(7))
    assert not list(tmp_path.glob(".s.rank*"))


def test_bad_inputs_give_one_clear_line(tmp_path):
    r = _cli(["--img_size", "9", "--patch_size", "2", "--steps", "1"], ok=False)
    assert r.stderr.strip().splitlines()[-1] == "error: size 9 is not divisible by patch_size 2"
    r = _cli(["--channels", "3", "--steps", "1"], ok=False)
    assert r.stderr.strip().splitlines()[-1].startswith("error: digits have 1 channel")
    r = _cli(["--sample", "--ckpt", str(tmp_path / "missing.pt")], ok=False)
    assert r.stderr.strip() == f"error: no checkpoint at {tmp_path / 'missing.pt'}"
    m, cfg = _model(dtype=torch.float32)
    with pytest.raises(ValueError, match=r"class labels must be in \[0, 10\)"):
        m.make_cond(torch.tensor([3, 10]))
    with pytest.raises(ValueError, match=r"input of shape \(3, 4, 4\)"):
        m(torch.randn(1, 3, 4, 4), m.make_cond(torch.tensor([1])))
    state = {"config": dataclasses.asdict(cfg)}
    with pytest.raises(ValueError, match="width=32"):
        common.config_from_checkpoint(sf.Config, state, {"width": 64})


@pytest.fixture(scope="module")
def vae_folder(tmp_path_factory):
    return common.train_vae(tmp_path_factory.mktemp("vae"), steps=20)  # a real (if rough) latent space: 16x16 -> 4x8x8


def test_latent_space_through_load_vae(tmp_path, vae_folder):
    folder = vae_folder
    cfg = sf.Config(data="digits", img_size=16, vae=folder, vae_family="sd", noise_std=0.3, layers=(1, 1), width=32,
                    head_dim=16, denoise=False, guidance=0.0)
    model, vae = sf.build(cfg, "cpu")
    assert (model.C, model.S) == (4, 8)
    x = common.load_digits("test", 16)[0][:4]
    lat = sf.to_model_space(x, vae)
    torch.testing.assert_close(lat, vae.encode(common.to_float(x)))
    cond = model.make_cond(torch.arange(4))
    z, _ = model(lat, cond)
    back, _ = sf.sample(model.eval(), cond, cfg, z=z)
    torch.testing.assert_close(back, lat, atol=1e-4, rtol=0)
    imgs, _ = sf.generate(model, cfg, torch.arange(3), vae, seed=0)
    assert imgs.shape == (3, 1, 16, 16) and imgs.dtype == torch.uint8
    # precomputed latents: an .npz of images -> latents.npy + labels.npy, read back as the training data
    x, y = common.load_digits("test", 16)
    np.savez(tmp_path / "imgs.npz", images=x[:10].permute(0, 2, 3, 1).numpy(), labels=y[:10].numpy())
    lat_cfg = dataclasses.replace(cfg, data=str(tmp_path / "latents"))
    sf.precompute_latents(lat_cfg, str(tmp_path / "imgs.npz"), common.Dist())
    data = sf.load_data(lat_cfg, "all")
    lat, lab = data[np.arange(10)]
    torch.testing.assert_close(lat.float(), vae.encode(common.to_float(x[:10])), atol=2e-2, rtol=0)  # stored as fp16
    assert torch.equal(lab, y[:10])


def test_bf16_sampling_under_autocast_tracks_fp32(undertrained):
    """Under autocast the network and its KV cache run in bf16, the flow's state in fp32. bf16 keeps 8 mantissa bits
    (relative rounding 2^-9 = 0.2%); each token's (mu, log sigma) carries that error into x = mu + sigma z and on
    through the later tokens and blocks, so on samples of scale ~3 we allow 0.1 (measured 0.05) and ask for a
    difference (the bf16 path really ran)."""
    model, cfg, _, _ = undertrained
    cond = model.make_cond(torch.arange(16) % 10)
    z = torch.randn(16, model.T, model.D, generator=torch.Generator().manual_seed(1))
    for sampler in ("sequential", "jacobi"):
        c = dataclasses.replace(cfg, sampler=sampler, guidance=1.0)
        ref, _ = sf.sample(model, cond, c, z=z)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low, _ = sf.sample(model, cond, c, z=z)
            block = model.blocks[-1]
            st = block.start(2, *block.embed_cond(model.make_cond(torch.arange(2))), "cpu")
        assert low.dtype == torch.float32 and st["kv"][0].dtype == torch.bfloat16
        err = (low - ref).abs().max().item()
        assert 1e-4 < err < 0.1, (sampler, err)


@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated")  # inside inductor
def test_compiled_one_token_step_is_one_graph_per_block_and_equals_eager(monkeypatch):
    """`--compile` sampling: the one-token step takes its position as a tensor, so torch.compile captures it whole
    (fullgraph) once per block shape and batch size, for every token and every later call, and it computes what the
    eager step does: with the caption mask and learned positions, and with RoPE and guidance (two batch sizes)."""
    from torch._dynamo.testing import CompileCounter
    for case in (dict(num_classes=0, txt_dim=6, txt_len=4), dict(param="tarflow", rope=True, cond_deep_only=False)):
        m, cfg = _model(**case)
        cond = _cond(m, text=bool(cfg.txt_dim))
        c = dataclasses.replace(cfg, sampler="sequential", guidance=1.5)
        z = torch.randn(3, m.T, m.D, dtype=torch.float64)
        ref, _ = sf.sample(m, cond, c, z=z)
        counter, compile_ = CompileCounter(), torch.compile
        monkeypatch.setattr(torch, "compile", lambda fn, **kw: compile_(fn, backend=counter, **kw))
        graphs = []
        for _ in range(2):
            out, _ = sf.sample(m, cond, dataclasses.replace(c, compile=True), z=z)
            assert (out - ref).abs().max() < 1e-10
            graphs.append(counter.frame_count)
        # at most a graph per block (blocks of one shape and batch size share one); the second call compiles none
        assert 0 < graphs[0] == graphs[1] <= len(m.blocks)
        monkeypatch.setattr(torch, "compile", compile_)
    torch._dynamo.reset()
    m32 = m.float()  # and inductor's kernels (fp32) agree with eager
    out, _ = sf.sample(m32, cond, dataclasses.replace(c, compile=True), z=z.float())
    assert (out - sf.sample(m32, cond, c, z=z.float())[0]).abs().max() < 1e-4


def test_default_sample_batch_is_sized_to_the_kv_cache_sampling_allocates():
    """t2i256 built on the meta device (its shapes, none of its 3B weights): the default batch is the largest whose
    KV caches, as `FlowBlock.start` allocates them for both guidance branches, fit the CPU budget of 4 GiB."""
    cfg = sf.Config(**sf.PRESETS["t2i256"])
    with torch.device("meta"):
        m = sf.STARFlow(cfg, *sf.latent_shape(cfg))
    n = sf.sample_batch(m, cfg, "cpu")
    text = torch.zeros(1, cfg.txt_len, cfg.txt_dim, device="meta")
    per = 0  # bytes per sample of the biggest block's caches
    for block in m.blocks:
        branches = 2 if block.prefix else 1  # `reverse` guides a block that has a condition: one sample, two rows
        cond = m.make_cond(text=text.expand(branches, -1, -1), null=torch.arange(branches, device="meta") > 0)
        st = block.start(branches, *block.embed_cond(cond), "meta")
        per = max(per, sum(kv.numel() * kv.element_size() for kv in st["kv"]))
    assert n * per <= 4 * 2 ** 30 < (n + 1) * per and n == 3
    assert sf.sample_batch(m, dataclasses.replace(cfg, sample_batch=7), "cpu") == 7  # an explicit batch wins


@pytest.mark.parametrize("text", [False, True])
def test_training_loss_reads_no_value_on_the_host(text):
    """The training step's model code (condition, noise, NLL, latent regulariser, backward) runs on the meta device,
    where anything that reads a value on the host (.item(), bool(), a data-dependent check) raises: so on a GPU the
    step never waits for the device. The label range check of `make_cond` is such a sync, hence skipped there."""
    kw = dict(num_classes=0, txt_dim=6, txt_len=4) if text else {}
    cfg = sf.Config(**{**TINY, **kw})
    with torch.device("meta"):
        m = sf.STARFlow(cfg, *sf.latent_shape(cfg))
        x = torch.randn(4, cfg.channels, cfg.img_size, cfg.img_size)
        batch = (x, torch.randn(4, cfg.txt_len, cfg.txt_dim), torch.ones(4, cfg.txt_len, dtype=torch.bool)) \
            if text else (x, torch.zeros(4, dtype=torch.long))
        batch = (batch[0], None, *batch[1:]) if text else batch
    loss = sf.nll_loss(m, x, sf.batch_cond(m, batch, drop=0.1), noise_std=0.1, latent_reg=1e-4)
    loss.backward()
    assert all(p.grad is not None and p.grad.is_meta for p in m.blocks[-1].parameters())
    if not text:
        with pytest.raises(RuntimeError, match="meta"):  # the checked path does read a value: the test can fail
            m.make_cond(batch[1])


def test_attention_temperature_and_guidance_without_a_condition():
    m, cfg = _model(dtype=torch.float64, param="tarflow", cond_deep_only=False)
    cond = m.make_cond(torch.tensor([1, 5]))
    z = torch.randn(2, m.T, m.D, dtype=torch.float64)
    plain, _ = sf.sample(m, cond, dataclasses.replace(cfg, guidance=0.0), z=z)
    w = dict(guidance=2.0, guidance_rule="tarflow")
    guided, _ = sf.sample(m, cond, dataclasses.replace(cfg, **w), z=z)
    tempered, _ = sf.sample(m, cond, dataclasses.replace(cfg, **w, attn_temp=0.5), z=z)
    assert (tempered - guided).abs().max() > 1e-3  # the temperature changes the guided samples...
    tiny, _ = sf.sample(m, cond, dataclasses.replace(cfg, guidance=1e-12, attn_temp=0.5), z=z)
    torch.testing.assert_close(tiny, plain, atol=1e-9, rtol=0)  # ...through the unconditional branch only
    # an unconditional model: guidance is an error, unless the tempered branch gives it something to guide against
    with pytest.raises(ValueError, match="--guidance 2.0 needs a class- or text-conditional model"):
        sf.Config(num_classes=0, guidance=2.0)
    u, ucfg = _model(dtype=torch.float64, param="tarflow", num_classes=0, guidance=0.0)
    ucond = u.make_cond(batch=2)
    with pytest.raises(ValueError, match="without a condition"):  # a cfg that says otherwise is refused too
        sf.sample(u, ucond, dataclasses.replace(ucfg, guidance=2.0, num_classes=10), z=z)
    base, _ = sf.sample(u, ucond, ucfg, z=z)
    temp, _ = sf.sample(u, ucond, dataclasses.replace(ucfg, guidance=2.0, guidance_rule="tarflow", attn_temp=0.5), z=z)
    assert (temp - base).abs().max() > 1e-3


def test_heldout_split_is_disjoint_fixed_and_can_be_a_separate_file(tmp_path):
    x, y = common.load_digits("test", 8)
    np.savez(tmp_path / "a.npz", images=x[:100].permute(0, 2, 3, 1).numpy(), labels=y[:100].numpy())
    np.savez(tmp_path / "b.npz", images=x[100:107].permute(0, 2, 3, 1).numpy(), labels=y[100:107].numpy())
    cfg = sf.Config(data=str(tmp_path / "a.npz"), val_frac=0.1)
    train, val = sf.load_data(cfg), sf.load_data(cfg, "val")
    rows = lambda data: {bytes(data[i][0].numpy()) + bytes([int(data[i][1])]) for i in range(len(data))}  # noqa: E731
    assert (len(train), len(val)) == (90, 10) and not rows(train) & rows(val)
    assert rows(train) | rows(val) == rows(sf.load_data(cfg, "all"))
    assert torch.equal(sf.load_data(cfg, "val")[np.arange(10)][0], val[np.arange(10)][0])  # the same rows every time
    other = dataclasses.replace(cfg, val_data=str(tmp_path / "b.npz"))
    assert len(sf.load_data(other)) == 100 and len(sf.load_data(other, "val")) == 7
    digits = sf.Config()
    assert torch.equal(sf.load_data(digits, "val")[np.arange(5)][0], common.load_digits("test", 8)[0][:5])


def test_uniform_dequantisation_latent_regulariser_and_denoising_sub_batches():
    u = torch.arange(256, dtype=torch.uint8).repeat(4)
    x = sf.dequantize_pixels(u)
    assert x.min() >= -1 and x.max() < 1 and torch.equal(((x + 1) * 128).floor().to(torch.uint8), u)
    assert abs(sf.bits_per_dim(0.0, True, uniform=True) - sf.bits_per_dim(0.0, True) - math.log2(128 / 127.5)) < 1e-12
    with pytest.raises(ValueError, match="--dequant uniform"):
        sf.Config(dequant="uniform", vae="x", vae_family="sd")
    m, cfg = _model(dtype=torch.float64)
    x = torch.randn(3, cfg.channels, cfg.img_size, cfg.img_size, dtype=torch.float64)
    cond = m.make_cond(torch.tensor([0, 1, 2]))
    states = []
    z, _ = m(x, cond, states)
    reg = sum(s.square().mean() for s in states[:-1])  # the states between blocks, not the final z
    assert len(states) == len(m.blocks) and torch.equal(states[-1], z)
    torch.testing.assert_close(sf.nll_loss(m, x, cond, latent_reg=0.5), sf.nll_loss(m, x, cond) + 0.5 * reg)
    torch.testing.assert_close(sf.denoise(m, x, cond, 0.3, parts=3), sf.denoise(m, x, cond, 0.3, parts=1))


def test_t2i_order_and_final_norm_follow_ml_starflow():
    cfg = sf.Config(**{**sf.PRESETS["t2i256"], "width": 64, "head_dim": 16, "layers": (1,) * 6, "txt_dim": 8,
                       "txt_len": 4, "img_size": 16})
    m = sf.STARFlow(cfg, *sf.latent_shape(cfg))
    assert [b.flip for b in m.blocks] == [True, False, True, False, True, False]  # L2R: the deep block unflipped
    assert all(isinstance(b.norm_out, torch.nn.RMSNorm) for b in m.blocks) and m.T == 4  # patch 1 on 2x2 latents
    assert [b.flip for b in sf.STARFlow(sf.Config(), 1, 8).blocks] == [False, True, False, True]  # R2L


def test_precompute_encodes_at_the_size_of_its_images(vae_folder, tmp_path, capsys):
    """--precompute reads the size of the images it encodes (the default img_size 8 does not fit 16x16 digits); an
    explicit --img_size still wins."""
    x, y = common.load_digits("test", 16)
    np.savez(tmp_path / "imgs.npz", images=x[:20].permute(0, 2, 3, 1).numpy(), labels=y[:20].numpy())
    vae = ["--vae", vae_folder, "--vae_family", "sd", "--precompute", str(tmp_path / "imgs.npz")]
    sf.main(vae + ["--data", str(tmp_path / "own")])
    assert "16x16 images with 1 channel(s): --img_size 16" in capsys.readouterr().out
    sf.main(vae + ["--data", str(tmp_path / "given"), "--img_size", "16"])
    own, given = np.load(tmp_path / "own" / "latents.npy"), np.load(tmp_path / "given" / "latents.npy")
    assert own.shape == (20, 4, 8, 8) and np.array_equal(own, given)
    cfg, _, _ = common.parse_config(sf.Config, sf.PRESETS, ["--data", str(tmp_path / "own"), "--vae", vae_folder,
                                                            "--vae_family", "sd", "--out_dir", str(tmp_path / "r")])
    assert (cfg.img_size, cfg.channels) == (16, 1)  # training on the folder: the size of the images it encodes
    with pytest.raises(ValueError, match=r"must be \(N, 8, 8, 1\) uint8, got \(20, 16, 16, 1\)"):
        sf.main(vae + ["--data", str(tmp_path / "small"), "--img_size", "8"])  # an .npz is never resized


def test_text_to_image_end_to_end_through_a_latent_folder(vae_folder, tmp_path, capsys):
    """--precompute (images + captions) -> latent folder -> train with a held-out evaluation that samples from held-out
    captions -> --eval -> --sample --captions, on CPU. (t2i256 once crashed at its first evaluation.)"""
    x, y = common.load_digits("train", 16)
    n, g = 120, np.random.default_rng(0)
    text = (g.standard_normal((10, 3, 8))[y[:n].numpy()] + 0.1 * g.standard_normal((n, 3, 8))).astype(np.float32)
    mask = np.ones((n, 3), bool)
    mask[::2, 2] = False  # every other caption is padded
    np.savez(tmp_path / "caps.npz", images=x[:n].permute(0, 2, 3, 1).numpy(), labels=y[:n].numpy(), text=text,
             text_mask=mask)
    lat, out = tmp_path / "lat", tmp_path / "run"
    args = ["--img_size", "16", "--vae", vae_folder, "--vae_family", "sd", "--num_classes", "0", "--txt_dim", "8",
            "--txt_len", "3", "--data", str(lat), "--val_frac", "0.1", "--noise_std", "0.3"]
    sf.main(args + ["--precompute", str(tmp_path / "caps.npz")])
    assert np.array_equal(np.load(lat / "text.npy"), text) and np.array_equal(np.load(lat / "text_mask.npy"), mask)
    cfg = sf.Config(data=str(lat), img_size=16, vae_family="sd", num_classes=0, txt_dim=8, txt_len=3, val_frac=0.1)
    train, val = sf.load_data(cfg), sf.load_data(cfg, "val")
    assert isinstance(train.arrays[2], np.memmap) and (len(train), len(val)) == (108, 12)  # text memory-mapped
    assert sf.text_padded(train)
    sf.main(args + ["--out_dir", str(out), "--steps", "4", "--batch_size", "16", "--width", "32", "--head_dim", "16",
                    "--layers", "1,1", "--eval_every", "4", "--log_every", "2"])
    final = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()][-1]
    assert math.isfinite(final["bpd"]) and (out / "samples.png").exists()
    capsys.readouterr()
    sf.main(["--eval", "--ckpt", str(out / "ckpt.pt")])
    assert math.isfinite(json.loads(capsys.readouterr().out.strip().splitlines()[-1])["bpd"])
    sf.main(["--sample", "--ckpt", str(out / "ckpt.pt"), "--captions", str(tmp_path / "caps.npz"), "--n", "6",
             "--out", str(tmp_path / "s.npz")])
    model, mcfg = sf.from_checkpoint(out / "ckpt.pt")  # the CLI's samples are generate's, with the padding masks
    imgs, _ = sf.generate(model, mcfg, torch.zeros(6, dtype=torch.long), model.vae, seed=mcfg.seed + 1000,
                          text=torch.as_tensor(text[:6]), text_mask=torch.as_tensor(mask[:6]))
    with np.load(tmp_path / "s.npz") as f:
        assert f["images"].shape == (6, 16, 16, 1) and np.array_equal(f["images"], imgs.permute(0, 2, 3, 1).numpy())
    z = torch.randn(6, model.T, model.D)
    t = torch.as_tensor(text[:6])
    padded, _ = sf.sample(model, model.make_cond(text=t, text_mask=torch.as_tensor(mask[:6])), mcfg, z=z)
    unpadded, _ = sf.sample(model, model.make_cond(text=t), mcfg, z=z)
    assert (padded - unpadded)[::2].abs().max() > 0 and torch.equal(padded[1::2], unpadded[1::2])  # masks reach it


def test_decoder_finetuned_on_noisy_latents_decodes_them_better(vae_folder, tmp_path, monkeypatch, capsys):
    cfg = sf.Config(img_size=16, vae=vae_folder, vae_family="sd", noise_std=0.3, out_dir=str(tmp_path), batch_size=16,
                    lr=1e-3, warmup=5, layers=(1, 1), width=32, head_dim=16, guidance=0.0)
    x = common.to_float(common.load_digits("test", 16)[0][:128])  # held-out images
    vae = sf.load_vae(cfg, "cpu")
    z = vae.encode(x)
    noisy = z + 0.3 * torch.randn(z.shape, generator=torch.Generator().manual_seed(0))
    before = (vae.decode(noisy) - x).square().mean()
    path = sf.finetune_decoder(cfg, 25, common.Dist())
    tuned = dataclasses.replace(cfg, decoder=str(path))
    after = (sf.load_vae(tuned, "cpu").decode(noisy) - x).square().mean()
    assert after < 0.6 * before, (before, after)  # measured: MSE 0.144 -> 0.054 after 25 steps
    # the README's `--eval --ckpt --decoder`: the latent model (and its VAE) come from the checkpoint
    run = tmp_path / "run"
    sf.main(["--img_size", "16", "--vae", vae_folder, "--vae_family", "sd", "--noise_std", "0.3", "--layers", "1,1",
             "--width", "32", "--head_dim", "16", "--steps", "1", "--batch_size", "8", "--out_dir", str(run)])
    capsys.readouterr()
    sf.main(["--eval", "--ckpt", str(run / "ckpt.pt"), "--decoder", str(path)])
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["accuracy_guided"] >= 0
    model, _ = sf.build(tuned, "cpu")
    monkeypatch.setattr(sf, "denoise", lambda *a, **k: pytest.fail("the score step ran with a fine-tuned decoder"))
    sf.sample(model.eval(), model.make_cond(torch.arange(2)), tuned)


def test_zeroed_text_padding_keeps_attention_causal_and_fused():
    """--text_padding zero (ml-starflow): padded caption tokens are zeroed and attended, so training attention is
    is_causal with no mask and decoding needs no per-sample mask; the same function as the caption zeroed by hand."""
    m, cfg = _model(dtype=torch.float32, num_classes=0, txt_dim=6, txt_len=4, text_padding="zero")
    g = torch.Generator().manual_seed(2)
    text, mask = torch.randn(3, 4, 6, generator=g), torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]]).bool()
    x = torch.randn(3, cfg.channels, cfg.img_size, cfg.img_size, generator=g)
    calls, sampling = [], []
    with common.record_attention(calls):
        z, logdet = m(x, m.make_cond(text=text, text_mask=mask))
    with common.record_attention(sampling):
        x_back, _ = sf.sample(m, m.make_cond(text=text, text_mask=mask), dataclasses.replace(cfg, guidance=0.0), z=z)
    assert calls and all(c["mask"] is None and c["causal"] for c in calls)  # training: is_causal, no mask
    assert all(c["mask"] is None or len(c["mask"]) == 2 for c in sampling)  # decoding: at most a shared chunk mask
    assert (x_back - x).abs().max() < 1e-4
    z0, logdet0 = m(x, m.make_cond(text=text * mask[..., None]))
    torch.testing.assert_close(z, z0)
    torch.testing.assert_close(logdet, logdet0)
    masked, _ = _model(dtype=torch.float32, num_classes=0, txt_dim=6, txt_len=4)  # the default masks them out
    with common.record_attention(calls := []):
        masked(x, masked.make_cond(text=text, text_mask=mask))
    assert common.dense_masks(calls)
