"""Tests for lessonlib.kaggle: Kaggle credentials, downloads from a fake Kaggle API, the lesson set-up.

Nothing here uses the internet, the real ~/.lessonlib or the real ~/.kaggle: every test gets its own HOME,
LESSONLIB_DATA and Kaggle config folder under pytest's tmp_path (the `isolated` fixture of tests/test_download.py).
"""
import json, os, stat, subprocess, sys, types
from pathlib import Path

import pytest

from lessonlib.download import DownloadError
from lessonlib.kaggle import KaggleError, kaggle_setup, kaggle_download, setup_lesson
from test_download import isolated, serve, tar_bytes, zip_bytes, sevenz_file   # isolated: autouse here too


# ---------------------------------------------------------------- Kaggle credentials

def write_json(path, d):
    path.parent.mkdir(parents=True, exist_ok=True); path.write_text(json.dumps(d)); return path


def test_kaggle_setup_order_and_secrecy(isolated, monkeypatch, capsys):
    home_cfg = isolated/'home'/'.kaggle'/'kaggle.json'
    with pytest.raises(KaggleError, match='Create New Token'): kaggle_setup()
    # 3. a path given: copied to ~/.kaggle/kaggle.json, mode 0600
    src = write_json(isolated/'Downloads'/'kaggle.json', {'username': 'ada', 'key': 'k3y-s3cret'})
    c = kaggle_setup(path=src)
    assert (c.username, c.key) == ('ada', 'k3y-s3cret')
    assert json.loads(home_cfg.read_text()) == {'username': 'ada', 'key': 'k3y-s3cret'}
    assert stat.S_IMODE(home_cfg.stat().st_mode) == 0o600
    # 2. the existing file comes before a path given (replace=True swaps in a new one)
    other = write_json(isolated/'other.json', {'username': 'bob', 'key': 'other-key'})
    assert kaggle_setup(path=other).username == 'ada'
    assert kaggle_setup(path=other, replace=True).username == 'bob'
    # 1. environment variables come first
    monkeypatch.setenv('KAGGLE_USERNAME', 'eve'); monkeypatch.setenv('KAGGLE_KEY', 'env-key')
    assert kaggle_setup().username == 'eve'
    out = capsys.readouterr()
    for secret in ('k3y-s3cret', 'other-key', 'env-key'):
        assert secret not in out.out + out.err
        assert secret not in repr(c)


def test_kaggle_config_dir_variable_and_loose_mode(isolated, monkeypatch):
    cfg = write_json(isolated/'cfg'/'kaggle.json', {'username': 'ada', 'key': 'k'})
    os.chmod(cfg, 0o644)
    monkeypatch.setenv('KAGGLE_CONFIG_DIR', str(isolated/'cfg'))
    assert kaggle_setup(quiet=True).username == 'ada'
    assert stat.S_IMODE(cfg.stat().st_mode) == 0o600             # fixed: no longer readable by others
    assert not (isolated/'home'/'.kaggle').exists()


def test_kaggle_setup_bad_file_never_shows_key(isolated):
    bad = isolated/'kaggle.json'; bad.write_text('{"username": "ada", "kee": "k3y-s3cret"}')
    with pytest.raises(KaggleError, match='not a valid kaggle.json') as e: kaggle_setup(path=bad)
    assert str(bad) in str(e.value) and 'k3y-s3cret' not in str(e.value)
    with pytest.raises(KaggleError, match='does not exist'): kaggle_setup(path=isolated/'missing.json')


def fake_colab(monkeypatch, uploaded):
    "Make `import google.colab` work, with `files.upload()` returning `uploaded`."
    google, colab = types.ModuleType('google'), types.ModuleType('google.colab')
    colab.files = types.SimpleNamespace(upload=lambda: uploaded)
    google.colab = colab
    monkeypatch.setitem(sys.modules, 'google', google); monkeypatch.setitem(sys.modules, 'google.colab', colab)


def test_kaggle_setup_colab_upload(isolated, monkeypatch):
    fake_colab(monkeypatch, {'kaggle (1).json': b'{"username": "ada", "key": "k3y"}'})
    assert kaggle_setup().username == 'ada'
    cfg = isolated/'home'/'.kaggle'/'kaggle.json'
    assert stat.S_IMODE(cfg.stat().st_mode) == 0o600
    fake_colab(monkeypatch, {})
    with pytest.raises(KaggleError, match='No file was uploaded'): kaggle_setup(replace=True)

NEW_MODULES = ('lessonlib.download', 'lessonlib.kaggle', 'lessonlib.datasets', 'lessonlib.synth',
               'lessonlib.synth.core', 'lessonlib.synth.planet')

@pytest.mark.parametrize('module', NEW_MODULES)
def test_importing_lessonlib_does_not_import_kaggle(module):
    code = (f'import sys, lessonlib, {module}; '
            'print(sorted(m for m in ("kaggle", "kagglesdk", "py7zr") if m in sys.modules))')
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == '[]'


# ---------------------------------------------------------------- Kaggle downloads against a fake API

@pytest.fixture
def kaggle_server(isolated, monkeypatch):
    "A fake Kaggle API: kagglesdk's LOCALHOST environment (http://localhost) reached through an HTTP proxy at our server."
    csv_zip = zip_bytes([('train_v2.csv', b'image_name,tags\ntrain_0,clear\n')])
    jpg_7z = sevenz_file(isolated/'src.7z', [('train-jpg.tar', tar_bytes([('train-jpg/train_0.jpg', b'jpg')], mode='w'))]).read_bytes()
    with serve({'/storage/train_v2.csv.zip': csv_zip, '/storage/train-jpg.tar.7z': jpg_7z}) as srv:
        srv.kaggle_names = {'train_v2.csv': 'train_v2.csv.zip', 'train-jpg.tar.7z': 'train-jpg.tar.7z'}
        monkeypatch.setenv('KAGGLE_API_ENVIRONMENT', 'LOCALHOST')
        monkeypatch.setenv('http_proxy', srv.url)
        monkeypatch.setenv('KAGGLE_USERNAME', 'ada'); monkeypatch.setenv('KAGGLE_KEY', 'k3y-s3cret')
        yield srv


def test_kaggle_download_success(kaggle_server, isolated):
    dest = kaggle_download('planet-x', ['train-jpg.tar.7z', 'train_v2.csv'])
    assert dest == isolated/'data'/'planet-x'
    assert (dest/'train_v2.csv').read_bytes().startswith(b'image_name,tags')   # the .zip Kaggle sent, unpacked
    assert (dest/'train-jpg'/'train_0.jpg').read_bytes() == b'jpg'               # tar inside 7z, unpacked
    assert sorted(p.name for p in dest.iterdir()) == ['.downloads', '.train-jpg.tar.7z.done', '.train_v2.csv.done',
                                                      'train-jpg', 'train_v2.csv']
    assert list((dest/'.downloads').iterdir()) == []
    posts = [e for e in kaggle_server.log if e[0] == 'POST']
    assert posts[0][1] == '/api/v1/competitions.CompetitionApiService/DownloadDataFile'
    assert posts[0][3] == {'competitionName': 'planet-x', 'fileName': 'train-jpg.tar.7z'}
    n = len(kaggle_server.log)
    kaggle_download('planet-x', ['train-jpg.tar.7z', 'train_v2.csv'])
    assert len(kaggle_server.log) == n                            # done already: no requests


def test_kaggle_download_401(kaggle_server, isolated, monkeypatch):
    monkeypatch.setenv('KAGGLE_KEY', 'expired-key')
    with pytest.raises(KaggleError, match='wrong or has expired') as e: kaggle_download('planet-x', 'train_v2.csv')
    msg = str(e.value)
    assert 'https://www.kaggle.com/settings' in msg and "'ada'" in msg and 'expired-key' not in msg


def test_kaggle_download_403(kaggle_server):
    kaggle_server.kaggle_forbidden.add('planet-x')
    with pytest.raises(KaggleError, match='403') as e: kaggle_download('planet-x', 'train_v2.csv')
    assert 'https://www.kaggle.com/competitions/planet-x/rules' in str(e.value)


def test_kaggle_download_404(kaggle_server):
    with pytest.raises(KaggleError, match='404'): kaggle_download('planet-x', 'nope.csv')


def test_kaggle_download_truncated(kaggle_server, isolated):
    # the first answer is only looked at (its redirect gives the storage URL); the next two are cut short
    kaggle_server.cut['/storage/train_v2.csv.zip'] = [10, 10, 10]
    with pytest.raises(DownloadError, match=r'failed after 2 attempt\(s\)'):
        kaggle_download('planet-x', ['train_v2.csv'], retries=1)
    dest = isolated/'data'/'planet-x'
    assert not (dest/'train_v2.csv').exists() and not (dest/'.train_v2.csv.done').exists()
    # the next run resumes the kept part and finishes
    kaggle_download('planet-x', ['train_v2.csv'])
    assert (dest/'train_v2.csv').exists()
    gets = [e[2] for e in kaggle_server.log if e[0] == 'GET']
    assert gets == [None, None, 'bytes=10-', None, 'bytes=20-']    # resumed in the run, then in the next run


def test_kaggle_download_truncated_without_redirect(kaggle_server, isolated):
    kaggle_server.kaggle_redirect = False                          # Kaggle sends the bytes itself
    kaggle_server.cut['/storage/train_v2.csv.zip'] = [10]
    with pytest.raises(DownloadError, match='nothing was kept'): kaggle_download('planet-x', ['train_v2.csv'])
    dest = isolated/'data'/'planet-x'
    assert not (dest/'train_v2.csv').exists() and list((dest/'.downloads').iterdir()) == []
    kaggle_download('planet-x', ['train_v2.csv'])                 # and works when the connection holds
    assert (dest/'train_v2.csv').exists()


def test_kaggle_download_without_credentials(kaggle_server, monkeypatch):
    monkeypatch.delenv('KAGGLE_USERNAME'); monkeypatch.delenv('KAGGLE_KEY')
    with pytest.raises(KaggleError, match='No Kaggle credentials found.*Create New Token'): kaggle_download('planet-x')
    assert kaggle_server.log == []

# ---------------------------------------------------------------- lesson set-up

def test_setup_lesson_local_and_colab(isolated, monkeypatch, capsys):
    info = setup_lesson()
    assert info['colab'] is False and info['data'] == isolated/'data'
    out = capsys.readouterr().out
    assert str(isolated/'data') in out and ('GPU' in out or 'CPU' in out)
    monkeypatch.delenv('LESSONLIB_DATA')
    fake_colab(monkeypatch, {})
    info = setup_lesson(packages=(), quiet=True)                    # in_colab() now says yes
    assert info['colab'] is True and info['data'] == Path('/content/data')
    assert os.environ['LESSONLIB_DATA'] == '/content/data'


def test_setup_lesson_lists_data_folders(isolated):
    data = isolated/'data'
    for name in ('planet_tiny', '.downloads', 'oxford-iiit-pet'): (data/name).mkdir(parents=True)
    (data/'notes.txt').write_text('not a data set')
    assert setup_lesson(quiet=True)['present'] == ['oxford-iiit-pet', 'planet_tiny']
