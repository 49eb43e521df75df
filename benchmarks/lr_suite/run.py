"""Run the learning-rate suite: for each task, a grid of learning rates x seeds, and every suggestion trained at its rate.

    python benchmarks/lr_suite/run.py [--tasks planet,imdb] [--seeds 0 1] [--jobs 2] [--smoke] [--out FILE]

Each finished run is appended to the results file (JSON lines) as soon as it ends, so an interrupted suite resumes where it
stopped (runs already there are skipped). `summarize.py` turns the file into the Markdown table.
"""
from __future__ import annotations
import argparse, json, os, sys, time
from pathlib import Path
from multiprocessing import get_context
import numpy as np

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
GRID = [float(f'{v:.3g}') for v in np.logspace(-4, 0, 13)]     # 13 rates over 4 decades, a third of a decade apart
FIXED = {'fixed_3e-3': 3e-3, 'fixed_1e-2': 1e-2}
CURVE = ('valley', 'slide', 'minimum', 'steep')


def _learner(task, seed, data):
    import torch
    from torch.utils.data import DataLoader, TensorDataset
    from lessonlib.data import DataLoaders
    from lessonlib.learner import Learner
    from lessonlib.callbacks import ProgressCallback
    from lessonlib.metrics import FuncMetric
    xt, yt, xv, yv = data
    g = torch.Generator().manual_seed(seed)
    train = DataLoader(TensorDataset(xt, yt), batch_size=task.bs, shuffle=True, drop_last=True, generator=g)
    valid = DataLoader(TensorDataset(xv, yv), batch_size=2 * task.bs)
    model = task.model(seed)
    if task.freeze: task.freeze(model)
    metric = FuncMetric(task.metric, name=task.metric_name)     # names the library knows the direction of
    learn = Learner(DataLoaders(train, valid), model, loss_func=task.loss, metrics=[metric], device='cpu')
    learn.remove_cb(ProgressCallback)
    torch.manual_seed(seed)
    return learn


def _score(task, learn):
    import torch
    preds, targs = learn.get_preds(act=False)
    m = task.metric(preds, targs)
    if not np.isfinite(m) or not torch.isfinite(preds).all(): m = float('nan')
    return m, learn.validate()['valid_loss']


def train(task, data, seed, lr):
    "Train `task` at `lr` with `seed` for its budget; its metric, validation loss, seconds and steps."
    from lessonlib.callbacks import NonFiniteLossError
    learn = _learner(task, seed, data)
    t = time.perf_counter()
    try: learn.fit_one_cycle(task.epochs, lr)
    except NonFiniteLossError: return dict(metric=float('nan'), valid_loss=float('nan'), diverged=True,
                                           seconds=time.perf_counter() - t)
    secs = time.perf_counter() - t
    m, vl = _score(task, learn)
    return dict(metric=m, valid_loss=vl, seconds=secs, steps=task.epochs * len(learn.dls.train))


def job(spec):
    "One unit of work: a grid point; the lr_find sweep + training at every suggestion; or the automatic pick + training."
    import torch
    torch.set_num_threads(1)
    from tasks import TASKS
    kind, name, seed = spec[:3]
    task = TASKS[name]
    data = task.data()
    base = dict(task=name, seed=seed)
    if kind == 'grid':
        return [dict(base, kind='grid', rule='grid', lr=spec[3], **train(task, data, seed, spec[3]))]
    learn = _learner(task, seed, data)
    t = time.perf_counter()
    if kind == 'auto':
        from lessonlib import lr_find as lf
        from lessonlib.learner import auto_lr
        n, lo, hi, on = spec[3] or (lf.RACE_N, lf.RACE_LO, lf.RACE_HI, 'loss')
        rule = f"auto[{n},{lo:g},{hi:g}{',metric' if on == 'metric' else ''}]" if spec[3] else 'auto'
        budget = task.epochs * len(learn.dls.train)
        steps = min(2 * 100 // n, budget)          # never a race longer than the training it stands for
        if spec[3]:
            sugg = learn.lr_find(show_plot=False)
            f = learn.lr_finder
            a = auto_lr(learn, sugg, steps, n, lo, hi, curve=(f.lrs, f.losses),
                        monitor=task.metric_name if on == 'metric' else 'valid_loss')
        else:                                      # the library's default race, given the budget as a user can
            learn.lr_find(show_plot=False, suggest='auto', race_steps=steps)
            a = learn.lr_auto
            on = 'loss' if a.monitor == 'valid_loss' else 'metric'
        rec = dict(base, kind='race', rule=rule, seconds=time.perf_counter() - t, race_seconds=a.seconds,
                   steps=a.steps * len(a.candidates), lr=a.lr, candidates=a.candidates, scores=a.scores, n=n, lo=lo, hi=hi, on=on,
                   monitor=a.monitor)
        return [rec, dict(base, kind='suggestion', rule=rule, lr=a.lr, n=n, lo=lo, hi=hi, on=on, **train(task, data, seed, a.lr))]
    sugg = learn.lr_find(show_plot=False)
    f = learn.lr_finder
    out = [dict(base, kind='lr_find', rule='lr_find', seconds=time.perf_counter() - t, steps=len(f.lrs),
                lrs=list(map(float, f.lrs)), losses=list(map(float, f.losses)),
                suggestions={k: v for k, v in sugg._asdict().items() if v})]
    rates = {k: getattr(sugg, k) for k in CURVE} | FIXED
    for rule, lr in rates.items():
        out.append(dict(base, kind='suggestion', rule=rule, lr=lr, **train(task, data, seed, lr)))
    return out


def specs(tasks, seeds, grid, race=None):
    return ([('suggest', t, s) for t in tasks for s in seeds] + [('auto', t, s, race) for t in tasks for s in seeds]
            + [('grid', t, s, lr) for t in tasks for s in seeds for lr in grid])


def done(out: Path) -> set:
    keys = set()
    if out.exists():
        for line in out.read_text().splitlines():
            r = json.loads(line)
            kind = {'grid': 'grid', 'lr_find': 'suggest', 'race': 'auto'}.get(r['kind'])
            if kind == 'auto':
                keys.add(('auto', r['task'], r['seed'], None if r['rule'] == 'auto' else (r['n'], r['lo'], r['hi'], r.get('on', 'loss'))))
            elif kind: keys.add((kind, r['task'], r['seed']) + ((r['lr'],) if kind == 'grid' else ()))
    return keys


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--tasks', default='', help='comma-separated task names (default: all)')
    p.add_argument('--seeds', type=int, nargs='+', default=[0, 1])
    p.add_argument('--jobs', type=int, default=1, help='processes working at once (one thread each)')
    p.add_argument('--out', default=str(HERE/'results'/'runs.jsonl'))
    p.add_argument('--smoke', action='store_true', help='CI: the tiny task, 3 grid rates, one seed, a scratch file')
    p.add_argument('--only', choices=['grid', 'suggest', 'auto'], default=None, help='run only this kind of job')
    p.add_argument('--race', default=None, help="N,LO,HI[,metric]: race N candidates over valley*10**LO..valley*10**HI "
                   "(judged on the task's metric instead of the validation loss with ',metric') instead of the library's "
                   "defaults (for tuning; recorded as the rule auto[N,LO,HI[,metric]])")
    a = p.parse_args(argv)
    os.environ.setdefault('OMP_NUM_THREADS', '1')
    from tasks import TASKS
    names = a.tasks.split(',') if a.tasks else list(TASKS)
    if bad := [n for n in names if n not in TASKS]: p.error(f'unknown tasks {bad}; the suite has {list(TASKS)}')
    grid, seeds = GRID, a.seeds
    if a.smoke: names, grid, seeds = ['tiny'], GRID[3::4], [0]
    out = Path(a.out); out.parent.mkdir(parents=True, exist_ok=True)
    have = done(out)
    race = None
    if a.race:
        n, lo, hi, *on = a.race.split(',')
        race = (int(n), float(lo), float(hi), on[0] if on else 'loss')
    todo = [s for s in specs(names, seeds, grid, race) if s not in have and (a.only is None or s[0] == a.only)]
    print(f'{len(todo)} jobs to run ({len(have)} already in {out})', flush=True)
    for n in dict.fromkeys(s[1] for s in todo): TASKS[n].data()          # build caches once, before the workers
    t0 = time.perf_counter()
    ctx = get_context('spawn')
    with ctx.Pool(a.jobs) as pool, open(out, 'a') as f:
        for i, recs in enumerate(pool.imap_unordered(job, todo), 1):
            for r in recs: f.write(json.dumps(r) + '\n')
            f.flush()
            r = recs[-1]
            print(f'[{i}/{len(todo)} {time.perf_counter() - t0:.0f}s] {r["task"]} seed {r["seed"]} {r["rule"]} '
                  f'lr {r.get("lr", 0):.3g}: {r.get("metric", float("nan")):.4f}', flush=True)
    print(f'suite wall time {time.perf_counter() - t0:.0f}s')


if __name__ == '__main__':
    main()
