"""common.py section 3: odeint -- the order of the fixed-step methods, dopri5's tolerance and its identity with
torchdiffeq's dopri5, NFE counts, both time directions, the path and its energy."""
import math

import numpy as np
import pytest
import torch

import common
from conftest import need

STAGES = {"euler": 1, "heun": 2, "rk4": 4}
ORDER = {"euler": 1, "heun": 2, "rk4": 4}


def _riccati(t, x):  # dx/dt = -x^2 + cos(t) x: nonlinear, time-dependent
    return -x * x + torch.cos(torch.as_tensor(t, dtype=x.dtype)) * x


def _riccati_exact(x0):  # with E(t) = exp(sin t): x(t) = E / (1/x0 + int_0^t E), the integral by Simpson on 2000 panels
    s = torch.linspace(0, 1, 2001, dtype=torch.float64)
    e = torch.exp(torch.sin(s))
    integral = (e[0] + e[-1] + 4 * e[1:-1:2].sum() + 2 * e[2:-1:2].sum()) / 6000
    return e[-1] / (1 / x0 + integral)


def _linear_ode():  # dx/dt = A x (t-independent), from t = 1 back to t = 0 as LFM samples: x(0) = exp(-A) x(1)
    A = torch.tensor([[-1.0, 2.0, 0.0], [-2.0, -1.0, 0.5], [0.0, 0.0, 1.5]], dtype=torch.float64)
    x1 = torch.tensor([[1.0, -0.5, 2.0], [0.3, 0.8, -1.0]], dtype=torch.float64)
    exact = x1 @ torch.linalg.matrix_exp(-A).T
    return (lambda t, x: x @ A.T), x1, exact


def _decay_ode(t0, t1):  # dx/dt = -t x, time-dependent: x(t1) = x(t0) exp((t0^2 - t1^2) / 2)
    x = torch.tensor([[1.0, -2.0], [0.5, 3.0]], dtype=torch.float64)
    return (lambda t, x: -t * x), x, x * math.exp((t0 ** 2 - t1 ** 2) / 2)


@pytest.mark.parametrize("method", ["euler", "heun", "rk4"])
def test_fixed_step_methods_converge_at_their_order_forwards(method):
    x0 = torch.linspace(0.5, 2.0, 7, dtype=torch.float64)[:, None]  # (B, 1)
    exact = _riccati_exact(x0)
    errs = []
    for steps in (10, 20, 40):
        res = common.odeint(_riccati, x0, method, steps)
        assert res.nfe == steps * STAGES[method]
        errs.append((res.x - exact).abs().max().item())
    rates = [math.log2(a / b) for a, b in zip(errs, errs[1:])]
    assert all(abs(r - ORDER[method]) < 0.2 for r in rates), rates


@pytest.mark.parametrize("method", ["euler", "heun", "rk4"])
def test_fixed_step_methods_converge_at_their_order_backwards(method):
    f, x1, exact = _linear_ode()
    errs = []
    for n in (16, 32, 64):
        res = common.odeint(f, x1, method, steps=n, t0=1.0, t1=0.0)
        assert res.nfe == n * STAGES[method]
        errs.append((res.x - exact).abs().max().item())
    rates = [math.log2(a / b) for a, b in zip(errs, errs[1:])]
    assert all(abs(r - ORDER[method]) < 0.15 for r in rates), rates


@pytest.mark.parametrize("method", ["euler", "heun", "rk4", "dopri5"])
@pytest.mark.parametrize("t0,t1", [(0.0, 1.0), (1.0, 0.0), (0.5, -1.5), (-1.0, 2.0)])
def test_every_method_runs_in_both_directions_and_sees_the_right_times(method, t0, t1):
    f, x, exact = _decay_ode(t0, t1)
    seen = []

    def rec(t, x):
        seen.append(t)
        return f(t, x)
    res = common.odeint(rec, x, method, steps=400, atol=1e-9, rtol=1e-9, t0=t0, t1=t1)
    assert (res.x - exact).abs().max() < {"euler": 2e-2, "heun": 1e-4, "rk4": 1e-8, "dopri5": 1e-7}[method]
    assert res.nfe == len(seen) and isinstance(seen[0], float) and seen[0] == t0
    lo, hi = min(t0, t1), max(t0, t1)
    if method != "dopri5":  # fixed steps stay on [t0, t1] and end on t1 itself (rk4, heun)
        assert lo <= min(seen) and max(seen) <= hi and res.nfe == 400 * STAGES[method]
        assert method == "euler" or t1 in seen
    else:  # the last step may pass t1 (its dense output gives x(t1)), but never by more than a step
        assert lo - (hi - lo) <= min(seen) and max(seen) <= hi + (hi - lo)


def test_dopri5_meets_its_tolerance_and_spends_more_steps_on_tighter_ones():
    x0 = torch.linspace(0.5, 2.0, 7, dtype=torch.float64)[:, None]  # (B, 1)
    exact, nfes = _riccati_exact(x0), []
    for tol in (1e-3, 1e-6, 1e-9):
        res = common.odeint(_riccati, x0, "dopri5", atol=tol, rtol=tol)
        assert (res.x - exact).abs().max().item() < 10 * tol * (1 + exact.abs().max().item())
        nfes.append(res.nfe)
    assert nfes[0] < nfes[1] < nfes[2] and nfes[0] < 40
    # each step is 6 evaluations (FSAL), plus the first slope and the initial-step probe
    assert all((n - 2) % 6 == 0 for n in nfes), nfes


def test_dopri5_backwards_tightens_with_its_tolerance_and_beats_heun():
    f, x1, exact = _linear_ode()
    prev_err, prev_nfe = None, 0
    for tol in (1e-3, 1e-5, 1e-7):
        res = common.odeint(f, x1, "dopri5", atol=tol, rtol=tol, t0=1.0, t1=0.0)
        err = (res.x - exact).abs()
        assert (err <= 3 * (tol + tol * exact.abs())).all(), (tol, err.max())  # measured: <= 1.15x
        assert res.nfe > prev_nfe and (prev_err is None or err.max() < prev_err / 10)
        prev_err, prev_nfe = err.max(), res.nfe
    # fifth order: at tolerance 1e-7 (86 evaluations, measured) it is 1000x more accurate than Heun with 128
    heun = common.odeint(f, x1, "heun", steps=64, t0=1.0, t1=0.0)
    assert prev_nfe < heun.nfe and prev_err < (heun.x - exact).abs().max() / 1000


@pytest.mark.parametrize("case", range(4))
def test_dopri5_is_torchdiffeqs(case):
    """The same controller as torchdiffeq's dopri5 (LFM's official sampler): the same points, steps and end value."""
    torchdiffeq = need("torchdiffeq")
    g = torch.Generator().manual_seed(case)
    A = 0.8 * torch.randn(6, 6, generator=g, dtype=torch.float64)
    f, x, t0, t1, tol = [  # linear backward, nonlinear forward, rotation backward past zero, a stiffer decay
        (lambda t, x: x @ A.T, torch.randn(3, 6, generator=g, dtype=torch.float64), 1.0, 0.0, 1e-5),
        (lambda t, x: torch.sin(3 * t) * x - x ** 3, torch.randn(4, 5, generator=g, dtype=torch.float64), 0.0, 2.0,
         1e-6),
        (lambda t, x: torch.stack([x[..., 1], -x[..., 0] * (1 + 0.1 * t)], -1),
         torch.randn(7, 2, generator=g, dtype=torch.float64), 1.0, -3.0, 1e-7),
        (lambda t, x: -20 * (x - torch.cos(t)), torch.randn(5, generator=g, dtype=torch.float64), 0.0, 1.5, 1e-5),
    ][case]
    seen = {"ref": [], "ours": []}

    def rec(key):
        def h(t, x):
            seen[key].append(float(t))
            return f(torch.as_tensor(t, dtype=torch.float64), x)
        return h
    ref = torchdiffeq.odeint(rec("ref"), x, torch.tensor([t0, t1], dtype=torch.float64), method="dopri5", atol=tol,
                             rtol=tol, options={"dtype": torch.float64})[-1]
    res = common.odeint(rec("ours"), x, "dopri5", atol=tol, rtol=tol, t0=t0, t1=t1)
    assert res.nfe == len(seen["ref"]) and np.allclose(seen["ours"], seen["ref"], rtol=0, atol=1e-8)
    assert (res.x - ref).abs().max() < 1e-10, (res.x - ref).abs().max()  # measured: ~1e-14


@pytest.mark.parametrize("method", ["euler", "heun", "rk4", "dopri5"])
def test_path_starts_at_x_ends_at_the_result_and_its_energy_is_the_steps(method):
    f, x, _ = _decay_ode(1.0, 0.0)
    res = common.odeint(f, x, method, steps=5, atol=1e-6, rtol=1e-6, t0=1.0, t1=0.0, keep_path=True)
    assert torch.equal(res.path[0], x) and torch.equal(res.path[-1], res.x) and torch.equal(res.x0, x)
    assert res.path.shape[1:] == x.shape and (method == "dopri5" or len(res.path) == 6)
    assert res.energy.shape == (len(x),) and (res.energy > 0).all()
    assert common.odeint(f, x, method, steps=5, atol=1e-6, rtol=1e-6, t0=1.0, t1=0.0).path is None
    # a straight constant-speed path: energy |x1 - x0|^2 / |t1 - t0| whatever the direction and the method
    v = torch.tensor([[3.0, 1.0], [-1.0, 2.0]], dtype=torch.float64)
    for t0, t1 in ((0.0, 1.0), (1.0, -1.0)):
        r = common.odeint(lambda t, x: v, x, method, steps=4, t0=t0, t1=t1)
        torch.testing.assert_close(r.x, x + (t1 - t0) * v)
        torch.testing.assert_close(r.energy, v.square().sum(1) * abs(t1 - t0))


def test_bad_methods_and_step_counts_are_errors_and_an_empty_interval_costs_nothing():
    f, x, _ = _decay_ode(0.0, 1.0)
    with pytest.raises(ValueError, match="unknown ODE method 'rk45': one of euler, heun, rk4, dopri5"):
        common.odeint(f, x, "rk45")
    for steps in (0, -1, 2.5):
        with pytest.raises(ValueError, match="positive whole number of steps"):
            common.odeint(f, x, "heun", steps=steps)
    for method in common.ODE_METHODS:
        res = common.odeint(f, x, method, t0=0.3, t1=0.3)
        assert res.nfe == 0 and torch.equal(res.x, x)


def test_dopri5_stops_on_non_finite_values_and_after_max_steps():
    x = torch.ones(2, 3, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="non-finite"):
        common.odeint(lambda t, x: x * float("nan"), x, "dopri5")
    with pytest.raises(RuntimeError, match="did not reach t = 1.0 in 5 steps"):
        common.odeint(lambda t, x: -1e4 * x, x, "dopri5", atol=1e-9, rtol=1e-9, max_steps=5)
