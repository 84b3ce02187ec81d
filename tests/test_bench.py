"""bench.py --gpu, run at --tiny size on the CPU: one JSON line with every entry, MFU from a FLOP count that matches
an independent one, Jacobi samples equal to the sequential ones. (Timings are never asserted.)"""
import json
import math
import os
import subprocess
import sys

import pytest
import torch

import bench
from conftest import ROOT

PEAK = 1.0  # TFLOP/s passed as --peak_tflops: above what two CPU cores reach at these sizes, so MFU must be <= 1


@pytest.fixture(scope="module")
def result():
    # (on a CPU compiled sampling is left out by default: inductor's C++ compilation takes minutes there;
    # tests/test_starflow.py checks the compiled step against the eager one)
    cmd = [sys.executable, str(ROOT / "bench.py"), "--gpu", "--device", "cpu", "--tiny", "--peak_tflops", str(PEAK)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    lines = r.stdout.splitlines()
    assert len(lines) == 1, r.stdout[-2000:]  # stdout is the JSON line alone

    def no_nan(c):
        raise AssertionError(f"{c} in the JSON")
    return json.loads(lines[0], parse_constant=no_nan)


def _starflow_flops(width, tokens, token_dim, layers, batch):
    """Matmul FLOPs of a STARFlow training step by hand: 6 per weight per token (forward 2, backward 4) for the
    transformer layers (12 W^2: qkv, out, MLP 4x), proj_in and proj_out, plus attention, 12 L^2 W per layer (forward
    QK^T and AV, 2 L^2 W each, backward twice that); the deep block's sequence has the class token in front."""
    total = 0
    for i, n in enumerate(layers):
        L = tokens + (i == len(layers) - 1)
        total += 6 * batch * (L * n * 12 * width ** 2 + tokens * 3 * token_dim * width)
        total += 12 * batch * n * L ** 2 * width
    return total


def test_one_json_line_with_every_entry_and_no_error(result):
    assert result["device"] == "cpu" and result["tiny"] and result["torch"] == torch.__version__
    assert set(result["train"]) == set(bench.TRAIN_SPECS)
    assert set(result["wanvae"]) == {"wan2.1", "wan2.2"}
    for part in ("train", "wanvae"):
        for name, e in result[part].items():
            assert "error" not in e and "skipped" not in e, (part, name, e)
            assert e["ms"] > 0 and e["iters"] >= 1
    for f in ("starflow", "starflow_v"):
        s = result["sample"][f]
        assert "error" not in s["model"], s["model"]
        for B in (1, 2):
            row = s[f"B={B}"]
            for name in ("sequential", "jacobi"):
                assert "error" not in row[name] and "skipped" not in row[name], (f, B, name, row[name])
                assert row[name]["nfe"] > 0
            # not asked on a CPU by default; starflow_v has no compiled sampler
            assert row["compiled"]["skipped"].startswith("not asked" if f == "starflow" else "starflow_v.py's")


def test_mfu_is_flops_over_time_over_peak_and_below_one(result):
    for name, e in result["train"].items():
        assert e["flops_per_step"] > 0, name
        mfu = e["flops_per_step"] / (e["ms"] / 1e3) / (PEAK * 1e12)
        assert math.isfinite(e["mfu"]) and 0 < e["mfu"] <= 1 and e["mfu"] == pytest.approx(mfu, rel=1e-9), name
        if "tokens_per_step" in e:
            assert e["tokens_per_s"] == pytest.approx(e["tokens_per_step"] * 1e3 / e["ms"], rel=1e-9)


def test_starflow_flop_count_matches_a_count_by_hand(result):
    """The measured count (FlopCounterMode on the meta device) against 6 N tokens + attention, at the tiny size the
    run used and at the paper's imagenet256 size (1.4B, micro-batch 32) that a GPU run reports."""
    tiny = bench._spec_starflow(True, "cpu")
    c = tiny.cfg
    hand = _starflow_flops(c.width, tiny.tokens // tiny.batch, 4 * c.patch_size ** 2, c.layers, tiny.batch)
    assert result["train"]["starflow"]["flops_per_step"] == pytest.approx(hand, rel=0.02)  # measured: equal
    full = bench._spec_starflow(False, "cpu")
    c = full.cfg
    hand = _starflow_flops(c.width, full.tokens // full.batch, 4 * c.patch_size ** 2, c.layers, full.batch)
    assert bench.count_flops(full, torch.bfloat16) == pytest.approx(hand, rel=0.02)


def test_jacobi_samples_equal_the_sequential_ones(result):
    """Same noise and condition; Jacobi to convergence at --tiny (threshold 1e-7), so what is left is bf16 rounding
    (measured: 0.2% and 0.6% of the largest value; a wrong noise or condition gives differences of order 100%)."""
    for f in ("starflow", "starflow_v"):
        for B in (1, 2):
            j = result["sample"][f][f"B={B}"]["jacobi"]
            assert j["max_abs_diff_vs_sequential"] <= 0.02 * j["sequential_max_abs"], (f, B, j)


@pytest.mark.parametrize("argv", [["--tiny"], ["--samplers", "jacobi"], ["--gpu", "--device", "cpu"],
                                  ["--gpu", "--tiny", "--device", "cpu", "--peak_tflops", "0"],
                                  ["--gpu", "--tiny", "--device", "cpu", "--samplers", "euler"],
                                  ["--gpu", "--tiny", "--device", "cpu", "--only", "common"]])
def test_options_are_checked(argv):
    with pytest.raises(SystemExit) as e:
        bench.main(argv)
    assert e.value.code == 2
