"""The lr-finder widget (lessonlib.lr_find.LRFinderWidget) from the kernel's side: the chosen `.lr` is exactly the
clicked suggestion whatever the browser's slider sends back, a change redraws once, and an executed notebook holds
a PNG of the plot beside the widget (for nbconvert, the docs and static viewers).

The browser's side (a real JupyterLab in headless chromium) is tests/test_lr_widget_browser.py.
"""
import base64, io, math, os
from pathlib import Path

import numpy as np
import pytest
import matplotlib
matplotlib.use('Agg')
import matplotlib.pyplot as plt
import nbformat

from lessonlib.lr_find import LRFinderWidget, WIDGET_VIEW, suggest_lrs, plot_lr_find

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def curve():
    "A synthetic sweep: flat, falling steepest at 1e-3, bottoming out at 1e-1, exploding (as in 11_lr_find)."
    lrs = np.logspace(-7, 1, 100)
    x = np.log10(lrs)
    losses = 2.5 - 1.5 / (1 + np.exp(-3 * (x + 3))) + np.where(x > -1, 2 * (x + 1) ** 2, 0)
    return lrs, losses, suggest_lrs(lrs, losses)


def _grid(slider, lr):
    "The slider position the browser snaps `lr` to: the nearest point of its grid (log scale, anchored at min)."
    return 10 ** (slider.min + round((math.log10(lr) - slider.min) / slider.step) * slider.step)


def test_click_gives_exact_suggestion_despite_snapped_echo(curve):
    lrs, losses, sugg = curve
    wdg = LRFinderWidget(lrs, losses, sugg)
    box = wdg.build()
    buttons = {b.description.split()[0]: b for b in box.children[1].children}
    assert list(buttons) == [k for k, v in sugg._asdict().items() if v is not None]
    wdg.slider.set_state({'value': _grid(wdg.slider, wdg.lr)})   # the first draw in the browser
    assert wdg.lr == sugg.valley
    for name, lr in sugg._asdict().items():
        if lr is None: continue
        buttons[name].click()
        wdg.slider.set_state({'value': _grid(wdg.slider, lr)})   # the browser's snapped copy comes back
        assert wdg.lr == lr, (name, wdg.lr, lr)
        assert abs(_grid(wdg.slider, lr) / lr - 1) > 1e-6        # (so the test means something: the grid misses it)


def test_one_redraw_per_change(curve):
    lrs, losses, sugg = curve
    wdg = LRFinderWidget(lrs, losses, sugg)
    box = wdg.build()
    assert wdg.redraws == 1
    steep = [b for b in box.children[1].children if b.description.startswith('steep')][0]
    steep.click()
    assert wdg.redraws == 2                 # the click; the slider following it is not a change
    wdg.slider.set_state({'value': _grid(wdg.slider, sugg.steep)})
    assert wdg.redraws == 2                                       # nor is the browser's echo
    k = round((math.log10(sugg.steep) - wdg.slider.min) / wdg.slider.step)
    wdg.slider.set_state({'value': 10 ** (wdg.slider.min + (k + 3) * wdg.slider.step)})   # a drag
    assert wdg.redraws == 3
    assert wdg.lr == pytest.approx(10 ** (wdg.slider.min + (k + 3) * wdg.slider.step), rel=1e-12)


def test_legend_outside_the_axes(curve):
    "The legend sits right of the axes (never over the curve), inside the figure: static plot and widget."
    lrs, losses, sugg = curve
    static = plot_lr_find(lrs, losses, sugg, chosen=1e-3)
    static.figure.draw_without_rendering()
    wdg = LRFinderWidget(lrs, losses, sugg)
    wdg.png()
    for ax in (static, wdg._line.axes):
        r = ax.figure.canvas.get_renderer()
        a, leg, fig = ax.get_window_extent(r), ax.get_legend().get_window_extent(r), ax.figure.bbox
        assert leg.x0 >= a.x1 and leg.x1 <= fig.x1 and leg.y0 >= fig.y0, (a, leg, fig)
    plt.close(static.figure)


def test_display_data_has_png_and_widget(curve):
    lrs, losses, sugg = curve
    wdg = LRFinderWidget(lrs, losses, sugg)
    data = wdg.display_data()
    assert data[WIDGET_VIEW]['model_id'] == wdg.box.model_id
    img = plt.imread(io.BytesIO(base64.b64decode(data['image/png'])))
    assert img.shape[:2] == (384, 720)


NOTEBOOK = [
    "import torch, torch.nn as nn, torch.nn.functional as F\n"
    "from torch.utils.data import DataLoader, TensorDataset\n"
    "from lessonlib.data import DataLoaders\n"
    "from lessonlib.learner import Learner",
    "torch.manual_seed(0)\n"
    "x = torch.randn(512, 2); y = (x[:, 0] > 0).long()\n"
    "dls = DataLoaders(DataLoader(TensorDataset(x, y), batch_size=32, shuffle=True, drop_last=True),\n"
    "                  DataLoader(TensorDataset(x, y), batch_size=128))\n"
    "model = nn.Sequential(nn.Linear(2, 16), nn.ReLU(), nn.Linear(16, 2))\n"
    "learn = Learner(dls, model, loss_func=F.cross_entropy)\n"
    "sugg = learn.lr_find(interactive=True)",
    "print('LR', repr(learn.lr_widget.lr), repr(sugg.valley))",
]


def tiny_notebook():
    "A notebook that runs `lr_find(interactive=True)` on a tiny model (also used by the browser test)."
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(src) for src in NOTEBOOK]
    nb.metadata['kernelspec'] = {'name': 'python3', 'display_name': 'Python 3', 'language': 'python'}
    return nb


def test_executed_notebook_holds_png(tmp_path, monkeypatch):
    "Run by nbclient (as `jupyter nbconvert --execute` does): the widget's output holds a PNG for static pages."
    nbclient = pytest.importorskip('nbclient')
    pytest.importorskip('ipykernel')
    monkeypatch.setenv('PYTHONPATH', os.pathsep.join([str(ROOT), os.environ.get('PYTHONPATH', '')]))
    monkeypatch.setenv('OMP_NUM_THREADS', '1')
    nb = tiny_notebook()
    client = nbclient.NotebookClient(nb, timeout=120, kernel_name='python3',
                                     resources={'metadata': {'path': str(tmp_path)}})
    client.execute()
    shown = [o for o in nb.cells[1].outputs if o.output_type == 'display_data' and WIDGET_VIEW in o.data]
    assert len(shown) == 1, [o.get('data', {}).keys() for o in nb.cells[1].outputs]
    data = shown[0].data
    assert data['text/plain'].startswith('chosen lr = ')
    img = plt.imread(io.BytesIO(base64.b64decode(data['image/png'])))
    assert img.shape[:2] == (384, 720)
    printed = ''.join(o.get('text', '') for o in nb.cells[2].outputs)
    lr, valley = printed.split()[1:3]
    assert lr == valley, printed                                  # no browser: nothing moved it
    # a static page without the widget's saved state (the docs build, viewers without widget support) shows the PNG
    from nbconvert import HTMLExporter
    assert 'widgets' in nb.metadata         # nbclient saved the state: a page with it draws the widget
    del nb.metadata['widgets']
    body, _ = HTMLExporter(template_name='basic').from_notebook_node(nb)
    assert 'data:image/png;base64,' + data['image/png'][:40] in body.replace('\n', '')
