"""The offline docs site (tools/build_docs.py, `make docs`): rendered pages look right in a real browser,
show the API, load nothing from the network, hide what is hidden, and link to each other.

Uses the site in $LESSONLIB_DOCS_SITE when it holds index.html (.ci/run builds `_docs` first), else builds one
into a temporary folder (that runs every notebook: minutes; `make docs` then `LESSONLIB_DOCS_SITE=_docs pytest
tests/test_docs.py` reuses one). The browser checks need `chromium` (`apt-get install chromium`): skipped with a
reason when it is absent, except under CI=true, where they fail.
"""
import ast, os, re, shutil, subprocess, sys
from pathlib import Path

import pytest
import nbformat

ROOT = Path(__file__).resolve().parent.parent
IN_CI = os.environ.get('CI', '').lower() == 'true'
CHROMIUM_FLAGS = ['--headless', '--no-sandbox', '--disable-gpu', '--disable-background-networking',
                  '--disable-component-update', '--disable-sync', '--no-first-run', '--hide-scrollbars',
                  '--window-size=1280,2000', '--virtual-time-budget=3000']
DIRECTIVE_LINE = re.compile(r'^\s*#\s?\|\s*[\w-]+', re.M)


# ---------------------------------------------------------------- the site
@pytest.fixture(scope='session')
def site(tmp_path_factory):
    env = os.environ.get('LESSONLIB_DOCS_SITE')
    if env and (Path(env)/'index.html').exists(): return Path(env)
    if env: pytest.fail(f'LESSONLIB_DOCS_SITE={env} holds no index.html: the docs build failed (.ci/logs/docs.log)')
    out = tmp_path_factory.mktemp('site')/'_docs'
    r = subprocess.run([sys.executable, str(ROOT/'tools'/'build_docs.py'), '--out', str(out)], capture_output=True, text=True)
    assert r.returncode == 0, f'tools/build_docs.py failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}'
    assert (out/'index.html').exists(), f'tools/build_docs.py wrote no index.html in {out}'
    return out


def _pages(site): return sorted(site.rglob('*.html'))


def _source_nb(page):
    "The notebook a page was built from (build_docs records it in a <meta> tag)."
    m = re.search(r'<meta name="lessonlib:source" content="([^"]+)"', page.read_text(encoding='utf-8'))
    return ROOT/m.group(1) if m else None


def _page_for(site, nb_name):
    for p in _pages(site):
        src = _source_nb(p)
        if src is not None and src.name == nb_name: return p
    pytest.fail(f'no page of {site} was built from {nb_name} (pages: {[p.name for p in _pages(site)]})')


def _text(html_src):
    from bs4 import BeautifulSoup
    soup = BeautifulSoup(html_src, 'html.parser')
    for t in soup(['style', 'script']): t.decompose()
    return soup.get_text()


# ---------------------------------------------------------------- chromium
@pytest.fixture(scope='session')
def chromium():
    exe = shutil.which('chromium') or shutil.which('chromium-browser')
    if exe is None:
        msg = ('chromium is not installed; the docs screenshot test needs it: apt-get install chromium '
               '(Debian/Ubuntu; any Chromium or Chrome named `chromium` on the PATH works)')
        if IN_CI: pytest.fail(msg + ' and CI=true, where it must run (.ci/run installs it)')
        pytest.skip(msg)
    return exe


def _chromium(exe, tmp_path, url, *args, timeout=60):
    "Run headless chromium once with a fresh profile; return stdout."
    profile = tmp_path/f'profile-{len(list(tmp_path.iterdir()))}'
    cmd = [exe, *CHROMIUM_FLAGS, f'--user-data-dir={profile}', *args, url]
    try: r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired: pytest.fail(f'chromium took over {timeout}s on {url}')
    assert r.returncode == 0, f'chromium failed on {url} ({r.returncode}):\n{r.stderr[-2000:]}'
    return r.stdout


def _assert_not_blank(png, what):
    from PIL import Image, ImageStat
    im = Image.open(png).convert('RGB')
    assert im.size == (1280, 2000), f'{what}: screenshot is {im.size}, expected 1280x2000'
    small = im.resize((320, 500))
    colours = small.getcolors(maxcolors=1 << 16) or []
    stddev = max(ImageStat.Stat(im).stddev)
    import numpy as np
    non_white = float((np.asarray(small).min(axis=2) < 235).mean())
    assert stddev > 10, f'{what}: screenshot is (nearly) one flat colour (stddev {stddev:.1f}): {png}'
    assert len(colours) >= 20, f'{what}: screenshot has only {len(colours)} colours: {png}'
    assert 0.02 < non_white < 0.9, f'{what}: {non_white:.0%} of the screenshot is non-white: {png}'


@pytest.mark.parametrize('nb_name', ['index.ipynb', '05_metrics.ipynb', '12_learner.ipynb'])
def test_screenshot_not_blank(site, chromium, tmp_path, nb_name):
    page = site/'index.html' if nb_name == 'index.ipynb' else _page_for(site, nb_name)
    png = tmp_path/'shot.png'
    _chromium(chromium, tmp_path, page.as_uri(), f'--screenshot={png}')
    assert png.exists(), f'chromium wrote no screenshot of {page}'
    _assert_not_blank(png, page.name)


@pytest.mark.parametrize('nb_name,name,signature', [
    ('05_metrics.ipynb', 'fbeta', ['inp, targ, beta:float=2, thresh:float=0.2', 'zero_division']),
    ('12_learner.ipynb', 'Learner.fit_one_cycle', ['def fit_one_cycle(', 'lr_max', 'pct_start:float=0.25'])])
def test_api_page_in_browser(site, chromium, tmp_path, nb_name, name, signature):
    "The DOM chromium renders holds the exported function's heading and signature."
    page = _page_for(site, nb_name)
    dom = _chromium(chromium, tmp_path, page.as_uri(), '--dump-dom')
    text = re.sub(r'\s+', ' ', _text(dom))
    assert re.search(r'<h3 id="' + re.escape(name.lower()) + r'">', dom), f'{page.name}: no show_doc heading for {name}'
    for s in signature: assert s in text, f'{page.name}: the rendered page lacks {s!r} of {name}'


# ---------------------------------------------------------------- static checks (no browser)
def test_index_and_api_text(site):
    index = _text((site/'index.html').read_text(encoding='utf-8'))
    assert 'lessonlib' in index and 'pip install' in index
    metrics = re.sub(r'\s+', ' ', _text(_page_for(site, '05_metrics.ipynb').read_text(encoding='utf-8')))
    assert 'def fbeta(' in metrics and 'thresh:float=0.2' in metrics


_REMOTE = re.compile(r'<(?:script|link|iframe|img)\b[^>]*\b(?:src|href)\s*=\s*["\']?(?:https?:)?//'
                     r'|@import\s+(?:url\()?["\']?(?:https?:)?//|url\(\s*["\']?(?:https?:)?//', re.I)


def test_offline_no_directives_no_hidden_cells(site):
    pages = _pages(site)
    assert len(pages) >= 2
    for page in pages:
        src = page.read_text(encoding='utf-8')
        remote = [m.group(0) for m in _REMOTE.finditer(src)]
        assert not remote, f'{page.name} loads resources from the network: {remote[:3]}'
        from bs4 import BeautifulSoup
        soup = BeautifulSoup(src, 'html.parser')
        for s in soup.find_all('script'): assert not s.get('src'), f'{page.name}: external script {s.get("src")}'
        code = '\n'.join(pre.get_text() for pre in soup.find_all('pre'))
        found = DIRECTIVE_LINE.findall(code)
        assert not found, f'{page.name}: `#|` directives left in code: {found[:3]}'
        text = soup.get_text()
        assert 'nbdev_export()' not in text, f'{page.name}: the hidden `nbdev.nbdev_export()` cell is shown'
        nb_path = _source_nb(page)
        if nb_path is None or not nb_path.exists(): continue
        nb = nbformat.read(nb_path, as_version=4)
        hidden, shown = [], []
        for c in nb.cells:
            if c.cell_type != 'code': continue
            opts = ' '.join(l for l in c.source.splitlines() if l.lstrip().startswith('#|'))
            (hidden if re.search(r'\b(hide|include:\s*false)\b', opts) else shown).append(c.source)
        shown_src = '\n'.join(shown)
        for h in hidden:
            for line in h.splitlines():
                line = line.strip()
                if len(line) < 20 or line.startswith('#') or line in shown_src: continue
                assert line not in code, f'{page.name}: a line of a hidden cell of {nb_path.name} is shown: {line!r}'


def test_navigation(site):
    "Every page links to every other page, and every relative link resolves to a file of the site."
    from bs4 import BeautifulSoup
    from urllib.parse import urlsplit, unquote
    pages = _pages(site)
    all_pages = {p.resolve() for p in pages}
    for page in pages:
        soup = BeautifulSoup(page.read_text(encoding='utf-8'), 'html.parser')
        targets, broken = set(), []
        for tag, attr in (('a', 'href'), ('img', 'src'), ('link', 'href'), ('script', 'src')):
            for el in soup.find_all(tag):
                url = el.get(attr)
                if not url: continue
                u = urlsplit(url)
                if u.scheme or u.netloc or url.startswith(('#', 'mailto:', 'data:')): continue
                dest = (page.parent/unquote(u.path)).resolve()
                if not dest.is_file(): broken.append(url)
                elif tag == 'a': targets.add(dest)
        assert not broken, f'{page.relative_to(site)}: links that resolve to nothing: {broken[:10]}'
        missing = all_pages - targets - {page.resolve()}
        assert not missing, f'{page.relative_to(site)} has no link to {sorted(p.name for p in missing)}'


def _ids(page): return set(re.findall(r'\bid="([^"]+)"', page.read_text(encoding='utf-8')))


def test_exported_names_documented_and_anchors_resolve(site):
    """Every function and class a module exports has its show_doc entry on its page, and every `page.html#anchor` link
    (nbdev's doc links) lands on an entry. A cell with several `show_doc(...)` calls shows only the last one:
    give each its own cell."""
    from bs4 import BeautifulSoup
    from urllib.parse import urlsplit, unquote
    import importlib
    problems = []
    for page in _pages(site):
        nb_path = _source_nb(page)
        if nb_path is not None and nb_path.exists():
            srcs = '\n'.join(c.source for c in nbformat.read(nb_path, as_version=4).cells if c.cell_type == 'code')
            m = re.search(r'^#\|\s*default_exp\s+(\S+)', srcs, re.M)
            if m:
                mod = importlib.import_module(f'lessonlib.{m.group(1)}')
                ids = _ids(page)
                missing = [n for n in getattr(mod, '__all__', [])  # functions and classes (constants have no entry)
                           if callable(getattr(mod, n, None)) and n.lower() not in ids]
                if missing: problems.append(f'{page.name} ({nb_path.name}): no show_doc entry for {missing}')
        soup = BeautifulSoup(page.read_text(encoding='utf-8'), 'html.parser')
        dead = set()
        for a in soup.find_all('a'):
            u = urlsplit(a.get('href') or '')
            if u.scheme or u.netloc or not u.fragment: continue
            dest = (page.parent/unquote(u.path)).resolve() if u.path else page
            if dest.is_file() and dest.suffix == '.html' and u.fragment not in _ids(dest): dead.add(a['href'])
        if dead: problems.append(f'{page.name}: links to anchors that do not exist: {sorted(dead)}')
    assert not problems, '\n'.join(problems)


# ---------------------------------------------------------------- outputs and math
DISPLAY_CALLS = {'show_doc', 'display', 'print', 'show_batch', 'show_results', 'summary', 'show', 'imshow',
                 'plot', 'plot_loss', 'plot_lr_find', 'plot_confusion_matrix', 'plot_top_losses', 'show_image',
                 'show_images', 'show_points', 'show_masks'}
TST_FLAGS = {'colab', 'gpu', 'internet'}


def _directives(src):
    return [l.split('|', 1)[1].strip() for l in src.splitlines() if re.match(r'^\s*#\s?\|', l)]


def _call_name(node):
    f = node.func if isinstance(node, ast.Call) else None
    return f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else None


def expects_output(src):
    """Whether an example cell must show something: a top-level call that displays (show_doc, display, print,
    show_batch, summary, a plot), or a last line that is a bare value (not a call, not ending in `;`).
    Cells the docs hide, cells nbdev_test skips (colab, gpu, internet, `eval: false`) and `output: false` expect none."""
    opts = ' '.join(_directives(src))
    if re.search(r'\b(hide|include:\s*false|export_hide|eval:\s*false|output:\s*false)\b', opts): return False
    if TST_FLAGS & set(opts.split()) or 'nbdev_export(' in src: return False
    code = '\n'.join(l for l in src.splitlines() if not l.lstrip().startswith(('%', '!')))
    try: body = ast.parse(code).body
    except SyntaxError: return False
    if not body: return False
    calls = [_call_name(s.value) for s in body if isinstance(s, ast.Expr) and isinstance(s.value, ast.Call)]
    if DISPLAY_CALLS & set(filter(None, calls)): return True
    last = body[-1]
    if not isinstance(last, ast.Expr) or src.rstrip().endswith(';'): return False
    return not isinstance(last.value, (ast.Call, ast.Await, ast.Yield, ast.Constant)) or (
        isinstance(last.value, ast.Constant) and not isinstance(last.value.value, str))


def missing_outputs(page_html, nb):
    "The cells of `nb` that expect output but show none on the page (matched by the cell id nbconvert writes)."
    from bs4 import BeautifulSoup
    soup = BeautifulSoup(page_html, 'html.parser')
    missing = []
    for i, c in enumerate(nb.cells):
        if c.cell_type != 'code' or not expects_output(c.source): continue
        el = soup.find(id=f'cell-id={c.get("id")}')
        shown = el is not None and (el.find(class_='output_area') is not None if 'code_cell' in (el.get('class') or [])
                                     else bool(el.get_text(strip=True)))
        if not shown: missing.append(f'cell {i + 1} (id {c.get("id")}): {c.source.strip().splitlines()[-1][:80]}')
    return missing


def test_expects_output_rule():
    "The rule the outputs check uses, on cells whose answer is known."
    yes = ['x = 1\nx', 'dls.show_batch(max_n=4)', 'print(1)', 'show_doc(f)', 'm.summary()', 'a[0], b', 'x.shape',
           'plt.plot([1, 2])', '3 + 4']
    no = ['x = 1', 'test_eq(f(1), 2)', 'learn.fit(1)', 'x;', '#| hide\nx', '#| colab\ndls.show_batch()',
          '#| eval: false\nx', 'import torch', '"a docstring"', 'def f(): print(1)', '#| output: false\nx']
    for s in yes: assert expects_output(s), s
    for s in no: assert not expects_output(s), s


def test_missing_outputs_detects_a_bare_cell():
    "A cell that should show a value and has no output on its page is reported; with an output it is not."
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell('x = 1\nx'), nbformat.v4.new_code_cell('y = 2')])
    cid = nb.cells[0].id
    bare = f'<div class="cell code_cell" id="cell-id={cid}"><div class="input">x</div></div>'
    full = f'<div class="cell code_cell" id="cell-id={cid}"><div class="output_area"><pre>1</pre></div></div>'
    assert len(missing_outputs(bare, nb)) == 1 and 'cell 1' in missing_outputs(bare, nb)[0]
    assert missing_outputs(full, nb) == []
    assert len(missing_outputs('<html></html>', nb)) == 1   # a cell not on the page at all


def test_every_page_shows_its_outputs(site, record_property):
    "Every page built from a notebook shows the output of each example cell that should have one."
    checked, problems = [], []
    for page in _pages(site):
        nb_path = _source_nb(page)
        if nb_path is None or not nb_path.exists(): continue
        nb = nbformat.read(nb_path, as_version=4)
        missing = missing_outputs(page.read_text(encoding='utf-8'), nb)
        n = sum(c.cell_type == 'code' and expects_output(c.source) for c in nb.cells)
        checked.append(f'{page.relative_to(site)} ({nb_path.relative_to(ROOT)}): {n - len(missing)}/{n} cells show output')
        if missing: problems.append(f'{page.relative_to(site)} ({nb_path.relative_to(ROOT)}): no output for\n    '
                                    + '\n    '.join(missing))
    record_property('pages_checked', '; '.join(checked))
    print('pages checked for outputs:\n' + '\n'.join(checked))
    nbs = [p for p in (ROOT/'nbs').rglob('*.ipynb') if not any(q.startswith(('_', '.')) for q in p.relative_to(ROOT/'nbs').parts)]
    assert len(checked) == len(nbs), f'{len(checked)} pages checked for {len(nbs)} notebooks'
    assert not problems, ('pages without the outputs of their examples (the docs build runs the notebooks: '
                          'see its log):\n' + '\n'.join(problems))


def test_math_rendered_offline(site):
    "Every `$...$` / `$$...$$` in a notebook's markdown is KaTeX HTML on its page, styled by the bundled stylesheet."
    from bs4 import BeautifulSoup
    pages_with_math = 0
    for page in _pages(site):
        nb_path = _source_nb(page)
        if nb_path is None or not nb_path.exists(): continue
        md = '\n'.join(c.source for c in nbformat.read(nb_path, as_version=4).cells if c.cell_type == 'markdown')
        md = re.sub(r'```.*?```|`[^`\n]*`', '', md, flags=re.S)
        n_display = len(re.findall(r'\$\$.+?\$\$', md, re.S))
        n_inline = len(re.findall(r'(?<![\\$\w])\$(?=\S)[^$\n]+?(?<=\S)\$(?![\w$])', re.sub(r'\$\$.+?\$\$', '', md, flags=re.S)))
        src = page.read_text(encoding='utf-8')
        soup = BeautifulSoup(src, 'html.parser')
        katex = soup.find_all(class_='katex')
        assert len(katex) == n_display + n_inline, (
            f'{page.name}: {len(katex)} formulas rendered, {n_display} display + {n_inline} inline in {nb_path.name}')
        assert len(soup.find_all(class_='katex-display')) == n_display, f'{page.name}: display math not in display mode'
        text = soup.get_text()
        assert 'KATEXMATH' not in src and '$$' not in text, f'{page.name}: math left unrendered'
        if not katex: continue
        pages_with_math += 1
        css = [l['href'] for l in soup.find_all('link', rel='stylesheet') if 'katex' in l['href']]
        assert css and (page.parent/css[0]).is_file(), f'{page.name}: no KaTeX stylesheet in the site'
        fonts = re.findall(r'url\(([^)]+\.woff2)\)', (page.parent/css[0]).read_text(encoding='utf-8'))
        assert fonts and all(((page.parent/css[0]).parent/f).is_file() for f in fonts), 'KaTeX fonts missing'
    assert pages_with_math >= 1, 'no page has math: the check did not run'


def _build_docs_module():
    import importlib.util
    spec = importlib.util.spec_from_file_location('build_docs_under_test', ROOT/'tools'/'build_docs.py')
    mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)
    return mod


def test_run_notebook_skips_flagged_cells_and_names_the_failing_cell(tmp_path):
    "The docs build runs a notebook as nbdev_test does, keeps its outputs by cell id, and names the cell that failed."
    bd = _build_docs_module()
    cells = [nbformat.v4.new_code_cell('x = 41\nx + 1'), nbformat.v4.new_code_cell('#| colab\nraise ValueError("colab only")'),
             nbformat.v4.new_code_cell('#| eval: false\nraise ValueError("never run")'), nbformat.v4.new_code_cell('print("hi")')]
    nb = nbformat.v4.new_notebook(cells=cells)
    fn = tmp_path/'ok.ipynb'; nbformat.write(nb, fn)
    outputs, times, err = bd._run_notebook(str(fn), ['colab', 'gpu', 'internet'], str(ROOT))
    assert err is None, err
    assert outputs[cells[0].id][0]['data']['text/plain'] == '42' and outputs[cells[3].id][0]['text'] == 'hi\n'
    assert cells[1].id not in outputs and cells[2].id not in outputs
    nb.cells.insert(1, nbformat.v4.new_code_cell('y = 1\n1 / 0'))
    nbformat.write(nb, fn)
    outputs, times, err = bd._run_notebook(str(fn), ['colab', 'gpu', 'internet'], str(ROOT))
    assert err is not None and 'cell 2' in err and '1 / 0' in err and 'ZeroDivisionError' in err, err
    assert cells[3].id not in outputs    # stops at the first failure, as nbdev_test does
