"""The linter: `ruff check .` with the rules of ruff.toml (pyflakes, pycodestyle errors, bugbear);
and the layers of lib/ (no import circle) and of benchmarks/ (nothing from tests/)."""
import ast
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


def test_lib_modules_import_each_other_at_the_top_without_a_circle():
    """lib/'s modules are layers: each imports the others it uses at its top (an import inside a
    function would hide a circle), and no chain of imports comes back to where it started."""
    folder = os.path.join(ROOT, 'lib')
    modules = {n[:-3] for n in os.listdir(folder) if n.endswith('.py') and n != '__init__.py'}

    def imported(node):  # the modules of lib/ an import statement names
        if isinstance(node, ast.Import):
            return {a.name.split('.')[1] for a in node.names if a.name.startswith('lib.')}
        if isinstance(node, ast.ImportFrom) and node.module == 'lib':
            return {a.name for a in node.names} & modules
        if isinstance(node, ast.ImportFrom) and (node.module or '').startswith('lib.'):
            return {node.module.split('.')[1]}
        return set()

    graph, inner = {}, []
    for name in sorted(modules):
        with open(os.path.join(folder, name + '.py')) as f:
            tree = ast.parse(f.read())
        graph[name] = set().union(*map(imported, tree.body))
        top = set(map(id, tree.body))
        inner += [f'lib/{name}.py:{n.lineno}' for n in ast.walk(tree) if imported(n) and id(n) not in top]
    assert not inner, f'imports of lib/ modules inside functions: {inner}'
    done, path = set(), []

    def visit(name):
        assert name not in path, f"an import circle: {' -> '.join(path[path.index(name):] + [name])}"
        if name not in done:
            path.append(name)
            for other in sorted(graph[name]):
                visit(other)
            path.pop()
            done.add(name)
    for name in sorted(graph):
        visit(name)


def test_benchmarks_import_nothing_from_the_tests():
    """benchmarks/ is a layer above lib/ and beside tests/: what both need lives in benchmarks/
    (the network-namespace cluster) or lib/."""
    folder = os.path.join(ROOT, 'benchmarks')
    found = []
    for name in sorted(n for n in os.listdir(folder) if n.endswith('.py')):
        with open(os.path.join(folder, name)) as f:
            tree = ast.parse(f.read())
        for node in ast.walk(tree):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module or ''] if isinstance(node, ast.ImportFrom) else [])
            found += [f'benchmarks/{name}:{node.lineno} {n}' for n in names if n.split('.')[0] == 'tests']
    assert not found, f'benchmarks/ imports from tests/: {found}'
