"""wcfm.py: conditional paths, the three couplings, the tilt and the choice of kappa, what W-CFM learns, OT,
integrators, straightness vs NPE, SourceFM as released, training, CLI."""
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

import common
import wcfm
from conftest import ROOT, need

SCRIPT = [sys.executable, str(ROOT / "wcfm.py")]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone", str(ROOT / "wcfm.py")]
TOY = ["--coupling", "wcfm", "--eval_every", "100000", "--ckpt_every", "100000", "--log_every", "50"]


ENV = {**os.environ, "OMP_NUM_THREADS": "1"}  # small nets on shared cores: extra threads only contend


def _run(cmd, cwd=None, ok=True):
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=cwd, env=ENV)
    if ok:
        assert r.returncode == 0, r.stderr[-3000:]
    return r


def _ckpt(path):
    return torch.load(path, weights_only=True)


def _brute_force_assignment(c):
    n = len(c)
    return min(itertools.permutations(range(n)), key=lambda p: sum(c[i, p[i]].item() for i in range(n)))


def _fails(argv, capsys) -> str:
    """`python wcfm.py ARGV` in this process: its one error line."""
    with pytest.raises(SystemExit) as e:
        common.run(lambda: wcfm.main(argv))
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


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


def test_wcfm_loss_is_icfm_to_the_bit_as_kappa_grows_and_picks_the_nearest_pairs_as_it_vanishes():
    g = torch.Generator().manual_seed(0)
    x0, x1 = torch.randn(63, 3, generator=g), torch.randn(63, 3, generator=g) * 2 + 1  # an odd batch on purpose
    net = torch.nn.Linear(3, 3)
    mlp = lambda x, t, y: net(x) * t[:, None]  # noqa: E731
    losses = {}
    for name, fm in [("icfm", wcfm.FlowMatcher("icfm", 0.1, 3)), ("1e30", wcfm.FlowMatcher("wcfm", 0.1, 3, 1e30)),
                     ("inf", wcfm.FlowMatcher("wcfm", 0.1, 3, math.inf)), ("1", wcfm.FlowMatcher("wcfm", 0.1, 3, 1.0))]:
        torch.manual_seed(3)
        losses[name] = wcfm.cfm_loss(mlp, fm, x0, x1)[0]
    assert torch.equal(losses["1e30"], losses["icfm"]) and torch.equal(losses["inf"], losses["icfm"])
    assert abs(losses["1"] - losses["icfm"]) > 1e-3 * losses["icfm"]  # an eps that matters changes the loss
    c = (x1 - x0).square().sum(1)
    for kappa, share in [(1e-2, 0.999), (1e-4, 1 - 1e-9)]:
        w = wcfm.FlowMatcher("wcfm", 0.1, 3, kappa=kappa).pair_weights(x1 - x0)
        assert torch.isfinite(w).all() and w.sum().item() == pytest.approx(63, rel=1e-5)  # mean-normalised
        assert (w[c.argmin()] / w.sum()).item() > share  # all the weight on the nearest pair
    w = wcfm.FlowMatcher("wcfm", 0.1, 3, kappa=0.5).pair_weights(x1 - x0)
    assert torch.equal(w.argsort(), c.argsort(descending=True))  # monotone in the cost


def test_weights_survive_3072_dimensions_where_the_gibbs_kernel_itself_underflows():
    g = torch.Generator().manual_seed(0)
    x0, x1 = torch.randn(16, 3, 32, 32, generator=g), torch.rand(16, 3, 32, 32, generator=g) * 2 - 1
    c = (x1 - x0).flatten(1).square().sum(1)
    assert (torch.exp(-c / (0.5 * math.sqrt(3072))) == 0).all()  # c ~ 4000 against eps ~ 28: 0 in float32
    w = wcfm.FlowMatcher("wcfm", 0, 3072, kappa=0.5).pair_weights(x1 - x0)
    assert torch.isfinite(w).all() and w.sum().item() == pytest.approx(16, rel=1e-5)
    assert w.argmax() == c.argmin()


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


# ----------------------------------------------------------------------------------------------------------------------
# the tilt, the choice of kappa, and what W-CFM learns


def test_tilt_relvar_log_tilt_and_the_two_kappa_rules():
    g = torch.Generator().manual_seed(0)
    x0, x1 = wcfm.toy("8gaussians", 300, g).double(), wcfm.toy("moons", 200, g).double()
    c = wcfm.cost_matrix(x0, x1)
    for eps in (2.0, 20.0):
        k = torch.exp(-torch.cdist(x0, x1) ** 2 / eps)
        for tau, got in zip((k.mean(1), k.mean(0)), wcfm.tilt_relvar(c, eps)):
            assert got == pytest.approx((tau.var(unbiased=False) / tau.mean() ** 2).item(), rel=1e-9)
        torch.testing.assert_close(wcfm.log_tilt(x1, x0, eps, "sqeuclidean", chunk=7), k.mean(0).log())
    assert wcfm.elbow([0, 1, 2, 3, 4, 5, 6], [10, 7, 4, 1, 0.9, 0.8, 0.7]) == 3
    # budget: the smallest kappa from which on BOTH relvars stay within it (2 fails the target, 3 the source again)
    rows = [(1, 0.5, 0.1), (2, 0.009, 0.1), (3, 0.02, 0.005), (4, 0.008, 0.009), (5, 0.001, 0.002)]
    assert wcfm.choose_kappa(rows, "budget", 0.01) == 4 and wcfm.choose_kappa(rows, "budget", 1) == 1
    with pytest.raises(ValueError, match="--tilt_budget 0.001"):
        wcfm.choose_kappa(rows, "budget", 0.001)
    curve = [(float(k), 1 / k ** 2, 4 / k ** 2) for k in np.logspace(-1, 2, 16)]  # target flattens later
    src_only = [(k, r0, r0) for k, r0, _ in curve]
    assert wcfm.choose_kappa(curve, "elbow", 0) > wcfm.choose_kappa(src_only, "elbow", 0)


def test_tilt_curve_sees_the_pairs_training_sees_and_builds_one_cost_matrix(monkeypatch):
    calls = []
    cost_matrix = wcfm.cost_matrix
    monkeypatch.setattr(wcfm, "cost_matrix", lambda *a: calls.append(1) or cost_matrix(*a))
    cfgs = {side: wcfm.Config(source="gaussian", target="5gaussians", norm_align=side is not None,
                              norm_align_side=side or "x0") for side in (None, "x0", "x1")}
    curves = {side: wcfm.tilt_curve(cfg, n=512) for side, cfg in cfgs.items()}
    assert len(calls) == 3 and all(len(c) == len(wcfm.KAPPA_GRID) for c in curves.values())  # one matrix per curve
    r = 4.0 / math.sqrt(math.pi / 2)  # E|x1| / E|x0|: 5 Gaussians on radius 4 (sd 0.3), and N(0, I2)
    assert wcfm.norm_scales(cfgs[None]) == (1.0, 1.0)
    s0, s1 = wcfm.norm_scales(cfgs["x0"])  # the released X0_NormAlign: the source is scaled, the data are not
    assert s0 == pytest.approx(r, rel=0.03) and s1 == 1.0
    s0, s1 = wcfm.norm_scales(cfgs["x1"])
    assert s0 == 1.0 and s1 == pytest.approx(1 / r, rel=0.03)
    x0 = wcfm.draw_source(cfgs["x0"], (2,), 512, 1, "cpu")[0]
    x1 = wcfm.target_samples(cfgs["x0"], 512, 2)
    for side in ("x0", "x1"):  # the curve is the one of the scaled pairs, and differs from the unscaled one
        s0, s1 = wcfm.norm_scales(cfgs[side])
        k = 10.0
        want = wcfm.tilt_relvar(cost_matrix(x0 * s0, x1 * s1), k * math.sqrt(2))
        got = next(r[1:] for r in curves[side] if r[0] == pytest.approx(k))
        assert got == pytest.approx(want, rel=1e-3, abs=1e-5)  # float32 relvar
        plain = next(r[1:] for r in curves[None] if r[0] == pytest.approx(k))
        assert abs(math.log(got[0] / plain[0])) > 0.5


def test_wcfm_carries_the_tilted_source_to_the_tilted_target():
    """W-CFM's population minimiser is the flow of the plan w mu nu / Z, whose marginals are the tilted mu~ and nu~.
    Gaussians make both closed-form: mu = N(0, I2), nu = N(m, s^2 I2), w = exp(-|x - y|^2 / eps) give
    mu~ = N(a m / (1 + a), I / (1 + a)), a = 2 / (eps + 2 s^2), and nu~ = N(m / (1 + b s^2), s^2 / (1 + b s^2) I),
    b = 2 / (eps + 2). Sampled from mu~, a trained W-CFM net must reproduce nu~ to within a margin of the floor of two
    nu~ samples. (An I-CFM net maps x -> m + s x and would miss nu~ by W2 ~1.5; from mu, W-CFM's misses nu by ~1.8.)"""
    need("scipy")
    m, s, kappa, n = torch.tensor([4.0, 0.0]), 0.5, 1.0, 1000
    eps = kappa * math.sqrt(2)
    a, b = 2 / (eps + 2 * s * s), 2 / (eps + 2)
    g = torch.Generator().manual_seed(0)
    mu_t = lambda k: a * m / (1 + a) + torch.randn(k, 2, generator=g) / math.sqrt(1 + a)  # noqa: E731
    nu_t = lambda k: m / (1 + b * s * s) + s / math.sqrt(1 + b * s * s) * torch.randn(k, 2, generator=g)  # noqa: E731
    pool = torch.randn(20000, 2, generator=g)  # the importance resampling --eval uses agrees with the closed form
    idx = torch.multinomial(torch.softmax(wcfm.log_tilt(pool, m + s * torch.randn(4000, 2, generator=g), eps,
                                                        "sqeuclidean"), 0), 4000, replacement=True, generator=g)
    torch.testing.assert_close(pool[idx].mean(0), a * m / (1 + a), atol=0.05, rtol=0)
    torch.manual_seed(0)
    net, fm, steps = wcfm.MLP(2, 64, 3), wcfm.FlowMatcher("wcfm", 0.0, 2, kappa), 1500
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 0.5 * (1 + math.cos(math.pi * i / steps)))
    for _ in range(steps):
        loss, _ = wcfm.cfm_loss(net, fm, torch.randn(256, 2, generator=g), m + s * torch.randn(256, 2, generator=g))
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    with torch.no_grad():
        out = common.odeint(lambda t, x: net(x, torch.full((len(x),), t)), mu_t(n), "rk4", 25).x
    target, floor = nu_t(n), wcfm.w2(nu_t(n), nu_t(n))[0]
    got, untilted = wcfm.w2(out, target)[0], wcfm.w2(out, m + s * torch.randn(n, 2, generator=g))[0]
    # measured: 0.10 against a floor of 0.06-0.09 (n = 1000); nu itself is 0.46 away
    assert got < floor + 0.1 and untilted > got + 0.25, (got, floor, untilted)


def test_budget_rule_sets_kappa_from_the_data_before_training_and_resume_agrees(tmp_path, capsys):
    rows = wcfm.tilt_curve(wcfm.Config())  # 8 Gaussians -> moons
    assert wcfm.choose_kappa(rows, "budget", 0.1) == pytest.approx(15.85, rel=1e-3)  # source relvar 0.072 <= 0.1 < 0.15
    assert wcfm.choose_kappa(rows, "elbow", 0) == pytest.approx(6.31, rel=1e-3)
    tiny = ["--coupling", "wcfm", "--batch_size", "16", "--width", "16", "--eval_n", "64", "--kappa_rule", "budget",
            "--tilt_budget", "0.1", "--out_dir", str(tmp_path)]
    wcfm.main(tiny + ["--steps", "2"])
    assert _ckpt(tmp_path / "ckpt.pt")["config"]["kappa"] == wcfm.choose_kappa(rows, "budget", 0.1)
    wcfm.main(tiny + ["--steps", "4", "--resume"])  # the same data give the same kappa: the config still matches
    assert _ckpt(tmp_path / "ckpt.pt")["step"] == 4
    capsys.readouterr()
    err = _fails(tiny + ["--kappa", "5", "--out_dir", str(tmp_path / "x")], capsys)
    assert "--kappa is chosen by --kappa_rule budget" in err


# ----------------------------------------------------------------------------------------------------------------------
# samplers and path measures


def test_straightness_measures_bends_and_npe_measures_distance_from_the_ot_energy():
    need("scipy")
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(64, 2, generator=g, dtype=torch.float64)
    x1 = x0 + torch.tensor([3.0, 1.0], dtype=torch.float64)  # a translation: the OT map, W2^2 = 10
    w2_sq = wcfm.w2(x0, x1)[0] ** 2
    ot = common.odeint(lambda t, x: x1 - x0, x0, "euler", 10)  # straight, constant speed, OT pairs
    crossed = common.odeint(lambda t, x: x1.flip(0) - x0, x0, "euler", 10)  # straight lines to the wrong partners
    bent = common.odeint(lambda t, x: (x1 - x0) * (1 + torch.cos(torch.as_tensor(6.0 * t))), x0, "rk4", 50)
    assert abs(wcfm.straightness(ot)) < 1e-12 and wcfm.npe(ot, w2_sq) < 1e-9
    assert abs(wcfm.straightness(crossed)) < 1e-12 and wcfm.npe(crossed, w2_sq) > 0.2  # straight, far from OT
    assert wcfm.straightness(bent) > 0.1 and wcfm.npe(bent, w2_sq) > 0.1  # right partners, uneven speed


def test_classifier_free_guidance_combines_the_two_branches():
    class Stub(torch.nn.Module):
        num_classes = 3

        def forward(self, x, t, y):  # a velocity that depends on the label: class c moves by c + 1, "no label" by 10
            return x * 0 + torch.where(y == 3, 10.0, y.float() + 1)[:, None]
    x, y = torch.zeros(4, 2), torch.tensor([0, 1, 2, 0])
    for w, expect in [(1.0, y.float() + 1), (0.0, torch.full((4,), 10.0)), (3.0, 10 + 3 * (y.float() + 1 - 10))]:
        torch.testing.assert_close(wcfm.velocity(Stub(), y, w)(0.5, x)[:, 0], expect)


def test_pruned_sampling_follows_the_released_rule():
    """Released SourceFM: the accepted directions are those the data reach; x0 is kept iff its cosine to EVERY
    accepted direction is <= tau_r (so x0 pointing into the empty side is kept, x0 along the data is not)."""
    g = torch.Generator().manual_seed(0)
    data = torch.randn(3000, 6, generator=g)
    data[:, 0] = -3 * data[:, 0].abs() - 0.5  # no data point on the +e0 side
    pr = wcfm.SourcePruner(data, tau=0.01, tau_r=0.7)
    assert pr.dirs.shape[1] == 11 and (pr.dirs.T @ torch.eye(6)[0]).max() < 0.9  # all +-PCs but the +e0 one
    e0 = torch.eye(6)[:1]
    assert pr.keep(e0).all() and not pr.keep(-e0).any() and not pr.keep(pr.dirs.T[:3]).any()
    x0, rate, drawn = pr.sample(400, (6,), torch.Generator().manual_seed(1))
    assert len(x0) == 400 and pr.keep(x0).all() and (x0 @ pr.dirs / x0.norm(dim=1, keepdim=True)).max() <= 0.7
    g = torch.Generator().manual_seed(1)  # the same candidate stream, judged one by one
    cands = torch.cat([torch.randn(400, 6, generator=g) for _ in range(drawn // 400)])
    dirs = pr.dirs.T.tolist()
    rejected, kept = 0, []
    for z in cands.tolist():
        norm = math.sqrt(sum(v * v for v in z))
        if any(sum(a * b for a, b in zip(z, d)) / norm > 0.7 for d in dirs):
            rejected += 1
        else:
            kept.append(z)
    assert 0.05 < rate < 0.95 and rate == pytest.approx(rejected / len(cands), abs=1e-12)
    torch.testing.assert_close(x0, torch.tensor(kept[:400]))


def test_bad_inputs_give_one_clear_error(tmp_path, capsys):
    with pytest.raises(ValueError, match="same shape"):
        wcfm.FlowMatcher("icfm", 0.1, 2).couple(torch.randn(4, 2), torch.randn(5, 2))
    for kappa in (0.0, -1.0):
        with pytest.raises(ValueError, match="kappa"):
            wcfm.FlowMatcher("wcfm", 0.1, 2, kappa=kappa)
    assert [r[1:] for r in wcfm.runs(" icfm, wcfm:6.31,wcfm")] == [("icfm", None), ("wcfm", 6.31), ("wcfm", None)]
    for fields, msg in [({"coupling": "icfm,otfm"}, "--coupling 'otfm'"), ({"coupling": "icfm:3"}, "'icfm:3'"),
                        ({"coupling": "wcfm:0"}, "'wcfm:0'"), ({"coupling": "wcfm:abc"}, "'wcfm:abc'"),
                        ({"prune": True}, "--prune prunes pixel directions"),
                        ({"norm_align_side": "x1"}, "--norm_align_side x1 needs --norm_align")]:
        with pytest.raises(ValueError, match=msg):
            wcfm.Config(**fields)
    assert "--kappa must be > 0" in _fails(["--kappa", "0", "--out_dir", str(tmp_path)], capsys)


# ----------------------------------------------------------------------------------------------------------------------
# training runs


def test_demo_shows_where_wcfm_wins_and_where_it_loses(tmp_path):
    need("scipy")  # exact W2
    _run(SCRIPT + ["--coupling", "icfm,wcfm:6.31", "--steps", "1500", "--eval_n", "1000", "--eval_every", "0",
                   "--ckpt_every", "0", "--out_dir", str(tmp_path)])
    table = json.loads((tmp_path / "compare.json").read_text())
    assert _ckpt(tmp_path / "wcfm_kappa6.31" / "ckpt.pt")["config"]["kappa"] == 6.31
    assert (tmp_path / "compare.png").exists()
    i, w = table["icfm"], table["wcfm:6.31"]
    for m in (i, w):
        assert m["w2_method"] == "exact" and m["nfe"] == 100 and 10 <= m["nfe_dopri5"] <= 100
        assert m["ms_per_step"] > 0
    # measured after 1500 steps, seeds 0 / 1 / 2 (n = 1000, floors 0.36 / 0.37 / 0.55): I-CFM W2@2 1.72 / 1.76 / 1.92,
    # W2 0.55 / 0.52 / 0.62; W-CFM at the elbow (kappa 6.31) W2@2 0.79 / 0.82 / 0.87, W2 0.81 / 0.85 / 0.88 -- the end
    # metric lost to the tilt: the tilted target is 0.51 / 0.66 / 0.61 away (tilted floors 0.21 / 0.44 / 0.50)
    assert w["w2_euler2"] < i["w2_euler2"] - 0.5 and i["w2"] < w["w2"] - 0.1, (i, w)
    assert w["straightness"] < 0.2 < i["straightness"] and w["npe"] < i["npe"]
    assert w["w2_tilted"] < w["w2"] - 0.1 and w["tilt_relvar_source"] > 0.1, w


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


def test_torchrun_two_processes_train_and_split_sampling_with_released_norm_alignment(tmp_path):
    # "--" keeps torchrun's own parser off the script's options (it would take --n for an abbreviation of its own)
    _run(TORCHRUN + ["--"] + TOY + ["--source", "gaussian", "--target", "5gaussians", "--norm_align", "--steps", "600",
                                    "--out_dir", str(tmp_path)])
    state = _ckpt(tmp_path / "ckpt.pt")
    assert state["step"] == 600 and len(state["rng"]) == 2
    # X0_NormAlign: x0 is scaled by E|x1| / E|x0| (5 Gaussians on radius 4, N(0, I2)), measured before training
    assert state["model"]["x0_scale"].item() == pytest.approx(4.0 / math.sqrt(math.pi / 2), rel=0.05)
    assert state["model"]["x1_scale"].item() == 1.0
    two, one = tmp_path / "two.npz", tmp_path / "one.npz"
    sample = ["--sample", "--out_dir", str(tmp_path), "--coupling", "wcfm", "--n", "301"]
    _run(TORCHRUN + ["--"] + sample + ["--out", str(two)])
    _run(SCRIPT + sample + ["--out", str(one)])
    x, y = np.load(two)["samples"], np.load(one)["samples"]
    assert x.shape == y.shape == (301, 2) and len(np.unique(x, axis=0)) == 301  # each rank drew its own share
    for s in (x, y):  # on the circle of the modes: sampling scaled x0 as training did (unscaled x0 land near 1.3)
        assert abs(np.linalg.norm(s, axis=1).mean() - 4.0) < 0.4


def test_own_images_through_data_at_their_size_and_old_data_path_checkpoints_load(tmp_path, capsys):
    """--target cifar10 --data: an .npz or an image folder, at the images' size and channels unless --image_size /
    --channels say otherwise; a checkpoint written when the field was --data_path (and before --channels) samples,
    evaluates and resumes."""
    need("PIL")
    rng = np.random.default_rng(0)
    npz = tmp_path / "d.npz"
    np.savez(npz, images=rng.integers(0, 256, (16, 4, 4, 3), dtype=np.uint8))
    for i in range(16):
        common.save_png(tmp_path / "imgs" / f"{i}.png", rng.integers(0, 256, (6, 6, 3), dtype=np.uint8))
    tiny = ["--target", "cifar10", "--coupling", "wcfm", "--width", "8", "--ch_mult", "1", "--attn_res", "2",
            "--num_res_blocks", "1", "--steps", "2", "--batch_size", "8", "--eval_every", "0", "--ckpt_every", "0",
            "--sample_steps", "2", "--eval_n", "8"]
    wcfm.main(tiny + ["--data", str(npz), "--out_dir", str(tmp_path / "a")])
    state = _ckpt(tmp_path / "a" / "ckpt.pt")
    assert (state["config"]["data"], state["config"]["image_size"]) == (str(npz), 4) and "data_path" not in \
        state["config"]
    wcfm.main(tiny + ["--data", str(tmp_path / "imgs"), "--out_dir", str(tmp_path / "b")])
    model, cfg = wcfm.from_checkpoint(tmp_path / "b" / "ckpt.pt")
    assert cfg.image_size == 6 and model.shape == (3, 6, 6)
    np.savez(tmp_path / "grey.npz", images=rng.integers(0, 256, (16, 4, 4, 1), dtype=np.uint8))
    wcfm.main(tiny + ["--data", str(tmp_path / "grey.npz"), "--out_dir", str(tmp_path / "grey")])
    assert wcfm.from_checkpoint(tmp_path / "grey" / "ckpt.pt")[0].shape == (1, 4, 4)
    capsys.readouterr()
    assert "d.npz: images must be (N, 8, 8, 3) uint8 (--image_size, --channels), got (16, 4, 4, 3)" in \
        _fails(tiny + ["--data", str(npz), "--image_size", "8", "--out_dir", str(tmp_path / "c")], capsys)
    assert "--data is read for --target cifar10" in _fails(["--target", "digits", "--data", str(npz)], capsys)
    # a checkpoint from before the rename: its config says data_path
    old = tmp_path / "old" / "ckpt.pt"
    old.parent.mkdir()
    torch.save({**state, "config": {("data_path" if k == "data" else k): v for k, v in state["config"].items()
                                    if k != "channels"}}, old)
    model, cfg = wcfm.from_checkpoint(old, sample_steps=3)
    assert (cfg.data, cfg.image_size, cfg.sample_steps) == (str(npz), 4, 3) and model.shape == (3, 4, 4)
    wcfm.main(["--sample", "--ckpt", str(old), "--n", "4", "--out", str(tmp_path / "s.npz")])
    assert np.load(tmp_path / "s.npz")["images"].shape == (4, 4, 4, 3)
    wcfm.main(["--resume", "--out_dir", str(old.parent), "--steps", "3"])
    assert _ckpt(old)["step"] == 3 and _ckpt(old)["config"]["data"] == str(npz)


def test_digits_unet_trains_samples_with_released_pruning_and_evaluates(tmp_path):
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
    assert 0.1 < rate < 0.6  # 0.25 of these 40 draws, 0.36 of 1000 at the preset's tau_r 0.33 (1.0 at 0.048)
    m = json.loads(_run(SCRIPT + fast + ["--eval", "--eval_n", "200", "--atol", "1e-2", "--rtol", "1e-2"],
                        cwd=tmp_path).stdout.strip().splitlines()[-1])
    assert (tmp_path / "eval_grid.png").exists() and 0 < m["nfe_dopri5"] < 100
    # measured after 150 steps: accuracy 0.46, FD 31 (real data 1.3, uniform noise several hundred)
    assert m["accuracy"] > 0.25 and m["fd"] < 60, m
