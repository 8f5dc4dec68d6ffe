"""Docs that cannot drift: README.md and docs/*.md are checked against the repository.

Every relative link and #anchor resolves; every command they show (`python X.py`, `python -m
pkg.mod`, `sh X.sh`, `torchrun ... X.py`) names a script or module that exists and runs through
`.venv/bin/`; every key=value given to train.py, train_2gpu.py, validate_performance.py or demo.sh
is a key that script's config schema accepts; each benchmark script's docstring points at the
section of docs/ that holds its latest answer.
"""
import glob
import importlib.util
import os
import re
import shlex

import pytest

from lib import config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGES = ['README.md'] + sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, 'docs', '*.md')))
SCHEMAS = {
    'train.py': {**config.CONFIG, **config.SPEC_1GPU},
    'demo.sh': {**config.CONFIG, **config.SPEC_1GPU},  # its extra arguments go to train.py
    'train_2gpu.py': {**config.CONFIG, **config.SPEC_2GPU},
    'validate_performance.py': {**config.CONFIG, **config.SPEC_1GPU, **config.EVALUATE},
}
OWN_PACKAGES = ('lib', 'benchmarks', 'preprocessing', 'pretrained', 'tests', 'tools')


def read(page):
    with open(os.path.join(ROOT, page)) as f:
        return f.read()


def prose(text):
    """The text outside fenced code blocks, with inline code spans blanked out."""
    text = re.sub(r'^```.*?^```', '', text, flags=re.S | re.M)
    return re.sub(r'`[^`\n]*`', '``', text)


def slug(heading):
    """GitHub's anchor of a heading: lowercase, punctuation dropped, spaces to '-'."""
    text = re.sub(r'`|\*\*|\[([^\]]*)\]\([^)]*\)', r'\1', heading.strip()).lower()
    return re.sub(r'[^\w\- ]', '', text).replace(' ', '-')


def anchors(page):
    """Every #anchor of a page (duplicate headings get -1, -2, ... as on GitHub)."""
    seen, out = {}, set()
    for line in re.sub(r'^```.*?^```', '', read(page), flags=re.S | re.M).splitlines():
        m = re.match(r'#{1,6} (.+)', line)
        if m:
            base = slug(m.group(1))
            n = seen.get(base, 0)
            seen[base] = n + 1
            out.add(base if n == 0 else f'{base}-{n}')
    return out


def links(page):
    """(target, anchor) of every relative markdown link of a page."""
    for target in re.findall(r'\]\(([^)\s]+)\)', prose(read(page))):
        if re.match(r'[a-z]+:', target):  # http:, https:, mailto:
            continue
        path, _, anchor = target.partition('#')
        yield path, anchor


def commands(page):
    """Every command line of a page: lines of fenced code blocks (continuations joined) and
    inline code spans that hold a command."""
    text = read(page)
    lines = []
    for block in re.findall(r'^```[^\n]*\n(.*?)^```', text, flags=re.S | re.M):
        lines += block.replace('\\\n', ' ').splitlines()
    lines += re.findall(r'`([^`\n]+)`', re.sub(r'^```.*?^```', '', text, flags=re.S | re.M))
    for line in lines:
        line = line.split(' #')[0].strip()
        if re.search(r'(^|[\s/])(python3?|sh|torchrun)\s', line):
            yield line


def invocations(line):
    """(program as written, script or module, arguments) of each command in a line."""
    for part in re.split(r'\s*(?:&&|;|\|)\s*', line):
        try:
            words = shlex.split(part)
        except ValueError:
            words = part.split()
        for i, word in enumerate(words):
            prog = os.path.basename(word)
            rest = words[i + 1:]
            if prog in ('python', 'python3') and rest:
                if rest[0] == '-m' and len(rest) > 1:
                    yield word, ('-m', rest[1]), rest[2:]
                elif rest[0].endswith('.py'):
                    yield word, rest[0], rest[1:]
                break
            if prog == 'sh' and rest and rest[0].endswith('.sh'):
                yield word, rest[0], rest[1:]
                break
            if prog == 'torchrun':
                script = next((k for k, w in enumerate(rest) if w.endswith('.py')), None)
                if script is not None:
                    yield word, rest[script], rest[script + 1:]
                break


def retired_benchmarks():
    """The scripts docs/benchmarks.md lists as retired (removed; their figures kept)."""
    page = read('docs/benchmarks.md')
    section = page[page.index('## Retired benchmarks'):]
    return set(re.findall(r'^\| `(\w+)\.py` \|', section, flags=re.M))


def all_invocations():
    return [(page, line, *inv) for page in PAGES for line in commands(page) for inv in invocations(line)]


def test_pages_exist_and_readme_is_short():
    assert len(PAGES) >= 8, PAGES
    n = read('README.md').count('\n')
    assert n <= 260, f'README.md has {n} lines: move detail into docs/'


@pytest.mark.parametrize('page', PAGES)
def test_links_and_anchors_resolve(page):
    here = os.path.dirname(os.path.join(ROOT, page))
    for path, anchor in links(page):
        target = os.path.normpath(os.path.join(here, path)) if path else os.path.join(ROOT, page)
        assert os.path.exists(target), f'{page} links to {path}, which does not exist'
        if anchor:
            assert target.endswith('.md'), f'{page}: #{anchor} into {path}, not a markdown page'
            have = anchors(os.path.relpath(target, ROOT))
            assert anchor in have, f'{page} links to {path}#{anchor}: no such heading ({sorted(have)})'


def test_commands_name_scripts_and_modules_that_exist():
    found, retired = all_invocations(), retired_benchmarks()
    assert len(found) > 30
    for page, line, _, target, _ in found:
        if target[0] == '-m':
            module = target[1]
            if module.split('.')[0] in OWN_PACKAGES:
                path = os.path.join(ROOT, *module.split('.'))
                if module.startswith('benchmarks.') and module.split('.')[1] in retired:
                    assert not os.path.exists(path + '.py'), f'{page}: {module} is listed as retired'
                    continue
                assert os.path.exists(path + '.py') or os.path.exists(os.path.join(path, '__init__.py')), (
                    f'{page}: `{line}` runs module {module}, which does not exist')
            else:
                assert importlib.util.find_spec(module.split('.')[0]), f'{page}: `{line}`: no module {module}'
        else:
            assert os.path.exists(os.path.join(ROOT, target)), (
                f'{page}: `{line}` runs {target}, which does not exist')


def test_commands_run_through_the_venv():
    """One way to run everything: .venv/bin/python and .venv/bin/torchrun (README says so). The
    generated configuration.md quotes the schema's one-line meanings, which name scripts only."""
    for page, line, prog, _, _ in all_invocations():
        if prog != 'sh' and page != os.path.join('docs', 'configuration.md'):
            assert prog.startswith('.venv/bin/'), f'{page}: `{line}` runs {prog}, not .venv/bin/{prog}'


def test_key_value_arguments_are_keys_of_the_schema():
    checked = 0
    for page, line, _, target, args in all_invocations():
        script = os.path.basename(target) if isinstance(target, str) else None
        if script not in SCHEMAS:
            continue
        for i, arg in enumerate(args):
            if arg in ('--spec', '--config'):
                path = os.path.join(ROOT, args[i + 1])
                assert os.path.exists(path), f'{page}: `{line}`: no {args[i + 1]}'
                unknown = set(config.load_yaml(path)) - set(SCHEMAS[script])
                assert not unknown, (
                    f'{page}: `{line}`: {script} does not accept {sorted(unknown)} of {args[i + 1]}')
            m = re.match(r'([a-z_][a-z0-9_]*)=', arg)
            if m:
                checked += 1
                assert m.group(1) in SCHEMAS[script], (
                    f"{page}: `{line}` gives {script} the key '{m.group(1)}', which its schema does not accept")
    assert checked > 30


@pytest.mark.parametrize('script', sorted(set(os.listdir(os.path.join(ROOT, 'benchmarks')))
                                          - {'__init__.py', 'common.py', 'cluster.py', '__pycache__'}))
def test_each_benchmark_says_its_question_and_where_its_answer_is(script):
    with open(os.path.join(ROOT, 'benchmarks', script)) as f:
        doc = f.read().split('"""')[1]
    first = doc.split('\n')[0]
    assert first.endswith('?'), f'{script}: the docstring opens with its question, not {first!r}'
    m = re.search(r'(docs/\w+\.md)#([\w-]+)', doc)
    assert m, f'{script}: its docstring names no docs/PAGE.md#section holding its latest answer'
    assert m.group(2) in anchors(m.group(1)), f'{script}: {m.group(0)} is no heading'
