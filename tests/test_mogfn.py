"""mogfn.py: Pareto metrics, vectorised environments vs step-by-step references, exact DP distribution, TB on an exact
flow, a short training run to the true distribution, CLI resume / sample / eval, torchrun, bad inputs."""
import dataclasses
import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn

import common
import mogfn as mg
from conftest import ROOT

CLI = [sys.executable, str(ROOT / "mogfn.py")]
SMALL = ["--side", "6", "--width", "32", "--batch_size", "16", "--eval_n", "8", "--n_div", "4", "--log_every", "2",
         "--eval_every", "100", "--ckpt_every", "100", "--replay", "0.25"]


def _cli(args, ok=True, cmd=CLI):
    r = subprocess.run(cmd + args, capture_output=True, text=True, timeout=300, cwd=ROOT,
                       env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert (r.returncode == 0) == ok, r.stderr[-3000:]
    return r


def _model(seed=0, perturb=0.5, **kw):
    cfg = mg.Config(**{"side": 5, "width": 32, **kw})
    torch.manual_seed(seed)
    m = mg.build(cfg).eval()
    with torch.no_grad():  # a non-uniform random policy
        for p in m.parameters():
            p.add_(perturb * torch.randn_like(p))
    return m, cfg


def test_hypervolume_and_r2_on_hand_computed_fronts():
    hv = lambda p: mg.hypervolume(torch.tensor(p, dtype=torch.float64))[0]  # noqa: E731
    assert hv([[1, 3], [2, 2], [3, 1]]) == pytest.approx(6.0)  # 3*1 + 2*1 + 1*1
    assert hv([[1, 3], [2, 2], [3, 1], [1, 1], [2, 2]]) == pytest.approx(6.0)  # dominated and repeated points add 0
    assert hv([[2, 1, 1], [1, 2, 1]]) == pytest.approx(3.0)  # two 2-boxes overlapping in a unit cube
    assert hv([[2, 1, 1], [1, 2, 1], [1, 1, 2]]) == pytest.approx(4.0)
    assert mg.hypervolume(np.array([[0.5, 0.5]]), ref=[0.25, 0.0])[0] == pytest.approx(0.125)
    v, err = mg.hypervolume(np.array([[1.0, 1, 1, 1], [0.5, 2, 1, 1]]))  # 4 objectives: Monte-Carlo, exact = 1.5
    assert 0 < err < 0.02 and abs(v - 1.5) < 4 * err
    f = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    w = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]])
    assert mg.r2_indicator(f, w) == pytest.approx(0.5 / 3)  # 0, 0, max(0.5*0, 0.5*1)
    assert mg.r2_indicator(torch.tensor([[1.0, 1.0]]), w) == 0.0  # the utopian point itself
    m = mg.pareto_mask(torch.tensor([[1.0, 3], [2, 2], [1, 1], [2, 2], [3, 0]]))
    assert m.tolist() == [True, True, False, False, True]
    c = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    assert mg.cluster_entropy(torch.tensor([[0.9, 0.1], [0.2, 0.7]]), c) == pytest.approx(1.0)  # one per direction
    assert mg.cluster_entropy(torch.tensor([[0.9, 0.1], [0.8, 0.3]]), c) == pytest.approx(0.0)  # all in one cluster
    assert mg.simplex_grid(3, 4).shape == (15, 3) and torch.allclose(mg.simplex_grid(3, 4).sum(1), torch.ones(15))


def test_scalarisations_and_objectives():
    f, w = torch.tensor([[0.2, 0.8]]), torch.tensor([[0.25, 0.75]])
    assert mg.scalarise(f, w, "ws").item() == pytest.approx(0.65)
    assert mg.scalarise(f, w, "tch").item() == pytest.approx(1 - max(0.25 * 0.8, 0.75 * 0.2))
    task = mg.HyperGrid(mg.Config(side=16, objectives=("branin", "currin", "shubert", "beale", "sphere")))
    fall = task.objectives(task.all_states())
    assert torch.allclose(fall.amin(0), torch.zeros(5)) and torch.allclose(fall.amax(0), torch.ones(5))
    centre = task.objectives(torch.tensor([[7, 7], [0, 15]]))[:, 4]
    assert centre[0] > 0.98 and centre[1] < 0.02  # sphere: best in the middle of [-1, 1]^2, worst in a corner
    # branin's three global minima (-pi, 12.275), (pi, 2.275), (9.42478, 2.475) on [-5, 10] x [0, 15]
    u = torch.tensor([[(math.pi + 5) / 15, 2.275 / 15]], dtype=torch.float64)
    assert mg._branin(u).item() == pytest.approx(0.397887, abs=1e-5)
    ng = mg.NGrams(mg.Config(task="ngrams", motifs=("AR", "AA"), max_len=6))
    assert ng.most == [3, 5]  # "ARARAR", "AAAAAA" (overlapping)
    x = torch.tensor([[ng.vocab.index(c) for c in "AAARA"] + [ng.V]])
    torch.testing.assert_close(ng.objectives(x), torch.tensor([[1 / 3, 2 / 5]]))


def _hypergrid_reference(x0, acts, H, D):
    """Plain Python: one trajectory, one step at a time."""
    x, states, masks, pbs = list(x0), [], [], []
    for a in acts:
        masks.append([c < H - 1 for c in x] + [True])
        if a == D:
            pbs.append(0.0)
            break
        x[a] += 1
        states.append(list(x))
        pbs.append(-math.log(sum(c > 0 for c in x)))
    return states, masks, pbs


def test_vectorised_env_matches_step_by_step_reference():
    m, cfg = _model(dim=3, side=4, objectives=("sphere",))
    task = m.task
    cond = m.encode(torch.ones(200, 1), torch.full((200,), 8.0))
    xs, acts, x = mg.rollout(m, cond, np.random.default_rng(0), eps=1.0)  # uniform over valid actions
    assert (acts >= 0).sum(0).min() >= 1
    for b in range(200):
        a = acts[:, b][acts[:, b] >= 0].tolist()
        states, masks, pbs = _hypergrid_reference([0, 0, 0], a, 4, 3)
        assert a[-1] == 3 and all(v < 3 for v in a[:-1])  # exactly one stop, at the end
        for t, s in enumerate(states):
            assert xs[t + 1, b].tolist() == s
        assert x[b].tolist() == (states[-1] if states else [0, 0, 0])
        assert [task.valid(xs[t, b][None])[0].tolist() for t in range(len(a))] == masks
        pb = task.log_pb(xs[1:len(a) + 1, b], acts[:len(a), b])
        torch.testing.assert_close(pb, torch.tensor(pbs, dtype=torch.float))
    # n-grams: the vectorised step equals appending letters one by one
    ng, _ = _model(task="ngrams", motifs=("AR",), min_len=3, max_len=7, width=16, heads=2)
    c = ng.encode(torch.ones(100, 1), torch.full((100,), 8.0))
    xs, acts, x = mg.rollout(ng, c, np.random.default_rng(1), eps=1.0)
    for b in range(100):
        a = acts[:, b][acts[:, b] >= 0].tolist()
        assert a[-1] == ng.task.V and 3 <= len(a) - 1 <= 7
        assert x[b].tolist() == a[:-1] + [ng.task.V] * (8 - len(a))


def test_invalid_actions_are_never_sampled():
    m, _ = _model(side=4, objectives=("sphere",), perturb=0.0)
    with torch.no_grad():  # "increment coordinate 0" far above stop, far above "increment 1"
        m.policy.mlp.out.bias.copy_(torch.tensor([50.0, -50, 0]))
    cond = m.encode(torch.ones(64, 1), torch.full((64,), 8.0))
    xs, acts, x = mg.rollout(m, cond, np.random.default_rng(0))
    assert (x[:, 0] == 3).all() and (x[:, 1] == 0).all()  # went to the edge, then had to stop
    assert (xs <= 3).all()
    ng, _ = _model(task="ngrams", motifs=("AR",), min_len=5, max_len=8, width=16, heads=2, perturb=0.0)
    with torch.no_grad():  # the policy wants to stop at once; stop is masked before min_len
        ng.policy.head.bias.fill_(-50).data[-1] = 50
    xs, acts, x = mg.rollout(ng, ng.encode(torch.ones(64, 1), torch.full((64,), 8.0)), np.random.default_rng(0))
    assert ((x < ng.task.V).sum(-1) == 5).all()


@pytest.mark.parametrize("kw", [dict(), dict(cond="film", beta_max=16.0, scalar="tch")], ids=["concat", "film-beta"])
def test_dp_terminal_distribution_sums_to_one_and_matches_sampling(kw):
    m, cfg = _model(side=5, **kw)
    w = torch.tensor([[0.3, 0.7], [0.9, 0.1]])
    cond = m.encode(w, torch.tensor([8.0, 12.0]))
    p = mg.terminal_distribution(m, cond)  # (2, 25)
    torch.testing.assert_close(p.sum(-1), torch.ones(2))
    n = 20000
    _, _, x = mg.rollout(m, cond.repeat_interleave(n, 0), np.random.default_rng(0))
    idx = (x[:, 0] * 5 + x[:, 1]).view(2, n)
    freq = torch.stack([torch.bincount(i, minlength=25).float() / n for i in idx])
    assert (freq - p).abs().sum(-1).max() < 0.05, (freq - p).abs().sum(-1)
    assert (p[0] - p[1]).abs().sum() > 0.1  # the condition matters


def test_thermometer_encoding():
    v = torch.tensor([[0.0, 0.3, 1.0]])
    t = mg.thermometer(v, 10).view(3, 10)
    torch.testing.assert_close(t.sum(-1), torch.tensor([0.0, 3.0, 10.0]))  # bins filled up to v * bins
    assert (t[:, :-1] >= t[:, 1:]).all()  # ordered: a bin is full before the next one starts
    m, _ = _model(beta_max=16.0)
    c = m.encode(torch.tensor([[0.25, 0.75]]), torch.tensor([12.0]))
    assert c.shape == (1, 3 * m.cfg.therm) and c[0, 2 * m.cfg.therm:].sum() == pytest.approx(m.cfg.therm / 2)


class TablePolicy(nn.Module):
    def __init__(self, logits, H):
        super().__init__()
        self.logits, self.H = nn.Parameter(logits), H

    def forward(self, x, c):
        return self.logits[x[:, 0] * self.H + x[:, 1]]


def test_tb_loss_zero_for_an_exact_flow_and_positive_otherwise():
    cfg = mg.Config(side=4, width=8, beta=4.0)
    m = mg.build(cfg)
    task, H = m.task, 4
    s = task.all_states()
    w, beta = torch.tensor([[0.4, 0.6]]), torch.tensor([4.0])
    R = mg.log_reward(task.objectives(s), w, beta, cfg).double().exp()  # (16,)
    # state flows with the uniform backward policy: F(s) = R(s) + sum over children s' of F(s') / #parents(s')
    F_ = torch.zeros(16, dtype=torch.float64)
    logits = torch.full((16, 3), -math.inf, dtype=torch.float64)
    for i in reversed(range(16)):
        a, b = divmod(i, H)
        kids = [(d, j) for d, j in ((0, i + H), (1, i + 1)) if (a, b)[d] < H - 1]
        npar = lambda j: sum(v > 0 for v in divmod(j, H))  # noqa: E731
        F_[i] = R[i] + sum(F_[j] / npar(j) for _, j in kids)
        for d, j in kids:
            logits[i, d] = math.log(F_[j] / npar(j) / F_[i])
        logits[i, 2] = math.log(R[i] / F_[i])
    m.policy = TablePolicy(logits.float(), H)
    log_z = float(F_[0].log())
    m.logz = nn.Sequential(nn.Linear(m.cond_dim, 1))
    nn.init.zeros_(m.logz[0].weight)
    nn.init.constant_(m.logz[0].bias, log_z)
    cond = m.encode(w.expand(256, -1), beta.expand(256))
    xs, acts, x = mg.rollout(m, cond, np.random.default_rng(0), eps=0.5)
    loss, _, _ = mg.tb_loss(m, m, xs, acts, x, w.expand(256, -1), beta.expand(256), cond)
    assert loss.item() < 1e-8
    # replay: P_B trajectories into given terminal states are valid forward trajectories, and TB is ~0 on them too
    bxs, bacts = mg.backward_rollout(task, x, np.random.default_rng(1), 256)
    assert torch.equal(bxs[-1], x) and ((bacts == 2).sum(0) == 1).all()
    cur = task.reset(256, "cpu")
    for t in range(len(bacts)):
        assert task.valid(cur)[bacts[t] >= 0, bacts[t][bacts[t] >= 0]].all()
        cur = task.step(cur, bacts[t])
        assert torch.equal(cur, bxs[t + 1])
    assert mg.tb_loss(m, m, bxs, bacts, x, w.expand(256, -1), beta.expand(256), cond)[0].item() < 1e-8
    # the exact flow's terminal distribution is the target
    p = mg.terminal_distribution(m, cond[:1])
    torch.testing.assert_close(p, mg.true_distribution(task, w, beta, cfg), atol=1e-5, rtol=0)
    with torch.no_grad():
        m.policy.logits.add_(0.3 * torch.randn(16, 3))
    assert mg.tb_loss(m, m, xs, acts, x, w.expand(256, -1), beta.expand(256), cond)[0].item() > 1e-3
    with torch.no_grad():
        m.policy.logits.copy_(logits.float())
        m.logz[0].bias.add_(0.5)  # a wrong log Z alone: loss = 0.5^2
    assert mg.tb_loss(m, m, xs, acts, x, w.expand(256, -1), beta.expand(256), cond)[0].item() == pytest.approx(0.25)


def test_sequence_log_pf_one_pass_equals_stepwise():
    m, _ = _model(task="ngrams", motifs=("AR", "GV"), min_len=2, max_len=6, width=16, heads=2, cond="film")
    w = torch.tensor([[0.5, 0.5]]).expand(32, -1)
    cond = m.encode(w, torch.full((32,), 8.0))
    xs, acts, _ = mg.rollout(m, cond, np.random.default_rng(0), eps=0.3)
    fast = m.task.log_pf(m.policy, xs, acts, cond)
    slow = mg.Task.log_pf(m.task, m.policy, xs, acts, cond)  # one forward per (state, action)
    torch.testing.assert_close(fast, slow, atol=1e-5, rtol=0)
    bxs, bacts = mg.backward_rollout(m.task, xs[-1], np.random.default_rng(1), 32)  # a tree: P_B is deterministic
    assert torch.equal(bacts, acts) and torch.equal(bxs, xs)


def test_short_training_reaches_the_true_distribution():
    cfg = mg.Config(side=8, width=64, batch_size=64, lr=2e-3, lr_z=5e-2, eps=0.05, beta=4.0, ema_decay=0.0,
                    lr_schedule="constant", warmup=1, weight_decay=0.0, grad_clip=10.0)
    torch.manual_seed(0)
    m = mg.build(cfg)
    loss_fn, data = mg.train_step_fn(m, cfg, common.Dist())
    opt = mg.optimizer(m, cfg)
    w = torch.tensor([[0.0, 1.0], [0.5, 0.5], [0.8, 0.2], [1.0, 0.0]])
    b = torch.full((4,), cfg.beta)

    def l1():  # exact: the DP distribution of the policy against p_true ~ R(x | w)^beta, per preference
        return (mg.terminal_distribution(m, m.encode(w, b)) - mg.true_distribution(m.task, w, b, cfg)).abs().sum(-1)
    before = l1()
    it = data(0)
    for _ in range(600):
        loss, _ = loss_fn(m, next(it))
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = l1()
    assert before.min() > 0.5 and after.max() < L1_THRESHOLD, (before, after)


L1_THRESHOLD = 0.25  # measured: 1.46-1.54 before, 0.09-0.15 after 600 steps


def test_cli_resume_equals_uninterrupted_sample_and_eval(tmp_path):
    _cli(SMALL + ["--steps", "6", "--out_dir", str(tmp_path / "a")])
    _cli(SMALL + ["--steps", "6", "--stop_after", "3", "--out_dir", str(tmp_path / "b")])
    assert common.load_checkpoint(tmp_path / "b" / "ckpt.pt")["step"] == 3
    _cli(SMALL + ["--steps", "6", "--out_dir", str(tmp_path / "b"), "--resume"])
    a, b = (common.load_checkpoint(tmp_path / p / "ckpt.pt") for p in ("a", "b"))
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert (tmp_path / "a" / "front.png").read_bytes()[:4] == b"\x89PNG"
    logs = [json.loads(s) for s in (tmp_path / "a" / "log.jsonl").read_text().splitlines()]
    assert any("hv_ratio" in r for r in logs) and any("loss" in r for r in logs)
    out = tmp_path / "s.npz"
    _cli(["--sample", "--ckpt", str(tmp_path / "a" / "ckpt.pt"), "--n", "10", "--pref", "0.3,0.7", "--out", str(out)])
    with np.load(out) as f:
        assert f["x"].shape == (10, 2) and (f["x"] >= 0).all() and (f["x"] < 6).all()
        assert np.allclose(f["preferences"], [0.3, 0.7])
        assert np.allclose(f["rewards"], f["objectives"] @ np.array([0.3, 0.7]), atol=1e-6)
    r = _cli(["--eval", "--ckpt", str(tmp_path / "a" / "ckpt.pt")])
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert 0 < res["hv"] <= res["hv_true"] + 1e-9 and 0 <= res["l1"] <= 2 and res["random_hv"] <= res["hv_true"] + 1e-9


def test_torchrun_two_processes_match_single_process(tmp_path):
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
                str(ROOT / "mogfn.py")]
    _cli(SMALL + ["--steps", "3", "--out_dir", str(tmp_path / "one")])
    _cli(SMALL + ["--steps", "3", "--out_dir", str(tmp_path / "two")], cmd=torchrun)
    a, b = (common.load_checkpoint(tmp_path / p / "ckpt.pt") for p in ("one", "two"))
    for k in a["model"]:
        torch.testing.assert_close(a["model"][k], b["model"][k], atol=2e-5, rtol=0, msg=k)
    out = tmp_path / "s.npz"
    _cli(["--sample", "--ckpt", str(tmp_path / "two" / "ckpt.pt"), "--num_samples", "7", "--out", str(out)],
         cmd=torchrun)
    with np.load(out) as f:
        assert f["x"].shape == (7, 2) and len(f["preferences"]) == 7
    assert not list(tmp_path.glob(".s.rank*"))


def test_bad_inputs_give_one_clear_line(tmp_path):
    r = _cli(["--side", "1", "--steps", "1", "--out_dir", str(tmp_path)], ok=False)
    assert r.stderr.strip().splitlines()[-1] == "error: --side must be >= 2, got 1"
    r = _cli(["--objectives", "branin,rosenbrock", "--steps", "1", "--out_dir", str(tmp_path)], ok=False)
    assert r.stderr.strip().splitlines()[-1].startswith("error: --objectives 'rosenbrock' is not one of")
    m, cfg = _model()
    with pytest.raises(ValueError, match="not on the simplex"):
        mg.sample(m, torch.tensor([[0.5, 0.6]]), 8.0)
    with pytest.raises(ValueError, match="needs 2 weights"):
        mg.sample(m, torch.tensor([[1.0]]), 8.0)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        mg.build(mg.Config(task="ngrams", motifs=("AB",)))
    with pytest.raises(ValueError, match="width=32"):
        common.config_from_checkpoint(mg.Config, {"config": dataclasses.asdict(cfg)}, {"width": 64})
