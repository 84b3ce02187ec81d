"""Paper scale without a GPU (common.py's dry run): memory estimates on the meta device against a measured CPU run,
attention calls recorded, and each model file's presets sized."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

import common
from conftest import ROOT


class Net(nn.Module):
    def __init__(self, width=64, depth=2):
        super().__init__()
        self.inp = nn.Linear(8, width)
        self.blocks = nn.ModuleList(common.Block(width, 4) for _ in range(depth))
        self.out = nn.Linear(width, 8)

    def forward(self, x, mask=None):
        h = self.inp(x)
        for b in self.blocks:
            h = b(h, causal=mask is None, mask=mask)
        return self.out(h)


def _loss(m, b, T=256, dense=False):
    dev = next(m.parameters()).device
    x = torch.randn(b, T, 8, device=dev, dtype=next(m.parameters()).dtype)
    mask = torch.ones(T, T, dtype=torch.bool, device=dev).tril() if dense else None
    return (m(x, mask) - x).square().mean()


def _saved_bytes(model, forward):
    """What a real forward keeps for backward: the storages autograd saves, each once, parameters excluded."""
    params, seen = {p.untyped_storage()._cdata for p in model.parameters()}, {}

    def pack(t):
        st = t.untyped_storage()
        if st._cdata not in params:
            seen[st._cdata] = st.nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = forward()
    return sum(seen.values()), out


def test_activation_estimate_on_meta_matches_a_measured_cpu_forward():
    """The meta-device estimate (with attention as a fused kernel keeps it) against a real CPU forward (CPU SDPA is
    a fused kernel too): what autograd saves, within 1%, and the memory the forward still holds when it ends, by
    the profiler's allocations minus frees, within 10%."""
    for depth, T in ((2, 256), (4, 128)):
        with torch.device("meta"):
            meta = Net(depth=depth)
        est = common.activation_bytes(meta, lambda: _loss(meta, 8, T), (common.Block,))
        torch.manual_seed(0)
        real, x = Net(depth=depth), torch.randn(8, T, 8)
        saved, loss = _saved_bytes(real, lambda: (real(x) - x).square().mean())
        assert abs(est["all"] - saved) < 0.01 * saved, (est, saved)  # measured: equal
        assert est["grad_ckpt"] < 0.7 * est["all"]
        loss.backward()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:  # the last case, once
        loss = (real(x) - x).square().mean()
    held = sum(e.self_cpu_memory_usage for e in prof.events())
    assert abs(est["all"] - held) < 0.1 * held, (est, held)  # measured: 17.24 MB vs 17.20 MB


def test_dry_run_reports_parameters_memory_and_dense_masks():
    cfg = common.TrainConfig(batch_size=64, grad_accum=2)
    kw = dict(tokens=256, gpus=8, block_types=(common.Block,))
    causal = common.dry_run(cfg, lambda: Net(width=128, depth=3), lambda m, b: _loss(m, b), **kw)
    n = sum(p.numel() for p in Net(width=128, depth=3).parameters())
    assert causal["params"] == n and sum(causal["params_by_part"].values()) == n
    assert causal["params_by_part"]["blocks"] == 3 * sum(p.numel() for p in common.Block(128, 4).parameters())
    assert causal["micro_batch"] == 4 and causal["dense_masks"] == 0 and causal["attention_calls"] == 3
    t = causal["train_gib_per_gpu"]
    assert t["weights_grads_adam"] == float(f"{16 * n / 8 / 2 ** 30:.4g}")
    dense = common.dry_run(cfg, lambda: Net(width=128, depth=3), lambda m, b: _loss(m, b, dense=True), **kw)
    assert dense["dense_masks"] == 3 and dense["dense_mask_gib"] == float(f"{3 * 256 * 256 / 2 ** 30:.4g}")


def test_record_attention_sees_masks_and_restores_sdpa():
    sdpa, calls = F.scaled_dot_product_attention, []
    q = torch.randn(2, 4, 6, 8)
    with common.record_attention(calls):
        ref = F.scaled_dot_product_attention(q, q, q, is_causal=True)
        F.scaled_dot_product_attention(q, q, q, attn_mask=torch.ones(6, 6, dtype=torch.bool))
    assert F.scaled_dot_product_attention is sdpa
    torch.testing.assert_close(ref, sdpa(q, q, q, is_causal=True))  # recording computes the same
    assert [c["causal"] for c in calls] == [True, False] and calls[1]["mask"] == (6, 6)
    assert len(common.dense_masks(calls)) == 1


def _dry(module, preset, *extra):
    r = subprocess.run([sys.executable, str(ROOT / f"{module}.py"), "--preset", preset, "--dry_run", *extra],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_wcfm_and_mogfn_presets_are_sized_on_the_meta_device():
    import mogfn
    import wcfm
    for name, preset in wcfm.PRESETS.items():
        out = wcfm.dry_run(wcfm.Config(**preset), gpus=8)
        assert out["dense_masks"] == 0 and out["train_gib_per_gpu"]["total"] > 0, name
    # the CIFAR-10 U-Net of torchcfm's recipe is DDPM's CIFAR-10 model: 35.7M parameters (Ho et al. 2020, App. B)
    assert round(_dry("wcfm", "cifar10")["params"] / 1e6, 1) == 35.7
    for name, preset in mogfn.PRESETS.items():
        cfg = mogfn.Config(**preset)
        out = mogfn.dry_run(cfg, gpus=1)
        assert out["params"] == sum(p.numel() for p in mogfn.build(cfg).parameters()), name


# --- every model file at paper scale ----------------------------------------------------------------------------------

SIZES = {  # (file, preset): parameters in millions as published, and the source
    ("starflow", "imagenet256"): (1400, "STARFlow paper Sec. 4: 1.4B deep-shallow model for ImageNet 256"),
    ("starflow", "t2i256"): (3800, "STARFlow paper: the 3.8B text-to-image model (configs/starflow_3B_t2i_256x256)"),
    ("starflow_v", "t2v-480p"): (7000, "STARFlow-V paper: a ~7B text-to-video model"),
    ("arflow", "imagenet256"): (712, "DiT-XL/2's 675M plus the gated linear attention's gate and output gate"),
    ("wcfm", "cifar10"): (35.7, "DDPM's CIFAR-10 U-Net, 35.7M (Ho et al. 2020, App. B), torchcfm's recipe"),
    ("latent_fm", "imagenet256"): (130, "DiT paper Table 1: DiT-B, 130M (LFM's ImageNet model, DiT-B/2)"),
}


def _files():
    import arflow
    import latent_fm
    import mogfn
    import starflow
    import starflow_v
    import wcfm
    return {"starflow": starflow, "starflow_v": starflow_v, "arflow": arflow, "wcfm": wcfm, "mogfn": mogfn,
            "latent_fm": latent_fm}


@pytest.mark.parametrize("name", ["starflow", "starflow_v", "arflow", "wcfm", "mogfn", "latent_fm"])
def test_every_preset_is_sized_on_meta_without_a_dense_mask_or_a_host_read(name):
    """--dry_run for every preset: the bf16 training step (forward and backward) on the meta device, where any host
    read of a value raises; every attention call at the preset's real token layout without a dense mask; the
    parameter counts the papers give."""
    mod = _files()[name]
    for preset, fields in mod.PRESETS.items():
        cfg = mod.Config(**fields)
        out = mod.dry_run(cfg, gpus=8)
        assert out["dense_masks"] == 0, (preset, out["dense_mask_gib"])
        assert out["train_gib_per_gpu"]["total_grad_ckpt"] <= out["train_gib_per_gpu"]["total"]
        if (name, preset) in SIZES:
            size, source = SIZES[(name, preset)]
            assert abs(out["params"] / 1e6 / size - 1) < 0.02, (preset, out["params"], source)


def test_dry_run_cli_prints_one_json_line():
    out = _dry("starflow", "t2i256", "--gpus", "64")
    assert out["gpus"] == 64 and out["micro_batch"] == 16 and out["params_by_part"]["deep block"] > 2e9
    assert out["dense_masks"] == 0
    masked = _dry("starflow", "t2i256", "--text_padding", "mask")  # padded captions as key masks: (B, L, L) each
    assert masked["dense_masks"] > 0 and masked["dense_mask_gib"] > 1


def _bf16_step(name):
    """(loss in fp32, loss in bf16 as FSDP2 runs it, a sampled batch) of a tiny model of the paper preset's
    structure: the bf16 model runs forward, loss, backward and one sampling call."""
    import numpy as np
    mod = _files()[name]
    losses = []
    for bf16 in (False, True):
        torch.manual_seed(0)
        if name == "starflow":
            cfg = mod.Config(**{**mod.PRESETS["t2i256"], "img_size": 32, "width": 32, "head_dim": 16,
                                "layers": (1, 1, 2), "txt_dim": 8, "txt_len": 4, "jacobi_chunk": 4})
            m = mod.STARFlow(cfg, *mod.latent_shape(cfg))
            C, S = mod.latent_shape(cfg)
            text, mask = torch.randn(3, 4, 8), torch.tensor([[1, 1, 0, 0]] * 3).bool()
            batch = (torch.randn(3, C, S, S), torch.zeros(3, dtype=torch.long), text, mask)
            step = lambda m: mod.nll_loss(m, batch[0], mod.batch_cond(m, batch), 0.0, cfg.latent_reg)  # noqa: E731
            draw = lambda m: mod.sample(m, m.make_cond(text=text, text_mask=mask), cfg)[0]  # noqa: E731
        elif name == "starflow_v":
            cfg = mod.Config(**{**mod.PRESETS["t2v-480p"], "img_size": (32, 48), "frames": 9, "width": 48,
                                "deep_width": 72, "head_dim": 24, "layers": (1, 2), "denoiser_layers": 2, "txt_dim": 8,
                                "txt_len": 4, "jacobi_chunk": 4, "jacobi_chunk_video": 8, "context_frames": 2})
            C, H, W, T = mod.latent_shape(cfg)
            m = mod.STARFlowV(cfg, C, H, W, T)
            x, text = torch.randn(2, T, C, H, W), torch.randn(2, 4, 8)
            mask = torch.tensor([[1, 1, 0, 0]] * 2).bool()
            step = lambda m: mod.train_loss(m, x, m.make_cond(text=text, text_mask=mask),  # noqa: E731
                                            cfg.noise_std, True)[0]
            draw = lambda m: mod.sample(m, m.make_cond(text=text, text_mask=mask), cfg)[0]  # noqa: E731
        elif name == "wcfm":
            cfg = mod.Config(**{**mod.PRESETS["cifar10"], "image_size": 8, "width": 32, "ch_mult": (1, 2),
                                "attn_res": (4,), "num_res_blocks": 1, "sampler": "euler", "sample_steps": 2})
            m = mod.build(cfg)
            fm = mod.FlowMatcher("wcfm", cfg.sigma, 3 * 64, cfg.kappa)
            x0, x1 = torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8)
            step = lambda m: (torch.manual_seed(1), mod.cfm_loss(m, fm, x0, x1)[0])[1]  # noqa: E731
            draw = lambda m: mod.generate(m, cfg, x0).x  # noqa: E731
        elif name == "latent_fm":  # the imagenet256 preset's DiT (class labels, dropout, CFG, checkpointing), tiny
            cfg = mod.Config(**{**mod.PRESETS["imagenet256"], "img_size": 32, "arch": "", "width": 32, "depth": 2,
                                "heads": 2, "num_classes": 10, "sampler": "euler", "sample_steps": 2})
            m = mod.LatentFlow(cfg, 4, 4, 8)
            z0, y = torch.randn(4, 4, 4, 4), torch.tensor([0, 3, 5, 9])
            step = lambda m: (torch.manual_seed(1), mod.lfm_loss(m, z0, y, label_drop=cfg.label_drop,  # noqa: E731
                                                                 null_label=cfg.num_classes))[1]
            draw = lambda m: mod.sample(m, cfg, torch.randn(4, 4, 4, 4), y)[0]  # noqa: E731
        else:
            cfg = mod.Config(**mod.PRESETS["ngrams-2obj"])
            m = mod.build(cfg)
            rng = np.random.default_rng(0)
            w, beta = mod.sample_conditions(cfg, m.task.n_obj, 8, rng)
            xs, acts, x = mod.rollout(m, m.encode(w, beta), np.random.default_rng(1), cfg.eps)
            step = lambda m: mod.tb_loss(m, m, xs, acts, x, w, beta, m.encode(w, beta))[0]  # noqa: E731
            draw = lambda m: mod.sample(m, w, beta)[1]  # noqa: E731
        with torch.no_grad():  # away from the zero-initialised output layers
            for p in m.parameters():
                p.add_(0.02 * torch.randn_like(p))
        if bf16:
            common.as_fsdp_bf16(m)
        loss = step(m)
        loss.backward()
        assert all(p.grad is None or torch.isfinite(p.grad).all() for p in m.parameters())
        losses.append(loss.item())
        with torch.no_grad():
            sampled = draw(m.eval())
    return losses, sampled


@pytest.mark.parametrize("name", ["starflow", "starflow_v", "wcfm", "mogfn", "latent_fm"])
def test_bf16_parameters_run_the_training_step_and_sampling(name):
    """Parameters in bf16 with autocast off, as FSDP2's bf16 policy runs them (arflow: tests/test_arflow.py)."""
    (fp32, bf16), sampled = _bf16_step(name)
    assert np.isfinite(bf16) and abs(bf16 / fp32 - 1) < 0.05, (fp32, bf16)
    assert torch.isfinite(sampled.float()).all()


FSDP_ARGS = {  # a tiny model of each file's CLI, two steps
    "starflow": ["--patch_size", "2", "--width", "32", "--head_dim", "16", "--layers", "1,1", "--batch_size", "16"],
    "starflow_v": ["--img_size", "8", "--digit_size", "4", "--frames", "2", "--patch_size", "2", "--width", "32",
                   "--head_dim", "16", "--layers", "1,1", "--denoiser_layers", "1", "--batch_size", "16",
                   "--videos_per_digit", "1", "--eval_samples", "4"],
    "wcfm": ["--preset", "digits", "--width", "16", "--batch_size", "16", "--eval_n", "8", "--sample_steps", "2"],
    "mogfn": ["--side", "6", "--width", "32", "--batch_size", "16", "--eval_n", "8", "--n_div", "4"],
    "latent_fm": ["--img_size", "8", "--vae_family", "none", "--width", "32", "--depth", "1", "--heads", "2",
                  "--batch_size", "16", "--eval_n", "10", "--sampler", "euler", "--sample_steps", "2"],
}


@pytest.mark.parametrize("name", list(FSDP_ARGS))
def test_fsdp2_bf16_trains_two_steps_on_two_gloo_ranks(name, tmp_path):
    """torchrun --fsdp (with --amp: FSDP2's MixedPrecisionPolicy(param_dtype=bf16)) on two CPU gloo ranks: two finite
    steps, none skipped, and an fp32 checkpoint (arflow: tests/test_arflow.py)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone", str(ROOT / f"{name}.py")]
    r = subprocess.run(cmd + FSDP_ARGS[name] + ["--fsdp", "--steps", "2", "--log_every", "1", "--eval_every", "0",
                                                "--ckpt_every", "0", "--out_dir", str(tmp_path)],
                       capture_output=True, text=True, timeout=600, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    log = [json.loads(s) for s in (tmp_path / "log.jsonl").read_text().splitlines()]
    steps = [e for e in log if "loss" in e]
    assert [e["step"] for e in steps] == [1, 2] and all(np.isfinite(e["loss"]) and e["skipped"] == 0 for e in steps)
    ck = common.load_checkpoint(tmp_path / "ckpt.pt")
    assert all(v.dtype == torch.float32 for v in ck["model"].values() if v.is_floating_point())
