"""Reliability suite, part 2 (issue 18, items 2, 3, 5, 6): images of every mode, broken files, label tables,
shared data folders, the command line; property-based tests (Hypothesis) of the label readers and splitters.

Every input is built here under pytest's tmp_path; nothing uses the internet. Oracles are computed independently
(NumPy arithmetic on the pixels, the generated table itself).
"""
import io, multiprocessing, os, string, time, warnings, zlib
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
from hypothesis import HealthCheck, given, settings, strategies as st
from PIL import Image

import lessonlib.core as core
from lessonlib.cli import main
from lessonlib.core import DataFolderError, check_data_folder, lock_folder, unlock_folder
from lessonlib.data import (BadItemError, Block, CategoryBlock, ColReader, DataBlock, DataError, FuncSplitter,
                            MultiCategoryBlock, RandomSplitter, df_rows, describe, read_table)
from lessonlib.download import DownloadError, untar_data
from lessonlib.learner import Learner
from lessonlib.serve import BadImage, read_image
from lessonlib.synth.core import MARKER, make_synth, read_marker
from lessonlib.vision.data import ImageBlock, open_image

FAST = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
W, H = 12, 8


# ---------------------------------------------------------------- images: one rule everywhere (item 2)

def grey(a):
    "A HW uint8 grey picture as the 3-channel HWC array an RGB block must give."
    return np.repeat(a[..., None], 3, -1)

def ramp16():
    return (np.arange(W * H, dtype=np.uint32).reshape(H, W) * 65535 // (W * H - 1)).astype(np.uint16)

def pictures(folder: Path) -> dict:
    "file name -> (saved picture, the expected RGB array, computed with NumPy from the pixels written)."
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
    g8 = rng.integers(0, 256, (H, W), dtype=np.uint8)
    alpha = rng.integers(0, 256, (H, W), dtype=np.uint8)
    r16, f = ramp16(), np.linspace(0, 1, W * H, dtype=np.float32).reshape(H, W)
    on_white = lambda c, a: np.round((c.astype(np.float64) * a[..., None] + 255. * (255 - a[..., None])) / 255)
    pal = Image.fromarray(g8 % 4).convert('P'); pal.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * 756)
    pal_rgb = np.array([[0, 0, 0], [255, 0, 0], [0, 255, 0], [0, 0, 255]], np.uint8)[g8 % 4]
    cmyk = Image.fromarray(rgb).convert('CMYK')
    turned = Image.fromarray(rgb); exif = turned.getexif(); exif[0x0112] = 8      # 8: shown turned 90° clockwise
    items = {
        'rgb.png': (Image.fromarray(rgb), rgb),
        'rgba.png': (Image.fromarray(np.dstack([rgb, alpha])), on_white(rgb, alpha)),
        'la.png': (Image.fromarray(np.dstack([g8, alpha])), grey(on_white(g8[..., None], alpha)[..., 0])),
        'grey.png': (Image.fromarray(g8), grey(g8)),
        'grey16.png': (Image.fromarray(r16), grey(np.round(r16 / 257.))),
        'int32.tif': (Image.fromarray(r16.astype(np.int32)), grey(np.round(r16 / 257.))),
        'float.tif': (Image.fromarray(f), grey(np.round(f * 255.))),
        'palette.png': (pal, pal_rgb),
        'cmyk.tif': (cmyk, np.asarray(cmyk.convert('RGB'))),
        'exif.tif': (turned, np.rot90(rgb, 1)),
    }
    for name, (im, _) in items.items():
        im.save(folder/name, exif=exif) if name == 'exif.tif' else im.save(folder/name)
    return {k: np.asarray(v, dtype=np.uint8) for k, (_, v) in items.items()}

@pytest.fixture(scope='module')
def picture_set(tmp_path_factory):
    folder = tmp_path_factory.mktemp('pictures')
    return folder, pictures(folder)

def label(o): return 'a' if hash(Path(o).name) % 2 else 'b'

def first(o): return o

def picture_dls(folder, names, **kw):
    blk = DataBlock((ImageBlock, CategoryBlock(vocab=['a', 'b'])), get_y=label,
                    splitter=FuncSplitter(lambda o: Path(o).name.startswith(('c', 'e', 'g'))), **kw)
    return blk.dataloaders([folder/n for n in names], bs=2, device='cpu')

def hwc(t): return t.permute(1, 2, 0).numpy()

def test_pictures_are_what_the_oracle_says(picture_set):
    "The files hold what we think (else the comparisons below prove nothing): 16-bit stays 16-bit, float stays float."
    folder, _ = picture_set
    assert Image.open(folder/'grey16.png').mode.startswith('I')
    assert Image.open(folder/'float.tif').mode == 'F' and Image.open(folder/'cmyk.tif').mode == 'CMYK'
    assert Image.open(folder/'exif.tif').getexif()[0x0112] == 8

@pytest.mark.parametrize('name', ['rgb.png', 'rgba.png', 'la.png', 'grey.png', 'grey16.png', 'int32.tif',
                                  'float.tif', 'palette.png', 'cmyk.tif', 'exif.tif'])
def test_every_mode_decodes_the_same_in_training_validation_predict_and_serving(picture_set, name):
    folder, expected = picture_set
    dls = picture_dls(folder, expected)
    ds = dls.train_ds if name in [Path(o).name for o in dls.train_ds.items] else dls.valid_ds
    train_like = ds[[Path(o).name for o in ds.items].index(name)][0]
    from_file = dls.test_dl([folder/name]).dataset[0][0]                   # predict on a path
    from_pil = dls.test_dl([Image.open(folder/name)]).dataset[0][0]        # predict on an opened picture
    tensors = {'train/valid': train_like, 'predict(path)': from_file, 'predict(PIL)': from_pil}
    if not name.endswith('.tif'):                                          # serving accepts JPEG, PNG, WebP, GIF, BMP
        tensors['serve'] = ImageBlock().encode(ImageBlock().read(read_image((folder/name).read_bytes())))
    for where, t in tensors.items():
        assert t.dtype == torch.uint8 and tuple(t.shape) == (3,) + expected[name].shape[:2], where
        np.testing.assert_array_equal(hwc(t), expected[name], err_msg=f'{name} via {where}')

def test_sixteen_bit_ramp_is_scaled_not_clipped(picture_set):
    folder, _ = picture_set
    a = np.asarray(open_image(folder/'grey16.png', mode='L'))
    assert len(np.unique(a)) == W * H and (a == 255).mean() < 0.05        # was 97% at 255 when clipped

def test_float_tensor_in_0_255_is_refused_by_predict(picture_set):
    folder, expected = picture_set
    dls = picture_dls(folder, expected)
    learn = Learner(dls, nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 2)), device='cpu')
    with pytest.raises(DataError, match=r'float tensor with values in \[0, 255\].*divide by 255'):
        learn.predict(torch.linspace(0, 255, 3 * H * W).reshape(3, H, W))
    labels, _, probs = learn.predict(torch.full((3, H, W), 0.5))           # in [0, 1]: fine
    assert labels in ('a', 'b') and abs(float(probs.sum()) - 1) < 1e-5
    np.testing.assert_array_equal(hwc(dls.test_dl([torch.full((3, 2, 2), 1.)]).dataset[0][0]), np.full((2, 2, 3), 255))

def bomb_png(w, h) -> bytes:
    "A tiny PNG whose header claims `w`x`h` pixels (the CRC fixed, so decoders believe it)."
    buf = io.BytesIO(); Image.new('L', (1, 1)).save(buf, 'PNG'); b = bytearray(buf.getvalue())
    b[16:24] = w.to_bytes(4, 'big') + h.to_bytes(4, 'big')
    b[29:33] = zlib.crc32(bytes(b[12:29])).to_bytes(4, 'big')
    return bytes(b)

def test_decompression_bomb_is_refused_naming_file_and_limit(tmp_path, monkeypatch):
    fn = tmp_path/'bomb.png'; fn.write_bytes(bomb_png(60_000, 60_000))       # 3.6 gigapixels in 70 bytes
    with pytest.raises(BadItemError, match=rf'{fn}.*(limit of 100,000,000|decompression bomb)'): open_image(fn)
    big = tmp_path/'big.png'; Image.new('RGB', (100, 100)).save(big)
    with pytest.raises(BadItemError, match=rf'image {big} is 100x100 = 10,000 pixels, over the limit of 5,000'):
        open_image(big, max_pixels=5000)
    monkeypatch.setattr('lessonlib.vision.data.MAX_IMAGE_PIXELS', 5000)
    with pytest.raises(BadItemError, match='over the limit of 5,000'): open_image(big)
    with pytest.raises(BadImage) as e: read_image(fn.read_bytes())
    assert e.value.status == 413

def broken_files(folder: Path) -> dict:
    good = io.BytesIO(); Image.new('RGB', (W, H), (9, 9, 9)).save(good, 'JPEG')
    files = {'empty.jpg': b'', 'truncated.jpg': good.getvalue()[:60], 'text.jpg': b'just some words',
             'bomb.png': bomb_png(60_000, 60_000)}
    for k, v in files.items(): (folder/k).write_bytes(v)
    for i in range(6): Image.new('RGB', (W, H), (i, i, i)).save(folder/f'ok{i}.png')
    return files

@pytest.mark.parametrize('bad', ['empty.jpg', 'truncated.jpg', 'text.jpg', 'bomb.png'])
def test_a_bad_file_names_the_file_and_the_row(tmp_path, bad):
    broken_files(tmp_path)
    (tmp_path/'labels.csv').write_text('name,label\n' + ''.join(f'ok{i}.png,a\n' for i in range(4)) + f'{bad},b\nok5.png,b\n')
    df = read_table(tmp_path/'labels.csv')
    dls = DataBlock((ImageBlock, CategoryBlock), get_x=ColReader('name', pref=tmp_path/''), get_y=ColReader('label'),
                    splitter=FuncSplitter(lambda r: r['name'] == 'ok0.png')).dataloaders(df, bs=2, shuffle=False, device='cpu')
    with pytest.raises(BadItemError) as e: [b for b in dls.train]
    msg = str(e.value)
    assert f'line 6 of {tmp_path/"labels.csv"}' in msg and str(tmp_path/bad) in msg, msg

def test_skip_policy_skips_warns_and_counts_and_training_goes_on(tmp_path):
    files = broken_files(tmp_path)
    items = sorted(tmp_path.glob('*.*'))
    blk = lambda **kw: DataBlock((ImageBlock, CategoryBlock(vocab=['a', 'b'])), get_y=label,
                                 splitter=FuncSplitter(lambda o: o.name == 'ok0.png'), **kw)
    with pytest.raises(ValueError, match="'raise' or 'skip'"): blk(on_bad_item='ignore')
    dls = blk(on_bad_item='skip').dataloaders(items, bs=3, device='cpu')
    learn = Learner(dls, nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 2)), device='cpu')
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter('always')
        learn.fit(2)
    msgs = [str(m.message) for m in w]
    for bad in files: assert sum(f'skipped a bad item' in m and bad in m for m in msgs) == 2, (bad, msgs)   # each epoch
    assert sum(f'{len(files)} of {len(items) - 1} training items skipped this epoch' in m for m in msgs) == 2, msgs
    assert len(learn.recorder.values) == 2                                   # both epochs ran
    with pytest.raises(DataError, match='every item failed'):               # skipping everything is not training
        [b for b in blk(on_bad_item='skip').dataloaders([tmp_path/f for f in files] + [tmp_path/'ok0.png'], bs=2,
                                                        device='cpu').train]

@pytest.mark.parametrize('policy', ['raise', 'skip'])
def test_bad_file_in_a_worker_process_is_named_not_anonymous(tmp_path, policy):
    broken_files(tmp_path)
    items = [tmp_path/f'ok{i}.png' for i in range(4)] + [tmp_path/'truncated.jpg']
    dls = DataBlock((ImageBlock, CategoryBlock(vocab=['a', 'b'])), get_y=label, splitter=FuncSplitter(lambda o: False),
                    on_bad_item=policy).dataloaders(items, bs=5, shuffle=False, device='cpu', num_workers=1)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter('always')
        if policy == 'raise':
            with pytest.raises(BadItemError, match=str(tmp_path/'truncated.jpg')): [b for b in dls.train]
        else: assert [len(b[0]) for b in dls.train] == [4]
    if policy == 'skip': assert any('truncated.jpg' in str(m.message) for m in w)


# ---------------------------------------------------------------- label tables (item 3)

def table(tmp_path, data, name='labels.csv'):
    fn = tmp_path/name
    fn.write_bytes(data if isinstance(data, bytes) else data.encode())
    return fn

def read(fn, **kw):
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter('always')
        return read_table(fn, **kw), [str(m.message) for m in w]

def test_bom_crlf_spaces_empty_cells_and_leading_zeros(tmp_path):
    fn = table(tmp_path, b'\xef\xbb\xbfimage_name , tags\r\n0007 ,  clear primary \r\n0010,\r\n\r\n00,haze\r\n')
    df, _ = read(fn)
    assert list(df.columns) == ['image_name', 'tags'] and list(df.image_name) == ['0007', '0010', '00']
    assert list(df.index) == [2, 3, 5]                                   # line numbers, counting the header
    labels = [ColReader('tags', label_delim=' ')(r) for r in df_rows(df)]
    assert labels == [['clear', 'primary'], [], ['haze']]

def test_tabs_in_the_file_or_between_tags(tmp_path):
    df, _ = read(table(tmp_path, 'image_name\ttags\na\tclear primary\nb\thaze\n'))
    assert df.tags.tolist() == ['clear primary', 'haze']
    df, _ = read(table(tmp_path, 'image_name,tags\na,"clear\tprimary"\n'))
    assert ColReader('tags', label_delim=' ')(df_rows(df)[0]) == ['clear', 'primary']

def test_header_less_file_with_the_expected_columns(tmp_path):
    df, w = read(table(tmp_path, 'a.jpg,clear\nb.jpg,haze\n'), cols=['image_name', 'tags'])
    assert df.image_name.tolist() == ['a.jpg', 'b.jpg'] and list(df.index) == [1, 2]   # the first row is kept
    assert any('no header line' in m for m in w)

@pytest.mark.parametrize('data,cols,msg', [
    ('', None, 'is empty'),
    ('\n\n', None, 'is empty'),
    ('image_name tags\na clear\n', ['image_name', 'tags'], 'it has 1 column'),
    ('image_name,label\na,b\n', ['image_name', 'tags'], r"line 1 \(the header\): no column \['tags'\]"),
    ('image_name,tags\na,clear\nb,clear,extra\n', None, r'line 3: 3 cells for the 2 columns'),
    ('image_name,tags\na,"clear\n', None, r'line \d+'),
])
def test_bad_tables_name_the_file_and_line(tmp_path, data, cols, msg):
    fn = table(tmp_path, data)
    with pytest.raises(DataError, match=msg) as e: read_table(fn, cols=cols)
    assert str(fn) in str(e.value)

def test_latin1_file_names_the_line_and_what_to_do(tmp_path):
    fn = table(tmp_path, 'image_name,tags\na,clear\nb\xe9b\xe9,haze\n'.encode('latin-1'))
    with pytest.raises(DataError, match=rf"{fn}, line 3: byte 0xe9 is not utf-8.*encoding='latin-1'"): read_table(fn)
    assert read_table(fn, encoding='latin-1').image_name.tolist() == ['a', 'bébé']

def test_missing_folder_or_file(tmp_path):
    with pytest.raises(DataError, match='no label file'): read_table(tmp_path/'nope.csv')
    with pytest.raises(DataError, match='it is a folder'): read_table(tmp_path)

class NameBlock(Block):
    "Reads nothing: the input is the file name (a block that `reads_files`, without opening them)."
    reads_files = True
    def read(self, o, size=None): return torch.tensor(float(len(str(o))))

def test_missing_images_fail_before_work_with_the_line(tmp_path):
    for n in ('a', 'b', 'c'): (tmp_path/f'{n}.jpg').write_bytes(b'x')
    df, _ = read(table(tmp_path, 'image_name,tags\na,x\nb,y\ngone,x\nc,y\n'))
    blk = lambda **kw: DataBlock((NameBlock, CategoryBlock), get_x=ColReader(0, pref=tmp_path, suff='.jpg'),
                                 get_y=ColReader(1), splitter=FuncSplitter(lambda r: False), **kw)
    with pytest.raises(BadItemError, match=rf"line 4 of {tmp_path/'labels.csv'}.*gone.jpg.*on_bad_item='skip'"):
        blk().dataloaders(df, bs=1, device='cpu')
    with pytest.warns(UserWarning, match='left out'): dls = blk(on_bad_item='skip').dataloaders(df, bs=1, device='cpu')
    assert len(dls.train_ds) == 3

def test_duplicated_rows_never_land_in_train_and_valid(tmp_path):
    names = [f'{i:04d}' for i in range(30)]
    for n in names: (tmp_path/f'{n}.jpg').write_bytes(b'x')
    rows = [(n, 'x' if i % 2 else 'y') for i, n in enumerate(names)]
    rows += [(n, 'x' if i % 2 else 'y') for i, n in enumerate(names[:10])]        # exact repeats
    rows += [(n, 'z') for n in names[10:20]]                                      # same picture, other label
    df, w = read(table(tmp_path, 'image_name,tags\n' + ''.join(f'{a},{b}\n' for a, b in rows)))
    assert len(df) == 40 and any('10 duplicated rows dropped' in m for m in w)
    blk = DataBlock((NameBlock, MultiCategoryBlock), get_x=ColReader(0, pref=tmp_path, suff='.jpg'),
                    get_y=ColReader(1, label_delim=' '), splitter=RandomSplitter(0.5, seed=3))
    with pytest.warns(UserWarning, match='moved to the training set'): d = blk.datasets(df)
    trn, val = ({d.items[i]['image_name'] for i in s} for s in d.splits)
    assert not trn & val and len(d.splits[0]) + len(d.splits[1]) == 40

def test_mixed_case_tags_fail_with_the_line_or_fold(tmp_path):
    df, _ = read(table(tmp_path, 'image_name,tags\na,clear primary\nb,Clear\nc,clear\n'))
    blk = lambda lower: DataBlock((Block, MultiCategoryBlock), get_x=ColReader(0), splitter=FuncSplitter(lambda r: False),
                                  get_y=ColReader(1, label_delim=' ', lower=lower))
    with pytest.raises(DataError, match=rf"\['Clear', 'clear'\] differ only in case \(e.g. 'Clear' in line 3 of "
                                        rf"{tmp_path/'labels.csv'}.*lower=True"): blk(False).datasets(df)
    assert blk(True).datasets(df).vocab == ['clear', 'primary']

# Hypothesis: random tables written with random BOM, line ends, separators, padding and header; read back exactly.
NAMES = st.text(string.ascii_lowercase + string.digits + '_.-', min_size=1, max_size=6).filter(lambda s: s not in ('name', 'tags'))
TAGS = st.lists(st.sampled_from(['clear', 'haze', 'primary', 'water', 'road']), max_size=3).map(' '.join)

@FAST
@given(rows=st.lists(st.tuples(NAMES, TAGS), min_size=1, max_size=25), sep=st.sampled_from([',', '\t', ';']),
       bom=st.booleans(), crlf=st.booleans(), pad=st.sampled_from(['', ' ', '  ']), header=st.booleans())
def test_property_read_table_reads_back_what_was_written(tmp_path_factory, rows, sep, bom, crlf, pad, header):
    nl = '\r\n' if crlf else '\n'
    lines = ([f'name{sep}tags'] if header else []) + [f'{pad}{n}{pad}{sep}{pad}{t}{pad}' for n, t in rows]
    fn = tmp_path_factory.mktemp('t')/'labels.csv'
    fn.write_bytes(('\ufeff' if bom else '').encode() + (nl.join(lines) + nl).encode())
    df, _ = read(fn, cols=['name', 'tags'])
    first_line, want, seen = (2 if header else 1), [], set()
    for k, r in enumerate(rows):                                    # oracle: the first of each exact repeat
        if r not in seen: seen.add(r); want.append((first_line + k, r))
    assert list(df.index) == [l for l, _ in want]
    assert list(zip(df.name, df.tags)) == [r for _, r in want]
    assert [ColReader('tags', label_delim=' ')(r) for r in df_rows(df)] == [t.split() for _, (_, t) in want]

@FAST
@given(labels=st.lists(st.sampled_from(['a', 'b', 'cc', 'Road']), max_size=6),
       gaps=st.lists(st.sampled_from([' ', '  ', '\t', ' \t ']), min_size=7, max_size=7), ends=st.booleans())
def test_property_label_splitting(labels, gaps, ends):
    cell = ''.join(g + l for g, l in zip(gaps, labels)) + (gaps[-1] if ends else '')
    assert ColReader(0, label_delim=' ')(df_rows_of([cell])[0]) == labels

def df_rows_of(cells):
    import pandas as pd
    return df_rows(pd.DataFrame({'tags': cells}))

@FAST
@given(n=st.integers(1, 200), pct=st.floats(0, 1), seed=st.integers(0, 2**31))
def test_property_random_splitter_is_a_partition(n, pct, seed):
    trn, val = RandomSplitter(pct, seed)(list(range(n)))
    assert sorted(trn + val) == list(range(n)) and len(val) == int(round(pct * n))
    assert RandomSplitter(pct, seed)(list(range(n))) == (trn, val)

@FAST
@given(names=st.lists(st.sampled_from([f'{i:03d}' for i in range(12)]), min_size=2, max_size=40),
       pct=st.floats(0.1, 0.9), seed=st.integers(0, 1000))
def test_property_duplicates_stay_on_one_side(tmp_path_factory, names, pct, seed):
    import pandas as pd
    df = pd.DataFrame({'name': names, 'y': ['a'] * len(names)})
    blk = DataBlock((Block, CategoryBlock), get_x=ColReader('name'), get_y=ColReader('y'), splitter=RandomSplitter(pct, seed))
    blk.blocks[0].reads_files = True                     # names act as files here (the check is in split)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        items = blk.collect(df)
        try: trn, val = blk.split(items)
        except DataError: return                          # no training item: a clear error, tested elsewhere
    assert sorted(trn + val) == list(range(len(names)))
    assert not {names[i] for i in trn} & {names[i] for i in val}


# ---------------------------------------------------------------- shared data folders (item 5)

def in_child(fn, *args):
    "Run `fn(*args)` in a forked process (torch already imported: fast); its exit code (0: returned, 1: raised)."
    def target():
        core._HELD.clear()                                # the child opens its own lock files
        try: fn(*args); os._exit(0)
        except BaseException as e:
            (Path(args[0]).parent/f'child-{os.getpid()}.err').write_text(f'{type(e).__name__}: {e}'); os._exit(1)
    p = multiprocessing.get_context('fork').Process(target=target); p.start()
    return p

def slow_writer(log: Path, n: int):
    def write(folder):
        with open(log, 'a') as f: f.write(f'{os.getpid()}\n')
        time.sleep(0.4)
        for i in range(n): (folder/f'{i}.txt').write_text(str(i))
    return write

def make_numbers(dest, n, log):
    d = make_synth(dest, {'n': n}, slow_writer(log, n))
    assert sorted(p.name for p in d.iterdir()) == sorted([f'{i}.txt' for i in range(n)] + [MARKER])

def test_two_processes_making_the_same_set_take_turns(tmp_path):
    dest, log = tmp_path/'set', tmp_path/'log'
    ps = [in_child(make_numbers, dest, 5, log) for _ in range(2)]
    for p in ps: p.join(60)
    assert [p.exitcode for p in ps] == [0, 0], [e.read_text() for e in tmp_path.glob('*.err')]
    assert len(log.read_text().split()) == 1                                  # made once, then reused
    assert not list(tmp_path.glob('.set.*.part'))

def regenerate(dest, n, log, wait):
    core.LOCK_WAIT = wait
    make_synth(dest, {'n': n}, slow_writer(log, n))

def test_regenerating_with_other_parameters_never_breaks_a_reader(tmp_path):
    dest, log = tmp_path/'set', tmp_path/'log'
    make_synth(dest, {'n': 3}, slow_writer(log, 3))                            # this process reads the set now
    files = sorted(dest.iterdir())
    p = in_child(regenerate, dest, 7, log, 0.5); p.join(60)
    assert p.exitcode == 1 and 'in use or being made by another process' in next(tmp_path.glob('*.err')).read_text()
    assert sorted(dest.iterdir()) == files and read_marker(dest) == {'n': 3}   # the reader's files are intact
    unlock_folder(dest)                                                       # the reader is done
    p = in_child(regenerate, dest, 7, log, 5); p.join(60)
    assert p.exitcode == 0 and read_marker(dest) == {'n': 7}

def test_killed_maker_leaves_nothing_that_stays(tmp_path):
    stale = tmp_path/'.set.abc123.part'; (stale/'set').mkdir(parents=True); (stale/'set'/'0.txt').write_text('half')
    old = tmp_path/'.set.old.xyz'; old.mkdir()
    make_synth(tmp_path/'set', {'n': 1}, slow_writer(tmp_path/'log', 1))
    assert not stale.exists() and not old.exists()

def untar_into(dest):
    assert untar_data('http://127.0.0.1:9/planet_tiny.tgz', dest, retries=0) == dest/'planet_tiny'

def test_untar_data_waits_for_the_process_making_the_folder(tmp_path):
    folder = tmp_path/'planet_tiny'
    lock_folder(folder)                                       # "we are downloading it"
    p = in_child(untar_into, tmp_path)
    time.sleep(0.5); assert p.is_alive()                      # the second one waits...
    tmp = tmp_path/'.made'; tmp.mkdir(); (tmp/'labels.csv').write_text('x'); os.replace(tmp, folder)
    unlock_folder(folder)
    p.join(60)
    assert p.exitcode == 0, [e.read_text() for e in tmp_path.glob('*.err')]   # ...then uses it, no download

@pytest.mark.parametrize('kind', ['file', 'under a file', 'read-only'])
def test_bad_data_folder_is_named_before_any_work(tmp_path, kind):
    if kind == 'read-only' and os.geteuid() == 0: pytest.skip('root writes anywhere')
    (tmp_path/'f').write_text('')
    ro = tmp_path/'ro'; ro.mkdir(); os.chmod(ro, 0o500)
    dest = {'file': tmp_path/'f', 'under a file': tmp_path/'f'/'data', 'read-only': ro}[kind]
    called = []
    with pytest.raises(DataFolderError, match=r'(is a file|Cannot create|read-only).*LESSONLIB_DATA') as e:
        make_synth(dest/'set', {'n': 1}, called.append)
    assert str(dest) in str(e.value)
    with pytest.raises(DownloadError, match=str(dest)): untar_data('http://127.0.0.1:9/x.tgz', dest, retries=0)
    assert not called
    with pytest.raises(DataFolderError): check_data_folder(dest)
    os.chmod(ro, 0o700)

def test_missing_data_folder_is_made(tmp_path):
    assert check_data_folder(tmp_path/'a'/'b').is_dir()


# ---------------------------------------------------------------- the command line (item 6)

def cli(capsys, *argv):
    try: rc = main(list(argv))
    except SystemExit as e: rc = e.code
    out, err = capsys.readouterr()
    return rc, out, err

@pytest.mark.parametrize('argv,rc,msg', [
    (['nosuch'], 2, "invalid choice: 'nosuch'"),
    (['planet', '--bs', 'x'], 2, "argument --bs: 'x' is not a whole number"),
    (['planet', '--size', '-3'], 2, 'must be greater than 0'),
    (['scratch', '--arch', 'nope'], 2, "invalid choice: 'nope'"),
    (['planet', '--data', '/no/such/folder'], 1, 'is not Planet data'),
    (['pets', '--data', '/no/such/folder'], 1, 'is not a folder'),
    (['imdb', '--data', '/no/such/file.csv'], 1, 'not found'),
    (['data', 'get', 'nosuch'], 1, "No data set called 'nosuch'"),
    (['data', 'synth', 'nope'], 2, "invalid choice: 'nope'"),
    (['serve', '/no/such/model.pkl'], 1, 'no exported learner at /no/such/model.pkl'),
    (['finetune', '/no/such/model.pkl', '--feedback', '/no/such.db', '--data', '/no/such/data'], 1, 'no exported learner'),
])
def test_cli_errors_are_one_line(capsys, monkeypatch, tmp_path, argv, rc, msg):
    monkeypatch.setenv('LESSONLIB_DATA', str(tmp_path/'data')); monkeypatch.delenv('LESSONLIB_DEBUG', raising=False)
    got, out, err = cli(capsys, *argv)
    assert got == rc and err.count('\n') == 1 and msg in err and 'Traceback' not in err, err

def test_cli_output_folder_that_is_a_file(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv('LESSONLIB_DATA', str(tmp_path/'data'))
    (tmp_path/'out').write_text('')
    rc, _, err = cli(capsys, 'planet', '--n', '8', '--size', '16', '--out', str(tmp_path/'out'))
    assert rc == 1 and err.count('\n') == 1 and f'File exists: {tmp_path/"out"}' in err and 'another path' in err, err

@pytest.mark.parametrize('bs,msg', [('1', 'batch size 1 with a model that has batch norm'),
                                    ('64', 'the batch size 64 is larger than the 13 training items')])
def test_cli_batch_size_problems_are_explained(capsys, monkeypatch, tmp_path, bs, msg):
    monkeypatch.setenv('LESSONLIB_DATA', str(tmp_path/'data')); monkeypatch.delenv('LESSONLIB_DEBUG', raising=False)
    rc, _, err = cli(capsys, 'planet', '--n', '16', '--size', '16', '--bs', bs, '--out', str(tmp_path/'o'))
    assert rc == 1 and err.count('\n') == 1 and msg in err and 'sweep stopped' not in err, err

def test_cli_debug_variable_shows_the_traceback(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv('LESSONLIB_DATA', str(tmp_path/'data')); monkeypatch.setenv('LESSONLIB_DEBUG', '1')
    with pytest.raises(Exception, match="No data set called 'nosuch'"): main(['data', 'get', 'nosuch'])
