"""Entry points import this module before any package; importing it calls explain_missing_packages():
a python without the project's packages (requirements.txt; not .venv's python) then ends in one
line saying which python to use, instead of a ModuleNotFoundError traceback."""
import os
import sys

from lib import ROOT


def explain_missing_packages():
    """Makes an uncaught ModuleNotFoundError of a module from outside the project one line on stderr
    (the exit status stays 1); every other error keeps its traceback."""
    previous = sys.excepthook

    def hook(kind, error, traceback):
        name = getattr(error, 'name', None) or ''
        top = name.split('.')[0]
        if not issubclass(kind, ModuleNotFoundError) or not top or ours(top):
            return previous(kind, error, traceback)
        venv = os.path.join(ROOT, '.venv')
        if os.path.realpath(sys.prefix) == os.path.realpath(venv):
            fix = '`sh tools/venv.sh` installs them'
        else:
            fix = f"use the project's python, {venv}/bin/python (`sh tools/venv.sh` sets it up)"
        print(f'error: {sys.executable} has no module {name} (the packages of requirements.txt): {fix}',
              file=sys.stderr)
    sys.excepthook = hook


def ours(module):
    """Whether a top-level module name is one of the project's own (a bug there keeps its traceback)."""
    return os.path.isdir(os.path.join(ROOT, module)) or os.path.isfile(os.path.join(ROOT, module + '.py'))


explain_missing_packages()
