"The head-pose lesson: BIWI files to pixels, bad input, points that stay on their dot under augmentation, `lessonlib headpose`."
import json, os, shutil, subprocess, sys, warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lessonlib.core import data_dir
from lessonlib.synth.headpose import make_headpose
from lessonlib.vision.augment import aug_transforms
from lessonlib.vision.data import IntToFloat, points_to_pixels
from lessonlib.lessons.headpose import biwi_center, biwi_table, headpose_dls, pose_file, read_cal, read_pose

LESSONLIB = shutil.which('lessonlib') or str(Path(sys.executable).parent/'lessonlib')


def run(*args, env=None, timeout=600):
    return subprocess.run([LESSONLIB, *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, 'MPLBACKEND': 'Agg', **(env or {})})


@pytest.fixture(scope='module')
def small_set(tmp_path_factory):
    "13 people x 3 frames of the built-in set (person 13 validates)."
    return make_headpose(tmp_path_factory.mktemp('synth')/'biwi', n_people=13, frames=3)


def test_centre_from_pose_and_calibration(tmp_path):
    "BIWI's own numbers (person 01's rgb.cal, a pose file) against the lesson's formula computed by hand."
    (tmp_path/'rgb.cal').write_text('517.679 0 320 \n0 517.679 240.5 \n0 0 1 \n\n0 0 0 0 \n\n1 0 0 \n0 1 0 \n0 0 1 \n\n0 0 0 \n')
    (tmp_path/'frame_00003_pose.txt').write_text('1 0 0\n0 1 0\n0 0 1\n\n46.5375 13.7688 919.465\n')
    x, y = biwi_center(tmp_path/'frame_00003_rgb.jpg', read_cal(tmp_path/'rgb.cal'))
    assert abs(x - 346.2018) < 1e-3 and abs(y - 248.2521) < 1e-3


def test_bad_files_are_named(small_set, tmp_path):
    bad = tmp_path/'biwi'
    shutil.copytree(small_set, bad)
    frames = sorted((bad/'02').glob('*_rgb.jpg'))
    pose_file(frames[0]).write_text('1 0 0\n0 1 0\n0 0 1\n')                       # no centre
    with pytest.raises(Exception, match=r'02/frame_00003_pose.txt: a pose file holds 4 rows'): biwi_table(bad)
    pose_file(frames[0]).unlink()                                                   # now: a frame without a pose
    (bad/'05'/'rgb.cal').write_text('517 0 320\n0 517\n')
    with pytest.raises(Exception, match=r'05/rgb.cal: expected the 3x3 camera intrinsics'): biwi_table(bad)
    (bad/'05'/'rgb.cal').unlink()
    with pytest.raises(Exception, match=r'calibration file not found: .*05/rgb.cal'): biwi_table(bad)
    shutil.copy(small_set/'05'/'rgb.cal', bad/'05'/'rgb.cal')
    K = read_cal(bad/'07'/'rgb.cal')
    z = read_pose(pose_file(frames[1]))[1][2]
    pose_file(frames[1]).write_text(f'1 0 0\n0 1 0\n0 0 1\n\n{(200 - K[0, 2]) * z / K[0, 0]} 0 {z}\n')   # column 200 > 160
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        df = biwi_table(bad)
    msgs = ' | '.join(str(w.message) for w in caught)
    assert 'skipped 1 frame(s) that have no pose file: ' in msgs and frames[0].name in msgs, msgs
    assert 'skipped 1 frame(s) that have their head centre outside the picture' in msgs and frames[1].name in msgs, msgs
    assert len(df) == 13 * 3 - 2


def _gaussian_dot(w, h, x, y, sigma=1.2):
    "A black `w`x`h` RGB picture with a white Gaussian dot whose centre of mass is the pixel position (x, y)."
    yy, xx = np.mgrid[0:h, 0:w]
    a = np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * sigma ** 2))
    return Image.fromarray((np.repeat(a[..., None], 3, -1) * 255 + 0.5).astype(np.uint8))


def test_augmented_centres_stay_on_their_dot(small_set, tmp_path):
    "On the lesson's data and pipeline: a dot drawn at each head centre (from pose + rgb.cal), squished and augmented at random many times: the point stays on it."
    dots = tmp_path/'dots'
    shutil.copytree(small_set, dots)
    for f in dots.glob('*/frame_*_rgb.jpg'):
        x, y = biwi_center(f, read_cal(f.parent/'rgb.cal'))
        _gaussian_dot(160, 120, x, y).save(f, quality=100, subsampling=0)
    dls = headpose_dls(biwi_table(dots), size=128, bs=12)                           # frames 160x120 seen at 128x96
    H, W = 96, 128
    strong = aug_transforms(max_rotate=30., min_zoom=0.9, max_zoom=1.3, max_warp=0.2, p_affine=1., max_lighting=0.,
                            pad_mode='zeros')                              # every item rotated, zoomed, warped; no reflections
    dl = dls.train.new(batch_tfms=[IntToFloat()] + strong)
    torch.manual_seed(0)
    errs, outside = [], 0
    for _ in range(8):
        for xb, yb in dl:
            ims = xb.mean(1)                                                       # grey, in [0, 1]
            for im, p in zip(ims, yb):
                q = points_to_pixels(p[0], W, H)
                if (q >= 5).all() and q[0] <= W - 6 and q[1] <= H - 6:
                    m = (im - 0.1).clamp(min=0)
                    ys, xs = torch.meshgrid(torch.arange(H), torch.arange(W), indexing='ij')
                    c = torch.stack([(m * xs).sum(), (m * ys).sum()]) / m.sum()
                    errs.append(float((c - q).norm()))
                elif p.abs().max() > 1: outside += 1
    print(f'dot test: {len(errs)} augmented centres, worst {max(errs):.2f} px, mean {np.mean(errs):.2f} px (at {W}x{H}); '
          f'{outside} pushed outside')
    assert len(errs) > 200 and max(errs) < 1.0, (len(errs), max(errs))


def _check_outputs(out: Path) -> dict:
    for f in ('metrics.json', 'report.md', 'loss.png', 'lr_find.png', 'predictions.png', 'headpose_export.pkl'):
        assert (out/f).stat().st_size > 0, f
    assert not list(out.glob('*.part')) and not list(out.glob('.*.part')), 'temporary files left behind'
    return json.loads((out/'metrics.json').read_text())


def test_builtin_command(tmp_path):
    "`lessonlib headpose` on a small built-in set: every output, metrics in pixels, predict in pixels of the frame."
    r = run('headpose', '--frames', '6', '--epochs', '1', '--size', '32', '--bs', '16', '--lr', 'valley', '--out', str(tmp_path/'out'),
            env={'LESSONLIB_DATA': str(tmp_path/'data')})
    assert r.returncode == 0, r.stderr[-2000:]
    m = _check_outputs(tmp_path/'out')
    assert (m['images_train'], m['images_valid'], m['frame_size'], m['input_size']) == (90, 6, [160, 120], [24, 32])
    for k in ('mse', 'pixel_error', 'baseline_pixel_error_mean_point', 'baseline_mse_mean_point', 'wall_time_s'):
        assert np.isfinite(m[k]) and m[k] >= 0, k
    x, y = m['predict_example']['predicted_xy']
    assert 0 <= x <= 159 and 0 <= y <= 119
    assert m['lr'] == m['lr_suggestions']['valley']
    assert 'mean pixel error' in r.stdout


@pytest.mark.skipif(not (data_dir()/'biwi_sample'/'images').exists(),
                    reason=f'biwi_sample is not in the data directory {data_dir()}: `lessonlib data get biwi_sample` downloads it, '
                           'or set LESSONLIB_DATA to a folder that has it')
def test_biwi_sample_command(tmp_path):
    "The real 6-frame sample: centres read safely (weights_only, else the CSV), (row, column) turned into (x, y)."
    r = run('headpose', '--data', 'biwi_sample', '--epochs', '1', '--size', '32', '--bs', '4', '--lr', '1e-3', '--out', str(tmp_path))
    assert r.returncode == 0, r.stderr[-2000:]
    m = _check_outputs(tmp_path)
    assert m['lr'] == 1e-3 and set(m['lr_suggestions']) == {'valley', 'slide', 'minimum', 'steep'}
    assert (m['images_train'], m['images_valid'], m['frame_size']) == (5, 1, [160, 120])


def test_not_biwi_one_line(tmp_path):
    r = run('headpose', '--data', str(tmp_path), '--out', str(tmp_path/'out'))
    assert r.returncode == 1 and r.stderr.count('\n') == 1, r.stderr
    assert 'is not BIWI data' in r.stderr and 'Traceback' not in r.stderr


def test_builtin_command_lr_auto(tmp_path):
    "`--lr auto`: lr_find's race picks the rate; the run trains at the winner, one of the three candidates."
    r = run('headpose', '--frames', '6', '--epochs', '1', '--size', '32', '--bs', '16', '--lr', 'auto', '--out', str(tmp_path/'out'),
            env={'LESSONLIB_DATA': str(tmp_path/'data')})
    assert r.returncode == 0, r.stderr[-2000:]
    m = _check_outputs(tmp_path/'out')
    s = m['lr_suggestions']
    assert m['lr'] == s['auto']
    from lessonlib.lr_find import RACE_LO, RACE_HI
    assert s['valley'] * 10 ** RACE_LO * 0.999 <= s['auto'] <= s['valley'] * 10 ** RACE_HI * 1.001, s   # the race's span
