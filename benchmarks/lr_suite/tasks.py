"""The tasks of the learning-rate suite: each a fixed budget (`fit_one_cycle(epochs)` at a fixed batch and input size).

A task builds its data once (tensors, cached under benchmarks/lr_suite/cache/), a model from a seed, and knows its loss,
its metric (higher or lower is better) and a baseline: what a prior predictor scores (the majority class, the tag
frequencies, the mean point). Regret is measured between that baseline and the best rate found by the grid.
"""
from __future__ import annotations
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable
import numpy as np
import torch, torch.nn as nn, torch.nn.functional as F
from PIL import Image
from lessonlib.core import data_dir, set_seed

CACHE = Path(__file__).parent/'cache'


@dataclass
class Task:
    name: str
    kind: str                       # what it stands for (multi-label, from scratch, ...)
    data: Callable                  # () -> (x_train, y_train, x_valid, y_valid) tensors
    model: Callable                 # (seed) -> nn.Module
    loss: Callable
    metric: Callable                # (preds, targs) -> float
    metric_name: str
    higher_better: bool
    baseline: Callable              # (y_train, y_valid) -> float: the prior predictor's metric
    epochs: int
    bs: int
    freeze: Callable | None = None  # (model) -> None: freezes the body before training (fine-tune tasks)
    source: str = ''


# ---------- data helpers ----------
def _cached(name: str, make):
    "Tensors made by `make()`, cached in CACHE/name.pt (the cache is a speed-up only: delete it any time)."
    f = CACHE/f'{name}.pt'
    if f.exists(): return torch.load(f, weights_only=True)
    out = make()
    CACHE.mkdir(exist_ok=True)
    tmp = f.with_suffix('.tmp')
    torch.save(out, tmp); os.replace(tmp, f)
    return out


def _img(fn, size) -> torch.Tensor:
    "An image file as a float tensor (3, h, w) in [0, 1], squished to `size` (h, w)."
    with Image.open(fn) as im: im = im.convert('RGB').resize((size[1], size[0]), Image.BILINEAR)
    return torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1).float() / 255


def _split(n: int, valid_pct: float = 0.2, seed: int = 0):
    "A fixed random split of n items (the same for every run of the suite)."
    idx = np.random.default_rng(seed).permutation(n)
    k = int(round(n * valid_pct))
    return idx[k:], idx[:k]


def _norm(xt, xv):
    "Normalise both splits with the training set's per-channel mean and std."
    dims = [0] + list(range(2, xt.dim()))
    m, s = xt.mean(dims, keepdim=True), xt.std(dims, keepdim=True) + 1e-6
    return (xt - m) / s, (xv - m) / s


def planet_data():
    def make():
        import pandas as pd
        p = data_dir()/'planet_tiny'
        df = pd.read_csv(p/'labels.csv')
        tags = sorted({t for s in df.tags for t in s.split()})
        x = torch.stack([_img(p/'train'/f'{n}.jpg', (32, 32)) for n in df.image_name])
        y = torch.tensor([[t in s.split() for t in tags] for s in df.tags], dtype=torch.float32)
        t, v = _split(len(df))
        xt, xv = _norm(x[t], x[v])
        return xt, y[t], xv, y[v]
    return _cached('planet', make)


def _folder_data(root, splits, size, cache):
    "An ImageFolder-layout set: root/<split>/<class>/*; classes sorted by name."
    def make():
        out = []
        classes = sorted(d.name for d in (Path(root)/splits[0]).iterdir() if d.is_dir())
        for s in splits:
            files = [(f, i) for i, c in enumerate(classes) for f in sorted((Path(root)/s/c).iterdir())
                     if f.suffix.lower() in ('.jpg', '.jpeg', '.png')]
            out += [torch.stack([_img(f, size) for f, _ in files]), torch.tensor([i for _, i in files])]
        xt, xv = _norm(out[0], out[2])
        return xt, out[1], xv, out[3]
    return _cached(cache, make)


def scratch_data():
    from lessonlib.synth.scratch import make_scratch
    return _folder_data(make_scratch(), ('train', 'val'), (32, 32), 'scratch')


def hymenoptera_data():
    return _folder_data(data_dir()/'hymenoptera_data', ('train', 'val'), (32, 32), 'hymenoptera')


def mnist_data():
    return _folder_data(data_dir()/'mnist_tiny', ('train', 'valid'), (28, 28), 'mnist')


def pets_data():
    "The built-in pets set at 32 px, for pretraining the body of the fine-tune task."
    def make():
        from lessonlib.synth.pets import make_pets
        p = make_pets()/'images'
        files = sorted(p.glob('*.jpg'))
        breeds = sorted({f.stem.rsplit('_', 1)[0] for f in files})
        x = torch.stack([_img(f, (32, 32)) for f in files])
        y = torch.tensor([breeds.index(f.stem.rsplit('_', 1)[0]) for f in files])
        return x, y
    return _cached('pets', make)


def camvid_data():
    def make():
        p = data_dir()/'camvid_tiny'
        codes = (p/'codes.txt').read_text().split()
        valid = set((p/'valid.txt').read_text().split())
        files = sorted((p/'images').glob('*.png'))
        x = torch.stack([_img(f, (48, 64)) for f in files])
        def mask(f):
            with Image.open(p/'labels'/f'{f.stem}_P.png') as m: m = m.resize((64, 48), Image.NEAREST)
            return torch.from_numpy(np.asarray(m).astype(np.int64))
        y = torch.stack([mask(f) for f in files])
        void = codes.index('Void') if 'Void' in codes else -100
        y[y == void] = -100
        v = torch.tensor([f.name in valid for f in files])
        xt, xv = _norm(x[~v], x[v])
        return xt, y[~v], xv, y[v], torch.tensor(len(codes))
    return _cached('camvid', make)


def headpose_data():
    def make():
        from lessonlib.lessons.headpose import headpose_source
        _, df = headpose_source('synth', frames=40)
        x = torch.stack([_img(f, (48, 64)) for f in df.file])
        pts = torch.tensor(np.stack([df.x / df.width, df.y / df.height], 1) * 2 - 1, dtype=torch.float32)
        v = torch.tensor(df.is_valid.values)
        xt, xv = _norm(x[~v], x[v])
        return xt, pts[~v], xv, pts[v]
    return _cached('headpose', make)


def imdb_data(max_len: int = 160):
    def make():
        from lessonlib.text.data import read_texts_csv, make_vocab
        from lessonlib.text.tokenize import tokenize_texts
        df = read_texts_csv(data_dir()/'imdb_sample'/'texts.csv')
        toks = tokenize_texts(list(df.text), n_workers=1)
        valid = df.is_valid.values.astype(bool)
        vocab = make_vocab([t for t, v in zip(toks, valid) if not v], min_freq=3)
        stoi = {w: i for i, w in enumerate(vocab)}
        ids = torch.ones(len(toks), max_len, dtype=torch.long)          # 1 = padding
        for i, t in enumerate(toks):
            s = [stoi.get(w, 0) for w in t][:max_len]
            ids[i, :len(s)] = torch.tensor(s)
        labels = sorted(set(df.label))
        y = torch.tensor([labels.index(l) for l in df.label])
        v = torch.from_numpy(valid)
        return ids[~v], y[~v], ids[v], y[v], torch.tensor(len(vocab))
    return _cached('imdb', make)


def spirals_data(n: int = 1500, k: int = 3, noise: float = 0.25, seed: int = 0):
    "Three noisy interleaved spirals in 2-D: a tiny, non-linear classification task."
    g = np.random.default_rng(seed)
    t = g.uniform(0.25, 1, n) * 3 * np.pi
    c = g.integers(0, k, n)
    a = t + 2 * np.pi * c / k
    x = np.stack([t * np.cos(a), t * np.sin(a)], 1) / (3 * np.pi) + g.normal(0, noise / 3, (n, 2))
    x, y = torch.tensor(x, dtype=torch.float32), torch.tensor(c)
    tr, va = _split(n)
    return x[tr], y[tr], x[va], y[va]


# ---------- models ----------
def _conv(ni, nf, bn=True, stride=2):
    layers = [nn.Conv2d(ni, nf, 3, stride, 1, bias=not bn)]
    if bn: layers.append(nn.BatchNorm2d(nf))
    return nn.Sequential(*layers, nn.ReLU())


def cnn(n_out: int, bn: bool = True, widths=(16, 32, 64, 64)) -> nn.Sequential:
    "A small CNN: stride-2 3x3 convs (with or without batch norm), average pooling, a linear head."
    body = nn.Sequential(*[_conv(a, b, bn) for a, b in zip((3,) + tuple(widths[:-1]), widths)])
    return nn.Sequential(body, nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(widths[-1], n_out)))


def _seeded(make):
    def f(seed):
        set_seed(seed)
        return make()
    return f


def pretrained_body() -> nn.Sequential:
    "The CNN body trained on the built-in pets set (cached): the 'pretrained' body the fine-tune task starts from."
    f = CACHE/'pets_body.pt'
    m = cnn(37)
    if f.exists():
        m.load_state_dict(torch.load(f, weights_only=True))
        return m[0]
    x, y = pets_data()
    x = (x - x.mean((0, 2, 3), keepdim=True)) / x.std((0, 2, 3), keepdim=True)
    set_seed(0)
    opt = torch.optim.AdamW(m.parameters(), 3e-3)
    for _ in range(15):
        for i in torch.randperm(len(x)).split(64):
            loss = F.cross_entropy(m(x[i]), y[i]); loss.backward(); opt.step(); opt.zero_grad()
    CACHE.mkdir(exist_ok=True)
    torch.save(m.state_dict(), f.with_suffix('.tmp')); os.replace(f.with_suffix('.tmp'), f)
    return m[0]


def finetune_model():
    body = pretrained_body()
    return nn.Sequential(body, nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 2)))


def freeze_body(m):
    "Freeze the body except its batch norm layers (as `Learner.freeze` does)."
    for mod in m[0].modules():
        for p in mod.parameters(recurse=False): p.requires_grad_(isinstance(mod, nn.BatchNorm2d))


def unet_model():
    from lessonlib.vision.unet import DynamicUnet
    n = int(camvid_data()[4])
    enc = nn.Sequential(_conv(3, 16), _conv(16, 32), _conv(32, 64), _conv(64, 64, stride=1))
    return DynamicUnet(enc, n)


class TextClassifier(nn.Module):
    "Embeddings, a one-layer LSTM, max and mean pooling over the words, a linear layer (no batch norm)."
    def __init__(self, n_vocab, emb=32, hidden=32, n_out=2):
        super().__init__()
        self.emb, self.rnn = nn.Embedding(n_vocab, emb, padding_idx=1), nn.LSTM(emb, hidden, batch_first=True)
        self.head = nn.Linear(2 * hidden, n_out)
    def forward(self, x):
        h, _ = self.rnn(self.emb(x))
        mask = (x != 1).unsqueeze(-1).float()
        mean = (h * mask).sum(1) / mask.sum(1).clamp(min=1)
        mx = h.masked_fill(mask == 0, -1e4).max(1).values
        return self.head(torch.cat([mean, mx], 1))


def mlp(n_in, n_out, hidden=(64, 64)):
    dims = (n_in,) + tuple(hidden)
    layers = [l for a, b in zip(dims, dims[1:]) for l in (nn.Linear(a, b), nn.ReLU())]
    return nn.Sequential(nn.Flatten(), *layers, nn.Linear(dims[-1], n_out))


# ---------- metrics and baselines ----------
def accuracy(p, t): return (p.argmax(1) == t).float().mean().item()
def majority(yt, yv): return (yv == torch.mode(yt).values).float().mean().item()


def f2(p, t, thresh=0.2):
    "Samples-averaged F2 at `thresh` on sigmoid outputs (the Planet competition's metric)."
    pred = (torch.sigmoid(p) > thresh).float()
    tp = (pred * t).sum(1); prec = tp / pred.sum(1).clamp(min=1); rec = tp / t.sum(1).clamp(min=1)
    return (5 * prec * rec / (4 * prec + rec).clamp(min=1e-8)).mean().item()


def f2_prior(yt, yv):
    "F2 of predicting every tag whose training frequency passes 0.2, for every chip."
    freq = yt.mean(0)
    return f2(torch.logit(freq.clamp(1e-4, 1 - 1e-4)).expand_as(yv), yv)


def pixel_acc(p, t):
    keep = t != -100
    return (p.argmax(1)[keep] == t[keep]).float().mean().item()


def pixel_majority(yt, yv):
    m = torch.mode(yt[yt != -100]).values
    keep = yv != -100
    return (yv[keep] == m).float().mean().item()


def point_err(p, t): return ((p - t) * torch.tensor([32., 24.])).norm(dim=1).mean().item()   # pixels at 64x48
def mean_point(yt, yv): return point_err(yt.mean(0, keepdim=True).expand_as(yv), yv)


def seg_loss(p, t): return F.cross_entropy(p, t, ignore_index=-100)


TASKS = {t.name: t for t in [
    Task('planet', 'multi-label, BN CNN, real chips (planet_tiny) 32 px', planet_data,
         _seeded(lambda: cnn(planet_data()[1].shape[1])), F.binary_cross_entropy_with_logits, f2, 'F2', True,
         f2_prior, epochs=8, bs=16, source='planet_tiny'),
    Task('scratch', 'single-label from scratch, BN CNN, 3 shapes 32 px', scratch_data, _seeded(lambda: cnn(3)),
         F.cross_entropy, accuracy, 'accuracy', True, majority, epochs=4, bs=32, source='built-in scratch set'),
    Task('finetune', 'fine-tune a pretrained body (frozen), ants/bees 32 px', hymenoptera_data,
         _seeded(finetune_model), F.cross_entropy, accuracy, 'accuracy', True, majority, epochs=6, bs=16,
         freeze=freeze_body, source='hymenoptera_data; body trained on the built-in pets'),
    Task('camvid', 'segmentation, small U-Net, real frames 48x64', lambda: camvid_data()[:4], _seeded(unet_model),
         seg_loss, pixel_acc, 'pixel accuracy', True, pixel_majority, epochs=6, bs=8, source='camvid_tiny'),
    Task('headpose', 'points regression, BN CNN, 48x64', headpose_data, _seeded(lambda: cnn(2)), F.mse_loss,
         point_err, 'error (px)', False, mean_point, epochs=5, bs=16, source='built-in head-pose set'),
    Task('imdb', 'text classification, LSTM from scratch, 160 tokens', lambda: imdb_data()[:4],
         _seeded(lambda: TextClassifier(int(imdb_data()[4]))), F.cross_entropy, accuracy, 'accuracy', True,
         majority, epochs=6, bs=32, source='imdb_sample'),
    Task('nobn', 'CNN without batch norm, from scratch, 3 shapes 32 px', scratch_data,
         _seeded(lambda: cnn(3, bn=False)), F.cross_entropy, accuracy, 'accuracy', True, majority,
         epochs=4, bs=32, source='built-in scratch set'),
    Task('tiny', 'tiny MLP on 2-D spirals', spirals_data, _seeded(lambda: mlp(2, 3, (32, 32))), F.cross_entropy,
         accuracy, 'accuracy', True, majority, epochs=10, bs=64, source='generated'),
    Task('mnist', 'MLP without batch norm, MNIST 3 vs 7', mnist_data, _seeded(lambda: mlp(3 * 28 * 28, 2, (64,))),
         F.cross_entropy, accuracy, 'accuracy', True, majority, epochs=2, bs=64, source='mnist_tiny'),
]}
