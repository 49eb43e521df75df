"""lessonlib against fastai on one identical from-scratch task.

Same data (32 px synthetic coloured shapes, made in memory from a fixed seed), same model (a small
ResNet-style CNN in plain PyTorch, one initialisation per seed, deep-copied into both learners), same
batches in the same order (one fixed-order loader class feeds both), same budget (Adam one-cycle,
4 epochs, batch size 64), over a grid of learning rates and seeds. Final validation accuracy is
measured by one function of ours on each trained model, so the libraries' metrics play no part.

Needs fastai and lessonlib in one environment (fastai is not a lessonlib dependency), e.g.
    python3 -m venv /tmp/fastai-venv && /tmp/fastai-venv/bin/pip install torch torchvision fastai
    /tmp/fastai-venv/bin/pip install --no-deps -e .

Usage:
    python benchmarks/bench_vs_fastai.py                      # the grid: 12 lrs x 2 seeds x 2 libraries
    python benchmarks/bench_vs_fastai.py --variants           # also lessonlib without wd on BN/bias and
                                                              # fastai with it (wd_bn_bias=True)
    python benchmarks/bench_vs_fastai.py --trace --lrs 1e-2   # per-step lr/mom/wd/betas/eps of both,
                                                              # one step's update on the same gradients
    python benchmarks/bench_vs_fastai.py --check-moms         # one-cycle momentum reaches Adam's beta1
                                                              # and SGD's momentum at every step
"""
import argparse, copy, json, math, time
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

N_CLASSES = 5
CLASSES = ('disc', 'ring', 'square', 'triangle', 'cross')


# ----------------------------------------------------------------------------------------------- data
def make_shapes(n: int, seed: int, size: int = 32, noise: float = 0.06, contrast=(0.3, 0.8), radius=(7, 12)):
    "`n` images (n, 3, size, size) of one coloured shape each on a noisy background, and their labels."
    rng = np.random.default_rng(seed)
    y = rng.integers(0, N_CLASSES, n)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    imgs = np.empty((n, 3, size, size), np.float32)
    for i in range(n):
        r = rng.uniform(*radius)
        cx, cy = rng.uniform(r, size - r, 2)
        th = rng.uniform(0, 2 * np.pi)
        dx, dy = xx - cx, yy - cy
        u, v = dx * np.cos(th) + dy * np.sin(th), -dx * np.sin(th) + dy * np.cos(th)
        d = np.sqrt(dx ** 2 + dy ** 2)
        k = y[i]
        if k == 0: mask = d < r
        elif k == 1: mask = (d < r) & (d > 0.55 * r)
        elif k == 2: mask = (np.abs(u) < 0.8 * r) & (np.abs(v) < 0.8 * r)
        elif k == 3: mask = (v > -0.5 * r) & (np.sqrt(3) * np.abs(u) + v < r)
        else: mask = ((np.abs(u) < 0.3 * r) & (np.abs(v) < r)) | ((np.abs(v) < 0.3 * r) & (np.abs(u) < r))
        bg = rng.uniform(0.2, 0.8, 3).astype(np.float32)
        delta = rng.normal(size=3)
        delta = delta / np.linalg.norm(delta) * rng.uniform(*contrast)
        img = bg[:, None, None] + mask[None].astype(np.float32) * delta[:, None, None].astype(np.float32)
        img = img + rng.normal(0, noise, img.shape).astype(np.float32)
        imgs[i] = np.clip(img, 0, 1)
    x = (torch.from_numpy(imgs) - 0.5) / 0.25   # roughly zero mean, unit variance
    return x, torch.from_numpy(y).long()


class FixedLoader:
    "Batches of (x, y) in an order fixed by `seed` and the epoch number: every library sees the same ones."
    def __init__(self, x, y, bs: int = 64, shuffle: bool = False, drop_last: bool = False, seed: int = 0):
        self.x, self.y, self.bs, self.shuffle, self.drop_last, self.seed = x, y, bs, shuffle, drop_last, seed
        self.epoch = 0

    def __len__(self):
        n = len(self.x)
        return n // self.bs if self.drop_last else math.ceil(n / self.bs)

    def __iter__(self):
        n = len(self.x)
        gen = torch.Generator().manual_seed(self.seed * 1000 + self.epoch)
        idx = torch.randperm(n, generator=gen) if self.shuffle else torch.arange(n)
        self.epoch += 1
        for i in range(len(self)):
            b = idx[i * self.bs:(i + 1) * self.bs]
            yield self.x[b], self.y[b]


# ---------------------------------------------------------------------------------------------- model
def conv_bn(ni, nf, stride=1, act=True):
    layers = [nn.Conv2d(ni, nf, 3, stride, 1, bias=False), nn.BatchNorm2d(nf)]
    if act: layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class ResBlock(nn.Module):
    def __init__(self, ni, nf, stride=1):
        super().__init__()
        self.convs = nn.Sequential(conv_bn(ni, nf, stride), conv_bn(nf, nf, act=False))
        pool = nn.AvgPool2d(stride) if stride > 1 else nn.Identity()
        self.idconv = nn.Identity() if ni == nf and stride == 1 else nn.Sequential(
            pool, nn.Conv2d(ni, nf, 1, bias=False), nn.BatchNorm2d(nf))

    def forward(self, x): return F.relu(self.convs(x) + self.idconv(x))


def make_model(seed: int, width: int = 16) -> nn.Module:
    "A small ResNet: conv-bn-relu stem (stride 2), three residual blocks (the last two halve the size), pool, head."
    torch.manual_seed(seed)
    w = width
    return nn.Sequential(conv_bn(3, w, stride=2), ResBlock(w, w), ResBlock(w, 2 * w, 2), ResBlock(2 * w, 4 * w, 2),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4 * w, N_CLASSES))


NORM_TYPES = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm, nn.modules.instancenorm._InstanceNorm)


def bn_bias_params(model: nn.Module) -> list:
    "Parameters of normalisation layers and every bias (fastai's `norm_bias_params(m, with_bias=True)`)."
    out, seen = [], set()
    for m in model.modules():
        ps = list(m.parameters(recurse=False)) if isinstance(m, NORM_TYPES) else \
            [m.bias] if isinstance(getattr(m, 'bias', None), nn.Parameter) else []
        for p in ps:
            if id(p) not in seen: seen.add(id(p)); out.append(p)
    return out


@torch.no_grad()
def evaluate(model, x, y, bs=500) -> float:
    "Accuracy of `model` (in eval mode) on (x, y): one function for both libraries."
    model.eval()
    preds = torch.cat([model(x[i:i + bs]).argmax(1) for i in range(0, len(x), bs)])
    return (preds == y).float().mean().item()


# -------------------------------------------------------------------------------------------- lessonlib
def run_lessonlib(model, data, lr, seed, epochs=4, bs=64, wd_bn_bias=True, cbs=(), drop_last=True, order=0):
    "Train `model` with lessonlib's Learner.fit_one_cycle; `wd_bn_bias=False` exempts BN/bias from weight decay."
    from lessonlib.data import DataLoaders
    from lessonlib.learner import Learner
    from lessonlib.callbacks import Callback
    from lessonlib.metrics import accuracy
    (xt, yt), (xv, yv) = data
    train = FixedLoader(xt, yt, bs, shuffle=True, drop_last=drop_last, seed=seed + 1000 * order)
    dls = DataLoaders(train, FixedLoader(xv, yv, bs))
    cbs = list(cbs)
    kw = {}
    if not wd_bn_bias:
        no_wd = {id(p) for p in bn_bias_params(model)}
        kw['splitter'] = lambda m: [[p for p in m.parameters() if id(p) not in no_wd],
                                    [p for p in m.parameters() if id(p) in no_wd]]

        class NoWdOnSecondGroup(Callback):
            "`fit` sets one wd in every group before the callbacks run: take it off the BN/bias group after."
            order = 0
            def before_fit(self, learn): learn.opt.param_groups[1]['weight_decay'] = 0.
        cbs.append(NoWdOnSecondGroup())
    learn = Learner(dls, model, loss_func=nn.CrossEntropyLoss(), metrics=accuracy, cbs=cbs, device='cpu', **kw)
    for cb in learn.cbs:
        if type(cb).__name__ == 'ProgressCallback': learn.remove_cb(cb)
    learn.fit_one_cycle(epochs, lr)
    return learn, learn.recorder.values[-1]['accuracy']


# ----------------------------------------------------------------------------------------------- fastai
def run_fastai(model, data, lr, seed, epochs=4, bs=64, wd_bn_bias=False, cbs=(), drop_last=True, order=0):
    "Train `model` with fastai's Learner(opt_func=Adam).fit_one_cycle (its defaults: wd_bn_bias=False)."
    from fastai.data.core import DataLoaders
    from fastai.learner import Learner
    from fastai.losses import CrossEntropyLossFlat
    from fastai.metrics import accuracy
    from fastai.optimizer import Adam
    import fastai.callback.progress   # noqa: F401  (adds Learner.no_bar)
    import fastai.callback.schedule   # noqa: F401  (adds Learner.fit_one_cycle)
    (xt, yt), (xv, yv) = data
    train = FixedLoader(xt, yt, bs, shuffle=True, drop_last=drop_last, seed=seed + 1000 * order)
    dls = DataLoaders(train, FixedLoader(xv, yv, bs))
    learn = Learner(dls, model, loss_func=CrossEntropyLossFlat(), metrics=accuracy, opt_func=Adam,
                    wd_bn_bias=wd_bn_bias, cbs=list(cbs))
    with learn.no_logging(), learn.no_bar(): learn.fit_one_cycle(epochs, lr)
    return learn, float(learn.recorder.values[-1][-1])


# ---------------------------------------------------------------------------------------- the grid
def grid(args, data):
    lrs = args.lrs or list(np.geomspace(1e-4, 3e-1, 12))
    runs = [('lessonlib', run_lessonlib, {}), ('fastai', run_fastai, {})]
    if args.variants:
        runs += [('lessonlib no-wd-bn-bias', run_lessonlib, {'wd_bn_bias': False}),
                 ('fastai wd_bn_bias=True', run_fastai, {'wd_bn_bias': True})]
    if args.order_noise:
        runs += [('lessonlib other order', run_lessonlib, {'order': 1}), ('fastai other order', run_fastai, {'order': 1})]
    if args.only: runs = [r for r in runs if r[0] in args.only]
    res = []
    for seed in args.seeds:
        init = make_model(seed, args.width)
        for lr in lrs:
            row = {'seed': seed, 'lr': float(lr)}
            for name, run, kw in runs:
                torch.manual_seed(seed)
                t = time.time()
                learn, rec = run(copy.deepcopy(init), data, float(lr), seed, epochs=args.epochs, **kw)
                row[name] = evaluate(learn.model, *data[1])
                row[name + ' (recorded)'] = rec
                row[name + ' s'] = time.time() - t
            res.append(row)
            print(f"seed {seed} lr {lr:.2e}  " + '  '.join(f"{n}: {row[n]:.3f}" for n, _, _ in runs), flush=True)
    names = [n for n, _, _ in runs]
    print(f"\n| lr | " + ' | '.join(f'{n} s{s}' for s in args.seeds for n in names) + ' |')
    print('|---' * (1 + len(names) * len(args.seeds)) + '|')
    for lr in lrs:
        cells = [f"{r[n]:.3f}" for s in args.seeds for r in res if r['seed'] == s and r['lr'] == float(lr) for n in names]
        print(f"| {lr:.2e} | " + ' | '.join(cells) + ' |')
    print()
    for s in args.seeds:
        rs = [r for r in res if r['seed'] == s]
        print(f"seed {s} best: " + '  '.join(
            f"{n} {max(r[n] for r in rs):.3f} (lr {max(rs, key=lambda r: r[n])['lr']:.1e})" for n in names))
    gaps = {n: np.mean([max(r[n] for r in res if r['seed'] == s) for s in args.seeds]) for n in names}
    print('mean over seeds of the best: ' + '  '.join(f"{n} {v:.3f}" for n, v in gaps.items()))
    for a, b in [('lessonlib', 'fastai'), ('lessonlib no-wd-bn-bias', 'fastai'), ('lessonlib', 'fastai wd_bn_bias=True'),
                 ('lessonlib', 'lessonlib other order'), ('fastai', 'fastai other order')]:
        if a in names and b in names:
            d = [abs(r[a] - r[b]) for r in res]
            print(f"per-run |{a} - {b}|: mean {np.mean(d):.4f}, max {np.max(d):.4f}")
    if args.json:
        with open(args.json, 'w') as f: json.dump(res, f, indent=1)
    return res


# ------------------------------------------------------------------------------------- instrumentation
def trace(args, data):
    "Per-step hyper-parameters both optimizers use, and one step's update from the same weights and gradients."
    from lessonlib.callbacks import Callback as LCallback
    from fastai.callback.core import Callback as FCallback
    lr, seed = (args.lrs or [1e-2])[0], args.seeds[0]
    init = make_model(seed, args.width)
    bnb = {id(p) for p in bn_bias_params(init)}

    class LTrace(LCallback):
        order = 100
        def __init__(self): self.rows = []
        def after_backward(self, learn):
            g = learn.opt.param_groups[0]
            self.rows.append((g['lr'], g['betas'][0], g['betas'][1], g['eps'], g['weight_decay'], learn.model.training))

    class FTrace(FCallback):
        order = 100
        def __init__(self): self.rows = []
        def before_step(self):
            h = self.learn.opt.hypers[0]
            do_wd = [self.learn.opt.state[p].get('do_wd', True) for p in self.learn.opt.all_params(with_grad=True).itemgot(0)]
            self.rows.append((h['lr'], h['mom'], h['sqr_mom'], h['eps'], h['wd'], self.learn.model.training, do_wd))

    lt, ft = LTrace(), FTrace()
    ll, _ = run_lessonlib(copy.deepcopy(init), data, lr, seed, epochs=args.epochs, cbs=[lt])
    fl, _ = run_fastai(copy.deepcopy(init), data, lr, seed, epochs=args.epochs, cbs=[ft])
    n = min(len(lt.rows), len(ft.rows))
    print(f"steps: lessonlib {len(lt.rows)}, fastai {len(ft.rows)}")
    for k, name in enumerate(['lr', 'beta1/mom', 'beta2/sqr_mom', 'eps', 'wd']):
        d = max(abs(lt.rows[i][k] - ft.rows[i][k]) for i in range(n))
        print(f"  {name:14s} max |lessonlib - fastai| over steps {d:.3g}   "
              f"(first {lt.rows[0][k]:.4g} / {ft.rows[0][k]:.4g}, last {lt.rows[n-1][k]:.4g} / {ft.rows[n-1][k]:.4g})")
    print(f"  model.train() at every step: lessonlib {all(r[5] for r in lt.rows)}, fastai {all(r[5] for r in ft.rows)}")
    params = list(fl.model.parameters())
    exempt = [pi for pi, p in enumerate(params) if id(list(init.parameters())[pi]) in bnb]
    no_wd_f = [pi for pi, f in enumerate(ft.rows[0][6]) if not f]
    print(f"  fastai params with do_wd=False: {len(no_wd_f)} of {len(params)}; BN/bias params: {len(exempt)}; "
          f"same set: {no_wd_f == exempt}")
    diff = [(pi, (a - b).abs().max().item()) for pi, (a, b) in enumerate(zip(ll.model.parameters(), fl.model.parameters()))]
    print(f"  after training: max |weights lessonlib - fastai| over BN/bias params "
          f"{max(d for pi, d in diff if pi in exempt):.3g}, over the others {max(d for pi, d in diff if pi not in exempt):.3g}")
    one_step(init, data, lr)


def one_step(init, data, lr):
    "Same weights, same gradients, several steps with fixed hyper-parameters: compare the updates of both optimizers."
    from lessonlib.optim import adamw
    from fastai.optimizer import Adam
    (xt, yt), _ = data
    ma, mb = copy.deepcopy(init).train(), copy.deepcopy(init).train()
    oa = adamw([{'params': list(ma.parameters())}], lr=lr)
    ob = Adam(list(mb.parameters()), lr=lr)
    bnb = {id(p) for p in bn_bias_params(init)}
    idx = [i for i, p in enumerate(init.parameters()) if id(p) in bnb]
    for step, mom in enumerate([0.95, 0.9, 0.85, 0.9]):
        b = slice(step * 64, step * 64 + 64)
        for m in (ma, mb):
            m.zero_grad(); F.cross_entropy(m(xt[b]), yt[b]).backward()
        for pa, pb in zip(ma.parameters(), mb.parameters()): pb.grad = pa.grad.clone()   # identical gradients
        oa.param_groups[0]['betas'] = (mom, 0.99)
        ob.set_hyper('mom', mom)
        before = [p.detach().clone() for p in ma.parameters()]
        oa.step(); ob.step()
        da = [(p.detach() - q) for p, q in zip(ma.parameters(), before)]
        db = [(p.detach() - q) for p, q in zip(mb.parameters(), before)]
        rel = max(((a - c).abs().max() / a.abs().max().clamp_min(1e-30)).item() for a, c in zip(da, db))
        rel_o = max(((a - c).abs().max() / a.abs().max().clamp_min(1e-30)).item()
                    for i, (a, c) in enumerate(zip(da, db)) if i not in idx)
        print(f"  step {step + 1} (beta1 {mom}): max relative update difference, all params {rel:.2e}, "
              f"excluding BN/bias {rel_o:.2e}")
        for pa, pb in zip(ma.parameters(), mb.parameters()): pb.data.copy_(pa.data)  # restart from the same weights


def exact(args, data):
    "In float64 (no visible rounding noise), which switches make the two libraries train to the same weights?"
    lr, seed = (args.lrs or [3.8e-3])[0], args.seeds[0]
    data = tuple((x.double(), y) for x, y in data)
    init = make_model(seed, args.width).double()
    runs = {'lessonlib': (run_lessonlib, {}), 'lessonlib no-wd-bn-bias': (run_lessonlib, {'wd_bn_bias': False}),
            'fastai': (run_fastai, {}), 'fastai wd_bn_bias=True': (run_fastai, {'wd_bn_bias': True}),
            'lessonlib lr*(1+1e-7)': (run_lessonlib, {'lr_mult': 1 + 1e-7})}
    if args.only: runs = {k: v for k, v in runs.items() if k in args.only}
    models = {}
    for name, (run, kw) in runs.items():
        kw = dict(kw)
        learn, _ = run(copy.deepcopy(init), data, lr * kw.pop('lr_mult', 1.), seed, epochs=args.epochs, **kw)
        models[name] = learn.model
        print(f"  {name:26s} accuracy {evaluate(learn.model, *data[1]):.3f}", flush=True)
    def wdiff(a, b): return max((p - q).abs().max().item() for p, q in zip(models[a].parameters(), models[b].parameters()))
    for a, b in [('lessonlib', 'fastai'), ('lessonlib no-wd-bn-bias', 'fastai'), ('lessonlib', 'fastai wd_bn_bias=True'),
                 ('lessonlib', 'lessonlib no-wd-bn-bias'), ('lessonlib', 'lessonlib lr*(1+1e-7)')]:
        if a in models and b in models:
            print(f"  max |weights {a} - weights {b}| after {args.epochs} epochs: {wdiff(a, b):.2e}")


# -------------------------------------------------------------------------------- momentum schedule check
def check_moms(args, data):
    "During lessonlib's fit_one_cycle, the beta1 (Adam) / momentum (SGD) that opt.step sees follows 0.95 -> 0.85 -> 0.95."
    from lessonlib.data import DataLoaders
    from lessonlib.learner import Learner
    from lessonlib.optim import adamw, sgd
    from lessonlib.schedule import one_cycle_scheds
    (xt, yt), (xv, yv) = data
    for opt_func, key in [(adamw, 'betas'), (sgd, 'momentum')]:
        dls = DataLoaders(FixedLoader(xt[:640], yt[:640], 64, shuffle=True), FixedLoader(xv[:128], yv[:128], 64))
        learn = Learner(dls, make_model(0, 8), loss_func=nn.CrossEntropyLoss(), opt_func=opt_func, device='cpu')
        learn.create_opt()
        seen = []
        def pre_hook(opt, args, kwargs):
            seen.append([g['betas'][0] if key == 'betas' else g['momentum'] for g in opt.param_groups])
        handle = learn.opt.register_step_pre_hook(pre_hook)
        try: learn.fit_one_cycle(3, 1e-3)
        finally: handle.remove()
        n = 3 * len(dls.train)
        want = [one_cycle_scheds(1e-3)['mom'](i / n) for i in range(n)]
        got = np.array(seen)[:, 0]
        print(f"{opt_func.__name__}: {len(seen)} steps (want {n}); first {got[0]:.4f}, min {got.min():.4f} at step "
              f"{got.argmin()}, last {got[-1]:.4f}; max |seen - schedule| {np.abs(got - np.array(want)).max():.2e}")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--seeds', type=int, nargs='+', default=[0, 1])
    p.add_argument('--lrs', type=float, nargs='+', default=None)
    p.add_argument('--epochs', type=int, default=4)
    p.add_argument('--n-train', type=int, default=2000)
    p.add_argument('--n-valid', type=int, default=500)
    p.add_argument('--width', type=int, default=16)
    p.add_argument('--noise', type=float, default=0.06, help='pixel noise of the shapes images')
    p.add_argument('--contrast', type=float, nargs=2, default=(0.3, 0.8), help='shape/background contrast range')
    p.add_argument('--threads', type=int, default=1, help='torch threads (1: no oversubscription on a shared machine)')
    p.add_argument('--variants', action='store_true', help='also run both libraries with the other BN/bias wd rule')
    p.add_argument('--order-noise', action='store_true',
                   help='also run both libraries on another shuffling of the same data: the noise floor')
    p.add_argument('--only', nargs='+', default=None, help='run only these named runs (e.g. "fastai other order")')
    p.add_argument('--trace', action='store_true', help='compare per-step hyper-parameters and one-step updates')
    p.add_argument('--exact', action='store_true', help='float64: which switch makes both train to the same weights')
    p.add_argument('--check-moms', action='store_true', help="check one-cycle momentum reaches the optimizer")
    p.add_argument('--json', default=None, help='write the grid results to this file')
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    t = time.time()
    kw = dict(noise=args.noise, contrast=tuple(args.contrast))
    data = (make_shapes(args.n_train, 42, **kw), make_shapes(args.n_valid, 43, **kw))
    print(f"data: {args.n_train} train / {args.n_valid} valid, 32 px, {N_CLASSES} classes ({time.time() - t:.1f} s)")
    if args.check_moms: check_moms(args, data)
    elif args.trace: trace(args, data)
    elif args.exact: exact(args, data)
    else: grid(args, data)
    print(f"total {time.time() - t:.0f} s")


if __name__ == '__main__': main()
