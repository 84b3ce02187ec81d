"""wcfm.py: conditional paths, the three couplings, W-CFM's limits, OT, integrators, pruning, training, CLI."""
import itertools
import json
import math
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import wcfm
from conftest import ROOT, need

SCRIPT = [sys.executable, str(ROOT / "wcfm.py")]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone", str(ROOT / "wcfm.py")]
TOY = ["--coupling", "wcfm", "--eval_every", "100000", "--ckpt_every", "100000", "--log_every", "50"]


ENV = {**os.environ, "OMP_NUM_THREADS": "1"}  # small nets on shared cores: extra threads only contend


def _run(cmd, cwd=None, ok=True):
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=cwd, env=ENV)
    if ok:
        assert r.returncode == 0, r.stderr[-3000:]
    return r


def _ckpt(path):
    return torch.load(path, weights_only=True)


def _brute_force_assignment(c):
    n = len(c)
    return min(itertools.permutations(range(n)), key=lambda p: sum(c[i, p[i]].item() for i in range(n)))


# ----------------------------------------------------------------------------------------------------------------------
# the conditional path and the couplings


@pytest.mark.parametrize("sigma", [0.0, 0.3])
@pytest.mark.parametrize("coupling", wcfm.COUPLINGS)
def test_xt_and_ut_are_the_closed_forms(coupling, sigma):
    if coupling == "otcfm":
        need("scipy")
    g = torch.Generator().manual_seed(0)
    x0, x1 = torch.randn(6, 3, generator=g), torch.randn(6, 3, generator=g) + 2
    fm = wcfm.FlowMatcher(coupling, sigma, dim=3, kappa=1.5, ot_solver="exact")
    seen = {}

    def net(xt, t, y):  # records what the loss feeds it; predicts 0, so the loss is E[w |u|^2]
        seen.update(xt=xt, t=t)
        return torch.zeros_like(xt)

    torch.manual_seed(1)
    loss, _ = wcfm.cfm_loss(net, fm, x0, x1)
    torch.manual_seed(1)
    t, z = torch.rand(6), torch.randn(6, 3)  # the draws cfm_loss makes, in its order
    assert torch.equal(seen["t"], t)
    partner = torch.tensor(_brute_force_assignment(torch.cdist(x0, x1) ** 2)) if coupling == "otcfm" \
        else torch.arange(6)
    x1p = x1[partner]
    torch.testing.assert_close(seen["xt"], (1 - t[:, None]) * x0 + t[:, None] * x1p + sigma * z)
    c = (x0 - x1p).square().sum(1)
    w = torch.exp(-c / (1.5 * math.sqrt(3))) if coupling == "wcfm" else torch.ones(6)
    torch.testing.assert_close(loss, (w / w.mean() * (x1p - x0).square().mean(1)).mean())  # u = x1 - x0, no noise


def test_wcfm_is_icfm_as_eps_grows_and_picks_the_nearest_pairs_as_eps_vanishes():
    g = torch.Generator().manual_seed(0)
    x0, x1 = torch.randn(64, 3, generator=g), torch.randn(64, 3, generator=g) * 2 + 1
    net = torch.nn.Linear(3, 3)
    mlp = lambda x, t, y: net(x) * t[:, None]  # noqa: E731
    losses = {}
    for name, fm in [("icfm", wcfm.FlowMatcher("icfm", 0.1, 3)),
                     ("mean", wcfm.FlowMatcher("wcfm", 0.1, 3, kappa=1e9)),
                     ("raw", wcfm.FlowMatcher("wcfm", 0.1, 3, kappa=1e9, weights="raw")),
                     ("small", wcfm.FlowMatcher("wcfm", 0.1, 3, kappa=1.0))]:
        torch.manual_seed(3)
        losses[name] = wcfm.cfm_loss(mlp, fm, x0, x1)[0].item()
    assert losses["mean"] == pytest.approx(losses["icfm"], rel=1e-6)
    assert losses["raw"] == pytest.approx(losses["icfm"], rel=1e-6)
    assert abs(losses["small"] - losses["icfm"]) > 1e-3 * losses["icfm"]  # an eps that matters changes the loss
    c = (x1 - x0).square().sum(1)
    for kappa, share in [(1e-2, 0.999), (1e-4, 1 - 1e-9)]:
        w = wcfm.FlowMatcher("wcfm", 0.1, 3, kappa=kappa).pair_weights(x1 - x0)
        assert torch.isfinite(w).all() and w.sum().item() == pytest.approx(64, rel=1e-5)  # mean-normalised
        assert (w[c.argmin()] / w.sum()).item() > share  # all the weight on the nearest pair
    w = wcfm.FlowMatcher("wcfm", 0.1, 3, kappa=0.5).pair_weights(x1 - x0)
    assert torch.equal(w.argsort(), c.argsort(descending=True))  # monotone in the cost


def test_mean_normalised_weights_survive_3072_dimensions_where_raw_ones_underflow():
    g = torch.Generator().manual_seed(0)
    x0, x1 = torch.randn(16, 3, 32, 32, generator=g), torch.rand(16, 3, 32, 32, generator=g) * 2 - 1
    raw = wcfm.FlowMatcher("wcfm", 0, 3072, kappa=0.5, weights="raw").pair_weights(x1 - x0)
    mean = wcfm.FlowMatcher("wcfm", 0, 3072, kappa=0.5).pair_weights(x1 - x0)
    assert (raw == 0).all()  # c ~ 4000 against eps ~ 28: exp underflows in float32
    assert torch.isfinite(mean).all() and mean.sum().item() == pytest.approx(16, rel=1e-5)
    assert mean.argmax() == (x1 - x0).flatten(1).square().sum(1).argmin()


@pytest.mark.parametrize("n", [2, 3, 4, 5, 6])
def test_ot_assignment_is_optimal_and_sinkhorn_plan_is_near_optimal(n):
    need("scipy")
    for seed in range(4):
        g = torch.Generator().manual_seed(100 * n + seed)
        x0, x1 = torch.randn(n, 2, generator=g), torch.randn(n, 2, generator=g)
        c = wcfm.cost_matrix(x0, x1)
        best = sum(c[i, p].item() for i, p in enumerate(_brute_force_assignment(c)))
        assert c[torch.arange(n), wcfm.ot_partner(x0, x1, "exact")].sum().item() == pytest.approx(best, rel=1e-12)
        plan = wcfm.sinkhorn(c / c.mean(), reg=0.01)  # the fallback's plan
        torch.testing.assert_close(plan.sum(0), torch.full((n,), 1 / n, dtype=plan.dtype), atol=1e-6, rtol=0)
        assert (plan * c).sum().item() <= best / n * 1.01 + 1e-9
        torch.manual_seed(seed)  # the fallback's partners, drawn from the plan's rows: near-optimal pairs
        assert c[torch.arange(n), wcfm.ot_partner(x0, x1, "sinkhorn")].sum().item() <= best * 1.05 + 1e-9


def test_wcfm_coupling_approaches_the_entropic_ot_plan_in_a_large_batch():
    """Uniform on a circle: the tilt is constant, so the Gibbs-weighted product IS the entropic-OT plan in the
    population; in a batch of n the two costs differ by O(1/sqrt(n)) sampling error."""
    eps, gaps = 0.3, {}
    for n in (32, 512):
        g = torch.Generator().manual_seed(0)
        a, b = 2 * math.pi * torch.rand(n, generator=g), 2 * math.pi * torch.rand(n, generator=g)
        x0, x1 = torch.stack([a.cos(), a.sin()], 1), torch.stack([b.cos(), b.sin()], 1)
        c = wcfm.cost_matrix(x0, x1)
        gibbs = torch.softmax((-c / eps).flatten(), 0).view(n, n)  # W-CFM's weights on every pair of the batch
        eot = wcfm.sinkhorn(c, eps, iters=3000, tol=1e-9)
        independent, eot_cost = c.mean().item(), (eot * c).sum().item()
        assert eot_cost < 0.25 * independent  # the plan is far from independent: the comparison means something
        gaps[n] = abs((gibbs * c).sum().item() - eot_cost) / (independent - eot_cost)
    assert gaps[512] < 0.01 and gaps[512] < gaps[32] / 5, gaps


def test_tilt_relvar_matches_a_direct_computation_and_the_elbow_rule():
    g = torch.Generator().manual_seed(0)
    x0, x1 = wcfm.toy("8gaussians", 300, g).double(), wcfm.toy("moons", 200, g).double()
    for eps in (2.0, 20.0):
        k = torch.exp(-torch.cdist(x0, x1) ** 2 / eps)
        for tau, got in zip((k.mean(1), k.mean(0)), wcfm.tilt_relvar(x0, x1, eps)):
            assert got == pytest.approx((tau.var(unbiased=False) / tau.mean() ** 2).item(), rel=1e-9)
    assert wcfm.elbow([0, 1, 2, 3, 4, 5, 6], [10, 7, 4, 1, 0.9, 0.8, 0.7]) == 3
    kappa, rows = wcfm.select_kappa(x0, x1, "sqeuclidean", grid=np.logspace(-2, 3, 11))
    relvar = [max(r[2], r[3]) for r in rows]
    assert all(a >= b for a, b in zip(relvar, relvar[1:]))  # the tilt fades as eps grows
    assert rows[0][0] < kappa < rows[-1][0]


# ----------------------------------------------------------------------------------------------------------------------
# samplers


def _riccati(t, x):  # dx/dt = -x^2 + cos(t) x: nonlinear, time-dependent
    return -x * x + torch.cos(torch.as_tensor(t, dtype=x.dtype)) * x


def _riccati_exact(x0):  # with E(t) = exp(sin t): x(t) = E / (1/x0 + int_0^t E), the integral by Simpson on 2000 panels
    s = torch.linspace(0, 1, 2001, dtype=torch.float64)
    e = torch.exp(torch.sin(s))
    integral = (e[0] + e[-1] + 4 * e[1:-1:2].sum() + 2 * e[2:-1:2].sum()) / 6000
    return e[-1] / (1 / x0 + integral)


@pytest.mark.parametrize("method,order,stages", [("euler", 1, 1), ("midpoint", 2, 2), ("heun", 2, 2), ("rk4", 4, 4)])
def test_fixed_step_integrators_converge_at_their_order(method, order, stages):
    x0 = torch.linspace(0.5, 2.0, 7, dtype=torch.float64)[:, None]  # (B, 1)
    exact = _riccati_exact(x0)
    errs = []
    for steps in (10, 20, 40):
        res = wcfm.odeint(_riccati, x0, method, steps)
        assert res.nfe == steps * stages
        errs.append((res.x - exact).abs().max().item())
    rates = [math.log2(a / b) for a, b in zip(errs, errs[1:])]
    assert all(abs(r - order) < 0.2 for r in rates), rates


def test_dopri5_meets_its_tolerance_and_spends_more_steps_on_tighter_ones():
    x0 = torch.linspace(0.5, 2.0, 7, dtype=torch.float64)[:, None]  # (B, 1)
    exact, nfes = _riccati_exact(x0), []
    for tol in (1e-3, 1e-6, 1e-9):
        res = wcfm.odeint(_riccati, x0, "dopri5", atol=tol, rtol=tol)
        assert (res.x - exact).abs().max().item() < 10 * tol * (1 + exact.abs().max().item())
        nfes.append(res.nfe)
    assert nfes[0] < nfes[1] < nfes[2] and nfes[0] < 40


def test_path_energy_is_zero_excess_for_straight_paths():
    x0 = torch.randn(5, 2, dtype=torch.float64)
    v = torch.randn(5, 2, dtype=torch.float64)
    straight = wcfm.odeint(lambda t, x: v, x0, "euler", 10)  # constant velocity: a straight, constant-speed path
    assert abs(wcfm.npe(straight, x0)) < 1e-12
    curved = wcfm.odeint(lambda t, x: v * (1 + torch.cos(torch.as_tensor(6.0 * t))), x0, "rk4", 50)
    assert wcfm.npe(curved, x0) > 0.1  # same endpoints direction, uneven speed: extra energy


def test_classifier_free_guidance_combines_the_two_branches():
    class Stub(torch.nn.Module):
        num_classes = 3

        def forward(self, x, t, y):  # a velocity that depends on the label: class c moves by c + 1, "no label" by 10
            return x * 0 + torch.where(y == 3, 10.0, y.float() + 1)[:, None]
    x, y = torch.zeros(4, 2), torch.tensor([0, 1, 2, 0])
    for w, expect in [(1.0, y.float() + 1), (0.0, torch.full((4,), 10.0)), (3.0, 10 + 3 * (y.float() + 1 - 10))]:
        torch.testing.assert_close(wcfm.velocity(Stub(), y, w)(0.5, x)[:, 0], expect)


def test_pruned_sampling_rejects_exactly_the_pruned_directions():
    g = torch.Generator().manual_seed(0)
    data = torch.randn(3000, 6, generator=g)
    data[:, 0] = -3 * data[:, 0].abs() - 0.5  # no data point on the +e0 side
    pr = wcfm.SourcePruner(data, tau=0.01, tau_r=0.048)
    assert pr.dirs.shape[1] >= 1
    assert pr.dirs[0].max() > 0.9  # R holds the EMPTY direction (+e0) -- the paper's R, not its complement
    x0, rate, drawn = pr.sample(400, (6,), torch.Generator().manual_seed(1))
    assert len(x0) == 400 and pr.keep(x0).all()
    u = x0 / x0.norm(dim=1, keepdim=True)
    assert (u @ pr.dirs).max() <= 0.048
    g = torch.Generator().manual_seed(1)  # the same candidate stream, judged one by one
    cands = torch.cat([torch.randn(400, 6, generator=g) for _ in range(drawn // 400)])
    dirs = pr.dirs.T.tolist()
    rejected, kept = 0, []
    for z in cands.tolist():
        norm = math.sqrt(sum(v * v for v in z))
        if any(sum(a * b for a, b in zip(z, d)) / norm > 0.048 for d in dirs):
            rejected += 1
        else:
            kept.append(z)
    assert 0.05 < rate < 0.95 and rate == pytest.approx(rejected / len(cands), abs=1e-12)
    torch.testing.assert_close(x0, torch.tensor(kept[:400]))


def test_bad_inputs_give_one_clear_error(tmp_path):
    with pytest.raises(ValueError, match="same shape"):
        wcfm.FlowMatcher("icfm", 0.1, 2).couple(torch.randn(4, 2), torch.randn(5, 2))
    for kappa in (0.0, -1.0):
        with pytest.raises(ValueError, match="kappa"):
            wcfm.FlowMatcher("wcfm", 0.1, 2, kappa=kappa)
    for args, msg in [(["--kappa", "0"], "--kappa must be > 0"), (["--coupling", "icfm,otfm"], "--coupling 'otfm'")]:
        r = _run(SCRIPT + args + ["--out_dir", str(tmp_path)], ok=False)
        assert r.returncode == 2 and r.stderr.count("\n") == 1 and msg in r.stderr, r.stderr


# ----------------------------------------------------------------------------------------------------------------------
# training runs


def test_short_run_on_8gaussians_to_moons_reaches_w2(tmp_path):
    need("scipy")  # exact W2
    _run(SCRIPT + TOY + ["--steps", "1500", "--out_dir", str(tmp_path)])
    m = json.loads(_run(SCRIPT + ["--eval", "--out_dir", str(tmp_path), "--coupling", "wcfm", "--eval_n", "1000"])
                   .stdout.strip().splitlines()[-1])
    assert m["w2_method"] == "exact" and m["nfe"] == 100
    # measured over 3 seeds: w2 0.81-0.87, mostly the tilt of kappa = 6.3 (two 1000-point target samples are 0.36-0.55
    # apart; the untrained net is 2.7 away); npe 0.05 where I-CFM's paths have ~1.0
    assert m["w2"] < 1.1 and m["npe"] < 0.2, m
    assert 10 <= m["nfe_dopri5"] <= 100 and m["tilt_relvar_source"] > 0


def test_sigterm_and_resume_equal_an_uninterrupted_run(tmp_path):
    common = TOY + ["--steps", "600", "--batch_size", "64"]
    _run(SCRIPT + common + ["--out_dir", str(tmp_path / "straight")])
    p = subprocess.Popen(SCRIPT + common + ["--out_dir", str(tmp_path / "split")], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env=ENV)
    log = tmp_path / "split" / "log.jsonl"
    t0 = time.time()
    while not (log.exists() and log.read_text().strip()) and time.time() - t0 < 120:
        time.sleep(0.05)
    p.send_signal(signal.SIGTERM)
    p.communicate(timeout=120)
    assert p.returncode == 128 + signal.SIGTERM  # saved, then a status schedulers requeue on
    stopped = _ckpt(tmp_path / "split" / "ckpt.pt")["step"]
    assert 50 <= stopped < 600
    _run(SCRIPT + common + ["--out_dir", str(tmp_path / "split"), "--resume"])
    a, b = _ckpt(tmp_path / "straight" / "ckpt.pt"), _ckpt(tmp_path / "split" / "ckpt.pt")
    assert b["step"] == 600
    for part in ("model", "ema"):  # bit-exact: data, t and noise draws, optimizer, schedule and EMA all continue
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), (part, k)


def test_torchrun_two_processes_train_and_split_sampling_with_norm_alignment(tmp_path):
    # "--" keeps torchrun's own parser off the script's options (it would take --n for an abbreviation of its own)
    _run(TORCHRUN + ["--"] + TOY + ["--source", "gaussian", "--target", "circles", "--norm_align", "--steps", "600",
                                    "--out_dir", str(tmp_path)])
    state = _ckpt(tmp_path / "ckpt.pt")
    assert state["step"] == 600 and len(state["rng"]) == 2
    # E|N(0, I2)| / E|circles of radii 2 and 4|, measured once before training and stored with the weights
    assert state["model"]["x1_scale"].item() == pytest.approx(math.sqrt(math.pi / 2) / 3.0, rel=0.05)
    two, one = tmp_path / "two.npz", tmp_path / "one.npz"
    sample = ["--sample", "--out_dir", str(tmp_path), "--coupling", "wcfm", "--n", "301"]
    _run(TORCHRUN + ["--"] + sample + ["--out", str(two)])
    _run(SCRIPT + sample + ["--out", str(one)])
    x, y = np.load(two)["samples"], np.load(one)["samples"]
    assert x.shape == y.shape == (301, 2) and len(np.unique(x, axis=0)) == 301  # each rank drew its own share
    for s in (x, y):  # the circles' radii: sampling undid the scale the net was trained at (~0.42)
        assert abs(np.linalg.norm(s, axis=1).mean() - 3.0) < 0.4


def test_digits_unet_trains_samples_with_pruning_and_evaluates(tmp_path):
    need("sklearn")
    fast = ["--preset", "digits", "--out_dir", str(tmp_path), "--sample_steps", "10"]
    _run(SCRIPT + fast + ["--steps", "150", "--batch_size", "64", "--width", "16", "--eval_every", "100000"],
         cwd=tmp_path)
    out = tmp_path / "s.npz"
    r = _run(SCRIPT + fast + ["--sample", "--n", "20", "--out", str(out), "--guidance", "2", "--prune"], cwd=tmp_path)
    z = np.load(out)
    assert z["images"].dtype == np.uint8 and z["images"].shape == (20, 8, 8, 1) and z["images"].std() > 20
    assert (z["labels"] == np.arange(20) % 10).all()
    rate = float(r.stdout.split("pruning rejected ")[1].split("%")[0]) / 100
    assert 0 < rate < 0.5  # measured ~0.07 at the preset's tau_r
    m = json.loads(_run(SCRIPT + fast + ["--eval", "--eval_n", "200", "--atol", "1e-2", "--rtol", "1e-2"],
                        cwd=tmp_path).stdout.strip().splitlines()[-1])
    assert (tmp_path / "eval_grid.png").exists() and 0 < m["nfe_dopri5"] < 100
    # measured after 150 steps: accuracy ~0.5, FD ~20 (real data 1.3, uniform noise several hundred)
    assert m["accuracy"] > 0.25 and m["fd"] < 60, m
