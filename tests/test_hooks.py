"ActivationStats and hook_outputs in the real Learner: stats against a hand-computed oracle, no hooks left."
import copy
import pytest, torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset
from lessonlib.data import DataLoaders
from lessonlib.learner import Learner
from lessonlib.hooks import ActivationStats, Hook, Hooks, activation_stats, hook_outputs


def n_hooks(model): return sum(len(m._forward_hooks) for m in model.modules())


def make(n_train=40, n_valid=24, bs=8, target='class'):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n_train + n_valid, 1, 8, 8, generator=g)
    y = (torch.randint(0, 2, (len(x),), generator=g) if target == "class"
         else torch.randn(len(x), 2, generator=g))
    dls = DataLoaders(DataLoader(TensorDataset(x[:n_train], y[:n_train]), batch_size=bs),
                      DataLoader(TensorDataset(x[n_train:], y[n_train:]), batch_size=bs))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, 2, 1), nn.ReLU(), nn.Conv2d(4, 8, 3, 2, 1), nn.ReLU(),
                          nn.Flatten(), nn.Linear(8 * 2 * 2, 2))
    return dls, model, x


def test_learner_fit_records_train_batches_only():
    "One stats row per training batch (5), none for the 3 validation batches; the first matches the oracle."
    dls, model, x = make()
    before = copy.deepcopy(model)
    st = ActivationStats()
    learn = Learner(dls, model, loss_func=nn.CrossEntropyLoss(), lr=1e-2, cbs=[st], device='cpu')
    learn.fit(1)
    assert st.names == ['0', '2', '5']
    assert st.stats.shape == (3, 5, 3)
    o = before[2](before[1](before[0](x[:8])))
    torch.testing.assert_close(torch.tensor(st.stats[1, 0]),
                               torch.stack([o.mean(), o.std(), (o.abs() < 1e-2).float().mean()]))
    assert n_hooks(model) == 0
    learn.fit(1)   # a second fit starts a new record and removes its hooks again
    assert st.stats.shape == (3, 5, 3) and n_hooks(model) == 0


def test_learner_mse_and_chosen_modules():
    "With F.mse_loss and the ReLU outputs hooked: near-zero share equals the share of exact zeros (oracle)."
    dls, model, x = make(target='reg')
    before = copy.deepcopy(model)
    st = ActivationStats(modules=[model[1], model[3]], eps=1e-6)
    Learner(dls, model, loss_func=F.mse_loss, cbs=[st], device='cpu').fit(1)
    relu_out = F.relu(before[0](x[:8]))
    assert st.names == ['1', '3']
    assert st.stats[0, 0, 2] == pytest.approx((relu_out == 0).float().mean().item())
    assert n_hooks(model) == 0


class Boom:
    order = 1
    def after_batch(self, learn):
        if learn.training and learn.iter == 2: raise RuntimeError('boom')


def test_exception_mid_fit_leaves_no_hooks():
    dls, model, _ = make()
    st = ActivationStats()
    learn = Learner(dls, model, loss_func=nn.CrossEntropyLoss(), cbs=[st, Boom()], device='cpu')
    with pytest.raises(RuntimeError, match='boom'): learn.fit(1)
    assert n_hooks(model) == 0
    assert st.stats.shape[1] == 3   # batches 0, 1, 2 were recorded before the error


def test_hooks_removed_on_error():
    model = nn.Sequential(nn.Linear(2, 3), nn.ReLU())
    with pytest.raises(ValueError):
        with Hooks(model, lambda h, m, i, o: None): raise ValueError
    with pytest.raises(ValueError):
        with Hook(model[0], lambda h, m, i, o: None): raise ValueError
    assert n_hooks(model) == 0
    with pytest.raises(TypeError, match='expected an nn.Module'): Hooks([model[0], 'x'], lambda *a: None)
    assert n_hooks(model) == 0


def test_activation_stats_table():
    _, model, x = make()
    df = activation_stats(model, x[:16])
    o = model[0](x[:16])
    assert list(df.layer) == ['0', '2', '5']
    assert df['mean'][0] == pytest.approx(o.mean().item(), abs=1e-6)
    assert df['std'][0] == pytest.approx(o.std().item(), abs=1e-6)
    assert n_hooks(model) == 0


def test_hook_outputs_keeps_graph_for_skips():
    "detach=False: gradient reaches the first layer through the stored output as in the plain forward."
    torch.manual_seed(0)
    enc = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 4))
    head = nn.Linear(8, 1)
    x = torch.randn(5, 3)
    with hook_outputs([enc[0]], detach=False) as hs:
        head(torch.cat([enc(x), hs[0].stored], 1)).sum().backward()
    g_hooked = enc[0].weight.grad.clone()
    enc.zero_grad()
    head(torch.cat([enc(x), enc[0](x)], 1)).sum().backward()
    torch.testing.assert_close(g_hooked, enc[0].weight.grad)
    assert n_hooks(enc) == 0
