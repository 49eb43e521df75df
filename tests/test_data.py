"Heavier checks of lessonlib.data and lessonlib.vision.data on the real sample data sets (skipped when absent)."
import pickle, shutil, time, warnings
from functools import partial
from pathlib import Path

import pytest
import torch

pd = pytest.importorskip('pandas')
import matplotlib
matplotlib.use('Agg')

from lessonlib.core import data_dir, set_seed
from lessonlib.data import (DataBlock, DataError, ColReader, RandomSplitter, GrandparentSplitter, FileSplitter, ColSplitter,
                            CategoryBlock, MultiCategoryBlock, parent_label, RegexLabeller, Block, TfmdDL, IMAGE, MASK, POINTS)
from lessonlib.losses import CrossEntropyLossFlat, BCEWithLogitsLossFlat, MSELossFlat
from lessonlib.vision.data import (ImageBlock, MaskBlock, PointBlock, Resize, RandomResizedCrop, get_image_files, open_image,
                                   ImageDataLoaders, points_to_norm, points_to_pixels)
from lessonlib.vision.augment import aug_transforms


def _need(name):
    p = data_dir()/name
    if not p.exists(): pytest.skip(f'sample data set {name} is not in the data directory {data_dir()}: '
                             f"`lessonlib data get {name.removesuffix('_data')}` downloads it, or set LESSONLIB_DATA to a folder that has it")
    return p

@pytest.fixture(scope='module')
def planet(): return _need('planet_tiny')

def planet_block(path, size=128, **kw):
    return DataBlock(blocks=(ImageBlock, MultiCategoryBlock),
                     get_x=ColReader(0, pref=path/'train', suff='.jpg'), get_y=ColReader(1, label_delim=' '),
                     splitter=RandomSplitter(valid_pct=0.2, seed=42), item_tfms=Resize(size),
                     batch_tfms=aug_transforms(flip_vert=True, max_lighting=0.1, max_zoom=1.05, max_warp=0.), **kw)

def planet_label(r):
    "A module-level getter (picklable), as a student would write it."
    return r['tags'].split(' ')


def test_planet_lesson_pipeline(planet):
    df = pd.read_csv(planet/'labels.csv')
    dls = planet_block(planet).dataloaders(df, bs=64, device='cpu')
    trn_rows = dls.train_ds.items
    expected_vocab = sorted({t for r in trn_rows for t in r['tags'].split(' ')})
    assert dls.vocab == expected_vocab and dls.c == len(expected_vocab)
    assert isinstance(dls.loss_func(), BCEWithLogitsLossFlat) and dls.loss_func() is not dls.loss_func()
    assert (len(dls.train_ds), len(dls.valid_ds)) == (160, 40)
    assert (len(dls.train), len(dls.valid)) == (160 // 64, 1)
    xb, yb = dls.one_batch()
    assert xb.shape == (64, 3, 128, 128) and xb.dtype == torch.float32 and xb.device.type == 'cpu'
    assert yb.shape == (64, len(expected_vocab)) and set(yb.unique().tolist()) <= {0., 1.}
    # the one-hot target of a validation item matches its CSV row
    for i in range(5):
        x, y = dls.valid_ds[i]
        assert x.dtype == torch.uint8 and x.shape == (3, 128, 128)
        assert dls.decode_target(y) == sorted({t for t in dls.valid_ds.items[i]['tags'].split(' ') if t in dls.vocab})  # (one row repeats a tag)
    # validation batches are in order and unaugmented: the same twice
    v1, v2 = next(iter(dls.valid)), next(iter(dls.valid))
    assert torch.equal(v1[0], v2[0]) and v1[0].shape[0] == 40
    # show_batch: 3x3 grid, multi-label titles joined by ';'
    axs = dls.show_batch(rows=3, figsize=(9, 9))
    assert axs.shape == (3, 3) and any(';' in ax.get_title() for ax in axs.flat)
    # progressive resizing
    dls256 = dls.new(size=256)
    assert dls256.one_batch()[0].shape == (64, 3, 256, 256) and dls256.vocab == dls.vocab
    assert dls256.train_ds.items == dls.train_ds.items
    # test loader over file names, validation pipeline, (xb,) only
    files = [planet/'train'/f'{n}.jpg' for n in df.image_name[:5]]
    b = next(iter(dls.test_dl(files)))
    assert len(b) == 1 and b[0].shape == (5, 3, 128, 128)
    b2 = next(iter(dls.test_dl(df.iloc[:5])))
    assert torch.allclose(b[0], b2[0])


def test_planet_shortcut_from_csv(planet):
    dls = ImageDataLoaders.from_csv(planet, folder='train', suff='.jpg', label_delim=' ', seed=42,
                                    item_tfms=Resize(64), bs=32, device='cpu')
    assert isinstance(dls.loss_func(), BCEWithLogitsLossFlat) and dls.one_batch()[0].shape == (32, 3, 64, 64)


def test_train_shuffles_and_drops_last(planet):
    df = pd.read_csv(planet/'labels.csv')
    dls = DataBlock(blocks=(ImageBlock(stats=None), MultiCategoryBlock), get_x=ColReader(0, pref=planet/'train', suff='.jpg'),
                    get_y=ColReader(1, label_delim=' '), splitter=RandomSplitter(0.2, seed=0),
                    item_tfms=Resize(16)).dataloaders(df, bs=48, device='cpu')
    sizes = [len(b[0]) for b in dls.train]
    assert sizes == [48, 48, 48] and len(dls.train) == 3           # 160 items: the last 16 dropped
    assert [len(b[0]) for b in dls.valid] == [40]
    set_seed(1); e1 = torch.cat([b[1] for b in dls.train])
    set_seed(2); e2 = torch.cat([b[1] for b in dls.train])
    assert not torch.equal(e1, e2)


def test_num_workers_gives_same_batches(planet):
    df = pd.read_csv(planet/'labels.csv')
    blk = planet_block(planet, size=64)
    d0 = blk.dataloaders(df, bs=16, device='cpu', num_workers=0)
    d2 = blk.dataloaders(df, bs=16, device='cpu', num_workers=2)
    for (a, ya), (b, yb) in zip(d0.valid, d2.valid):
        assert torch.equal(a, b) and torch.equal(ya, yb)
    assert sum(len(b[0]) for b in d2.train) == len(d2.train) * 16


def test_new_empty_pickles_and_predicts(planet):
    df = pd.read_csv(planet/'labels.csv')
    dls = DataBlock(blocks=(ImageBlock, MultiCategoryBlock), get_x=ColReader(0, pref=planet/'train', suff='.jpg'),
                    get_y=planet_label, splitter=RandomSplitter(seed=0), item_tfms=Resize(64)).dataloaders(df, bs=16, device='cpu')
    empty = pickle.loads(pickle.dumps(dls.new_empty()))
    assert len(empty.train_ds) == 0 and empty.vocab == dls.vocab and isinstance(empty.loss_func(), BCEWithLogitsLossFlat)
    f = planet/'train'/f'{df.image_name[0]}.jpg'
    assert torch.allclose(next(iter(empty.test_dl([f])))[0], next(iter(dls.test_dl([f])))[0])
    lam = DataBlock(blocks=(ImageBlock, MultiCategoryBlock), get_x=ColReader(0, pref=planet/'train', suff='.jpg'),
                    get_y=lambda r: r['tags'].split(' '), item_tfms=Resize(64)).dataloaders(df, bs=16, device='cpu')
    with pytest.raises(DataError, match='cannot be pickled'): lam.new_empty()


def test_missing_image_names_row_and_path(planet):
    df = pd.read_csv(planet/'labels.csv')
    df.loc[7, 'image_name'] = 'train_does_not_exist'
    with pytest.raises(DataError) as e: planet_block(planet).dataloaders(df, bs=64, device='cpu')   # before any work
    msg = str(e.value)
    assert 'row 7 (index 7)' in msg and str(planet/'train'/'train_does_not_exist.jpg') in msg and 'no file' in msg
    with pytest.warns(UserWarning, match='left out'):
        dls = planet_block(planet, on_bad_item='skip').dataloaders(df, bs=64, device='cpu')
    assert 7 not in [r.pos for r in dls.train_ds.items + dls.valid_ds.items]


def test_truncated_and_non_images_name_the_file(planet, tmp_path):
    src = sorted((planet/'train').glob('*.jpg'))[0]
    bad = tmp_path/'broken.jpg'; bad.write_bytes(src.read_bytes()[:len(src.read_bytes()) // 3])
    txt = tmp_path/'text.jpg'; txt.write_text('hello')
    for f in (bad, txt):
        with pytest.raises(DataError, match=str(f)): open_image(f)
    dls = DataBlock(blocks=(ImageBlock, CategoryBlock), get_y=parent_label, splitter=RandomSplitter(0.0),
                    item_tfms=Resize(32)).dataloaders([bad, src], bs=1, device='cpu')
    with pytest.raises(DataError, match='broken.jpg'):
        [dls.train_ds[i] for i in range(2)]


def test_empty_label_cell_is_empty_label_set(planet, tmp_path):
    df = pd.read_csv(planet/'labels.csv').iloc[:20].copy()
    df.loc[3, 'tags'] = ''
    csv = tmp_path/'labels.csv'; df.to_csv(csv, index=False)
    df2 = pd.read_csv(csv)
    assert pd.isna(df2.tags[3])
    dls = planet_block(planet, size=32, ).dataloaders(df2, bs=4, device='cpu')
    ds = dls.train_ds if 3 in [r.pos for r in dls.train_ds.items] else dls.valid_ds
    _, y = ds[[r.pos for r in ds.items].index(3)]
    assert y.sum() == 0 and dls.decode_target(y) == []


def test_summary_names_step_item_and_shapes(planet):
    df = pd.read_csv(planet/'labels.csv')
    blk = DataBlock(blocks=(ImageBlock, MultiCategoryBlock), get_x=ColReader(0, pref=planet/'train', suff='.png'),
                    get_y=ColReader(1, label_delim=' '))
    with pytest.raises(DataError) as e: blk.summary(df)
    msg = str(e.value)
    assert "step 'check that the files exist'" in msg and 'have no file' in msg and '.png' in msg and 'row ' in msg


def test_summary_collate_error_lists_shapes():
    hym = _need('hymenoptera_data')
    blk = DataBlock(blocks=(ImageBlock, CategoryBlock), get_items=get_image_files, get_y=parent_label,
                    splitter=GrandparentSplitter(valid_name='val'))
    with pytest.raises(DataError) as e: blk.summary(hym, bs=8)
    msg = str(e.value)
    assert "step 'collate 8 items'" in msg and 'different shapes' in msg and 'Resize' in msg and 'encode: Tensor[3,' in msg


def test_hymenoptera_folders_and_draft_mode():
    hym = _need('hymenoptera_data')
    dls = DataBlock(blocks=(ImageBlock, CategoryBlock), get_items=get_image_files, get_y=parent_label,
                    splitter=GrandparentSplitter(valid_name='val'), item_tfms=Resize(128),
                    batch_tfms=aug_transforms(size=96, min_scale=0.75)).dataloaders(hym, bs=32, device='cpu')
    assert dls.vocab == ['ants', 'bees'] and (len(dls.train_ds), len(dls.valid_ds)) == (244, 153)
    assert dls.one_batch()[0].shape == (32, 3, 96, 96)              # presizing: 128 on the CPU, 96 after augmentation
    assert next(iter(dls.valid))[0].shape == (32, 3, 96, 96)
    files = get_image_files(hym/'train')
    big = [f for f in files if min(open_image(f).size) >= 256][:20]
    assert big, 'expected some images at least 256 px on the short side'
    for f in big[:5]:
        full, small = open_image(f).size, open_image(f, size=(128, 128)).size
        assert min(small) >= 128 and small[0] <= full[0] // 2 + 1   # decoded at 1/2 (or less), still ≥ the target
    t0 = time.perf_counter(); [open_image(f) for f in big]; t_full = time.perf_counter() - t0
    t0 = time.perf_counter(); [open_image(f, size=(128, 128)) for f in big]; t_draft = time.perf_counter() - t0
    print(f'full {t_full / len(big) * 1e3:.2f} ms, draft {t_draft / len(big) * 1e3:.2f} ms per image')


def test_mnist_tiny_folder_and_csv():
    mn = _need('mnist_tiny')
    dls = ImageDataLoaders.from_folder(mn, bs=64, device='cpu')
    assert dls.vocab == ['3', '7'] and isinstance(dls.loss_func(), CrossEntropyLossFlat)
    assert (len(dls.train_ds), len(dls.valid_ds)) == (709, 699) and len(dls.train) == 709 // 64
    xb, yb = dls.one_batch()
    assert xb.shape == (64, 3, 28, 28) and yb.dtype == torch.int64
    df = pd.read_csv(mn/'labels.csv')
    dls2 = DataBlock(blocks=(ImageBlock('L', stats=None), CategoryBlock), get_x=ColReader('name', pref=mn),
                     get_y=ColReader('label'), splitter=RandomSplitter(seed=0)).dataloaders(df, bs=16, device='cpu')
    assert dls2.vocab == [3, 7] and dls2.one_batch()[0].shape == (16, 1, 28, 28)
    assert dls2.decode_target(torch.tensor(1)) == 7
    lab = RegexLabeller(r'/(\d)/\d+\.png$', attr=None)
    assert lab(mn/'train'/'3'/'7463.png') == '3'


def _camvid_label(path, o): return path/'labels'/f'{o.stem}_P{o.suffix}'

def test_camvid_masks_move_with_images():
    cv = _need('camvid_tiny')
    codes = (cv/'codes.txt').read_text().split()
    dblock = DataBlock(blocks=(ImageBlock, MaskBlock(codes)), get_items=partial(get_image_files, folders='images'),
                       get_y=partial(_camvid_label, cv), splitter=FileSplitter(cv/'valid.txt'),
                       item_tfms=Resize((96, 128)), batch_tfms=aug_transforms(max_rotate=20., max_warp=0.2, p_affine=1.))
    dls = dblock.dataloaders(cv, bs=8, device='cpu')
    assert (len(dls.train_ds), len(dls.valid_ds)) == (85, 15) and dls.c == 32
    assert dls.loss_func().ignore_index == -100 and dls.loss_func().axis == 1           # no void given: all pixels count
    set_seed(0)
    xb, mb = dls.one_batch()
    assert xb.shape == (8, 3, 96, 128) and mb.shape == (8, 96, 128) and mb.dtype == torch.int64
    raw = torch.stack([dls.train_ds[i][1] for i in range(20)])
    assert set(mb.unique().tolist()) <= set(raw.unique().tolist()) | set(range(32))   # nearest: only real codes
    assert mb.min() >= 0 and mb.max() < 32
    _, vm = next(iter(dls.valid))
    assert torch.equal(vm[0], dls.valid_ds[0][1])                                    # validation: masks untouched
    pickle.loads(pickle.dumps(dls.new_empty()))                                      # partial of a module function pickles
    dls.show_batch(rows=2)


def test_random_resized_crop_on_real_images():
    hym = _need('hymenoptera_data')
    dls = DataBlock(blocks=(ImageBlock, CategoryBlock), get_items=get_image_files, get_y=parent_label,
                    splitter=GrandparentSplitter(valid_name='val'),
                    item_tfms=RandomResizedCrop(64, min_scale=0.5)).dataloaders(hym, bs=16, device='cpu')
    assert dls.one_batch()[0].shape == (16, 3, 64, 64)


def test_new_size_with_presizing_scales_item_size():
    hym = _need('hymenoptera_data')
    dls = DataBlock(blocks=(ImageBlock, CategoryBlock), get_items=get_image_files, get_y=parent_label,
                    splitter=GrandparentSplitter(valid_name='val'), item_tfms=Resize(128),
                    batch_tfms=aug_transforms(size=96)).dataloaders(hym, bs=8, device='cpu')
    d2 = dls.new(size=48)
    assert d2.dsets.item_tfms[0].size == (64, 64)                      # 128 * 48/96: the presizing margin is kept
    assert d2.one_batch()[0].shape == (8, 3, 48, 48) and next(iter(d2.valid))[0].shape == (8, 3, 48, 48)
    assert dls.one_batch()[0].shape == (8, 3, 96, 96)                  # the original is unchanged


def test_random_splitter_follows_set_seed():
    set_seed(3); a = RandomSplitter(0.3)(list(range(50)))
    set_seed(3); b = RandomSplitter(0.3)(list(range(50)))
    assert a == b and len(a[1]) == 15


def test_mask_lines_up_with_a_large_jpeg(tmp_path):
    "A big JPEG (which could be draft-decoded small) and its full-size mask must be cropped identically."
    import numpy as np
    from PIL import Image
    img = np.zeros((512, 512, 3), np.uint8); img[100:200, 300:400] = 255
    msk = np.zeros((512, 512), np.uint8); msk[100:200, 300:400] = 1
    Image.fromarray(img).save(tmp_path/'a.jpg', quality=95); Image.fromarray(msk).save(tmp_path/'a_P.png')
    Image.fromarray(img).save(tmp_path/'b.jpg', quality=95); Image.fromarray(msk).save(tmp_path/'b_P.png')
    dblock = DataBlock(blocks=(ImageBlock, MaskBlock(codes=['bg', 'box'])), get_items=lambda p: sorted(p.glob('*.jpg')),
                       get_y=lambda f: f.parent/f'{f.stem}_P.png', splitter=lambda items: ([0], [1]), item_tfms=Resize(64))
    x, m = dblock.datasets(tmp_path).valid[0]
    bright = x.float().mean(0) > 127
    assert m.sum() > 100, 'the mask lost its box'
    assert (bright == m.bool()).float().mean() > 0.98


def test_camvid_void_is_ignored_by_the_loss():
    cv = _need('camvid_tiny')
    codes = (cv/'codes.txt').read_text().split()
    dls = DataBlock(blocks=(ImageBlock, MaskBlock(codes, void='auto')), get_items=partial(get_image_files, folders='images'),
                    get_y=partial(_camvid_label, cv), splitter=FileSplitter(cv/'valid.txt'),
                    item_tfms=Resize((96, 128))).dataloaders(cv, bs=4, device='cpu')
    void = codes.index('Void')
    lf = dls.loss_func()
    assert lf.ignore_index == void == dls.valid_ds.dsets.blocks[1].void_code
    _, m = next(iter(dls.valid))
    assert (m == void).any(), 'expected some Void pixels in the first validation masks'
    torch.manual_seed(0)
    out = torch.randn(m.shape[0], 32, *m.shape[1:])
    keep = m != void                                                   # by hand: cross-entropy over non-void pixels only
    hand = torch.nn.functional.cross_entropy(out.permute(0, 2, 3, 1)[keep], m[keep])
    assert torch.allclose(lf(out, m), hand, atol=1e-6)
    assert pickle.loads(pickle.dumps(dls.new_empty())).loss_func().ignore_index == void


def _biwi_centre(path, f):
    return pd.read_csv(path/'centers.csv').set_index('file').loc[f.name, ['c0', 'c1']].to_numpy(dtype=float)

def test_biwi_points_are_normalised_once_and_follow_resize():
    bw = _need('biwi_sample')
    files = sorted((bw/'images').glob('*.jpg'), key=lambda f: int(f.stem))
    get_y = partial(_biwi_centre, bw)
    blocks = (ImageBlock, PointBlock(order='yx', n_points=1))
    same = DataBlock(blocks=blocks, get_y=get_y, splitter=lambda items: ([0, 1, 2], [3, 4, 5]),
                     item_tfms=Resize((120, 160))).dataloaders(files, bs=3, device='cpu')
    x, y = same.valid_ds[0]
    w, h = open_image(files[3]).size
    rc = get_y(files[3])                                                # (row, col) = (y, x) pixels
    assert (w, h) == (160, 120) and x.shape == (3, 120, 160)
    assert torch.allclose(y, points_to_norm([[rc[1], rc[0]]], w, h), atol=1e-6)
    assert isinstance(same.loss_func(), MSELossFlat) and same.c == 2
    # a centre crop to 96x96: the crop box is (20, 0, 140, 120) scaled by 0.8, by hand
    small = same.new(item_tfms=[Resize(96)])
    _, y2 = small.valid_ds[0]
    hand = torch.tensor([[(rc[1] + 0.5 - 20) * 0.8 - 0.5, (rc[0] + 0.5) * 0.8 - 0.5]], dtype=torch.float32)   # pixel centres, by hand
    assert torch.allclose(points_to_pixels(y2, 96, 96), hand, atol=1e-4)
    xb, yb = small.one_batch()
    assert xb.shape == (3, 3, 96, 96) and yb.shape == (3, 1, 2)
    same.show_batch(rows=1, cols=3)


class _SortedDL(TfmdDL):
    "Batches ordered longest first, as a text classifier's loader would."
    def __iter__(self):
        order = sorted(range(len(self.dataset)), key=lambda i: -len(self.dataset[i][0]))
        for k in range(0, len(order), self.bs):
            yield self.after_batch(self.dataset.collate([self.dataset[i] for i in order[k:k + self.bs]]))

class _SeqBlock(Block):
    dl_type = _SortedDL
    def collate(self, xs):
        n = max(len(x) for x in xs)
        return torch.stack([torch.nn.functional.pad(x, (0, n - len(x))) for x in xs])

def _first(o): return o[0]
def _second(o): return o[1]

def test_datablock_builds_the_loader_the_blocks_ask_for():
    items = [([1.] * n, 'ab'[n % 2]) for n in (4, 1, 6, 3, 5, 2, 8, 7)]
    dblock = DataBlock(blocks=(_SeqBlock, CategoryBlock), get_x=_first, get_y=_second,
                       splitter=lambda o: (list(range(4)), list(range(4, 8))))
    dls = dblock.dataloaders(items, bs=2, device='cpu')
    assert type(dls.train) is _SortedDL and type(dls.valid) is _SortedDL
    assert [b[0].shape[1] for b in dls.valid] == [8, 5]                  # lengths 5, 2, 8, 7 → (8, 7), (5, 2)
    assert type(pickle.loads(pickle.dumps(dls.new_empty())).train) is _SortedDL
    assert type(dls.test_dl(items[:2])) is _SortedDL
    assert type(dblock.dataloaders(items, bs=2, device='cpu', dl_type=TfmdDL).valid) is TfmdDL
