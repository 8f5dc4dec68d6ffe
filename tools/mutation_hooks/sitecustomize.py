"""Loaded by every python that tools/mutation_sample.py's run starts (it is on PYTHONPATH there),
and idle in all but one case: a process started by a test while mutmut collects which tests
reach which function (MUTANT_UNDER_TEST=stats), e.g. `python train.py` run by a test.

mutmut records those hits in the process that makes them, so a test that reaches a function only
through a child process would count as not reaching it. Here such a child (1) reads mutmut's
config from the project copy (MUTATION_ROOT: its own cwd may be any folder, and mutmut reads
setup.cfg from the cwd), and (2) at exit writes the functions it reached into MUTATION_HITS_DIR,
which mutation_stats_plugin.py adds to the test that started it."""
import os

if os.environ.get('MUTANT_UNDER_TEST') == 'stats' and os.environ.get('MUTATION_HITS_DIR'):
    import atexit

    def _load_config():
        from mutmut.configuration import config
        here = os.getcwd()
        os.chdir(os.environ['MUTATION_ROOT'])
        try:
            config()
        finally:
            os.chdir(here)

    def _write_hits():
        from mutmut.state import state
        hits = sorted(state()._stats)
        if hits:
            path = os.path.join(os.environ['MUTATION_HITS_DIR'], f'{os.getpid()}.hits')
            with open(path + '.tmp', 'w') as f:
                f.write('\n'.join(hits) + '\n')
            os.replace(path + '.tmp', path)

    try:
        _load_config()
        atexit.register(_write_hits)
    except ImportError:  # a python without mutmut: it cannot run the mutated files anyway
        pass
    except Exception as e:  # noqa: BLE001  (never stop the program the test runs)
        print(f'mutation stats hook: {type(e).__name__}: {e}', file=__import__('sys').stderr)
