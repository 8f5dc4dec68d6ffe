"""The check every entry point makes before importing a package: this python has the packages of
requirements.txt, or one line says which python to use instead of a ModuleNotFoundError traceback."""
import importlib.metadata
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def require():
    """Exits with status 2 and one line on stderr if a package of requirements.txt is missing."""
    with open(os.path.join(ROOT, 'requirements.txt')) as f:
        names = [re.split(r'[=<>!~\[;\s]', line.strip(), maxsplit=1)[0] for line in f
                 if line.strip() and not line.startswith(('#', '-'))]
    missing = []
    for name in names:
        try:
            importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            missing.append(name)
    if missing:
        venv = os.path.join(ROOT, '.venv')
        if os.path.realpath(sys.prefix) == os.path.realpath(venv):
            fix = '`sh tools/venv.sh` installs them'
        else:
            fix = f"use the project's python, {venv}/bin/python (`sh tools/venv.sh` sets it up)"
        more = f' and {len(missing) - 3} more' if len(missing) > 3 else ''
        print(f'error: {sys.executable} lacks {", ".join(missing[:3])}{more} (requirements.txt): {fix}',
              file=sys.stderr)
        sys.exit(2)
