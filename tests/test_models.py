"Tests for lessonlib.vision.models: weights from the torch hub cache, the offline error, n_in, layer groups."
from types import SimpleNamespace
from urllib.error import URLError

import pytest
import torch
import torch.nn as nn
import torchvision.models as tvm

import lessonlib.vision.models as models
from lessonlib.vision.models import (create_vision_model, pretrained_state_dict, simple_cnn, vision_learner,
                                     vision_split, weights_path)


@pytest.fixture
def hub(tmp_path, monkeypatch):
    "A fresh, empty torch hub cache; any real download attempt fails at once."
    # monkeypatch torch.hub's own setting (set_dir's variable) so it goes back to "unset" afterwards: restoring with
    # set_dir(get_dir()) would pin the default folder and make later TORCH_HOME settings ineffective
    monkeypatch.setattr(torch.hub, '_hub_dir', str(tmp_path/'hub'))
    def no_network(*args, **kwargs): raise URLError('no network in tests')
    monkeypatch.setattr(torch.hub, 'download_url_to_file', no_network)
    yield tmp_path/'hub'


def _seed_cache(arch='resnet18'):
    "Save a randomly initialised state dict of `arch` in the hub cache under torchvision's file name."
    torch.manual_seed(1)
    sd = tvm.get_model(arch, weights=None).state_dict()
    path = weights_path(arch)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(sd, path)
    return sd, path


def test_weights_path_is_torchvision_file_in_hub_cache(hub):
    assert weights_path('resnet34') == hub/'checkpoints'/'resnet34-b627a593.pth'
    assert weights_path(tvm.resnet50).name == 'resnet50-0676ba61.pth'


def test_pretrained_weights_come_from_cache(hub):
    sd, path = _seed_cache('resnet18')
    assert path == hub/'checkpoints'/'resnet18-f37072fd.pth'
    ref = tvm.resnet18(); ref.load_state_dict(sd)
    ref_body = nn.Sequential(*list(ref.children())[:-2]).state_dict()
    body = create_vision_model('resnet18', n_out=4)[0].state_dict()
    assert list(body) == list(ref_body)
    for k in body: assert torch.equal(body[k], ref_body[k]), k


def test_missing_weights_offline_error(hub, monkeypatch):
    calls = []
    def fail(url, path): calls.append((url, path)); raise URLError('[Errno -2] Name or service not known')
    monkeypatch.setattr(models, 'download_weights', fail)
    with pytest.raises(FileNotFoundError) as e:
        create_vision_model(tvm.resnet34, n_out=2)
    msg = str(e.value)
    url = 'https://download.pytorch.org/models/resnet34-b627a593.pth'
    path = hub/'checkpoints'/'resnet34-b627a593.pth'
    assert calls == [(url, path)]
    for part in (url, str(path), 'pretrained=False', 'Name or service not known'): assert part in msg, part


def test_real_download_attempt_fails_fast(hub):
    "Through the real download_weights, with torch hub's downloader replaced by one that fails at once."
    with pytest.raises(FileNotFoundError, match='pretrained=False'): pretrained_state_dict('resnet18')


def test_download_puts_file_in_cache(hub, monkeypatch):
    sd = tvm.resnet18().state_dict()
    monkeypatch.setattr(models, 'download_weights', lambda url, path: torch.save(sd, path))
    weights_path('resnet18').parent.mkdir(parents=True)
    got = pretrained_state_dict('resnet18')
    assert all(torch.equal(got[k], sd[k]) for k in sd)


def test_weights_only_refuses_code(hub):
    path = weights_path('resnet18'); path.parent.mkdir(parents=True)
    torch.save({'conv1.weight': SimpleNamespace(a=1)}, path)  # not plain tensors: weights_only refuses it
    with pytest.raises(RuntimeError, match='delete it'): pretrained_state_dict('resnet18')


def test_four_bands_keep_rgb_filters(hub):
    sd, _ = _seed_cache('resnet18')
    conv = create_vision_model('resnet18', n_out=3, n_in=4)[0][0]
    w = sd['conv1.weight']
    assert conv.weight.shape == (64, 4, 7, 7)
    torch.testing.assert_close(conv.weight.detach(), torch.cat([w, w.mean(1, keepdim=True)], 1) * 0.75)


def test_vision_split_resnet_and_simple_cnn():
    for model in (create_vision_model('resnet18', 5, pretrained=False), simple_cnn(5)):
        groups = vision_split(model)
        assert len(groups) == 3
        flat = [id(p) for g in groups for p in g]
        assert sorted(flat) == sorted(id(p) for p in model.parameters())
        assert {id(p) for p in groups[2]} == {id(p) for p in model[1].parameters()}
    m = create_vision_model('resnet18', 5, pretrained=False)
    assert {id(p) for p in vision_split(m)[1]} == {id(p) for p in list(m[0][6].parameters()) + list(m[0][7].parameters())}


def test_vision_learner_frozen_when_pretrained(hub):
    _seed_cache('resnet18')
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 3, (8,))
    dl = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=4)
    dls = SimpleNamespace(train=dl, valid=dl, c=3)
    learn = vision_learner(dls, tvm.resnet18, loss_func=nn.CrossEntropyLoss(), device='cpu')
    body, head = learn.model
    assert head[-1].out_features == 3
    assert not body[6][0].conv1.weight.requires_grad
    assert all(p.requires_grad for p in head.parameters())
    assert learn.splitter is vision_split
