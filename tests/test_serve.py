"""serve.py: a real server in a subprocess (or in a thread, for the load tests), spoken to over
real sockets (http.client)."""
import contextlib
import http.client
import io
import json
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

import serve
from lib import data, model
from preprocessing.images import load_rgb

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLASSES = ['cat', 'dog', 'bird']
SIZE, CROP = 36, 32
MAX_BYTES = 200_000


def make_snapshot(root, paths_in_config=True):
    """alexnet_cifar with 3 classes and weights large enough to give distinct probabilities;
    mean image root/misc/img_mean.npy and root/dataset.yaml beside root/labels, as training has."""
    net = model.build('alexnet_cifar', len(CLASSES), 0.0, CROP, 0)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * (0.02 if p.ndim > 1 else 0.1))
    os.makedirs(os.path.join(root, 'labels'), exist_ok=True)
    os.makedirs(os.path.join(root, 'misc'), exist_ok=True)
    mean_file = os.path.join(root, 'misc', 'img_mean.npy')
    np.save(mean_file, (np.random.RandomState(0).rand(3, SIZE, SIZE) * 60 + 100).astype(np.float32))
    with open(os.path.join(root, 'dataset.yaml'), 'w') as f:
        yaml.safe_dump({'num_classes': len(CLASSES), 'class_names': CLASSES}, f)
    cfg = {'model': 'alexnet_cifar', 'crop_size': CROP, 'dropout': 0.0, 'seed': 1}
    if paths_in_config:
        cfg.update(mean_file=mean_file, label_folder=os.path.join(root, 'labels'))
    path = os.path.join(root, 'model_1.pt')
    torch.save({'model': net.state_dict(), 'config': cfg, 'epoch': 1}, path)
    return {'path': path, 'net': net.eval(), 'mean_file': mean_file,
            'dataset_yaml': os.path.join(root, 'dataset.yaml')}


def start_server(args, log_dir, wait=True):
    """serve.py on a free port; returns (process, port, stdout path, stderr path)."""
    out, err = os.path.join(log_dir, 'stdout'), os.path.join(log_dir, 'stderr')
    with open(out, 'w') as fo, open(err, 'w') as fe:
        proc = subprocess.Popen([sys.executable, os.path.join(REPO, 'serve.py'), *args],
                                stdout=fo, stderr=fe, cwd=REPO)
    if not wait:
        return proc, None, out, err
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        with open(out) as f:
            m = re.search(r'http://127\.0\.0\.1:(\d+)/', f.read())
        if m:
            return proc, int(m.group(1)), out, err
        if proc.poll() is not None:
            with open(err) as f:
                pytest.fail(f'serve.py exited with {proc.returncode}: {f.read()}')
        time.sleep(0.05)
    proc.kill()
    pytest.fail('serve.py did not print its URL within 60 s')


def stop_server(proc):
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


@pytest.fixture(scope='module')
def snapshot(tmp_path_factory):
    return make_snapshot(str(tmp_path_factory.mktemp('snapshot')))


@pytest.fixture(scope='module')
def server(snapshot, tmp_path_factory):
    proc, port, _, _ = start_server([snapshot['path'], '--port', '0', '--device', 'cpu',
                                     '--max-bytes', str(MAX_BYTES)],
                                    str(tmp_path_factory.mktemp('server')))
    yield port
    assert stop_server(proc) == 0


# ----------------------------------------------------------------------------- client helpers

def multipart(fields, boundary='--------------------------0d7a1c5b3e9f'):
    """Body and Content-Type of a form with [(name, filename, bytes)] fields, as browsers send."""
    body = b''
    for name, filename, content in fields:
        body += (f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; '
                 f'filename="{filename}"\r\nContent-Type: application/octet-stream\r\n\r\n'
                 ).encode() + content + b'\r\n'
    return body + f'--{boundary}--\r\n'.encode(), f'multipart/form-data; boundary={boundary}'


def request(port, method, path, body=None, headers=None, conn=None):
    """(status, headers, parsed JSON or text) over a fresh or the given connection."""
    c = conn or http.client.HTTPConnection('127.0.0.1', port, timeout=30)
    try:
        c.request(method, path, body=body, headers=headers or {})
        r = c.getresponse()
        raw = r.read()
        ctype = r.getheader('Content-Type', '')
        return r.status, r, json.loads(raw) if ctype.startswith('application/json') else raw.decode()
    finally:
        if conn is None:
            c.close()


def upload(port, content, field='image', conn=None):
    body, ctype = multipart([(field, 'upload.bin', content)])
    return request(port, 'POST', '/api', body, {'Content-Type': ctype}, conn)


def encode(im, fmt, **kw):
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def _make_images(seed=0):
    rng = np.random.RandomState(seed)
    rgb = Image.fromarray(rng.randint(0, 256, (40, 50, 3), dtype=np.uint8))
    photo = Image.fromarray(rng.randint(0, 256, (48, 64, 3), dtype=np.uint8))
    gray16 = Image.fromarray(rng.randint(0, 65536, (30, 30)).astype(np.uint16))
    return {'png': encode(rgb, 'PNG'), 'jpeg': encode(photo, 'JPEG', quality=90),
            'gray16.png': encode(gray16, 'PNG')}


IMAGES = _make_images()


def reference(snapshot, content, tmp_path):
    """Probabilities of the training pipeline: the preprocessing writer's decoder on a file, a
    c01b batch of one, the validation plan's centre crop with the mean subtracted (lib/data)."""
    path = tmp_path / 'image'
    path.write_bytes(content)
    rgb = load_rgb(str(path), SIZE)                                        # (S, S, 3) uint8
    batch = torch.from_numpy(np.ascontiguousarray(rgb[..., None].transpose(2, 0, 1, 3)))
    mean = data.load_mean(snapshot['mean_file'], SIZE)
    step = data.make_plan(torch.Generator(), 1, 1, SIZE, CROP, train=False)[0]
    x = data.crop_mirror(batch, mean, step, CROP)                          # (1, 3, c, c)
    with torch.no_grad():
        return torch.softmax(snapshot['net'](x), dim=1)[0]


def assert_serving(port):
    status, _, answer = upload(port, IMAGES['png'])
    assert status == 200, answer
    assert len(answer['top5']) == len(CLASSES)


# ----------------------------------------------------------------------------- the tests

@pytest.mark.parametrize('kind', sorted(IMAGES))
def test_upload_matches_training_preprocessing(server, snapshot, tmp_path, kind):
    status, r, answer = upload(server, IMAGES[kind])
    assert status == 200, answer
    assert r.getheader('Content-Type') == 'application/json'
    assert answer['model'] == 'alexnet_cifar' and answer['ms'] >= 0
    top = answer['top5']
    assert len(top) == min(5, len(CLASSES))
    assert sum(t['probability'] for t in top) == pytest.approx(1, abs=1e-5)
    expected = reference(snapshot, IMAGES[kind], tmp_path)
    assert [t['index'] for t in top] == torch.argsort(expected, descending=True).tolist()
    for t in top:
        assert t['class'] == CLASSES[t['index']]
        assert t['probability'] == pytest.approx(expected[t['index']].item(), abs=1e-6)
    assert max(t['probability'] for t in top) > 0.4  # the weights do tell the images apart


@pytest.mark.parametrize('content, field, message', [
    (b'this is not an image\x00\xff' * 50, 'image', 'not an image'),
    (IMAGES['png'][:len(IMAGES['png']) // 2], 'image', 'decode'),
    (IMAGES['jpeg'][:len(IMAGES['jpeg']) // 2], 'image', 'decode'),
    (b'', 'image', 'empty'),
    (IMAGES['png'], 'file', "no field 'image'"),
], ids=['garbage', 'truncated-png', 'truncated-jpeg', 'empty', 'missing-field'])
def test_bad_upload_is_400_and_connection_stays_usable(server, content, field, message):
    conn = http.client.HTTPConnection('127.0.0.1', server, timeout=30)
    try:
        status, _, answer = upload(server, content, field, conn)
        assert status == 400 and message in answer['error'], answer
        status, _, answer = upload(server, IMAGES['png'], conn=conn)  # same keep-alive connection
        assert status == 200, answer
    finally:
        conn.close()


@pytest.mark.parametrize('body, ctype, message', [
    (IMAGES['png'], 'text/plain', 'multipart/form-data'),
    (IMAGES['png'], 'application/x-www-form-urlencoded', 'Content-Type image/*'),  # curl -d
    (b'', 'image/png', 'empty body'),
    (b'--b\r\nContent-Disposition: form-data; name="image"\r\n\r\nxx', 'multipart/form-data; boundary=b',
     'no closing boundary'),
    (b'no delimiter at all', 'multipart/form-data; boundary=b', 'no boundary'),
    (b'', 'multipart/form-data', 'multipart/form-data without a valid boundary'),
], ids=['not-multipart', 'url-encoded', 'empty-raw', 'truncated-multipart', 'no-delimiter',
        'no-boundary'])
def test_malformed_form_is_400(server, body, ctype, message):
    status, _, answer = request(server, 'POST', '/api', body, {'Content-Type': ctype})
    assert status == 400 and message in answer['error'], answer
    assert_serving(server)


def raw_exchange(port, head, body=b''):
    """Status line and JSON of a hand-written request (http.client always adds Content-Length)."""
    with socket.create_connection(('127.0.0.1', port), timeout=30) as s:
        s.sendall(head + body)
        reply = b''
        while chunk := s.recv(65536):
            reply += chunk
    head, _, payload = reply.partition(b'\r\n\r\n')
    return head.split(b'\r\n')[0].decode(), json.loads(payload)


def test_oversize_and_missing_length(server):
    body, ctype = multipart([('image', 'big.png', b'\0' * (MAX_BYTES + 1))])
    status, r, answer = request(server, 'POST', '/api', body, {'Content-Type': ctype})
    assert status == 413 and str(MAX_BYTES) in answer['error'], answer
    assert r.getheader('Connection') == 'close'
    # Expect: 100-continue gets the 413 before sending any of the body
    line, answer = raw_exchange(server, (
        'POST /api HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 1000000000\r\n'
        f'Content-Type: {ctype}\r\n\r\n').encode())
    assert line.startswith('HTTP/1.1 413') and 'larger' in answer['error']
    # no Content-Length (chunked): refused
    line, answer = raw_exchange(server, (
        'POST /api HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n'
        f'Content-Type: {ctype}\r\n\r\n').encode(), b'5\r\nhello\r\n0\r\n\r\n')
    assert line.startswith('HTTP/1.1 411') and 'Content-Length' in answer['error']
    # a body shorter than announced, then the client hangs up
    with socket.create_connection(('127.0.0.1', server), timeout=30) as s:
        s.sendall(f'POST /api HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\n'
                  f'Content-Type: {ctype}\r\n\r\n'.encode() + body[:100])
        s.shutdown(socket.SHUT_WR)
        assert b' 400 ' in s.recv(65536).split(b'\r\n')[0]
    assert_serving(server)


@pytest.mark.parametrize('method, path, status', [
    ('GET', '/api', 405), ('POST', '/', 405), ('PUT', '/api', 405), ('DELETE', '/', 405),
    ('GET', '/nothing', 404), ('POST', '/nothing', 404), ('GET', '/../etc/passwd', 404),
])
def test_wrong_method_or_path(server, method, path, status):
    got, _, answer = request(server, method, path, b'x' * 10 if method != 'GET' else None)
    assert got == status and answer['error'], answer
    assert_serving(server)


def test_a_request_line_over_64_kib_is_414_with_the_status_text(server):
    """The stdlib refuses a request line over 65536 bytes with no message of its own: the JSON
    error is then the status's text. Exactly 65537 bytes are sent, all of which the server reads
    (more, unread at its close, could reset the connection before the reply is read)."""
    line = b'GET /' + b'a' * (65537 - 5)
    status, answer = raw_exchange(server, line)
    assert status.startswith('HTTP/1.1 414') and answer == {'error': 'Request-URI Too Long'}, answer
    assert_serving(server)


@pytest.mark.parametrize('line, status, error', [
    (b'GARBAGE\r\n', '400', "Bad request syntax ('GARBAGE')"),
    (b'GET / HTTP/9.9\r\n', '505', 'Invalid HTTP version (9.9)'),
], ids=['one-word', 'http-9.9'])
def test_an_unparsable_request_line_is_answered_in_json(server, line, status, error):
    """The stdlib's refusals of a request line it cannot use (no method known yet) come as every
    error does: a status line and headers (the stdlib sends the body alone, as HTTP/0.9 would),
    JSON, the connection closed."""
    got, answer = raw_exchange(server, line)
    assert got.startswith(f'HTTP/1.1 {status}') and answer == {'error': error}, (got, answer)
    assert_serving(server)


def test_index_page(server):
    status, r, page = request(server, 'GET', '/')
    assert status == 200 and r.getheader('Content-Type').startswith('text/html')
    assert '<form' in page and 'type="file"' in page and 'name="image"' in page
    assert "fetch('api'" in page and 'alexnet_cifar' in page
    assert 'id="classify" disabled>' in page  # until the script runs
    status, r, _ = request(server, 'HEAD', '/')
    assert status == 200 and int(r.getheader('Content-Length')) == len(page.encode())
    # ... and no body after HEAD's headers (http.client would not read one: the raw bytes)
    with socket.create_connection(('127.0.0.1', server), timeout=30) as s:
        s.sendall(b'HEAD / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n')
        raw = _read_all(s)
    assert raw.startswith(b'HTTP/1.1 200 ') and raw.endswith(b'\r\n\r\n'), raw[-200:]


def test_multipart_parser_is_binary_safe():
    tricky = b'\r\n--\r--boundar\n\r\n\r\n\x00\xff--'  # line ends and dashes in the content
    body, ctype = multipart([('other', 'a.txt', b'x'), ('image', 'b.png', tricky),
                             ('image', 'c.png', b'second')], boundary='boundary')
    assert serve.upload_image(ctype, b'preamble\r\n' + body) == tricky
    no_filename = body.replace(b'; filename="b.png"', b'')  # a plain field: still bytes, as sent
    assert serve.upload_image(ctype, no_filename) == tricky
    quoted = body.replace(b'boundary', b'a b:c')
    assert serve.upload_image('multipart/form-data; boundary="a b:c"', quoted) == tricky
    with pytest.raises(serve.BadRequest, match='no closing boundary'):
        serve.upload_image(ctype, body[:-10])
    with pytest.raises(serve.BadRequest, match='no boundary found'):
        serve.upload_image('multipart/form-data; boundary=other', body)


def test_a_malformed_form_is_named_by_where_it_breaks():
    """Before any boundary, in a part's headers, inside a part (the body cut right after a part's
    headers, or inside the closing boundary), or a form of more parts than serve.MAX_PARTS (which
    werkzeug's decoder refuses past the headers of the one too many): each its own message."""
    def parts(n, last=b'x'):
        return b''.join(b'--b\r\nContent-Disposition: form-data; name="f%d"\r\n\r\nx\r\n' % i
                        for i in range(n - 1)) + \
            b'--b\r\nContent-Disposition: form-data; name="image"\r\n\r\n' + last + b'\r\n--b--\r\n'
    ctype, cut = 'multipart/form-data; boundary=b', 'no closing boundary (truncated upload?)'
    assert serve.upload_image(ctype, parts(serve.MAX_PARTS, b'png')) == b'png'
    for body, message in ((b'no delimiter at all', 'malformed multipart body: no boundary found'),
                          (b'--b\r\nContent-Type: image/png\r\n\r\nx\r\n--b--\r\n',
                           'malformed multipart body: bad part headers'),     # no Content-Disposition
                          (parts(1)[:-10], f'malformed multipart body: {cut}'),
                          (parts(1)[:-3], f'malformed multipart body: {cut}'),
                          (parts(serve.MAX_PARTS + 1),
                           "a form of more than 100 parts (send field 'image' alone)")):
        with pytest.raises(serve.BadRequest) as e:
            serve.upload_image(ctype, body)
        assert str(e.value) == message, (body[-40:], e.value)



@pytest.mark.parametrize('params', ['', '; boundary=', '; boundary=""', '; boundary=' + 'b' * 201,
                                    '; boundary="b\u00e9"'],
                         ids=['none', 'empty', 'empty-quoted', '201-chars', 'not-ascii'])
def test_a_form_without_a_usable_boundary_is_named_as_such(params):
    """No boundary, an empty one, one over 200 characters or not ASCII: refused before parsing,
    whatever the body (a form delimited by an empty boundary, the same form delimited by 'b', none)."""
    body = b'--\r\nContent-Disposition: form-data; name="image"\r\n\r\nx\r\n----\r\n'
    for form in (body, body.replace(b'--\r', b'--b\r').replace(b'----', b'--b--'), b''):
        with pytest.raises(serve.BadRequest) as e:
            serve.upload_image('multipart/form-data' + params, form)
        assert str(e.value) == 'multipart/form-data without a valid boundary', (params, form)


def test_a_wrong_content_type_names_every_accepted_one_and_the_curl_commands():
    with pytest.raises(serve.BadRequest) as refused:
        serve.upload_image('text/plain', b'x')
    for kind in ('multipart/form-data', 'image/*', 'application/octet-stream'):
        assert kind in str(refused.value), refused.value
    # and how to send one right, in curl's words (its options are case-sensitive)
    assert "got text/plain (curl -F image=@FILE, or --data-binary @FILE -H 'Content-Type: " \
           "image/jpeg')" in str(refused.value), refused.value


def test_a_file_that_is_not_a_snapshot_is_named_without_torch_internals(tmp_path, capsys):
    """serve.py weights/history.csv: what the file is not, not torch.load's IndexError."""
    csv = tmp_path / 'history.csv'
    csv.write_text('epoch,train_loss,train_error\n1,6.9,0.99\n')
    assert serve.main([str(csv)]) == 2
    err = capsys.readouterr().err
    assert err == (f'error: {csv} is not a readable snapshot: not a torch zip file as train.py writes '
                   f'(another kind of file, or one cut short)\n'), err


def test_missing_mean_or_classes_is_a_one_line_error(tmp_path, capsys):
    snap = make_snapshot(str(tmp_path), paths_in_config=False)
    assert serve.main([snap['path'], '--classes', snap['dataset_yaml']]) == 2
    err = capsys.readouterr().err
    assert err.count('\n') == 1 and 'mean_file' in err and '--mean' in err
    missing = str(tmp_path / 'nope.npy')
    assert serve.main([snap['path'], '--mean', missing, '--classes', snap['dataset_yaml']]) == 2
    err = capsys.readouterr().err
    assert err.count('\n') == 1 and missing in err
    shutil.move(snap['dataset_yaml'], str(tmp_path / 'moved.yaml'))
    assert serve.main([snap['path'], '--mean', snap['mean_file']]) == 2
    assert 'label_folder' in capsys.readouterr().err
    assert serve.main([snap['path'], '--mean', snap['mean_file'],
                       '--classes', snap['dataset_yaml']]) == 2
    err = capsys.readouterr().err
    assert err.count('\n') == 1 and snap['dataset_yaml'] in err
    assert serve.main([str(tmp_path / 'none.pt')]) == 2
    assert 'none.pt' in capsys.readouterr().err
    assert serve.main([str(tmp_path)]) == 2  # a folder, not a snapshot file
    assert capsys.readouterr().err.strip() == (f'error: {tmp_path} is a folder: give a snapshot '
                                               f'file model_<N>.pt (the newest there: {snap["path"]})')
    (tmp_path / 'cut.pt').write_bytes(open(snap['path'], 'rb').read()[:1000])  # truncated
    assert serve.main([str(tmp_path / 'cut.pt')]) == 2
    err = capsys.readouterr().err
    assert err.count('\n') == 1 and f'{tmp_path / "cut.pt"} is not a readable snapshot' in err, err


def test_port_in_use_exits_2(snapshot, tmp_path):
    with socket.socket() as taken:
        taken.bind(('127.0.0.1', 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc, _, out, err = start_server([snapshot['path'], '--port', str(port)], str(tmp_path),
                                         wait=False)
        assert proc.wait(60) == 2
    with open(err) as f:
        lines = f.read().splitlines()
    assert len(lines) == 1 and str(port) in lines[0] and lines[0].startswith('error:'), lines


def test_explicit_files_and_ctrl_c(tmp_path):
    """--mean / --classes for a snapshot whose config names neither; SIGINT stops it with 0.
    Without --max-bytes, a body of more than 20 MiB is refused (before it is sent)."""
    snap = make_snapshot(str(tmp_path), paths_in_config=False)
    proc, port, out, _ = start_server([snap['path'], '--port', '0', '--mean', snap['mean_file'],
                                       '--classes', snap['dataset_yaml']], str(tmp_path))
    try:
        status, _, answer = upload(port, IMAGES['jpeg'])
        assert status == 200 and {t['class'] for t in answer['top5']} == set(CLASSES)
        with socket.create_connection(('127.0.0.1', port), timeout=30) as s:
            s.sendall(f'POST /api HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n'
                      f'Content-Length: {20 * 1024 * 1024 + 1}\r\nContent-Type: image/png\r\n\r\n'.encode())
            reply = s.recv(65536)  # the first answer: 413, not 100 Continue
            assert reply.startswith(b'HTTP/1.1 413 '), reply
            while chunk := s.recv(65536):  # then the connection is closed
                reply += chunk
        assert b'limit of 20971520 bytes' in reply, reply
    finally:
        assert stop_server(proc) == 0
    with open(out) as f:
        assert 'stopped' in f.read()


def test_still_serving_after_everything(server):
    assert_serving(server)


def test_a_padded_dataset_is_framed_as_in_training(tmp_path):
    """dataset.yaml's pad (preprocessing framed the images in black): serve.py frames the upload
    the same way, so its input equals the training pipeline's centre crop of the framed image."""
    snap = make_snapshot(str(tmp_path))
    with open(snap['dataset_yaml'], 'w') as f:
        yaml.safe_dump({'num_classes': len(CLASSES), 'class_names': CLASSES, 'pad': 2}, f)
    clf = serve.Classifier(snap['path'], device='cpu')
    path = tmp_path / 'image'
    path.write_bytes(IMAGES['jpeg'])
    rgb = load_rgb(str(path), SIZE, pad=2)
    assert not rgb[:2].any() and not rgb[:, -2:].any()
    batch = torch.from_numpy(np.ascontiguousarray(rgb[..., None].transpose(2, 0, 1, 3)))
    step = data.make_plan(torch.Generator(), 1, 1, SIZE, CROP, train=False)[0]
    want = data.crop_mirror(batch, data.load_mean(snap['mean_file'], SIZE), step, CROP)
    assert torch.equal(clf.preprocess(IMAGES['jpeg']), want)
    with open(snap['dataset_yaml'], 'w') as f:  # a frame of half the image leaves no image
        yaml.safe_dump({'num_classes': len(CLASSES), 'class_names': CLASSES, 'pad': SIZE // 2}, f)
    with pytest.raises(serve.SetupError, match=f'pad {SIZE // 2} does not fit images of {SIZE} px'):
        serve.Classifier(snap['path'], device='cpu')


def test_the_device_is_chosen_automatically_by_default(snapshot):
    """Classifier (and serve.py without --device) takes cuda:0 where there is one, else the CPU."""
    assert serve.Classifier(snapshot['path']).device.type == ('cuda' if torch.cuda.is_available() else 'cpu')


# ----------------------------------------------------------------------------- formats, words, limits

@pytest.fixture(scope='module')
def classifier(snapshot):
    return serve.Classifier(snapshot['path'], device='cpu')


@contextlib.contextmanager
def served(classifier, **limits):
    """serve.make_server in a thread of this process (fast to start; the sockets are real);
    served.server is the server."""
    srv = served.server = serve.make_server(classifier, '127.0.0.1', 0, MAX_BYTES, **limits)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        yield srv.server_address[1]
    finally:
        srv.shutdown()
        srv.server_close()


@pytest.mark.parametrize('ctype', ['image/png', 'image/jpeg', 'application/octet-stream'])
@pytest.mark.parametrize('kind', ['png', 'jpeg'])
def test_raw_body_gets_the_same_answer_as_the_form(server, kind, ctype):
    """curl --data-binary @x -H 'Content-Type: image/...' as curl -F image=@x (the declared
    type does not matter: Pillow reads the content)."""
    status, _, form = upload(server, IMAGES[kind])
    assert status == 200, form
    status, _, raw = request(server, 'POST', '/api', IMAGES[kind], {'Content-Type': ctype})
    assert status == 200, raw
    assert raw['top5'] == form['top5'] and raw['model'] == form['model']


def test_class_words_from_dataset_yaml(tmp_path):
    snap = make_snapshot(str(tmp_path))
    wnids = ['n02121808', 'n02084071', 'n01503061']
    words = ['domestic cat, house cat', 'dog, domestic dog, Canis familiaris', 'bird']
    with open(snap['dataset_yaml'], 'w') as f:
        yaml.safe_dump({'num_classes': 3, 'class_names': wnids, 'class_words': words}, f)
    with served(serve.Classifier(snap['path'], device='cpu')) as port:
        status, _, answer = upload(port, IMAGES['jpeg'])
    assert status == 200 and len(answer['top5']) == 3, answer
    for t in answer['top5']:
        assert (t['class'], t['words']) == (wnids[t['index']], words[t['index']])
    with open(snap['dataset_yaml'], 'w') as f:
        yaml.safe_dump({'class_names': wnids, 'class_words': words[:2]}, f)
    with pytest.raises(serve.SetupError, match='class_words must be a list of the 3 classes'):
        serve.Classifier(snap['path'], device='cpu')



@pytest.mark.parametrize('meta, got', [({'class_words': ['a', 'b', 'c']}, 'got None'),
                                       ({'class_names': ['cat', 'dog']}, 'got 2'),
                                       (['cat', 'dog'], 'got 2')],
                         ids=['no-class-names', 'two-class-names', 'a-list-of-two'])
def test_class_names_missing_or_of_another_count_are_named(tmp_path, meta, got):
    """A dataset.yaml without class_names, or with a list of another length than the snapshot's
    classes, is a SetupError naming the file and the key (not a TypeError later)."""
    snap = make_snapshot(str(tmp_path))
    with open(snap['dataset_yaml'], 'w') as f:
        yaml.safe_dump(meta, f)
    with pytest.raises(serve.SetupError) as e:
        serve.Classifier(snap['path'], device='cpu')
    assert str(e.value) == (f"{snap['dataset_yaml']}: class_names must be a list of the 3 classes "
                            f'of the snapshot, {got}'), e.value


def flat(w, h, fmt='PNG'):
    """A large image that compresses well (a legal upload under MAX_BYTES)."""
    return encode(Image.new('RGB', (w, h), (200, 30, 90)), fmt)


@pytest.mark.parametrize('fmt', ['GIF', 'BMP', 'WEBP'])
def test_accepted_formats(server, fmt):
    status, _, answer = upload(server, encode(Image.open(io.BytesIO(IMAGES['png'])), fmt))
    assert status == 200, answer


def test_other_formats_and_images_over_the_pixel_cap_are_refused(server):
    tiff = encode(Image.open(io.BytesIO(IMAGES['png'])), 'TIFF')
    status, _, answer = upload(server, tiff)
    assert status == 400 and 'not one of JPEG, PNG, GIF, BMP, WEBP' in answer['error'], answer
    big = flat(4100, 4000)  # 16.4 Mpx, over the default 16 Mpx (a small file: a bomb)
    assert len(big) < MAX_BYTES
    status, _, answer = upload(server, big)
    assert status == 400 and '4100 x 4000' in answer['error'] and '16000000' in answer['error']
    status, _, answer = upload(server, flat(3900, 4000))  # 15.6 Mpx: accepted
    assert status == 200, answer


@pytest.mark.parametrize('value', [b'\xb2', b'1\xb2', b'+5', b'-1', b'5_0', b'0x10', b''])
def test_content_length_must_be_ascii_digits(server, value):
    """'\xb2' reads as the Latin-1 superscript two, which str.isdigit() takes for a digit."""
    line, answer = raw_exchange(server, b'POST /api HTTP/1.1\r\nHost: x\r\nContent-Length: ' + value
                                + b'\r\nContent-Type: image/png\r\n\r\n', b'12345')
    assert line.startswith('HTTP/1.1 400') and 'Content-Length' in answer['error'], (line, answer)
    assert_serving(server)


def test_a_trickling_client_is_cut_at_the_deadline(classifier):
    """One byte every 0.2 s would take 200 s: the server answers 408 after its 2 s deadline. A
    client trickling its headers is disconnected the same way."""
    ctype = 'image/png'
    with served(classifier, deadline=2.0) as port:
        for head, body in [(f'POST /api HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n'
                            f'Content-Type: {ctype}\r\n\r\n'.encode(), b'x' * 1000),
                           (b'', b'POST /api HTTP/1.1\r\nHost: x\r\n' * 20)]:
            with socket.create_connection(('127.0.0.1', port), timeout=30) as s:
                start = time.monotonic()
                s.sendall(head)
                s.setblocking(False)
                reply = b''
                for i in range(len(body)):
                    with contextlib.suppress(BlockingIOError):
                        if not (chunk := s.recv(65536)):
                            break  # closed by the server
                        reply += chunk
                    with contextlib.suppress(OSError):  # BrokenPipe, reset: cut
                        s.send(body[i:i + 1])
                    time.sleep(0.2)
                took = time.monotonic() - start
            assert 1.9 < took < 20, took  # cut at the deadline, not at the end of the body
            assert reply.startswith(b'HTTP/1.1 408' if head else b''), reply
        assert_serving(port)


def test_a_burst_beyond_the_bound_gets_503_and_serving_goes_on(classifier):
    """Two clients stall inside uploads of --max-bytes, holding all the room for bodies that
    --max-inflight 2 gives (2 x --max-bytes): every other upload gets 503 at once; when the two
    hang up, uploads are served again."""
    head = (f'POST /api HTTP/1.1\r\nHost: x\r\nContent-Length: {MAX_BYTES}\r\n'
            f'Content-Type: image/png\r\n\r\n').encode()
    with served(classifier, max_inflight=2) as port:
        holders = [socket.create_connection(('127.0.0.1', port), timeout=30) for _ in range(2)]
        for h in holders:
            h.sendall(head + IMAGES['png'][:100])
        deadline = time.monotonic() + 30
        while served.server.room[0]:  # until both are being read (an upload sent before might
            assert time.monotonic() < deadline, served.server.room  # take room from one)
            time.sleep(0.05)
        answers = [None] * 8
        burst = [threading.Thread(target=lambda i=i: answers.__setitem__(i, upload(port, IMAGES['png'])))
                 for i in range(8)]
        for t in burst:
            t.start()
        for t in burst:
            t.join(30)
        for status, r, answer in answers:
            assert status == 503 and 'busy' in answer['error'] and r.getheader('Retry-After') == '1'
        for h in holders:
            h.shutdown(socket.SHUT_WR)  # their bodies end short: 400, and the slots are free
            assert b' 400 ' in h.recv(65536).split(b'\r\n')[0]
            h.close()
        assert_serving(port)


def test_a_body_shorter_than_its_length_is_400_and_the_connection_is_closed(classifier):
    """The client hangs up after 100 of the 5000 bytes it announced: the stream is out of step,
    so the 400 says Connection: close and the server closes (recv then gives b'')."""
    with served(classifier) as port, \
            socket.create_connection(('127.0.0.1', port), timeout=30) as s:
        s.sendall(b'POST /api HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\n'
                  b'Content-Type: image/png\r\n\r\n' + IMAGES['png'][:100])
        s.shutdown(socket.SHUT_WR)
        reply = b''
        while chunk := s.recv(65536):  # until the server closes (a timeout fails the test)
            reply += chunk
        head, _, payload = reply.partition(b'\r\n\r\n')
        lines = head.decode().split('\r\n')
        assert lines[0] == 'HTTP/1.1 400 Bad Request', reply
        assert 'Connection: close' in lines[1:], reply
        assert json.loads(payload) == {'error': 'body ended after 100 of 5000 bytes'}


def test_a_large_image_does_not_hold_up_a_small_one(classifier, monkeypatch):
    """Decoding runs outside the model's lock: while a large (legal) image is still being
    decoded, held there as long as the test likes, a small one is answered. With both of
    --max-inflight 2 decoding large images, a small one gets 503 at once."""
    big = flat(3900, 4000)
    started, release = threading.Semaphore(0), threading.Event()
    load_rgb = serve.load_rgb

    def slow_load_rgb(fp, size, pad=0):
        if len(fp.getvalue()) == len(big):
            started.release()
            release.wait(60)
        return load_rgb(fp, size, pad)
    monkeypatch.setattr(serve, 'load_rgb', slow_load_rgb)
    with served(classifier, max_inflight=2) as port:
        answers, threads = [], []
        try:
            for n in range(2):
                threads.append(threading.Thread(target=lambda: answers.append(upload(port, big))))
                threads[-1].start()
                assert started.acquire(timeout=30)
                status, r, answer = upload(port, IMAGES['png'])  # http.client's timeout: 30 s
                assert status == (200 if n == 0 else 503), answer
                assert r.getheader('Retry-After') == (None if n == 0 else '1')  # with every 503
                assert all(t.is_alive() for t in threads) and not answers  # still decoding
        finally:
            release.set()
            for t in threads:
                t.join(60)
        assert [a[0] for a in answers] == [200, 200], answers
        assert_serving(port)


def test_fifty_stalled_clients_do_not_block_a_request(server):
    """Connections that stop inside their headers or bodies hold a thread each, not the server."""
    stalled = [socket.create_connection(('127.0.0.1', server), timeout=30) for _ in range(50)]
    try:
        for i, s in enumerate(stalled):
            s.sendall(b'POST /api HTTP/1.1\r\nHost: x\r\n' if i % 2 else
                      b'POST /api HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n'
                      b'Content-Length: 5000\r\n\r\n' + IMAGES['png'][:100])
        assert_serving(server)
    finally:
        for s in stalled:
            s.close()


def _threads_and_fds(pid):
    return len(os.listdir(f'/proc/{pid}/task')), len(os.listdir(f'/proc/{pid}/fd'))


def _settled(pid):
    """The threads and files of an idle process, once the same for a second (a connection just
    closed may still hold its thread a moment)."""
    last, deadline = _threads_and_fds(pid), time.monotonic() + 30
    while time.monotonic() < deadline:
        time.sleep(1)
        if (now := _threads_and_fds(pid)) == last:
            return now
        last = now
    pytest.fail(f'threads and files of process {pid} still changing after 30 s: {last}')


def _read_all(s):
    """What the server sent before it closed (b'' if it sent nothing and closed)."""
    reply = b''
    while chunk := s.recv(65536):
        reply += chunk
    return reply


@pytest.mark.skipif(not os.path.isdir('/proc/self/task'), reason='counts threads in /proc')
def test_a_flood_of_idle_connections_is_held_to_the_cap(snapshot, tmp_path):
    """serve.py --max-connections 8 under 40 idle connections: 8 hold a thread each (until they
    hang up, or --deadline), the other 32 are answered at once 503 with Retry-After, without a
    thread; so is an upload sent during the flood (its reply arrives whole). Once the flood hangs
    up, uploads are served and the server holds as many threads and files as before it."""
    proc, port, _, _ = start_server([snapshot['path'], '--port', '0', '--device', 'cpu',
                                     '--max-connections', '8'], str(tmp_path))
    flood = []
    try:
        assert_serving(port)
        before = _settled(proc.pid)
        flood = [socket.create_connection(('127.0.0.1', port), timeout=10) for _ in range(40)]
        pending, refused, deadline = set(flood), [], time.monotonic() + 10
        while len(refused) < 32 and time.monotonic() < deadline:  # the first 8 are held
            for s in select.select(list(pending), [], [], 1)[0]:
                pending.discard(s)
                refused.append(_read_all(s))
        assert not select.select(list(pending), [], [], 0.5)[0]  # the held ones hear nothing
        assert len(refused) == 32, f'{len(refused)} of 40 connections refused with --max-connections 8'
        for reply in refused:
            head, _, body = reply.partition(b'\r\n\r\n')
            assert head.startswith(b'HTTP/1.1 503 ') and b'\r\nRetry-After: 1\r\n' in head, reply
            assert 'busy: 8 connections' in json.loads(body)['error'], reply
        threads = _threads_and_fds(proc.pid)[0]
        assert threads <= before[0] + 8, (before, threads)
        status, r, answer = upload(port, IMAGES['png'])  # a full request, refused the same way
        assert status == 503 and r.getheader('Retry-After') == '1' and 'busy' in answer['error']
        for s in flood:
            s.close()
        deadline = time.monotonic() + 30
        while _threads_and_fds(proc.pid) != before:  # the held threads end as their clients go
            assert time.monotonic() < deadline, (before, _threads_and_fds(proc.pid))
            time.sleep(0.1)
        assert_serving(port)
    finally:
        for s in flood:
            s.close()
        stopped = stop_server(proc)
    assert stopped == 0


def test_a_refused_client_that_stays_connected_is_closed_after_the_linger(classifier):
    """A connection over --max-connections gets its 503, then the server reads what it still sends
    for Server.LINGER_S (here 0.2 s) and closes it, even though the client never hangs up: its
    next send is answered with a reset, and the server holds no socket of it."""
    with served(classifier, max_connections=1) as port:
        served.server.LINGER_S = 0.2
        with socket.create_connection(('127.0.0.1', port), timeout=30) as held, \
                socket.create_connection(('127.0.0.1', port), timeout=30) as refused:
            assert _read_all(refused).startswith(b'HTTP/1.1 503 ')  # then the server's half closes
            deadline, reset = time.monotonic() + 10, False
            while not reset and time.monotonic() < deadline:
                time.sleep(0.1)
                try:
                    refused.sendall(b'x')  # read and dropped while the server holds the socket
                    refused.recv(1)  # b'' (the server's half is closed) until the reset arrives
                except (ConnectionResetError, BrokenPipeError):
                    reset = True
            assert reset, 'the refused connection still open 10 s after its 503 (linger 0.2 s)'
            assert served.server.closing == []
            held.sendall(b'GET / HTTP/1.1\r\nHost: x\r\n\r\n')  # the held one is served
            assert held.recv(65536).startswith(b'HTTP/1.1 200 ')


def test_bad_device_or_a_snapshot_of_another_network_is_a_one_line_error(snapshot, tmp_path, capsys):
    """The trainer's device parsing (lib.trainer.resolve_device) and lib.model.from_state."""
    assert serve.main([snapshot['path'], '--device', 'gpu-one']) == 2
    err = capsys.readouterr().err
    assert err.count('\n') == 1 and "--device: 'gpu-one' is not a device" in err, err
    snap = torch.load(snapshot['path'], weights_only=True)
    snap['config'] = dict(snap['config'], model='alexnet', crop_size=227)
    torch.save(snap, tmp_path / 'other.pt')
    assert serve.main([str(tmp_path / 'other.pt'), '--device', 'cpu']) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {tmp_path / 'other.pt'} does not fit model alexnet "
                          '(crop_size 227): ') and err.count('\n') == 1, err
    for flag in ('--max-pixels', '--max-inflight', '--deadline', '--max-bytes'):
        with pytest.raises(SystemExit):
            serve.main([snapshot['path'], flag, '0'])
        assert f'{flag} must be positive' in capsys.readouterr().err


def test_the_page_is_rendered_once_at_start_and_a_missing_one_is_a_setup_error(classifier,
                                                                                monkeypatch):
    page = serve.render_page(classifier)
    assert page.startswith(b'<!doctype') or b'<html' in page
    assert f'<title>{classifier.name}: {classifier.num_classes} classes</title>'.encode() in page
    monkeypatch.setattr(serve, 'PAGE', '/nonexistent/serve_page.html')
    with pytest.raises(serve.SetupError, match='cannot read the page /nonexistent/serve_page.html'):
        serve.make_server(classifier, '127.0.0.1', 0, MAX_BYTES)


def test_help_names_the_devices_and_the_limits(capsys):
    with pytest.raises(SystemExit) as e:
        serve.main(['--help'])
    assert e.value.code == 0
    text = ' '.join(capsys.readouterr().out.split())
    for part in ('--device DEVICE auto | cpu | cuda:N (default auto)',
                 '--max-bytes MAX_BYTES largest accepted request body (default 20 MiB)'):
        assert part in text, text


def test_a_port_out_of_range_is_a_one_line_error(snapshot, capsys):
    """--port 70000: the socket library's OverflowError (no strerror, unlike an OSError) is named
    in one line too."""
    assert serve.main([snapshot['path'], '--port', '70000', '--device', 'cpu']) == 2
    err = capsys.readouterr().err
    assert err.count('\n') == 1 and err.startswith('error: cannot listen on 127.0.0.1 port 70000: '), err


def test_a_failure_inside_classification_is_a_500_that_closes_the_connection(classifier, monkeypatch):
    """Whatever one request does (here the network raises), that request gets 500 naming the
    error, its connection is closed, and the server goes on serving."""
    def broken(x):
        raise RuntimeError('out of memory')
    with served(classifier) as port:
        conn = http.client.HTTPConnection('127.0.0.1', port, timeout=30)
        with monkeypatch.context() as m:
            m.setattr(classifier, 'net', broken)
            status, r, answer = upload(port, IMAGES['png'], conn=conn)
        assert status == 500 and 'internal error: RuntimeError: out of memory' in str(answer)
        assert r.getheader('Connection') == 'close'
        conn.close()
        assert upload(port, IMAGES['png'])[0] == 200
