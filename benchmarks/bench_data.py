"""How fast does the data pipeline feed a model? Planet-format 256 px JPEGs into 128 px batches.

Compares, in images per second (median of `--repeats` full passes after a warm-up pass):
- naive: a plain torch `Dataset` doing `Image.open(fn).convert('RGB').resize((128, 128))` (full 256 px decode,
  then resize) → uint8 tensor, through a plain torch `DataLoader`;
- presized, item pipeline only: lessonlib's `DataBlock` with `item_tfms=Resize(128)`, so the JPEG is decoded
  reduced (PIL draft mode, 256 → 128 in the decoder) and the resize is a no-op; no batch transforms at all;
- presized + batch transforms: the same loader with its batch transforms on the CPU (IntToFloat, Normalize and
  `aug_transforms(flip_vert=True, max_lighting=0.1, max_zoom=1.05, max_warp=0.)`);
each with num_workers 0 and 2. Then end to end: three epochs of `Learner.fit(1)` (fbeta metric, train + valid, 80/20
split) at 128 px for each num_workers, and the same epochs on the pipeline's batches held in memory (the model's share).

Every pass makes a fresh iterator, as a training epoch does: the plain torch loaders start their workers each time,
lessonlib's loaders keep theirs from the warm-up pass on (persistent workers).
The data set is painted once by `make_planet` and cached (`--dest`, default in the temp folder).

--aug-ratio instead: the data path with and without the augmentation (img/s), and the training epoch of `--arch` with
and without it (seconds, and their ratio pair by pair).

Usage: python benchmarks/bench_data.py [--aug-ratio] [--n 512] [--bs 64] [--repeats 3] [--threads T] [--arch simple_cnn|resnet18] [--quick]
"""
import argparse, copy, math, os, platform, statistics, tempfile, time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image

from lessonlib.core import set_seed
from lessonlib.data import IMAGE, DataLoaders, DataBlock, MultiCategoryBlock, ColReader, FuncSplitter, RandomSplitter
from lessonlib.vision.data import ImageBlock, Resize
from lessonlib.vision.augment import aug_transforms, AffineAug, Lighting
from lessonlib.vision.models import simple_cnn, create_vision_model, vision_split
from lessonlib.learner import Learner
from lessonlib.optim import one_group
from lessonlib.callbacks import ProgressCallback
from lessonlib.metrics import fbeta
from lessonlib.synth.planet import make_planet, PLANET_TAGS

SRC, OUT = 256, 128


class NaiveDataset(torch.utils.data.Dataset):
    "Full decode, then resize: `(uint8 CHW image, multi-hot float target)`."
    def __init__(self, fns, tags, size=OUT):
        self.fns, self.size = list(fns), size
        idx = {t: i for i, t in enumerate(PLANET_TAGS)}
        self.ys = torch.zeros(len(tags), len(PLANET_TAGS))
        for r, ts in enumerate(tags):
            for t in ts.split(): self.ys[r, idx[t]] = 1.
    def __len__(self): return len(self.fns)
    def __getitem__(self, i):
        im = Image.open(self.fns[i]).convert('RGB').resize((self.size, self.size))
        return torch.from_numpy(np.array(im, dtype=np.uint8)).permute(2, 0, 1), self.ys[i]


def planet_block(valid_pct=None, seed=42):
    "The lesson's Planet DataBlock at 128 px; `valid_pct=None` puts every item in the training split."
    splitter = FuncSplitter(lambda r: False) if valid_pct is None else RandomSplitter(valid_pct, seed)
    return lambda path: DataBlock(
        blocks=(ImageBlock, MultiCategoryBlock),
        get_x=ColReader(0, pref=path/'train-jpg', suff='.jpg'), get_y=ColReader(1, label_delim=' '),
        splitter=splitter, item_tfms=Resize(OUT),
        batch_tfms=aug_transforms(flip_vert=True, max_lighting=0.1, max_zoom=1.05, max_warp=0.))


def one_pass(loader):
    "Seconds for one full pass over `loader` (fresh iterator) and the number of images it gave."
    t, n = time.perf_counter(), 0
    for b in loader: n += b[0].shape[0]
    return time.perf_counter() - t, n


def images_per_s(loaders, repeats):
    """Median images/s of each loader over `repeats` passes after one warm-up pass each; the configurations take
    turns pass by pass, so a change of machine load hits them all alike. Returns {name: (median, rates, images/pass)}."""
    for dl in loaders.values(): one_pass(dl)
    runs = {k: [] for k in loaders}
    for _ in range(repeats):
        for k, dl in loaders.items(): runs[k].append(one_pass(dl))
    return {k: (statistics.median(n / t for t, n in r), [n / t for t, n in r], r[0][1]) for k, r in runs.items()}


def check_same_pixels(naive_ds, dls):
    "Sanity: both paths give 128 px uint8 images of the same tile (they differ a little: draft decode vs resize)."
    x_naive = naive_ds[0][0]
    x_lib = dls.train.dataset[0][0]        # item 0 with the train pipeline (Resize is a no-op at 256 → 128)
    assert x_naive.shape == x_lib.shape == (3, OUT, OUT) and x_naive.dtype == x_lib.dtype == torch.uint8
    return (x_naive.float() - x_lib.float()).abs().mean().item()


def end_to_end(path, df, arch, bs, workers, epochs=3):
    """Epoch times of `Learner.fit(1)` (train + valid, fbeta metric) at 128 px on the CPU: {num_workers: [seconds per
    epoch]} plus 'in memory': the same epochs on the pipeline's batches held in memory (the model's share); the last
    metrics of each, and the split sizes. Each run starts from the same initial weights."""
    set_seed(0)
    blk = planet_block(valid_pct=0.2)(path)
    dls = {nw: blk.dataloaders(df, bs=bs, device='cpu', num_workers=nw) for nw in workers}
    d0 = dls[workers[0]]
    if arch == 'simple_cnn': model, splitter = simple_cnn(len(d0.vocab)), one_group
    else: model, splitter = create_vision_model(arch, len(d0.vocab), pretrained=False), vision_split
    def make(data):
        learn = Learner(data, copy.deepcopy(model), metrics=[fbeta], splitter=splitter, device='cpu', lr=3e-3,
                        loss_func=d0.loss_func())
        learn.cbs = [cb for cb in learn.cbs if not isinstance(cb, ProgressCallback)]
        return learn
    learners = {nw: make(d) for nw, d in dls.items()}
    learners['in memory'] = make(DataLoaders(list(d0.train), list(d0.valid)))   # the same pipeline's output, held in memory
    times = {k: [] for k in learners}
    for _ in range(epochs):              # the configurations take turns epoch by epoch: a change of load hits all alike
        for k, learn in learners.items():
            t = time.perf_counter(); learn.fit(1); times[k].append(time.perf_counter() - t)
    res = {}
    for k, learn in learners.items():
        last = learn.recorder.values[-1]
        res[k] = times[k], {a: float(v) for a, v in last.items() if a not in ('epoch', 'time') and v is not None}
    return res, len(d0.train_ds), len(d0.valid_ds)


class AffineBefore(AffineAug):
    "The lesson's `AffineAug` with its grid made by `F.affine_grid`, as before (benchmarks/speed.md): for comparison."
    def __call__(self, xs, kinds, train=False):
        import torch.nn.functional as F
        from lessonlib.vision.augment import eye_mats, resample
        i = next((j for j, k in enumerate(kinds) if k == IMAGE), None)
        if i is None or not train: return xs
        n, (h, w) = xs[i].shape[0], xs[i].shape[-2:]
        mats = self.mats(n, h, w, xs[i].device)
        grid = F.affine_grid(mats[:, :2] / mats[:, 2:, 2:], (n, 1, h, w), align_corners=False)
        return tuple(resample(x, grid, k, self.pad_mode, self.mode) if k == IMAGE else x for x, k in zip(xs, kinds))

class LightingBefore(Lighting):
    "`Lighting` with its clamp a pass of its own, as before (benchmarks/speed.md): for comparison."
    def encodes(self, x, kind, train):
        from lessonlib.vision.augment import _maybe, _uniform
        if kind != IMAGE or not train: return x
        n, d, ml = x.shape[0], x.device, self.max_lighting
        bright = _maybe(_uniform(n, 0.5 * (1 - ml), 0.5 * (1 + ml), d), self.p, 0.5)
        contrast = _maybe(torch.exp(_uniform(n, math.log(1 - ml), -math.log(1 - ml), d)), self.p, 1.)
        shape = (n,) + (1,) * (x.ndim - 1)
        return x.clamp(1e-5, 1 - 1e-5).logit_().mul_(contrast.view(shape)).add_(torch.logit(bright).view(shape)).sigmoid_()

def as_before(dl):
    "The same loader with the augmentation as it was before (for the before/after figures)."
    swap = lambda t: (AffineBefore(**{k: getattr(t, k) for k in ('flip_vert', 'max_rotate', 'min_zoom', 'max_zoom', 'max_warp',
                                                                  'p_affine', 'mode', 'pad_mode', 'do_flip')})
                      if isinstance(t, AffineAug) else LightingBefore(t.max_lighting, t.p) if isinstance(t, Lighting) else t)
    return dl.new(batch_tfms=[swap(t) for t in dl.batch_tfms])

def no_aug(dl):
    "The same loader without the augmentation (its batch transforms less `AffineAug` and `Lighting`)."
    return dl.new(batch_tfms=[t for t in dl.batch_tfms if not isinstance(t, (AffineAug, Lighting))])


def aug_breakdown(bs, repeats=15, size=OUT):
    """Milliseconds per batch of `bs` float images of `size` px for the parts of the lesson's augmentation, each timed in
    turns (median): the sampling grid by broadcasting (`make_grid`) and by `F.affine_grid` (how it was made before),
    the `grid_sample`, and `Lighting`."""
    import torch.nn.functional as F
    from lessonlib.vision.augment import make_grid
    aff, light = aug_transforms(flip_vert=True, max_lighting=0.1, max_zoom=1.05, max_warp=0.)
    x = torch.rand(bs, 3, size, size)
    m = aff.mats(bs, size, size, 'cpu')
    g = make_grid(m, (size, size), False)
    parts = {'grid: broadcast (make_grid)': lambda: make_grid(m, (size, size), False),
             'grid: F.affine_grid (before)': lambda: F.affine_grid(m[:, :2], (bs, 1, size, size), align_corners=False),
             'grid_sample (bilinear, reflection)': lambda: F.grid_sample(x, g, 'bilinear', 'reflection', False),
             'Lighting': lambda: light.encodes(x, 'image', True)}
    times = {k: [] for k in parts}
    for f in parts.values(): f()
    for _ in range(repeats):
        for k, f in parts.items():
            t = time.perf_counter(); f(); times[k].append(time.perf_counter() - t)
    return {k: (statistics.median(v) * 1000, min(v) * 1000, max(v) * 1000) for k, v in times.items()}


def aug_epoch_ratio(path, df, arch, bs, repeats, nw=0):
    """Seconds of a training epoch (`Learner.fit(1)` on the training loader alone) with the lesson's augmentation and
    without it, `repeats` pairs run in turns after a warm-up of each; {name: [seconds]} and the per-pair ratios."""
    set_seed(0)
    dls = planet_block(valid_pct=0.2)(path).dataloaders(df, bs=bs, device='cpu', num_workers=nw)
    dl, c = dls.train, len(dls.vocab)
    loaders = {'augmented': dl, 'not augmented': no_aug(dl)}
    model = create_vision_model(arch, c, pretrained=False) if arch != 'simple_cnn' else simple_cnn(c)
    def epoch(d):
        learn = Learner(DataLoaders(d, None), copy.deepcopy(model), device='cpu', loss_func=torch.nn.BCEWithLogitsLoss())
        learn.cbs = [cb for cb in learn.cbs if not isinstance(cb, ProgressCallback)]
        t = time.perf_counter(); learn.fit(1); return time.perf_counter() - t
    for d in loaders.values(): epoch(d)
    times = {k: [] for k in loaders}
    for _ in range(repeats):
        for k, d in loaders.items(): times[k].append(epoch(d))
    return times, sorted(a / b for a, b in zip(times['augmented'], times['not augmented'])), len(dl) * bs


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--n', type=int, default=512, help='number of 256 px tiles')
    ap.add_argument('--bs', type=int, default=64)
    ap.add_argument('--repeats', type=int, default=3, help='timed passes per configuration (after one warm-up)')
    ap.add_argument('--workers', type=int, nargs='+', default=[0, 2])
    ap.add_argument('--arch', default='simple_cnn', help="model for the end-to-end epoch: simple_cnn or a torchvision name (e.g. resnet18, random init)")
    ap.add_argument('--no-e2e', action='store_true', help='skip the end-to-end epochs (with --aug-ratio: the training epochs)')
    ap.add_argument('--aug-ratio', action='store_true',
                    help='only: the training epoch with augmentation against without (--arch, --repeats pairs), and the data '
                         'path alone with and without augmentation (--workers)')
    ap.add_argument('--dest', default=None, help='where to cache the data set (default: <tmp>/lessonlib_bench/planet_256_<n>)')
    ap.add_argument('--threads', type=int, default=None,
                    help='torch intra-op threads in the main process (default: torch\'s choice; workers always use 1). '
                         'On a loaded machine 1 can be much faster: idle-waiting OpenMP threads stall small ops like the collate stack')
    ap.add_argument('--quick', action='store_true', help='a smoke run: n=128, bs=32, 1 repeat')
    args = ap.parse_args()
    if args.quick: args.n, args.bs, args.repeats = min(args.n, 128), min(args.bs, 32), 1

    if args.threads: torch.set_num_threads(args.threads)
    load = os.getloadavg() if hasattr(os, 'getloadavg') else None
    print(f'{platform.node()}: {os.cpu_count()} CPUs, load average {load and " ".join(f"{x:.2f}" for x in load)}; '
          f'torch {torch.__version__} ({torch.get_num_threads()} threads), Pillow {Image.__version__}')
    dest = Path(args.dest) if args.dest else Path(tempfile.gettempdir())/'lessonlib_bench'/f'planet_{SRC}_{args.n}'
    t = time.perf_counter()
    path = make_planet(dest, n=args.n, size=SRC)
    df = pd.read_csv(path/'train_v2.csv')
    print(f'data: {len(df)} tiles of {SRC} px in {path} ({time.perf_counter() - t:.1f}s to make or find); '
          f'bs {args.bs}, median of {args.repeats} passes after a warm-up\n')

    if args.aug_ratio:
        dls = {nw: planet_block()(path).dataloaders(df, bs=args.bs, device='cpu', num_workers=nw) for nw in args.workers}
        loaders = {}
        for nw in args.workers:
            loaders['data path, augmented', nw] = dls[nw].train
            loaders['data path, augmented as before', nw] = as_before(dls[nw].train)
            loaders['data path, not augmented', nw] = no_aug(dls[nw].train)
        for (name, nw), (med, rates, n) in images_per_s(loaders, args.repeats).items():
            print(f'{name:32s} workers {nw}: {med:6.0f} img/s  (passes: {", ".join(f"{r:.0f}" for r in rates)}; {n} img/pass)')
        for k, (med, lo, hi) in aug_breakdown(args.bs).items():
            print(f'  {k:36s} {med:7.1f} ms per batch of {args.bs} (range {lo:.1f}-{hi:.1f})')
        if args.no_e2e: return
        times, ratios, n = aug_epoch_ratio(path, df, args.arch, args.bs, args.repeats, args.workers[0])
        for k, v in times.items():
            print(f'training epoch, {k:14s}: median {statistics.median(v):6.2f} s  ({", ".join(f"{x:.2f}" for x in v)}; '
                  f'{n} images, {args.arch} at {OUT} px, workers {args.workers[0]})')
        print(f'augmented / not augmented epoch: median {statistics.median(ratios):.3f}, range {ratios[0]:.3f}-{ratios[-1]:.3f} '
              f'over {len(ratios)} pairs')
        return

    naive_ds = NaiveDataset([path/'train-jpg'/f'{n}.jpg' for n in df.image_name], df.tags)
    dls = {nw: planet_block()(path).dataloaders(df, bs=args.bs, device='cpu', num_workers=nw) for nw in args.workers}
    diff = check_same_pixels(naive_ds, dls[args.workers[0]])

    loaders = {}
    for nw in args.workers:
        loaders['naive: full decode + resize', nw] = torch.utils.data.DataLoader(
            naive_ds, batch_size=args.bs, shuffle=True, drop_last=True, num_workers=nw)
        loaders['presized: item pipeline only', nw] = dls[nw].train.new(batch_tfms=[])
        loaders['presized + batch tfms (CPU)', nw] = dls[nw].train
    res = images_per_s(loaders, args.repeats)
    order = sorted(res, key=lambda k: (list(dict.fromkeys(n for n, _ in res)).index(k[0]), k[1]))
    rows = [(name, nw, *res[name, nw]) for name, nw in order]
    for name, nw, med, rates, n in rows:
        print(f'  {name:30s} workers {nw}: {med:6.0f} img/s  (passes: {", ".join(f"{r:.0f}" for r in rates)}; {n} img/pass)')

    print(f'\n{"path":30s} {"workers":>7s} {"img/s":>8s} {"vs naive":>9s} {"ms/img":>7s}')
    base = {nw: med for name, nw, med, _, _ in rows if name.startswith('naive')}
    for name, nw, med, _, _ in rows:
        print(f'{name:30s} {nw:7d} {med:8.0f} {med / base[nw]:8.2f}x {1000 / med:7.2f}')
    print(f'(mean |naive - presized| pixel difference on one image: {diff:.1f} / 255: draft decode, no resize vs full decode + resize (Pillow default: bicubic))')

    if not args.no_e2e:
        print(f'\nend to end: {args.arch} (random init) at {OUT} px, bs {args.bs}, Learner.fit(1) three times with fbeta, CPU')
        res, n_trn, n_val = end_to_end(path, df, args.arch, args.bs, args.workers)
        print(f'{n_trn} train + {n_val} valid images per epoch')
        print(f'{"data":22s} {"epoch 1 s":>9s} {"later, median s":>15s} {"train img/s":>11s}   metrics after the last epoch')
        for k, (times, metrics) in res.items():
            name = 'batches in memory' if k == 'in memory' else f'presized, workers {k}'
            m = ', '.join(f'{a} {v:.4f}' for a, v in metrics.items())
            later = statistics.median(times[1:])
            print(f'{name:22s} {times[0]:9.2f} {later:15.2f} {n_trn / later:11.0f}   {m}')
        print('(epoch 1 includes starting the workers; later epochs reuse them. train img/s = training images / whole epoch time '
              '(median of the later epochs), validation included; "batches in memory" is the '
              'model\'s share: the rest of an epoch is the data pipeline)')
    load = os.getloadavg() if hasattr(os, 'getloadavg') else None
    print(f'\nload average at the end: {load and " ".join(f"{x:.2f}" for x in load)}')


if __name__ == '__main__':
    main()
