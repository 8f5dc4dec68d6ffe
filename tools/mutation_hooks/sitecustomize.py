"""Loaded by every python that tools/mutation_sample.py's run starts (it is on PYTHONPATH there),
for the programs that the tests start as child processes (`python train.py`, `python serve.py`,
`python -m preprocessing.make_data`, their loader and worker processes):

1. A program run as a script is the module __main__ (in its multiprocessing children,
   __mp_main__), not `train`: mutmut's trampoline would never switch on a mutant of train.py
   there, and would file the functions it reaches under __main__. Each mutated function of such a
   module is given its file's module name (from the file's place in mutmut's mutants/ folder).
2. While mutmut records which tests reach which function (MUTANT_UNDER_TEST=stats), mutmut
   records the hits in the process that makes them: a child (a) reads mutmut's config from the
   project copy (MUTATION_ROOT; mutmut reads setup.cfg from the cwd, and the child's may be any
   folder), and (b) writes the functions it has reached into MUTATION_HITS_DIR (at exit, and
   every 0.25 s while it runs: a server a test module shares may be stopped only after its
   last test; and before os._exit, which skips atexit, in a forked child too), which
   mutation_stats_plugin.py adds to the tests that run meanwhile.
Idle where MUTATION_ROOT is not set, or mutmut is not installed."""
import os
import sys


def _module_name(path):
    """`train` for <root>/mutants/train.py, `preprocessing.make_data` for .../make_data.py."""
    mutants = os.path.join(os.environ['MUTATION_ROOT'], 'mutants')
    rel = os.path.relpath(os.path.realpath(path), os.path.realpath(mutants))
    if rel.startswith('..') or not rel.endswith('.py'):
        return None
    return rel[:-3].replace(os.sep, '.').removesuffix('.__init__')


def _patch_trampoline():
    import mutmut.mutation.trampoline as trampoline
    wrap = trampoline.wrap_in_trampoline

    def wrap_in_trampoline(mutants_dict, is_classmethod=False):
        decorate = wrap(mutants_dict, is_classmethod)

        def apply(func):
            given = func.__module__
            real = _module_name(func.__code__.co_filename) if given in ('__main__', '__mp_main__') else None
            if real:
                func.__module__ = real  # what the trampoline compares with the mutant's module
            wrapper = decorate(func)
            wrapper.__module__ = given  # (pickle finds the function where it is: __main__)
            return wrapper
        return apply
    trampoline.wrap_in_trampoline = wrap_in_trampoline


def _load_config():
    from mutmut.configuration import config
    here = os.getcwd()
    os.chdir(os.environ['MUTATION_ROOT'])
    try:
        config()
    finally:
        os.chdir(here)


_written = [0]


def _write_hits():
    from mutmut.state import state
    if len(state()._stats) == _written[0]:
        return
    _written[0] = len(state()._stats)
    rename = {}
    for alias in ('__main__', '__mp_main__'):
        main = sys.modules.get(alias)
        path = getattr(main, '__file__', None)
        real = _module_name(path) if path else None
        if real:
            rename[alias] = real
    hits = set()
    for name in state()._stats:
        module, _, rest = name.partition('.')
        hits.add(f'{rename[module]}.{rest}' if module in rename else name)
    if hits:
        path = os.path.join(os.environ['MUTATION_HITS_DIR'], f'{os.getpid()}.hits')
        with open(path + '.tmp', 'w') as f:
            f.write('\n'.join(sorted(hits)) + '\n')
        os.replace(path + '.tmp', path)


if os.environ.get('MUTATION_ROOT'):
    try:
        _patch_trampoline()
        if os.environ.get('MUTANT_UNDER_TEST') == 'stats' and os.environ.get('MUTATION_HITS_DIR'):
            import atexit
            import threading
            import time
            _load_config()
            atexit.register(_write_hits)

            def _every_quarter_second():
                while True:
                    time.sleep(0.25)
                    _write_hits()

            def _start():
                threading.Thread(target=_every_quarter_second, name='mutation-hits', daemon=True).start()

            def _in_forked_child():  # (the thread is not forked, and the parent's hits are its own)
                _written[0] = 0
                _start()

            _os_exit = os._exit

            def _exit_after_writing(code):  # os._exit skips atexit: a forked multiprocessing child
                try:                         # and train_2gpu.py's workers end that way
                    _write_hits()
                finally:
                    _os_exit(code)
            _start()
            os.register_at_fork(after_in_child=_in_forked_child)
            os._exit = _exit_after_writing
    except ImportError:  # a python without mutmut: it cannot run the mutated files anyway
        pass
    except Exception as e:  # noqa: BLE001  (never stop the program the test runs)
        print(f'mutation hook: {type(e).__name__}: {e}', file=sys.stderr)
