#!/usr/bin/env python
"""Benchmark: this library's TGA-ZSR training step and PGD evaluation vs. the official code's structure.

The "naive" variants reproduce the *structure* of the official TGA-ZSR code (TGA-ZSR.py / attacks.py) with the same
model and the same maths:
  training step: class prompts re-tokenized and re-encoded every batch; the PGD attack re-encodes the prompts *with
  gradients* at every iteration and calls `loss.backward()` (gradients into every weight, not only the perturbation);
  the adversarial batch is encoded twice (logits, then attention); the frozen original model runs with gradients
  enabled (a deepcopy whose parameters still require grad); the clean attention of the trained model is a third forward.
  evaluation (PGD-k): the prompts are re-encoded for the clean forward, at every attack iteration (with gradients and
  a full `loss.backward()`), and for the adversarial forward.
The library: class weights computed once per run, one forward of [x_adv; x] for logits and both attention maps, the
original model under `no_grad`, attacks differentiate w.r.t. the perturbation only.

Both training steps are first checked to give the same loss (and gradient) for the same adversarial images. Timings:
median of --repeats steps after a warm-up. Peak memory: CUDA `max_memory_allocated` above the set-up level; on CPU each
variant runs in a fresh process and we report its peak resident set (VmHWM) above the resident set after set-up.

    python benchmarks/bench_step.py                    # tga-mini, CPU or the visible GPU
    python benchmarks/bench_step.py --arch ViT-B-32 --batch 128 --classes 200 --size 224   # the paper's scale
"""
from __future__ import annotations
import argparse, copy, json, os, statistics, subprocess, sys, time

import torch
import torch.nn.functional as F


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--arch', default='tga-mini')
    p.add_argument('--pretrained', default=None, help='open_clip tag or checkpoint (default: random init)')
    p.add_argument('--batch', type=int, default=32)
    p.add_argument('--classes', type=int, default=200, help='number of class prompts (Tiny-ImageNet: 200)')
    p.add_argument('--size', type=int, default=None, help='image side (default: the model input size)')
    p.add_argument('--device', default='auto')
    p.add_argument('--repeats', type=int, default=3)
    p.add_argument('--pgd-steps', type=int, default=10, help='k of the PGD-k evaluation benchmark')
    p.add_argument('--threads', type=int, default=1, help='CPU threads (torch.set_num_threads)')
    p.add_argument('--worker', choices=['lib-train', 'naive-train', 'lib-eval', 'naive-eval', 'check'], default=None,
                   help=argparse.SUPPRESS)
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------------------------------- set-up
def setup(args):
    from tga_zsr.core import resolve_device
    from tga_zsr.models import load_clip, frozen_copy, classifier_weights
    from tga_zsr.training import trainable_parameters
    from tga_zsr.attacks import random_delta
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    torch.manual_seed(0)
    clip = load_clip(args.arch, args.pretrained, device=device)
    original = frozen_copy(clip)
    params = trainable_parameters(clip)
    with torch.no_grad():   # a model some way into fine-tuning: its attention differs from the original's
        for p in params: p.add_(1e-2 * p.detach().std().nan_to_num() * torch.randn_like(p))
    size = args.size or clip.image_size[0]
    g = torch.Generator().manual_seed(1)
    images = torch.rand(args.batch, 3, size, size, generator=g).to(device)
    labels = torch.randint(0, args.classes, (args.batch,), generator=g).to(device)
    classnames = [f'object number {i}' for i in range(args.classes)]
    delta0 = random_delta(images.shape, 1 / 255, generator=torch.Generator().manual_seed(2)).to(device)
    opt = torch.optim.SGD(params, lr=1e-4, momentum=0.9)
    return dict(device=device, clip=clip, original=original, images=images, labels=labels, classnames=classnames,
                delta0=delta0, opt=opt, classifier_weights=classifier_weights)


def rss_kib(field='VmRSS'):
    try:
        for line in open('/proc/self/status'):
            if line.startswith(field + ':'): return int(line.split()[1])
    except OSError: pass
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


# ------------------------------------------------------------------------------------------------- library variants
def lib_train(s, adv_fixed=None):
    "One TGA-ZSR training step of the library (returns a closure)."
    from tga_zsr.methods import StepContext, TrainAttack, tga_zsr_step
    from tga_zsr.core import autocast
    clip, device = s['clip'], s['device']
    original = s['original']                                            # frozen, run under no_grad
    weights = s['classifier_weights'](clip, s['classnames'])          # once per run
    ctx_cls = StepContext
    if adv_fixed is not None:                                          # the loss check: same adversarial images
        class ctx_cls(StepContext):
            def adversarial(self, images, labels, model=None, loss_fn=None): return adv_fixed
    ctx = ctx_cls(clip, weights, original=original, attack=TrainAttack(), delta_init=s['delta0'])

    def step(backward=True):
        s['opt'].zero_grad(set_to_none=True)
        with autocast(device): loss, parts = tga_zsr_step(ctx, s['images'], s['labels'])
        if backward: loss.backward(); s['opt'].step()
        return loss
    return step


def lib_eval(s, k):
    "PGD-k evaluation of one batch with the library (clean + adversarial accuracy)."
    from tga_zsr.models import ZeroShotClassifier
    from tga_zsr.attacks import pgd
    from tga_zsr.core import autocast
    clip, device = s['clip'], s['device']
    clf = ZeroShotClassifier(clip, s['classifier_weights'](clip, s['classnames']))

    def step():
        with torch.no_grad(), autocast(device): clean = clf(s['images']).argmax(1)
        adv = pgd(clf, s['images'], s['labels'], eps=1 / 255, alpha=1 / 255, steps=k, delta_init=s['delta0'])
        with torch.no_grad(), autocast(device): robust = clf(adv).argmax(1)
        return (clean == s['labels']).float().mean() + (robust == s['labels']).float().mean()
    return step


# ---------------------------------------------------------------------------------------- official-structure variants
def _official_forward(clip, x, text_tokens):
    "The official `multiGPU_CLIP`: image CLS embedding and logit_scale * text features, texts encoded in the forward."
    img = F.normalize(clip.encode_image_tokens(x)[:, 0], dim=-1)
    text = F.normalize(clip.model.encode_text(text_tokens), dim=-1)
    return clip.logit_scale * img @ text.t()


def _official_attack(clip, images, labels, text_tokens, delta0, eps, alpha, steps):
    "The official `attack_pgd`: loss.backward() through the whole model (texts re-encoded with grad each iteration)."
    delta = torch.clamp(delta0.clone(), -images, 1 - images).requires_grad_(True)
    for _ in range(steps):
        loss = F.cross_entropy(_official_forward(clip, images + delta, text_tokens), labels)
        loss.backward()
        d = torch.clamp(delta.detach() + alpha * delta.grad.sign(), -eps, eps)
        delta.data = torch.clamp(d, -images, 1 - images)
        delta.grad.zero_()
    return delta.detach()


def naive_train(s, adv_fixed=None):
    "One TGA-ZSR training step with the official code's structure."
    from tga_zsr.attention import text_guided_attention
    from tga_zsr.losses import tga_zsr_loss
    from tga_zsr.core import autocast
    clip, device = s['clip'], s['device']
    frozen = copy.deepcopy(s['original'])              # official: a deepcopy whose parameters still require grad
    frozen.requires_grad_(True)
    prompts = [f'This is a photo of a {c}' for c in s['classnames']]
    size = clip.image_size

    def attention(model, x, text):                     # official attention_map: a full image forward of its own
        return text_guided_attention(model.encode_image_tokens(x), text, size)

    def step(backward=True):
        s['opt'].zero_grad()
        images, labels = s['images'], s['labels']
        text_tokens = clip.tokenize(prompts)           # re-tokenized and re-encoded every batch
        with autocast(device):
            with torch.no_grad():
                text = F.normalize(clip.model.encode_text(text_tokens), dim=-1)
                text_embed = clip.logit_scale * text
            if adv_fixed is None:
                adv = images + _official_attack(clip, images, labels, text_tokens, s['delta0'], 1 / 255, 1 / 255, 2)
            else: adv = adv_fixed
            output = F.normalize(clip.encode_image_tokens(adv)[:, 0], dim=-1) @ text_embed.t()   # forward 1 of x_adv
            att_adv = attention(clip, adv, text[labels])                                       # forward 2 of x_adv
            att_ori = attention(frozen, images, text[labels])                                  # frozen model, with grad
            att_clean = attention(clip, images, text[labels])                                  # forward of x
            loss, _ = tga_zsr_loss(output, labels, att_adv, att_ori, att_clean)
        if backward: loss.backward(); s['opt'].step()
        return loss
    return step


def naive_eval(s, k):
    "PGD-k evaluation of one batch with the official `validate` structure."
    from tga_zsr.core import autocast
    clip, device = s['clip'], s['device']
    prompts = [f'This is a photo of a {c}' for c in s['classnames']]

    def step():
        text_tokens = clip.tokenize(prompts)
        with autocast(device):
            with torch.no_grad(): clean = _official_forward(clip, s['images'], text_tokens).argmax(1)
            delta = _official_attack(clip, s['images'], s['labels'], text_tokens, s['delta0'], 1 / 255, 1 / 255, k)
            with torch.no_grad(): robust = _official_forward(clip, s['images'] + delta, text_tokens).argmax(1)
        clip.zero_grad(set_to_none=True)
        return (clean == s['labels']).float().mean() + (robust == s['labels']).float().mean()
    return step


# ----------------------------------------------------------------------------------------------------------- workers
def _sync(device):
    if device.type == 'cuda': torch.cuda.synchronize(device)


def worker(args):
    s = setup(args)
    device = s['device']
    if args.worker == 'check':
        from tga_zsr.attacks import pgd
        from tga_zsr.models import ZeroShotClassifier
        clip = s['clip']
        clf = ZeroShotClassifier(clip, s['classifier_weights'](clip, s['classnames']))
        adv = pgd(clf, s['images'], s['labels'], 1 / 255, 1 / 255, 2, delta_init=s['delta0'])
        out = {}
        for name, make in (('lib', lib_train), ('naive', naive_train)):
            loss = make(s, adv_fixed=adv)(backward=False)
            s['opt'].zero_grad(set_to_none=True)
            loss.backward()
            out[name] = (loss.item(), [p.grad.detach().clone() for p in clip.model.visual.parameters()])
            clip.zero_grad(set_to_none=True)
        grad_diff = max((a - b).abs().max().item() for a, b in zip(out['lib'][1], out['naive'][1]))
        grad_scale = max(a.abs().max().item() for a in out['lib'][1])
        # the attacks themselves: the official structure and the library's PGD from the same start
        prompts = [f'This is a photo of a {c}' for c in s['classnames']]
        naive_adv = s['images'] + _official_attack(clip, s['images'], s['labels'], clip.tokenize(prompts), s['delta0'],
                                                   1 / 255, 1 / 255, 2)
        clip.zero_grad(set_to_none=True)
        print(json.dumps({'loss_lib': out['lib'][0], 'loss_naive': out['naive'][0], 'max_grad_diff': grad_diff,
                          'max_grad': grad_scale, 'adv_max_diff': (naive_adv - adv).abs().max().item(),
                          'adv_frac_differ': (naive_adv != adv).float().mean().item()}))
        return
    if args.worker.startswith('naive'): s['clip'].requires_grad_(True)   # official: every CLIP weight requires grad
    make = {'lib-train': lib_train, 'naive-train': naive_train}.get(args.worker)
    step = make(s) if make else (lib_eval if args.worker == 'lib-eval' else naive_eval)(s, args.pgd_steps)
    _sync(device)
    if device.type == 'cuda':
        torch.cuda.reset_peak_memory_stats(device); base = torch.cuda.memory_allocated(device)
    else: base = rss_kib('VmRSS') * 1024
    times = []
    for i in range(args.repeats + 1):
        t0 = time.perf_counter(); step(); _sync(device); dt = time.perf_counter() - t0
        if i: times.append(dt)                          # the first call is a warm-up
    peak = (torch.cuda.max_memory_allocated(device) if device.type == 'cuda' else rss_kib('VmHWM') * 1024) - base
    print(json.dumps({'median_s': statistics.median(times), 'min_s': min(times), 'peak_bytes': peak,
                      'device': str(device)}))


def run_worker(args, name):
    cmd = [sys.executable, __file__, '--worker', name, '--arch', args.arch, '--batch', str(args.batch),
           '--classes', str(args.classes), '--device', args.device, '--repeats', str(args.repeats),
           '--pgd-steps', str(args.pgd_steps), '--threads', str(args.threads)]
    if args.pretrained: cmd += ['--pretrained', args.pretrained]
    if args.size: cmd += ['--size', str(args.size)]
    env = {**os.environ, 'OMP_NUM_THREADS': str(args.threads)}
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if res.returncode != 0:
        sys.stderr.write(res.stderr); raise SystemExit(f'benchmark worker {name} failed')
    return json.loads(res.stdout.strip().splitlines()[-1])


def main(argv=None):
    args = parse(argv)
    if args.worker: return worker(args)
    print(f'bench_step: arch={args.arch} batch={args.batch} classes={args.classes} size={args.size or "model"} '
          f'device={args.device} threads={args.threads} repeats={args.repeats}')
    chk = run_worker(args, 'check')
    same = abs(chk['loss_lib'] - chk['loss_naive']) <= 1e-4 * max(1, abs(chk['loss_naive']))
    print(f"same adversarial images -> loss library {chk['loss_lib']:.6f} vs official structure {chk['loss_naive']:.6f} "
          f"({'SAME' if same else 'DIFFERENT'}); max |grad diff| {chk['max_grad_diff']:.2e} (max |grad| {chk['max_grad']:.2e})")
    print(f"training attacks from the same start: max |x_adv diff| {chk['adv_max_diff']:.2e} "
          f"({100 * chk['adv_frac_differ']:.3f}% of pixels differ)")
    r = {name: run_worker(args, name) for name in ('lib-train', 'naive-train', 'lib-eval', 'naive-eval')}
    dev = r['lib-train']['device']
    mib = lambda b: b / 2**20
    speed = r['naive-train']['median_s'] / r['lib-train']['median_s']
    mem = r['lib-train']['peak_bytes'] / max(r['naive-train']['peak_bytes'], 1)
    print(f"[{dev}] TGA-ZSR training step: library {1e3 * r['lib-train']['median_s']:.1f} ms, "
          f"official structure {1e3 * r['naive-train']['median_s']:.1f} ms -> speed-up {speed:.2f}x (target >= 1.5x)")
    print(f"[{dev}] peak step memory: library {mib(r['lib-train']['peak_bytes']):.1f} MiB, official structure "
          f"{mib(r['naive-train']['peak_bytes']):.1f} MiB -> ratio {mem:.2f} (target <= 0.75)")
    ips_lib, ips_naive = args.batch / r['lib-eval']['median_s'], args.batch / r['naive-eval']['median_s']
    print(f"[{dev}] PGD-{args.pgd_steps} evaluation: library {ips_lib:.1f} img/s, official structure {ips_naive:.1f} img/s "
          f"-> {ips_lib / ips_naive:.2f}x (target >= 1.3x)")
    ok = same and speed >= 1.5 and mem <= 0.75 and ips_lib / ips_naive >= 1.3
    print('all targets met' if ok else 'some targets NOT met')


if __name__ == '__main__':
    main()
