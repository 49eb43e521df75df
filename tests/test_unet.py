"Tests for lessonlib.vision.unet: sizes and errors, layer groups and freezing, offline weights, export round trip."
import numpy as np
import pytest
import torch
import torch.nn as nn

import lessonlib.vision.models as models
from lessonlib.core import set_seed
from lessonlib.data import DataBlock, FuncSplitter
from lessonlib.learner import load_learner
from lessonlib.optim import n_layer_groups
from lessonlib.vision.data import ImageBlock, MaskBlock
from lessonlib.vision.unet import DynamicUnet, create_unet_model, unet_learner, unet_split, layer_sizes
from lessonlib.vision.models import create_body

CODES = ['background', 'thing', 'Void']


def item(i):
    rng = np.random.default_rng(i)
    img = rng.integers(0, 255, (32, 64, 3), dtype=np.uint8)
    msk = (img[..., 0] > 128).astype(np.uint8)
    msk[:2] = 2                                          # a void band
    return img, msk


ITEMS = [item(i) for i in range(6)]
def get_x(i): return ITEMS[i][0]
def get_y(i): return ITEMS[i][1]
def is_valid(i): return i >= 4


@pytest.fixture(scope='module')
def dls():
    dblock = DataBlock(blocks=(ImageBlock, MaskBlock(CODES, void='auto')), get_x=get_x, get_y=get_y,
                       splitter=FuncSplitter(is_valid))
    return dblock.dataloaders(list(range(6)), bs=2, device='cpu')


@pytest.mark.parametrize('arch', ['resnet18', 'resnet34'])
def test_output_size_any_multiple_of_32(arch):
    model = create_unet_model(arch, 4, pretrained=False).eval()
    with torch.no_grad():
        for h, w in [(32, 32), (64, 160), (96, 128)]:
            assert model(torch.zeros(1, 3, h, w)).shape == (1, 4, h, w)
        for h, w in [(33, 64), (64, 100), (96, 120)]:
            with pytest.raises(ValueError, match=f'{h}×{w} \\(height × width\\) pixels.*multiples of 32'):
                model(torch.zeros(1, 3, h, w))


def test_resnet50_skips():
    "The bottleneck ResNets change size at the same children; their skips have 64, 256, 512, 1024 channels."
    sizes = layer_sizes(create_body('resnet50', pretrained=False))
    assert [sizes[i][1] for i in (2, 4, 5, 6)] == [64, 256, 512, 1024] and sizes[-1][1] == 2048


def test_any_sequential_encoder():
    "A non-ResNet encoder: the skips are found where the size changes; no extra upsampling when the first keeps it."
    enc = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 16, 3, 2, 1), nn.Conv2d(16, 32, 3, 2, 1))
    m = DynamicUnet(enc, 2).eval()
    assert m.stride == 4 and isinstance(m.upsample, nn.Identity) and len(m.blocks) == 2
    with torch.no_grad(): assert m(torch.zeros(1, 3, 12, 20)).shape == (1, 2, 12, 20)
    with pytest.raises(ValueError, match='needs an encoder that halves'):
        DynamicUnet(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1)), 2)


def test_groups_freeze_and_slice(dls):
    learn = unet_learner(dls, 'resnet18', pretrained=False, device='cpu')
    assert learn.model.head.out_channels == 3 and learn.loss_func.ignore_index == 2
    groups = unet_split(learn.model)
    assert sum(len(g) for g in groups) == len(list(learn.model.parameters()))
    learn.freeze()
    enc = learn.model.encoder
    assert not enc[4][0].conv1.weight.requires_grad and not enc[7][0].conv1.weight.requires_grad
    assert enc[4][0].bn1.weight.requires_grad                     # batch norms stay trainable
    assert all(p.requires_grad for p in groups[2])
    learn.unfreeze()
    learn.fit(1, slice(1e-6, 1e-4))
    assert n_layer_groups(learn.opt) == 3
    lrs = sorted({g['lr'] for g in learn.opt.param_groups})
    assert np.allclose(lrs, [1e-6, 1e-5, 1e-4])                   # one rate per layer group, spread geometrically


def test_export_round_trip(dls, tmp_path):
    set_seed(0)
    learn = unet_learner(dls, 'resnet18', pretrained=False, path=tmp_path, device='cpu')
    learn.get_preds()                                             # a forward pass: the hooks were used
    f = learn.export('unet.pkl')
    inf = load_learner(f, trust=['test_unet'])   # its getters live in this test module
    assert all(h.stored is None for h in inf.model.hooks)         # no activation saved in the file
    p1, p2 = learn.get_preds()[0], inf.get_preds(learn.dls.valid)[0]
    assert p1.shape == (2, 3, 32, 64) and torch.allclose(p1, p2, atol=1e-5)
    mask, _, probs = inf.predict(5)                                # item 5 (get_x gives its picture)
    assert mask.shape == (32, 64) and torch.equal(mask, probs.argmax(0))


def test_pretrained_offline_message(dls, tmp_path, monkeypatch):
    "No weights in the hub cache and no network: the error says where to put the file, or to pass pretrained=False."
    def no_network(url, path): raise OSError('network is unreachable')
    monkeypatch.setattr(models, 'download_weights', no_network)
    old = torch.hub.get_dir()
    torch.hub.set_dir(str(tmp_path))
    try:
        with pytest.raises(FileNotFoundError, match='pretrained=False') as e:
            unet_learner(dls, 'resnet18', pretrained=True)
    finally: torch.hub.set_dir(old)
    assert 'resnet18-f37072fd.pth' in str(e.value) and 'network is unreachable' in str(e.value)
