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

Timings are printed and appended to the git-ignored `logs/test_times.tsv`; no test asserts how long anything took (a busy
machine must not turn a build red: speed is measured by `make bench`, which prints ratios).
"""
import json, os, re, shutil, subprocess, sys, time
from pathlib import Path

import pytest
import yaml

from repo_copy import REPO, BIN, run, copy_repo

TIMES: dict[str, float] = {}


def _log_times(times: dict[str, float]) -> None:
    "Append the timings to the git-ignored logs/test_times.tsv (best effort: a timing log never fails a test)."
    try:
        f = REPO / 'logs' / 'test_times.tsv'; f.parent.mkdir(exist_ok=True)
        new = not f.is_file()
        with open(f, 'a') as fh:
            if new: fh.write('date\ttest\tseconds\n')
            for k, v in times.items(): fh.write(f"{time.strftime('%Y-%m-%dT%H:%M:%S')}\tsmoke: {k}\t{v:.1f}\n")
    except OSError: pass


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
    _log_times(TIMES)
    methods, seeds = list(params['methods']), params['seeds']
    assert len(seeds) >= 2
    assert len(stage_times) == 4 + 2 * len(methods) * len(seeds) + len(methods)   # + a checks stage per method
    nbs = repo / 'results' / 'notebooks'
    for stage in ('data', 'pretrain', 'figures', 'report'): assert (nbs / f'{stage}.ipynb').is_file(), stage
    for m in methods:
        assert (nbs / 'checks' / f'{m}.ipynb').is_file(), m
        for s in seeds:
            assert (nbs / 'finetune' / f'{m}-{s}.ipynb').is_file() and (nbs / 'evaluate' / f'{m}-{s}.ipynb').is_file(), (m, s)
            assert (repo / 'models' / f'{m}-{s}' / 'model.safetensors').is_file(), (m, s)
            assert (repo / 'results' / 'curves' / f'{m}-{s}.tsv').read_text().startswith('step\t'), (m, s)
    assert (repo / 'models' / 'pretrained.safetensors').is_file()


def _attacks_of(params, seed):
    "The attacks a seed's models are evaluated under, with the images per dataset each runs on."
    ev = params['evaluate']
    return [(a['name'], a.get('max_images') or ev['max_images']) for a in ev['attacks'] if seed in a.get('seeds', [seed])]


def test_metrics_have_the_paper_shape(repo, params):
    datasets = params['evaluate']['datasets']
    for m in params['methods']:
        for s in params['seeds']:
            files = sorted((repo / 'results' / 'metrics' / f'{m}-{s}').glob('*.json'))
            attacks = _attacks_of(params, s)
            assert [f.name for f in files] == sorted(f'{m}_{a}.json' for a, _ in attacks), files
            for name, n in attacks:
                r = json.loads((repo / 'results' / 'metrics' / f'{m}-{s}' / f'{m}_{name}.json').read_text())
                assert r['method'] == m and r['seed'] == s and r['attack']['name'] == name
                for kind in ('clean', 'robust'):
                    assert sorted(r[kind]) == sorted(datasets + ['avg'])
                    assert all(0 <= v <= 100 for v in r[kind].values())
                    assert abs(r[kind]['avg'] - sum(r[kind][d] for d in datasets) / len(datasets)) < 1e-3
                assert r['n'] == {d: n for d in datasets}, (name, r['n'])
    first = params['seeds'][0]
    for norm_file in ('attention.json', 'attention_other.json'):
        shift = json.loads((repo / 'results' / 'eval' / f'tga_zsr-{first}' / norm_file).read_text())
        assert set(shift) == set(params['evaluate']['attention']['datasets'])
        assert {'adv_vs_clean', 'adv_vs_original', 'energy', 'pointing', 'pointing_inverse', 'chance'} <= set(shift['shapes'])
    assert not (repo / 'results' / 'eval' / f"tga_zsr-{params['seeds'][1]}" / 'attention.json').exists()   # first seed only


def test_summary_has_seeds_intervals_attacks_and_checklist(repo, params):
    "results/summary.json: the seeds, mean ± std per method and attack, differences with 95 % intervals, the checklist."
    S = json.loads((repo / 'results' / 'summary.json').read_text())
    assert S['seeds'] == params['seeds'] and set(S['methods']) == set(params['methods'])
    from tga_zsr.reporting import attack_label
    labels = [attack_label(a) for a in params['evaluate']['attacks']]
    for m, v in S['methods'].items():
        assert set(v['clean']) == {'mean', 'std'} and set(v['robust']) == set(labels), (m, v)
    assert {d['attack'] for d in S['differences']} == set(labels) | {'clean'}
    for d in S['differences']:
        lo, hi = d['ci95']
        assert lo <= d['mean'] <= hi and d['a'] != d['b'], d
    assert any(d['a'] == 'tga_zsr' for d in S['differences'])
    checks = ['monotone_eps', 'large_eps_near_zero', 'more_steps_no_gain', 'apgd_le_pgd', 'blackbox_not_stronger', 'transfer_weaker']
    assert set(S['checks']) == set(params['methods'])
    for m, c in S['checks'].items():
        want = [k for k in checks if not (m == params['checks']['transfer_source'] and k == 'transfer_weaker')]
        assert sorted(c) == sorted(want) and all(isinstance(v, bool) for v in c.values()), (m, c)


def test_figures_and_report(repo, params):
    figs = repo / 'results' / 'figures'
    for name in ('tradeoff', 'per_dataset', 'attention_grid', 'attention_stats', 'training_curves', 'eps_sweep'):
        assert (figs / f'{name}.png').read_bytes()[:4] == b'\x89PNG', name
    report = (repo / 'results' / 'report.md').read_text()
    from tga_zsr.reporting import method_title
    for m in params['methods']: assert report.count(f'| {method_title(m)} |') >= 3, m   # robust, clean, attention tables
    for section in ('Mean ± std over seeds', 'Differences between methods', 'Gradient-masking checklist'):
        assert section in report, section
    datasets = params['evaluate']['datasets']
    assert f"| Method | {' | '.join(datasets)} | Average |" in report   # the columns in params.yaml's order
    for f in ('figures/tradeoff.png', 'figures/attention_grid.png', 'data/samples.png'): assert f'({f})' in report, f
    reading = report.split('## Reading', 1)[-1].split('\n## ', 1)[0]
    assert '## Reading' in report
    # the smoke models are near chance, so several may tie for the top: either sentence names the winner(s)
    assert re.search(r'most robust method is|methods share the highest average robust accuracy|highest average robust accuracy is', reading), reading


def test_dvc_metrics_show(repo, params):
    out = json.loads(run(['dvc', 'metrics', 'show', '--json'], repo).stdout)
    files = {str(Path(p).relative_to('results')) for rev in out.values() for p in rev['data']}
    want = {f'metrics/{m}-{s}/{m}_{a}.json' for m in params['methods'] for s in params['seeds'] for a, _ in _attacks_of(params, s)}
    assert files == want | {'summary.json'}, files ^ (want | {'summary.json'})


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
    stages = ['data', 'pretrain', 'finetune@tga_zsr-1', 'evaluate@tga_zsr-0', 'checks@tga_zsr', 'figures', 'report']
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
        seeds = yaml.safe_load(old)['seeds']
        assert set(status) == {*(f'finetune@tga_zsr-{k}' for k in seeds), 'figures', 'report'}, status
    finally:
        (repo / 'params.yaml').write_text(old)
    assert 'up to date' in run(['dvc', 'status'], repo).stdout


def test_experiment_reruns_only_its_method(repo):
    "`dvc exp run -S` on one method: only its stages and figures/report run; `dvc exp show` lists it; the tree goes back."
    t0 = time.time()
    r = run(['dvc', 'exp', 'run', '-n', 'alpha-half', '-S', 'methods.tga_zsr.alpha=0.5'], repo)
    TIMES['dvc exp run'] = time.time() - t0
    ran = re.findall(r"Running stage '([^']+)'", r.stdout + r.stderr)
    seeds = yaml.safe_load((repo / 'params.yaml').read_text())['seeds']
    assert sorted(ran) == sorted(['checks@tga_zsr', 'figures', 'report'] + [f'{s}@tga_zsr-{k}' for s in ('finetune', 'evaluate')
                                                                         for k in seeds]), ran
    rows = json.loads(run(['dvc', 'exp', 'show', '--json'], repo).stdout)
    exps = [e for row in rows for e in (row.get('experiments') or []) for e in (e.get('revs') or [])]
    exp = next(e for e in exps if e.get('name') == 'alpha-half')
    data = exp['data']
    assert data['params']['params.yaml']['data']['methods']['tga_zsr']['alpha'] == 0.5
    assert 'results/metrics/tga_zsr-0/tga_zsr_pgd.json' in data['metrics'] and 'results/summary.json' in data['metrics'], sorted(data['metrics'])
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
