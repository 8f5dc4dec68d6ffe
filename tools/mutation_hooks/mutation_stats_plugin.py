"""pytest plugin of tools/mutation_sample.py's run (-p mutation_stats_plugin): while mutmut collects
which tests reach which function, the hits that child processes of a test wrote at their exit
(sitecustomize.py beside this file) are added to that test's before mutmut files them. Idle in
every other pytest run."""
import os

import pytest


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_teardown(item, nextitem):
    folder = os.environ.get('MUTATION_HITS_DIR')
    if os.environ.get('MUTANT_UNDER_TEST') != 'stats' or not folder or not os.path.isdir(folder):
        return
    from mutmut.state import state
    for name in os.listdir(folder):
        if name.endswith('.hits'):
            path = os.path.join(folder, name)
            with open(path) as f:
                state()._stats.update(line.strip() for line in f if line.strip())
            os.remove(path)
