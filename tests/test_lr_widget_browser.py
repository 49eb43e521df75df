"""The lr-finder widget in a real JupyterLab, driven by headless chromium: a click on a suggestion makes the
kernel's `learn.lr_widget.lr` exactly that suggestion (the browser's slider snaps values to its grid and sends
them back), drawing the widget changes nothing, a click redraws once, and the buttons show their whole labels.

Needs `chromium` and `chromedriver` (Debian: `apt-get install chromium chromium-driver`), selenium and jupyterlab
(`pip install jupyterlab`); skipped with the reason when one is missing. Set LESSONLIB_WIDGET_SCREENSHOT=file.png
to keep a screenshot of the widget after the click; LESSONLIB_WIDGET_FRONT_ENDS=lab,notebook7 runs it in
Notebook 7 too (`pip install notebook`).
"""
import json, os, shutil, socket, subprocess, sys, time, urllib.request, uuid
from pathlib import Path

import pytest
import nbformat

from test_lr_widget import NOTEBOOK

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = shutil.which('chromium') or shutil.which('chromium-browser')
CHROMEDRIVER = shutil.which('chromedriver')

CELLS = NOTEBOOK[:2] + [          # the set-up cells of test_lr_widget, then what the browser checks
    "w = learn.lr_widget\nprint('STATE', repr(w.lr), repr(sugg.valley), repr(sugg.steep), w.redraws)",
    "print('STATE', repr(w.lr), repr(sugg.valley), repr(sugg.steep), w.redraws)",
]


def _missing():
    if not CHROMIUM: return 'chromium is not installed (apt-get install chromium chromium-driver)'
    if not CHROMEDRIVER: return 'chromedriver is not installed (apt-get install chromium-driver)'
    for mod, pkg in (('selenium', 'selenium'), ('jupyterlab', 'jupyterlab'), ('ipykernel', 'ipykernel'),
                     ('jupyterlab_widgets', 'ipywidgets')):
        try: __import__(mod)
        except ImportError: return f'{mod} is not installed (pip install {pkg})'
    return ''

pytestmark = pytest.mark.skipif(bool(_missing()), reason=_missing() or 'all there')


def _free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def _wait(what, fn, timeout, every=0.25):
    "Call `fn` until it returns something truthy; fail saying `what` after `timeout` s."
    end = time.time() + timeout
    while time.time() < end:
        res = fn()
        if res: return res
        time.sleep(every)
    pytest.fail(f'timed out after {timeout}s waiting for {what}')


FRONT_ENDS = {'lab': ('jupyterlab', ['--LabApp.news_url=None', '--LabApp.expose_app_in_browser=True'], 'lab/tree'),
              'notebook7': ('notebook', ['--JupyterNotebookApp.expose_app_in_browser=True'], 'notebooks')}


@pytest.fixture(params=os.environ.get('LESSONLIB_WIDGET_FRONT_ENDS', 'lab').split(','))
def lab(tmp_path, request):
    "JupyterLab (or Notebook 7) on 127.0.0.1 (free port, token) serving a folder with the notebook: its URL."
    root = tmp_path/'root'; root.mkdir()
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(src) for src in CELLS]
    nb.metadata['kernelspec'] = {'name': 'python3', 'display_name': 'Python 3', 'language': 'python'}
    nbformat.write(nb, root/'lr.ipynb')
    settings = tmp_path/'settings'/'@jupyterlab'/'apputils-extension'
    settings.mkdir(parents=True)
    no_news = {'fetchNews': 'false', 'checkForUpdates': False}
    (settings/'notification.jupyterlab-settings').write_text(json.dumps(no_news))
    port, token = _free_port(), uuid.uuid4().hex
    env = {k: v for k, v in os.environ.items() if k != 'MPLBACKEND'}   # the kernel as a student has it
    env.update(PYTHONPATH=os.pathsep.join([str(ROOT), env.get('PYTHONPATH', '')]), OMP_NUM_THREADS='1',
               JUPYTER_RUNTIME_DIR=str(tmp_path/'runtime'), JUPYTERLAB_SETTINGS_DIR=str(tmp_path/'settings'),
               JUPYTERLAB_WORKSPACES_DIR=str(tmp_path/'workspaces'))
    log = open(tmp_path/'lab.log', 'w')
    module, app_args, tree = FRONT_ENDS[request.param]
    if module != 'jupyterlab': pytest.importorskip(module)
    proc = subprocess.Popen([sys.executable, '-m', module, '--no-browser', '--ServerApp.ip=127.0.0.1',
                             f'--ServerApp.port={port}', '--ServerApp.port_retries=0',
                             f'--IdentityProvider.token={token}',
                             f'--ServerApp.root_dir={root}', '--ServerApp.allow_root=True', *app_args],
                            env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f'http://127.0.0.1:{port}'
    def up():
        if proc.poll() is not None:
            pytest.fail(f'JupyterLab exited ({proc.returncode}):\n{(tmp_path/"lab.log").read_text()[-3000:]}')
        try: return urllib.request.urlopen(f'{base}/api/status?token={token}', timeout=2).status == 200
        except OSError: return False
    try:
        _wait('JupyterLab to start', up, 40)
        yield f'{base}/{tree}/lr.ipynb?token={token}'
    finally:
        stop = urllib.request.Request(f'{base}/api/shutdown?token={token}', method='POST')
        try: urllib.request.urlopen(stop, timeout=5)
        except OSError: pass
        try: proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.terminate()
            try: proc.wait(5)
            except subprocess.TimeoutExpired: proc.kill()
        log.close()


@pytest.fixture
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for a in ('--headless=new', '--no-sandbox', '--disable-gpu', '--disable-dev-shm-usage',
              '--window-size=1280,1100',
              '--disable-background-networking', '--disable-component-update', '--no-first-run'):
        opts.add_argument(a)
    drv = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    drv.set_script_timeout(90)
    try: yield drv
    finally: drv.quit()


RUN_CELL = """
const [i, done] = arguments;
const app = window.jupyterapp, nb = app.shell.currentWidget.content;
nb.activeCellIndex = i;
app.commands.execute('notebook:run-cell').then(() => {
  const outs = nb.widgets[i].model.outputs.toJSON();
  done(outs.map(o => o.text ? [].concat(o.text).join('') : (o.ename ? o.ename + ': ' + o.evalue : '')).join(''));
}, e => done('run failed: ' + e));
"""

READY = """
const app = window.jupyterapp, w = app && app.shell.currentWidget;
const k = w && w.sessionContext && w.sessionContext.session && w.sessionContext.session.kernel;
return !!(k && k.status === 'idle' && w.content && w.content.widgets.length === %d);
""" % len(CELLS)


def _state(text):
    "(lr, valley, steep, redraws) from a cell's `STATE ...` line."
    line = [l for l in text.splitlines() if l.startswith('STATE ')]
    assert line, f'the cell printed no state: {text!r}'
    lr, valley, steep, redraws = line[-1].split()[1:]
    return float(lr), float(valley), float(steep), int(redraws)


def test_click_in_jupyterlab_gives_exact_suggestion(lab, browser, tmp_path):
    from selenium.webdriver.common.by import By
    start = time.time()
    browser.get(lab)
    _wait('the notebook and its kernel', lambda: browser.execute_script(READY), 60)
    for i in (0, 1):
        out = browser.execute_async_script(RUN_CELL, i)
        assert 'Error' not in out and 'failed' not in out, out
    buttons = lambda: browser.find_elements(By.CSS_SELECTOR, '.jp-OutputArea-output button')
    _wait('the widget\'s buttons', lambda: len(buttons()) >= 4, 20)
    _wait('the plot', lambda: browser.execute_script(
        "const i = document.querySelector('.jp-OutputArea-output img');"
        "return i && i.complete && i.naturalWidth"), 20)
    time.sleep(2)                                         # time for the slider to draw and send back what it shows
    lr, valley, steep, redraws = _state(browser.execute_async_script(RUN_CELL, 2))
    assert lr == valley and redraws == 1, (lr, valley, redraws)   # drawing the widget chose nothing

    for b in buttons():                                   # every label whole: nothing cut off by the button's width
        assert browser.execute_script('return arguments[0].scrollWidth <= arguments[0].clientWidth', b), b.text
    steep_button = [b for b in buttons() if b.text.startswith('steep')]
    assert steep_button, [b.text for b in buttons()]
    t_click = time.time()
    steep_button[0].click()
    page_text = lambda: browser.execute_script('return document.body.innerText')
    _wait('the read-out to say steep', lambda: '(steep)' in page_text(), 20, every=0.02)
    print(f'click to redrawn plot and read-out: {time.time() - t_click:.2f}s')
    time.sleep(2)                                         # time for the slider's snapped value to come back
    lr, valley, steep2, redraws = _state(browser.execute_async_script(RUN_CELL, 3))
    shot = os.environ.get('LESSONLIB_WIDGET_SCREENSHOT') or str(tmp_path/'widget.png')
    browser.execute_script("document.querySelector('.jp-OutputArea-output img').scrollIntoView()")
    browser.save_screenshot(shot)
    assert steep2 == steep and lr == steep, (lr, steep)  # exactly the clicked suggestion
    assert redraws == 2, redraws                          # the first draw and one for the click
    assert time.time() - start < 90
