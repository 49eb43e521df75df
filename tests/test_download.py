"""Tests for lessonlib.download: downloads against local HTTP servers, malicious archives.

Nothing here uses the internet or the real ~/.lessonlib: every test gets its own HOME and LESSONLIB_DATA under
pytest's tmp_path. The server, the archive builders and the `isolated` fixture are shared with tests/test_kaggle.py
and tests/test_datasets.py, which import them from here.
"""
import base64, hashlib, io, json, os, struct, tarfile, threading, zipfile, zlib, re
from contextlib import contextmanager
from http.server import ThreadingHTTPServer, BaseHTTPRequestHandler
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import py7zr

from lessonlib.download import (DownloadError, ArchiveError, UnsafeArchiveError, download_url, untar_data,
                                safe_extract)

SHARED = Path(__file__).resolve().parents[1].parent/'shared'/'data'
PROXY_VARS = ('http_proxy', 'HTTP_PROXY', 'https_proxy', 'HTTPS_PROXY', 'no_proxy', 'NO_PROXY', 'all_proxy', 'ALL_PROXY')


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    "A private HOME and data folder, no Kaggle credentials, no proxies."
    (tmp_path/'home').mkdir()
    monkeypatch.setenv('HOME', str(tmp_path/'home'))
    monkeypatch.setenv('LESSONLIB_DATA', str(tmp_path/'data'))
    for k in ('KAGGLE_USERNAME', 'KAGGLE_KEY', 'KAGGLE_CONFIG_DIR', 'KAGGLE_API_TOKEN', 'KAGGLE_API_ENVIRONMENT') + PROXY_VARS:
        monkeypatch.delenv(k, raising=False)
    return tmp_path


def snapshot(root):
    "Every path under `root`."
    return {str(p) for p in Path(root).rglob('*')}


# ---------------------------------------------------------------- a local file server (and fake Kaggle API)

class Handler(BaseHTTPRequestHandler):
    def log_message(self, *args): pass

    def send_bytes(self, data, status=200, extra=()):
        self.send_response(status)
        self.send_header('Content-Length', str(len(data)))
        for k, v in extra: self.send_header(k, v)
        self.end_headers()

    def do_GET(self):
        s, path = self.server, urlsplit(self.path).path
        s.log.append(('GET', path, self.headers.get('Range'), self.headers.get('If-Range')))
        data = s.files.get(path)
        if data is None: self.send_error(404); return
        start, rng = 0, self.headers.get('Range')
        if rng and s.ranges and self.headers.get('If-Range', s.etag) == s.etag:
            start = int(re.match(r'bytes=(\d+)-', rng).group(1))
        extra = [('ETag', s.etag), ('Accept-Ranges', 'bytes' if s.ranges else 'none')]
        if start: extra.append(('Content-Range', f'bytes {start}-{len(data) - 1}/{len(data)}'))
        self.send_response(206 if start else 200)
        self.send_header('Content-Length', str(len(data) - start))
        for k, v in extra: self.send_header(k, v)
        self.end_headers()
        cuts = s.cut.get(path)
        n = cuts.pop(0) if cuts else len(data)
        self.wfile.write(data[start:start + n])   # then HTTP/1.0 closes the connection: a short body

    def do_POST(self):   # the Kaggle API: POST /api/v1/competitions.CompetitionApiService/<method>
        s, path = self.server, urlsplit(self.path).path
        body = json.loads(self.rfile.read(int(self.headers.get('Content-Length', 0))) or b'{}')
        s.log.append(('POST', path, self.headers.get('Authorization'), body))
        def error(code, msg):
            data = json.dumps({'code': code, 'message': msg}).encode()
            self.send_bytes(data, code, [('Content-Type', 'application/json')]); self.wfile.write(data)
        if self.headers.get('Authorization') != 'Basic ' + base64.b64encode(s.kaggle_auth.encode()).decode():
            return error(401, 'Unauthenticated')
        comp = body.get('competitionName')
        if comp in s.kaggle_forbidden: return error(403, 'You must accept the rules')
        name = s.kaggle_names.get(body.get('fileName', '*'))
        if name is None: return error(404, 'Not found')
        if s.kaggle_redirect:   # like Kaggle: a redirect to a storage URL
            self.send_bytes(b'', 302, [('Location', f'http://localhost/storage/{name}?sig=abc')])
        else:
            data = s.files[f'/storage/{name}']
            self.send_bytes(data, 200)
            cuts = s.cut.get(f'/storage/{name}')
            self.wfile.write(data[:cuts.pop(0) if cuts else len(data)])


@contextmanager
def serve(files=None, ranges=True, etag='"v1"'):
    srv = ThreadingHTTPServer(('127.0.0.1', 0), Handler)
    srv.files, srv.ranges, srv.etag, srv.cut, srv.log = dict(files or {}), ranges, etag, {}, []
    srv.kaggle_auth, srv.kaggle_forbidden, srv.kaggle_names, srv.kaggle_redirect = 'ada:k3y-s3cret', set(), {}, True
    srv.url = f'http://127.0.0.1:{srv.server_port}'
    threading.Thread(target=srv.serve_forever, args=(0.05,), daemon=True).start()
    try: yield srv
    finally: srv.shutdown(); srv.server_close()


# ---------------------------------------------------------------- archive builders

def tar_bytes(entries, mode='w:gz'):
    "A tar archive from (name, bytes) pairs and ready-made TarInfos."
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=mode) as tf:
        for e in entries:
            if isinstance(e, tarfile.TarInfo): tf.addfile(e)
            else:
                info = tarfile.TarInfo(e[0]); info.size = len(e[1]); tf.addfile(info, io.BytesIO(e[1]))
    return buf.getvalue()

def special(name, kind, target=''):
    info = tarfile.TarInfo(name); info.type, info.linkname = kind, target
    return info

def zip_bytes(entries):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, 'w', zipfile.ZIP_DEFLATED) as zf:
        for name, data in entries: zf.writestr(zipfile.ZipInfo(name), data, zipfile.ZIP_DEFLATED)
    return buf.getvalue()

def sevenz_file(path, entries, rename=None):
    "Write a 7z at `path`; `rename=(old, new)` patches an entry name in the header (py7zr refuses to write '..')."
    with py7zr.SevenZipFile(path, 'w') as z:
        z.set_encoded_header_mode(False)
        for name, data in entries: z.writestr(data, name)
    if rename:
        b = bytearray(Path(path).read_bytes())
        old, new = (s.encode('utf-16-le') for s in rename)
        assert len(old) == len(new) and b.count(old) == 1
        i = b.find(old); b[i:i + len(old)] = new
        off, size = struct.unpack('<QQ', b[12:28])
        b[28:32] = struct.pack('<I', zlib.crc32(bytes(b[32 + off:32 + off + size])))   # header CRC
        b[8:12] = struct.pack('<I', zlib.crc32(bytes(b[12:32])))                       # start header CRC
        Path(path).write_bytes(b)
    return Path(path)

PLANET = {'planet_tiny/labels.csv': b'image_name,tags\ntrain_1,clear primary\n',
          'planet_tiny/train/train_1.jpg': os.urandom(50_000)}

# ---------------------------------------------------------------- untar_data

def test_untar_data_downloads_checks_and_unpacks(isolated):
    arc = tar_bytes(PLANET.items())
    with serve({'/planet_tiny.tgz': arc}) as srv:
        path = untar_data(f'{srv.url}/planet_tiny.tgz', sha256=hashlib.sha256(arc).hexdigest())
        assert untar_data(f'{srv.url}/planet_tiny.tgz') == path
        n = len(srv.log)
    data = isolated/'data'
    assert path == data/'planet_tiny'                               # under LESSONLIB_DATA, the single top folder kept once
    assert (path/'train'/'train_1.jpg').read_bytes() == PLANET['planet_tiny/train/train_1.jpg']
    assert n == 1                                                   # the second call downloaded nothing
    assert sorted(p.name for p in data.iterdir()) == ['.downloads', '.planet_tiny.lock', 'planet_tiny']   # no temporary folders left
    assert list((data/'.downloads').iterdir()) == []


def test_untar_data_zip_without_top_folder(isolated):
    with serve({'/things.zip': zip_bytes([('a.txt', b'a'), ('sub/b.txt', b'b')])}) as srv:
        path = untar_data(f'{srv.url}/things.zip')
    assert path == isolated/'data'/'things'
    assert (path/'a.txt').read_bytes() == b'a' and (path/'sub'/'b.txt').read_bytes() == b'b'


def test_untar_data_force_replaces_folder(isolated):
    with serve({'/x.tgz': tar_bytes([('x/new.txt', b'new')])}) as srv:
        (isolated/'data'/'x').mkdir(parents=True); (isolated/'data'/'x'/'old.txt').write_text('old')
        assert (untar_data(f'{srv.url}/x.tgz')/'old.txt').exists()          # present: used as is
        path = untar_data(f'{srv.url}/x.tgz', force=True)
    assert sorted(p.name for p in path.iterdir()) == ['new.txt']

def test_sha_mismatch_keeps_nothing(isolated):
    with serve({'/planet_tiny.tgz': tar_bytes(PLANET.items())}) as srv:
        url = f'{srv.url}/planet_tiny.tgz'
        with pytest.raises(DownloadError, match='SHA-256') as e: untar_data(url, sha256='0' * 64)
    assert url in str(e.value) and 'afresh' in str(e.value)
    data = isolated/'data'
    assert not (data/'planet_tiny').exists()
    assert list((data/'.downloads').iterdir()) == []             # no .part, no archive


def test_size_mismatch(tmp_path):
    with serve({'/f.bin': b'x' * 1000}) as srv:
        with pytest.raises(DownloadError, match='expected 1,001'): download_url(f'{srv.url}/f.bin', tmp_path/'f.bin', size=1001)
    assert list(tmp_path.glob('f.bin*')) == []


def test_resume_after_interrupted_run(tmp_path):
    payload = os.urandom(400_000)
    with serve({'/f.bin': payload}) as srv:
        srv.cut['/f.bin'] = [123_456]
        with pytest.raises(DownloadError, match='run the same command again to resume'):
            download_url(f'{srv.url}/f.bin', tmp_path/'f.bin', retries=0)
        assert not (tmp_path/'f.bin').exists()                   # nothing that looks complete
        assert (tmp_path/'f.bin.part').stat().st_size == 123_456
        f = download_url(f'{srv.url}/f.bin', tmp_path/'f.bin', sha256=hashlib.sha256(payload).hexdigest())
        log = srv.log
    assert f.read_bytes() == payload
    assert log[-1][2:] == ('bytes=123456-', '"v1"')              # asked only for the rest, of the same version
    assert sorted(p.name for p in tmp_path.glob('f.bin*')) == ['f.bin']


def test_connection_cut_mid_file_is_retried_and_resumed(tmp_path):
    payload = os.urandom(300_000)
    with serve({'/f.bin': payload}) as srv:
        srv.cut['/f.bin'] = [100_000, 50_000]                    # two hang-ups, then the rest
        f = download_url(f'{srv.url}/f.bin', tmp_path/'f.bin', size=len(payload), wait=0)
        ranges = [r[2] for r in srv.log]
    assert f.read_bytes() == payload
    assert ranges == [None, 'bytes=100000-', 'bytes=150000-']


def test_server_without_range_support_restarts_cleanly(tmp_path):
    payload = os.urandom(200_000)
    with serve({'/f.bin': payload}, ranges=False) as srv:
        srv.cut['/f.bin'] = [70_000]
        f = download_url(f'{srv.url}/f.bin', tmp_path/'f.bin', wait=0)
    assert f.read_bytes() == payload                              # not 70,000 stale bytes + the whole file


def test_changed_remote_file_restarts_instead_of_mixing_versions(tmp_path):
    old, new = os.urandom(100_000), os.urandom(100_000)
    with serve({'/f.bin': old}, etag='"old"') as srv:
        srv.cut['/f.bin'] = [40_000]
        with pytest.raises(DownloadError): download_url(f'{srv.url}/f.bin', tmp_path/'f.bin', retries=0)
        srv.files['/f.bin'], srv.etag = new, '"new"'              # the file changes on the server
        f = download_url(f'{srv.url}/f.bin', tmp_path/'f.bin', retries=0)
        last = srv.log[-1]
    assert last[3] == '"old"'                                     # we asked "only if still the old version"
    assert f.read_bytes() == new


def test_always_cut_gives_up_with_clear_error(isolated):
    with serve({'/planet_tiny.tgz': tar_bytes(PLANET.items())}) as srv:
        srv.cut['/planet_tiny.tgz'] = [1000] * 10
        with pytest.raises(DownloadError, match=r'failed after 2 attempt\(s\)') as e:
            untar_data(f'{srv.url}/planet_tiny.tgz', retries=1)
    assert 'planet_tiny.tgz' in str(e.value) and 'internet' in str(e.value)
    data = isolated/'data'
    assert not (data/'planet_tiny').exists()
    assert [p.name for p in (data/'.downloads').iterdir() if not p.name.endswith('.json')] == ['planet_tiny.tgz.part']


def test_http_404_is_not_retried(tmp_path):
    with serve() as srv:
        with pytest.raises(DownloadError, match='404') as e: download_url(f'{srv.url}/nope.tgz', tmp_path/'nope.tgz')
        assert len(srv.log) == 1
    assert '/nope.tgz' in str(e.value)


def test_progress_bar_quiet_in_logs_and_shown_on_request(tmp_path, capfd):
    with serve({'/f.bin': os.urandom(100_000)}) as srv:
        download_url(f'{srv.url}/f.bin', tmp_path/'a.bin')
        assert capfd.readouterr().err == ''                       # not a terminal: no progress bar
        download_url(f'{srv.url}/f.bin', tmp_path/'b.bin', progress=True)
    assert 'b.bin' in capfd.readouterr().err


# ---------------------------------------------------------------- safe extraction

EVIL_TARS = {
    'absolute path': lambda t: [(str(t/'outside'/'evil.txt'), b'x')],
    'dot-dot':       lambda t: [('a/../../outside/evil.txt', b'x')],
    'symlink out':   lambda t: [special('a/up', tarfile.SYMTYPE, '../../outside'), ('a/up/evil.txt', b'x')],
    'absolute link': lambda t: [special('a/etc', tarfile.SYMTYPE, str(t/'outside'))],
    'hard link out': lambda t: [special('a/passwd', tarfile.LNKTYPE, '../../outside/secret.txt')],
    'link chain':    lambda t: [special('a/here', tarfile.SYMTYPE, '.'), special('a/here/up', tarfile.SYMTYPE, '..'),
                                ('a/here/up/evil.txt', b'x')],
    'device file':   lambda t: [special('a/sda', tarfile.BLKTYPE)],
    'char device':   lambda t: [special('a/null', tarfile.CHRTYPE)],
    'fifo':          lambda t: [special('a/pipe', tarfile.FIFOTYPE)],
}

@pytest.mark.parametrize('kind', EVIL_TARS)
def test_malicious_tar_is_refused(tmp_path, kind):
    (tmp_path/'outside').mkdir(); (tmp_path/'outside'/'secret.txt').write_text('secret')
    arc = tmp_path/'evil.tgz'; arc.write_bytes(tar_bytes(EVIL_TARS[kind](tmp_path)))
    before = snapshot(tmp_path)
    with pytest.raises(UnsafeArchiveError, match='refusing') as e: safe_extract(arc, tmp_path/'box'/'out')
    assert 'evil.tgz' in str(e.value)
    assert snapshot(tmp_path) - before <= {str(tmp_path/'box'), str(tmp_path/'box'/'out')}
    assert list((tmp_path/'box'/'out').iterdir()) == []
    assert (tmp_path/'outside'/'secret.txt').read_text() == 'secret'


def test_tar_links_inside_are_fine(tmp_path):
    arc = tmp_path/'ok.tar'
    arc.write_bytes(tar_bytes([('d/f.txt', b'hi'), special('d/l.txt', tarfile.SYMTYPE, 'f.txt'),
                               special('d/h.txt', tarfile.LNKTYPE, 'd/f.txt')], mode='w'))
    out = safe_extract(arc, tmp_path/'out')
    assert (out/'d'/'l.txt').read_bytes() == b'hi' and (out/'d'/'h.txt').read_bytes() == b'hi'


@pytest.mark.parametrize('name', ['../evil.txt', 'a/../../evil.txt', '/abs/evil.txt', 'C:/evil.txt'])
def test_malicious_zip_is_refused(tmp_path, name):
    arc = tmp_path/'evil.zip'; arc.write_bytes(zip_bytes([('ok.txt', b'ok'), (name, b'x')]))
    with pytest.raises(UnsafeArchiveError, match=re.escape(name)): safe_extract(arc, tmp_path/'box'/'out')
    assert list((tmp_path/'box'/'out').iterdir()) == []
    assert not (tmp_path/'evil.txt').exists() and not (tmp_path/'box'/'evil.txt').exists()


def test_malicious_7z_is_refused(tmp_path):
    arc = sevenz_file(tmp_path/'evil.7z', [('aa/evil.txt', b'evil'), ('b/ok.txt', b'ok')], rename=('aa/evil.txt', '../evil.txt'))
    with py7zr.SevenZipFile(arc) as z: assert '../evil.txt' in z.getnames()   # the archive really is malicious
    with pytest.raises(UnsafeArchiveError, match=r"'\.\./evil\.txt'"): safe_extract(arc, tmp_path/'box'/'out')
    assert list((tmp_path/'box'/'out').iterdir()) == []
    assert not (tmp_path/'box'/'evil.txt').exists()


@pytest.mark.parametrize('kind', ['zip', 'tgz', '7z'])
def test_archive_bigger_than_limit_is_refused(tmp_path, kind):
    zeros = bytes(5_000_000)
    arc = tmp_path/f'bomb.{kind}'
    if kind == 'zip': arc.write_bytes(zip_bytes([('zeros.bin', zeros)]))
    elif kind == 'tgz': arc.write_bytes(tar_bytes([('zeros.bin', zeros)]))
    else: sevenz_file(arc, [('zeros.bin', zeros)])
    assert arc.stat().st_size < 100_000                           # small archive, big contents
    with pytest.raises(ArchiveError, match='more than the limit of 1,000,000') as e: safe_extract(arc, tmp_path/'out', max_size=1_000_000)
    assert '5,000,000' in str(e.value)
    assert list((tmp_path/'out').iterdir()) == []
    assert safe_extract(arc, tmp_path/'out2', max_size=10_000_000) == tmp_path/'out2'   # under the limit: fine


def test_tar_inside_7z_like_planet(tmp_path):
    inner = tar_bytes([('train-jpg/train_0.jpg', b'jpg0'), ('train-jpg/train_1.jpg', b'jpg1')], mode='w')
    arc = sevenz_file(tmp_path/'train-jpg.tar.7z', [('train-jpg.tar', inner)])
    out = safe_extract(arc, tmp_path/'out')
    assert sorted(p.name for p in out.iterdir()) == ['train-jpg']   # the inner tar is unpacked and removed
    assert (out/'train-jpg'/'train_1.jpg').read_bytes() == b'jpg1'


def test_malicious_tar_inside_7z_is_refused(tmp_path):
    inner = tar_bytes([('../../evil.txt', b'x')], mode='w')
    arc = sevenz_file(tmp_path/'train-jpg.tar.7z', [('train-jpg.tar', inner)])
    with pytest.raises(UnsafeArchiveError, match='refusing'): safe_extract(arc, tmp_path/'box'/'out')
    assert not (tmp_path/'evil.txt').exists()


def test_damaged_archive_error(tmp_path):
    arc = tmp_path/'cut.tgz'; arc.write_bytes(tar_bytes(PLANET.items())[:5000])
    with pytest.raises(ArchiveError, match='damaged') as e: safe_extract(arc, tmp_path/'out')
    assert 'cut.tgz' in str(e.value)
    with pytest.raises(ArchiveError, match="Don't know how to unpack"): safe_extract(tmp_path/'x.rar', tmp_path/'out')


def test_untar_data_refuses_malicious_archive_and_cleans_up(isolated):
    with serve({'/evil.tgz': tar_bytes([('evil/ok.txt', b'ok'), ('evil/../../../x.txt', b'x')])}) as srv:
        with pytest.raises(UnsafeArchiveError): untar_data(f'{srv.url}/evil.tgz')
    data = isolated/'data'
    assert sorted(p.name for p in data.iterdir() if p.suffix != '.lock') == ['.downloads']   # no folder, no temporary folder
    assert list((data/'.downloads').iterdir()) == []                   # and the bad archive is gone
