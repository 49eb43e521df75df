"The `lessonlib scratch` lesson: the built-in set end to end, the real samples, bad input, and the transfer-learning path."
import json, os, shutil, subprocess, sys, tempfile, warnings
import matplotlib
matplotlib.use('Agg')
from pathlib import Path

import pytest
import torch
import torchvision.models as tvm
from PIL import Image

from lessonlib.core import data_dir
from lessonlib.data import DataError
from lessonlib.synth.scratch import SHAPES, make_scratch
from lessonlib.vision.models import weights_path
from lessonlib.cli import main
from lessonlib.lessons.scratch import (ClassFolder, SimpleCNN, evaluate, folder_loaders, read_image_folder, run_scratch,
                                       run_transfer, scratch_summary, train_and_validate)

LESSONLIB = shutil.which('lessonlib') or str(Path(sys.executable).parent/'lessonlib')
# One thread: these models are tiny, and two threads on a busy 2-core machine spend their time waiting for each other.
ENV = {'MPLBACKEND': 'Agg', 'OMP_NUM_THREADS': '1'}


def run(*args, env=None, timeout=600):
    return subprocess.run([LESSONLIB, *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **ENV, **(env or {})})


def check_outputs(out: Path, extra=()) -> dict:
    for f in ('metrics.json', 'report.md', 'curves.png', 'confusion.png', 'predictions.png', 'best.pth', *extra):
        assert (out/f).stat().st_size > 0, f
    assert not list(out.rglob('*.part')), 'temporary files left behind'
    return json.loads((out/'metrics.json').read_text())


def use_hub(monkeypatch, torch_home: Path):
    "Point the torch hub cache at `torch_home/hub` for this test only (never the user's real cache)."
    monkeypatch.setenv('TORCH_HOME', str(torch_home))
    monkeypatch.setattr(torch.hub, '_hub_dir', str(torch_home/'hub'))

def fake_weights(arch='resnet18'):
    "Put randomly initialised weights where the (test's) torch hub cache keeps `arch`'s ImageNet weights."
    path = weights_path(arch)
    assert str(path).startswith(tempfile.gettempdir()), f'refusing to write fake weights outside a temporary folder: {path}'
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(tvm.get_model(arch, weights=None).state_dict(), path)
    return path


@pytest.fixture(autouse=True)
def one_thread():
    "Tiny models: one thread is as fast, and two on a busy 2-core machine mostly wait for each other."
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_builtin_end_to_end(tmp_path):
    "The default data (the built-in set) through the console script: outputs, counts, and it must really learn."
    r = run('scratch', '--epochs', '10', '--out', str(tmp_path/'out'), env={'LESSONLIB_DATA': str(tmp_path/'data')})
    assert r.returncode == 0, r.stderr[-3000:]
    m = check_outputs(tmp_path/'out')
    assert m['classes'] == list(SHAPES) and m['evaluated_on'] == 'test'
    assert m['images'] == {'train': 360, 'valid': 90, 'test': 90} and m['skipped_images'] == []
    assert sum(v['total'] for v in m['per_class'].values()) == 90               # every test image, partial batch included
    assert m['accuracy'] == pytest.approx(sum(v['correct'] for v in m['per_class'].values()) / 90)
    assert m['accuracy'] > m['accuracy_baseline_majority'] + 0.3, m['accuracy']   # it really learned
    assert m['baseline_class'] == 'circle' and len(m['history']) == m['epochs_run'] <= 10
    assert m['history'][m['best_epoch']]['valid_loss'] == min(h['valid_loss'] for h in m['history'])
    state = torch.load(tmp_path/'out'/'best.pth', weights_only=True)
    assert state['epoch'] == m['best_epoch'] and 'model' in state
    report = (tmp_path/'out'/'report.md').read_text()
    assert 'Accuracy on test' in report and 'circle: ' in report and 'Transfer learning' not in report
    assert 'test accuracy' in r.stdout and str((tmp_path/'out').resolve()) in r.stdout


def test_transfer_with_cached_weights(tmp_path, monkeypatch):
    "With weights in the torch hub cache (random ones here: no download), the frozen network and fine_tune both run."
    use_hub(monkeypatch, tmp_path/'torch')
    fake_weights()
    path = make_scratch(tmp_path/'shapes', n_train=32, n_val=9, n_test=10)
    m = run_scratch(str(path), epochs=1, size=16, bs=8, lr='valley', pretrained=True, tl_size=32, ft_epochs=1,
                    out=tmp_path/'out')
    check_outputs(tmp_path/'out', extra=('curves_frozen.png', 'confusion_frozen.png', 'best_frozen.pth', 'lr_find.png'))
    assert isinstance(m['lr'], float) and 1e-7 < m['lr'] < 10                    # an lr_find suggestion, by name
    t = m['transfer']
    assert t['arch'] == 'resnet18' and t['frozen']['epochs_run'] == 1 and t['fine_tune']['epochs'] == 2
    for part in (t['frozen'], t['fine_tune']):
        assert 0 <= part['accuracy'] <= 1 and sum(v['total'] for v in part['per_class'].values()) == 10
    report = (tmp_path/'out'/'report.md').read_text()
    assert 'resnet18 frozen, new last layer' in report and 'vision_learner + fine_tune' in report
    assert 'fine-tuned' in scratch_summary(m)


def test_missing_weights_skip_clearly(tmp_path, monkeypatch):
    "Without pretrained weights (and without downloading), the transfer part says why and returns no numbers."
    use_hub(monkeypatch, tmp_path/'empty')
    fd = read_image_folder(make_scratch(tmp_path/'shapes', n_train=12, n_val=6, n_test=3))
    res = run_transfer(fd, 'resnet18', size=32, epochs=1, out=tmp_path, download=False)
    assert set(res) == {'skipped'}
    assert 'not in the torch hub cache' in res['skipped'] and 'resnet18' in res['skipped']


def test_loop_restores_best_weights(tmp_path):
    "train_and_validate hands back the best epoch's model, the same as its checkpoint, whatever epoch it stopped at."
    fd = read_image_folder(make_scratch(tmp_path/'shapes', n_train=48, n_val=20, n_test=0))
    assert fd.eval_split == 'valid'
    loaders = folder_loaders(fd, size=16, bs=8)
    torch.manual_seed(0)
    model = SimpleCNN(3, 16, chans=(8, 16))
    fit = train_and_validate(model, loaders['train'], loaders['valid'], epochs=5, patience=2, lr=3e-2,
                             ckpt=tmp_path/'best.pth', log=None)
    best = min(range(fit['epochs_run']), key=lambda i: fit['history'][i]['valid_loss'])
    assert fit['best_epoch'] == best
    assert evaluate(model, loaders['valid'])[0] == pytest.approx(fit['history'][best]['valid_loss'], rel=1e-5)
    saved = torch.load(tmp_path/'best.pth', weights_only=True)['model']
    assert all(torch.equal(v.cpu(), saved[k]) for k, v in model.state_dict().items())


# ---------------------------------------------------------------- bad input
def tree(root: Path, files: dict) -> Path:
    for rel, data in files.items():
        (root/rel).parent.mkdir(parents=True, exist_ok=True)
        (root/rel).write_bytes(data)
    return root


@pytest.fixture(scope='module')
def png(tmp_path_factory):
    f = tmp_path_factory.mktemp('img')/'a.png'
    Image.new('RGB', (20, 20), (200, 30, 30)).save(f)
    return f.read_bytes()


def ok(png): return {'train/a/1.png': png, 'train/b/1.png': png, 'val/a/1.png': png, 'val/b/1.png': png}


def test_not_a_layout(tmp_path, png):
    with pytest.raises(DataError, match=r'no train/ and val/ \(or valid/\).*expected train/<class>/'):
        read_image_folder(tree(tmp_path, {'images/1.png': png}))
    with pytest.raises(DataError, match='is not a folder'): read_image_folder(tmp_path/'nowhere')


def test_empty_class_folder_named(tmp_path, png):
    (tmp_path/'train'/'c').mkdir(parents=True)
    with pytest.raises(DataError, match=f'{tmp_path/"train"/"c"} is empty'): read_image_folder(tree(tmp_path, ok(png)))


def test_class_in_val_not_in_train(tmp_path, png):
    with pytest.raises(DataError, match=r"class folder\(s\) \['d'\] that .*train does not have"):
        read_image_folder(tree(tmp_path, {**ok(png), 'val/d/1.png': png}))


def test_class_in_train_not_in_val_keeps_indices(tmp_path, png):
    "Warned about, and the validation images keep training's class numbers (a plain ImageFolder would renumber them)."
    root = tree(tmp_path, {**ok(png), 'train/c/1.png': png, 'val/c/1.png': png})
    shutil.rmtree(root/'val'/'a')
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter('always')
        fd = read_image_folder(root)
    assert any(f'{root/"val"/"a"} is missing' in str(m.message) for m in w)
    assert fd.counts()['valid'].tolist() == [0, 1, 1]
    assert ClassFolder(root/'val', fd.classes).targets == [1, 2]


def test_unreadable_image_skipped_and_named(tmp_path, png):
    root = tree(tmp_path, {**ok(png), 'train/a/2.jpg': b'\xff\xd8\xff truncated', 'val/b/x.webp': b''})
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter('always')
        fd = read_image_folder(root)
    assert sorted(f.name for f, _ in fd.skipped) == ['2.jpg', 'x.webp']
    msg = ' '.join(str(m.message) for m in w)
    assert str(root/'train'/'a'/'2.jpg') in msg and 'skipping 2 unreadable' in msg
    assert len(fd.files['train']) == 2 and len(ClassFolder(root/'train', fd.classes, [f for f, _ in fd.files['train']])) == 2


def test_only_unreadable_training_images(tmp_path, png):
    root = tree(tmp_path, {**ok(png), 'train/c/1.jpg': b'not an image'})
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        with pytest.raises(DataError, match=f'{root/"train"/"c"}: none of its images can be read'): read_image_folder(root)


def test_valid_folder_and_unlabelled_test(tmp_path, png):
    root = tree(tmp_path, {'train/a/1.png': png, 'train/b/1.png': png, 'valid/a/1.png': png, 'test/9.png': png})
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter('always')
        fd = read_image_folder(root)
    assert fd.splits['valid'].name == 'valid' and 'test' not in fd.files and len(fd.unlabelled) == 1
    assert fd.eval_split == 'valid' and any('no labels' in str(m.message) for m in w)


def test_cli_bad_folder_one_line(tmp_path, capsys):
    (tmp_path/'stuff').mkdir()
    assert main(['scratch', '--data', str(tmp_path), '--out', str(tmp_path/'out')]) == 1
    err = capsys.readouterr().err
    assert err.count('\n') == 1 and 'is not in the ImageFolder layout' in err and 'Traceback' not in err, err


@pytest.mark.parametrize('args, msg', [(['--lr', 'fast'], "'fast' is neither a number nor one of valley"),
                                       (['--patience', '0'], 'must be greater than 0'),
                                       (['--arch', 'vgg16'], "invalid choice: 'vgg16'")])
def test_cli_bad_options_one_line(args, msg, capsys):
    with pytest.raises(SystemExit) as e: main(['scratch', *args])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count('\n') == 1 and msg in err, err


# ---------------------------------------------------------------- real samples
@pytest.mark.skipif(not (data_dir()/'hymenoptera_data'/'train').is_dir(),
                    reason=f'hymenoptera_data is not in the data directory {data_dir()}: `lessonlib data get hymenoptera` downloads it, '
                           'or set LESSONLIB_DATA to a folder that has it')
def test_hymenoptera(tmp_path):
    "Ants and bees: train/ and val/, no test/: results on the validation set, with the majority baseline beside them."
    m = run_scratch('hymenoptera', epochs=1, out=tmp_path)
    check_outputs(tmp_path)
    assert m['classes'] == ['ants', 'bees'] and m['evaluated_on'] == 'valid'
    assert m['images'] == {'train': 244, 'valid': 153}
    assert {k: v['total'] for k, v in m['per_class'].items()} == {'ants': 70, 'bees': 83}
    assert m['baseline_class'] == 'ants' and m['accuracy_baseline_majority'] == pytest.approx(70 / 153)


@pytest.mark.skipif(not (data_dir()/'mnist_tiny'/'valid').is_dir(),
                    reason=f'mnist_tiny is not in the data directory {data_dir()}: `lessonlib data get mnist_tiny` downloads it, '
                           'or set LESSONLIB_DATA to a folder that has it')
def test_mnist_tiny_valid_folder_unlabelled_test(tmp_path):
    "Grey digits, a valid/ folder, and a test/ folder without class folders (unlabelled)."
    with pytest.warns(UserWarning, match='no class folders'):
        m = run_scratch('mnist_tiny', epochs=1, size=28, flip=False, out=tmp_path)
    check_outputs(tmp_path)
    assert m['classes'] == ['3', '7'] and m['evaluated_on'] == 'valid' and m['unlabelled_images'] == 20
    assert m['images'] == {'train': 709, 'valid': 699}
    assert m['accuracy'] > 0.8, m['accuracy']
