"The lesson benchmark compares like with like: its hand-written loop and `fit_one_cycle` do the same training."
import importlib.util, sys
from pathlib import Path
import numpy as np
import pytest
import torch, torch.nn as nn, torch.nn.functional as F
from lessonlib.data import DataLoaders
from lessonlib.learner import Learner
from lessonlib.metrics import accuracy
from lessonlib.schedule import one_cycle_scheds

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope='module')
def bench():
    spec = importlib.util.spec_from_file_location('bench_lessons', ROOT/'benchmarks'/'bench_lessons.py')
    mod = importlib.util.module_from_spec(spec)
    sys.modules['bench_lessons'] = mod
    spec.loader.exec_module(mod)
    return mod


def test_hand_written_one_cycle_matches_library(bench):
    "The benchmark's cosine one-cycle, written out by hand, gives the library's learning rates and momenta."
    lr_max, div, div_final, pct, moms = 3e-3, 25., 1e5, 0.25, (0.95, 0.85, 0.95)
    s = one_cycle_scheds(np.array([lr_max]), div, div_final, pct, moms)
    for pos in np.linspace(0, 1, 41):
        assert bench.one_cycle(pos, lr_max / div, lr_max, lr_max / div_final, pct) == pytest.approx(float(s['lr'](pos)[0]))
        assert bench.one_cycle(pos, *moms, pct) == pytest.approx(float(s['mom'](pos)))
    assert bench.one_cycle(0., 1., 2., 3., pct) == 1. and bench.one_cycle(pct, 1., 2., 3., pct) == 2.


def _case(bench, **kw):
    g = torch.Generator().manual_seed(0)
    train = [(torch.randn(8, 6, generator=g), torch.randint(0, 3, (8,), generator=g)) for _ in range(10)]
    valid = train[:2]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, 3))
    groups = lambda m: [list(m[:3].parameters()), list(m[3:].parameters())]     # two layer groups
    learn = Learner(DataLoaders(train, valid), model, loss_func=F.cross_entropy, metrics=accuracy, splitter=groups)
    args = dict(name='tiny', what='', learn=learn, model=model, train=train, valid=valid, loss=F.cross_entropy,
                lr=slice(1e-3, 1e-2), splitter=groups, metrics=learn.metrics)
    return bench.Case(**{**args, **kw})


def test_plain_loop_and_learner_train_alike(bench):
    "Same seed, batches, groups, schedule: the two sides' batch losses and validation results are the same."
    case, cpu = _case(bench), torch.device('cpu')
    _, _, _, p = bench.run_side(bench.plain_fit, case, 3, cpu, 1, None)
    _, _, _, l = bench.run_side(bench.learner_fit, case, 3, cpu, 1, None)
    assert len(p['losses']) == len(l['losses']) == 30
    np.testing.assert_allclose(p['losses'], l['losses'], rtol=1e-5, atol=1e-6)
    assert p['valid_loss'] == pytest.approx(l['valid_loss'], rel=1e-5)
    assert p['accuracy'] == pytest.approx(l['accuracy'])
    assert p['losses'][0] != pytest.approx(p['losses'][-1])          # it trained


def test_comparison_detects_different_work(bench):
    "The check can fail: another momentum schedule in the plain loop gives other losses."
    cpu = torch.device('cpu')
    _, _, _, p = bench.run_side(bench.plain_fit, _case(bench, moms=(0.9, 0.8, 0.9)), 3, cpu, 1, None)
    _, _, _, l = bench.run_side(bench.learner_fit, _case(bench), 3, cpu, 1, None)
    assert not np.allclose(p['losses'], l['losses'], rtol=1e-5, atol=1e-6)


def test_loss_oracle_rejects_a_different_loss(bench):
    "`check_loss` refuses a plain loss that is not the learner's."
    case = _case(bench, loss=lambda p, y: F.cross_entropy(p, y, label_smoothing=0.1))
    with pytest.raises(AssertionError, match='differs from the learner loss'): bench.check_loss(case, torch.device('cpu'))
    bench.check_loss(_case(bench), torch.device('cpu'))
