"""The contract every model file keeps (issue: plumbing hardening): bad input gives one line naming the option or file,
no run is clobbered, `from_checkpoint` round-trips, and nothing is written into the current directory."""
import dataclasses

import numpy as np
import pytest
import torch

import common
import mogfn
import starflow
import wcfm

MODELS = {"starflow": starflow, "wcfm": wcfm, "mogfn": mogfn}
TINY = {  # a few seconds of training each, ending with the file's own evaluation
    "starflow": ["--steps", "2", "--width", "16", "--head_dim", "8", "--layers", "1,1", "--batch_size", "16"],
    "wcfm": ["--steps", "2", "--coupling", "wcfm", "--eval_n", "64", "--batch_size", "16", "--width", "16"],
    "mogfn": ["--steps", "2", "--side", "8", "--width", "16", "--n_div", "2", "--eval_n", "8", "--batch_size", "8"],
}


def fails(name, argv, capsys) -> str:
    """Run a model file's main as `python X.py ARGV` would; return its one error line (and check there is one)."""
    with pytest.raises(SystemExit) as e:
        common.run(lambda: MODELS[name].main(argv))
    err = capsys.readouterr().err
    assert e.value.code not in (0, None), err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: ") and len(last) < 700, last
    return last


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Bad files of every kind, and one real (tiny) checkpoint per model file."""
    tmp = tmp_path_factory.mktemp("files")
    f = {"text": tmp / "notes.txt", "floats": tmp / "floats.npz", "file": tmp / "a_file", "corrupt": tmp / "bad.pt",
         "missing": tmp / "missing.pt"}
    f["text"].write_text("not data\n" * 20)
    np.savez(f["floats"], images=np.random.rand(16, 8, 8, 1).astype(np.float32), labels=np.zeros(16, np.int64))
    f["file"].write_text("x")
    f["corrupt"].write_bytes(b"\x00garbage" * 100)
    mp = pytest.MonkeyPatch()
    for name, args in TINY.items():
        out = tmp / f"{name}_run"
        cwd = tmp / f"{name}_cwd"
        cwd.mkdir()
        mp.chdir(cwd)  # the run must write nothing into the current directory
        MODELS[name].main(args + ["--out_dir", str(out)])
        assert not any(cwd.iterdir()), list(cwd.iterdir())
        f[f"{name}_ckpt"] = out / "ckpt.pt"
    mp.undo()
    return {k: str(v) for k, v in f.items()}


COMMON_BAD = [  # every model file
    (["--batch_size", "0"], "--batch_size must be >= 1"), (["--batch_size", "-4"], "--batch_size"),
    (["--steps", "0"], "--steps must be >= 1"), (["--lr", "-1e-3"], "--lr must be > 0"), (["--lr", "inf"], "--lr"),
    (["--log_every", "-1"], "--log_every"), (["--lr_schedule", "cosin"], "--lr_schedule 'cosin' is not one of"),
    (["--device", "cuda"], "--device cuda"), (["--device", "cuda:1"], "--device cuda:1"), (["--device", "gpu"],
                                                                                          "--device 'gpu'"),
    (["--sample", "--n", "0"], "--n must be >= 1"), (["--sample", "--n", "-5"], "--n"),
    (["--sample", "--out", "samples.txt"], "--out samples.txt must end in .npz"),
    (["--sample", "--out", "{file}/s.npz"], "is a file"), (["--out_dir", "{file}/run"], "is a file"),
    (["--resume", "--overwrite"], "--overwrite"), (["--grad_accum", "3", "--batch_size", "16"], "--grad_accum"),
    (["--sample", "--ckpt", "{missing}"], "no checkpoint at {missing}"),
    (["--sample", "--ckpt", "{corrupt}"], "cannot read checkpoint {corrupt}"),
    (["--resume"], "no checkpoint"), (["--seed", "1.5"], "--seed"), (["--widht", "3"], "unrecognized arguments"),
]
BAD = {
    "starflow": [
        (["--sampler", "jacobbi"], "--sampler 'jacobbi'"), (["--guidance_rule", "starflw"], "--guidance_rule"),
        (["--guidance", "nan"], "--guidance must be finite"), (["--guide_what", "c"], "--guide_what"),
        (["--layers", "a,b"], "argument --layers"), (["--layers", "2,0"], "--layers must be >= 1"),
        (["--width", "60"], "--width 60 is not divisible by --head_dim 16"), (["--label_drop", "1.5"], "--label_drop"),
        (["--vae_family", "bogus"], "--vae_family 'bogus' is not one of"), (["--img_size", "7"], "patch_size 2"),
        (["--data", "{text}"], "{text}"), (["--data", "{floats}"], "must be uint8"),
        (["--vae", "{text}", "--vae_family", "sd"], "cannot read VAE weights from {text}"),
        (["--vae", "{missing}", "--vae_family", "sd"], "{missing}"), (["--txt_dim", "8"], "--txt_len"),
        (["--sample", "--ckpt", "{mogfn_ckpt}"], "is a mogfn checkpoint, not starflow"),
        (["--eval", "--ckpt", "{wcfm_ckpt}"], "is a wcfm checkpoint, not starflow"),
    ],
    "wcfm": [
        (["--coupling", "icfm,wcmf"], "--coupling 'wcmf'"), (["--kappa", "0"], "--kappa must be > 0"),
        (["--sampler", "rk5"], "--sampler 'rk5'"), (["--target", "moon"], "--target 'moon'"),
        (["--data", "{floats}"], "--data is read for --target cifar10 (your own images), not --target moons"),
        (["--sample_steps", "0"], "--sample_steps"), (["--guidance", "2"], "--guidance needs a class-conditional"),
        (["--ch_mult", "1,x"], "argument --ch_mult"), (["--p_uncond", "2"], "--p_uncond"),
        (["--target", "cifar10", "--data", "{text}", "--width", "8", "--ch_mult", "1", "--attn_res", "2"],
         "{text}"),
        (["--sample", "--ckpt", "{starflow_ckpt}"], "is a starflow checkpoint, not wcfm"),
    ],
    "mogfn": [
        (["--task", "grid"], "--task 'grid'"), (["--objectives", "branin,curin"], "--objectives 'curin'"),
        (["--alpha", "0"], "--alpha must be > 0"), (["--beta", "nan"], "--beta"), (["--eps", "2"], "--eps"),
        (["--scalar", "tchebycheff"], "--scalar"), (["--min_len", "17"], "--min_len 17 exceeds --max_len"),
        (["--beta_max", "4"], "--beta_max"), (["--sample", "--pref", "0.3,abc"], "argument --pref"),
        (["--sample", "--ckpt", "{mogfn_ckpt}", "--pref", "0.3,0.3"], "not on the simplex"),
        (["--sample", "--ckpt", "{mogfn_ckpt}", "--pref", "0.2,0.3,0.5"], "needs 2 weights"),
        (["--sample", "--ckpt", "{starflow_ckpt}"], "is a starflow checkpoint, not mogfn"),
        (["--lr", "1e38", "--steps", "5", "--side", "8"], "weights became non-finite at step 1; no checkpoint"),
        (["--lr", "1e38", "--warmup", "0", "--steps", "5", "--side", "8"], "optimizer step overflowed at step 1"),
    ],
}
CASES = [(name, argv, want) for name in MODELS for argv, want in COMMON_BAD + BAD[name]]


@pytest.mark.parametrize("name,argv,want", CASES, ids=[f"{n}:{' '.join(a)[:40]}" for n, a, _ in CASES])
def test_bad_input_gives_one_line_naming_the_option_or_file(name, argv, want, files, tmp_path, capsys,
                                                             monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv = [a.format(**files) for a in argv]
    if "--out_dir" not in argv:
        argv += ["--out_dir", str(tmp_path / "run")]
    line = fails(name, argv, capsys)
    assert want.format(**files) in line, line


@pytest.mark.parametrize("name", MODELS)
def test_an_existing_run_is_never_clobbered(name, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "ckpt.pt").write_bytes(b"the checkpoint of an earlier run")
    (out / "log.jsonl").write_text('{"step": 1}\n')
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    line = fails(name, TINY[name] + ["--out_dir", str(out)], capsys)
    assert "--resume" in line and "--overwrite" in line
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # byte-identical, nothing added
    if name == "wcfm":  # the side-by-side run checks every coupling's folder before training any
        (out / "otcfm").mkdir()
        (out / "otcfm" / "log.jsonl").write_text("{}\n")
        line = fails(name, ["--coupling", "icfm,otcfm", "--steps", "2", "--out_dir", str(out)], capsys)
        assert "otcfm" in line and not (out / "icfm").exists()


@pytest.mark.parametrize("name", MODELS)
def test_from_checkpoint_round_trip(name, files):
    path = files[f"{name}_ckpt"]
    state = torch.load(path, weights_only=True)
    assert state["kind"] == name
    model, cfg = MODELS[name].from_checkpoint(path)
    assert dataclasses.asdict(cfg) == {k: tuple(v) if isinstance(v, list) else v for k, v in state["config"].items()}
    weights = {**state["model"], **state.get("ema", {})} if name != "mogfn" else state["model"]
    for k, v in model.state_dict().items():
        assert torch.equal(v, weights[k]), k
    assert not model.training
    runtime = {"starflow": {"guidance": 3.0}, "wcfm": {"sample_steps": 7}, "mogfn": {"top_k": 3}}[name]
    assert dataclasses.asdict(MODELS[name].from_checkpoint(path, **runtime)[1]).items() >= runtime.items()
    with pytest.raises(ValueError, match="another model config: width"):
        MODELS[name].from_checkpoint(path, width=48)


def test_starflow_cli_samples_are_the_api_samples(files, tmp_path, capsys):
    """--sample is `from_checkpoint` + `generate`: the same images for the same seed."""
    out = tmp_path / "s.npz"
    starflow.main(["--sample", "--ckpt", files["starflow_ckpt"], "--n", "12", "--out", str(out), "--guidance", "2"])
    model, cfg = starflow.from_checkpoint(files["starflow_ckpt"], guidance=2.0)
    labels = torch.arange(12) % cfg.num_classes
    imgs, _ = starflow.generate(model, cfg, labels, model.vae, seed=cfg.seed + 1000)
    with np.load(out) as z:
        assert np.array_equal(z["images"], imgs.permute(0, 2, 3, 1).numpy())
        assert np.array_equal(z["labels"], labels.numpy())
    with pytest.raises(SystemExit):  # and a second --sample to the same file is refused
        common.run(lambda: starflow.main(["--sample", "--ckpt", files["starflow_ckpt"], "--out", str(out)]))
    assert "exists; pass --overwrite" in capsys.readouterr().err


def test_sample_takes_every_sampler_option_from_the_cfg_it_is_given():
    cfg = starflow.Config(width=16, head_dim=8, layers=(1, 2), guidance=2.0, sampler="sequential",
                          cond_deep_only=False)
    torch.manual_seed(0)
    model = starflow.STARFlow(cfg, 1, 8).eval()
    with torch.no_grad():
        for p in model.parameters():  # move off the identity init so guidance matters
            p.add_(0.3 * torch.randn_like(p))
    cond = model.make_cond(torch.arange(4))
    z = torch.randn(4, model.T, model.D)
    base, _ = starflow.sample(model, cond, cfg, z=z)
    for change in ({"guidance_rule": "tarflow"}, {"guidance_rule": "tarflow", "guide_what": "a"},
                   {"guidance_anneal": True}, {"guide_all_blocks": True}):
        other = dataclasses.replace(cfg, **change)
        x, _ = starflow.sample(model, cond, other, z=z)  # model.cfg still says the defaults
        assert (x - base).abs().max() > 1e-3, change
        twin = starflow.STARFlow(other, 1, 8).eval()
        twin.load_state_dict(model.state_dict())
        torch.testing.assert_close(x, starflow.sample(twin, cond, other, z=z)[0], rtol=0, atol=1e-6)


def test_log_eval_and_ckpt_every_zero_mean_off(tmp_path):
    out = tmp_path / "run"
    mogfn.main(TINY["mogfn"] + ["--steps", "3", "--log_every", "0", "--eval_every", "0", "--ckpt_every", "0",
                                "--out_dir", str(out)])
    assert torch.load(out / "ckpt.pt", weights_only=True)["step"] == 3  # the final checkpoint only
    lines = (out / "log.jsonl").read_text().splitlines()
    assert len(lines) == 1 and '"hv' in lines[0]  # no training-loss lines, the final evaluation only


@pytest.mark.parametrize("name", ["starflow", "mogfn"])
def test_resume_restores_the_runs_config(name, tmp_path, capsys):
    """`--resume` needs no flag repeated: the model and training fields come back from the checkpoint; --steps
    extends the run; a run at its end, or a changed model field, gives one line."""
    out = str(tmp_path / "run")
    MODELS[name].main(TINY[name] + ["--out_dir", out])
    assert "never reaches --lr" in capsys.readouterr().err  # the tiny run's warmup (100) outlasts its 2 steps
    line = fails(name, ["--resume", "--out_dir", out], capsys)
    assert "is at step 2, the end of its --steps 2: pass a larger --steps" in line
    MODELS[name].main(["--resume", "--out_dir", out, "--steps", "3"])  # no model flag given: all from the checkpoint
    state = torch.load(f"{out}/ckpt.pt", weights_only=True)
    assert state["step"] == 3 and state["config"]["steps"] == 3 and state["config"]["width"] == 16
    assert state["config"]["batch_size"] == int(TINY[name][TINY[name].index("--batch_size") + 1])
    line = fails(name, ["--resume", "--out_dir", out, "--steps", "4", "--width", "32"], capsys)
    assert "width" in line
