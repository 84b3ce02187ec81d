"""Figures: labelled with matplotlib when it is installed, a bare PNG and a one-line note without it; training curves
from any log.jsonl (`common.plot_log`, `python X.py --plot LOG`)."""
import importlib
import json
import sys

import numpy as np
import pytest
import torch

import common
import mogfn
import starflow
import wcfm
from conftest import need


def png(path):
    """(width, height) of a valid PNG with more than one colour."""
    Image = need("PIL.Image")
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert im.format == "PNG"
        assert np.asarray(im.convert("L")).std() > 1  # something is drawn
        return im.size


@pytest.fixture
def no_matplotlib(monkeypatch):
    """Simulate a machine without matplotlib: importing it fails."""
    for name in list(sys.modules):
        if name == "matplotlib" or name.startswith("matplotlib."):
            monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)


def write_log(path):
    rows = [{"step": s, "lr": 1e-3 * min(1, s / 20), "time": s / 10, "skipped": 0, "loss": 5 / s, "grad_norm": 1.0,
             "bpd": 8 - s / 50} for s in range(10, 210, 10)]
    rows += [{"step": s, "fd": 10 / s, "accuracy": s / 200} for s in (100, 200)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_plot_log_draws_every_series_and_the_cli_calls_it(tmp_path, capsys):
    need("matplotlib")
    log = write_log(tmp_path / "log.jsonl")
    out = common.plot_log(log)
    assert out == tmp_path / "log.png"
    assert png(out) == (1200, 560)  # loss, bpd, accuracy, fd, lr: 3 columns x 2 rows of 400 x 280 pixels
    (tmp_path / "log.png").unlink()
    starflow.main(["--plot", str(log)])
    assert "wrote" in capsys.readouterr().out and png(tmp_path / "log.png") == (1200, 560)
    (tmp_path / "bad.jsonl").write_text("{not json\n")
    with pytest.raises(ValueError, match="bad.jsonl is not a JSONL log"):
        common.plot_log(tmp_path / "bad.jsonl")


@pytest.mark.parametrize("name", ["starflow", "starflow_v", "wcfm", "latent_fm", "mogfn", "arflow"])
def test_every_model_file_plots_a_log_instead_of_training(tmp_path, capsys, name):
    need("matplotlib")
    log = write_log(tmp_path / "log.jsonl")
    importlib.import_module(name).main(["--plot", str(log), "--out_dir", str(tmp_path / "run")])
    assert png(tmp_path / "log.png") == (1200, 560) and not (tmp_path / "run").exists()
    assert f"wrote {tmp_path / 'log.png'}" in capsys.readouterr().out


def test_plot_log_puts_a_single_evaluation_in_one_text_panel(tmp_path):
    need("matplotlib")
    log = write_log(tmp_path / "log.jsonl")
    rows = [json.loads(r) for r in log.read_text().splitlines() if "loss" in r] + [{"step": 200, "fd": 2.0, "acc": 0.9}]
    log.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert png(common.plot_log(log)) == (1200, 560)  # loss, bpd, lr and the text panel: 2 rows of 3
    rows[-1] = {"step": 200, "fd": 2.0, "acc": 0.9, "extra": 1.0}
    for r in rows[:-1]:
        r.pop("bpd")
    log.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert png(common.plot_log(log)) == (1200, 280)  # loss, lr, one text panel instead of three flat axes


def test_plot_log_without_matplotlib_says_what_to_install(tmp_path, no_matplotlib):
    with pytest.raises(ImportError, match="pip install matplotlib"):
        common.plot_log(write_log(tmp_path / "log.jsonl"))


def _tiny_mogfn():
    cfg = mogfn.Config(side=8, width=16)
    torch.manual_seed(0)
    return mogfn.build(cfg).eval(), cfg


def _panels():
    g = np.random.default_rng(0)
    metrics = {"w2": 0.3, "w2_floor": 0.2, "npe": 0.1, "nfe_dopri5": 40}
    return {c: {"metrics": metrics, "path": np.cumsum(g.normal(size=(5, 512, 2)), 0)} for c in ("icfm", "wcfm")}


def test_labelled_figures_with_matplotlib(tmp_path, capsys):
    need("matplotlib")
    model, cfg = _tiny_mogfn()
    mogfn.plot_front(tmp_path / "front.png", model.task, model, cfg, {"step": 3, "hv": 0.9, "hv_true": 0.95,
                                                                       "random_hv": 0.8, "l1": 0.5})
    assert png(tmp_path / "front.png") == (550, 550)
    wcfm.comparison_png(tmp_path / "compare.png", _panels())
    assert png(tmp_path / "compare.png") == (800, 440)
    assert "note" not in capsys.readouterr().out


def test_bare_figures_and_a_note_without_matplotlib(tmp_path, capsys, no_matplotlib):
    model, cfg = _tiny_mogfn()
    mogfn.plot_front(tmp_path / "front.png", model.task, model, cfg, {"hv": 0.9})
    assert png(tmp_path / "front.png") == (320, 320)
    wcfm.comparison_png(tmp_path / "compare.png", _panels())
    assert png(tmp_path / "compare.png") == (640, 320)
    notes = [line for line in capsys.readouterr().out.splitlines() if line.startswith("note:")]
    assert len(notes) == 2 and all("pip install matplotlib" in n for n in notes)
