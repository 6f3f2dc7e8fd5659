#!/usr/bin/env python
"""GPU readiness: the paper-scale TGA-ZSR training step and PGD-100 evaluation, next to the paper's Table 8.

Runs the library's own code -- `methods.tga_zsr_step` inside the training loop's update (autocast of the chosen
precision, a GradScaler for fp16, SGD momentum 0.9), and the `pgd` evaluation attack through `evaluation.count_correct` --
on ViT-B/32 with QuickGELU (random weights unless --pretrained is given: timing does not depend on them), batch 128,
224 px, 200 classes (Tiny-ImageNet), the paper profile's precision (fp16), with and without `torch.compile` of the
trainable forward. Reports seconds per batch and peak CUDA memory of the step, and PGD-100 evaluation images/s.

    make bench-gpu                                   # = python benchmarks/bench_paper_gpu.py (needs a CUDA device)
    python benchmarks/bench_paper_gpu.py --device cpu --arch tga-tiny --batch 4 --classes 8 --size 16 --pgd-steps 2 \
        --steps 2 --precision fp32 --compile off     # a plumbing check on CPU

Paper, Table 8 (one RTX 3090): TGA-ZSR 1.13 s/batch, 21 GB.
"""
from __future__ import annotations
import argparse, json, statistics, sys, time

import torch

PAPER_TABLE8 = {'s_per_batch': 1.13, 'memory_gb': 21.0, 'gpu': 'RTX 3090'}


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--arch', default='ViT-B-32')
    p.add_argument('--pretrained', default=None, help='open_clip tag or checkpoint (default: random weights, QuickGELU)')
    p.add_argument('--batch', type=int, default=128)
    p.add_argument('--classes', type=int, default=200)
    p.add_argument('--size', type=int, default=224)
    p.add_argument('--precision', default='fp16', help="the paper profile's: fp16 (autocast + GradScaler)")
    p.add_argument('--device', default='cuda')
    p.add_argument('--steps', type=int, default=10, help='timed training steps (after 3 warm-up steps)')
    p.add_argument('--compile', choices=['both', 'on', 'off'], default='both')
    p.add_argument('--pgd-steps', type=int, default=100)
    p.add_argument('--eval-batch', type=int, default=256, help="the paper's evaluation batch (2 x 128)")
    p.add_argument('--eval-batches', type=int, default=2)
    p.add_argument('--out', default=None, help='also write the results as JSON here')
    return p.parse_args(argv)


def _sync(device):
    if device.type == 'cuda': torch.cuda.synchronize(device)


def _peak_reset(device):
    if device.type == 'cuda': torch.cuda.reset_peak_memory_stats(device)


def _peak_gb(device):
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == 'cuda' else float('nan')


def build(args, device):
    from tga_zsr.models import load_clip, frozen_copy, classifier_weights
    from tga_zsr.training import trainable_parameters
    torch.manual_seed(0)
    clip = load_clip(args.arch, args.pretrained, device=device, quick_gelu=None if args.pretrained else True)
    original = frozen_copy(clip)
    params = trainable_parameters(clip)
    weights = classifier_weights(clip, [f'object number {i}' for i in range(args.classes)])
    return clip, original, params, weights


def train_step_timing(args, device, compiled: bool) -> dict:
    from tga_zsr.core import autocast, grad_scaler
    from tga_zsr.methods import METHODS, StepContext, TrainAttack
    from tga_zsr.training import TokenEncoder
    clip, original, params, weights = build(args, device)
    clip.model.visual.train()
    encoder = TokenEncoder(clip)
    if compiled: encoder = torch.compile(encoder)
    opt = torch.optim.SGD(params, lr=1e-4, momentum=0.9)
    scaler = grad_scaler(device, args.precision)
    g = torch.Generator().manual_seed(1)
    images = torch.rand(args.batch, 3, args.size, args.size, generator=g).to(device)
    labels = torch.randint(0, args.classes, (args.batch,), generator=g).to(device)
    step = METHODS['tga_zsr'].step
    times = []
    _peak_reset(device)
    for i in range(3 + args.steps):
        _sync(device); t0 = time.perf_counter()
        ctx = StepContext(clip, weights, original=original, attack=TrainAttack(), encode=encoder,
                          generator=torch.Generator(device=device).manual_seed(i))
        opt.zero_grad(set_to_none=True)
        with autocast(device, args.precision): loss, _ = step(ctx, images, labels)
        if scaler is None: loss.backward(); opt.step()
        else: scaler.scale(loss).backward(); scaler.step(opt); scaler.update()
        _sync(device)
        if i >= 3: times.append(time.perf_counter() - t0)
    return {'s_per_batch': statistics.median(times), 'peak_gb': _peak_gb(device), 'loss': float(loss.detach())}


def eval_timing(args, device) -> dict:
    from tga_zsr.models import ZeroShotClassifier
    from tga_zsr.attacks import AttackConfig
    from tga_zsr.evaluation import count_correct
    clip, _, _, weights = build(args, device)
    clip.eval()
    clf = ZeroShotClassifier(clip, weights)
    g = torch.Generator().manual_seed(3)
    data = [(torch.rand(args.eval_batch, 3, args.size, args.size, generator=g),
             torch.randint(0, args.classes, (args.eval_batch,), generator=g)) for _ in range(args.eval_batches + 1)]
    attack = AttackConfig('pgd', eps=1, steps=args.pgd_steps, step_size=1)
    count_correct(clf, data[:1], [attack], args.classes, device, precision=args.precision, progress=False)   # warm-up
    _peak_reset(device); _sync(device); t0 = time.perf_counter()
    n, _, _ = count_correct(clf, data[1:], [attack], args.classes, device, precision=args.precision, progress=False)
    _sync(device)
    dt = time.perf_counter() - t0
    return {'images_per_s': n / dt, 'seconds': dt, 'images': n, 'peak_gb': _peak_gb(device)}


def main(argv=None) -> int:
    args = parse(argv)
    from tga_zsr.core import resolve_device, check_precision, TGAZSRError
    try:
        device = resolve_device(args.device)
        args.precision = check_precision(args.precision, device)
    except TGAZSRError as e:
        print(f"error: {e} (this benchmark measures the paper scale on a CUDA device)", file=sys.stderr); return 2
    gpu = torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'
    print(f"{args.arch} (QuickGELU) x {args.batch} images of {args.size} px, {args.classes} classes, {args.precision}, on {gpu}")
    res = {'device': gpu, 'torch': torch.__version__, 'config': vars(args), 'paper_table8': PAPER_TABLE8, 'train': {}}
    for compiled in {'both': (False, True), 'on': (True,), 'off': (False,)}[args.compile]:
        r = train_step_timing(args, device, compiled)
        res['train']['compiled' if compiled else 'eager'] = r
        print(f"  TGA-ZSR step, {'torch.compile' if compiled else 'eager':13}: {r['s_per_batch']:.3f} s/batch, "
              f"peak {r['peak_gb']:.1f} GB   (paper, Table 8, {PAPER_TABLE8['gpu']}: "
              f"{PAPER_TABLE8['s_per_batch']} s/batch, {PAPER_TABLE8['memory_gb']:.0f} GB)")
    e = eval_timing(args, device)
    res['eval'] = e
    print(f"  PGD-{args.pgd_steps} evaluation: {e['images_per_s']:.1f} images/s (batch {args.eval_batch}, "
          f"{e['images']} images), peak {e['peak_gb']:.1f} GB")
    if args.out:
        with open(args.out, 'w') as f: json.dump(res, f, indent=2)
    return 0


if __name__ == '__main__':
    sys.exit(main())
