"""serve.py's page as a person uses it: Debian's chromium (installed by tools/chromium.sh, which
test.sh runs), driven by Playwright, picks an image, clicks Classify and reads the top 5.

Skips where chromium or Playwright is missing, except under CI=true, where it fails instead."""
import os

import pytest
import yaml

from tests.test_serve import IMAGES, make_snapshot, start_server, stop_server

CHROMIUM = '/usr/bin/chromium'
FLAGS = ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
         '--disable-background-networking', '--disable-component-update', '--disable-sync',
         '--disable-dev-shm-usage']
WNIDS = ['n02123045', 'n02085620', 'n01530575']
WORDS = ['tabby, tabby cat', 'Chihuahua', 'brambling, Fringilla montifringilla']


def unavailable(reason):
    if os.environ.get('CI') == 'true':
        pytest.fail(f'{reason} (CI=true: the browser test must run)')
    pytest.skip(reason)


@pytest.fixture(scope='module')
def page_url(tmp_path_factory):
    """A server whose dataset.yaml has ImageNet-style names and the devkit's words."""
    root = str(tmp_path_factory.mktemp('browser'))
    snap = make_snapshot(root)
    with open(snap['dataset_yaml'], 'w') as f:
        yaml.safe_dump({'num_classes': 3, 'class_names': WNIDS, 'class_words': WORDS}, f)
    proc, port, _, _ = start_server([snap['path'], '--port', '0', '--device', 'cpu'], root)
    yield f'http://127.0.0.1:{port}/'
    assert stop_server(proc) == 0


@pytest.fixture(scope='module')
def browser():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        unavailable('playwright is not installed (pip install -r requirements-test.txt)')
    if not os.access(CHROMIUM, os.X_OK):
        unavailable(f'no {CHROMIUM} (sh tools/chromium.sh installs it)')
    with sync_playwright() as p:
        try:
            b = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS, timeout=60_000)
        except Exception as e:  # noqa: BLE001 -- whatever stops the browser from starting
            unavailable(f'{CHROMIUM} did not start: {" ".join(str(e).split())[:500]}')
        yield b
        b.close()


def test_pick_an_image_and_classify_it(browser, page_url, tmp_path):
    page = browser.new_page(viewport={'width': 720, 'height': 330})
    errors = []
    page.on('pageerror', lambda e: errors.append(str(e)))
    page.goto(page_url)
    assert page.title() == 'alexnet_cifar: 3 classes'
    assert page.is_enabled('#classify')  # the script ran
    page.set_input_files('#image', files=[{'name': 'photo.jpg', 'mimeType': 'image/jpeg',
                                           'buffer': IMAGES['jpeg']}])
    # shown once the browser has decoded it (an <img> has no box before: not at once on a busy machine)
    page.wait_for_selector('#preview', state='visible', timeout=10_000)
    page.click('#classify')
    page.wait_for_selector('#top5 li', timeout=30_000)
    rows = page.locator('#top5 li').all_inner_texts()
    assert len(rows) == 3, rows
    for row in rows:  # e.g. "n02085620 Chihuahua (1): 61.37 %"
        wnid, rest = row.split(' ', 1)
        i = WNIDS.index(wnid)
        assert rest.startswith(f'{WORDS[i]} ({i}): ') and rest.endswith(' %'), row
    percents = [float(r.rsplit(': ', 1)[1][:-2]) for r in rows]
    assert percents == sorted(percents, reverse=True) and sum(percents) == pytest.approx(100, abs=0.05)
    assert page.inner_text('#info').startswith('alexnet_cifar, ')
    assert page.inner_text('#error') == ''
    shot = tmp_path / 'serve.png'
    page.screenshot(path=str(shot), full_page=True)
    assert shot.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'

    # a junk file: the server's message, the previous answer cleared
    page.set_input_files('#image', files=[{'name': 'notes.jpg', 'mimeType': 'image/jpeg',
                                           'buffer': b'not an image at all' * 10}])
    page.click('#classify')
    page.wait_for_function("document.getElementById('error').textContent !== ''", timeout=30_000)
    assert 'not an image' in page.inner_text('#error')
    assert page.locator('#top5 li').count() == 0
    assert not errors, errors
    page.close()
