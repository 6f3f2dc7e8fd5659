"""Every test the README names as the holder of a guarantee exists, and the README's test command runs it.

The README's Reliability section and its Status name tests (`test_ctrl_c_of_a_stage_ends_with_one_line`, the files
`tests/test_faults.py`, a family `test_cli_*`). A renamed or deleted test would leave that guarantee unbacked while the
README still cites it; these checks fail instead. CI runs `.ci/run`, which must run the README's test command.
"""
import re

from repo_copy import REPO

README = (REPO / 'README.md').read_text()


def _defined_tests() -> set[str]:
    """The tests the README's test command runs: the test functions pytest collects from tests/ (`make check` runs
    `pytest tests` with no selection), and the `def test_...` in the notebooks' code cells (`nbdev_test` runs them all)."""
    import json, subprocess, sys
    r = subprocess.run([sys.executable, '-m', 'pytest', '--collect-only', '-q', '-p', 'no:cacheprovider', 'tests'], cwd=REPO,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    names = {re.sub(r'\[.*\]$', '', l.split('::')[-1]) for l in r.stdout.splitlines() if '::' in l}
    for f in (REPO / 'nbs').glob('*.ipynb'):
        for c in json.loads(f.read_text())['cells']:
            if c['cell_type'] == 'code': names |= set(re.findall(r'def (test_\w+)\(', ''.join(c['source'])))
    return names


def _cited() -> tuple[set[str], set[str], set[str]]:
    "The test names, name prefixes (`test_cli_*`) and test files (`tests/test_faults.py`) README.md cites."
    files = set(re.findall(r'tests/(test_\w+)\.py', README))
    tokens = set(re.findall(r'(?<![\w/.])(test_\w*)(?![\w.])', README))   # not a file name (`logs/test_times.tsv`)
    prefixes = {t for t in tokens if t.endswith('_')}
    return tokens - prefixes, prefixes, files


def test_every_test_the_readme_names_exists():
    names, prefixes, files = _cited()
    assert len(names) >= 8, names                    # the Reliability section names its tests: this check reads them
    defined = _defined_tests()
    assert names <= defined, f"README.md names tests that do not exist: {sorted(names - defined)}"
    for p in prefixes: assert any(d.startswith(p) for d in defined), f"README.md cites {p}* but no test starts so"
    for f in files: assert (REPO / 'tests' / f'{f}.py').is_file(), f"README.md cites tests/{f}.py, which does not exist"


def _recipe(target: str) -> str:
    "The recipe lines of a Makefile target."
    m = re.search(rf'^{re.escape(target)}:[^\n]*\n((?:\t[^\n]*\n)+)', (REPO / 'Makefile').read_text(), re.M)
    assert m, f"the Makefile has no target {target!r}"
    return m.group(1)


def test_ci_runs_the_readme_test_command_and_it_runs_every_test():
    "`.ci/run` runs `make check`, which the README names as the test command; it runs every test file, slow ones too."
    ci = (REPO / '.ci' / 'run').read_text()
    assert re.search(r'^make check$', ci, re.M), ci
    assert re.search(r'`make check`[^\n]*What CI runs', README), 'README.md does not name `make check` as what CI runs'
    check = _recipe('check')
    pytest_line = re.search(r'pytest[^\n]*', check).group(0)
    assert re.search(r' tests$', pytest_line), pytest_line               # the whole folder ...
    assert not re.search(r' (-m|-k|--deselect|--ignore)\b', pytest_line), pytest_line   # ... with nothing left out
    assert '--flags slow' in check and 'nbdev_test' in check, check   # the notebooks' slow cells too
    assert 'export-check' in re.search(r'^check:[^\n]*', (REPO / 'Makefile').read_text(), re.M).group(0)
