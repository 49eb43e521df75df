"""Does each lesson's `learn.fit_one_cycle` cost more than a hand-written PyTorch loop doing the same work?

For every lesson model (Planet resnet, CamVid U-Net, head-pose regressor, IMDB language model and classifier,
the from-scratch CNN) this builds the lesson's own learner on its built-in synthetic data, takes a fixed list
of batches from the lesson's loaders (so data loading is out of the comparison; its cost is shown apart), and
times, interleaved in one process, `learn.fit_one_cycle` against a plain loop with the same model copy, batches,
optimizer (lessonlib.optim.adamw, the same parameter groups and weight decay), one-cycle schedule (written out
by hand: cosine learning rate and momentum per layer group), loss (written with torch.nn.functional), metrics
and precision. Both sides start from the same seed, so they must reach the same losses: printed as a check.

The ratio is learner time / plain time (1.00: the same; above 1: the Learner is slower), per repeat, paired.

Usage: python benchmarks/bench_lessons.py [--quick] [--lessons planet,camvid,...] [--device cpu|cuda]
       [--repeats N] [--batches N] [--valid-batches N] [--epochs N] [--amp] [--out benchmarks/lessons.md]
"""
from __future__ import annotations
import argparse, contextlib, copy, ctypes, dataclasses, gc, io, math, os, platform, statistics, sys, threading, time
from pathlib import Path
import numpy as np
import torch, torch.nn as nn, torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # the lessonlib of this checkout
from lessonlib.core import atomic_path, set_seed
from lessonlib.data import DataLoaders
from lessonlib.optim import adamw, param_groups, lr_per_group, one_group

LESSONS = ('planet', 'camvid', 'headpose', 'imdb_lm', 'imdb_clf', 'scratch')


# ---------------------------------------------------------------- measuring
def sync(device):
    if device.type == 'cuda': torch.cuda.synchronize()

def _trim():
    "Give freed heap memory back to the OS (glibc), so that an RSS rise measures this run's peak."
    gc.collect()
    try: ctypes.CDLL('libc.so.6').malloc_trim(0)
    except (OSError, AttributeError): pass

def _rss() -> int:
    with open('/proc/self/statm') as f: return int(f.read().split()[1]) * os.sysconf('SC_PAGE_SIZE')

class PeakMemory:
    "Peak memory of a block: CUDA's `max_memory_allocated`, or the rise of the process RSS sampled every `dt` s."
    def __init__(self, device, dt: float = 0.005): self.device, self.dt = device, dt

    def __enter__(self):
        _trim()
        if self.device.type == 'cuda':
            torch.cuda.reset_peak_memory_stats(); self.start = torch.cuda.memory_allocated()
            return self
        self.start = self.peak = _rss()
        self.stop = threading.Event()
        def sample():
            while not self.stop.wait(self.dt): self.peak = max(self.peak, _rss())
        self.thread = threading.Thread(target=sample, daemon=True); self.thread.start()
        return self

    def __exit__(self, *exc):
        if self.device.type == 'cuda': self.mb = (torch.cuda.max_memory_allocated() - self.start) / 2**20
        else:
            self.stop.set(); self.thread.join()
            self.mb = (max(self.peak, _rss()) - self.start) / 2**20


# ---------------------------------------------------------------- the plain loop
def cos_sched(start, end, pos):
    "Cosine from `start` to `end` as `pos` goes 0 to 1."
    return start + (1 + math.cos(math.pi * (1 - pos))) * (end - start) / 2

def one_cycle(pos, lo, hi, end, pct):
    "Warm up from `lo` to `hi` over the first `pct` of training, then anneal to `end` (cosine both ways)."
    return cos_sched(lo, hi, pos / pct) if pos < pct else cos_sched(hi, end, (pos - pct) / (1 - pct))

def plain_fit(case, model, epochs, device, amp=None):
    "The hand-written loop: one-cycle AdamW by hand, train, then validate with the metrics, each epoch."
    model.to(device)
    opt = adamw(param_groups(model, case.splitter(model)), lr=1e-3, weight_decay=case.wd)
    lr_max = lr_per_group(case.lr, 1 + max(g['layer_group'] for g in opt.param_groups))
    div, div_final, pct, moms = 25., 1e5, case.pct_start, case.moms
    scaler = torch.amp.GradScaler('cuda') if amp == torch.float16 else None
    autocast = lambda: torch.autocast(device.type, dtype=amp) if amp else contextlib.nullcontext()
    total, step, all_losses, history = epochs * len(case.train), 0, [], []
    for epoch in range(epochs):
        model.train()
        if case.reset: model.reset()
        losses, sizes = [], []
        for xb, yb in case.train:
            xb, yb = xb.to(device, non_blocking=True), yb.to(device, non_blocking=True)
            pos = step / total
            mom = one_cycle(pos, moms[0], moms[1], moms[2], pct)
            for g in opt.param_groups:
                hi = lr_max[g['layer_group']]
                g['lr'] = one_cycle(pos, hi / div, hi, hi / div_final, pct)
                g['betas'] = (mom, g['betas'][1])
            opt.zero_grad(set_to_none=True)
            with autocast():
                loss = case.loss(model(xb), yb)
                if case.reg: loss = loss + case.reg(model)
            if scaler is not None:
                scaler.scale(loss).backward(); scaler.step(opt); scaler.update()
            else:
                loss.backward(); opt.step()
            step += 1
            losses.append(loss.detach()); sizes.append(len(xb))
        all_losses += losses
        w = torch.tensor(sizes, dtype=torch.float32, device=device)
        train_loss = ((torch.stack(losses).float() * w).sum() / w.sum()).item()
        model.eval()
        if case.reset: model.reset()
        vl, vs = [], []
        for m in case.metrics: m.reset()
        with torch.no_grad(), autocast():
            for xb, yb in case.valid:
                xb, yb = xb.to(device, non_blocking=True), yb.to(device, non_blocking=True)
                out = model(xb)
                vl.append(case.loss(out, yb)); vs.append(len(xb))
                for m in case.metrics: m.accumulate(out.detach().float(), yb)
        w = torch.tensor(vs, dtype=torch.float32, device=device)
        valid_loss = ((torch.stack(vl).float() * w).sum() / w.sum()).item() if vl else None
        row = {'train_loss': train_loss, 'valid_loss': valid_loss}
        for m in case.metrics: row[m.name] = m.value
        history.append(row)
    sync(device)
    return {'losses': torch.stack(all_losses).float().tolist(), **history[-1]}

def learner_fit(case, model, epochs, device, amp=None):
    "The lesson's learner on the same batches: `learn.fit_one_cycle` from a fresh optimizer."
    learn = case.learn
    learn.model, learn.opt, learn.device = model, None, device
    learn.dls = DataLoaders(case.train, case.valid)
    learn.to_fp32()
    if amp is not None: learn.to_fp16() if amp == torch.float16 else learn.to_bf16()
    with contextlib.redirect_stdout(io.StringIO()):           # the epoch table
        learn.fit_one_cycle(epochs, case.lr, pct_start=case.pct_start, moms=case.moms, wd=case.wd)
    sync(device)
    row = learn.recorder.values[-1]
    learn.model = learn.opt = None          # let go of weights and optimizer state, as the plain loop does
    return {'losses': learn.recorder.losses, **{k: v for k, v in row.items() if k not in ('epoch', 'time')}}


# ---------------------------------------------------------------- the lessons
@dataclasses.dataclass
class Case:
    "One lesson model: its learner, the fixed batches, and what the plain loop needs to do the same work."
    name: str
    what: str
    learn: object
    model: nn.Module
    train: list
    valid: list
    loss: object                      # the plain loop's loss, written with torch.nn.functional
    lr: object
    unit: str = 'img'                 # items counted: images, or tokens
    moms: tuple = (0.95, 0.85, 0.95)
    pct_start: float = 0.25
    wd: float = 0.01
    reg: object = None                # an extra loss term (AR/TAR for the language model)
    reset: bool = False               # reset an RNN's state before each pass
    splitter: object = one_group
    metrics: list = dataclasses.field(default_factory=list)
    loader_ms: float = float('nan')   # the lesson loader's time per batch (not in the comparison)

    def items(self, b) -> int: return b[0].numel() if self.unit == 'tok' else len(b[0])


def take_batches(dl, n: int) -> tuple[list, float]:
    "`n` batches from loader `dl` (again from the start when it runs out), on the CPU; and ms per batch to make them."
    out, t = [], time.perf_counter()
    while len(out) < n:
        k = len(out)
        for b in dl:
            out.append(tuple(x.detach().cpu().clone() if torch.is_tensor(x) else x for x in b))
            if len(out) == n: break
        if len(out) == k: raise ValueError(f'{dl!r} gives no batches')
    return out, (time.perf_counter() - t) / n * 1000

def _finish(learn, **kw) -> Case:
    "Take the model, splitter and metrics from the lesson's learner `learn`; detach the model (copied per run)."
    model = learn.model
    return Case(learn=learn, model=copy.deepcopy(model).cpu(), splitter=learn.splitter, metrics=learn.metrics, **kw)

def make_planet(a) -> Case:
    from lessonlib.lessons.planet import planet_source, planet_dls, planet_learner
    path, csv, folder = planet_source('synth', n=max(400, 2 * a.bs * (a.batches + a.valid_batches)))
    dls = planet_dls(path, csv, folder, size=a.size, bs=a.bs)
    learn = planet_learner(dls, 'resnet18', pretrained=False)
    train, ms = take_batches(dls.train, a.batches)
    valid, _ = take_batches(dls.valid, a.valid_batches)
    loss = lambda p, y: F.binary_cross_entropy_with_logits(p, y.float())
    return _finish(learn, name='planet', what=f'resnet18 multi-label, {a.size}px, bs {a.bs}', train=train, valid=valid,
                   loss=loss, lr=slice(1e-4, 1e-3), loader_ms=ms)

def make_camvid(a) -> Case:
    from lessonlib.lessons.camvid import camvid_source, camvid_codes, camvid_dls, camvid_learner, unet_size
    path = camvid_source('synth', n=max(60, a.bs_seg * (a.batches + a.valid_batches) + 20))
    codes = camvid_codes(path)
    size = unet_size((96, 128), a.size)                       # the synthetic frames are 96x128
    bs = a.bs_seg
    dls = camvid_dls(path, size, bs=bs, codes=codes)
    learn = camvid_learner(dls, 'resnet18', pretrained=False)
    train, ms = take_batches(dls.train, a.batches)
    valid, _ = take_batches(dls.valid, a.valid_batches)
    void = dls.dsets.blocks[-1].void_code
    loss = lambda p, y: F.cross_entropy(p, y.long(), ignore_index=-100 if void is None else void)
    return _finish(learn, name='camvid', what=f'U-Net resnet18, {size[0]}x{size[1]}, bs {bs}, {len(codes)} classes',
                   train=train, valid=valid, loss=loss, lr=slice(1e-5, 1e-3), loader_ms=ms)

def make_headpose(a) -> Case:
    from lessonlib.lessons.headpose import headpose_source, headpose_dls, headpose_learner
    path, df = headpose_source('synth', frames=max(10, math.ceil(a.bs * (a.batches + a.valid_batches) / 12)))
    dls = headpose_dls(df, size=a.size, bs=a.bs)
    learn = headpose_learner(dls, 'resnet18', pretrained=False)
    train, ms = take_batches(dls.train, a.batches)
    valid, _ = take_batches(dls.valid, a.valid_batches)
    loss = lambda p, y: F.mse_loss(p.reshape(-1), y.float().reshape(-1))
    return _finish(learn, name='headpose', what=f'resnet18 point regressor, {a.size}px wide, bs {a.bs}', train=train,
                   valid=valid, loss=loss, lr=3e-3, loader_ms=ms)

_IMDB = {}

def _imdb(a):
    "Tokens, vocabulary and the lesson's small AWD-LSTM configuration, as `run_imdb` makes them (once per process)."
    if a.n_reviews in _IMDB: return _IMDB[a.n_reviews]
    from lessonlib.lessons.imdb import imdb_source, split_texts
    from lessonlib.text.tokenize import tokenize_cached
    from lessonlib.text.data import make_vocab
    from lessonlib.text.models import SMALL_CONFIG
    src, df, _ = imdb_source('synth', n=a.n_reviews)
    texts, labels, valid = split_texts(df)
    toks = tokenize_cached(texts)
    trn, val = [i for i, v in enumerate(valid) if not v], [i for i, v in enumerate(valid) if v]
    vocab = make_vocab([toks[i] for i in trn], 2, 60000)
    config = dict(SMALL_CONFIG, emb_sz=64, n_hid=128, n_layers=2)
    _IMDB[a.n_reviews] = toks, labels, trn, val, vocab, config
    return _IMDB[a.n_reviews]

def make_imdb_lm(a) -> Case:
    from lessonlib.lessons.imdb import MOMS
    from lessonlib.text.data import lm_dataloaders
    from lessonlib.text.models import language_model_learner
    toks, labels, trn, val, vocab, config = _imdb(a)
    ldls = lm_dataloaders([toks[i] for i in trn], [toks[i] for i in val], vocab, bs=a.bs_text, bptt=48)
    learn = language_model_learner(ldls, config, drop_mult=0.3)
    train, ms = take_batches(ldls.train, a.batches)
    valid, _ = take_batches(ldls.valid, a.valid_batches)
    reg_cb = next(cb for cb in learn.cbs if type(cb).__name__ == 'RNNRegularizer')
    def reg(model):                                            # AR and TAR on the last LSTM's outputs, by hand
        out = model.encoder.raw_out
        return reg_cb.alpha * out.float().pow(2).mean() + reg_cb.beta * (out[:, 1:] - out[:, :-1]).float().pow(2).mean()
    loss = lambda p, y: F.cross_entropy(p.reshape(-1, p.shape[-1]), y.reshape(-1))
    return _finish(learn, name='imdb_lm', what=f'AWD-LSTM LM (emb 64, hid 128, 2 layers), vocab {len(vocab)}, '
                   f'bs {a.bs_text} x bptt 48', train=train, valid=valid, loss=loss, lr=1e-2, unit='tok', moms=MOMS,
                   reg=reg, reset=True, loader_ms=ms)

def make_imdb_clf(a) -> Case:
    from lessonlib.lessons.imdb import MOMS
    from lessonlib.text.data import clas_dataloaders
    from lessonlib.text.models import text_classifier_learner
    toks, labels, trn, val, vocab, config = _imdb(a)
    cdls = clas_dataloaders([toks[i] for i in trn], [labels[i] for i in trn], [toks[i] for i in val],
                            [labels[i] for i in val], vocab, bs=a.bs_text, max_len=400)
    learn = text_classifier_learner(cdls, config, drop_mult=0.3)
    train, ms = take_batches(cdls.train, a.batches)
    valid, _ = take_batches(cdls.valid, a.valid_batches)
    reg_cb = next(cb for cb in learn.cbs if type(cb).__name__ == 'RNNRegularizer')
    def reg(model):
        out = model.encoder.raw_out
        return reg_cb.alpha * out.float().pow(2).mean() + reg_cb.beta * (out[:, 1:] - out[:, :-1]).float().pow(2).mean()
    return _finish(learn, name='imdb_clf', what=f'AWD-LSTM classifier (concat pooling), bs {a.bs_text}, padded reviews',
                   train=train, valid=valid, loss=lambda p, y: F.cross_entropy(p, y), lr=1e-2, unit='tok', moms=MOMS,
                   reg=reg, reset=True, loader_ms=ms)

def make_scratch(a) -> Case:
    from lessonlib.lessons.scratch import scratch_source, read_image_folder, folder_loaders, SimpleCNN
    from lessonlib.learner import Learner
    from lessonlib.metrics import accuracy
    fd = read_image_folder(scratch_source('synth'))
    loaders = folder_loaders(fd, size=32, bs=a.bs)
    learn = Learner(DataLoaders(loaders['train'], loaders['valid']), SimpleCNN(len(fd.classes), 32),
                    loss_func=F.cross_entropy, metrics=accuracy)
    train, ms = take_batches(loaders['train'], a.batches)
    valid, _ = take_batches(loaders['valid'], a.valid_batches)
    return _finish(learn, name='scratch', what=f'SimpleCNN (3 conv blocks), 32px, bs {a.bs}', train=train, valid=valid,
                   loss=lambda p, y: F.cross_entropy(p, y), lr=2e-3, loader_ms=ms)

# Cheap models get more batches per run, so that a run lasts long enough to time well.
SCALE = {'imdb_lm': 5, 'imdb_clf': 3, 'scratch': 5}

MAKERS = {'planet': make_planet, 'camvid': make_camvid, 'headpose': make_headpose, 'imdb_lm': make_imdb_lm,
          'imdb_clf': make_imdb_clf, 'scratch': make_scratch}


# ---------------------------------------------------------------- comparing
def check_loss(case, device):
    "The plain loss equals the lesson learner's loss on the first batch (the oracle that both do the same work)."
    m = copy.deepcopy(case.model).to(device).eval()
    xb, yb = (t.to(device) for t in case.train[0])
    with torch.no_grad():
        if case.reset: m.reset()
        p = m(xb)
        a, b = float(case.loss(p, yb)), float(case.learn.loss_func(p, yb))
    if not math.isclose(a, b, rel_tol=1e-5, abs_tol=1e-6):
        raise AssertionError(f'{case.name}: the plain loss {a} differs from the learner loss {b}')

def run_side(f, case, epochs, device, seed, amp):
    "One timed run of `f` on a fresh model copy from seed `seed`: (wall s, CPU s of this thread, peak MB, results)."
    model = copy.deepcopy(case.model)
    set_seed(seed)
    with PeakMemory(device) as mem:
        sync(device)
        t, c = time.perf_counter(), time.thread_time()
        res = f(case, model, epochs, device, amp)
        secs, cpu = time.perf_counter() - t, time.thread_time() - c
    return secs, cpu, mem.mb, res

def compare(case, args, device) -> dict:
    "Warm both sides up, then alternate plain and learner runs `args.repeats` times (ABBA); paired ratios."
    amp = (torch.float16 if device.type == 'cuda' else torch.bfloat16) if args.amp else None
    check_loss(case, device)
    sides = {'plain': plain_fit, 'learner': learner_fit}
    full = case.train, case.valid
    case.train, case.valid = full[0][:2], full[1][:1]
    for f in sides.values(): run_side(f, case, 1, device, args.seed, amp)          # warm-up
    case.train, case.valid = full
    wall, cpu, mems, res = *({k: [] for k in sides} for _ in range(3)), {}
    for r in range(args.repeats):
        for k in (('plain', 'learner') if r % 2 == 0 else ('learner', 'plain')):
            secs, c, mb, out = run_side(sides[k], case, args.epochs, device, args.seed, amp)
            wall[k].append(secs); cpu[k].append(c); mems[k].append(mb); res[k] = out
            if args.verbose:
                print(f'  {case.name} repeat {r} {k:8s} wall {secs:7.3f}s cpu {c:7.3f}s {mb:6.0f} MB', flush=True)
    # On the CPU the main measure is the CPU time of the training thread (one torch thread): other jobs on the
    # machine stretch wall time a lot, CPU time little. On a GPU, wall time (synchronised).
    times = cpu if device.type == 'cpu' else wall
    ratios = [l / p for l, p in zip(times['learner'], times['plain'])]
    wall_ratios = [l / p for l, p in zip(wall['learner'], wall['plain'])]
    items = args.epochs * (sum(case.items(b) for b in case.train) + sum(case.items(b) for b in case.valid))
    lp, ll = np.array(res['plain']['losses']), np.array(res['learner']['losses'])
    return {'case': case, 'times': times, 'wall': wall, 'ratios': ratios, 'ratio': statistics.median(ratios),
            'wall_ratios': wall_ratios, 'items_s': {k: items / statistics.median(v) for k, v in times.items()},
            'mem': {k: statistics.median(v) for k, v in mems.items()}, 'res': res,
            'max_dloss': float(np.abs(lp - ll).max()) if len(lp) == len(ll) else float('nan'), 'n_steps': len(lp)}

_LOOP_FILES = ('lessonlib/loop.py', 'lessonlib/callbacks.py', 'lessonlib/learner.py', 'lessonlib/optim.py',
               'lessonlib/schedule.py')
_SHARED = ('Validator.after_batch', 'Validator.after_validate', 'RNNRegularizer.after_loss', 'TrainLoop._one_batch',
           'TrainLoop._all_batches', 'TrainLoop._one_pass', 'TrainLoop._with_events', 'TrainLoop._do_epoch',
           'TrainLoop._do_epochs', 'TrainLoop._run', 'TrainLoop._fit', 'TrainLoop.fit', 'Learner.fit',
           'Learner.fit_one_cycle', 'TrainLoop.__call__')

def _qualname(fn: str, line: int, func: str) -> str:
    "`Class.func` for a method defined at `line` of file `fn` (the class statement above it), else `module.func`."
    try: lines = Path(fn).read_text().splitlines()[:line]
    except OSError: lines = []
    for l in reversed(lines[:-1]):
        if l.startswith('class '): return l[6:].split('(')[0].split(':')[0].strip() + '.' + func
        if l.startswith('def ') or l.startswith('# %%'): break
    return f'{Path(fn).stem}.{func}'

def profile_learner(case, args, device, top: int = 5) -> dict:
    "Where the learner's own code spends its time: one profiled run; cumulative ms per training batch of its methods."
    import cProfile, pstats
    model = copy.deepcopy(case.model)
    set_seed(args.seed)
    pr = cProfile.Profile()
    pr.enable(); learner_fit(case, model, args.epochs, device); pr.disable()
    st = pstats.Stats(pr)
    n = args.epochs * len(case.train)
    rows = {}
    for (fn, line, func), (cc, nc, tt, ct, callers) in st.stats.items():
        if not fn.replace(os.sep, '/').endswith(_LOOP_FILES) or func.startswith('<'): continue
        rows[_qualname(fn, line, func)] = ct / n * 1000
    calls = {k: v for k, v in rows.items() if k not in _SHARED}
    dispatch = next((ct for (fn, _, func), (cc, nc, tt, ct, _c) in st.stats.items()
                     if func == '__call__' and fn.replace(os.sep, '/').endswith('lessonlib/loop.py')), 0.)
    return {'total_ms': st.total_tt / n * 1000, 'events_ms': dispatch / n * 1000,
            'top': sorted(calls.items(), key=lambda kv: -kv[1])[:top]}

def loop_overhead(args, n: int = 300) -> list:
    "Per-batch cost of the loop itself: a tiny model (so the work is almost nil), callbacks taken away one at a time."
    from lessonlib.learner import Learner
    from lessonlib.loop import TrainLoop
    from lessonlib.callbacks import ProgressCallback, TerminateOnNaN, Recorder
    g = torch.Generator().manual_seed(0)
    train = [(torch.randn(4, 8, generator=g), torch.randint(0, 3, (4,), generator=g)) for _ in range(n)]
    dls = DataLoaders(train, None)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    case = Case(name='tiny', what='', learn=None, model=model, train=train, valid=[], loss=F.cross_entropy, lr=1e-2)
    def learner(one_cycle=True, drop=()):
        def f(m):
            learn = Learner(dls, m, loss_func=F.cross_entropy, device='cpu')
            for cb in drop: learn.remove_cb(cb)
            with contextlib.redirect_stdout(io.StringIO()):
                learn.fit_one_cycle(1, 1e-2) if one_cycle else learn.fit(1, 1e-2)
        return f
    fns = {'plain loop, one-cycle by hand': lambda m: plain_fit(case, m, 1, torch.device('cpu')),
           'TrainLoop.fit (no callbacks, constant lr)':
               lambda m: TrainLoop(dls, m, F.cross_entropy, device='cpu').fit(1, 1e-2),
           'Learner.fit (constant lr)': learner(False),
           'Learner.fit_one_cycle': learner(),
           '... without ProgressCallback': learner(drop=[ProgressCallback]),
           '... without TerminateOnNaN': learner(drop=[TerminateOnNaN]),
           '... without Recorder and ProgressCallback (which reads it)': learner(drop=[Recorder, ProgressCallback]),
           '... without all three': learner(drop=[Recorder, ProgressCallback, TerminateOnNaN])}
    times = {k: [] for k in fns}
    for r in range(args.repeats + 1):
        for k, f in fns.items():
            m = copy.deepcopy(model); c = time.thread_time(); f(m); t = time.thread_time() - c
            if r: times[k].append(t / n * 1e6)                 # the first round warms up
    return [(k, statistics.median(v), min(v), max(v)) for k, v in times.items()]

def _spread(v) -> str: return f'**{statistics.median(v):.3f}** ({min(v):.3f}–{max(v):.3f})'

def fmt_row(r) -> str:
    c, t = r['case'], r['times']
    vp, vl = r['res']['plain']['valid_loss'], r['res']['learner']['valid_loss']
    unit = 'img/s' if c.unit == 'img' else 'tok/s'
    return (f"| {c.name} | {c.what}; {len(c.train)} + {len(c.valid)} batches "
            f"| {statistics.median(t['plain']):.2f} / {statistics.median(t['learner']):.2f} "
            f"| {_spread(r['ratios'])} | {_spread(r['wall_ratios'])} "
            f"| {r['items_s']['plain']:,.0f} / {r['items_s']['learner']:,.0f} {unit} "
            f"| {r['mem']['plain']:.0f} / {r['mem']['learner']:.0f} | {c.loader_ms:.1f} "
            f"| {vp:.5f} / {vl:.5f} | {r['max_dloss']:.1e} |")

HEADER = ('| lesson | model, input | s/run plain / learner | time ratio learner/plain, median (min–max) '
          '| wall-time ratio, median (min–max) | items/s plain / learner | peak memory MB plain / learner '
          '| loader ms/batch (excluded) | final valid loss plain / learner | max abs Δ batch loss |\n'
          '|---|---|---|---|---|---|---|---|---|---|')

def machine(device) -> str:
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(l.split(':', 1)[1].strip() for l in open('/proc/cpuinfo') if l.startswith('model name'))
    except (OSError, StopIteration): pass
    flags = open('/proc/cpuinfo').read() if os.path.exists('/proc/cpuinfo') else ''
    isa = ', '.join(f for f in ('avx2', 'avx512f', 'avx512_bf16', 'amx_bf16') if f in flags.split()) or 'unknown'
    gpu = f', GPU {torch.cuda.get_device_name()}' if device.type == 'cuda' else ''
    return (f'{cpu} ({isa}), {os.cpu_count()} cores shared with other jobs, torch {torch.__version__} '
            f'with {torch.get_num_threads()} thread(s){gpu}, Python {platform.python_version()}')

def write_md(rows, args, device, fn):
    cmd = 'python benchmarks/bench_lessons.py ' + ' '.join(sys.argv[1:])
    text = (f"# The Learner against a plain PyTorch loop, lesson by lesson\n\n"
            f"Command: `OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '')} {cmd.strip()}`\n\n"
            f"Machine: {machine(device)}; device {device}; precision "
            f"{'autocast ' + ('float16' if device.type == 'cuda' else 'bfloat16') if args.amp else 'float32'}.\n\n"
            f"Each run: {args.epochs} epoch(s) of `fit_one_cycle` over a fixed list of training batches and "
            f"validation batches (with the lesson's metrics; counts in the table), from the same seed and model copy; "
            f"{args.repeats} repeats, plain and learner alternating (ABBA order), after one warm-up run of each.\n\n"
            "**Ratio = learner time / plain time** for each repeat (paired): 1.00 is parity, above 1 the Learner is "
            "slower. " + ("Time is the CPU time of the training thread (torch runs on that one thread here, backward "
            "included): the cores are shared with other jobs, which stretch wall time by up to 2.5x and little CPU "
            "time; the wall-time ratio is shown too. " if device.type == 'cpu' else "Time is wall time, synchronised. ")
            + "Items/s counts every item through the model (training and validation; tokens for text). Peak "
            "memory: the rise of the process RSS over the run (sampled every 5 ms, freed heap handed back first) on "
            "the CPU, `torch.cuda.max_memory_allocated` on a GPU. The loader column is what the lesson's own loader "
            "takes to make one batch (augmentation included), kept out of the timed runs. Max abs Δ batch loss: the "
            "largest difference between the two sides' training losses, batch by batch (0 means bit-identical "
            "training).\n\n" + HEADER + '\n' + '\n'.join(fmt_row(r) for r in rows) + '\n')
    prof = [r for r in rows if 'profile' in r]
    if prof:
        text += ("\n## Where the learner's own time goes\n\nOne learner run per lesson under cProfile (which slows "
                 "Python "
                 "code down, so these are upper bounds): all the time per training batch, the time in the callbacks "
                 "(every event dispatched by `TrainLoop.__call__`, including the shared work of metrics and the AR/TAR "
                 "regulariser), and the learner methods that cost most beyond the shared work, in ms per training "
                 "batch (cumulative; once-per-fit costs are spread over the batches).\n\n"
                 "| lesson | all, ms/batch | callbacks, ms/batch | share | top learner methods, ms/batch |\n"
                 "|---|---|---|---|---|\n")
        for r in prof:
            p = r['profile']
            text += (f"| {r['case'].name} | {p['total_ms']:.1f} | {p['events_ms']:.3f} "
                     f"| {p['events_ms'] / p['total_ms']:.1%} "
                     f"| {', '.join(f'`{k}` {v:.3f}' for k, v in p['top'])} |\n")
    over = getattr(args, 'overhead_rows', None)
    if over:
        base = over[0][1]
        text += ("\n## The loop's own cost per batch\n\nA tiny model (8→16→3 MLP, batches of 4) on 300 fixed batches, "
                 "so "
                 "that almost all the time is the loop's: CPU microseconds per batch, median (min–max) of "
                 f"{args.repeats} rounds, and the difference from the plain loop. The lesson models above take "
                 "10–1000 ms per batch.\n\n| loop | µs/batch | vs plain |\n|---|---|---|\n" +
                 ''.join(f'| {k} | {med:.0f} ({lo:.0f}–{hi:.0f}) | {med - base:+.0f} |\n' for k, med, lo, hi in over))
    extra = getattr(args, 'notes', '')
    if extra: text += '\n' + extra + '\n'
    with atomic_path(fn) as tmp: Path(tmp).write_text(text)

def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--quick', action='store_true', help='small sizes, a few minutes on 2 CPU cores (the default on a '
                    'CPU; larger ones on a GPU)')
    ap.add_argument('--lessons', default=','.join(LESSONS), help=f'comma-separated, from {",".join(LESSONS)}')
    ap.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    ap.add_argument('--repeats', type=int, default=None, help='timed runs per side (default 5)')
    ap.add_argument('--batches', type=int, default=None, help='training batches per epoch (default 6 quick, 20; '
                    'x5 for scratch and the LM, x3 for the classifier)')
    ap.add_argument('--valid-batches', type=int, default=None, help='validation batches (default 2 quick, 4)')
    ap.add_argument('--epochs', type=int, default=2)
    ap.add_argument('--size', type=int, default=None, help='image size (width) for the vision lessons (64 quick, 96)')
    ap.add_argument('--bs', type=int, default=None, help='batch size of the image lessons (16 quick, 32)')
    ap.add_argument('--bs-seg', type=int, default=None, help='batch size of the U-Net (4 quick, 8)')
    ap.add_argument('--bs-text', type=int, default=32, help='batch size of the text lessons')
    ap.add_argument('--n-reviews', type=int, default=2000, help='reviews in the synthetic IMDB set')
    ap.add_argument('--seed', type=int, default=42)
    ap.add_argument('--verbose', action='store_true', help='print every timed run')
    ap.add_argument('--no-overhead', dest='overhead', action='store_false', help='skip measuring the per-batch cost '
                    'of the loop and its callbacks on a tiny model')
    ap.add_argument('--profile', action='store_true', help="also profile one learner run: the time in the learner's "
                    'callbacks per batch')
    ap.add_argument('--amp', action='store_true', help='both sides in mixed precision (float16 + GradScaler on CUDA, '
                    'bfloat16 on the CPU)')
    ap.add_argument('--out', default=str(Path(__file__).parent/'lessons.md'), help="Markdown results ('' for none)")
    a = ap.parse_args(argv)
    small = a.quick or a.device == 'cpu'
    for k, q, full in (('repeats', 5, 5), ('batches', 6, 20), ('valid_batches', 2, 4), ('size', 64, 96), ('bs', 16, 32),
                       ('bs_seg', 4, 8)):
        if getattr(a, k) is None: setattr(a, k, q if small else full)
    a.lessons = [s.strip() for s in a.lessons.split(',') if s.strip()]
    bad = [s for s in a.lessons if s not in MAKERS]
    if bad: ap.error(f'unknown lesson(s) {bad}; choose from {", ".join(LESSONS)}')
    return a

def main(argv=None):
    args = parse(argv)
    device = torch.device(args.device)
    print(f'{machine(device)}\n{args.epochs} epochs x {args.batches} batches (+{args.valid_batches} valid), '
          f'{args.repeats} repeats; ratio = learner time / plain time', flush=True)
    rows = []
    for name in args.lessons:
        t0 = time.perf_counter()
        case = MAKERS[name](argparse.Namespace(**{**vars(args), 'batches': args.batches * SCALE.get(name, 1)}))
        r = compare(case, args, device)
        rows.append(r)
        p, l = r['res']['plain'], r['res']['learner']
        print(f"{name:9s} ratio {r['ratio']:.3f} ({min(r['ratios']):.3f}-{max(r['ratios']):.3f}) "
              f"wall {statistics.median(r['wall_ratios']):.3f} "
              f"({min(r['wall_ratios']):.3f}-{max(r['wall_ratios']):.3f})  "
              f"plain {statistics.median(r['times']['plain']):.2f}s "
              f"learner {statistics.median(r['times']['learner']):.2f}s  "
              f"final train loss {p['train_loss']:.5f} / {l['train_loss']:.5f}, valid {p['valid_loss']:.5f} / "
              f"{l['valid_loss']:.5f}, max|dloss| {r['max_dloss']:.1e} over {r['n_steps']} steps  "
              f"mem {r['mem']['plain']:.0f}/{r['mem']['learner']:.0f} MB  [{time.perf_counter() - t0:.0f}s]",
              flush=True)
        if args.profile:
            prof = r['profile'] = profile_learner(case, args, device)
            print(f"  profile: {prof['total_ms']:.2f} ms/batch in all, "
                  f"callbacks (events) {prof['events_ms']:.3f} ms/batch; "
                  + ', '.join(f'{k} {v:.3f}' for k, v in prof['top']), flush=True)
        del case.learn
    if args.overhead:
        args.overhead_rows = loop_overhead(args)
        for k, med, lo, hi in args.overhead_rows: print(f'  {k:60s} {med:7.1f} us/batch ({lo:.1f}-{hi:.1f})')
    if args.out: write_md(rows, args, device, args.out); print(f'wrote {args.out}')
    return rows


if __name__ == '__main__':
    main()
