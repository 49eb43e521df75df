"""The learning-rate suite (benchmarks/lr_suite): a smoke run of the runner, resuming, and the regret arithmetic."""
import json, subprocess, sys
from collections import Counter
from pathlib import Path
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
SUITE = ROOT/'benchmarks'/'lr_suite'
sys.path.insert(0, str(SUITE))


def _run(*args, timeout=900):
    return subprocess.run([sys.executable, *map(str, args)], cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def test_smoke_run_resume_and_summary(tmp_path):
    "CI's tiny version: one task, 3 grid rates, one seed, every suggestion and the race; resuming reruns nothing."
    out = tmp_path/'runs.jsonl'
    r = _run(SUITE/'run.py', '--smoke', '--out', out)
    assert r.returncode == 0, r.stderr[-3000:]
    recs = [json.loads(l) for l in out.read_text().splitlines()]
    kinds = Counter(x['kind'] for x in recs)
    assert kinds == {'grid': 3, 'lr_find': 1, 'race': 1, 'suggestion': 7}, kinds
    race = next(x for x in recs if x['kind'] == 'race')
    assert race['lr'] == race['candidates'][int(np.argmin(race['scores']))]
    assert {x['rule'] for x in recs if x['kind'] == 'suggestion'} == {'valley', 'slide', 'minimum', 'steep', 'fixed_3e-3',
                                                                      'fixed_1e-2', 'auto'}
    again = _run(SUITE/'run.py', '--smoke', '--out', out)
    assert again.returncode == 0 and '0 jobs to run' in again.stdout, again.stdout
    md = tmp_path/'results.md'
    s = _run(SUITE/'summarize.py', '--runs', out, '--out', md)
    assert s.returncode == 0, s.stderr[-3000:]
    text = md.read_text()
    assert '| tiny (tuning) |' in text and 'auto' in text and '## Cost' in text


def test_regret_by_hand():
    "Regret = (best - metric) / (best - baseline), best = the best seed-mean of the grid; sign flipped when lower is better."
    from summarize import Suite
    from tasks import TASKS
    t = TASKS['tiny']
    d = t.data()
    base = t.baseline(d[1], d[3])
    runs = [dict(task='tiny', kind='grid', lr=lr, seed=s, metric=m) for lr, ms in ((1e-3, (0.5, 0.7)), (1e-2, (0.9, 0.8)))
            for s, m in enumerate(ms)]
    runs += [dict(task='tiny', kind='suggestion', rule='valley', lr=1e-3, seed=0, metric=0.6),
             dict(task='tiny', kind='suggestion', rule='valley', lr=1e-3, seed=1, metric=float('nan'))]
    s = Suite(runs)
    assert s.best['tiny'] == pytest.approx(0.85)
    want = np.mean([(0.85 - 0.6) / (0.85 - base), 1.0])          # a diverged run scores the baseline: regret 1
    assert s.rule_regrets()['tiny']['valley'][0] == pytest.approx(want)
    assert s.interp('tiny', 0, 10 ** -2.5) == pytest.approx(0.7)  # half-way on the log scale between 0.5 and 0.9
