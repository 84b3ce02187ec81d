"""common.py's Inception FID against torch-fidelity 0.4.0 (the same network, resize and statistics), offline: randomly
initialised Inception weights saved in the released file's layout (a plain state dict) stand in for the real ones."""
import importlib
import importlib.util
import sys
import types

import numpy as np
import pytest
import torch

import common
from conftest import need


def _random_weights(path, seed):
    """A randomly initialised FID Inception saved as the released weights file is (torchvision Inception3 key names):
    He-scaled convs and perturbed BatchNorm statistics keep the 2048-d features of order one."""
    torch.manual_seed(seed)
    net = common.FIDInception()
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.Conv2d):
                m.weight.normal_(0, (2 / m.weight[0].numel()) ** 0.5)
            elif isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5), m.bias.normal_(0, 0.1)
                m.running_mean.normal_(0, 0.1), m.running_var.uniform_(0.5, 1.5)
    torch.save(net.state_dict(), path)
    return str(path)


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    return _random_weights(tmp_path_factory.mktemp("fid") / "weights-inception-random.pth", seed=0)


@pytest.fixture(scope="module")
def tfid():
    """torch_fidelity, imported. Its package imports torchvision for other extractors; where no torchvision can import
    beside this torch (CPU torch with PyPI's CUDA torchvision), the names its imports ask for are stubbed for the
    duration of this module. Its Inception path uses none of them."""
    if importlib.util.find_spec("torch_fidelity") is None:
        need("torch_fidelity")  # skips here, fails in CI
    before = set(sys.modules)
    try:
        import torchvision  # noqa: F401
    except Exception:
        for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
            del sys.modules[name]
        tv = {n: types.ModuleType(n) for n in ("torchvision", "torchvision.datasets", "torchvision.transforms",
                                                "torchvision.transforms.functional", "torchvision.models")}
        for n, m in tv.items():
            sys.modules[n] = m
            if "." in n:
                setattr(tv[n.rsplit(".", 1)[0]], n.rsplit(".", 1)[1], m)
        for n in ("CIFAR10", "CIFAR100", "STL10"):
            setattr(tv["torchvision.datasets"], n, type(n, (), {}))
    tf = importlib.import_module("torch_fidelity")
    importlib.import_module("torch_fidelity.metric_fid")
    yield tf
    for name in set(sys.modules) - before:
        del sys.modules[name]


def _images(seed, n, size=32):
    """uint8 (n, 3, size, size): smooth random colour fields with noise, every image different."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, 4, 4, generator=g)
    x = torch.nn.functional.interpolate(low, size=size, mode="bilinear") * 200 + torch.rand(n, 3, size, size,
                                                                                            generator=g) * 55
    return x.round().clamp(0, 255).to(torch.uint8)


@pytest.fixture(scope="module")
def sets(tfid, weights):
    """Generated and reference images (the reference at another size: both go to 299), and torch-fidelity's features
    of each with the same weights."""
    gen = _images(1, 4)
    gen[1] = gen[1, :1]  # a grey image: R = G = B
    ref = _images(2, 4, size=40)
    fe = tfid.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=weights)
    return gen, ref, fe(gen)[0], fe(ref)[0]


def test_features_equal_torch_fidelity(weights, sets):
    gen, _, ref, _ = sets  # ref: torch-fidelity's features of gen, (4, 2048)
    assert ref.shape == (4, 2048) and 0.1 < ref.abs().mean() < 100  # order-one features: a comparison that bites
    ours = common.fid_features(gen.permute(0, 2, 3, 1).numpy(), weights, batch_size=3)  # NHWC numpy, 2 batches
    assert torch.equal(ours, ref)  # bit-exact on CPU
    grey = common.fid_features(gen[1:2, :1], weights)  # one channel, repeated to RGB
    assert torch.equal(grey[0], ref[1])
    as_float = common.fid_features(common.to_float(gen[:1]), weights)  # [-1, 1] floats go through to_uint8
    assert torch.equal(as_float[0], ref[0])


def test_fid_equals_torch_fidelity(weights, sets, tmp_path):
    from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_features_to_statistics, fid_statistics_to_metric
    gen, ref, f_gen, f_ref = sets
    st_gen, st_ref = fid_features_to_statistics(f_gen), fid_features_to_statistics(f_ref)
    expected = fid_statistics_to_metric(st_gen, st_ref, verbose=False)[KEY_METRIC_FID]
    npz = tmp_path / "ref.npz"  # the samples' format: images uint8 (N, H, W, C)
    np.savez(npz, images=ref.permute(0, 2, 3, 1).numpy())
    got = common.fid(gen, str(npz), weights)
    assert expected > 1 and abs(got - expected) <= 1e-5 * expected, (got, expected)  # measured 6e-7
    saved = np.load(tmp_path / "ref.npz.fid_stats.npz")  # pytorch-fid's stats layout, with the package's numbers
    assert saved["mu"].shape == (2048,) and saved["sigma"].shape == (2048, 2048) and int(saved["n"]) == 4
    np.testing.assert_allclose(saved["mu"], st_ref["mu"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(saved["sigma"], st_ref["sigma"], rtol=1e-5, atol=1e-6)
    # and statistics the package computed, in that layout, are read back as --fid_ref as they are
    np.savez(tmp_path / "tf_stats.npz", **st_ref)
    back = common.fid_stats(str(tmp_path / "tf_stats.npz"), "")  # no weights needed to read statistics
    assert np.array_equal(back["mu"], st_ref["mu"]) and np.array_equal(back["sigma"], st_ref["sigma"])


def test_fid_ref_folder_saved_once(weights, tmp_path):
    Image = need("PIL.Image")
    folder = tmp_path / "ref"
    (folder / "a").mkdir(parents=True)
    imgs = [_images(3, 2, size=24), _images(4, 1, size=40)]  # two sizes: batched by size
    for i, x in enumerate(imgs[0]):
        Image.fromarray(x.permute(1, 2, 0).numpy()).save(folder / "a" / f"{i}.png")
    Image.fromarray(imgs[1][0].permute(1, 2, 0).numpy()).save(folder / "b.png")
    stats = common.fid_stats(str(folder), weights)
    feats = torch.cat([common.fid_features(imgs[0], weights), common.fid_features(imgs[1], weights)])
    mu, sigma = common.moments(feats)  # a/0.png, a/1.png, b.png: sorted order
    np.testing.assert_allclose(stats["mu"], mu.numpy(), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(stats["sigma"], sigma.numpy(), rtol=1e-6, atol=1e-7)
    saved = tmp_path / "ref.fid_stats.npz"
    assert saved.is_file() and str(np.load(saved)["weights"]) == common.fid_inception(weights)[1]

    for f in folder.rglob("*.png"):  # other images: the saved statistics are read, not recomputed
        Image.fromarray(np.zeros((24, 24, 3), np.uint8)).save(f)
    again = common.fid_stats(str(folder), weights)
    assert np.array_equal(again["mu"], stats["mu"]) and np.array_equal(again["sigma"], stats["sigma"])
    direct = common.fid_stats(str(saved), weights)  # the saved file itself as --fid_ref
    assert np.array_equal(direct["mu"], stats["mu"])
    other = _random_weights(tmp_path / "other.pth", seed=1)  # other weights: recomputed (now on the zero images)
    assert not np.allclose(common.fid_stats(str(folder), other)["mu"], stats["mu"])
    assert str(np.load(saved)["weights"]) == common.fid_inception(other)[1]


def test_fid_errors_are_one_line(weights, tmp_path, monkeypatch):
    x = torch.zeros(2, 3, 8, 8, dtype=torch.uint8)

    def err(fn, *args, **kwargs):
        with pytest.raises(ValueError) as e:
            fn(*args, **kwargs)
        assert "\n" not in str(e.value)
        return str(e.value)
    assert "needs --fid_weights, a local copy of pt_inception-2015-12-05" in err(common.fid, x, "r.npz", "")
    assert "no file at --fid_weights nope.pth" in err(common.fid, x, "r.npz", "nope.pth")
    assert "--fid_ref needs --fid_weights" in err(common.TrainConfig, fid_ref="ref.npz")
    (tmp_path / "text.pth").write_text("not weights")
    assert "cannot read Inception weights" in err(common.fid, x, "r.npz", str(tmp_path / "text.pth"))
    sd = torch.load(weights, weights_only=True)
    sd["fc.weight"] = sd["fc.weight"][:1000]  # torchvision's ImageNet Inception is another network
    torch.save({k: v for k, v in sd.items() if not k.startswith("Mixed_7c")}, tmp_path / "tv.pth")
    assert "do not match the architecture: missing Mixed_7c" in err(common.fid, x, "r.npz", str(tmp_path / "tv.pth"))
    assert "needs --fid_ref" in err(common.fid, x, "", weights)
    assert "no such image folder or .npz" in err(common.fid, x, str(tmp_path / "none"), weights)
    np.savez(tmp_path / "bad.npz", mu=np.zeros(64), sigma=np.eye(64))  # digits-classifier sized statistics
    assert "not the (2048,) and (2048, 2048)" in err(common.fid, x, str(tmp_path / "bad.npz"), weights)
    np.savez(tmp_path / "labels.npz", labels=np.zeros(3))
    assert "neither mu/sigma statistics nor images" in err(common.fid, x, str(tmp_path / "labels.npz"), weights)
    assert "with C = 1 or 3, got (2, 5, 8, 8)" in err(common.fid_features, torch.zeros(2, 5, 8, 8), weights)
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "a.png").write_bytes(b"")
    monkeypatch.setitem(sys.modules, "PIL.Image", None)  # as if Pillow were not installed
    with pytest.raises(ImportError, match="an image folder as --fid_ref needs Pillow: pip install Pillow"):
        common.fid(x, str(tmp_path / "imgs"), weights)


def test_starflow_eval_reports_the_fid_of_its_own_samples(weights, tmp_path):
    """--eval with --fid_ref: the FID of fid_n samples from the held-out conditions, against the reference."""
    import starflow as sf
    ref = tmp_path / "ref.npz"
    np.savez(ref, images=_images(3, 6, size=8).permute(0, 2, 3, 1).numpy())
    cfg = sf.Config(width=32, head_dim=8, layers=(1, 1), patch_size=2, num_classes=0, guidance=0.0, denoise=False,
                    fid_ref=str(ref), fid_weights=weights, fid_n=5)
    torch.manual_seed(0)
    model = sf.STARFlow(cfg, *sf.latent_shape(cfg))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    out = sf.evaluate(model, cfg, None, common.Dist())
    imgs, _ = sf.generate(model.eval(), cfg, torch.zeros(5, dtype=torch.long), None, cfg.seed + 11)
    assert out["fid_n"] == 5 and out["fid"] == pytest.approx(common.fid(imgs, str(ref), weights), rel=1e-9)
    assert out["fid"] > 0 and np.isfinite(out["bpd"])


def test_wcfm_eval_reports_the_fid_of_its_own_samples(weights, tmp_path):
    import wcfm
    ref = tmp_path / "ref.npz"
    np.savez(ref, images=_images(4, 6, size=8)[:, :1].permute(0, 2, 3, 1).numpy())  # grey, as the digits
    cfg = wcfm.Config(**{**wcfm.PRESETS["digits"], "num_classes": 0, "eval_n": 4, "fid_n": 6, "sample_steps": 2,
                         "fid_ref": str(ref), "fid_weights": weights})
    torch.manual_seed(0)
    model = wcfm.build(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    out = wcfm.evaluate(model, cfg, str(tmp_path))
    x0, _ = wcfm.draw_source(cfg, model.shape, 6, cfg.seed + 12, "cpu")
    imgs = torch.cat([wcfm.generate(model, cfg, xb).x for xb in x0.split(4)])
    assert out["fid_n"] == 6 and out["fid"] == pytest.approx(common.fid(imgs.clamp(-1, 1), str(ref), weights), rel=1e-9)


def test_arflow_eval_reports_the_fid_of_its_own_samples(weights, tmp_path):
    """On data other than the digits, --eval names its loss train_loss (nothing is held out) and adds the FID."""
    import arflow as af
    imgs = _images(5, 10, size=4)[:, :1]  # (10, 1, 4, 4) uint8 in two classes
    np.savez(tmp_path / "data.npz", images=imgs.permute(0, 2, 3, 1).numpy(), labels=np.arange(10) % 2)
    ref = tmp_path / "ref.npz"
    np.savez(ref, images=_images(6, 6, size=8).permute(0, 2, 3, 1).numpy())
    cfg = af.Config(data=str(tmp_path / "data.npz"), width=32, heads=4, depth=2, img_size=4, channels=1, patch_size=2,
                    num_classes=2, seq_len=3, batch_size=4, sample_steps=3, guidance=1.5, fid_ref=str(ref),
                    fid_weights=weights, fid_n=4)
    torch.manual_seed(0)
    model = af.ARFlow(cfg, cfg.channels, cfg.img_size)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    out = af.evaluate(model, cfg, None, common.Dist())
    own = af.generate(model.eval(), cfg, torch.arange(4) % 2, None, cfg.seed + 11)
    assert "val_loss" not in out and np.isfinite(out["train_loss"])
    assert out["fid_n"] == 4 and out["fid"] == pytest.approx(common.fid(own, str(ref), weights), rel=1e-9)


def test_latent_fm_eval_reports_the_fid_of_its_own_samples(weights, tmp_path):
    import latent_fm as lf
    ref = tmp_path / "ref.npz"
    np.savez(ref, images=_images(5, 6, size=8)[:, :1].permute(0, 2, 3, 1).numpy())  # grey, as the digits
    cfg = lf.Config(img_size=8, vae_family="none", width=32, depth=1, heads=2, sampler="euler", sample_steps=2,
                    guidance=1.5, eval_n=10, fid_n=6, fid_ref=str(ref), fid_weights=weights)
    torch.manual_seed(0)
    vae = lf.load_vae(cfg)
    model = lf.build(cfg, vae)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    out = lf.evaluate(model, cfg, vae, seed=7)
    imgs, _ = lf.generate(model.eval(), cfg, vae, 6, torch.arange(6) % 10, seed=11)  # evaluate's seed + 4
    assert out["fid_n"] == 6 and out["fid"] == pytest.approx(common.fid(imgs, str(ref), weights), rel=1e-9)
    assert out["fid"] > 0 and np.isfinite(out["lfm_loss"])
