"""common.py section 4: torchrun, DDP/FSDP2, resume, SIGTERM, crash-safe checkpoints, config CLI, data, PNG, metrics."""
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import common
from conftest import ROOT, need

TINY = [sys.executable, str(ROOT / "tests" / "tiny_train.py")]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
            str(ROOT / "tests" / "tiny_train.py")]


def _run(cmd, rc=0, **kw):
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, **kw)
    assert r.returncode == rc, r.stderr[-3000:]
    return r


def _ckpt(path):
    return torch.load(Path(path) / "ckpt.pt", weights_only=True)


def _assert_same_params(a, b, atol):
    for k in a:
        x, y = a[k], b[k]
        if k.endswith("attn.qkv.bias"):  # the key bias gets no gradient (softmax is shift-invariant): Adam
            x, y = torch.cat([x[:16], x[32:]]), torch.cat([y[:16], y[32:]])  # amplifies float noise there
        torch.testing.assert_close(x, y, atol=atol, rtol=0, msg=k)


@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp", "fsdp2"])
def test_torchrun_two_processes_match_single_process(tmp_path, fsdp):
    _run(TINY + [str(tmp_path / "single")])
    # two ranks, each accumulating two micro-batches (DDP's no_sync / FSDP2's deferred reduce-scatter on the first)
    _run(TORCHRUN + [str(tmp_path / "two"), "--grad_accum", "2"] + (["--fsdp"] if fsdp else []))
    a, b = _ckpt(tmp_path / "single"), _ckpt(tmp_path / "two")
    assert a["step"] == b["step"] == 12
    _assert_same_params(a["model"], b["model"], 1e-5)
    _assert_same_params(a["ema"], b["ema"], 1e-5)
    # the model moved: a broken optimizer step would also "match"
    assert (a["model"]["out.weight"] - _init_out_weight()).abs().max() > 1e-2
    # each rank saved its own RNG state, and they differ (per-rank seeding)
    assert len(b["rng"]) == 2 and not torch.equal(b["rng"][0]["torch"], b["rng"][1]["torch"])


def test_optimizer_groups_value_clipping_and_lr_floor_under_fsdp2(tmp_path):
    """The optimizer is built after FSDP2 sharding: a parameter group with its own lr and betas, value clipping and
    the cosine floor give the single-process result on two FSDP2 ranks."""
    _run(TINY + [str(tmp_path / "single"), "--groups"])
    _run(TORCHRUN + [str(tmp_path / "two"), "--fsdp", "--groups"])
    a, b = _ckpt(tmp_path / "single"), _ckpt(tmp_path / "two")
    _assert_same_params(a["model"], b["model"], 1e-5)
    for st in (a, b):  # at the last step the cosine sits on its floor: min_lr, and the same fraction of the group's lr
        lrs = sorted((g["lr"], g["initial_lr"], tuple(g["betas"])) for g in st["optimizer"]["param_groups"])
        assert [(round(lr, 12), i, bt) for lr, i, bt in lrs] == [(2e-3, 1e-2, (0.9, 0.95))] * 2 + \
            [(1e-2, 5e-2, (0.5, 0.9))] * 2
    _run(TINY + [str(tmp_path / "plain")])
    plain = _ckpt(tmp_path / "plain")
    assert (a["model"]["out.weight"] - plain["model"]["out.weight"]).abs().max() > 1e-3  # the options did act


def test_grad_clip_value_clamps_each_element_after_the_norm(tmp_path):
    lin = torch.nn.Linear(3, 2)
    w0 = lin.weight.detach().clone()
    x, y = torch.randn(8, 3), 10 * torch.randn(8, 2)
    loss_fn = lambda net, b, at: ((net(b[0]) - b[1]).square().mean(), {})  # noqa: E731
    (loss_fn(lin, (x, y), None)[0]).backward()
    g = lin.weight.grad.clone()
    lin.zero_grad()
    v = g.abs().median().item()  # some elements clamped, some not
    cfg = common.TrainConfig(out_dir=str(tmp_path), steps=1, batch_size=8, warmup=0, lr=1.0, grad_clip=0.0,
                             grad_clip_value=v, ema_decay=0.0, log_every=0, ckpt_every=0, eval_every=0,
                             lr_schedule="constant")
    common.train(cfg, lin, loss_fn, common.ArrayDataset(x, y), common.Dist(),
                 optimizer=lambda m: torch.optim.SGD(m.parameters(), lr=1.0))
    torch.testing.assert_close(lin.weight.detach(), w0 - g.clamp(-v, v), atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="--min_lr 0.1 must be below --lr 0.01"):
        common.TrainConfig(lr=1e-2, min_lr=0.1)


def test_full_params_gathers_each_fsdp_module_once_for_a_whole_decode(tmp_path):
    """Sampling under FSDP2 (the trainer's evaluation): without common.full_params every forward all-gathers the
    block's weights again (once per token); inside it, one gather per FSDP module for the whole decode, the same
    outputs, and the parameters sharded again afterwards."""
    _run(TORCHRUN + [str(tmp_path), "--fsdp", "--steps", "2", "--count_gathers"])
    g = json.loads((tmp_path / "gathers.json").read_text())
    assert g["per_forward"] >= 8 and g["full_params"] <= 2, g  # modules: the Block and the root
    assert g["same"] and g["sharded"], g


def _init_out_weight():
    sys.path.insert(0, str(ROOT / "tests"))
    import tiny_train
    common.seed_all(0)
    return tiny_train.Tiny().out.weight.detach()


def test_sigterm_saves_and_resume_equals_uninterrupted_run(tmp_path):
    _run(TINY + [str(tmp_path / "straight"), "--noise"])
    r = _run(TINY + [str(tmp_path / "split"), "--noise", "--sigterm_at", "5"], rc=128 + signal.SIGTERM)
    assert "stopped at step 5" in r.stdout + r.stderr
    assert _ckpt(tmp_path / "split")["step"] == 5
    _run(TINY + [str(tmp_path / "split"), "--noise", "--resume"])
    a, b = _ckpt(tmp_path / "straight"), _ckpt(tmp_path / "split")
    assert b["step"] == 12
    for part in ("model", "ema"):  # bit-exact: data order, RNG, optimizer, schedule and EMA all continue
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), (part, k)
    steps = [json.loads(line)["step"] for line in (tmp_path / "split" / "log.jsonl").read_text().splitlines()]
    assert steps == [4, 8, 12]  # the resumed run appended to the log


def test_sigterm_from_outside_saves_and_exits_nonzero(tmp_path):
    out = tmp_path / "run"
    p = subprocess.Popen(TINY + [str(out), "--steps", "1000000"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
    log = out / "log.jsonl"
    t0 = time.time()
    while not (log.exists() and log.read_text().strip()) and time.time() - t0 < 120:
        time.sleep(0.2)
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 128 + signal.SIGTERM, err[-2000:]  # schedulers requeue on a non-zero status
    assert "Traceback" not in err
    step = _ckpt(out)["step"]
    assert 4 <= step < 1000000


def test_grad_accum_equals_one_step_on_the_full_batch(tmp_path):
    """K micro-batches of B/K, gradients accumulated, equal one step on the batch of B (and log the same loss)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(60, 3, generator=g)
    data = common.ArrayDataset(x, x @ torch.tensor([[1.0], [-2.0], [0.5]]) + 0.1 * torch.randn(60, 1, generator=g))
    runs = {}
    for k in (1, 2, 4):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
        init = model[0].weight.detach().clone()
        cfg = _Cfg(out_dir=str(tmp_path / f"k{k}"), steps=4, batch_size=12, grad_accum=k, log_every=1, warmup=1,
                   lr=0.05, ema_decay=0.0)
        calls = [0]

        def loss_fn(net, batch, at):
            calls[0] += 1
            return (net(batch[0]) - batch[1]).square().mean(), {}
        common.train(cfg, model, loss_fn, data, common.Dist())
        assert calls[0] == 4 * k
        losses = [json.loads(line)["loss"] for line in (tmp_path / f"k{k}" / "log.jsonl").read_text().splitlines()]
        runs[k] = (model.state_dict(), losses)
    first = runs[1][0]
    assert (first["0.weight"] - init).abs().max() > 1e-2  # the steps moved the weights
    for k in (2, 4):
        for name, v in runs[k][0].items():
            torch.testing.assert_close(v, first[name], rtol=0, atol=1e-6, msg=f"grad_accum {k}: {name}")
        assert runs[k][1] == pytest.approx(runs[1][1], abs=1e-6)


def test_crash_between_write_and_rename_keeps_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    common.atomic_save({"w": torch.ones(3)}, path)

    def crash(*a):
        raise OSError("simulated crash before rename")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError):
        common.atomic_save({"w": torch.zeros(3)}, path)
    monkeypatch.undo()
    assert torch.equal(common.load_checkpoint(path)["w"], torch.ones(3))


def test_kill_during_saves_leaves_a_loadable_checkpoint(tmp_path):
    path = tmp_path / "ckpt.pt"
    code = (f"import sys; sys.path.insert(0, {str(ROOT)!r}); import torch, common\n"
            f"i = 0\nwhile True:\n    i += 1\n"
            f"    common.atomic_save({{'i': i, 'w': torch.full((4_000_000,), float(i))}}, {str(path)!r})\n")
    p = subprocess.Popen([sys.executable, "-c", code])
    t0 = time.time()
    while not path.exists() and time.time() - t0 < 60:
        time.sleep(0.05)
    time.sleep(0.7)  # mid-way through some later save
    p.kill()
    p.wait()
    state = common.load_checkpoint(path)
    assert state["i"] >= 1 and torch.all(state["w"] == state["i"])


def test_corrupt_and_missing_checkpoints_give_one_line(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot read checkpoint") as e:
        common.load_checkpoint(bad)
    assert "\n" not in str(e.value)
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        common.load_checkpoint(tmp_path / "nope.pt")


@dataclasses.dataclass
class _Cfg(common.TrainConfig):
    width: int = 32  # model width
    layers: tuple = (2, 2, 8)  # layers per block
    guidance: float = 1.0  # guidance weight
    cond: bool = True  # class conditioning
    RUNTIME = ("guidance",)


def test_nonfinite_steps_are_skipped_and_never_saved(tmp_path):
    d = common.Dist()
    model = torch.nn.Linear(3, 1)
    x = torch.randn(32, 3)
    data = common.ArrayDataset(x, x.sum(1, keepdim=True))
    cfg = _Cfg(out_dir=str(tmp_path), steps=10, batch_size=8, log_every=5, ckpt_every=5, eval_every=100, warmup=1)
    calls = [0]

    def loss_fn(net, batch, at):
        calls[0] += 1
        loss = (net(batch[0]) - batch[1]).square().mean()
        return (loss * float("nan") if calls[0] in (3, 4) else loss), {}

    common.train(cfg, model, loss_fn, data, d)
    state = common.load_checkpoint(tmp_path / "ckpt.pt")
    assert all(torch.isfinite(v).all() for v in state["model"].values())
    assert state["optimizer"]["state"]["weight"]["step"] == 8  # two steps skipped
    with pytest.raises(common.Diverged, match="non-finite gradients.*no checkpoint was written"):
        common.train(dataclasses.replace(cfg, out_dir=str(tmp_path / "diverged")), model,
                     lambda net, b, at: (net(b[0]).sum() * float("inf"), {}), data, d, max_bad_steps=3)
    assert not (tmp_path / "diverged" / "ckpt.pt").exists()
    # finite gradients that make the weights infinite (a huge learning rate) stop the run at once
    big = dataclasses.replace(cfg, out_dir=str(tmp_path / "huge_lr"), lr=1e38, warmup=0, grad_clip=0.0)
    lin = torch.nn.Linear(3, 1)
    with pytest.raises(common.Diverged, match="weights became non-finite at step 1;.*no checkpoint"):
        common.train(big, lin, lambda net, b, at: ((net(b[0]) - b[1]).square().mean() * 1e10, {}), data, d,
                     optimizer=lambda m: torch.optim.SGD(m.parameters(), lr=1e38))
    model.weight.data[0, 0] = float("nan")
    with pytest.raises(RuntimeError, match="non-finite weights"):
        common.save_checkpoint(tmp_path / "nan.pt", model, cfg, 0)
    assert not (tmp_path / "nan.pt").exists()


def test_config_cli_presets_overrides_and_errors(capsys):
    presets = {"small": {"width": 16}, "big": {"width": 256, "layers": (2, 18)}}
    cfg, args, over = common.parse_config(_Cfg, presets, [])
    assert cfg.width == 16 and cfg.layers == (2, 2, 8) and over == {}
    cfg, args, over = common.parse_config(_Cfg, presets, ["--preset", "big", "--layers", "1,2,3", "--no-cond",
                                                         "--lr", "3e-4", "--sample", "--n", "8"])
    assert (cfg.width, cfg.layers, cfg.cond, cfg.lr, args.sample, args.n) == (256, (1, 2, 3), False, 3e-4, True, 8)
    assert over == {"layers": (1, 2, 3), "cond": False, "lr": 3e-4}
    with pytest.raises(SystemExit):
        common.parse_config(_Cfg, presets, ["--widht", "3"])
    assert "unrecognized arguments: --widht" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        common.parse_config(_Cfg, presets, ["--help"])
    help_text = capsys.readouterr().out
    for f in dataclasses.fields(_Cfg):
        assert f"--{f.name}" in help_text
    assert "layers per block" in help_text and "peak learning rate" in help_text


def test_checkpoint_of_another_config_is_refused_naming_fields():
    saved = dataclasses.asdict(_Cfg(width=64, layers=(2, 2)))
    common.check_config({"config": saved}, _Cfg(width=64, layers=(2, 2), guidance=3.0, lr=1.0))  # runtime may differ
    with pytest.raises(ValueError, match=r"width=64 \(now 32\), layers=\(2, 2\) \(now \(2, 2, 8\)\)"):
        common.check_config({"config": saved}, _Cfg())
    cfg = common.config_from_checkpoint(_Cfg, {"config": saved}, {"guidance": 2.0})
    assert cfg.width == 64 and cfg.layers == (2, 2) and cfg.guidance == 2.0
    with pytest.raises(ValueError, match="width"):
        common.config_from_checkpoint(_Cfg, {"config": saved}, {"width": 8})


@pytest.mark.parametrize("world", [2, 4])
def test_global_batches_do_not_depend_on_world_size(world):
    data = common.ArrayDataset(torch.arange(40))
    one = common.batches(data, 8, common.Dist(), seed=3)
    ranks = [common.batches(data, 8, common.Dist(rank=r, world_size=world), seed=3) for r in range(world)]
    seen = []
    for step in range(12):  # 5 steps per epoch: crosses two epoch boundaries
        g = next(one)[0]
        parts = [next(it)[0] for it in ranks]
        assert sorted(torch.cat(parts).tolist()) == sorted(g.tolist())
        seen.append(g)
    assert sorted(torch.cat(seen[:5]).tolist()) == list(range(40))  # an epoch covers the data once
    resumed = common.batches(data, 8, common.Dist(), seed=3, start_step=7)
    assert torch.equal(next(resumed)[0], seen[7])


@pytest.mark.parametrize("world", [2, 3])
def test_batch_noise_travels_with_its_example_on_any_world_size(world):
    """noise=: each example keeps the same noise rows whatever the world size and wherever --resume starts."""
    data = common.ArrayDataset(torch.arange(36))
    noise = lambda g, n: [torch.randn(n, 2, generator=g), torch.rand(n, generator=g)]  # noqa: E731

    def pairs(its, steps):  # step -> {example: its noise}
        out = []
        for _ in range(steps):
            out.append({int(i): (e.tolist(), float(u)) for b in (next(it) for it in its) for i, e, u in zip(*b)})
        return out
    one = pairs([common.batches(data, 6, common.Dist(), seed=2, noise=noise)], 9)  # 6 steps an epoch: crosses one
    ranks = pairs([common.batches(data, 6, common.Dist(rank=r, world_size=world), seed=2, noise=noise)
                   for r in range(world)], 9)
    assert ranks == one and len(one[0]) == 6
    assert one[0] != one[6]  # a new epoch draws new noise for the same examples
    assert pairs([common.batches(data, 6, common.Dist(), seed=2, start_step=4, noise=noise)], 3) == one[4:7]


def test_a_loss_without_data_is_told_its_rows_of_the_global_batch(tmp_path):
    """data=None: every micro-batch learns its step and rows (the global batch split over ranks and --grad_accum),
    the rows of a step cover the batch once, and weighting by them makes the update the full batch's."""
    target = torch.randn(12)
    seen = []

    def loss_fn(net, batch, at):
        assert batch == []
        seen.append((at.step, at.rows))
        rows = torch.arange(at.rows.start, at.rows.stop)  # the examples it makes itself, from its rows
        return (net.weight[0, 0] - target[rows]).square().mean(), {}
    runs = {}
    for k in (1, 3):
        lin = torch.nn.Linear(1, 1, bias=False)
        torch.nn.init.zeros_(lin.weight)
        cfg = _Cfg(out_dir=str(tmp_path / f"k{k}"), steps=3, batch_size=12, grad_accum=k, warmup=0, ema_decay=0.0,
                   lr_schedule="constant", log_every=0, eval_every=0, ckpt_every=0)
        seen.clear()
        common.train(cfg, lin, loss_fn, None, common.Dist(), optimizer=lambda m: torch.optim.SGD(m.parameters(), 0.1))
        assert [s for s, _ in seen] == [s for s in range(3) for _ in range(k)]
        assert sorted(i for _, r in seen[:k] for i in range(r.start, r.stop)) == list(range(12))
        runs[k] = lin.weight.item()
    assert runs[1] == pytest.approx(runs[3], abs=1e-6) and runs[1] != 0


ENCODE = """
import sys, torch
sys.path.insert(0, {root!r})
import common
d = common.setup_distributed("cpu")
data = common.ArrayDataset(torch.arange(7.0)[:, None], torch.arange(7))
common.encode_folder({out!r}, data, d, lambda b: {{"double": 2 * b[0], "labels": b[1], "rank": b[1] * 0 + d.rank}},
                     (3, 5, 1), batch_size=2)
"""


def test_encode_folder_writes_every_rank_share_in_row_order(tmp_path):
    script = tmp_path / "enc.py"
    script.write_text(ENCODE.format(root=str(ROOT), out=str(tmp_path / "lat")))
    _run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone", str(script)],
         env={**os.environ, "OMP_NUM_THREADS": "1"})
    a = common.load_arrays(tmp_path / "lat", ("double", "labels", "rank"))
    assert a["labels"].tolist() == list(range(7)) and a["double"][:, 0].tolist() == [2.0 * i for i in range(7)]
    assert a["rank"].tolist() == [0] * 4 + [1] * 3  # rank_split's shares, rank 0 first
    assert not list((tmp_path / "lat").glob(".*"))  # no parts left behind
    assert common.image_shape(tmp_path / "lat") == (3, 5, 1)  # the encoded images' size, for training on it


def test_ema_update_and_swap():
    model = torch.nn.Linear(2, 2)
    ema = common.EMA(model, decay=0.9)
    w0 = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update(model, step=1000)  # past warmup: decay 0.9
    torch.testing.assert_close(ema.shadow["weight"], 0.9 * w0 + 0.1 * (w0 + 1))
    with ema.swap(model):
        torch.testing.assert_close(model.weight, ema.shadow["weight"])
    torch.testing.assert_close(model.weight.detach(), w0 + 1)


@pytest.mark.parametrize("channels", [1, 3, 4])
def test_png_writer_reads_back_with_pillow(tmp_path, channels):
    Image = need("PIL.Image")
    imgs = torch.randint(0, 256, (5, channels, 7, 9), dtype=torch.uint8)
    grid = common.image_grid(imgs, nrow=3, pad=2)
    assert grid.shape == (2 * 9 + 2, 3 * 11 + 2, channels)
    common.save_png(tmp_path / "g.png", grid)
    back = np.asarray(Image.open(tmp_path / "g.png"))
    assert np.array_equal(back.reshape(grid.shape), grid)
    assert np.array_equal(grid[2:9, 13:22], imgs[1].permute(1, 2, 0).numpy())  # image 1 sits in row 0, column 1


def test_frechet_distance_matches_scipy():
    linalg = need("scipy.linalg")
    g = torch.Generator().manual_seed(0)
    a = torch.randn(500, 6, generator=g) @ torch.randn(6, 6, generator=g)
    b = torch.randn(400, 6, generator=g) * 2 + 1
    mu1, mu2 = a.double().mean(0).numpy(), b.double().mean(0).numpy()
    s1, s2 = np.cov(a.double().numpy().T), np.cov(b.double().numpy().T)
    ref = ((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * linalg.sqrtm(s1 @ s2).real)
    assert abs(common.frechet_distance(a, b) - ref) < 1e-6 * max(1, abs(ref))
    assert abs(common.frechet_distance(a, a)) < 1e-8


def test_digits_data_and_metric(tmp_path):
    need("sklearn")
    x_tr, y_tr = common.load_digits("train")
    x_te, y_te = common.load_digits("test", size=16)
    assert x_tr.dtype == torch.uint8 and len(x_tr) + len(x_te) == 1797 and x_te.shape[1:] == (1, 16, 16)
    assert torch.bincount(y_te).min() >= 35  # stratified
    m = common.digits_metrics(x_te, y_te, cache=tmp_path / "clf.pt")
    assert m["accuracy"] > 0.93  # the classifier is good enough to judge samples
    assert m["fd"] < 3 * m["fd_floor"] + 1.0
    noise = common.digits_metrics(torch.randint(0, 256, (300, 1, 8, 8), dtype=torch.uint8),
                                  torch.zeros(300, dtype=torch.long), cache=tmp_path / "clf.pt")
    assert noise["fd"] > 10 * m["fd"] and noise["accuracy"] < 0.5
    assert (tmp_path / "clf.pt").exists()


def test_image_folder_and_npz_data(tmp_path):
    Image = need("PIL.Image")
    for c, name in enumerate(["cat", "dog"]):
        (tmp_path / "imgs" / name).mkdir(parents=True)
        for i in range(2):
            a = np.zeros((20, 30, 3), np.uint8)  # landscape: the center crop keeps columns 5..24
            a[:, 5:25] = 40 * (c + 1) + i
            Image.fromarray(a).save(tmp_path / "imgs" / name / f"{i}.png")
    ds = common.ImageFolder(tmp_path / "imgs", size=10)
    assert ds.classes == ["cat", "dog"] and len(ds) == 4
    x, y = ds[3]
    assert x.shape == (3, 10, 10) and x.dtype == torch.uint8 and y == 1
    assert int(x.min()) == int(x.max()) == 81  # the crop removed the black borders
    with pytest.raises(FileNotFoundError, match="no image folder"):
        common.ImageFolder(tmp_path / "nope", 10)
    flat = common.ImageFolder(tmp_path / "imgs" / "dog", size=10)  # no subfolders: one class
    assert flat.classes == ["dog"] and len(flat) == 2 and flat[1][1] == 0 and torch.equal(flat[1][0], x)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images in"):
        common.ImageFolder(tmp_path / "empty", 10)
    np.savez(tmp_path / "d.npz", images=np.zeros((5, 4, 4, 3), np.uint8), labels=np.arange(5))
    arrays = common.load_arrays(tmp_path / "d.npz", ("images", "labels"))
    assert arrays["images"].shape == (5, 4, 4, 3) and arrays["labels"].tolist() == list(range(5))
    with pytest.raises(ValueError, match="has no array 'latents'"):
        common.load_arrays(tmp_path / "d.npz", ("latents",))


def test_image_size_and_channels_come_from_the_data_unless_given(tmp_path, capsys):
    """--data my_folder without --img_size/--channels trains at the data's size and channels (every image model's
    parse_config); an option or a preset named with --preset still wins; the digits and latent folders are left
    alone; --sample/--eval/--resume read the checkpoint's config instead."""
    need("PIL")
    import arflow
    import latent_fm
    import starflow
    rng = np.random.default_rng(0)
    for c in ("cat", "dog"):  # class subfolders
        for i in range(3):
            common.save_png(tmp_path / "rgb" / c / f"{i}.png", rng.integers(0, 256, (12, 12, 3), dtype=np.uint8))
    for i in range(3):  # flat, grey, landscape: the center crop's side
        common.save_png(tmp_path / "grey" / f"{i}.png", rng.integers(0, 256, (10, 14), dtype=np.uint8))
    np.savez(tmp_path / "v.npz", images=np.zeros((2, 5, 6, 6, 3), np.uint8))  # videos: (H, W, C) of a frame
    np.savez(tmp_path / "d.npz", images=np.zeros((4, 20, 20, 1), np.uint8), labels=np.zeros(4, np.int64))
    lat = tmp_path / "lat"
    lat.mkdir()
    np.save(lat / "latents.npy", np.zeros((4, 4, 2, 2), np.float16))
    assert common.image_shape(tmp_path / "rgb") == (12, 12, 3) and common.image_shape(tmp_path / "grey") == (10, 14, 1)
    assert common.image_shape(tmp_path / "d.npz") == (20, 20, 1) and common.image_shape(tmp_path / "v.npz") == (6, 6, 3)
    assert common.image_shape(lat) is None and common.image_shape("digits") is None
    assert common.image_shape(tmp_path / "missing") is None
    for mod in (starflow, latent_fm, arflow):
        def cfg(*argv):
            return common.parse_config(mod.Config, mod.PRESETS, [str(a) for a in argv] + ["--vae_family", "none",
                                       "--patch_size", "2", "--out_dir", str(tmp_path / "o")])[0]
        c = cfg("--data", tmp_path / "rgb")
        assert (c.img_size, c.channels) == (12, 3), mod.__name__
        assert "--img_size 12 --channels 3 from the data" in capsys.readouterr().out
        c = cfg("--data", tmp_path / "rgb", "--img_size", 8)  # the option wins (the folder is resized)
        assert (c.img_size, c.channels) == (8, 3), mod.__name__
        c = cfg("--data", tmp_path / "grey", "--channels", 3)
        assert (c.img_size, c.channels) == (10, 3), mod.__name__
        c = cfg("--data", tmp_path / "d.npz")
        assert (c.img_size, c.channels) == (20, 1), mod.__name__
        default = mod.Config(**next(iter(mod.PRESETS.values())))
        c = cfg("--data", lat)  # latents: nothing to read the image size from
        assert (c.img_size, c.channels) == (default.img_size, default.channels), mod.__name__
    c = cfg("--data", "digits")
    assert (c.img_size, c.channels) == (8, 1)  # arflow's digits: the preset's defaults
    imagenet = common.parse_config(arflow.Config, arflow.PRESETS, ["--preset", "imagenet128", "--data",
                                   str(tmp_path / "rgb"), "--out_dir", str(tmp_path / "o")])[0]
    assert (imagenet.img_size, imagenet.channels) == (128, 3)  # a named preset's size is given
    grey = common.parse_config(starflow.Config, starflow.PRESETS, ["--data", str(tmp_path / "grey"), "--out_dir",
                               str(tmp_path / "o")])[0]
    assert starflow.load_data(grey, "all")[0][0].shape == (1, 10, 10)  # read as grey, at the data's size
    assert starflow.load_data(dataclasses.replace(grey, channels=3), "all")[0][0].shape == (3, 10, 10)


def _logged_run(tmp_path, logger, resume=False, steps=4):
    """A tiny common.train run whose evaluation writes a PNG grid, as the model files' evaluations do."""
    cfg = common.TrainConfig(out_dir=str(tmp_path), steps=steps, batch_size=4, warmup=0, log_every=2, eval_every=2,
                             ckpt_every=2, logger=logger)
    lin = torch.nn.Linear(3, 1)
    data = common.ArrayDataset(torch.randn(16, 3), torch.randn(16, 1))

    def evaluate(step, model, ema):
        common.save_png(tmp_path / "samples.png", np.full((4, 6, 3), 40 * step, np.uint8))
        return {"score": float(step) / 10}

    common.train(cfg, lin, lambda net, b, at: ((net(b[0]) - b[1]).square().mean(), {}), data, common.Dist(),
                 resume=str(tmp_path / "ckpt.pt") if resume else None, overwrite=not resume, evaluate=evaluate)
    return [json.loads(s) for s in (tmp_path / "log.jsonl").read_text().splitlines()]


def test_tensorboard_logger_gets_the_jsonl_numbers_and_the_sample_grid(tmp_path):
    need("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    records = _logged_run(tmp_path, "tensorboard")
    acc = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    want = {}
    for r in records:
        for k, v in r.items():
            if k != "step":
                want.setdefault(k, []).append((r["step"], pytest.approx(v, rel=1e-6)))
    assert set(want) == set(acc.Tags()["scalars"]) and {"loss", "score", "lr"} <= set(want)
    for k, pts in want.items():
        assert [(e.step, e.value) for e in acc.Scalars(k)] == pts, k
    assert [e.step for e in acc.Images("samples")] == [2, 4]  # the grid of each evaluation


def test_wandb_logger_sends_the_same_and_resume_continues_the_run(tmp_path, monkeypatch):
    """W&B's API as flowzoo uses it (init / log / Image / finish), recorded by a stand-in module."""
    import types
    calls = []

    class Run:
        def log(self, values, step):
            calls.append(("log", step, values))

        def finish(self):
            calls.append(("finish",))

    def init(**kw):
        calls.append(("init", kw["id"], kw["resume"], kw["config"]["steps"]))
        return Run()

    fake = types.SimpleNamespace(init=init, Image=lambda path: ("image", Path(path).name),
                                 util=types.SimpleNamespace(generate_id=lambda: "run42"))
    monkeypatch.setitem(sys.modules, "wandb", fake)
    records = _logged_run(tmp_path, "wandb")
    assert calls[0] == ("init", "run42", "allow", 4) and calls[-1] == ("finish",)
    numbers = [(c[1], c[2]) for c in calls if c[0] == "log" and "samples" not in c[2]]
    assert numbers == [(r["step"], {k: v for k, v in r.items() if k != "step"}) for r in records]
    assert [(c[1], c[2]) for c in calls if c[0] == "log" and "samples" in c[2]] == \
        [(2, {"samples": ("image", "samples.png")}), (4, {"samples": ("image", "samples.png")})]
    calls.clear()
    _logged_run(tmp_path, "wandb", resume=True, steps=6)
    assert calls[0][:2] == ("init", "run42") and [c[1] for c in calls if c[0] == "log"][0] == 6


def test_no_logger_unless_asked_and_a_missing_package_is_one_line(tmp_path, monkeypatch):
    _logged_run(tmp_path / "plain", "none")
    assert sorted(p.name for p in (tmp_path / "plain").iterdir()) == ["ckpt.pt", "log.jsonl", "samples.png"]
    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.raises(ImportError, match="--logger wandb needs wandb: pip install wandb"):
        _logged_run(tmp_path / "w", "wandb")
    with pytest.raises(ValueError, match="--logger 'tensorbord' is not one of: none, tensorboard, wandb"):
        common.TrainConfig(logger="tensorbord")


def test_fsdp2_bf16_weights_train_on_two_gloo_ranks(tmp_path):
    """--fsdp with --amp: FSDP2's MixedPrecisionPolicy(param_dtype=bf16) on CPU gloo; the sharded weights stay fp32,
    the compute is bf16 (not the fp32 run's numbers), and it learns as the fp32 single-process run does."""
    _run(TINY + [str(tmp_path / "single")])
    _run(TORCHRUN + [str(tmp_path / "bf16"), "--fsdp", "--bf16"])
    a, b = _ckpt(tmp_path / "single"), _ckpt(tmp_path / "bf16")
    assert all(v.dtype == torch.float32 for v in b["model"].values())
    assert max((a["model"][k] - b["model"][k]).abs().max().item() for k in a["model"]) > 1e-3
    loss = {r: [json.loads(s)["loss"] for s in (tmp_path / r / "log.jsonl").read_text().splitlines()]
            for r in ("single", "bf16")}
    assert loss["bf16"][-1] < 0.95 * loss["bf16"][0] and abs(loss["bf16"][-1] / loss["single"][-1] - 1) < 0.01, loss


def test_a_late_rank_checks_the_out_dir_before_rank_0_writes_to_it(tmp_path):
    """Every rank checks that out_dir holds no other run before any writes its log: a rank that starts late under
    FSDP2 (whose wrap waits for no one) must not find rank 0's fresh log.jsonl and refuse the run."""
    _run(TORCHRUN + [str(tmp_path / "run"), "--fsdp", "--steps", "2", "--late_rank", "1"])
    assert _ckpt(tmp_path / "run")["step"] == 2
