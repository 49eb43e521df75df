"""Build the documentation site offline, without Quarto.

nbdev processes the notebooks into `_proc/` (show_doc output, hidden cells removed,
doc links), exactly as it does before a Quarto render. We then render `_proc/` to plain
static HTML with nbconvert: `#|` directives stripped, hidden cells dropped, a sidebar
for navigation between pages, and no script or style fetched from a CDN.

Pages are named as Quarto names them (the `output-file` nbdev puts in each notebook's
front matter, e.g. `05_metrics.ipynb` -> `metrics.html`), and nbdev's doc links to the
real site (`doc_host` + `doc_baseurl`) are made relative, so they work offline.
Each page records its notebook in `<meta name="lessonlib:source" content="nbs/...ipynb">`.

The notebooks are run first, once each, as `nbdev_test` runs them (cells flagged with `tst_flags` from
settings.ini, `eval: false` and `nbdev_export()` skipped; `--workers` at a time, default 2), and every page shows
the outputs: this is also the notebook test (a failing cell fails the build, naming the notebook and the cell; the
log ends with `notebooks: N passed, M failed`). Math in markdown cells (`$...$`, `$$...$$`) is rendered to HTML by
KaTeX (tools/package.json, installed with `npm ci` on first use; Node.js needed), its CSS and fonts copied into the site.

Usage: python tools/build_docs.py [--out _docs] [--workers 2] [--only GLOB] [--no-exec]   (or: make docs)
Where Quarto is installed, `nbdev_docs` builds the real site from the same `_quarto.yml`.
"""
import argparse, fnmatch, html, json, os, re, shutil, sys, tempfile, time, traceback
from pathlib import Path

import nbformat
from nbconvert import HTMLExporter

ROOT = Path(__file__).resolve().parent.parent
TOOLS = ROOT/'tools'
DIRECTIVE = re.compile(r'^\s*#\s?\|')


def _pygments_css():
    from pygments.formatters import HtmlFormatter
    return HtmlFormatter(style='default').get_style_defs('.highlight')


CSS = """
.badge{display:inline-block;background:#f9ab00;color:#fff;border-radius:3px;padding:.1rem .5rem;font-size:.85rem;font-weight:600}
body{margin:0;font-family:-apple-system,'Segoe UI',Roboto,Helvetica,Arial,sans-serif;color:#212529;line-height:1.5;background:#fff}
.layout{display:flex;min-height:100vh}
nav.sidebar{width:250px;flex:none;background:#f4f6f8;border-right:1px solid #dde;padding:1rem;box-sizing:border-box;
  position:sticky;top:0;height:100vh;overflow-y:auto}
nav.sidebar h2{font-size:1.25rem;margin:0 0 .6rem 0}
nav.sidebar h2 a{color:#2780e3;text-decoration:none}
nav.sidebar .section{font-weight:600;margin-top:.9rem;color:#555;text-transform:capitalize}
nav.sidebar ul{list-style:none;padding-left:.3rem;margin:.2rem 0}
nav.sidebar li{margin:.2rem 0}
nav.sidebar a{color:#333;text-decoration:none}
nav.sidebar a:hover{color:#2780e3}
nav.sidebar a.current{color:#2780e3;font-weight:600}
main{flex:1;min-width:0;max-width:1000px;padding:1.5rem 2.5rem 3rem;box-sizing:border-box}
h1.title{margin:0 0 .3rem 0;font-size:2.2rem}
p.description{font-size:1.15rem;color:#5a6570;margin:.2rem 0 1.2rem}
h2{border-bottom:1px solid #e3e6ea;padding-bottom:.2rem;margin-top:2rem}
h3{margin-top:1.4rem}
a{color:#2780e3}
a.anchor-link{visibility:hidden;margin-left:.3rem;text-decoration:none;color:#aab;font-weight:normal}
h1:hover a.anchor-link,h2:hover a.anchor-link,h3:hover a.anchor-link,h4:hover a.anchor-link{visibility:visible}
pre{background:#f7f7f9;padding:.6rem .8rem;border-radius:4px;overflow-x:auto;font-size:.86rem;line-height:1.4;margin:.4rem 0}
code{font-family:SFMono-Regular,Menlo,Consolas,'Liberation Mono',monospace;font-size:.9em;color:#9a3d5b}
pre code,a code{color:inherit}
.cell{margin:.6rem 0}
.input_area .highlight pre{border-left:3px solid #c8d3e0}
.output_area pre{background:#fff;border:1px solid #eee;border-left:3px solid lightsalmon;margin-left:.8rem}
.output_stderr pre{background:#fff5f5}
.output_subarea img{display:block;margin:.3rem .8rem}
a.source-link{float:right;font-size:smaller}
.doc-signature pre{background:#f1f5fb;border-left:3px solid #2780e3;white-space:pre-wrap}
.katex-display{overflow-x:auto;overflow-y:hidden;margin:.6rem 0}
table{border-collapse:collapse;margin:.5rem 0;font-size:.92rem}
td,th{border:1px solid #ddd;padding:.25rem .6rem;text-align:left}
th{background:#f4f6f8}
blockquote{border-left:3px solid #dde;margin:.5rem 0;padding:.1rem 1rem;color:#555}
img{max-width:100%}
hr{border:0;border-top:1px solid #e3e6ea;margin:1.5rem 0 .8rem}
.footer-nav{display:flex;justify-content:space-between;margin-top:3rem;border-top:1px solid #ddd;padding-top:1rem}
.footer-nav a{text-decoration:none}
.prompt,.jp-InputPrompt,.jp-OutputPrompt{display:none}
"""

PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="lessonlib:source" content="{source}">
<title>{plain_title} – lessonlib</title>
{head}
<style>{css}</style></head>
<body><div class="layout">
<nav class="sidebar"><h2><a href="{root}index.html">lessonlib</a></h2>{nav}</nav>
<main><h1 class="title">{title}</h1>{description}
{body}
<div class="footer-nav">{prev}{next}</div>
</main></div></body></html>
"""


def process_notebooks():
    "Run nbdev's notebook processing (what `nbdev_proc_nbs` does, minus the Quarto install) into `_proc/`."
    from nbdev.config import get_config
    from nbdev.quarto import refresh_quarto_yml, nbdev_sidebar
    from nbdev.serve import proc_nbs
    import nbdev.doclinks
    cfg = get_config()
    refresh_quarto_yml()
    nbdev.doclinks._build_modidx()
    nbdev_sidebar.__wrapped__(path=cfg.nbs_path)
    try: return proc_nbs(cfg.nbs_path, force=True, n_workers=0)
    except Exception as e:
        raise SystemExit(
            f'nbdev could not process the notebooks for the docs: {e}\n'
            'nbdev runs (while building the docs, here and under Quarto) every cell that is exported, '
            'calls show_doc, or contains an import. A cell that mixes imports with other code is therefore run '
            'on its own, without the cells above it: put imports in a cell of their own (see CONTRIBUTING.md).') from e


def _run_notebook(fn, skip_flags, basepath):
    """Run one notebook as `nbdev_test` does (cells flagged `skip_flags`, `eval: false` and `nbdev_export()` are
    skipped; in the notebook's folder). Returns (outputs by cell id, (wall, CPU) seconds, error message or None)."""
    from fastcore.xtras import working_directory
    from nbdev.process import NBProcessor
    from nbdev.frontmatter import FrontmatterProc
    from execnb.shell import CaptureShell
    if basepath not in sys.path: sys.path.insert(0, basepath)
    os.environ['IN_TEST'] = '1'
    fn = Path(fn)
    nb = NBProcessor(fn, procs=FrontmatterProc, process=True).nb
    start, cpu = time.time(), _cpu()
    if str(getattr(nb, 'frontmatter_', {}).get('skip_exec', '')).lower() in ('true', '1', 'yes'): return {}, (0.0, 0.0), None
    def skip(cell):
        if cell.cell_type != 'code' or 'nbdev_export' + '(' in cell.source: return True
        direc = getattr(cell, 'directives_', {}) or {}
        if direc.get('eval:', [''])[0].lower() == 'false': return True
        return bool(set(skip_flags) & direc.keys())
    shell, outputs = CaptureShell(fn), {}
    with working_directory(fn.parent):
        for i, cell in enumerate(nb.cells):
            if skip(cell): continue
            shell.cell(cell)
            if cell.get('outputs'): outputs[cell.get('id')] = _plain(cell.outputs)
            if shell.exc:
                tb = ''.join(traceback.format_exception(type(shell.exc), shell.exc, shell.exc.__traceback__))
                head = '\n'.join(cell.source.splitlines()[:6])
                return outputs, (time.time() - start, _cpu() - cpu), f'cell {i + 1} (id {cell.get("id")}) failed:\n{head}\n{tb}'
    return outputs, (time.time() - start, _cpu() - cpu), None


def _cpu():
    "CPU seconds used by this process and its finished children (a machine shared with others inflates wall time)."
    import resource
    return sum(r.ru_utime + r.ru_stime for r in map(resource.getrusage, (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)))


def _plain(outputs):
    "execnb's outputs as plain JSON-able dicts, multi-line text joined (as nbformat stores it in memory)."
    res = []
    for o in outputs:
        o = json.loads(json.dumps(o, default=dict))
        if isinstance(o.get('text'), list): o['text'] = ''.join(o['text'])
        for k, v in (o.get('data') or {}).items():
            if isinstance(v, list): o['data'][k] = ''.join(v)
        res.append(o)
    return res


def execute_notebooks(n_workers=2, only=None):
    """Run every notebook nbdev_test would, `n_workers` at a time (one torch thread each), sorted by path.
    Returns ({notebook path relative to nbs: {cell id: outputs}}, failures as (notebook, message))."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor
    from nbdev.config import get_config
    from nbdev.doclinks import nbglob
    cfg = get_config()
    flags = cfg.get('tst_flags', '').split()
    files = sorted(Path(f).absolute() for f in nbglob(cfg.nbs_path, as_path=True))
    if only: files = [f for f in files if fnmatch.fnmatch(f.relative_to(cfg.nbs_path.absolute()).as_posix(), only)]
    os.environ.setdefault('OMP_NUM_THREADS', '1')
    print(f'running {len(files)} notebooks, {n_workers} at a time (skipping cells flagged {" ".join(flags)})', flush=True)
    # The workers look the function up by module name: IPython replaces a worker's __main__ once it runs a notebook.
    if str(TOOLS) not in sys.path: sys.path.insert(0, str(TOOLS))
    import build_docs
    results, failures = {}, []
    with ProcessPoolExecutor(max(1, n_workers), mp_context=multiprocessing.get_context('fork')) as pool:
        futures = {f: pool.submit(build_docs._run_notebook, str(f), flags, str(cfg.config_path)) for f in files}
        for f, fut in futures.items():
            rel = f.relative_to(cfg.nbs_path.absolute()).as_posix()
            try: outputs, (secs, cpu), err = fut.result()
            except Exception as e: outputs, (secs, cpu), err = {}, (0.0, 0.0), f'the worker running it crashed: {e!r}'
            results[rel] = outputs
            print(f'{"FAILED" if err else "ok":6s} {secs:6.1f}s  nbs/{rel}  (CPU {cpu:.1f}s)', flush=True)
            if err: failures.append((rel, err))
    return results, failures


def add_outputs(proc, results):
    "Give each processed notebook's code cells the outputs the run produced (matched by cell id; show_doc output kept)."
    for rel, outputs in results.items():
        p = proc/rel
        if not p.exists() or not outputs: continue
        nb = nbformat.read(p, as_version=4)
        for cell in nb.cells:
            if cell.cell_type == 'code' and not cell.get('outputs') and cell.get('id') in outputs:
                cell.outputs = [nbformat.from_dict(o) for o in outputs[cell.id]]
        nbformat.write(nb, p)


def frontmatter(nb):
    "Title, description and output file from nbdev's front matter (a raw `---` cell), else from `# Title` / `> description`."
    import yaml
    fm = {}
    for cell in nb.cells:
        src = cell.source.strip()
        if cell.cell_type in ('raw', 'markdown') and src.startswith('---'):
            m = re.match(r'^---\n(.*?)\n---', src + '\n', re.S)
            if m:
                try: fm = yaml.safe_load(m.group(1)) or {}
                except yaml.YAMLError: fm = {}
        break
    title, desc = fm.get('title'), fm.get('description')
    if title is None:
        for cell in nb.cells:
            if cell.cell_type != 'markdown' or cell.source.lstrip().startswith('<!--'): continue
            m = re.match(r'#\s+(.+)', cell.source.strip())
            if m: title = m.group(1).strip()
            m = re.search(r'^>\s*(.+)$', cell.source, re.M)
            if m and desc is None: desc = m.group(1).strip()
            break
    return title, desc, fm.get('output-file')


_QLINK = re.compile(r'\[([^\]\n]+)\]\(([^)\s]+)\)\{([^}\n]*)\}')


def quarto_links(md):
    "Quarto's `[text](url){target=\"_blank\" .cls}` link attributes -> an HTML link (nbconvert's markdown lacks them)."
    def rep(m):
        text, url, attrs = m.groups()
        kv = dict(re.findall(r'([\w-]+)="([^"]*)"', attrs))
        classes = re.findall(r'(?:^|\s)\.([\w-]+)', attrs)
        if text == 'source': classes.append('source-link'); kv.pop('style', None)
        a = f'<a href="{html.escape(url)}"'
        if classes: a += f' class="{" ".join(classes)}"'
        a += ''.join(f' {k}="{html.escape(v)}"' for k, v in kv.items() if k != 'class')
        return a + f'>{text}</a>'
    return _QLINK.sub(rep, md)


def _asis(cell):
    "The markdown (or HTML) an `output: asis` cell (show_doc) produces, to render as part of the page."
    parts = []
    for o in cell.get('outputs', []):
        data = o.get('data', {})
        if 'text/markdown' in data: parts.append(''.join(data['text/markdown']))
        elif 'text/html' in data: parts.append(''.join(data['text/html']))
        elif o.get('output_type') == 'stream': parts.append('```\n' + ''.join(o.get('text', '')) + '\n```')
    md = '\n\n'.join(parts)
    # show_doc's signature block: mark it so it can be styled apart from example code
    md = re.sub(r'^(#{2,4} .+\n\n)(```python\n.*?\n```)', r'\1<div class="doc-signature">\n\n\2\n\n</div>', md, flags=re.S | re.M)
    new = nbformat.v4.new_markdown_cell(quarto_links(md))
    if cell.get('id'): new.id = cell.id
    return new


def clean(nb):
    "Drop hidden cells and the front matter, strip `#|` directives, honour echo/output/include, inline `output: asis`."
    cells = []
    for i, cell in enumerate(nb.cells):
        src = cell.source
        if i == 0 and cell.cell_type in ('raw', 'markdown') and src.lstrip().startswith('---'): continue  # front matter
        if cell.cell_type == 'raw': continue
        lines = src.splitlines()
        opts = ' '.join(l for l in lines if DIRECTIVE.match(l))
        if re.search(r'\b(hide|include:\s*false|export_hide)\b', opts): continue
        if cell.cell_type == 'markdown':
            if src.strip().startswith('<!-- WARNING: THIS FILE WAS AUTOGENERATED'): continue
            cell.source = quarto_links(src)
            cells.append(cell); continue
        if cell.cell_type != 'code': continue
        if re.search(r'output:\s*asis', opts):
            if cell.get('outputs'): cells.append(_asis(cell))
            continue
        cell.source = '\n'.join(l for l in lines if not DIRECTIVE.match(l)).strip('\n')
        if re.search(r'echo:\s*false', opts): cell.metadata['transient'] = {'remove_source': True}
        if re.search(r'output:\s*false', opts): cell.outputs = []
        if not cell.source and not cell.get('outputs'): continue
        cells.append(cell)
    nb.cells = cells
    return nb


def page_order(proc):
    "Notebooks in reading order: index first, then top-level notebooks by name, then each folder, lessons/ last."
    nbs = sorted(p for p in proc.rglob('*.ipynb') if not any(q.startswith(('_', '.')) for q in p.relative_to(proc).parts))
    def key(p):
        parts = p.relative_to(proc).parts
        return (parts[0] != 'index.ipynb', len(parts) > 1, parts[0] == 'lessons', str(p))
    return sorted(nbs, key=key)


def inline_md(s):
    "Escape a title or description, rendering its `code` spans."
    return re.sub(r'`([^`]+)`', r'<code>\1</code>', html.escape(s))


def nav_html(pages, current, root):
    out, section = [], None
    for rel, title in pages:
        sec = rel.parent.as_posix() if len(rel.parts) > 1 else ''
        if sec != section:
            if section is not None: out.append('</ul>')
            if sec: out.append(f'<div class="section">{html.escape(re.sub(r"^[0-9]+_", "", rel.parent.name))}</div>')
            out.append('<ul>'); section = sec
        cls = ' class="current"' if rel == current else ''
        out.append(f'<li><a{cls} href="{root}{rel.as_posix()}">{inline_md(title)}</a></li>')
    out.append('</ul>')
    return '\n'.join(out)


def pandoc_id(text):
    "The identifier pandoc (and so Quarto, and nbdev's doc links) gives a heading."
    t = html.unescape(re.sub(r'<[^>]+>', '', text)).strip().lower()
    t = re.sub(r'[^\w\s.-]', '', t)
    t = re.sub(r'\s+', '-', t)
    return re.sub(r'^[^a-z]+', '', t) or 'section'


_HEAD = re.compile(r'<h([1-6]) id="([^"]*)">(.*?)<a class="anchor-link" href="#[^"]*">¶</a></h\1>', re.S)


def fix_body(body, rel, page_files, site_prefix):
    "Pandoc heading ids, site links made relative, display math marked."
    seen, ids = set(), {}
    def head(m):
        lvl, old, inner = m.groups()
        new = base = pandoc_id(inner); n = 0
        while new in seen: n += 1; new = f'{base}-{n}'
        seen.add(new); ids[old] = new
        return f'<h{lvl} id="{new}">{inner}<a class="anchor-link" href="#{new}">¶</a></h{lvl}>'
    body = _HEAD.sub(head, body)
    body = re.sub(r'href="#([^"]+)"', lambda m: f'href="#{ids.get(html.unescape(m.group(1)), m.group(1))}"', body)
    root = '../' * (len(rel.parts) - 1)
    if site_prefix:
        def link(m):
            path, frag = m.group(1), m.group(2) or ''
            return f'href="{root}{path}{frag}"' if path in page_files else m.group(0)
        body = re.sub(r'href="' + re.escape(site_prefix.rstrip('/')) + r'/([^"#]*\.html)(#[^"]*)?"', link, body)
    return body


_CODE = re.compile(r'(```.*?```|~~~.*?~~~|`[^`\n]*`)', re.S)
_MATH = re.compile(r'\$\$(.+?)\$\$|(?<![\\$\w])\$(?=\S)([^$\n]+?)(?<=\S)\$(?![\w$])', re.S)


def extract_math(md, found):
    "Replace `$$display$$` and `$inline$` math outside code by placeholders; append (tex, display) to `found`."
    def rep(m):
        found.append((m.group(1) if m.group(1) is not None else m.group(2), m.group(1) is not None))
        return f'KATEXMATH{len(found) - 1}END'
    parts = _CODE.split(md)
    return ''.join(part if i % 2 else _MATH.sub(rep, part) for i, part in enumerate(parts))


def katex_dir():
    "KaTeX from the npm registry (tools/package.json, pinned by package-lock.json), installed on first use."
    if not shutil.which('node'):
        raise SystemExit('the docs render their math with KaTeX, which needs Node.js: install it '
                         '(Debian/Ubuntu: apt-get install nodejs npm), then rerun')
    kdir = TOOLS/'node_modules'/'katex'
    if not (kdir/'package.json').exists():
        if not shutil.which('npm'): raise SystemExit('npm is missing (Debian/Ubuntu: apt-get install npm): it installs KaTeX')
        import subprocess
        r = subprocess.run(['npm', 'ci', '--no-audit', '--no-fund'], cwd=TOOLS, capture_output=True, text=True)
        if r.returncode: raise SystemExit(f'npm ci in {TOOLS} failed (it installs KaTeX for the math):\n{r.stderr[-2000:]}')
    return kdir


def render_math(formulas):
    "HTML for each (tex, display) pair, rendered by KaTeX in one Node.js run (tools/render_math.js)."
    if not formulas: return []
    import subprocess
    katex_dir()
    r = subprocess.run(['node', str(TOOLS/'render_math.js')], input=json.dumps(formulas), capture_output=True,
                       text=True, cwd=TOOLS)
    if r.returncode: raise SystemExit(f'tools/render_math.js failed:\n{r.stderr[-2000:]}')
    return json.loads(r.stdout)


def math_to_placeholders(loaded):
    "Take the math out of every page's markdown cells; return the formulas as (tex, display, page)."
    formulas = []
    for rel, _, _, _, nb in loaded:
        for cell in nb.cells:
            if cell.cell_type != 'markdown': continue
            found = []
            cell.source = _shift(extract_math(cell.source, found), len(formulas))
            formulas.extend((tex, disp, rel) for tex, disp in found)
    return formulas


def _shift(md, offset):
    "Number a cell's placeholders from `offset` (each cell numbers its own from 0)."
    return re.sub(r'KATEXMATH(\d+)END', lambda m: f'KATEXMATH{int(m.group(1)) + offset}END', md)


def copy_katex(dest):
    "KaTeX's stylesheet and fonts, into the site (so the math renders offline)."
    dist = katex_dir()/'dist'
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copy(dist/'katex.min.css', dest/'katex.min.css')
    shutil.copytree(dist/'fonts', dest/'fonts', dirs_exist_ok=True)


def put_math(body, rendered):
    "Replace the placeholders by KaTeX's HTML."
    return re.sub(r'KATEXMATH(\d+)END', lambda m: rendered[int(m.group(1))], body)


def render_site(proc, out, site_prefix=None):
    "Render every processed notebook to `out/` as a static page with navigation."
    exporter = HTMLExporter(template_name='basic')
    exporter.exclude_input_prompt = exporter.exclude_output_prompt = True
    nbs_path = proc.parent/'nbs'
    loaded = []
    for p in page_order(proc):
        nb = nbformat.read(p, as_version=4)
        title, desc, ofile = frontmatter(nb)
        nbrel = p.relative_to(proc)
        rel = nbrel.parent/ofile if ofile else nbrel.with_suffix('.html')
        loaded.append((rel, nbrel, title or p.stem, desc, clean(nb)))
    pages = [(rel, title) for rel, _, title, _, _ in loaded]
    page_files = {rel.as_posix() for rel, _ in pages}
    if len(page_files) != len(pages): raise SystemExit(f'two notebooks render to the same page: {sorted(r.as_posix() for r, _ in pages)}')
    out.parent.mkdir(parents=True, exist_ok=True)
    formulas = math_to_placeholders(loaded)
    rendered = render_math([(tex, disp) for tex, disp, _ in formulas])
    bad = [f'{page}: ${tex}$: {r["error"]}' for (tex, _, page), r in zip(formulas, rendered) if 'error' in r]
    if bad: raise SystemExit('KaTeX cannot render this math (fix the TeX in the notebook):\n' + '\n'.join(bad))
    rendered = [r['html'] for r in rendered]
    tmp = Path(tempfile.mkdtemp(prefix='.docs-', dir=out.parent))
    try:
        if formulas: copy_katex(tmp/'katex')
        for i, (rel, nbrel, title, desc, nb) in enumerate(loaded):
            body, res = exporter.from_notebook_node(nb)
            body = offline_images(body)
            root = '../' * (len(rel.parts) - 1)
            dest = tmp/rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            for name, data in (res.get('outputs') or {}).items(): (dest.parent/name).write_bytes(data)
            link = lambda j, label: (f'<a href="{root}{pages[j][0].as_posix()}">{label}</a>'
                                     if 0 <= j < len(pages) else '<span></span>')
            dest.write_text(PAGE.format(
                title=inline_md(title), plain_title=html.escape(title.replace('`', '')), css=CSS + _pygments_css(), root=root, nav=nav_html(pages, rel, root),
                source=html.escape(f'{nbs_path.name}/{nbrel.as_posix()}'),
                body=put_math(fix_body(body, rel, page_files, site_prefix), rendered),
                head=f'<link rel="stylesheet" href="{root}katex/katex.min.css">' if formulas else '',
                description=f'<p class="description">{inline_md(desc)}</p>' if desc else '',
                prev=link(i - 1, f'← {inline_md(pages[i-1][1]) if i else ""}'),
                next=link(i + 1, f'{inline_md(pages[i+1][1]) if i + 1 < len(pages) else ""} →')), encoding='utf-8')
        check_offline(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True); raise
    if out.exists(): shutil.rmtree(out)
    tmp.rename(out)
    return [out/rel for rel, *_ in loaded]


_REMOTE_IMG = re.compile(r'<img\b[^>]*\bsrc="(?:https?:)?//[^"]*"[^>]*>', re.I)

def offline_images(body: str) -> str:
    "Replace images from the network (e.g. the Colab badge) by their alt text, so pages stay whole offline."
    def _alt(m):
        alt = re.search(r'alt="([^"]*)"', m.group(0))
        return f'<span class="badge">{alt.group(1) if alt else "image"}</span>'
    return _REMOTE_IMG.sub(_alt, body)


_REMOTE = re.compile(r'<(?:script|link|iframe|img)\b[^>]*\b(?:src|href)="(?:https?:)?//[^"]+"|@import\s+(?:url\()?["\']?(?:https?:)?//'
                     r'|url\(["\']?(?:https?:)?//', re.I)


def check_offline(site):
    "Fail if any page would fetch a script, stylesheet or frame from the network."
    bad = [f'{f.relative_to(site)}: {m.group(0)[:120]}' for f in site.rglob('*.html')
           for m in _REMOTE.finditer(f.read_text(encoding='utf-8'))]
    if bad: raise SystemExit('pages load remote resources:\n' + '\n'.join(bad))


def report_failures(failures, total):
    "Print each failed notebook with its cell and traceback, then the count line .ci/run reads."
    for rel, err in failures: print(f'\n=== nbs/{rel}: {err}', file=sys.stderr)
    if failures: print('notebooks that failed: ' + ' '.join(f'nbs/{rel}' for rel, _ in failures), file=sys.stderr)
    print(f'notebooks: {total - len(failures)} passed, {len(failures)} failed', flush=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--out', default='_docs', help='output folder (default: _docs)')
    ap.add_argument('--workers', type=int, default=int(os.environ.get('LESSONLIB_DOCS_WORKERS', 2)),
                    help='notebooks run at once (default: 2, one torch thread each)')
    ap.add_argument('--no-exec', action='store_true',
                    help='do not run the notebooks: pages show only the outputs stored in them (quick, incomplete)')
    ap.add_argument('--only', help='run only the notebooks matching this glob (e.g. "05_*"); the others show stored outputs')
    args = ap.parse_args(argv)
    out = Path(args.out) if Path(args.out).is_absolute() else (ROOT/args.out).resolve()
    cwd = os.getcwd()
    os.chdir(ROOT)  # nbdev finds settings.ini from the working directory
    failures = []
    try:
        from nbdev.config import get_config
        cfg = get_config()
        results, t0 = {}, time.time()
        # Run the notebooks first, before this process imports torch (the workers are forked from it).
        if not args.no_exec:
            results, failures = execute_notebooks(args.workers, args.only)
            report_failures(failures, len(results))
        t1 = time.time()
        proc = Path(process_notebooks())
        add_outputs(proc, results)
        t2 = time.time()
        files = render_site(proc, out, site_prefix=f"{cfg.doc_host}{cfg.doc_baseurl}")
        print(f'time: running the notebooks {t1 - t0:.0f}s, nbdev processing {t2 - t1:.0f}s, '
              f'rendering {time.time() - t2:.0f}s', flush=True)
    finally: os.chdir(cwd)
    print(f'built {len(files)} pages in {out}')
    if failures: raise SystemExit(f'{len(failures)} notebook(s) failed (above); the site was built anyway')
    return files


if __name__ == '__main__':
    main()
