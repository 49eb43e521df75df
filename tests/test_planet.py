"The `lessonlib planet` command end to end: the real planet_tiny chips, the built-in set, and its errors."
import json, os, shutil, subprocess, sys
from pathlib import Path
import pytest
from lessonlib.core import data_dir

LESSONLIB = shutil.which('lessonlib') or str(Path(sys.executable).parent/'lessonlib')


def run(*args, env=None, timeout=900):
    return subprocess.run([LESSONLIB, *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, 'MPLBACKEND': 'Agg', **(env or {})})


def check_outputs(out: Path):
    for f in ('metrics.json', 'report.md', 'loss.png', 'lr_find.png', 'planet_export.pkl'):
        assert (out/f).stat().st_size > 0, f
    assert not list(out.glob('*.part')) and not list(out.glob('.*.part')), 'temporary files left behind'
    return json.loads((out/'metrics.json').read_text())


@pytest.mark.skipif(not (data_dir()/'planet_tiny'/'labels.csv').exists(),
                    reason=f'planet_tiny is not in the data directory {data_dir()}: `lessonlib data get planet_tiny` downloads it, '
                           'or set LESSONLIB_DATA to a folder that has it')
def test_planet_tiny_real_chips(tmp_path):
    "The same command runs unchanged on the 200 real Planet chips."
    r = run('planet', '--data', 'planet_tiny', '--size', '32', '--epochs', '1', '--out', str(tmp_path))
    assert r.returncode == 0, r.stderr[-2000:]
    m = check_outputs(tmp_path)
    assert m['images_train'] + m['images_valid'] == 200
    assert 'primary' in m['tags'] and len(m['tags']) >= 13
    assert 0.5 < m['f2'] <= 1
    assert len(m['history']) == 4                                     # 2 stages x 2 sizes x 1 epoch
    assert 'F2' in r.stdout and 'epoch' in r.stdout
    assert m['submission'] is None and not (tmp_path/'submission.csv').exists()   # planet_tiny has no test set


def test_builtin_smoke(tmp_path):
    "The default data path (built-in set) through the console script, kept small; it must learn something."
    env = {'LESSONLIB_DATA': str(tmp_path/'data')}
    r = run('planet', '--n', '600', '--size', '32', '--epochs', '2', '--no-progressive', '--out', str(tmp_path/'out'), env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    m = check_outputs(tmp_path/'out')
    assert m['sizes'] == [32] and len(m['history']) == 4
    assert m['f2'] > m['f2_baseline_clear_primary'] + 0.05, m   # well above always answering 'clear primary'
    assert 'stage 1 (32 px): body frozen' in r.stdout and 'stage 2 (32 px): unfrozen' in r.stdout
    assert not (tmp_path/'out'/'models').exists()               # checkpoints only with --checkpoints
    assert 'lr_find at 32 px, body frozen' in r.stdout            # announced before the silent sweep
    assert [h['stage'] for h in m['history']] == ['32 px frozen'] * 2 + ['32 px unfrozen'] * 2
    report = (tmp_path/'out'/'report.md').read_text()
    assert '| stage | epoch |' in report and '| 32 px unfrozen | 1 |' in report
    assert str(Path.home()) not in report or str(Path.home()) in str(tmp_path)
    check_submission(tmp_path/'out'/'submission.csv', tmp_path/'data'/'planet_synth', m)


def check_submission(fn, data, m):
    "A Kaggle submission: the sample's rows in its order, known tags only, and better than always 'clear primary'."
    import pandas as pd
    from sklearn.metrics import fbeta_score
    from sklearn.preprocessing import MultiLabelBinarizer
    assert fn.read_text().splitlines()[0] == 'image_name,tags'
    sub, sample = pd.read_csv(fn, keep_default_na=False), pd.read_csv(data/'sample_submission_v2.csv')
    sol = pd.read_csv(data/'test_v2_solution.csv')
    assert list(sub.image_name) == list(sample.image_name) == list(sol.image_name) and len(sub) == 60
    assert set(' '.join(sub.tags).split()) <= set(m['tags'])
    mlb = MultiLabelBinarizer(classes=m['tags'])
    y = mlb.fit_transform(sol.tags.str.split())
    f2 = fbeta_score(y, mlb.transform(sub.tags.str.split()), beta=2, average='samples', zero_division=0)
    base = fbeta_score(y, mlb.transform([['clear', 'primary']] * len(sol)), beta=2, average='samples', zero_division=0)
    assert f2 > base + 0.05, (f2, base)


@pytest.mark.parametrize('args, msg', [
    (['planet', '--epochs', '0'], 'must be greater than 0'),
    (['planet', '--size', 'big'], "'big' is not a whole number"),
    (['planet', '--arch', 'vgg16'], "invalid choice: 'vgg16'"),
    (['planet', '--bogus'], 'unrecognized arguments: --bogus'),
    (['nothing'], "invalid choice: 'nothing'"),
])
def test_bad_arguments_one_line(args, msg):
    r = run(*args)
    assert r.returncode == 2
    assert r.stderr.count('\n') == 1 and msg in r.stderr and r.stderr.startswith('lessonlib: error:'), r.stderr


def test_bad_data_folder_one_line(tmp_path):
    r = run('planet', '--data', str(tmp_path), '--out', str(tmp_path/'out'))
    assert r.returncode == 1 and r.stderr.count('\n') == 1, r.stderr
    assert 'is not Planet data' in r.stderr and 'labels.csv + train/' in r.stderr
    assert 'Traceback' not in r.stderr


def test_help_lists_commands():
    r = run('--help')
    assert r.returncode == 0
    for cmd in ('planet', 'data', 'version'): assert cmd in r.stdout
