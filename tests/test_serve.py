"""The model server as a user meets it: HTTP through the framework's test client, a real server on 127.0.0.1 hit from
several threads, fine-tuning from the command line, and one end-to-end run in a real browser (chromium + Selenium)."""
import io, json, os, re, shutil, sqlite3, threading, time, warnings
from concurrent.futures import ThreadPoolExecutor
import pytest

pytest.importorskip('fastapi', reason='the serve extra is not installed: pip install "lessonlib[serve]"')
import httpx
from fastapi.testclient import TestClient
from PIL import Image
from lessonlib.serve import FeedbackLog, ImageModel, create_app, tiny_export

LEAKS = re.compile(r'Traceback|File "|/tmp/|/work/|/home/|\.py\b', re.I)

def png(size=(40, 30), color=(200, 30, 30)) -> bytes:
    b = io.BytesIO()
    Image.new('RGB', size, color).save(b, format='PNG')
    return b.getvalue()

@pytest.fixture(scope='module')
def shapes(tmp_path_factory):
    "A small single-label model (3 shapes), trained one epoch at 32 px."
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        return tiny_export(tmp_path_factory.mktemp('shapes')/'shapes.pkl')

@pytest.fixture(scope='module')
def client(shapes, tmp_path_factory):
    app = create_app(shapes, tmp_path_factory.mktemp('fb')/'feedback.db', max_bytes=200_000)
    return TestClient(app, raise_server_exceptions=False)

def test_predict_then_feedback(client):
    r = client.post('/predict', files={'file': ('../../../etc/passwd', png(), 'image/png')})
    assert r.status_code == 200, r.text
    p = r.json()
    vocab = client.get('/health').json()['labels']
    from lessonlib.synth.scratch import make_scratch
    assert sorted(vocab) == sorted(d.name for d in (make_scratch()/'train').iterdir() if d.is_dir())
    assert set(p['probabilities']) == set(vocab) and abs(sum(p['probabilities'].values()) - 1) < 1e-4
    assert p['labels'] == [max(p['probabilities'], key=p['probabilities'].get)] and p['multi_label'] is False
    other = next(l for l in vocab if l not in p['labels'])
    r = client.post('/feedback', json={'prediction_id': p['prediction_id'], 'labels': [other]})
    assert r.status_code == 200, r.text
    log = client.app.state.feedback
    row = next(x for x in log.rows() if x['id'] == r.json()['feedback_id'])
    assert (row['label'], row['prediction'], row['model_version']) == ([other], p['labels'], p['model_version'])
    assert re.fullmatch(r'[0-9a-f]{32}\.png', row['image']) and (log.images/row['image']).is_file()
    assert 'passwd' not in json.dumps(log.rows())
    n_rows, n_files = len(log.rows()), len(list(log.images.iterdir()))
    again = client.post('/feedback', json={'prediction_id': p['prediction_id'], 'labels': [p['labels'][0]]})
    assert again.status_code == 409 and 'already corrected' in again.json()['detail'], again.text
    assert f"#{r.json()['feedback_id']}" in again.json()['detail'] and not LEAKS.search(again.text)
    assert (len(log.rows()), len(list(log.images.iterdir()))) == (n_rows, n_files)   # no second row, no stray picture

def test_page_health_docs(client):
    page = client.get('/')
    assert page.status_code == 200 and 'Wrong? Tell us the right label' in page.text and 'capture=' in page.text
    h = client.get('/health').json()
    assert h['status'] == 'ok' and h['model_version'].startswith('shapes.pkl@') and h['feedback'] is True
    spec = client.get('/openapi.json').json()
    assert {'/predict', '/feedback', '/health'} <= set(spec['paths'])
    assert client.get('/docs').status_code == 200

BAD_UPLOADS = {  # case: (multipart file bytes, expected status)
    'empty file': (b'', 400),
    'text file named .jpg': (b'just some text, not a picture', 415),
    'PDF': (b'%PDF-1.4\n%\xe2\xe3\xcf\xd3\n1 0 obj', 415),
    'truncated PNG': (png((64, 64))[:70], 400),
    'truncated JPEG': (None, 400),
    'decompression bomb (PNG header claims 30000x30000)': (None, 413),
    'over the size limit (refused from its Content-Length)': (None, 413),
    'over the size limit (refused while read)': (None, 413),
}

def _bomb(w=30000, h=30000) -> bytes:
    "A tiny PNG whose header claims `w` x `h` pixels (its IHDR rewritten, CRC fixed): 900 Mpx if decoded."
    import struct, zlib
    data = bytearray(png((1, 1)))
    ihdr = b'IHDR' + struct.pack('>II', w, h) + bytes(data[24:29])
    data[12:29], data[29:33] = ihdr, struct.pack('>I', zlib.crc32(ihdr))
    return bytes(data)

def _jpeg_half() -> bytes:
    b = io.BytesIO()
    Image.effect_noise((64, 64), 50).convert('RGB').save(b, format='JPEG')
    return b.getvalue()[:len(b.getvalue()) // 2]

def _bad_cases():
    cases = dict(BAD_UPLOADS)
    cases['truncated JPEG'] = (_jpeg_half(), 400)
    cases['decompression bomb (PNG header claims 30000x30000)'] = (_bomb(), 413)
    cases['over the size limit (refused from its Content-Length)'] = (os.urandom(300_000), 413)
    cases['over the size limit (refused while read)'] = (os.urandom(210_000), 413)   # under limit + form allowance
    return cases

def test_bad_uploads_are_4xx_with_a_clear_message(client):
    seen = {}
    for case, (data, status) in _bad_cases().items():
        r = client.post('/predict', files={'file': ('/etc/shadow', data, 'image/png')})
        seen[case] = (r.status_code, r.json()['detail'])
        assert r.status_code == status, (case, r.status_code, r.text)
        assert not LEAKS.search(r.text), (case, r.text)
    print('\n' + '\n'.join(f'| {k} | {s} | {d} |' for k, (s, d) in seen.items()))

def test_bad_requests_are_4xx(client):
    p = client.post('/predict', files={'file': ('a.png', png(), 'image/png')}).json()
    cases = {
        'no file field': (client.post('/predict', data={'x': '1'}), 422),
        'not multipart': (client.post('/predict', content=png(), headers={'content-type': 'image/png'}), 422),
        'chunked body, no Content-Length': (client.post('/predict', content=iter([png()])), 411),
        'feedback: unknown id': (client.post('/feedback', json={'prediction_id': 'x' * 32, 'labels': ['circle']}), 404),
        'feedback: label not in vocab': (client.post('/feedback', json={'prediction_id': p['prediction_id'],
                                                                         'labels': ['../../x']}), 422),
        'feedback: two labels, single-label model': (client.post('/feedback', json={
            'prediction_id': p['prediction_id'], 'labels': ['circle', 'square']}), 422),
        'feedback: not JSON': (client.post('/feedback', content=b'{oops', headers={'content-type': 'application/json'}), 422),
        'feedback: id too long': (client.post('/feedback', json={'prediction_id': 'a' * 10_000, 'labels': []}), 422),
        'unknown path': (client.get('/../../etc/passwd'), 404),
    }
    for case, (r, status) in cases.items():
        assert r.status_code == status, (case, r.status_code, r.text)
        assert not LEAKS.search(r.text), (case, r.text)
        print(f'| {case} | {r.status_code} | {r.json()["detail"]} |')

def test_unexpected_error_is_a_bare_500(shapes, tmp_path):
    model = ImageModel(shapes)
    def boom(im): raise RuntimeError(f'secret detail at {tmp_path}/model.py line 3')
    model.predict = boom
    c = TestClient(create_app(model), raise_server_exceptions=False)
    r = c.post('/predict', files={'file': ('a.png', png(), 'image/png')})
    assert r.status_code == 500 and 'secret' not in r.text and not LEAKS.search(r.text), r.text

def test_only_image_classifiers_and_safe_exports(tmp_path):
    import pickle
    (tmp_path/'evil.pkl').write_bytes(pickle.dumps({'x': 1}))
    with pytest.raises(ValueError, match='not in the safe export format|not an export|damaged'):
        create_app(tmp_path/'evil.pkl')

def test_multi_label_model(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        fname = tiny_export(tmp_path/'planet.pkl', multi=True, n=60)
    c = TestClient(create_app(fname, tmp_path/'fb.db'))
    p = c.post('/predict', files={'file': ('t.png', png((32, 32), (20, 120, 40)), 'image/png')}).json()
    assert p['multi_label'] is True and isinstance(p['labels'], list)
    assert p['labels'] == [k for k, v in p['probabilities'].items() if v > 0.5]
    vocab = c.get('/health').json()['labels']
    for labels in ([], vocab[:3]):
        pid = c.post('/predict', files={'file': ('t.png', png((32, 32)), 'image/png')}).json()['prediction_id']
        r = c.post('/feedback', json={'prediction_id': pid, 'labels': labels})
        assert r.status_code == 200, r.text
    assert [r['label'] for r in FeedbackLog(tmp_path/'fb.db').rows()] == [[], vocab[:3]]
    from lessonlib.serve import finetune, original_items
    items, trn, val = original_items(tmp_path/'planet_tiles')    # Planet's layout: the folder's one CSV, split 80/20
    assert (len(items), len(val)) == (60, 12) and not set(trn) & set(val)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        res = finetune(fname, tmp_path/'fb.db', data=tmp_path/'planet_tiles', epochs=1)
    assert (res['corrections'], res['replayed'], res['valid_items']) == (2, 8, 12)
    written = (tmp_path/'planet.v2.pkl').exists()
    not_worse = res['after']['valid_loss'] <= res['before']['valid_loss']
    assert ('wrote planet.v2.pkl' in res['message']) == written == not_worse, res['message']

class Server:
    "The app under uvicorn on 127.0.0.1 (a free port) in a thread."
    def __init__(self, app):
        import uvicorn
        self.server = uvicorn.Server(uvicorn.Config(app, host='127.0.0.1', port=0, log_level='warning'))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        for _ in range(200):
            if self.server.started: break
            time.sleep(0.05)
        assert self.server.started, 'the server did not start'
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f'http://127.0.0.1:{port}'
    def stop(self):
        self.server.should_exit = True
        self.thread.join(10)

@pytest.fixture(scope='module')
def server(shapes, tmp_path_factory):
    s = Server(create_app(shapes, tmp_path_factory.mktemp('live')/'feedback.db'))
    yield s
    s.stop()

def test_concurrent_feedback_loses_no_rows(server):
    "40 predictions, each corrected twice at once from 8 threads: 40 rows, 40 answers 409, no picture left over."
    with httpx.Client(base_url=server.url, timeout=30) as c:
        pids = [c.post('/predict', files={'file': ('a.png', png(), 'image/png')}).json()['prediction_id']
                for _ in range(40)]
    def send(pid):
        with httpx.Client(base_url=server.url, timeout=30) as c:
            r = c.post('/feedback', json={'prediction_id': pid, 'labels': ['square']})
            return pid, r.status_code, r.json()
    log = server.server.config.app.state.feedback
    before = len(log.rows())
    with ThreadPoolExecutor(8) as ex: answers = list(ex.map(send, pids + pids[::-1]))
    rows = log.rows()
    ok = [a for a in answers if a[1] == 200]
    assert sorted(a[1] for a in answers) == [200] * 40 + [409] * 40, answers
    assert sorted(pid for pid, _, _ in ok) == sorted(pids) and len(rows) == before + 40
    assert {a[2]['feedback_id'] for a in ok} == {r['id'] for r in rows[before:]}
    assert sorted(r['prediction_id'] for r in rows[before:]) == sorted(pids)
    assert sorted(f.name for f in log.images.iterdir()) == sorted(r['image'] for r in rows)
    db = server.server.config.app.state.feedback.db
    assert sqlite3.connect(db).execute('PRAGMA journal_mode').fetchone()[0] == 'wal'

def _valid_loss(fname) -> float:
    "Cross-entropy of model `fname` on the shapes set's val/ pictures, from the probabilities /predict would return."
    import math
    from lessonlib.synth.scratch import make_scratch
    from lessonlib.vision.data import get_image_files
    m = ImageModel(fname)
    files = get_image_files(make_scratch()/'val')
    return -sum(math.log(m.predict(Image.open(f))['probabilities'][f.parent.name]) for f in files) / len(files)

def _finetune(argv, capsys):
    from lessonlib.cli import main
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        try: rc = main(argv)
        except SystemExit as e: rc = e.code   # argparse errors
    out, err = capsys.readouterr()
    return rc, out, err

def test_finetune_command_and_new_version(shapes, tmp_path, capsys):
    "Both outcomes of `lessonlib finetune`, the losses it reports checked against the models' own predictions."
    from lessonlib.synth.scratch import make_scratch
    model = tmp_path/'shapes.pkl'
    shutil.copy(shapes, model)
    log = FeedbackLog(tmp_path/'fb.db')
    files = sorted((make_scratch()/'test').rglob('*.jpg'))[::4][:10]
    for f in files: log.add(Image.open(f).convert('RGB'), 'v1', ['?'], {}, [f.parent.name])
    log.add(Image.open(files[0]).convert('RGB'), 'v1', ['?'], {}, ['not-a-label'])   # left out with a warning
    base = ['finetune', str(model), '--feedback', str(tmp_path/'fb.db')]
    rc, out, err = _finetune(base, capsys)                                      # no --data: a one-line error
    assert rc == 2 and '--data' in err and len(err.splitlines()) == 1, err
    rc, out, err = _finetune(base + ['--data', str(make_scratch()), '--lr', '10', '--epochs', '1'], capsys)
    before, after = map(float, re.search(r'valid loss ([\d.]+) -> ([\d.]+) on (\d+) items', out).groups()[:2])
    assert rc == 0 and 'kept the current model' in out and after > before, out
    assert sorted(p.name for p in tmp_path.glob('shapes*.pkl')) == ['shapes.pkl'], out   # nothing written
    assert abs(before - _valid_loss(model)) < 2e-3, (before, _valid_loss(model))
    rc, out, err = _finetune(base + ['--data', str(make_scratch()), '--lr', '3e-3', '--epochs', '2'], capsys)
    before, after = map(float, re.search(r'valid loss ([\d.]+) -> ([\d.]+) on', out).groups())
    new = tmp_path/'shapes.v2.pkl'
    assert rc == 0 and ('wrote shapes.v2.pkl: not worse' in out) == new.exists() == (after <= before), out
    if new.exists(): assert abs(after - _valid_loss(new)) < 2e-3, (after, _valid_loss(new))
    assert len(FeedbackLog(tmp_path/'fb.db').rows()) == len(files) + 1   # the log is read, never changed

def test_new_version_served_with_the_same_feedback_log(shapes, tmp_path, monkeypatch, capsys):
    "`lessonlib serve NAME.pkl`, then `lessonlib serve NAME.v2.pkl`: one log (feedback.db beside them), rows kept."
    import torch, uvicorn
    from lessonlib.cli import main
    from lessonlib.learner import load_learner
    from lessonlib.serve import export_version
    started = []
    monkeypatch.setattr(uvicorn, 'run', lambda app, **kw: started.append((app, kw)))
    v1 = tmp_path/'shapes.pkl'
    shutil.copy(shapes, v1)
    learn = load_learner(v1)
    with torch.no_grad():
        for p in learn.model.parameters(): p.mul_(0.5)
    v2 = export_version(learn, v1)
    assert v2 == tmp_path/'shapes.v2.pkl'
    versions, ids = [], []
    for fname in (v1, v2, v1):
        assert main(['serve', str(fname)]) == 0
        app, kw = started[-1]
        assert (kw['host'], kw['port']) == ('127.0.0.1', 8000)   # this machine only, unless --host says otherwise
        assert app.state.feedback.db == tmp_path/'feedback.db'
        c = TestClient(app)
        p = c.post('/predict', files={'file': ('a.png', png(), 'image/png')}).json()
        r = c.post('/feedback', json={'prediction_id': p['prediction_id'], 'labels': ['circle']})
        assert r.status_code == 200, r.text
        versions.append(p['model_version'])
        ids.append(r.json()['feedback_id'])
    from lessonlib.serve import serve
    serve(v2)                                                    # the function's own default too
    assert started[-1][1]['host'] == '127.0.0.1' and started[-1][0].state.feedback.db == tmp_path/'feedback.db'
    assert versions[0].startswith('shapes.pkl@') and versions[1].startswith('shapes.v2.pkl@')
    assert versions[0] == versions[2]
    rows = FeedbackLog(tmp_path/'feedback.db').rows()
    assert [(r['id'], r['model_version']) for r in rows] == list(zip(ids, versions))
    assert all((tmp_path/'feedback_images'/r['image']).is_file() for r in rows)

def _chromedriver():
    path = shutil.which('chromedriver')
    if path is None and os.environ.get('CI') == 'true': pytest.fail('CI must install chromium-driver (see .ci/run)')
    if path is None: pytest.skip('chromium-driver is not installed (apt-get install chromium chromium-driver)')
    pytest.importorskip('selenium', reason='selenium is not installed (pip install selenium)')
    return path

def test_browser_upload_predict_correct(server, tmp_path):
    "In chromium: choose a picture, predict, choose the right label, send it; the row is in the database."
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait
    driver_path = _chromedriver()
    opts = webdriver.ChromeOptions()
    for a in ('--headless=new', '--no-sandbox', '--disable-dev-shm-usage', '--disable-gpu'): opts.add_argument(a)
    if shutil.which('chromium'): opts.binary_location = shutil.which('chromium')
    pic = tmp_path/'my photo.png'
    pic.write_bytes(png((48, 48), (30, 30, 220)))
    log = server.server.config.app.state.feedback
    n0 = len(log.rows())
    d = webdriver.Chrome(service=Service(driver_path), options=opts)
    try:
        d.get(server.url + '/')
        wait = WebDriverWait(d, 30)
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, '#label option')) == 3)
        d.find_element(By.ID, 'file').send_keys(str(pic))
        d.find_element(By.ID, 'predict').click()
        wait.until(lambda d: d.find_element(By.ID, 'result').text.startswith('Prediction: '))
        predicted = d.find_element(By.ID, 'result').text.removeprefix('Prediction: ')
        right = next(o.text for o in d.find_elements(By.CSS_SELECTOR, '#label option') if o.text != predicted)
        Select(d.find_element(By.ID, 'label')).select_by_visible_text(right)
        d.find_element(By.ID, 'send').click()
        wait.until(lambda d: 'Thank you' in d.find_element(By.ID, 'status').text)
        status = d.find_element(By.ID, 'status').text
    finally: d.quit()
    rows = log.rows()
    assert len(rows) == n0 + 1
    row = rows[-1]
    assert f'#{row["id"]}' in status and row['label'] == [right] and row['prediction'] == [predicted]
    assert 'my photo' not in row['image'] and (log.images/row['image']).is_file()

def test_feedback_keeps_a_picture_at_most_1024_px(client):
    p = client.post('/predict', files={'file': ('big.png', png((1500, 1200)), 'image/png')}).json()
    r = client.post('/feedback', json={'prediction_id': p['prediction_id'], 'labels': ['circle']})
    log = client.app.state.feedback
    row = next(x for x in log.rows() if x['id'] == r.json()['feedback_id'])
    test_size = Image.open(log.images/row['image']).size
    assert test_size == (1024, 819), test_size
