"""The linter: `ruff check .` with the rules of ruff.toml (pyflakes, pycodestyle errors, bugbear)."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_ruff_finds_nothing():
    ruff = os.path.join(os.path.dirname(sys.executable), 'ruff')
    assert os.path.exists(ruff), f'{ruff} is missing: sh test.sh installs requirements-test.txt'
    r = subprocess.run([ruff, 'check', '--no-cache', '.'], cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-1000:]
