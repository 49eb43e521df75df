"""Summarise the learning-rate suite's results into Markdown (regret per task and rule, cost), and tune the race.

    python benchmarks/lr_suite/summarize.py [--runs results/runs.jsonl] [--out results.md]
    python benchmarks/lr_suite/summarize.py --tune     # choose the race's span (lo, hi) on the tuning tasks only

Regret of a rate on a task = (best - metric) / (best - baseline), with the metric's sign flipped when lower is better:
0 is as good as the best rate of the grid, 1 is no better than the prior predictor (the baseline). The best is the best
seed-mean of the grid. A run that diverged scores the baseline (regret 1).
"""
from __future__ import annotations
import argparse, json, os, sys
from collections import defaultdict
from pathlib import Path
import numpy as np

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
RULES = ['valley', 'slide', 'minimum', 'steep', 'fixed_3e-3', 'fixed_1e-2', 'auto']
TUNE = ['camvid', 'imdb', 'planet', 'tiny']        # the race's span is tuned on these only, fixed before any run
VARIANTS = ['auto[loss,shuffled]', 'auto[metric]', 'auto[metric,first]', 'auto[4,0,1.5]', 'auto[5,0,1.75]']  # see HISTORY
HISTORY = """How `auto` came to be (every race: 3 candidates unless named, `valley` to `valley × 10**1.5`, 66 steps each at
most, never more than the task's own budget):
1. The span and the number of candidates were chosen on the tuning tasks only: an oracle race on the grid
   (`summarize.py --tune`) favoured spans of 1.5-2 decades above `valley` and no cap at the curve's minimum; real races of
   3 and 4 candidates over that span and 5 over 0-1.75 decades then gave mean regret 0.048, 0.188 and 0.073 on the
   tuning tasks (more candidates means shorter races for the same cost; neither 4 nor 5 beat 3). 3 candidates, `lo = 0`, `hi = 1.5` were kept.
2. Judging the race on the task's metric instead of the validation loss did better on the tuning tasks (0.030 against
   0.048), so it was made the default (`auto[metric,first]`: equal scores went to the first, lowest, rate) and run on the
   held-out tasks: mean regret 0.241 there, against 0.113 for the loss. `nobn` lost the most: two candidates tied on
   accuracy (72 validation images) and the lower rate won the tie.
3. Ties were then broken by the validation loss (`auto[metric]`): held-out 0.177. That rule has no constant to tune, but
   it was added after seeing a held-out task, so its held-out figure is not clean.
4. The choice between the three variants run on every task was finally made by leave-one-task-out over them: it picked
   the loss in 8 of 9 folds (mean regret 0.167 left out), and the loss became the default.
5. A review then found that the race did not restore a loader's own random generator, so each candidate saw its batches
   in another order (`auto[loss,shuffled]`, and every variant above, ran so). Fixed; `auto` is the fixed race, run again
   on every task with nothing else changed. The leave-one-task-out table below compares it with the metric variants.
Every race here is given `race_steps = min(66, the task's budget)`: a race never longer than the training it stands for
(`lr_find(suggest='auto', race_steps=...)`). The library's default, with no budget known, is 66 steps per candidate."""


def load(fn):
    return [json.loads(l) for l in Path(fn).read_text().splitlines() if l.strip()]


class Suite:
    def __init__(self, runs):
        from tasks import TASKS
        self.runs, self.tasks = runs, {}
        for name in dict.fromkeys(r['task'] for r in runs):
            t = TASKS[name]
            d = t.data()
            self.tasks[name] = dict(task=t, baseline=t.baseline(d[1], d[3]), sign=1 if t.higher_better else -1)
        self.grid = defaultdict(lambda: defaultdict(dict))          # task -> lr -> seed -> metric
        for r in runs:
            if r['kind'] == 'grid': self.grid[r['task']][r['lr']][r['seed']] = self._m(r)
        self.best = {}
        for name, g in self.grid.items():
            sign = self.tasks[name]['sign']
            means = {lr: np.mean(list(v.values())) for lr, v in g.items()}
            self.best[name] = sign * max(sign * m for m in means.values())

    def _m(self, r):
        m = r.get('metric')
        return self.tasks[r['task']]['baseline'] if m is None or not np.isfinite(m) else m

    def regret(self, task, metric):
        t = self.tasks[task]
        gap = t['sign'] * (self.best[task] - t['baseline'])
        if gap <= 0: return float('nan')            # no rate beat the prior predictor: regret is undefined
        return t['sign'] * (self.best[task] - metric) / gap

    def rule_regrets(self):
        "task -> rule -> mean regret over seeds (and the rates used)."
        out = defaultdict(dict)
        acc = defaultdict(list)
        for r in self.runs:
            if r['kind'] == 'suggestion' and r['task'] in self.best:
                acc[r['task'], r['rule']].append((self.regret(r['task'], self._m(r)), r['lr']))
        for (task, rule), v in acc.items(): out[task][rule] = (float(np.mean([a for a, _ in v])), [b for _, b in v])
        return out

    def curve(self, task, seed):
        for r in self.runs:
            if r['kind'] == 'lr_find' and r['task'] == task and r['seed'] == seed: return r
        return None

    def interp(self, task, seed, lr):
        "The metric the grid says a full training at `lr` reaches (log-lr interpolation within one seed)."
        pts = sorted((k, v[seed]) for k, v in self.grid[task].items() if seed in v)
        x = np.log10([k for k, _ in pts]); y = [m for _, m in pts]
        return float(np.interp(np.log10(lr), x, y))


def simulate(s: Suite, tasks, lo, hi, n=3):
    "Mean regret (and misses) of an oracle race over race_candidates(lo, hi) on `tasks`, from the grid."
    from lessonlib.lr_find import race_candidates, SuggestedLRs
    regs = []
    for task in tasks:
        rs = []
        for seed in sorted({sd for v in s.grid[task].values() for sd in v}):
            c = s.curve(task, seed)
            if c is None: continue
            cands = race_candidates(SuggestedLRs(**c['suggestions']), n, lo, hi)
            rs.append(min(s.regret(task, s.interp(task, seed, lr)) for lr in cands))
        if rs: regs.append(np.mean(rs))
    return float(np.mean(regs)), int(sum(r > 0.05 for r in regs))


def tune(s: Suite):
    print(f'Tuning the race span on {TUNE} (oracle race on the grid: assumes the race ranks as the full budget does)')
    res = []
    for lo in np.arange(-1, 1.01, 0.25):
        for span in (0.5, 1.0, 1.5):
            mean, miss = simulate(s, TUNE, lo, lo + span)
            res.append((mean, miss, lo, lo + span))
    res.sort()
    for mean, miss, lo, hi in res[:8]: print(f'  lo {lo:+.2f} hi {hi:+.2f}: mean regret {mean:.4f}, tasks > 0.05: {miss}')
    return res[0]


def table(s: Suite) -> str:
    rr = s.rule_regrets()
    tasks = list(s.tasks)
    tried = [r for r in VARIANTS if any(r in rr[t] for t in tasks)]      # race settings tried while tuning
    rules = [r for r in RULES + tried if any(r in rr[t] for t in tasks)]
    lines = ['| task | ' + ' | '.join(rules) + ' |', '|---' * (len(rules) + 1) + '|']
    for t in tasks:
        cells = [f"{rr[t][r][0]:.3f}" if r in rr[t] else '' for r in rules]
        lines.append(f"| {t}{' (tuning)' if t in TUNE else ''} | " + ' | '.join(cells) + ' |')
    def agg(ts, f):
        return [f([rr[t][r][0] for t in ts if r in rr[t]]) if any(r in rr[t] for t in ts) else float('nan') for r in rules]
    for label, ts in (('all tasks', tasks), ('held-out tasks', [t for t in tasks if t not in TUNE]),
                      ('tuning tasks', [t for t in tasks if t in TUNE])):
        lines.append(f'| **mean regret, {label}** | ' + ' | '.join(f'{v:.3f}' for v in agg(ts, np.mean)) + ' |')
        lines.append(f'| **share ≤ 0.05, {label}** | ' + ' | '.join(
            f'{v:.2f}' for v in agg(ts, lambda v: np.mean(np.array(v) <= 0.05))) + ' |')
    return '\n'.join(lines)


def loto(s: Suite, variants=('auto', 'auto[metric]', 'auto[metric,first]')) -> str:
    "Leave one task out: pick the variant with the lowest mean regret on the other tasks, score it on the one left out."
    rr = s.rule_regrets()
    tasks = [t for t in s.tasks if all(v in rr[t] for v in variants)]
    lines = ['| task left out | variant chosen on the others | its regret there |', '|---|---|---|']
    regs = []
    for t in tasks:
        pick = min(variants, key=lambda v: np.mean([rr[u][v][0] for u in tasks if u != t]))
        regs.append(rr[t][pick][0])
        lines.append(f'| {t} | {pick} | {regs[-1]:.3f} |')
    if regs: lines.append(f'| **mean** (share ≤ 0.05: {np.mean(np.array(regs) <= 0.05):.2f}) | | **{np.mean(regs):.3f}** |')
    return '\n'.join(lines)


def costs(s: Suite) -> str:
    lf = [r for r in s.runs if r['kind'] == 'lr_find']
    rc = [r for r in s.runs if r['kind'] == 'race' and r['rule'] == 'auto']
    tr = defaultdict(list)
    for r in s.runs:
        if r['kind'] in ('grid', 'suggestion') and 'steps' in r: tr[r['task']].append(r['seconds'] / r['steps'])
    def per_task(rs, key):
        d = defaultdict(list)
        for r in rs: d[r['task']].append(r[key])
        return {t: np.mean(v) for t, v in d.items()}
    lf_steps, lf_secs = per_task(lf, 'steps'), per_task(lf, 'seconds')
    rc_steps, rc_secs = per_task(rc, 'steps'), per_task(rc, 'race_seconds')
    lines = ['| task | budget (steps) | lr_find steps | lr_find s | race steps (all candidates) | race s | s per training step |',
             '|---|---|---|---|---|---|---|']
    for t in s.tasks:
        steps = [r['steps'] for r in s.runs if r['task'] == t and r['kind'] == 'grid' and 'steps' in r]
        lines.append(f"| {t} | {steps[0] if steps else ''} | {lf_steps.get(t, 0):.0f} | {lf_secs.get(t, 0):.1f} | "
                     f"{rc_steps.get(t, 0):.0f} | {rc_secs.get(t, 0):.1f} | {np.mean(tr[t]):.4f} |")
    return '\n'.join(lines)


def grid_table(s: Suite) -> str:
    lrs = sorted({lr for g in s.grid.values() for lr in g})
    lines = ['| task (metric) | baseline | ' + ' | '.join(f'{lr:.2g}' for lr in lrs) + ' |', '|---' * (len(lrs) + 2) + '|']
    for t, g in s.grid.items():
        task = s.tasks[t]['task']
        cells = []
        for lr in lrs:
            m = np.mean(list(g[lr].values())) if lr in g else float('nan')
            cells.append(('**%.3f**' if m == s.best[t] else '%.3f') % m)
        lines.append(f"| {t} ({task.metric_name}) | {s.tasks[t]['baseline']:.3f} | " + ' | '.join(cells) + ' |')
    return '\n'.join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--runs', default=str(HERE/'results'/'runs.jsonl'))
    p.add_argument('--out', default=str(HERE/'results.md'))
    p.add_argument('--tune', action='store_true')
    a = p.parse_args(argv)
    s = Suite(load(a.runs))
    if a.tune:
        tune(s)
        return
    from tasks import TASKS
    wall = sum(r.get('seconds', 0) for r in s.runs)
    held = [t for t in s.tasks if t not in TUNE]
    lo_hi = {(r.get('lo'), r.get('hi')) for r in s.runs if r['kind'] == 'race' and r['rule'] == 'auto'}
    md = ['# The learning-rate suite: results', '',
          f'Produced by `python benchmarks/lr_suite/run.py --jobs 2` then `python benchmarks/lr_suite/summarize.py`, '
          f'on 2 CPU cores. {len(s.runs)} records; {wall / 60:.0f} min of training and sweeping in all (one thread each).', '',
          '## Tasks', '', '| task | what | data | budget | metric |', '|---|---|---|---|---|']
    for t in s.tasks:
        task = TASKS[t]
        md.append(f'| {t} | {task.kind} | {task.source} | fit_one_cycle({task.epochs}), bs {task.bs} | '
                  f"{task.metric_name} ({'higher' if task.higher_better else 'lower'} is better) |")
    md += ['', '## Regret per task and rule', '',
           'Mean over seeds of (best - metric) / (best - baseline). Rules: the four readings of the lr_find curve, '
           'two fixed rates, and `auto` (`lr_find(suggest=\'auto\')`: a race of three short complete one-cycles, '
           f'span (lo, hi) = {sorted(lo_hi)} decades above valley). The span was chosen on the tuning tasks {TUNE} '
           f'only; the held-out tasks {held} never informed it.', '', table(s), '',
           '## How the automatic pick was chosen', '', HISTORY, '', '### Leave one task out', '', loto(s), '',
           '## Cost', '', 'Extra training steps before the real training: every curve rule pays one lr_find sweep; '
           '`auto` pays the sweep and the race; the fixed rates pay nothing.', '', costs(s), '',
           '## The grid (seed-mean metric per learning rate; best in bold)', '', grid_table(s), '']
    out = Path(a.out)
    tmp = out.with_suffix('.tmp'); tmp.write_text('\n'.join(md)); os.replace(tmp, out)
    print('\n'.join(md))


if __name__ == '__main__':
    main()
