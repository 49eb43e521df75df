"Checkpoints, export and inference through a real DataBlock pipeline (the built-in Planet set, tiny)."
import pickle
import pytest, torch
import pandas as pd
from lessonlib.core import set_seed
from lessonlib.synth.planet import make_planet
from lessonlib.learner import load_learner
from lessonlib.lessons.planet import planet_dls, planet_learner


@pytest.fixture(scope='module')
def learn(tmp_path_factory):
    set_seed(0)
    path = make_planet(dest=tmp_path_factory.mktemp('data')/'planet', n=48, size=32)
    dls = planet_dls(path, size=32, bs=16)
    learn = planet_learner(dls, 'resnet18', pretrained=False, path=tmp_path_factory.mktemp('out'))
    learn.fit(1, 1e-3)
    learn.data_path = path
    return learn


def test_export_load_predict_matches(learn):
    "An exported learner, loaded on the CPU, predicts exactly what the original predicts."
    fn = sorted((learn.data_path/'train-jpg').glob('*.jpg'))[0]
    tags, dec, probs = learn.predict(fn)
    f = learn.export('model.pkl')
    inf = load_learner(f)
    tags2, dec2, probs2 = inf.predict(fn)
    assert tags == tags2 and torch.equal(dec, dec2)
    torch.testing.assert_close(probs, probs2)
    assert probs.shape == (learn.dls.c,) and 0 <= probs.min() and probs.max() <= 1
    assert isinstance(tags, list) and all(t in learn.dls.vocab for t in tags)
    assert set(tags) == {learn.dls.vocab[i] for i in torch.where(dec)[0].tolist()}


def test_checkpoint_is_weights_only(learn):
    "Checkpoints hold tensors only: they load with weights_only=True, and round-trip exactly."
    f = learn.save('ckpt')
    state = torch.load(f, weights_only=True)
    assert set(state) == {'model', 'opt'}
    before = {k: v.clone() for k, v in learn.model.state_dict().items()}
    learn.fit(1, 1e-2)
    learn.load('ckpt')
    for k, v in learn.model.state_dict().items(): assert torch.equal(v, before[k]), k
