"""Paper scale without a GPU (common.py's dry run): memory estimates on the meta device against a measured CPU run,
attention calls recorded, and each model file's presets sized."""
import json
import subprocess
import sys

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
