"""Reliability suite (issue 18): hostile archives, broken downloads, faults in training, unsafe exports.

Every hostile input is built here, in the test, and everything happens under pytest's tmp_path; nothing uses the
internet. Each archive attack is run twice: with Python's own tarfile 'data' filter, and without it (as on
Python 3.10.0-3.10.11, which `min_python` allows and which has no filter), to show our own checks are enough.
"""
import errno, io, json, os, pickle, random, re, tarfile, threading, warnings
from contextlib import contextmanager
from http.server import ThreadingHTTPServer, BaseHTTPRequestHandler
from pathlib import Path

import pytest
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

import lessonlib.download as download
from lessonlib.download import DownloadError, UnsafeArchiveError, download_url, safe_extract, untar_data
from lessonlib.callbacks import NonFiniteLossError, SaveModelCallback, EarlyStopper, nonfinite_weights
from lessonlib.core import set_seed
from lessonlib.data import DataLoaders
from lessonlib.learner import Learner, load_learner, UnsafeExportError, EXPORT_FORMAT
from lessonlib.loop import Callback, spirals
from lessonlib.metrics import accuracy


# ---------------------------------------------------------------- hostile archives

def sym(name, target):
    "A tar symlink entry."
    info = tarfile.TarInfo(name); info.type, info.linkname = tarfile.SYMTYPE, target
    return info

def hard(name, target):
    "A tar hard-link entry."
    info = tarfile.TarInfo(name); info.type, info.linkname = tarfile.LNKTYPE, target
    return info

def folder(name):
    "A tar directory entry."
    info = tarfile.TarInfo(name); info.type = tarfile.DIRTYPE
    return info

def write_tar(path, entries):
    "Write an uncompressed tar at `path`: (name, bytes) for files, or ready-made `TarInfo`s."
    with tarfile.open(path, 'w') as tf:
        for e in entries:
            if isinstance(e, tarfile.TarInfo): tf.addfile(e)
            else:
                info = tarfile.TarInfo(e[0]); info.size = len(e[1]); tf.addfile(info, io.BytesIO(e[1]))
    return path

def path_max_chain(dest: Path):
    "The CVE-2025-4517 archive: a symlink chain longer than PATH_MAX, then `escape` -> the parent of `dest`."
    steps = 'abcdefghijklmnop'
    comp = 'd' * ((os.pathconf(dest.parent, 'PC_PATH_MAX') - len(str(dest)) - 1) // (len(steps) + 1))
    entries, path = [], ''
    for s in steps:   # a/ -> ddd, ddd/b -> ddd, ...: realpath of a/b/c/.../p is nearly PATH_MAX long
        entries += [folder(os.path.join(path, comp)), sym(os.path.join(path, s), comp)]
        path = os.path.join(path, comp)
    linkpath = os.path.join(*steps, 'l' * 254)   # never expanded by realpath, nor anything after it
    entries += [sym(linkpath, os.path.join(*['..'] * len(steps))),
                sym('escape', os.path.join(linkpath, '..')),   # -> dest/.., outside
                hard('flaglink', 'escape/flag'),               # a hard link to the outside file...
                ('flaglink', b'overwritten'),                  # ...written through
                ('escape/newfile', b'new')]
    return entries

def hard_link_chain(dest: Path):
    "The same attack with each symlink of the chain made by a hard link to a symlink (tarfile copies it unchecked)."
    steps = 'abcdefghijklmnop'
    comp = 'd' * ((os.pathconf(dest.parent, 'PC_PATH_MAX') - len(str(dest)) - 1) // (len(steps) + 1))
    entries, path = [], ''
    for s in steps:
        entries += [folder(os.path.join(path, comp)), sym(os.path.join(path, '_' + s), comp),
                    hard(os.path.join(path, s), os.path.join(path, '_' + s))]
        path = os.path.join(path, comp)
    linkpath = os.path.join(*steps, 'l' * 254)
    entries += [sym(linkpath, os.path.join(*['..'] * len(steps))), sym('escape', os.path.join(linkpath, '..')),
                hard('flaglink', 'escape/flag'), ('flaglink', b'overwritten')]
    return entries

# Each variant: a function of the destination folder giving the archive's entries. `flag` is a file outside.
HOSTILE = {
    # CVE-2025-4517: the symlink chain defeats os.path.realpath in the 'data' filter (Python < 3.11.13).
    'path-max symlink chain': path_max_chain,
    # ...and the issue's 3.11.7 attack: the chain's symlinks made by hard links to symlinks, which name checks miss.
    'path-max chain of hard-linked symlinks': hard_link_chain,
    # A hard link to a symlink to a folder: tarfile links (or, failing that, copies) the symlink itself,
    # unchecked, so `h` becomes `h -> ..` at the top: a path inside that resolves outside.
    'hard link to symlinked dir': lambda d: [folder('a/b'), sym('a/b/s', '..'), hard('h', 'a/b/s'),
                                             hard('h2', 'h/../flag')],
    # Python 3.10.0-3.10.11 (no filter): `s -> .` is harmless, `l -> s/..` looks like `.` but is dest/..
    'dot chain s/.. + hard link': lambda d: [sym('s', '.'), sym('l', 's/..'), hard('h', 'l/flag'), ('h', b'overwritten')],
    'dot chain s/.. + file': lambda d: [sym('s', '.'), sym('l', 's/..'), ('l/newfile', b'new')],
    # Empty-named symlinks (CPython gh-149486): '' is the destination itself.
    'empty-named symlink': lambda d: [sym('', '..'), ('newfile', b'new')],
    'link to a link': lambda d: [sym('x', '.'), sym('y', 'x/../flag')],
    'symlink through later symlink': lambda d: [sym('y', 'x/../../flag'), sym('x', '.')],
    'absolute symlink': lambda d: [sym('abs', str(d.parent/'flag'))],
    'absolute hard link': lambda d: [hard('abs', str(d.parent/'flag'))],
    'hard link to a folder': lambda d: [folder('sub'), hard('h', 'sub')],
    'hard link forward': lambda d: [hard('h', 'f'), ('f', b'x')],
    'link name twice': lambda d: [('f', b'x'), hard('h', 'f'), ('h', b'overwritten')],
    'file through symlink': lambda d: [sym('up', '.'), ('up/../newfile', b'new')],
    'hard link through symlink': lambda d: [sym('up', '.'), ('f', b'x'), hard('h', 'up/f')],
}


@pytest.fixture(params=['data filter', 'no filter'])
def tar_filter(request, monkeypatch):
    "Run with Python's tarfile filter, and without it (as on Python 3.10.0-3.10.11)."
    if request.param == 'no filter': monkeypatch.delattr(tarfile, 'data_filter', raising=False)
    return request.param


def outside_state(root: Path, dest: Path):
    "Every path under `root` outside `dest` (with file contents), to prove nothing outside changed."
    return {str(p): (p.read_bytes() if p.is_file() and not p.is_symlink() else None)
            for p in root.rglob('*') if dest not in p.parents and p != dest}


@pytest.mark.parametrize('variant', list(HOSTILE))
def test_hostile_tar_is_refused_and_writes_nothing(tmp_path, variant, tar_filter):
    root = tmp_path/'x'; dest = root/'dest'; dest.mkdir(parents=True)
    (root/'flag').write_bytes(b'secret')
    arc = write_tar(tmp_path/'evil.tar', HOSTILE[variant](dest))
    before = outside_state(tmp_path, dest)
    with pytest.raises(UnsafeArchiveError, match='refusing'): safe_extract(arc, dest)
    assert list(dest.iterdir()) == []
    assert outside_state(tmp_path, dest) == before
    assert (root/'flag').read_bytes() == b'secret'


def test_plain_tarfile_really_escapes_on_this_python(tmp_path):
    "The oracle for the tests above: without our checks, the 3.10.0-3.10.11 variant writes outside."
    root = tmp_path/'x'; dest = root/'dest'; dest.mkdir(parents=True)
    (root/'flag').write_bytes(b'secret')
    with tarfile.open(write_tar(tmp_path/'evil.tar', HOSTILE['dot chain s/.. + hard link'](dest))) as tf:
        try: tf.extractall(dest, filter='fully_trusted')
        except TypeError: tf.extractall(dest)   # Python without filters
    assert (root/'flag').read_bytes() == b'overwritten'


def test_path_max_chain_fools_this_pythons_filter_or_is_patched(tmp_path):
    "Documents whether this Python's own 'data' filter is vulnerable (3.11.7 is): our checks do not rely on it."
    if not hasattr(tarfile, 'data_filter'): pytest.skip('no tarfile filter on this Python')
    root = tmp_path/'x'; dest = root/'dest'; dest.mkdir(parents=True)
    (root/'flag').write_bytes(b'secret')
    with tarfile.open(write_tar(tmp_path/'evil.tar', path_max_chain(dest))) as tf:
        try: tf.extractall(dest, filter='data')
        except (tarfile.FilterError, OSError): pytest.skip('this Python refuses the chain itself (patched)')
    assert (root/'flag').read_bytes() == b'overwritten' or (root/'newfile').exists()


def test_existing_symlink_in_destination_is_not_followed(tmp_path, tar_filter):
    dest = tmp_path/'dest'; dest.mkdir(); (tmp_path/'outside').mkdir()
    (dest/'data').symlink_to(tmp_path/'outside')
    arc = write_tar(tmp_path/'a.tar', [('data/x.txt', b'x')])
    with pytest.raises(UnsafeArchiveError, match='already a symlink'): safe_extract(arc, dest)
    assert list((tmp_path/'outside').iterdir()) == []


def test_destination_may_itself_be_a_symlink(tmp_path, tar_filter):
    "LESSONLIB_DATA is often a symlink: only links *inside* the destination matter."
    (tmp_path/'real').mkdir(); (tmp_path/'dest').symlink_to(tmp_path/'real')
    safe_extract(write_tar(tmp_path/'a.tar', [folder('./'), ('./x.txt', b'x')]), tmp_path/'dest')
    assert (tmp_path/'real'/'x.txt').read_bytes() == b'x'


def test_safe_links_still_extract(tmp_path, tar_filter):
    "Links that stay inside and go through no symlink are kept, whatever their order in the archive."
    arc = write_tar(tmp_path/'ok.tar', [
        sym('set/latest.csv', 'labels.csv'), ('set/labels.csv', b'a,b\n'), hard('set/copy.csv', 'set/labels.csv'),
        sym('set/images', 'train'), ('set/train/1.jpg', b'jpg'), sym('set/here', '.'), sym('set/up', '../set/train/1.jpg')])
    out = safe_extract(arc, tmp_path/'out')/'set'
    assert (out/'latest.csv').read_bytes() == (out/'copy.csv').read_bytes() == b'a,b\n'
    assert (out/'images'/'1.jpg').read_bytes() == b'jpg' and (out/'up').read_bytes() == b'jpg'
    assert os.readlink(out/'here') == '.' and (out/'copy.csv').stat().st_nlink == 2


def test_untar_data_refuses_cve_archive_and_keeps_nothing(tmp_path):
    dest = tmp_path/'data'
    arc = write_tar(tmp_path/'evil.tar', path_max_chain(dest/'.evil.tmp.extracting'))
    with serve({'/evil.tar': arc.read_bytes()}) as srv:
        with pytest.raises(UnsafeArchiveError, match='refusing'): untar_data(f'{srv.url}/evil.tar', dest=dest)
    assert sorted(p.name for p in dest.iterdir() if p.suffix != '.lock') == ['.downloads']   # the lock file stays
    assert list((dest/'.downloads').iterdir()) == []   # the hostile archive is deleted


# ---------------------------------------------------------------- downloads: size limits, disk full, bad headers

class Handler(BaseHTTPRequestHandler):
    "Serve `server.files`; `server.headers[path]` overrides or (with None) removes headers; Range supported."
    def log_message(self, *args): pass

    def do_GET(self):
        s = self.server
        s.log.append((self.path, self.headers.get('Range')))
        data = s.files.get(self.path)
        if data is None: self.send_error(404); return
        rng = self.headers.get('Range')
        start = int(re.match(r'bytes=(\d+)-', rng).group(1)) if rng else 0
        self.send_response(206 if start else 200)
        headers = {'Content-Length': str(len(data) - start), 'ETag': '"v1"'}
        if start: headers['Content-Range'] = f'bytes {start}-{len(data) - 1}/{len(data)}'
        headers.update(s.headers.get(self.path, {}))
        for k, v in headers.items():
            if v is not None: self.send_header(k, v)
        self.end_headers()
        cuts = s.cut.get(self.path)
        try: self.wfile.write(data[start:start + (cuts.pop(0) if cuts else len(data))])
        except (BrokenPipeError, ConnectionResetError): pass   # the client stopped reading: fine


@contextmanager
def serve(files):
    srv = ThreadingHTTPServer(('127.0.0.1', 0), Handler)
    srv.files, srv.headers, srv.cut, srv.log = dict(files), {}, {}, []
    srv.url = f'http://127.0.0.1:{srv.server_port}'
    threading.Thread(target=srv.serve_forever, args=(0.05,), daemon=True).start()
    try: yield srv
    finally: srv.shutdown(); srv.server_close()


@pytest.fixture(autouse=True)
def no_proxy(monkeypatch):
    for k in ('http_proxy', 'HTTP_PROXY', 'https_proxy', 'HTTPS_PROXY', 'all_proxy', 'ALL_PROXY'):
        monkeypatch.delenv(k, raising=False)


PAYLOAD = os.urandom(3 * 2**20 + 123)


def test_unknown_size_stops_at_max_size_and_deletes_part(tmp_path):
    with serve({'/f': PAYLOAD}) as srv:
        srv.headers['/f'] = {'Content-Length': None}
        with pytest.raises(DownloadError, match=r'kept sending past the limit; the size limit is 1,048,576 bytes \(the max_size you gave\)'):
            download_url(f'{srv.url}/f', tmp_path/'f', max_size=2**20, wait=0)
        assert len(srv.log) == 1   # not retried
    assert list(tmp_path.iterdir()) == []


def test_unknown_size_default_limit_is_the_free_space(tmp_path, monkeypatch):
    "A 16 MiB disk, simulated: the download stops before filling it, says so, and frees what it wrote."
    monkeypatch.setattr(download, '_free_space', lambda folder: 2 * 2**20)
    with serve({'/f': PAYLOAD}) as srv:
        srv.headers['/f'] = {'Content-Length': None}
        with pytest.raises(DownloadError, match='the free space in') as e:
            download_url(f'{srv.url}/f', tmp_path/'f', wait=0)
    assert 'internet' not in str(e.value) and 'deleted' in str(e.value)
    assert list(tmp_path.iterdir()) == []


def test_announced_size_over_limit_is_refused_before_writing(tmp_path):
    with serve({'/f': PAYLOAD}) as srv:
        with pytest.raises(DownloadError, match=f'it has {len(PAYLOAD):,} bytes'):
            download_url(f'{srv.url}/f', tmp_path/'f', max_size=2**20, wait=0)
    assert list(tmp_path.iterdir()) == []


def test_under_the_limit_unknown_size_downloads(tmp_path):
    with serve({'/f': PAYLOAD}) as srv:
        srv.headers['/f'] = {'Content-Length': None}
        assert download_url(f'{srv.url}/f', tmp_path/'f', max_size=len(PAYLOAD)).read_bytes() == PAYLOAD


class FullDisk(io.RawIOBase):
    "A file that takes `room` bytes, then fails like a full disk."
    def __init__(self, room): self.room = room
    def writable(self): return True
    def write(self, b):
        if len(b) > self.room: raise OSError(errno.ENOSPC, 'No space left on device')
        self.room -= len(b); return len(b)


def test_disk_full_is_not_blamed_on_the_network_and_not_retried(tmp_path, monkeypatch):
    real_open = open
    def fake_open(path, mode='r', *a, **k):
        if str(path).endswith('.part'): real_open(path, mode).close(); return FullDisk(2**20)
        return real_open(path, mode, *a, **k)
    monkeypatch.setattr(download, 'open', fake_open, raising=False)
    with serve({'/f': PAYLOAD}) as srv:
        with pytest.raises(DownloadError, match='No space left on device') as e:
            download_url(f'{srv.url}/f', tmp_path/'f', wait=0)
        assert len(srv.log) == 1
    assert 'internet' not in str(e.value)
    assert list(tmp_path.iterdir()) == []   # the partial file and its resume information are deleted


@pytest.mark.parametrize('headers, msg', [
    ({'Content-Length': 'abc'}, "malformed Content-Length header ('abc')"),
    ({'Content-Length': '-5'}, 'malformed Content-Length'),
    ({'Content-Length': '1e6'}, 'malformed Content-Length'),
])
def test_malformed_content_length(tmp_path, headers, msg):
    with serve({'/f': PAYLOAD}) as srv:
        srv.headers['/f'] = headers
        with pytest.raises(DownloadError, match=re.escape(msg)): download_url(f'{srv.url}/f', tmp_path/'f', wait=0)


@pytest.mark.parametrize('value', ['bytes garbage', 'bytes 10-5/100', 'items 0-1/2', '', 'bytes -5/100'])
def test_malformed_content_range_on_resume(tmp_path, value):
    with serve({'/f': PAYLOAD}) as srv:
        (tmp_path/'f.part').write_bytes(PAYLOAD[:1000])    # a download cut short before; the resumed (206) answer
        (tmp_path/'f.part.json').write_text(json.dumps({'url': f'{srv.url}/f', 'validator': '"v1"'}))  # is broken
        srv.headers['/f'] = {'Content-Range': value}
        with pytest.raises(DownloadError, match='malformed Content-Range'):
            download_url(f'{srv.url}/f', tmp_path/'f', wait=0)


def test_malformed_content_range_on_a_full_answer_is_ignored(tmp_path):
    "A 200 answer is the whole file: its Content-Range, whatever it says, does not matter."
    with serve({'/f': PAYLOAD}) as srv:
        srv.headers['/f'] = {'Content-Range': 'nonsense'}
        assert download_url(f'{srv.url}/f', tmp_path/'f').read_bytes() == PAYLOAD


# ---------------------------------------------------------------- training faults


def spiral_dls(bs=64):
    x, y = spirals(seed=0)
    idx = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    return DataLoaders(DataLoader(TensorDataset(x[idx[:768]], y[idx[:768]]), batch_size=bs, shuffle=True),
                       DataLoader(TensorDataset(x[idx[768:]], y[idx[768:]]), batch_size=256))

def mlp(): return nn.Sequential(nn.Linear(2, 32), nn.ReLU(), nn.Linear(32, 3))


class BadLoss:
    "Cross-entropy that turns into `value` on call number `at` (counting training and validation calls)."
    def __init__(self, at, value): self.at, self.value, self.n = at, value, 0
    def __call__(self, preds, targ):
        self.n += 1
        loss = F.cross_entropy(preds, targ)
        return loss * self.value if self.n == self.at else loss


class KeepAfterStep(Callback):
    order = 100
    def after_step(self, learn): self.state = {k: v.clone() for k, v in learn.model.state_dict().items()}


@pytest.mark.parametrize('value', [float('nan'), float('inf'), -float('inf')])
def test_nonfinite_loss_stops_the_fit_and_says_where(tmp_path, value):
    set_seed(0)
    dls = spiral_dls()   # 12 training batches and 1 validation batch per epoch: call 16 is epoch 1, batch 3
    keep = KeepAfterStep()
    learn = Learner(dls, mlp(), loss_func=BadLoss(16, value), metrics=accuracy, path=tmp_path, cbs=[keep])
    with pytest.raises(NonFiniteLossError, match=r'at epoch 1 \(numbered as in the table\), batch 3 of 12, learning rate 0.01'):
        learn.fit(3, lr=0.01)
    for k, v in learn.model.state_dict().items(): assert torch.equal(v, keep.state[k]), k   # no step with the bad loss
    assert len(learn.recorder.values) == 1 and len(learn.recorder.losses) == 12 + 2   # the table holds what finished
    assert learn.training is False and learn.validate()['valid_loss'] is not None       # still usable
    learn.fit(1, lr=0.01)
    assert len(learn.recorder.values) == 1 and nonfinite_weights(learn.model) == []


def test_diverging_learning_rate_stops_and_nothing_broken_is_written(tmp_path):
    set_seed(0)
    learn = Learner(spiral_dls(), mlp(), loss_func=F.cross_entropy, opt_func=torch.optim.SGD, path=tmp_path,
                    cbs=[SaveModelCallback(fname='best', every_epoch=True)])
    with pytest.raises(NonFiniteLossError, match='learning rate 1e\\+30'): learn.fit(5, lr=1e30)
    if nonfinite_weights(learn.model):   # the step before the bad loss overflowed the weights: they are refused
        with pytest.raises(ValueError, match='hold NaN or infinite'): learn.export('model.pkl')
        with pytest.raises(ValueError, match='hold NaN or infinite'): learn.save('broken')
    assert not list(tmp_path.glob('*.pkl')) and not (tmp_path/'models'/'broken.pth').exists()


class BreakWeightsAfterValidation(Callback):
    "After validating epoch `epoch` (whose loss is good), put a NaN in the weights before the trackers look."
    order = 65
    def __init__(self, epoch): self.epoch = epoch
    def after_epoch(self, learn):
        if learn.epoch == self.epoch:
            with torch.no_grad(): learn.model[0].weight[0, 0] = float('nan')


def test_checkpoints_never_keep_nan_weights_as_best(tmp_path):
    set_seed(0)
    learn = Learner(spiral_dls(), mlp(), loss_func=F.cross_entropy, path=tmp_path)
    save, stop = SaveModelCallback(fname='best'), EarlyStopper(patience=None, fname=tmp_path/'es.pth')
    learn.fit(3, lr=0.01, cbs=[BreakWeightsAfterValidation(2), save, stop])
    assert save.best_epoch != 2 and stop.best_epoch != 2
    assert nonfinite_weights(learn.model) == []                     # the best (good) weights were loaded back
    for f in (tmp_path/'models'/'best.pth', tmp_path/'es.pth'):
        state = torch.load(f, weights_only=True)['model']
        assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())


class Interrupt(Callback):
    order = 100
    def __init__(self, training, at): self.training, self.at = training, at
    def after_batch(self, learn):
        if learn.training == self.training and learn.iter == self.at: raise KeyboardInterrupt


@pytest.mark.parametrize('training', [True, False])
def test_ctrl_c_leaves_the_learner_usable(tmp_path, training):
    set_seed(0)
    learn = Learner(spiral_dls(), mlp(), loss_func=F.cross_entropy, metrics=accuracy, path=tmp_path)
    learn.fit(1, lr=0.01)
    n_cbs = len(learn.cbs)
    with pytest.raises(KeyboardInterrupt): learn.fit(2, lr=0.01, cbs=Interrupt(training, 2 if training else 0))
    rec = learn.recorder
    assert len(rec.values) == 0 and len(rec.losses) == (3 if training else 12) and len(rec.lrs) == len(rec.losses)
    assert (learn.training, learn.predicting, learn.model.training, len(learn.cbs)) == (False, False, False, n_cbs)
    v = learn.validate()
    assert set(v) == {'valid_loss', 'accuracy'} and all(np.isfinite(list(v.values())))
    learn.fit(1, lr=0.01)
    assert len(rec.values) == 1 and rec.values[0]['accuracy'] is not None


def test_save_failing_half_way_keeps_the_previous_file(tmp_path, monkeypatch):
    learn = Learner(spiral_dls(), mlp(), loss_func=F.cross_entropy, path=tmp_path)
    good = learn.save('m')
    before = good.read_bytes()
    def full_disk(obj, f, *a, **k):
        Path(f).write_bytes(b'half a file'); raise OSError(errno.ENOSPC, 'No space left on device')
    monkeypatch.setattr(torch, 'save', full_disk)
    with torch.no_grad(): learn.model[0].bias.add_(1)
    with pytest.raises(OSError, match='No space left'): learn.save('m')
    with pytest.raises(OSError, match='No space left'): learn.export('m.pkl')
    assert good.read_bytes() == before
    assert sorted(p.name for p in tmp_path.rglob('*') if p.is_file()) == ['m.pth']


# ---------------------------------------------------------------- exports: nothing in a file runs

class Payload:
    "Unpickling this writes the file `marker`: the classic way to hide code in a model file."
    def __init__(self, marker): self.marker = marker
    def __reduce__(self): return (Path.write_text, (self.marker, 'code ran'))


@pytest.mark.parametrize('how', ['torch.save', 'pickle', 'inside a safe-looking export'])
def test_hostile_pickle_runs_nothing(tmp_path, how):
    marker, f = tmp_path/'pwned.txt', tmp_path/'model.pkl'
    if how == 'torch.save': torch.save({'model': Payload(marker)}, f)
    elif how == 'pickle': f.write_bytes(pickle.dumps({'model': Payload(marker)}))
    else: torch.save({'format': EXPORT_FORMAT, 'description': '{}', 'tensors': {'t0': Payload(marker)}}, f)
    with pytest.raises(UnsafeExportError, match='unsafe=True'): load_learner(f)
    assert not marker.exists()


def forged(tmp_path, node):
    f = tmp_path/'forged.pkl'
    text = json.dumps({'format': EXPORT_FORMAT, 'learner': node})
    torch.save({'format': EXPORT_FORMAT, 'description': text, 'tensors': {}}, f)
    return f

@pytest.mark.parametrize('node', [
    {'t': 'func', 'v': 'os:system'}, {'t': 'func', 'v': 'builtins:eval'}, {'t': 'func', 'v': 'builtins:exec'},
    {'t': 'type', 'v': 'subprocess:Popen'}, {'t': 'obj', 'id': 0, 'cls': 'pathlib:PosixPath', 'v': {}},
    {'t': 'obj', 'id': 0, 'cls': 'torch.optim:SGD', 'v': {}},                       # a class we may name, not create
    {'t': 'func', 'v': 'torch:load'}, {'t': 'func', 'v': 'torch.hub:load'},
    {'t': 'func', 'v': 'lessonlib.download:untar_data'}, {'t': 'func', 'v': 'lessonlib.core:save_atomic'},
    {'t': 'func', 'v': 'lessonlib.kaggle:kaggle_download'}, {'t': 'func', 'v': 'lessonlib.lessons.planet:run_planet'},
    {'t': 'func', 'v': 'lessonlib.data:os.system'}, {'t': 'func', 'v': 'lessonlib.vision.models:torch.hub.load'},
    {'t': 'func', 'v': 'lessonlib.data:DataBlock.__init__.__globals__'}, {'t': 'func', 'v': 'lessonlib..data:x'},
    {'t': 'obj', 'id': 0, 'cls': 'lessonlib.data:DataLoaders', 'v': {'__class__': {'t': 'type', 'v': 'subprocess:Popen'}}},
    {'t': 'dtype', 'v': '__class__'}, {'t': 'weird', 'v': 1},
])
def test_forged_descriptions_are_refused(tmp_path, node):
    with pytest.raises(UnsafeExportError): load_learner(forged(tmp_path, node))


def test_old_pickle_export_needs_unsafe_and_warns(tmp_path):
    learn = Learner(spiral_dls(), mlp(), loss_func=F.cross_entropy, path=tmp_path)
    old = tmp_path/'old.pkl'
    torch.save({'model': learn.model, 'dls': None, 'loss_func': F.cross_entropy, 'metrics': [], 'splitter': learn.splitter,
                'lr': 1e-3, 'wd': 0.01, 'opt_func': learn.opt_func}, old)
    with pytest.raises(UnsafeExportError, match='unsafe=True'): load_learner(old)
    with pytest.warns(UserWarning, match='runs any code'): inf = load_learner(old, unsafe=True)
    assert torch.equal(inf.model[0].weight, learn.model[0].weight)


def test_damaged_or_wrong_file_gives_clear_error(tmp_path):
    learn = Learner(spiral_dls(), mlp(), loss_func=F.cross_entropy, path=tmp_path)
    f = learn.export('e.pkl')
    (tmp_path/'cut.pkl').write_bytes(f.read_bytes()[:1000])
    with pytest.raises(ValueError, match='damaged or is not an exported learner'): load_learner(tmp_path/'cut.pkl')
    with pytest.raises(ValueError, match='checkpoint from learn.save'): load_learner(learn.save('ck'))


def own_label(i): return 'even' if i % 2 == 0 else 'odd'
def own_image(i): return np.full((8, 8, 3), 20 * i, np.uint8)
def own_valid(i): return i >= 8


def test_own_functions_need_trust(tmp_path):
    from lessonlib.data import DataBlock, CategoryBlock, FuncSplitter
    from lessonlib.vision.data import ImageBlock
    dls = DataBlock(blocks=(ImageBlock, CategoryBlock), get_x=own_image, get_y=own_label,
                    splitter=FuncSplitter(own_valid)).dataloaders(list(range(10)), bs=4, device='cpu')
    learn = Learner(dls, nn.Sequential(nn.Flatten(), nn.Linear(192, 2)), path=tmp_path, device='cpu')
    f = learn.export()
    with pytest.raises(UnsafeExportError, match=r"'test_reliability:own_image'.*trust"): load_learner(f)
    inf = load_learner(f, trust=['test_reliability'])
    assert inf.predict(3)[0] == learn.predict(3)[0] and torch.equal(inf.predict(3)[2], learn.predict(3)[2])
    learn.dls.train.dataset.dsets.getters[0] = lambda i: own_image(i)
    with pytest.raises(Exception, match='lambda'): learn.export('lambda.pkl')   # new_empty or the export refuses it
    assert not (tmp_path/'lambda.pkl').exists()


def check_round_trip(learn, items):
    "Export, load on the CPU, and compare predictions on `items` with the original's."
    f = learn.export('model.pkl')
    saved = torch.load(f, weights_only=True)                       # plain tensors and one JSON string
    assert sorted(saved) == ['description', 'format', 'tensors'] and isinstance(json.loads(saved['description']), dict)
    inf = load_learner(f)
    for it in items:
        a, b = learn.predict(it), inf.predict(it)
        assert torch.equal(torch.as_tensor(a[1]), torch.as_tensor(b[1])), it
        torch.testing.assert_close(a[2], b[2], atol=1e-5, rtol=1e-5)
    return inf


def test_round_trip_headpose_point_model(tmp_path):
    from lessonlib.synth.headpose import make_headpose
    from lessonlib.lessons.headpose import biwi_table, headpose_dls, headpose_learner
    set_seed(0)
    path = make_headpose(tmp_path/'biwi', n_people=13, frames=2)
    dls = headpose_dls(biwi_table(path), size=32, bs=8)
    learn = headpose_learner(dls, 'resnet18', pretrained=False, path=tmp_path)
    check_round_trip(learn, sorted(path.glob('*/frame_*_rgb.jpg'))[:2])


def test_round_trip_camvid_unet_with_hooks(tmp_path):
    from lessonlib.synth.camvid import make_camvid
    from lessonlib.lessons.camvid import camvid_dls, camvid_learner
    set_seed(0)
    path = make_camvid(tmp_path/'camvid', n=8, size=(32, 32))
    dls = camvid_dls(path, (32, 32), bs=4)
    learn = camvid_learner(dls, 'resnet18', pretrained=False, path=tmp_path)
    learn.get_preds()
    inf = check_round_trip(learn, sorted((path/'images').iterdir())[:2])
    assert all(h.stored is None for h in inf.model.hooks)


def test_notebook_functions_are_named_by_their_library_twin(tmp_path, monkeypatch):
    "A function a lesson notebook defines (module `__main__`) that nbdev exported to lessonlib is named by that module."
    import sys, types
    from lessonlib.data import parent_label
    from lessonlib.learner import _name_of
    twin = types.FunctionType(parent_label.__code__, {}, 'parent_label')
    twin.__module__, twin.__qualname__ = '__main__', 'parent_label'
    assert _name_of(twin, 'get_y') == 'lessonlib.data:parent_label'
    other = types.FunctionType((lambda o: 'x').__code__, {}, 'parent_label')   # same name, other code: no twin
    other.__module__, other.__qualname__ = '__main__', 'parent_label'
    assert _name_of(other, 'get_y') == '__main__:parent_label'
    monkeypatch.setattr(sys.modules['__main__'], 'parent_label', other, raising=False)
    f = forged(tmp_path, {'t': 'func', 'v': '__main__:parent_label'})
    with pytest.raises(UnsafeExportError, match='trust'): load_learner(f)
    with pytest.raises(UnsafeExportError, match='does not describe a learner'): load_learner(f, trust=['__main__'])


def test_disk_full_during_save_says_so_in_words(tmp_path, monkeypatch):
    "torch's own message for a full disk is '[enforce fail at inline_container.cc:672] . unexpected pos'."
    learn = Learner(spiral_dls(), mlp(), loss_func=F.cross_entropy, path=tmp_path)
    good = learn.save('m')
    def full(obj, f, *a, **k):
        Path(f).write_bytes(b'PK half'); raise RuntimeError('[enforce fail at inline_container.cc:672] . unexpected pos 8640')
    monkeypatch.setattr(torch, 'save', full)
    for write in (lambda: learn.save('m'), lambda: learn.export('e.pkl')):
        with pytest.raises(OSError, match=r'Could not write .*(m\.pth|e\.pkl).*Is the disk full.*intact'): write()
    assert torch.load(good, weights_only=True)['model'].keys() == learn.model.state_dict().keys()
    assert sorted(p.name for p in tmp_path.rglob('*') if p.is_file()) == ['m.pth']


def test_truncated_or_foreign_checkpoint_is_named(tmp_path):
    learn = Learner(spiral_dls(), mlp(), loss_func=F.cross_entropy, path=tmp_path)
    f = learn.save('m')
    f.write_bytes(f.read_bytes()[:300])
    with pytest.raises(ValueError, match=r'm\.pth is damaged \(cut short'): learn.load('m')
    marker = tmp_path/'pwned.txt'
    torch.save({'model': Payload(marker)}, f)
    with pytest.raises(UnsafeExportError, match='could run code'): learn.load('m')
    assert not marker.exists()
    learn.export('models/e.pth')
    with pytest.raises(ValueError, match='not a checkpoint written by learn.save'): learn.load('e')


# ---------------------------------------------------------------- random hostile archives (a seeded fuzz, no new dependency)


def random_archive(rng: random.Random) -> list:
    "A random list of tar entries from a small alphabet of names and link targets, many of them hostile."
    names = ['a', 'b', 's', 'l', 'd' * 200, '.', '..', '']
    def path(k): return '/'.join(rng.choice(names) for _ in range(k)) or 'x'
    entries = []
    for _ in range(rng.randint(1, 7)):
        kind, name = rng.random(), path(rng.randint(1, 3))
        target = rng.choice(['', '/', '../' * rng.randint(1, 3)]) + path(rng.randint(1, 4))
        if kind < 0.3: entries.append((name, b'data'))
        elif kind < 0.45: entries.append(folder(name))
        elif kind < 0.8: entries.append(sym(name, target))
        else: entries.append(hard(name, target))
    return entries


@pytest.mark.parametrize('seed', range(4))
def test_random_archives_never_write_outside(tmp_path, seed, tar_filter):
    rng = random.Random(seed)
    outcomes = {'extracted': 0, 'refused': 0, 'other error': 0}
    for i in range(100):
        box = tmp_path/f'{i}'                          # deep enough that no '..' chain of the alphabet climbs out of it
        root = box.joinpath(*'12345678'); dest = root/'dest'; dest.mkdir(parents=True)
        (root/'flag').write_bytes(b'secret')
        arc = write_tar(box/'evil.tar', random_archive(rng))
        before = outside_state(box, dest)
        try: safe_extract(arc, dest); outcomes['extracted'] += 1
        except UnsafeArchiveError: outcomes['refused'] += 1
        except (download.ArchiveError, OSError): outcomes['other error'] += 1
        assert outside_state(box, dest) == before, (i, tarfile.open(arc).getnames())
        for p in dest.rglob('*'):   # whatever was written resolves inside the destination
            assert dest.resolve() in p.resolve().parents or p.resolve() == dest.resolve(), (i, p)
    assert outcomes['refused'] > 0 and outcomes['extracted'] > 0, outcomes
    print(outcomes)
