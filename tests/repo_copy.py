"""Shared by the end-to-end tests: run a command with the venv first on PATH, and copy the repository as a clone has it."""
import os, shutil, subprocess, sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def run(cmd, cwd, check=True, env=None, timeout=None):
    "Run with the venv's binaries first on PATH (one BLAS thread: stages set their own); on failure show the output's tail."
    env = {**os.environ, 'PATH': f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", 'OMP_NUM_THREADS': '1',
           'MKL_NUM_THREADS': '1', 'PYTHONDONTWRITEBYTECODE': '1', **(env or {})}
    r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if check and r.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, cmd))} exited {r.returncode}\n--- stdout\n{r.stdout[-4000:]}\n--- stderr\n{r.stderr[-4000:]}")
    return r


def copy_repo(dst: Path) -> Path:
    "The files a clone would have (git ls-files -co --exclude-standard), in a new git repository with one commit."
    files = run(['git', 'ls-files', '-co', '--exclude-standard', '-z'], REPO).stdout.split('\0')
    for f in filter(None, files):
        src = REPO / f
        if src.is_file():
            (dst / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / f)
    run(['git', 'init', '-q'], dst)
    run(['git', 'add', '-A'], dst)
    run(['git', '-c', 'user.name=test', '-c', 'user.email=test@localhost', '-c', 'commit.gpgsign=false',
         'commit', '-q', '-m', 'test copy', '--no-verify'], dst)   # dvclive needs a commit to exist
    return dst
