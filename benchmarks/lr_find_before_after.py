"""lr_find before and after benchmarks/speed.md, in one process: plain steps, lr_find with the old `LRFinder` (state
through torch.save/torch.load into a buffer, a `.item()` per batch; kept here as a subclass) and with the new one, run
in turns round by round. Prints seconds per run and the ratios (median and range over the rounds).

Usage: python benchmarks/lr_find_before_after.py [ARCH resnet18] [STEPS 10] [ROUNDS 7]
"""
import io, math, sys
import time, copy, statistics, torch, torchvision, torch.nn.functional as F
from pathlib import Path
import lessonlib.learner as L
from lessonlib.lr_find import LRFinder
from lessonlib.loop import CancelFitException
from lessonlib.callbacks import ProgressBar
from lessonlib.core import set_seed
from lessonlib.data import DataLoaders
sys.path.insert(0, str(Path(__file__).parent)); from bench_learner import plain_fit

class OldLRFinder(LRFinder):
    "The LRFinder of main at ac05147 (state through torch.save into a buffer, a .item() per batch)."
    def before_fit(self, learn):
        buf = io.BytesIO()
        torch.save({'model': learn.model.state_dict(), 'opt': learn.opt.state_dict()}, buf)
        self.saved = buf
        self.lrs, self.losses, self.raw_losses, self.best, self.avg = [], [], [], math.inf, 0.
        self.bar = ProgressBar(None if self.show_progress else 'silent'); self.bar.start(self.num_it, 'lr_find')
    def after_batch(self, learn):
        if not learn.training: return
        loss = learn.loss.item()
        self.avg = self.beta * self.avg + (1 - self.beta) * loss
        smooth = self.avg / (1 - self.beta ** (len(self.losses) + 1))
        self.lrs.append(learn.opt.param_groups[-1]['lr']); self.losses.append(smooth); self.raw_losses.append(loss)
        self.bar.update(len(self.lrs), lambda: f'lr {self.lrs[-1]:.1e} loss {smooth:.4f}')
        if self.stop_div and (math.isnan(smooth) or smooth > 4 * self.best): raise CancelFitException()
        self.best = min(self.best, smooth)
        if len(self.lrs) >= self.num_it: raise CancelFitException()
    def cleanup_fit(self, learn):
        self.bar.close(); self.saved.seek(0)
        state = torch.load(self.saved, weights_only=True)
        learn.model.load_state_dict(state['model']); learn.opt.load_state_dict(state['opt'])

args = sys.argv[1:] + ['resnet18', '10', '7'][len(sys.argv) - 1:]
arch, n, reps = args[0], int(args[1]), int(args[2])
set_seed(0)
batches = [(torch.randn(32, 3, 64, 64), torch.randint(0, 10, (32,))) for _ in range(n)]
base = getattr(torchvision.models, arch)(num_classes=10)
dev = torch.device('cpu')
def lrf(cls):
    def f():
        L.LRFinder = cls
        learn = L.Learner(DataLoaders(batches, None), copy.deepcopy(base), loss_func=F.cross_entropy, device=dev)
        learn.lr_find(num_it=n, stop_div=False, show_plot=False)
    return f
fns = {'plain': lambda: plain_fit(copy.deepcopy(base), batches, dev), 'old lr_find': lrf(OldLRFinder), 'new lr_find': lrf(LRFinder)}
for f in fns.values(): f()
ts = {k: [] for k in fns}
for _ in range(reps):
    for k, f in fns.items(): t = time.perf_counter(); f(); ts[k].append(time.perf_counter() - t)
print(f'{arch} 64px bs32, {n} steps, {reps} rounds in turns (same process); seconds per run, median (range):')
for k, v in ts.items(): print(f'  {k:12s} {statistics.median(v):7.2f} ({min(v):.2f}-{max(v):.2f})')
for k in ('old lr_find', 'new lr_find'):
    r = sorted(a / b for a, b in zip(ts[k], ts['plain']))
    print(f'  {k} / plain steps: median {statistics.median(r):.3f}, range {r[0]:.3f}-{r[-1]:.3f}')
r = sorted(a / b for a, b in zip(ts['new lr_find'], ts['old lr_find']))
print(f'  new / old lr_find: median {statistics.median(r):.3f}, range {r[0]:.3f}-{r[-1]:.3f}')
