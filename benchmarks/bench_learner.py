"""How much does the Learner cost over a plain PyTorch loop?

Times `Learner.fit` against a plain loop doing the same work (same model, batches, optimizer, loss)
in one process, for a tiny model (where per-batch overhead dominates) and a resnet18 at 64 px,
and `lr_find` (100 iterations) against 100 plain training steps. Prints seconds per batch and ratios.

Usage: python benchmarks/bench_learner.py [--device cpu|cuda] [--repeats 3] [--batches N] [--only fit|lr_find]
"""
import argparse, copy, statistics, time
import torch, torch.nn as nn, torch.nn.functional as F
import torchvision
from lessonlib.core import set_seed
from lessonlib.data import DataLoaders
from lessonlib.learner import Learner
from lessonlib.optim import adamw, one_group, param_groups


def sync(device):
    if device.type == 'cuda': torch.cuda.synchronize()


def plain_fit(model, batches, device, lr=1e-3):
    "The reference: the loop everybody writes by hand."
    opt = adamw(param_groups(model, one_group(model)), lr=lr)   # the same groups: no weight decay on batch norm and biases
    model.train()
    for xb, yb in batches:
        xb, yb = xb.to(device, non_blocking=True), yb.to(device, non_blocking=True)
        loss = F.cross_entropy(model(xb), yb)
        loss.backward(); opt.step(); opt.zero_grad(set_to_none=True)
    sync(device)


def learner_fit(model, batches, device, lr=1e-3):
    learn = Learner(DataLoaders(batches, None), model, loss_func=F.cross_entropy, device=device)
    learn.fit(1, lr)
    sync(device)


def learner_lr_find(model, batches, device):
    learn = Learner(DataLoaders(batches, None), model, loss_func=F.cross_entropy, device=device)
    learn.lr_find(num_it=len(batches), stop_div=False, show_plot=False)
    sync(device)


def timed(f, *args):
    t = time.perf_counter(); f(*args); return time.perf_counter() - t


def compare(name, make_model, batches, device, repeats, fns):
    "Alternate the runs (warm-up first) and report the median seconds per batch of each."
    base = make_model().to(device)
    times = {k: [] for k in fns}
    for f in fns.values(): f(copy.deepcopy(base), batches[:3], device)   # warm-up
    for _ in range(repeats):
        for k, f in fns.items(): times[k].append(timed(f, copy.deepcopy(base), batches, device) / len(batches))
    med = {k: statistics.median(v) for k, v in times.items()}
    ref = list(fns)[0]
    for k, v in med.items():
        extra = ''
        if k != ref:   # the ratio of each repeat's pair (run side by side, so load hits both alike): median and range
            rs = sorted(a / b for a, b in zip(times[k], times[ref]))
            extra = (f'   ratio {statistics.median(rs):.3f} ({(statistics.median(rs) - 1) * 100:+.1f}%; '
                     f'range {rs[0]:.3f}-{rs[-1]:.3f} over {len(rs)} pairs)')
        print(f'{name:24s} {k:16s} {v * 1000:9.3f} ms/batch{extra}')
    return med


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    ap.add_argument('--repeats', type=int, default=3)
    ap.add_argument('--batches', type=int, default=100, help='batches per timed run')
    ap.add_argument('--only', choices=['fit', 'lr_find'], default=None, help='run only the Learner.fit or the lr_find comparison')
    args = ap.parse_args()
    device = torch.device(args.device)
    torch.set_num_threads(torch.get_num_threads())
    print(f'device {device}, torch {torch.__version__}, {torch.get_num_threads()} threads, '
          f'{args.batches} batches per run, median of {args.repeats}')
    set_seed(0)
    n = args.batches if device.type == 'cuda' else max(args.batches // 5, 10)
    img_batches = [(torch.randn(32, 3, 64, 64), torch.randint(0, 10, (32,))) for _ in range(n)]
    r18 = lambda: torchvision.models.resnet18(num_classes=10)
    if args.only == 'lr_find':
        compare('lr_find vs steps', r18, img_batches, device, args.repeats, {'plain loop': plain_fit, 'lr_find': learner_lr_find})
        return
    tiny_batches = [(torch.randn(64, 20), torch.randint(0, 5, (64,))) for _ in range(args.batches * 5)]
    tiny = lambda: nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 5))
    compare('tiny MLP (bs 64)', tiny, tiny_batches, device, args.repeats, {'plain loop': plain_fit, 'Learner.fit': learner_fit})

    compare('resnet18 64px (bs 32)', r18, img_batches, device, args.repeats, {'plain loop': plain_fit, 'Learner.fit': learner_fit})
    if args.only == 'fit': return
    compare('lr_find vs steps', r18, img_batches, device, args.repeats, {'plain loop': plain_fit, 'lr_find': learner_lr_find})


if __name__ == '__main__':
    main()
