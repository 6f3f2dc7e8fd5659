#!/usr/bin/env python
"""Execute nbdev notebooks top to bottom IN PLACE, so they are committed with their outputs (`make notebooks`).

Runs every code cell with nbdev's own executor (execnb), in the notebook's folder, and writes the outputs back. Cells
that `nbdev_test` skips are skipped here too, keeping whatever output they had: test flags from settings.ini
(`tst_flags`: slow, gpu, notest) unless named in --flags, and `#| eval: false`. Stops at the first error, naming the
notebook and cell, and leaves that notebook unchanged.

    python tools/execute_notebooks.py nbs/03_attention.ipynb [more.ipynb ...] [--flags slow]
"""
import argparse, configparser, os, re, sys, time
from pathlib import Path

from execnb.nbio import read_nb, write_nb
from execnb.shell import CaptureShell

ROOT = Path(__file__).resolve().parents[1]


def directives(source: str) -> dict[str, list[str]]:
    "The `#| key value...` lines at the top of a cell."
    out = {}
    for line in source.splitlines():
        m = re.match(r'\s*#\|\s*([\w-]+:?)\s*(.*)', line)
        if not m:
            if line.strip(): break
            continue
        out[m.group(1)] = m.group(2).split()
    return out


def execute(path: Path, skip_flags: set[str]) -> float:
    nb = read_nb(path)
    def skip(cell):
        if cell.cell_type != 'code': return True
        d = directives(cell.source)
        if d.get('eval:', [''])[0].lower() == 'false' or skip_flags & set(d): return True
        cell.outputs, cell.execution_count = [], None   # a cell that now prints nothing must not keep an old output
        return False
    t0 = time.time()
    shell = CaptureShell(path)
    cwd = os.getcwd()
    os.chdir(path.parent)
    try: shell.run_all(nb, exc_stop=True, preproc=skip)
    except Exception:
        sys.stderr.write(shell.prettytb(fname=path) + '\n')
        raise SystemExit(f"error: {path} failed; it was left unchanged")
    finally: os.chdir(cwd)
    write_nb(nb, path)
    return time.time() - t0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('notebooks', nargs='+')
    ap.add_argument('--flags', default='', help='test flags to run anyway (space separated), e.g. "slow"')
    args = ap.parse_args(argv)
    cfg = configparser.ConfigParser(); cfg.read(ROOT / 'settings.ini')
    skip_flags = set(cfg['DEFAULT'].get('tst_flags', '').split()) - set(args.flags.split())
    for nb in args.notebooks:
        dt = execute(Path(nb).resolve(), skip_flags)
        print(f"executed {nb} in {dt:.0f}s")
    return 0


if __name__ == '__main__':
    sys.exit(main())
