"""Precision and memory format on the CPU: float32 against bfloat16 autocast, contiguous against channels-last.

On one task and seed (the Planet lesson's resnet18 at 64 px on its built-in synthetic tiles; training
batches made once, with the lesson's augmentation, so every variant sees the same data), this measures:
1. speed: CPU time per training step of each variant, interleaved rounds of a few steps (ratio to float32);
2. the result: `fit_one_cycle` for a few epochs per variant from the same weights and seed; final losses, F2;
3. one training step of the CamVid lesson's U-Net (resnet18) per variant.
bfloat16 is `learn.to_bf16()` (autocast); channels-last is `model.to(memory_format=torch.channels_last)` with
the input batches converted too (the library has no switch for it). float16 (`learn.to_fp16()`) needs a GPU.

Usage: python benchmarks/bench_precision.py [--epochs 3] [--n 600] [--bs 32] [--size 64] [--rounds 3]
       [--out benchmarks/precision.md]
"""
from __future__ import annotations
import argparse, contextlib, copy, io, os, statistics, sys, time
from pathlib import Path
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_lessons import machine, take_batches
from lessonlib.core import atomic_path, set_seed
from lessonlib.data import DataLoaders

VARIANTS = {'float32': (None, False), 'float32 channels-last': (None, True),
            'bfloat16 autocast': (torch.bfloat16, False), 'bfloat16 autocast channels-last': (torch.bfloat16, True)}


class Epochs:
    "A loader over batches made in advance: epoch k gives the k-th list (cycling), so augmentation differs per epoch."
    def __init__(self, epochs: list): self.epochs, self.k = epochs, 0
    def __len__(self): return len(self.epochs[0])
    def __iter__(self):
        batches = self.epochs[self.k % len(self.epochs)]
        self.k += 1
        return iter(batches)

def as_format(batches, cl: bool):
    "The batches with their images in channels-last memory format when `cl`."
    fmt = torch.channels_last
    return [tuple(x.contiguous(memory_format=fmt) if cl and x.ndim == 4 else x for x in b) for b in batches]

def setup(learn, model, dtype, cl: bool):
    "Put `model` in `learn` in the variant's memory format and precision."
    learn.model, learn.opt = model.to(memory_format=torch.channels_last if cl else torch.contiguous_format), None
    learn.to_fp32()
    if dtype is not None: learn.to_bf16()
    return learn

def train_steps(learn, batches) -> float:
    "CPU seconds (this thread) of one pass of training steps over `batches`, no validation."
    learn.dls = DataLoaders(batches, None)
    c = time.thread_time()
    with contextlib.redirect_stdout(io.StringIO()): learn.fit(1, 1e-3)
    return time.thread_time() - c

def speed(learn, base, batches, rounds: int, names=None) -> dict:
    "CPU s per step of each variant: one warm-up pass, then `rounds` interleaved passes (order reversed every other)."
    names = list(names or VARIANTS)
    per = {k: [] for k in names}
    for r in range(rounds + 1):
        for k in (names if r % 2 == 0 else names[::-1]):
            dtype, cl = VARIANTS[k]
            setup(learn, copy.deepcopy(base), dtype, cl)
            t = train_steps(learn, as_format(batches, cl)) / len(batches)
            if r: per[k].append(t)
    return per

def fit_variant(learn, base, epochs_train, valid, n_epoch, lr, dtype, cl, seed) -> dict:
    "`fit_one_cycle` of one variant from the same weights and seed; final losses and metrics, CPU and wall time."
    set_seed(seed)
    setup(learn, copy.deepcopy(base), dtype, cl)
    learn.dls = DataLoaders(Epochs([as_format(b, cl) for b in epochs_train]), as_format(valid, cl))
    c, t = time.thread_time(), time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()): learn.fit_one_cycle(n_epoch, lr)
    c, t = time.thread_time() - c, time.perf_counter() - t
    row = dict(learn.recorder.values[-1])
    return {'cpu_s': c, 'wall_s': t, **{k: v for k, v in row.items() if k not in ('epoch', 'time')}}

def unet_step(args, rounds: int = 2, names=None) -> dict:
    "CPU s of one training step of the CamVid U-Net (resnet18, the synthetic 96x128 frames) per variant."
    from lessonlib.lessons.camvid import camvid_source, camvid_codes, camvid_dls, camvid_learner
    path = camvid_source('synth')
    dls = camvid_dls(path, (96, 128), bs=args.bs_seg, codes=camvid_codes(path))
    learn = camvid_learner(dls, 'resnet18', pretrained=False)
    batches, _ = take_batches(dls.train, 1)
    return speed(learn, copy.deepcopy(learn.model), batches, rounds, names)

def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--epochs', type=int, default=3)
    ap.add_argument('--n', type=int, default=600, help='synthetic Planet tiles (80%% for training)')
    ap.add_argument('--bs', type=int, default=32)
    ap.add_argument('--bs-seg', type=int, default=8, help='batch size of the U-Net step')
    ap.add_argument('--size', type=int, default=64)
    ap.add_argument('--lr', type=float, default=2e-3)
    ap.add_argument('--rounds', type=int, default=3, help='interleaved timing rounds')
    ap.add_argument('--steps', type=int, default=4, help='training steps per timing round')
    ap.add_argument('--seed', type=int, default=42)
    ap.add_argument('--no-unet', dest='unet', action='store_false')
    ap.add_argument('--unet-only', action='store_true', help='only time the U-Net step (prints, writes nothing); e.g. '
                    'with ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 to see a CPU without native bfloat16')
    ap.add_argument('--variants', default=','.join(VARIANTS), help='for --unet-only: comma-separated variants')
    ap.add_argument('--out', default=str(Path(__file__).parent/'precision.md'))
    args = ap.parse_args(argv)
    if args.unet_only:
        names = [v.strip() for v in args.variants.split(',')]
        print(machine(torch.device('cpu')), 'ATen', torch.backends.cpu.get_cpu_capability(), flush=True)
        for k, v in unet_step(args, args.rounds, names).items():
            print(f'U-Net step {k:34s} {statistics.median(v):.2f} CPU s ({min(v):.2f}-{max(v):.2f})', flush=True)
        return
    from lessonlib.lessons.planet import planet_source, planet_dls, planet_learner
    device = torch.device('cpu')
    print(machine(device), flush=True)
    set_seed(args.seed)
    path, csv, folder = planet_source('synth', n=args.n)
    dls = planet_dls(path, csv, folder, size=args.size, bs=args.bs, seed=args.seed)
    learn = planet_learner(dls, 'resnet18', pretrained=False)
    learn.device = device
    base = copy.deepcopy(learn.model)
    n_train = len(dls.train)
    epochs_train = [take_batches(dls.train, n_train)[0] for _ in range(args.epochs)]
    valid, _ = take_batches(dls.valid, len(dls.valid))
    print(f'{n_train} training batches of {args.bs} at {args.size}px, {len(valid)} validation batches', flush=True)

    per = speed(learn, base, epochs_train[0][:args.steps], args.rounds)
    ref = per['float32']
    for k, v in per.items():
        print(f'{k:34s} {statistics.median(v):.3f} s/step  ratio to float32 '
              f'{statistics.median([a / b for a, b in zip(v, ref)]):.2f}', flush=True)
    fits = {}
    for k, (dtype, cl) in VARIANTS.items():
        fits[k] = fit_variant(learn, base, epochs_train, valid, args.epochs, args.lr, dtype, cl, args.seed)
        f = fits[k]
        print(f"{k:34s} fit {f['cpu_s']:.1f} CPU s ({f['wall_s']:.1f} wall)  train {f['train_loss']:.4f} "
              f"valid {f['valid_loss']:.4f} F2 {f['fbeta']:.4f} acc {f['accuracy_thresh']:.4f}", flush=True)
    unet = unet_step(args) if args.unet else None
    if unet:
        for k, v in unet.items(): print(f'U-Net step {k:34s} {statistics.median(v):.2f} s', flush=True)

    cmd = 'python benchmarks/bench_precision.py ' + ' '.join(sys.argv[1:] if argv is None else argv)
    spread = lambda v: f'{statistics.median(v):.3f} ({min(v):.3f}–{max(v):.3f})'
    rows = []
    for k in VARIANTS:
        f, ratios = fits[k], [a / b for a, b in zip(per[k], ref)]
        rows.append(f"| {k} | {spread(per[k])} "
                    f"| **{statistics.median(ratios):.2f}** ({min(ratios):.2f}–{max(ratios):.2f}) "
                    f"| {args.bs / statistics.median(per[k]):.0f} | {f['cpu_s']:.1f} | {f['train_loss']:.4f} "
                    f"| {f['valid_loss']:.4f} | {f['fbeta']:.4f} | {f['accuracy_thresh']:.4f} |")
    threads = os.environ.get('OMP_NUM_THREADS', '')
    text = (f"# Precision and memory format on the CPU\n\nCommand: `OMP_NUM_THREADS={threads} "
            f"{cmd.strip()}`\n\nMachine: {machine(device)}.\n\n"
            f"Task: the Planet lesson's resnet18 (from scratch) at {args.size} px on the built-in synthetic tiles "
            f"({args.n} tiles: {n_train} training batches of {args.bs}, {len(valid)} validation batches), the lesson's "
            "loss and metrics (F2 and accuracy at threshold 0.2). Batches are made once with the lesson's augmentation "
            "(a new draw per epoch), so every variant trains on the same data from the same weights and seed.\n\n"
            f"Speed: CPU time of the training thread per step (batch of {args.bs}), {args.rounds} interleaved "
            "rounds of "
            f"{args.steps} steps after a warm-up; the ratio to float32 is per round (paired), below 1 is faster. "
            f"Result: `fit_one_cycle({args.epochs}, {args.lr})` per variant.\n\n"
            "| variant | CPU s/step, median (min–max) | time ratio to float32 | images/s | fit CPU s "
            "| final train loss "
            "| final valid loss | F2 | accuracy |\n|---|---|---|---|---|---|---|---|---|\n" + '\n'.join(rows) + '\n')
    if unet:
        u32 = unet['float32']
        text += ("\nOne training step of the CamVid lesson's U-Net (resnet18 encoder, 96x128 frames, batch of "
                 f"{args.bs_seg}), CPU s, median (min–max) of 2 interleaved rounds after a warm-up:\n\n"
                 "| variant | CPU s/step | ratio to float32 |\n"
                 "|---|---|---|\n" + ''.join(
                     f"| {k} | {spread(v)} | {statistics.median([a / b for a, b in zip(v, u32)]):.2f} |\n"
                     for k, v in unet.items()))
    notes = getattr(args, 'notes', '')
    if notes: text += '\n' + notes + '\n'
    if args.out:
        with atomic_path(args.out) as tmp: Path(tmp).write_text(text)
        print(f'wrote {args.out}')
    return per, fits, unet


if __name__ == '__main__':
    main()
