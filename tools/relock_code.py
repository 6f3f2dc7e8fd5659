"""Re-record the hashes of changed *code* dependencies in dvc.lock, for code changes that cannot change any output.

`python tools/relock_code.py tga_zsr/pipeline.py ...` sets, for every stage that lists one of these paths as a dep, its
md5 and size to the file's current ones, and changes nothing else: `dvc commit` would do the same but needs every
stage's outputs in the workspace. Use it only after re-running at least one stage of each kind that depends on the
changed files and seeing that `dvc repro` wrote the same output hashes (say which in the commit message).
"""
import hashlib, subprocess, sys
from pathlib import Path

import yaml


def live_stages() -> set[str]:
    "The stages dvc.yaml defines now (dvc.lock may keep entries of stages since removed: those are left as they are)."
    return set(subprocess.run(['dvc', 'stage', 'list', '--name-only'], capture_output=True, text=True, check=True).stdout.split())


def relock(paths: list[str], lock: Path = Path('dvc.lock')) -> int:
    data = yaml.safe_load(lock.read_text())
    new = {p: (hashlib.md5(Path(p).read_bytes()).hexdigest(), Path(p).stat().st_size) for p in paths}
    live, changed = live_stages(), 0
    for name, stage in data['stages'].items():
        if name not in live: continue
        for dep in stage.get('deps', []):
            if dep['path'] in new and (dep.get('md5'), dep.get('size')) != new[dep['path']]:
                dep['md5'], dep['size'] = new[dep['path']]; changed += 1
    text = lock.read_text()
    # edit the text, not a re-dump, so that dvc's own formatting (and every other byte) stays as dvc wrote it
    out, path, stage = [], None, None
    for line in text.splitlines(keepends=True):
        s = line.strip()
        if line.startswith('  ') and not line.startswith('   ') and s.endswith(':'): stage = s[:-1]   # a stage's name
        if s.startswith('- path: '): path = s[len('- path: '):] if stage in live else None
        elif path in new and s.startswith('md5: '): line = line[:line.index('md5: ')] + f"md5: {new[path][0]}\n"
        elif path in new and s.startswith('size: '): line = line[:line.index('size: ')] + f"size: {new[path][1]}\n"; path = None
        out.append(line)
    lock.write_text(''.join(out))
    assert yaml.safe_load(lock.read_text()) == data, 'dvc.lock edit went wrong'
    print(f"dvc.lock: {changed} dependency entries re-recorded for {', '.join(paths)}")
    return changed


if __name__ == '__main__':
    relock(sys.argv[1:])
