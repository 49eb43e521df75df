"The VOC deep-features lesson: the VOC2007 layout and its bad input, average precision against scikit-learn, `lessonlib voc`."
import json, os, shutil, subprocess, sys
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score

from lessonlib.data import DataError
from lessonlib.synth.voc import make_voc, voc_scene
from lessonlib.lessons.voc import (VOC_CLASSES, average_precision, image_labels, mean_average_precision, pick_classes,
                                   read_annotation, split_ids, voc_items, voc_source)

LESSONLIB = shutil.which('lessonlib') or str(Path(sys.executable).parent/'lessonlib')


def run(*args, env=None, timeout=600):
    return subprocess.run([LESSONLIB, *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, 'MPLBACKEND': 'Agg', **(env or {})})


@pytest.fixture(scope='module')
def voc(tmp_path_factory):
    return make_voc(tmp_path_factory.mktemp('voc')/'VOCdevkit'/'VOC2007', n=40)


def test_layout_and_reader(voc):
    assert voc_source(str(voc.parent.parent)) == voc                     # a folder holding VOCdevkit/VOC2007 works too
    ids = split_ids(voc, 'trainval')
    assert len(ids) == 24 and len(split_ids(voc, 'test')) == 16
    for i, id_ in enumerate(ids[:10]):
        ann = read_annotation(voc/'Annotations'/f'{id_}.xml')
        objs = voc_scene(i)[1]
        assert [(n, d) for n, d, _ in ann['objects']] == [(n, bool(d)) for n, d, _, _ in objs]
        assert image_labels(ann, difficult=True) == sorted({o[0] for o in objs})
        assert image_labels(ann) == sorted({o[0] for o in objs if not o[1]})
    classes = pick_classes(voc, ids)
    assert set(classes) <= set(VOC_CLASSES) and list(classes) == [c for c in VOC_CLASSES if c in classes]


def test_bad_input_is_named(voc, tmp_path):
    bad = tmp_path/'VOC2007'
    shutil.copytree(voc, bad)
    (bad/'JPEGImages'/'000004.jpg').unlink()
    with pytest.raises(DataError, match=r'000004\.jpg is listed in ImageSets/Main/trainval\.txt but not in JPEGImages'):
        voc_items(bad, 'trainval')
    (bad/'Annotations'/'000001.xml').write_text('<annotation><size>')
    with pytest.raises(DataError, match=r'000001\.xml is not valid XML'): read_annotation(bad/'Annotations'/'000001.xml')
    xml = (voc/'Annotations'/'000002.xml').read_text()
    first = xml.split('<name>')[1].split('</name>')[0]
    (bad/'Annotations'/'000002.xml').write_text(xml.replace(f'<name>{first}</name>', '<name>unicorn</name>', 1))
    with pytest.raises(DataError, match=r"000002\.xml: unknown class 'unicorn'"):
        image_labels(read_annotation(bad/'Annotations'/'000002.xml'), fn=bad/'Annotations'/'000002.xml')
    r = run('voc', '--data', str(bad), '--out', str(tmp_path/'out'))
    assert r.returncode == 1 and 'lessonlib: error:' in r.stderr and 'Traceback' not in r.stderr, r.stderr[-2000:]


def test_average_precision_against_sklearn():
    rng = np.random.default_rng(0)
    assert abs(average_precision([0.9, 0.8, 0.7, 0.6], [1, 0, 1, 0]) - (1 + 2 / 3) / 2) < 1e-12     # by hand
    for k in range(50):
        t = rng.random(80) < rng.uniform(0.05, 0.6)
        s = np.round(rng.random(80) + t * rng.random(), 1 + k % 3)                                 # ties
        if t.any(): assert abs(average_precision(s, t) - average_precision_score(t, s)) < 1e-9
    scores, targs = rng.random((30, 4)), (rng.random((30, 4)) < 0.3).astype(float)
    targs[:, 3] = 0                                                                     # a class without positives
    m, ap = mean_average_precision(scores, targs, list('abcd'))
    assert np.isnan(ap['d']) and abs(m - np.mean([average_precision_score(targs[:, i], scores[:, i]) for i in range(3)])) < 1e-9


def test_command_on_builtin_layout(voc, tmp_path):
    "`lessonlib voc` on a small VOC-layout set: features saved, mAP above the class-frequency baseline."
    out = tmp_path/'out'
    r = run('voc', '--data', str(voc), '--arch', 'resnet18', '--size', '48', '--epochs', '40', '--out', str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    m = json.loads((out/'metrics.json').read_text())
    assert m['weights'] == 'random' and m['feature_dim'] == 512 and m['extract_images_per_s'] > 0
    assert m['images_trainval'] == 24 and m['images_test'] == 16
    assert 0 <= m['map_baseline_prior'] <= 1 and 0 <= m['map'] <= 1
    z = np.load(out/'features_test.npz')
    assert z['features'].shape == (16, 512) and z['targets'].shape == (16, len(m['classes']))
    for f in ('report.md', 'ap_per_class.png', 'linear_head.pth', 'features_trainval.npz'):
        assert (out/f).stat().st_size > 0, f
    assert 'mAP' in r.stdout and 'random' in (out/'report.md').read_text()
