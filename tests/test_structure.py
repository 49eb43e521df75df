"The shape of the course: notebooks in reading order never import from a later notebook; every module has one notebook."
import json, re
from pathlib import Path
import pytest

ROOT = Path(__file__).resolve().parents[1]
NBS = ROOT/'nbs'

def reading_order():
    "Library notebooks in reading order: top-level by number, then each folder (synth/ before lessons/, which come last)."
    nbs = [p for p in NBS.rglob('*.ipynb') if not any(q.startswith(('_', '.')) for q in p.relative_to(NBS).parts)]
    def key(p):
        parts = p.relative_to(NBS).parts
        return (len(parts) > 1, parts[0] == 'lessons', str(p))
    return sorted((p for p in nbs if p.name != 'index.ipynb'), key=key)

def exported_module(nb):
    for c in nb['cells']:
        m = re.search(r'^#\|\s*default_exp\s+(\S+)', ''.join(c['source']), re.M)
        if m: return 'lessonlib.' + m.group(1)
    return None

def top_level_imports(nb):
    "lessonlib modules imported at the top level of exported cells (function-local, lazy imports are not counted)."
    mods = set()
    for c in nb['cells']:
        src = ''.join(c['source'])
        if c['cell_type'] != 'code' or not re.match(r'#\|\s*export', src): continue
        mods |= set(re.findall(r'^from (lessonlib(?:\.\w+)+) import', src, re.M))
        mods |= set(re.findall(r'^import (lessonlib(?:\.\w+)+)', src, re.M))
    return mods

def test_no_notebook_imports_from_a_later_one():
    order = reading_order()
    nbs = {p: json.loads(p.read_text()) for p in order}
    position = {exported_module(nb): i for i, (p, nb) in enumerate(nbs.items()) if exported_module(nb)}
    assert len(position) > 15, position
    bad = []
    for i, (p, nb) in enumerate(nbs.items()):
        for mod in top_level_imports(nb):
            if mod not in position: bad.append(f'{p.relative_to(ROOT)} imports {mod}, which no notebook exports')
            elif position[mod] > i: bad.append(f'{p.relative_to(ROOT)} imports {mod} from the later {order[position[mod]].name}')
    assert not bad, '\n'.join(bad)

def test_one_notebook_per_module():
    mods = [exported_module(json.loads(p.read_text())) for p in reading_order()]
    mods = [m for m in mods if m]
    assert len(mods) == len(set(mods)), sorted(m for m in mods if mods.count(m) > 1)
    for m in mods: assert (ROOT/(m.replace('.', '/') + '.py')).exists(), f'{m} has a notebook but no generated module'


LESSONS = sorted((NBS/'lessons').glob('*.ipynb'))

def code_cells(nb):
    return [''.join(c['source']) for c in nb['cells'] if c['cell_type'] == 'code']

def is_setup_cell(src: str) -> bool:
    "The lesson set-up of lessonlib.kaggle: install lessonlib only when missing, then setup_lesson(); run in CI too."
    return (src.startswith('try: import lessonlib') and re.search(r'^except ImportError:\n +!pip install -q "lessonlib', src, re.M)
            and re.search(r'^from lessonlib.kaggle import setup_lesson$', src, re.M) and 'setup_lesson(' in src.split('import setup_lesson')[1])

@pytest.mark.parametrize('path', LESSONS, ids=lambda p: p.name)
def test_lesson_starts_with_setup_and_has_no_contributor_cells(path):
    "Run all in a fresh Colab: the set-up cell comes first, nothing calls nbdev (not installed there) unguarded."
    cells = [s for s in code_cells(json.loads(path.read_text())) if not re.fullmatch(r'#\|\s*default_exp\s+\S+\s*', s)]
    assert cells and is_setup_cell(cells[0]), f'{path.name}: the first code cell is not the lesson set-up:\n{cells[0][:300]}'
    assert sum(is_setup_cell(s) for s in cells) == 1, f'{path.name}: more than one set-up cell'
    for s in cells:
        assert 'nbdev_export' not in s, f'{path.name}: a contributor cell (nbdev_export) in a lesson:\n{s[:200]}'
        for line in re.findall(r'^.*\b(?:from|import) nbdev\b.*$', s, re.M):
            assert line.startswith('try: from nbdev'), f'{path.name}: nbdev used without a fallback (not in Colab): {line}'
        assert not re.search(r'^!pip install', s, re.M), f'{path.name}: a bare pip line (use the set-up cell):\n{s[:200]}'


def test_setup_cell_check_can_fail():
    good = ('try: import lessonlib\nexcept ImportError:\n    !pip install -q "lessonlib @ git+https://x"\n'
            'from lessonlib.kaggle import setup_lesson\ninfo = setup_lesson()')
    assert is_setup_cell(good)
    assert not is_setup_cell('#| colab\n!pip install -q git+https://github.com/lessonlib/lessonlib')
    assert not is_setup_cell(good.replace('info = setup_lesson()', ''))
    assert not is_setup_cell('#| colab\n' + good)
