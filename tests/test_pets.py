"The pets lesson: labels from file names (and bad names), cross-entropy against PyTorch, presizing, interpretation against scikit-learn, `lessonlib pets` on another folder."
import json, os, shutil, subprocess, sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from sklearn.metrics import confusion_matrix as sk_confusion_matrix, multilabel_confusion_matrix

from lessonlib.data import DataError, RegexLabeller
from lessonlib.synth.pets import PET_BREEDS, draw_pet, make_pets
from lessonlib.interpret import ClassificationInterpretation
from lessonlib.lessons.pets import (PETS_PAT, cross_entropy, log_softmax, nll, pet_files, pets_dls, pets_source,
                                    presize_compare, softmax)

LESSONLIB = shutil.which('lessonlib') or str(Path(sys.executable).parent/'lessonlib')


def run(*args, env=None, timeout=600):
    return subprocess.run([LESSONLIB, *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, 'MPLBACKEND': 'Agg', **(env or {})})


OTHER = [('Maine_Coon', 'Bengal'), ('Sphynx', 'Siamese'), ('shiba_inu', 'beagle'), ('great_pyrenees', 'samoyed')]


@pytest.fixture(scope='module')
def other_folder(tmp_path_factory):
    "A folder in the Oxford layout the lesson has never seen: other breed names, larger portrait pictures, a .mat file."
    root = tmp_path_factory.mktemp('other')/'oxford-like'
    (root/'images').mkdir(parents=True)
    for j, (name, look) in enumerate(OTHER):
        for n in range(1, 13):
            im = Image.fromarray(draw_pet(look, 210 + 10 * (n % 3), 280, np.random.default_rng([j, n])))
            im.save(root/'images'/f'{name}_{n}.jpg', quality=90)
    (root/'images'/'Maine_Coon_1.mat').write_bytes(b'not an image')     # the real archive has a few of these
    (root/'annotations').mkdir()
    return root


def test_breed_from_file_name():
    label = RegexLabeller(PETS_PAT)
    for name, breed in [('Abyssinian_12.jpg', 'Abyssinian'), ('american_bulldog_3.jpg', 'american_bulldog'),
                        ('great_pyrenees_175.jpg', 'great_pyrenees'), ('British_Shorthair_1.jpg', 'British_Shorthair')]:
        assert label(Path('/x/images')/name) == breed
    with pytest.raises(DataError, match="does not match 'Abyssinian.jpg'"): label(Path('/x/Abyssinian.jpg'))


def test_bad_file_name_is_named(other_folder, tmp_path):
    bad = tmp_path/'bad'
    shutil.copytree(other_folder/'images', bad)
    shutil.copy(bad/'Sphynx_1.jpg', bad/'Sphynx-2.jpg')
    with pytest.raises(DataError, match=r'1 of 49 file names .* do not match .*Sphynx-2\.jpg'): pet_files(bad)
    r = run('pets', '--data', str(tmp_path), '--epochs', '1', '--out', str(tmp_path/'out'))
    assert r.returncode == 1 and 'Sphynx-2.jpg' in r.stderr and 'Traceback' not in r.stderr, r.stderr[-2000:]


def test_cross_entropy_against_pytorch():
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(16, 7, generator=g) * 4).requires_grad_()
    t = torch.randint(0, 7, (16,), generator=g)
    for reduction in ('mean', 'sum', 'none'):
        ours, theirs = cross_entropy(x, t, reduction), nn.CrossEntropyLoss(reduction=reduction)(x, t)
        assert torch.allclose(ours, theirs, atol=1e-5), reduction
    assert cross_entropy(x, t, 'none').shape == (16,)
    g1, = torch.autograd.grad(cross_entropy(x, t), x)
    g2, = torch.autograd.grad(F.cross_entropy(x, t), x)
    assert torch.allclose(g1, g2, atol=1e-6)                                       # the gradient too: softmax - one-hot
    assert torch.allclose(g1, (torch.softmax(x, 1) - F.one_hot(t, 7)).detach() / 16, atol=1e-6)
    assert torch.allclose(nll(log_softmax(x), t), F.nll_loss(F.log_softmax(x, 1), t), atol=1e-5)
    huge = torch.tensor([[1e4, 0., -1e4]])
    assert torch.isfinite(cross_entropy(huge, torch.tensor([2]))).all() and torch.allclose(softmax(huge).sum(), torch.tensor(1.))
    with pytest.raises(ValueError, match="'mean', 'sum' or 'none'"): cross_entropy(x, t, 'avg')


def test_presizing_keeps_more_detail():
    for b in PET_BREEDS[::3]:
        im = Image.fromarray(draw_pet(b, 500, 380, np.random.default_rng(1)))
        r = presize_compare(im, 224, 460)
        assert r['error_presized'] < 0.75 * r['error_twice'], (b, r['error_presized'], r['error_twice'])


def test_interpretation_against_sklearn():
    g = torch.Generator().manual_seed(1)
    targs = torch.randint(0, 5, (60,), generator=g)
    logits = 2 * F.one_hot(targs, 5).float() + 1.5 * torch.randn(60, 5, generator=g)
    losses = F.cross_entropy(logits, targs, reduction='none')
    vocab = list('abcde')
    ci = ClassificationInterpretation(None, logits.softmax(1), targs, losses, vocab)
    cm = sk_confusion_matrix(targs.numpy(), logits.argmax(1).numpy(), labels=range(5))
    assert (ci.confusion_matrix().numpy() == cm).all()
    mc = ci.most_confused(2)
    assert mc == sorted(mc, key=lambda p: -p[2]) and all(c == cm[vocab.index(a), vocab.index(b)] >= 2 for a, b, c in mc)
    assert sum(c for *_, c in ci.most_confused(1)) == (ci.preds != targs).sum()
    vals, idxs = ci.top_losses(3)
    assert torch.equal(vals, losses.sort(descending=True).values[:3]) and torch.equal(losses[idxs], vals)
    # multi-label (Planet): per tag
    mt = (torch.rand(50, 3, generator=g) < 0.5).long()
    ml = 2 * (mt.float() - 0.5) + torch.randn(50, 3, generator=g)
    mi = ClassificationInterpretation(None, ml.sigmoid(), mt, torch.zeros(50), ['x', 'y', 'z'])
    assert (mi.confusion_matrix().numpy() == multilabel_confusion_matrix(mt.numpy(), (ml > 0).long().numpy())).all()


def test_interpretation_from_a_learner(other_folder):
    "from_learner on a (barely trained) learner: per-item losses equal PyTorch's, top-losses figure and titles."
    import matplotlib; matplotlib.use('Agg')
    from lessonlib.lessons.pets import pets_learner
    dls = pets_dls(pets_source(str(other_folder)), size=32, bs=8)
    learn = pets_learner(dls, 'resnet18', pretrained=False)
    ci = ClassificationInterpretation.from_learner(learn)
    logits, targs = learn.get_preds(act=False)
    assert torch.allclose(ci.losses, F.cross_entropy(logits, targs, reduction='none'), atol=1e-5)
    assert len(ci.losses) == len(dls.valid_ds)
    axs = ci.plot_top_losses(4, ncols=2)
    assert len(axs) == 4 and '/' in axs[0].get_title()
    ci.plot_confusion_matrix()


def test_synth_layout(tmp_path):
    p = make_pets(tmp_path/'pets', n_per_breed=3)
    names = sorted(f.name for f in (p/'images').iterdir())
    assert len(names) == 3 * len(PET_BREEDS)
    label = RegexLabeller(PETS_PAT)
    breeds = {label(Path(n)) for n in names}
    assert breeds == set(PET_BREEDS)
    assert any(b[0].isupper() and '_' in b for b in breeds) and any(b[0].islower() and '_' in b for b in breeds)
    assert pets_source(str(p)) == p/'images'


def test_command_on_another_folder(other_folder, tmp_path):
    "`lessonlib pets` on a folder with other breeds and picture sizes: runs, writes everything, names the breeds."
    out = tmp_path/'out'
    r = run('pets', '--data', str(other_folder), '--size', '32', '--epochs', '1', '--bs', '8', '--out', str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    m = json.loads((out/'metrics.json').read_text())
    assert m['breeds'] == sorted(n for n, _ in OTHER)
    assert m['images_train'] + m['images_valid'] == 48
    for k in ('error_rate', 'accuracy', 'error_rate_baseline_majority', 'accuracy_baseline_majority', 'wall_time_s'):
        assert 0 <= m[k] <= (1 if k != 'wall_time_s' else 1e4), k
    assert abs(m['error_rate'] + m['accuracy'] - 1) < 1e-6
    assert [s['method'] for s in m['stages']] == ['fine_tune', 'manual']
    for f in ('report.md', 'presizing.png', 'lr_find.png', 'lr_find_unfrozen.png', 'confusion_matrix.png',
              'top_losses.png', 'pets_export.pkl'):
        assert (out/f).stat().st_size > 0, f
    assert 'error rate' in r.stdout and 'Error rate' in (out/'report.md').read_text()


def test_interpretation_of_a_multi_label_learner(tmp_path):
    "The Planet lesson's multi-label learner: a 2x2 matrix per tag, BCE per item, top losses titled with tag lists."
    import matplotlib; matplotlib.use('Agg')
    from lessonlib.synth.planet import make_planet
    from lessonlib.lessons.planet import planet_dls, planet_learner
    path = make_planet(tmp_path/'planet', n=40, size=64)
    dls = planet_dls(path, size=32, bs=8)
    learn = planet_learner(dls, 'resnet18', pretrained=False)
    ci = ClassificationInterpretation.from_learner(learn)
    logits, targs = learn.get_preds(act=False)
    assert ci.multi and ci.confusion_matrix().shape == (len(dls.vocab), 2, 2)
    preds = (logits.sigmoid() > ci.thresh).long().numpy()
    assert (ci.confusion_matrix().numpy() == multilabel_confusion_matrix(targs.numpy(), preds)).all()
    bce = F.binary_cross_entropy_with_logits(logits, targs.float(), reduction='none').mean(1)
    assert torch.allclose(ci.losses, bce, atol=1e-5)
    assert all(kind in ('missed', 'false alarm') for _, kind, _ in ci.most_confused())
    axs = ci.plot_top_losses(4, ncols=2)
    assert len(axs) == 4 and len(ci.top_loss_titles(1)[0].splitlines()) == 3
    ci.plot_confusion_matrix()
