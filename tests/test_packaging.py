"""Packaging: the wheel installs the files as the `flowzoo` package, so a user's own `common.py` never shadows ours,
and the installed files sample exactly as the repository's top-level files do."""
import json
import shutil
import subprocess
import sys

import torch

import starflow
import wcfm
from conftest import ROOT

USER_CODE = r"""
import json, sys
import common  # the user's own module, first on the path: it must stay theirs
assert common.MINE, "a user's common.py was replaced"
import torch
from flowzoo import starflow, wcfm
assert starflow.common.__name__ == "flowzoo.common" and starflow.__file__.startswith(sys.argv[1]), starflow.__file__
torch.manual_seed(0)
cfg = starflow.Config(width=16, head_dim=8, layers=(1, 1), denoise=False)
m = starflow.STARFlow(cfg, *starflow.latent_shape(cfg)).eval()
x, _ = starflow.sample(m, m.make_cond(torch.arange(3)), cfg, generator=torch.Generator().manual_seed(1))
torch.manual_seed(0)
wc = wcfm.Config(sampler="euler", sample_steps=4)
net = wcfm.build(wc)
y = wcfm.generate(net, wc, torch.ones(5, 2)).x
print(json.dumps({"starflow": x.flatten().tolist(), "wcfm": y.flatten().tolist()}))
"""


def test_wheel_installs_the_flowzoo_package_beside_a_users_common(tmp_path):
    src = tmp_path / "src"  # only what the wheel is built from: the top-level files, pyproject, README
    src.mkdir()
    for f in [*ROOT.glob("*.py"), ROOT / "pyproject.toml", ROOT / "README.md"]:
        shutil.copy(f, src)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run(pip + ["wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "dist"), str(src)],
                   check=True, capture_output=True, cwd=tmp_path)
    wheel, = (tmp_path / "dist").glob("flowzoo-*.whl")
    site = tmp_path / "site"
    subprocess.run(pip + ["install", "--no-deps", "--target", str(site), str(wheel)], check=True, capture_output=True)
    assert sorted(p.name for p in (site / "flowzoo").glob("*.py")) == sorted(p.name for p in ROOT.glob("*.py"))
    assert not (site / "common.py").exists()  # nothing top-level to collide with

    user = tmp_path / "project"
    user.mkdir()
    (user / "common.py").write_text("MINE = True\n")
    r = subprocess.run([sys.executable, "-c", USER_CODE, str(site)], capture_output=True, text=True, cwd=user,
                       env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"}, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])

    torch.manual_seed(0)  # the same calls on the repository's top-level files
    cfg = starflow.Config(width=16, head_dim=8, layers=(1, 1), denoise=False)
    m = starflow.STARFlow(cfg, *starflow.latent_shape(cfg)).eval()
    x, _ = starflow.sample(m, m.make_cond(torch.arange(3)), cfg, generator=torch.Generator().manual_seed(1))
    torch.manual_seed(0)
    wc = wcfm.Config(sampler="euler", sample_steps=4)
    y = wcfm.generate(wcfm.build(wc), wc, torch.ones(5, 2)).x
    assert torch.allclose(torch.tensor(got["starflow"]), x.flatten(), atol=1e-5)
    assert torch.allclose(torch.tensor(got["wcfm"]), y.flatten(), atol=1e-5)
    assert x.std() > 0.1 and y.std() > 0.01  # real samples, not constants
