"""Tests for lessonlib.datasets: the data sets by name (listing, getting), with no network.

Every test gets its own HOME and LESSONLIB_DATA under pytest's tmp_path (the `isolated` fixture of tests/test_download.py).
"""
import re

import pytest

from lessonlib.download import CHECKS, URLs, untar_data
from lessonlib.datasets import DATASETS, list_datasets, datasets_table, get_dataset
from test_download import SHARED, isolated, snapshot   # isolated: autouse here too


def test_urls_are_fastai_public_archives():
    assert URLs.PLANET_TINY == 'https://s3.amazonaws.com/fast-ai-sample/planet_tiny.tgz'
    assert URLs.PETS == 'https://s3.amazonaws.com/fast-ai-imageclas/oxford-iiit-pet.tgz'
    assert URLs.CAMVID == 'https://s3.amazonaws.com/fast-ai-imagelocal/camvid.tgz'
    assert URLs.IMDB == 'https://s3.amazonaws.com/fast-ai-nlp/imdb.tgz'
    for name in ('planet_tiny', 'planet_sample', 'camvid_tiny', 'camvid', 'biwi_sample', 'biwi_head_pose',
                 'imdb_sample', 'imdb', 'pets', 'mnist_tiny'):
        assert DATASETS[name] in CHECKS, name


def test_present_folder_is_used_without_network_or_writes(isolated):
    data = isolated/'data'; (data/'planet_tiny').mkdir(parents=True)
    before = snapshot(data)
    assert untar_data(URLs.PLANET_TINY) == data/'planet_tiny'    # the real S3 URL: no network is touched
    assert get_dataset('planet_tiny') == data/'planet_tiny'
    assert snapshot(data) == before


@pytest.mark.skipif(not SHARED.is_dir(), 
                    reason='../shared/data (a read-only folder of the real sample sets, beside the repository) is absent: '
                           'this checks lessonlib reads such a folder without writing to it; create one with '
                           '`LESSONLIB_DATA=../shared/data lessonlib data get planet_tiny` (and the other sets this test names)')
def test_shared_read_only_data_serves_lessons(monkeypatch):
    monkeypatch.setenv('LESSONLIB_DATA', str(SHARED))
    before = {p: p.stat().st_mtime_ns for p in SHARED.iterdir()}
    for name in ('planet_tiny', 'camvid_tiny', 'imdb_sample', 'biwi_sample', 'mnist_tiny', 'hymenoptera'):
        assert get_dataset(name).is_dir(), name
    assert (untar_data(URLs.PLANET_TINY)/'labels.csv').exists()
    assert {p: p.stat().st_mtime_ns for p in SHARED.iterdir()} == before   # nothing written
    present = {r.name for r in list_datasets() if r.present}
    assert {'planet_tiny', 'camvid_tiny', 'imdb_sample', 'biwi_sample', 'mnist_tiny', 'hymenoptera'} <= present


def test_list_and_table(isolated):
    (isolated/'data'/'oxford-iiit-pet').mkdir(parents=True)
    rows = list_datasets()
    pets = next(r for r in rows if r.name == 'pets')
    assert pets == ('pets', URLs.PETS, isolated/'data'/'oxford-iiit-pet', True)
    assert [r.name for r in rows if r.present] == ['pets']
    assert 'planet' in [r.name for r in rows]                      # the Kaggle one too
    table = datasets_table(rows)
    assert table.splitlines()[0].split()[:3] == ['name', 'here?', 'download']
    assert re.search(r'^pets\s+yes\s+774 MB', table, re.M)
    assert get_dataset('oxford-iiit-pet') == get_dataset('pets') == isolated/'data'/'oxford-iiit-pet'
    with pytest.raises(ValueError, match="Did you mean 'camvid_tiny'"): get_dataset('camvid-tiny')
