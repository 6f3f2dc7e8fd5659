"""Dry run of the PAPER profile (`make test-paper`): its own dvc.yaml stages through `dvc repro`, on CPU, in a temporary copy.

What is the paper's: profiles/paper.yaml as committed -- ViT-B-32 with the `openai` tag (so QuickGELU), 224 px, all 9
methods with their paper options, Tiny-ImageNet fine-tuning, the 16 test datasets read through the dataset registry,
the paper's attacks (PGD, CW, APGD-CE+DLR as listed in the profile), real class names and prompts, the report with the
paper's Tables 1-2 beside the run.
What shrinks (`shrink` below, nothing else): the weights are random (`openai` is "downloaded" from a seeded random
state dict placed in a Hugging Face cache: `tga_zsr.testing.seed_hf_cache`, run with HF_HUB_OFFLINE=1); the datasets
are fixture folders in each dataset's real on-disk layout (`tga_zsr.testing.write_fixture`, a few images and classes
each, checksums skipped); 2 training steps of batch 2; 2 images per test dataset; every attack 2 steps; fp32 (CPU).

Prints one summary line; exits 1 with the failing check (and keeps the copy) otherwise. `--keep` keeps the copy.
Its duration is printed, never asserted (a busy machine must not fail it); `dvc repro` is stopped only if it hangs,
after TGA_ZSR_PAPER_HANG seconds (default 3600: four times its usual time on the 2-core machine).
"""
import argparse, json, os, re, shutil, subprocess, sys, tempfile, time
from pathlib import Path

import yaml

from repo_copy import REPO, run, copy_repo

HANG = float(os.environ.get('TGA_ZSR_PAPER_HANG', 3600))


def shrink(P: dict) -> dict:
    "The paper profile with CPU-sized budgets; everything not named here is the profile's own."
    P['device'] = 'cpu'
    P['pretrain'] = {**(P.get('pretrain') or {}), 'sanity_images': 2}
    P['finetune'].update(epochs=1, max_steps=2, batch_size=2, warmup=1, num_workers=0)
    if 'precision' in P['finetune']: P['finetune']['precision'] = 'fp32'     # fp16 needs CUDA
    ev = P['evaluate']
    ev.update(max_images=2, batch_size=2, num_workers=0)
    if 'precision' in ev: ev['precision'] = 'fp32'
    ev['attacks'] = [{**a, 'steps': 2} for a in ev['attacks']]
    att = ev.get('attention') or {}
    if att.get('examples'): att['examples'] = 2
    # the checklist on two datasets (one with 2 classes: APGD's CE-only path), tiny budgets
    P['checks'] = {**P.get('checks', {}), 'datasets': ['cifar10', 'pcam'], 'max_images': 2, 'batch_size': 2,
                   'checklist': {'eps': [0, 1], 'large_eps': 255, 'steps': [1, 2], 'apgd_steps': 2, 'square_queries': 5}}
    return P


def write_data(root: Path, P: dict) -> list[str]:
    "Fixture folders for the training set and every test dataset, laid out as the real downloads are."
    from tga_zsr.datasets import paper_dataset_name
    from tga_zsr.prepare import sort_tinyimagenet_val
    from tga_zsr.testing import write_fixture
    names = list(dict.fromkeys([P['finetune'].get('dataset', 'tinyimagenet')] + list(P['evaluate']['datasets'])))
    for n in names: write_fixture(n, root)
    if any(paper_dataset_name(n) == 'tinyimagenet' for n in names):
        sort_tinyimagenet_val(root / 'tiny-imagenet-200')   # what `tga-zsr prepare-data` does after unzipping
    return names


def check(cond, msg):
    if not cond: raise AssertionError(msg)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--keep', action='store_true', help='keep the temporary copy')
    args = ap.parse_args(argv)
    t_start = time.time()
    tmp = Path(tempfile.mkdtemp(prefix='tga_zsr_paper_dry_'))
    repo = copy_repo(tmp / 'repo')
    ok = False
    try:
        P = shrink(yaml.safe_load((REPO / 'profiles' / 'paper.yaml').read_text()))
        (repo / 'params.yaml').write_text(yaml.safe_dump(P, sort_keys=False))
        names = write_data(repo / 'data', P)
        # hard links into DVC's cache instead of copies: ten ViT-B/32 outputs (~1.5 GB each with the resume state) once, not twice
        run(['dvc', 'config', '--local', 'cache.type', 'hardlink,copy'], repo)
        # (no `dvc add`: the data stage checks the prepared datasets and DVC tracks them as its output)
        from tga_zsr.testing import seed_hf_cache, random_open_clip_weights
        arch, tag = P['model']['arch'], P['model']['pretrained']
        from tga_zsr.models import canonical_arch, resolve_quick_gelu
        weights_arch = canonical_arch(arch, resolve_quick_gelu(arch, tag))
        seed_hf_cache(arch, tag, random_open_clip_weights(weights_arch, seed=0), tmp / 'hf')
        # PYTHONPATH: the stages run the copy's tga_zsr, not the checkout's editable install
        env = {'HF_HUB_CACHE': str(tmp / 'hf'), 'HF_HUB_OFFLINE': '1', 'TGA_ZSR_SKIP_CHECKSUMS': '1', 'PYTHONPATH': str(repo)}
        t0 = time.time()
        try: r = run(['dvc', 'repro'], repo, check=False, env=env, timeout=HANG)
        except subprocess.TimeoutExpired: raise AssertionError(f"dvc repro hung: not finished after {HANG:.0f}s") from None
        t_repro = time.time() - t0
        log = r.stdout + r.stderr
        (tmp / 'repro.log').write_text(log)
        check(r.returncode == 0, f"dvc repro failed (log {tmp / 'repro.log'}):\n{log[-3000:]}")
        stage_times = re.findall(r'stage (\S+): done in ([\d.]+)s', log)
        methods, seeds = list(P['methods']), P['seeds']
        check(len(stage_times) == 4 + 2 * len(methods) * len(seeds) + len(methods), f"{len(stage_times)} stages ran: {stage_times}")
        check('up to date' in run(['dvc', 'status'], repo, env=env).stdout, 'dvc status is not up to date after repro')
        # every model is the paper's network: recorded and built with QuickGELU in every block
        from tga_zsr.models import checkpoint_record, load_clip, block_activations
        for m in ['pretrained'] + methods:
            f = repo / 'models' / ('pretrained.safetensors' if m == 'pretrained' else f'{m}-{seeds[0]}/model.safetensors')
            rec = checkpoint_record(f)
            check((rec.get('arch'), rec.get('quick_gelu')) == (weights_arch, 'true'), f"{f}: recorded {rec}")
        acts = block_activations(load_clip(arch, repo / 'models' / f'tga_zsr-{seeds[0]}' / 'model.safetensors').model)
        check(acts == {'visual': ['QuickGELU'] * 12, 'text': ['QuickGELU'] * 12}, f"reloaded TGA-ZSR runs {acts}")
        # metrics: every method x attack, every test dataset
        datasets = P['evaluate']['datasets']
        n_attacks = len(P['evaluate']['attacks'])
        for m in methods:
            files = sorted((repo / 'results' / 'metrics' / f'{m}-{seeds[0]}').glob('*.json'))
            check(len(files) == n_attacks, f"{m}: {len(files)} metrics files for {n_attacks} attacks")
            for f in files:
                res = json.loads(f.read_text())
                check(sorted(res['clean']) == sorted(datasets + ['avg']), f"{f}: datasets {sorted(res['clean'])}")
        # the paper's Table 3 attacks (APGD-CE+DLR, i.e. its 'AutoAttack', and CW) through the CLI on a fine-tuned model,
        # with the architecture read from the checkpoint's record; PCAM (2 classes) takes APGD's CE-only path
        out = tmp / 'cli_eval'
        run(['tga-zsr', 'evaluate', '--checkpoint', f'models/tga_zsr-{seeds[0]}/model.safetensors', '--datasets', 'cifar10', 'pcam',
             '--root', 'data', '--attack', 'apgd', '--attack', 'cw', '--steps', '2', '--max-images', '2', '--batch-size', '2',
             '--device', 'cpu', '--precision', 'fp32', '--out', str(out), '--no-progress'], repo, env=env)
        table3 = sorted(f.name for f in out.glob('tga_zsr_*.json') if not f.name.endswith('_meta.json'))
        check(table3 == ['tga_zsr_apgd.json', 'tga_zsr_cw.json'], f"CLI evaluation wrote {table3}")
        report = (repo / 'results' / 'report.md').read_text()
        summary = json.loads((repo / 'results' / 'summary.json').read_text())
        check(set(summary['checks']) == set(methods), f"summary.json checks: {sorted(summary['checks'])}")
        check('## Side by side with the paper (Tables 1 and 2' in report, "the report does not hold the paper's Tables 1-2")
        ok = True
        print(f"paper dry run: {len(stage_times)} stages, {len(methods)} methods, {len(datasets)} test datasets "
              f"(+ {P['finetune'].get('dataset')} fine-tuning), {n_attacks} attacks "
              f"({', '.join(a['name'] for a in P['evaluate']['attacks'])}) + Table 3's apgd and cw through the CLI, "
              f"{weights_arch} at 224 px with QuickGELU in "
              f"{sum(map(len, acts.values()))} blocks of every model; report with the paper's Tables 1-2; "
              f"dvc repro {t_repro / 60:.1f} min, total {(time.time() - t_start) / 60:.1f} min")
        per_stage = ', '.join(f"{s} {float(t):.0f}s" for s, t in stage_times)
        print(f"  per stage: {per_stage}")
        return 0
    except AssertionError as e:
        print(f"paper dry run FAILED: {e}\n  (the copy is kept at {repo})", file=sys.stderr)
        return 1
    finally:
        if ok and not args.keep: shutil.rmtree(tmp, ignore_errors=True)
        elif ok: print(f"  copy kept at {repo}")
        else:   # keep what explains the failure (logs, notebooks, results), not ~25 GB of ViT-B/32 weights
            for heavy in (repo / 'models', repo / '.dvc' / 'cache', tmp / 'hf'): shutil.rmtree(heavy, ignore_errors=True)


if __name__ == '__main__':
    sys.exit(main())
