"""Build the documentation site offline, without Quarto.

nbdev processes the notebooks into `_proc/` (show_doc output, hidden cells removed,
doc links), exactly as it does before a Quarto render. We then render `_proc/` to plain
static HTML with nbconvert: `#|` directives stripped, hidden cells dropped, a sidebar
for navigation between pages, and no script or style fetched from a CDN.

Usage: python tools/build_docs.py [--out _docs]   (or: make docs)
Where Quarto is installed, `nbdev_docs` builds the real site from the same `_quarto.yml`.
"""
import argparse, html, json, re, shutil, sys, tempfile
from pathlib import Path

import nbformat
from nbconvert import HTMLExporter

ROOT = Path(__file__).resolve().parent.parent
DIRECTIVE = re.compile(r'^\s*#\s?\|')

CSS = """
body{margin:0;font-family:-apple-system,'Segoe UI',Roboto,Helvetica,Arial,sans-serif;color:#212529;line-height:1.5}
.layout{display:flex;min-height:100vh}
nav.sidebar{width:250px;flex:none;background:#f4f6f8;border-right:1px solid #dde;padding:1rem;box-sizing:border-box}
nav.sidebar h2{font-size:1.1rem;margin:0 0 .6rem 0}
nav.sidebar h2 a{color:#2780e3;text-decoration:none}
nav.sidebar .section{font-weight:600;margin-top:.8rem;color:#555;text-transform:capitalize}
nav.sidebar ul{list-style:none;padding-left:.3rem;margin:.2rem 0}
nav.sidebar li{margin:.15rem 0}
nav.sidebar a{color:#333;text-decoration:none}
nav.sidebar a.current{color:#2780e3;font-weight:600}
main{flex:1;max-width:980px;padding:1.5rem 2.5rem;box-sizing:border-box;overflow-x:auto}
h1.title{margin-top:0}
p.description{font-style:italic;font-size:1.2rem;opacity:.75}
pre{background:#f7f7f9;padding:.6rem .8rem;border-radius:4px;overflow-x:auto;font-size:.88rem}
code{font-family:SFMono-Regular,Menlo,Consolas,monospace;font-size:.9em}
.cell{margin-bottom:1rem}
.output pre,.output_area pre{background:none;border-left:2px solid lightsalmon;margin-left:.8rem}
table{border-collapse:collapse;margin:.5rem 0}
td,th{border:1px solid #ddd;padding:.25rem .6rem;text-align:right}
img{max-width:100%}
.footer-nav{display:flex;justify-content:space-between;margin-top:3rem;border-top:1px solid #ddd;padding-top:1rem}
.jp-InputPrompt,.jp-OutputPrompt,.prompt{display:none}
"""

PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title} – lessonlib</title>
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
    return proc_nbs(cfg.nbs_path, force=True, n_workers=0)


def frontmatter(nb):
    "Title and description from the first markdown cell (`# Title` and `> description`) or the `---` block."
    title, desc = None, None
    for cell in nb.cells:
        if cell.cell_type != 'markdown': continue
        src = cell.source
        m = re.search(r'^---\n(.*?)\n---', src, re.S)
        if m:
            for line in m.group(1).splitlines():
                k, _, v = line.partition(':')
                if k.strip() == 'title': title = v.strip().strip('"\'')
                if k.strip() == 'description': desc = v.strip().strip('"\'')
        m = re.match(r'#\s+(.+)', src.strip())
        if m and title is None: title = m.group(1).strip()
        m = re.search(r'^>\s*(.+)$', src, re.M)
        if m and desc is None: desc = m.group(1).strip()
        break
    return title, desc


def clean(nb):
    "Drop hidden cells and the title cell, strip `#|` directives, hide code where `echo: false`."
    cells, first_md_done = [], False
    for cell in nb.cells:
        src = cell.source
        if cell.cell_type == 'markdown' and not first_md_done:
            first_md_done = True
            if re.match(r'\s*(---|#\s)', src): continue  # rendered as the page title
        if cell.cell_type == 'raw' and src.strip().startswith('---'): continue
        lines = src.splitlines()
        opts = ' '.join(l for l in lines if DIRECTIVE.match(l))
        if re.search(r'\b(hide|include:\s*false|export_hide)\b', opts): continue
        if cell.cell_type == 'code':
            cell.source = '\n'.join(l for l in lines if not DIRECTIVE.match(l)).strip('\n')
            if re.search(r'echo:\s*false', opts): cell.metadata['transient'] = {'remove_source': True}
            if not cell.source and not cell.get('outputs'): continue
        cells.append(cell)
    nb.cells = cells
    return nb


def page_order(proc):
    "Notebooks in reading order: index first, then by path (numbered names sort in reading order)."
    nbs = sorted(p for p in proc.rglob('*.ipynb') if not any(q.startswith(('_', '.')) for q in p.relative_to(proc).parts))
    return sorted(nbs, key=lambda p: (p.relative_to(proc).parts[0] != 'index.ipynb', len(p.relative_to(proc).parts) > 1, str(p)))


def nav_html(pages, current, root):
    out, section = [], None
    for rel, title in pages:
        sec = rel.parent.name if len(rel.parts) > 1 else ''
        if sec != section:
            if section is not None: out.append('</ul>')
            if sec: out.append(f'<div class="section">{html.escape(re.sub(r"^[0-9]+_", "", sec))}</div>')
            out.append('<ul>'); section = sec
        cls = ' class="current"' if rel == current else ''
        out.append(f'<li><a{cls} href="{root}{rel.with_suffix(".html").as_posix()}">{html.escape(title)}</a></li>')
    out.append('</ul>')
    return '\n'.join(out)


def render_site(proc, out):
    "Render every processed notebook to `out/` as a static page with navigation."
    exporter = HTMLExporter(template_name='basic')
    exporter.exclude_input_prompt = exporter.exclude_output_prompt = True
    nbs = page_order(proc)
    loaded = []
    for p in nbs:
        nb = nbformat.read(p, as_version=4)
        title, desc = frontmatter(nb)
        loaded.append((p.relative_to(proc), title or p.stem, desc, clean(nb)))
    pages = [(rel, title) for rel, title, _, _ in loaded]
    tmp = Path(tempfile.mkdtemp(prefix='.docs-', dir=out.parent))
    for i, (rel, title, desc, nb) in enumerate(loaded):
        body, res = exporter.from_notebook_node(nb)
        root = '../' * (len(rel.parts) - 1)
        dest = tmp/rel.with_suffix('.html')
        dest.parent.mkdir(parents=True, exist_ok=True)
        for name, data in (res.get('outputs') or {}).items(): (dest.parent/name).write_bytes(data)
        link = lambda j, label: (f'<a href="{root}{pages[j][0].with_suffix(".html").as_posix()}">{label}</a>'
                                 if 0 <= j < len(pages) else '<span></span>')
        dest.write_text(PAGE.format(
            title=html.escape(title), css=CSS, root=root, nav=nav_html(pages, rel, root), body=body,
            description=f'<p class="description">{html.escape(desc)}</p>' if desc else '',
            prev=link(i - 1, f'← {html.escape(pages[i-1][1]) if i else ""}'),
            next=link(i + 1, f'{html.escape(pages[i+1][1]) if i + 1 < len(pages) else ""} →')), encoding='utf-8')
    check_offline(tmp)
    if out.exists(): shutil.rmtree(out)
    tmp.rename(out)
    return [out/rel.with_suffix('.html') for rel, *_ in loaded]


def check_offline(site):
    "Fail if any page would fetch a script or stylesheet from the network."
    bad = []
    for f in site.rglob('*.html'):
        for m in re.finditer(r'<(script|link)\b[^>]*(?:src|href)="(https?:)?//[^"]+"', f.read_text(encoding='utf-8')):
            bad.append(f'{f.name}: {m.group(0)[:120]}')
    if bad: raise SystemExit('pages load remote resources:\n' + '\n'.join(bad))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--out', default='_docs', help='output folder (default: _docs)')
    args = ap.parse_args(argv)
    out = (ROOT/args.out).resolve() if not Path(args.out).is_absolute() else Path(args.out)
    proc = process_notebooks()
    files = render_site(Path(proc), out)
    print(f'built {len(files)} pages in {out}')
    return files


if __name__ == '__main__':
    import os
    os.chdir(ROOT)
    main()
