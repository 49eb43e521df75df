"Tests for lessonlib.synth.planet: determinism, and that a tiny CNN can really learn the painted tags."
import time

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from lessonlib.synth.planet import PLANET_TAGS, make_planet, planet_tile


def _files(path):
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in sorted(path.rglob('*')) if p.is_file()}


def test_same_seed_same_bytes(tmp_path):
    a = make_planet(tmp_path/'a', n=12, size=32, seed=3)
    b = make_planet(tmp_path/'b', n=12, size=32, seed=3)
    fa, fb = _files(a), _files(b)
    assert sorted(fa) == sorted(fb)
    assert len([k for k in fa if k.startswith('train-jpg/')]) == 12
    assert len([k for k in fa if k.startswith('test-jpg/')]) == 1          # n/10 test tiles
    assert fa == fb
    tags = pd.read_csv(a/'train_v2.csv').tags.str.split().tolist()
    assert tags == [planet_tile(i, seed=3, size=32)[0] for i in range(12)]


def test_other_seed_other_set(tmp_path):
    a = make_planet(tmp_path/'a', n=12, size=32, seed=3)
    c = make_planet(tmp_path/'c', n=12, size=32, seed=4)
    assert (a/'train_v2.csv').read_bytes() != (c/'train_v2.csv').read_bytes()


def test_changed_request_regenerates(tmp_path):
    p = make_planet(tmp_path/'p', n=6, size=32)
    assert Image.open(p/'train-jpg'/'train_0.jpg').size == (32, 32)
    make_planet(tmp_path/'p', n=6, size=48)
    assert Image.open(p/'train-jpg'/'train_0.jpg').size == (48, 48)
    assert [o.name for o in tmp_path.iterdir() if not o.name.endswith('.lock')] == ['p']


def _load(path):
    df = pd.read_csv(path/'train_v2.csv')
    x = np.stack([np.asarray(Image.open(path/'train-jpg'/f'{n}.jpg')) for n in df.image_name])
    x = torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255
    y = torch.tensor([[t in s.split() for t in PLANET_TAGS] for s in df.tags]).float()
    return x, y


def _tiny_cnn(n_out):
    def conv(ni, nf): return nn.Sequential(nn.Conv2d(ni, nf, 3, 2, 1, bias=False), nn.BatchNorm2d(nf), nn.ReLU())
    return nn.Sequential(conv(3, 16), conv(16, 32), conv(32, 64), conv(64, 64),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, n_out))


def test_tiny_cnn_learns_it(tmp_path):
    "A tiny plain-PyTorch CNN trained ~30 s beats the best constant guess ('clear primary') on F2 by a clear margin."
    fbeta_score = pytest.importorskip('sklearn.metrics').fbeta_score
    start = time.time()
    torch.manual_seed(0)
    x, y = _load(make_planet(tmp_path/'planet', n=640, size=64, seed=42))
    x = (x - x.mean((0, 2, 3), keepdim=True)) / x.std((0, 2, 3), keepdim=True)
    nv = 160
    xt, yt, xv, yv = x[nv:], y[nv:], x[:nv], y[:nv]
    model, bs, epochs = _tiny_cnn(len(PLANET_TAGS)), 32, 6
    opt = torch.optim.AdamW(model.parameters(), 1e-2, weight_decay=1e-2)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 1e-2, total_steps=epochs * ((len(xt) + bs - 1) // bs))
    for _ in range(epochs):
        model.train()
        for idx in torch.randperm(len(xt)).split(bs):
            xb = xt[idx]
            xb = torch.where(torch.rand(len(xb), 1, 1, 1) < 0.5, xb.flip(3), xb)
            loss = F.binary_cross_entropy_with_logits(model(xb), yt[idx])
            opt.zero_grad(); loss.backward(); opt.step(); sched.step()
    model.eval()
    with torch.no_grad(): pred = (torch.sigmoid(model(xv)) > 0.2).numpy()
    f2 = fbeta_score(yv.numpy(), pred, beta=2, average='samples', zero_division=0)
    base = np.zeros(yv.shape); base[:, [PLANET_TAGS.index('clear'), PLANET_TAGS.index('primary')]] = 1
    f2_base = fbeta_score(yv.numpy(), base, beta=2, average='samples', zero_division=0)
    print(f'F2 {f2:.3f} vs all "clear primary" {f2_base:.3f} in {time.time() - start:.0f}s')
    assert 0.55 < f2_base < 0.75, f2_base  # the painted set has Planet's label mix
    assert f2 > f2_base + 0.12, (f2, f2_base)


def test_marker_unchanged_so_cached_sets_are_reused(tmp_path):
    "Without test tiles the marker holds exactly what it held before the move to lessonlib.synth: sets made earlier are reused."
    from lessonlib.synth.core import MARKER, read_marker
    assert read_marker(make_planet(tmp_path/'t', n=30, size=32, seed=1))['n_test'] == 3   # the default: n/10 test tiles
    p = make_planet(tmp_path/'p', n=3, size=32, seed=1, n_test=0)
    assert read_marker(p) == {'version': 1, 'n': 3, 'size': 32, 'seed': 1, 'quality': 90}
    (p/MARKER).write_text('{"version": 1, "n": 3, "size": 32, "seed": 1, "quality": 90}')   # as written before
    mtime = (p/'train_v2.csv').stat().st_mtime_ns
    assert make_planet(tmp_path/'p', n=3, size=32, seed=1, n_test=0) == p and (p/'train_v2.csv').stat().st_mtime_ns == mtime
    make_planet(tmp_path/'p', n=3, size=32, seed=1, n_test=2)                         # asking for test tiles paints again
    assert len(list((p/'test-jpg').glob('*.jpg'))) == 2 and read_marker(p)['n_test'] == 2


def test_failed_make_keeps_old_set(tmp_path):
    "A set whose painting fails halfway leaves the previous set as it was, and no temporary folder."
    from lessonlib.synth.core import make_synth, read_marker
    p = make_planet(tmp_path/'p', n=3, size=32, seed=1)
    before = _files(p)
    def broken(folder):
        (folder/'train_v2.csv').write_text('half')
        raise OSError('disk full')
    with pytest.raises(OSError, match='disk full'): make_synth(p, {'version': 1, 'n': 9}, broken, maker='make_planet')
    assert _files(p) == before and read_marker(p)['n'] == 3
    assert [o.name for o in tmp_path.iterdir() if not o.name.endswith('.lock')] == ['p']
