"The CamVid lesson: the built-in set, masks under augmentation, any class list, bad input, metrics, the command."
import json, os, shutil, subprocess, sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lessonlib.core import data_dir
from lessonlib.lessons.camvid import (acc_camvid, camvid_dls, camvid_label, check_camvid, majority_baseline,
                                      parse_lr, unet_size)
from lessonlib.data import DataError
from lessonlib.synth.camvid import CAMVID_CODES, make_camvid
from lessonlib.vision.augment import aug_transforms

LESSONLIB = shutil.which('lessonlib') or str(Path(sys.executable).parent/'lessonlib')
TINY = data_dir()/'camvid_tiny'


def run(*args, env=None, timeout=900):
    return subprocess.run([LESSONLIB, *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, 'MPLBACKEND': 'Agg', **(env or {})})


def _files(path):
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in sorted(path.rglob('*')) if p.is_file()}


def test_synth_same_seed_same_bytes(tmp_path):
    a, b = make_camvid(tmp_path/'a', n=6, size=(32, 64), seed=3), make_camvid(tmp_path/'b', n=6, size=(32, 64), seed=3)
    assert _files(a) == _files(b)
    assert _files(a) != _files(make_camvid(tmp_path/'c', n=6, size=(32, 64), seed=4))
    assert (a/'valid.txt').read_text().split() == ['street_00004.png']
    assert Image.open(a/'labels'/'street_00001_P.png').size == (64, 32)


# ---------------------------------------------------------------- masks move with their images
COLORS = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 0]], np.uint8)


@pytest.fixture(scope='module')
def coded(tmp_path_factory):
    "A CamVid folder whose pictures are their labels painted in 4 far-apart colours (big blocks): colour = class."
    path = tmp_path_factory.mktemp('coded')
    for d in ('images', 'labels'): (path/d).mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):
        msk = np.kron(rng.integers(0, 4, (6, 8)), np.ones((16, 16), np.int64)).astype(np.uint8)    # 96×128
        Image.fromarray(COLORS[msk]).save(path/'images'/f'f{i}.png')
        Image.fromarray(msk, mode='L').save(path/'labels'/f'f{i}_P.png')
    (path/'codes.txt').write_text('red\ngreen\nblue\nyellow\n')
    (path/'valid.txt').write_text('f5.png\n')
    return path


def test_augmented_masks_stay_valid_and_aligned(coded):
    torch.manual_seed(0)
    dls = camvid_dls(coded, (96, 128), bs=5)
    def first_batch(dl): return dl.decode_batch(next(iter(dl)))
    plain = first_batch(dls.new(batch_tfms=[]).train)[1]
    strong = aug_transforms(max_rotate=30., min_zoom=1.1, max_zoom=1.4, max_warp=0.3, max_lighting=0., p_affine=1.)
    torch.manual_seed(0)                                                           # the same items in the batch
    x, m = first_batch(dls.new(batch_tfms=strong).train)                           # only these: x stays uint8
    x = x.float() / 255
    assert m.dtype == torch.int64 and set(m.unique().tolist()) <= {0, 1, 2, 3}     # nearest: still valid codes
    moved = (m != plain).float().mean()
    assert moved > 0.2, moved                                                      # the augmentation did move things
    same = torch.ones_like(m, dtype=torch.bool)                                    # pixels inside a region (3x3 same)
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1): same &= m == m.roll((dy, dx), (1, 2))
    same[:, [0, -1]] = False; same[:, :, [0, -1]] = False
    want = torch.tensor(COLORS, dtype=torch.float32)[m] / 255                      # the colour of each pixel's class
    err = (x.permute(0, 2, 3, 1) - want).abs().amax(-1)
    assert same.float().mean() > 0.5
    assert (err[same] < 0.15).float().mean() > 0.99, err[same].max()              # aligned pixel for pixel


# ---------------------------------------------------------------- any class list, void or not
def test_other_class_lists(tmp_path):
    path = shutil.copytree(make_camvid(tmp_path/'s', n=10, size=(32, 32)), tmp_path/'eleven')
    (path/'codes.txt').write_text('\n'.join(list(CAMVID_CODES[:-1]) + ['Other']) + '\n')   # no void class
    dls = camvid_dls(path, (32, 32), bs=4)
    assert dls.c == 8 and dls.dsets.blocks[-1].void_code is None and dls.loss_func().ignore_index == -100
    assert camvid_dls(path, (32, 32), bs=4, void='Other').loss_func().ignore_index == 7
    (path/'codes.txt').write_text('\n'.join(list(CAMVID_CODES[:-1]) + ['Unlabelled']) + '\n')
    assert camvid_dls(path, (32, 32), bs=4).dsets.blocks[-1].void_code == 7                  # found by name


# ---------------------------------------------------------------- bad input
def test_bad_input_errors_name_files(tmp_path):
    path = shutil.copytree(make_camvid(tmp_path/'s', n=10, size=(32, 32)), tmp_path/'bad')
    (path/'valid.txt').write_text('street_00004.png\nstreet_00099.png\n')
    with pytest.raises(DataError, match=r"1 name\(s\) match no image .*'street_00099.png'"): check_camvid(path)
    (path/'valid.txt').write_text('street_00004.png\n')
    lbl = path/'labels'/'street_00002_P.png'
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(lbl)
    with pytest.raises(DataError, match='street_00002_P.png is a RGB picture'): check_camvid(path)
    (path/'images'/'street_00003.png').write_bytes(b'not a png')
    lbl.unlink()
    with pytest.raises(DataError, match='no label file .*street_00002_P.png for image .*street_00002.png'): check_camvid(path)
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(lbl)
    with pytest.raises(DataError, match='cannot read .*street_00003.png'): check_camvid(path)


def test_bad_input_command_writes_nothing(tmp_path):
    path = shutil.copytree(make_camvid(tmp_path/'s', n=10, size=(32, 32)), tmp_path/'bad')
    Image.fromarray(np.full((32, 32), 9, np.uint8)).save(path/'labels'/'street_00001_P.png')
    r = run('camvid', '--data', str(path), '--out', str(tmp_path/'out'))
    assert r.returncode == 1 and r.stderr.count('\n') == 1 and 'Traceback' not in r.stderr, r.stderr
    assert 'street_00001_P.png holds the values [9], outside the 8 codes' in r.stderr
    assert not (tmp_path/'out').exists()
    r = run('camvid', '--data', str(tmp_path), '--out', str(tmp_path/'out'))
    assert r.returncode == 1 and 'is not CamVid data: images, labels, codes.txt, valid.txt missing' in r.stderr


# ---------------------------------------------------------------- metrics against scikit-learn
def test_metrics_against_sklearn():
    metrics = pytest.importorskip('sklearn.metrics')
    g = torch.Generator().manual_seed(0)
    preds, targ = torch.randn(4, 5, 12, 16, generator=g), torch.randint(0, 5, (4, 12, 16), generator=g)
    targ[:, :3] = 4                                                    # plenty of void pixels (code 4)
    keep = (targ != 4).numpy().ravel()
    t, p = targ.numpy().ravel()[keep], preds.argmax(1).numpy().ravel()[keep]
    assert abs(float(acc_camvid(preds, targ, 4)) - metrics.accuracy_score(t, p)) < 1e-6
    train = np.array([10, 50, 20, 5, 999])                             # void is the most common: it is left out
    valid = np.bincount(t, minlength=5)
    base = majority_baseline(train, valid, void_code=4)
    const = np.full_like(t, 1)
    labels = sorted(set(t) | {1})
    assert base['class'] == 1 and abs(base['accuracy'] - metrics.accuracy_score(t, const)) < 1e-9
    assert abs(base['mean_iou'] - metrics.jaccard_score(t, const, labels=labels, average='macro', zero_division=0)) < 1e-9
    cm = metrics.confusion_matrix(t, const, labels=range(4))
    assert abs(base['accuracy'] - cm.trace() / cm.sum()) < 1e-9


def test_small_helpers():
    assert unet_size((720, 960), 480) == (352, 480) and unet_size((96, 128), 64) == (64, 64)
    assert parse_lr('3e-3') == 3e-3 and parse_lr('slide') == 'slide'
    with pytest.raises(ValueError, match="lr='fast' is neither a number nor one of the lr_find suggestions valley"):
        parse_lr('fast')
    assert camvid_label('/d/images/a_b.png') == Path('/d/labels/a_b_P.png')


# ---------------------------------------------------------------- the command
def check_outputs(out):
    for f in ('metrics.json', 'report.md', 'loss.png', 'lr_loss_last_stage.png', 'results.png', 'camvid_export.pkl'):
        assert (out/f).stat().st_size > 0, f
    assert not list(out.rglob('*.part')), 'temporary files left behind'
    return json.loads((out/'metrics.json').read_text())


def test_builtin_smoke(tmp_path):
    "The default data (built-in set) through the console script, kept tiny: every output, one line of summary."
    env = {'LESSONLIB_DATA': str(tmp_path/'data')}
    r = run('camvid', '--n', '20', '--size', '32', '--epochs', '1', '--no-progressive', '--lr', '1e-2',
            '--out', str(tmp_path/'out'), env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    m = check_outputs(tmp_path/'out')
    assert m['sizes'] == [[32, 32]] and len(m['history']) == 2 and m['void'] == 7 and m['lrs'] == [1e-2]
    assert (m['images_train'], m['images_valid']) == (16, 4)
    assert set(m['per_class_iou']) == set(CAMVID_CODES) and m['per_class_iou']['Void'] is None
    assert 0 < m['accuracy_baseline_majority'] < 1 and 0 <= m['mean_iou'] <= 1
    assert 'accuracy' in r.stdout and 'mean IoU' in r.stdout   # (learning is checked by the lesson notebook in CI)
    assert 'stage 1 (32x32): encoder frozen' in r.stdout and 'stage 2 (32x32): unfrozen' in r.stdout
    assert not (tmp_path/'out'/'models').exists()               # checkpoints only with --checkpoints


@pytest.mark.skipif(not (TINY/'codes.txt').exists(),
                    reason=f'camvid_tiny is not in the data directory {data_dir()}: `lessonlib data get camvid_tiny` downloads it, '
                           'or set LESSONLIB_DATA to a folder that has it')
def test_camvid_tiny_real_frames(tmp_path):
    "The same command runs unchanged on the 100 real CamVid frames (32 classes, void by name)."
    r = run('camvid', '--data', 'camvid_tiny', '--size', '32', '--epochs', '1', '--no-progressive', '--lr', '1e-2',
            '--bs', '16', '--out', str(tmp_path))
    assert r.returncode == 0, r.stderr[-2000:]
    m = check_outputs(tmp_path)
    assert (m['images_train'], m['images_valid']) == (85, 15) and len(m['codes']) == 32 and m['void'] == 30
    assert m['majority_class'] in ('Road', 'Building') and 0 < m['accuracy_baseline_majority'] < 0.5
    assert 0 <= m['mean_iou'] <= 1 and 0 <= m['accuracy'] <= 1 and not (tmp_path/'lr_find.png').exists()


def test_checkpoints_when_asked(tmp_path):
    "--checkpoints keeps the weights (and optimizer state) after each stage."
    env = {'LESSONLIB_DATA': str(tmp_path/'data')}
    r = run('camvid', '--n', '12', '--size', '32', '--epochs', '1', '--no-progressive', '--lr', '1e-2', '--checkpoints',
            '--out', str(tmp_path/'out'), env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    assert sorted(p.name for p in (tmp_path/'out'/'models').iterdir()) == ['stage-1-32x32.pth', 'stage-2-32x32.pth']
