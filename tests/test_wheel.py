"""The built wheel installs into an empty virtualenv with only its runtime dependencies and works outside the repository.

Slow (about 3 minutes and 6 GB: torch and the other runtime requirements are installed afresh), so `make test` leaves it
out (`-m "not slow"`); `make test-wheel` runs it. Checks: `import tga_zsr` resolves to the new virtualenv, not the
repository; `tga-zsr --help`; one small attack and text-guided attention call on a registered architecture; the class
names shipped as package data (`tga_zsr/assets/`).
"""
import os, subprocess, sys, textwrap
from pathlib import Path

import pytest

from repo_copy import copy_repo, run

SNIPPET = textwrap.dedent("""
    import torch, tga_zsr
    from tga_zsr.models import load_clip, classifier_weights, ZeroShotClassifier
    from tga_zsr.attacks import pgd
    from tga_zsr.attention import text_guided_attention
    from tga_zsr.datasets import TINYIMAGENET_WNID_NAMES, IMAGENET_WNID_NAMES
    torch.manual_seed(0)
    clip = load_clip('tga-tiny')
    clf = ZeroShotClassifier(clip, classifier_weights(clip, ['cat', 'dog', 'bird']))
    x, y = torch.rand(2, 3, 16, 16), torch.tensor([0, 2])
    adv = pgd(clf, x, y, eps=4 / 255, alpha=1 / 255, steps=2)
    logits, tokens = clf.forward_with_tokens(adv)
    att = text_guided_attention(tokens, clf.weights[y], 16)
    assert att.shape == (2, 16, 16) and float((adv - x).abs().max()) <= 4 / 255 + 1e-6
    assert len(TINYIMAGENET_WNID_NAMES) == 200 and len(IMAGENET_WNID_NAMES) == 1000
    print(tga_zsr.__file__)
""")


@pytest.mark.slow
def test_wheel_installs_and_works_outside_the_repository(tmp_path):
    src = copy_repo(tmp_path / 'src')
    run([sys.executable, '-m', 'pip', 'wheel', '--no-deps', '-q', '-w', str(tmp_path / 'dist'), str(src)], tmp_path)
    wheel, = (tmp_path / 'dist').glob('tga_zsr-*.whl')
    venv = tmp_path / 'venv'
    base = getattr(sys, '_base_executable', sys.executable)   # a clean interpreter, not this virtualenv's
    run([base, '-m', 'venv', str(venv)], tmp_path)
    py = venv / 'bin' / 'python'
    run([str(py), '-m', 'pip', 'install', '-q', str(wheel)], tmp_path)   # runtime requirements only
    outside = tmp_path / 'elsewhere'; outside.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ('PYTHONPATH', 'VIRTUAL_ENV')}
    env['PATH'] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    r = subprocess.run([str(py), '-c', SNIPPET], cwd=outside, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    assert str(venv) in r.stdout, r.stdout            # the installed package, not the repository's
    r = subprocess.run([str(venv / 'bin' / 'tga-zsr'), '--help'], cwd=outside, env=env, capture_output=True, text=True)
    assert r.returncode == 0 and 'prepare-data' in r.stdout, r.stdout + r.stderr
