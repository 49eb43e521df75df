"The IMDB lesson: the built-in review set, bad input named by row or column, and `lessonlib imdb` end to end."
import json, os, shutil, subprocess, sys
from pathlib import Path

import pandas as pd
import pytest

from lessonlib.core import data_dir
from lessonlib.data import DataError
from lessonlib.synth.imdb import make_imdb, review_rows
from lessonlib.text.data import read_texts_csv
from lessonlib.lessons.imdb import split_texts, majority_baseline, imdb_source

LESSONLIB = shutil.which('lessonlib') or str(Path(sys.executable).parent/'lessonlib')


def run(*args, timeout=900):
    return subprocess.run([LESSONLIB, *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, 'MPLBACKEND': 'Agg'})


def test_synth_layout_and_determinism(tmp_path):
    path = make_imdb(tmp_path/'imdb', n=200, seed=3)
    df = pd.read_csv(path/'texts.csv')
    assert list(df.columns) == ['label', 'text', 'is_valid'] and len(df) == 200
    assert set(df.label) == {'positive', 'negative'} and df.is_valid.any() and (~df.is_valid).any()
    assert df.text.tolist() == [r[1] for r in review_rows(200, seed=3)]
    assert df.text.tolist()[:20] == [r[1] for r in review_rows(20, seed=3)]       # review i does not depend on n


def test_bag_of_words_does_not_solve_synth():
    "Word counts alone are near chance; word pairs (which see 'not good') do much better (scikit-learn oracle)."
    from sklearn.feature_extraction.text import CountVectorizer
    from sklearn.linear_model import LogisticRegression
    df = pd.DataFrame(review_rows(2000, seed=11), columns=['label', 'text', 'is_valid'])
    trn, val = df[~df.is_valid], df[df.is_valid]
    accs = {}
    for ng in ((1, 1), (1, 2)):
        vec = CountVectorizer(ngram_range=ng, token_pattern=r"[a-z']+")
        clf = LogisticRegression(max_iter=3000).fit(vec.fit_transform(trn.text), trn.label)
        accs[ng] = (clf.predict(vec.transform(val.text)) == val.label).mean()
    assert accs[(1, 1)] < 0.7 and accs[(1, 2)] > accs[(1, 1)] + 0.15, accs


def test_bad_input_is_named(tmp_path):
    df = pd.DataFrame({'label': ['pos', 'neg', 'pos', 'neg'], 'text': ['Good.', 'Bad.', 'Nice.', 'Poor.'],
                       'is_valid': [False, False, True, True]})
    with pytest.raises(DataError, match=r"row 2: the text in column 'text' is empty"):
        split_texts(df.assign(text=['Good.', 'Bad.', '', 'Poor.']))
    with pytest.raises(DataError, match=r"column 'label' has one class only"):
        split_texts(df.assign(label='pos'))
    with pytest.raises(DataError, match=r"column 'text' is not text: row 0 holds 1"):
        split_texts(df.assign(text=[1, 2, 3, 4]))
    with pytest.raises(DataError, match=r"no column 'review'"):
        split_texts(df, text_col='review')
    (tmp_path/'bad.csv').write_bytes('label,text\npos,caf\xe9 cr\xe8me\n'.encode('latin-1'))
    with pytest.raises(DataError, match=r'bad.csv: not UTF-8 text: byte 0xe9 at offset 18 \(line 2\)'):
        read_texts_csv(tmp_path/'bad.csv')
    texts, labels, valid = split_texts(df.drop(columns='is_valid'))
    assert sum(valid) == 1 and len(texts) == 4                      # no validation column: a random 20%
    assert majority_baseline(['a', 'a', 'b'], ['b', 'b']) == ('a', 0.0)


def test_command_end_to_end(tmp_path):
    out = tmp_path/'out'
    r = run('imdb', '--n', '300', '--lm-epochs', '1', '--epochs', '1', '--bs', '16', '--out', str(out),
            '--cache', str(tmp_path/'cache'), '--scratch')
    assert r.returncode == 0, r.stderr[-3000:]
    m = json.loads((out/'metrics.json').read_text())
    for k in ('accuracy', 'baseline_accuracy_majority', 'perplexity', 'accuracy_from_scratch', 'reviews_per_s',
              'tokenize_cached_s', 'wall_time_s'):
        assert k in m, k
    assert m['reviews_train'] + m['reviews_valid'] == 300 and 0 <= m['accuracy'] <= 1
    assert m['perplexity'] < m['vocab_size']
    for f in ('report.md', 'loss.png', 'imdb_export.pkl', 'models/encoder.pth'): assert (out/f).exists(), f
    assert 'accuracy' in r.stdout
    from lessonlib.learner import load_learner
    label, _, probs = load_learner(out/'imdb_export.pkl').predict('The plot was not dull at all.')
    assert label in ('negative', 'positive') and abs(float(probs.sum()) - 1) < 1e-5


def test_command_reads_any_csv(tmp_path):
    rows = review_rows(120, seed=5)
    pd.DataFrame({'review': [r[1] for r in rows], 'sentiment': [r[0] for r in rows]}).to_csv(tmp_path/'my.csv', index=False)
    r = run('imdb', '--data', str(tmp_path/'my.csv'), '--text-col', 'review', '--label-col', 'sentiment', '--valid-col', '',
            '--lm-epochs', '1', '--epochs', '1', '--bs', '8', '--out', str(tmp_path/'o'), '--cache', str(tmp_path/'c'),
            '--gradual')
    assert r.returncode == 0, r.stderr[-3000:]
    m = json.loads((tmp_path/'o'/'metrics.json').read_text())
    assert m['reviews_valid'] == 24
    assert m['gradual'] and len(m['history']) == 4     # every stage of gradual unfreezing (3 stages + 1), not the last
    r = run('imdb', '--data', str(tmp_path/'my.csv'), '--out', str(tmp_path/'o2'))
    assert r.returncode != 0 and "no column 'text'" in r.stderr


@pytest.mark.skipif(not (data_dir()/'imdb_sample'/'texts.csv').exists(),
                    reason=f'imdb_sample is not in the data directory {data_dir()}: `lessonlib data get imdb_sample` downloads it, '
                           'or set LESSONLIB_DATA to a folder that has it')
def test_imdb_sample_source():
    src, df, unsup = imdb_source('imdb_sample')
    texts, labels, valid = split_texts(df)
    assert len(texts) == 1000 and sum(valid) == 200 and unsup == []


def _tiny_classifier_data(n=64):
    "Tokens, vocabulary and classifier loaders of `n` built-in reviews."
    from lessonlib.text.tokenize import tokenize_cached
    from lessonlib.text.data import make_vocab, clas_dataloaders
    rows = review_rows(n, seed=5)
    toks = tokenize_cached([r[1] for r in rows])
    labels = [r[0] for r in rows]
    vocab = make_vocab(toks, 1, 1000)
    return clas_dataloaders(toks[:48], labels[:48], toks[48:], labels[48:], vocab, bs=16), vocab


@pytest.mark.parametrize('gradual', [True, False])
def test_train_classifier_recipes(tmp_path, gradual):
    "Both recipes: `epochs` in all (gradual: one per stage, then the rest), every layer trained, left unfrozen."
    import torch
    from lessonlib.lessons.imdb import train_classifier
    from lessonlib.text.models import SMALL_CONFIG, text_classifier_learner
    cdls, vocab = _tiny_classifier_data()
    config = dict(SMALL_CONFIG, emb_sz=16, n_hid=24, n_layers=2)
    enc = text_classifier_learner(cdls, config, path=tmp_path)
    enc.save_encoder('encoder')
    emb0 = enc.model.encoder.encoder.weight.detach().clone()
    learn = train_classifier(cdls, config, epochs=4, lr=1e-2, path=tmp_path, gradual=gradual)
    assert len(learn.recorder.values) == (1 if gradual else 4)      # the last fit: after 3 one-epoch stages, or all 4
    assert not torch.equal(learn.model.encoder.encoder.weight, emb0)   # the embedding trained in the end
    assert all(p.requires_grad for p in learn.model.parameters())     # left unfrozen


@pytest.mark.skipif(not (data_dir()/'imdb_sample'/'texts.csv').exists(),
                    reason=f'imdb_sample is not in the data directory {data_dir()}: `lessonlib data get imdb_sample` downloads it, '
                           'or set LESSONLIB_DATA to a folder that has it')
def test_lesson_notebook_runs_on_imdb_sample(tmp_path):
    "The lesson top to bottom on the real sample (CI runs it on the built-in set too, with nbdev_test), short epochs."
    nb = Path(__file__).parent.parent/'nbs'/'lessons'/'04_imdb.ipynb'
    nbdev_test = shutil.which('nbdev_test') or str(Path(sys.executable).parent/'nbdev_test')
    env = {**os.environ, 'MPLBACKEND': 'Agg', 'IMDB_DATA': 'imdb_sample', 'IMDB_LM_EPOCHS': '1', 'IMDB_EPOCHS': '1',
           'IMDB_OUT': str(tmp_path/'out')}
    r = subprocess.run([nbdev_test, '--path', str(nb)], capture_output=True, text=True, timeout=1800, env=env)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    assert (tmp_path/'out'/'models'/'encoder.pth').is_file() and (tmp_path/'out'/'imdb_export.pkl').is_file()
    from lessonlib.learner import load_learner
    learn = load_learner(tmp_path/'out'/'imdb_export.pkl')
    assert len(learn.dls.text_vocab) > 3000      # the real reviews' vocabulary (the built-in set's is a few hundred words)
