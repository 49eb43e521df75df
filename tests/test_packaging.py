"""Packaging metadata (setup.py reads settings.ini): the licence is an SPDX expression with its text in LICENSE
(PEP 639), so `pip install -e .` prints no setuptools licence warning; the console script and extras are declared."""
import email, subprocess, sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope='module')
def egg_info(tmp_path_factory):
    out = tmp_path_factory.mktemp('egg')
    r = subprocess.run([sys.executable, 'setup.py', '-q', 'egg_info', '-e', str(out)], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, f'setup.py egg_info failed:\n{r.stderr[-3000:]}'
    info = next(out.glob('*.egg-info'))
    return r.stdout + r.stderr, info


def test_no_licence_warning(egg_info):
    log, _ = egg_info
    lines = [l for l in log.splitlines() if 'licen' in l.lower()]
    assert not lines, 'setuptools warns about the licence:\n' + '\n'.join(lines)


def test_licence_metadata(egg_info):
    _, info = egg_info
    meta = email.message_from_string((info/'PKG-INFO').read_text(encoding='utf-8'))
    assert meta['Name'] == 'lessonlib'
    assert 'Apache-2.0' in (meta['License-Expression'] or meta['License'] or ''), dict(meta.items())
    assert not [c for c in meta.get_all('Classifier') or [] if c.startswith('License ::')], 'licence classifier present'
    assert 'LICENSE' in (meta.get_all('License-File') or []), 'LICENSE is not shipped'
    assert (ROOT/'LICENSE').read_text(encoding='utf-8').lstrip().startswith('Apache License')


def test_entry_points_and_extras(egg_info):
    _, info = egg_info
    assert 'lessonlib = lessonlib.cli:main' in (info/'entry_points.txt').read_text(encoding='utf-8')
    requires = (info/'requires.txt').read_text(encoding='utf-8')
    assert '[dev]' in requires and '[serve]' in requires and 'torch>=2.3' in requires
