"""End-to-end test of the DVC pipeline with the smoke profile, in a temporary copy of the repository.

The copy holds exactly what git would hand a new user (tracked files plus untracked, not ignored ones). The test
switches it to the smoke profile (`python -m tga_zsr.pipeline profile smoke`, committed in the copy), runs plain
`dvc repro` (the data stage makes data/: no other step), and checks:

- every stage ran and wrote what it should (metrics JSONs of the right shape, figures, report, executed notebooks);
- `dvc metrics show` reads the metrics; a second `dvc repro` runs nothing;
- the run is byte-reproducible: once committed, a forced re-run of one stage of each kind leaves `git status` clean
  (dvc.lock and the committed results unchanged), and `verify` says every metric is identical;
- editing one method's option invalidates only that method's stages (and figures/report);
- `dvc exp run -S methods.tga_zsr.alpha=...` re-runs only that method's stages and the figures/report, and
  `dvc exp show` lists it with its parameter and metrics; an invalid `-S` value fails with the same one line as
  `dvc repro`;
- a bad value in params.yaml makes `dvc repro` fail with one message naming the key, keeping the failed notebook.

Timings are printed. Set TGA_ZSR_SMOKE_LIMIT (seconds, default 300) to change the time limit of `dvc repro`.
"""
import json, os, re, shutil, subprocess, sys, time
from pathlib import Path

import pytest
import yaml

from repo_copy import REPO, BIN, run, copy_repo

LIMIT = float(os.environ.get('TGA_ZSR_SMOKE_LIMIT', 300))
TIMES: dict[str, float] = {}


def _commit(repo, msg):
    run(['git', 'add', '-A'], repo)
    run(['git', '-c', 'user.name=test', '-c', 'user.email=test@localhost', '-c', 'commit.gpgsign=false',
         'commit', '-q', '--allow-empty', '-m', msg, '--no-verify'], repo)


@pytest.fixture(scope='module')
def repo(tmp_path_factory):
    t0 = time.time()
    dst = copy_repo(tmp_path_factory.mktemp('pipeline') / 'repo')
    run([sys.executable, '-m', 'tga_zsr.pipeline', 'profile', 'smoke'], dst)
    _commit(dst, 'smoke profile')
    TIMES['copy'] = time.time() - t0
    t0 = time.time()
    r = run(['dvc', 'repro'], dst)
    TIMES['dvc repro'] = time.time() - t0
    (dst / 'repro.log').write_text(r.stdout + r.stderr)
    return dst


@pytest.fixture(scope='module')
def params(repo):
    return yaml.safe_load((repo / 'params.yaml').read_text())


def test_repro_runs_every_stage(repo, params, capsys):
    with capsys.disabled():
        print('\nsmoke pipeline timings: ' + ', '.join(f'{k} {v:.0f}s' for k, v in TIMES.items()))
        log = (repo / 'repro.log').read_text()
        stage_times = re.findall(r'stage (\S+): done in ([\d.]+)s', log)
        print('  per stage: ' + ', '.join(f'{s} {t}s' for s, t in stage_times))
    methods = list(params['methods'])
    assert len(stage_times) == 4 + 2 * len(methods)
    assert TIMES['dvc repro'] <= LIMIT, f"dvc repro took {TIMES['dvc repro']:.0f}s (limit {LIMIT:.0f}s)"
    nbs = repo / 'results' / 'notebooks'
    for stage in ('data', 'pretrain', 'figures', 'report'): assert (nbs / f'{stage}.ipynb').is_file(), stage
    for m in methods:
        assert (nbs / 'finetune' / f'{m}.ipynb').is_file() and (nbs / 'evaluate' / f'{m}.ipynb').is_file(), m
        assert (repo / 'models' / m / 'model.safetensors').is_file(), m
        assert (repo / 'results' / 'curves' / f'{m}.tsv').read_text().startswith('step\t'), m
    assert (repo / 'models' / 'pretrained.safetensors').is_file()


def test_metrics_have_the_paper_shape(repo, params):
    datasets = params['evaluate']['datasets']
    for m in params['methods']:
        files = sorted((repo / 'results' / 'metrics' / m).glob('*.json'))
        assert [f.name for f in files] == [f'{m}_pgd.json'], files
        r = json.loads(files[0].read_text())
        assert r['method'] == m and r['attack'] == {'name': 'pgd', 'norm': 'linf', 'eps': 1.0, 'steps': 2, 'step_size': 1.0}
        for kind in ('clean', 'robust'):
            assert sorted(r[kind]) == sorted(datasets + ['avg'])
            assert all(0 <= v <= 100 for v in r[kind].values())
            assert abs(r[kind]['avg'] - sum(r[kind][d] for d in datasets) / len(datasets)) < 1e-3
        assert r['n'] == {d: params['evaluate']['max_images'] for d in datasets}
    shift = json.loads((repo / 'results' / 'eval' / 'tga_zsr' / 'attention.json').read_text())
    assert set(shift) == set(params['evaluate']['attention']['datasets'])
    assert {'adv_vs_clean', 'adv_vs_original', 'energy', 'pointing'} <= set(shift['shapes'])


def test_figures_and_report(repo, params):
    figs = repo / 'results' / 'figures'
    for name in ('tradeoff', 'per_dataset', 'attention_grid', 'attention_stats', 'training_curves'):
        assert (figs / f'{name}.png').read_bytes()[:4] == b'\x89PNG', name
    report = (repo / 'results' / 'report.md').read_text()
    from tga_zsr.reporting import method_title
    for m in params['methods']: assert report.count(f'| {method_title(m)} |') >= 3, m   # robust, clean, attention tables
    datasets = params['evaluate']['datasets']
    assert f"| Method | {' | '.join(datasets)} | Average |" in report   # the columns in params.yaml's order
    for f in ('figures/tradeoff.png', 'figures/attention_grid.png', 'data/samples.png'): assert f'({f})' in report, f
    reading = report.split('## Reading', 1)[-1].split('\n## ', 1)[0]
    assert '## Reading' in report
    # the smoke models are near chance, so several may tie for the top: either sentence names the winner(s)
    assert re.search(r'most robust method is|methods share the highest average robust accuracy|highest average robust accuracy is', reading), reading


def test_dvc_metrics_show(repo, params):
    out = json.loads(run(['dvc', 'metrics', 'show', '--json'], repo).stdout)
    files = {Path(p).name for rev in out.values() for p in rev['data']}
    assert files == {f'{m}_pgd.json' for m in params['methods']}


def test_second_repro_is_a_no_op(repo):
    t0 = time.time()
    r = run(['dvc', 'repro'], repo)
    TIMES['second dvc repro'] = time.time() - t0
    assert 'Running stage' not in r.stdout + r.stderr, r.stdout
    assert 'up to date' in run(['dvc', 'status'], repo).stdout


def test_rerun_is_byte_identical(repo):
    "Commit the run, force one stage of each kind again: dvc.lock and the committed results keep their bytes."
    _commit(repo, 'smoke run')
    t0 = time.time()
    stages = ['data', 'pretrain', 'finetune@tga_zsr', 'evaluate@tga_zsr', 'figures', 'report']
    run(['dvc', 'repro', '--force', '--single-item', *stages], repo)
    TIMES[f'forced re-run of {len(stages)} stages'] = time.time() - t0
    assert run(['git', 'status', '--porcelain'], repo).stdout == '', run(['git', 'diff', '--stat'], repo).stdout
    r = run([sys.executable, '-m', 'tga_zsr.pipeline', 'verify'], repo)
    assert re.search(r'verify: (\d+) of \1 metrics reproduce the published run \(HEAD\) within ±1 points \(\1 identical, '
                     r"0 within, 0 outside, 0 missing\); dvc.lock unchanged: every output has the published run's bytes",
                     r.stdout), r.stdout


def _edit_params(repo, edit):
    path = repo / 'params.yaml'; old = path.read_text()
    P = yaml.safe_load(old); edit(P)
    path.write_text(yaml.safe_dump(P, sort_keys=False))
    return old


def test_one_method_change_invalidates_only_its_stages(repo):
    old = _edit_params(repo, lambda P: P['methods']['tga_zsr'].update(alpha=0.5))
    try:
        status = json.loads(run(['dvc', 'status', '--json'], repo).stdout)
        assert set(status) == {'finetune@tga_zsr', 'figures', 'report'}, status
    finally:
        (repo / 'params.yaml').write_text(old)
    assert 'up to date' in run(['dvc', 'status'], repo).stdout


def test_experiment_reruns_only_its_method(repo):
    "`dvc exp run -S` on one method: only its stages and figures/report run; `dvc exp show` lists it; the tree goes back."
    t0 = time.time()
    r = run(['dvc', 'exp', 'run', '-n', 'alpha-half', '-S', 'methods.tga_zsr.alpha=0.5'], repo)
    TIMES['dvc exp run'] = time.time() - t0
    ran = re.findall(r"Running stage '([^']+)'", r.stdout + r.stderr)
    assert sorted(ran) == ['evaluate@tga_zsr', 'figures', 'finetune@tga_zsr', 'report'], ran
    rows = json.loads(run(['dvc', 'exp', 'show', '--json'], repo).stdout)
    exps = [e for row in rows for e in (row.get('experiments') or []) for e in (e.get('revs') or [])]
    exp = next(e for e in exps if e.get('name') == 'alpha-half')
    data = exp['data']
    assert data['params']['params.yaml']['data']['methods']['tga_zsr']['alpha'] == 0.5
    assert 'results/metrics/tga_zsr/tga_zsr_pgd.json' in data['metrics'], sorted(data['metrics'])
    run(['git', 'checkout', '--', '.'], repo); run(['dvc', 'checkout'], repo)      # back to the committed run
    assert 'up to date' in run(['dvc', 'status'], repo).stdout


def test_invalid_experiment_value_is_one_line(repo):
    "An invalid `dvc exp run -S` value fails that experiment with the line `dvc repro` prints for it."
    r = run(['dvc', 'exp', 'run', '-S', 'methods.tga_zsr.alpha=-1'], repo, check=False)
    try:
        assert r.returncode != 0
        err_lines = [l for l in (r.stdout + r.stderr).splitlines() if l.startswith('error: ')]
        assert len(err_lines) == 1 and 'params.yaml: methods.tga_zsr.alpha must be >= 0' in err_lines[0], r.stdout[-2000:] + r.stderr[-2000:]
    finally:
        run(['git', 'checkout', '--', '.'], repo); run(['dvc', 'checkout', '--force'], repo)   # the failed stage's notebook too
    assert 'up to date' in run(['dvc', 'status'], repo).stdout


@pytest.mark.parametrize('edit, stage, message', [
    (lambda P: P['evaluate']['attacks'][0].update(eps=-1), 'evaluate/',
     'params.yaml: evaluate.attacks[0].eps must be >= 0 (in 1/255 units), got -1'),
    (lambda P: P['methods'].update(bogus={}), 'finetune/bogus', 'params.yaml: methods.bogus is not a known method'),
])
def test_bad_params_fail_with_one_clear_message(repo, edit, stage, message):
    old = _edit_params(repo, edit)
    try:
        t0 = time.time()
        r = run(['dvc', 'repro'], repo, check=False)
        TIMES[f'failing repro ({stage})'] = time.time() - t0
        assert r.returncode != 0
        err_lines = [l for l in (r.stdout + r.stderr).splitlines() if l.startswith('error: ')]
        assert len(err_lines) == 1 and message in err_lines[0], r.stdout[-2000:] + r.stderr[-2000:]
        kept = Path(re.search(r'executed notebook kept at (\S+)\)', err_lines[0]).group(1))
        assert f'results/notebooks/{stage}' in str(kept), kept
        assert kept.is_file() and 'TGAZSRError' in kept.read_text()
        assert 'Running stage \'figures\'' not in r.stdout   # nothing downstream ran
    finally:
        (repo / 'params.yaml').write_text(old)
