"""Classify uploaded images with a trained snapshot over HTTP (Python standard library server).

    python serve.py weights/model_60.pt                     # http://127.0.0.1:9999/
    python serve.py weights/model_60.pt --port 8080 --device cpu
    python serve.py model.pt --mean img_mean.npy --classes dataset.yaml

GET /      a page to pick an image and see its top-5 classes
POST /api  multipart/form-data with the file in field `image`; answers JSON
           {"top5": [{"class": name, "index": i, "probability": p}, ...], "model": name, "ms": t}
           errors: {"error": "..."} with 400 (not an image, malformed upload), 411 (no
           Content-Length), 413 (body over --max-bytes), 404 / 405 (unknown path / method).

The image goes through the preprocessing of training: decoded to RGB upright as preprocessing/
does (any mode, EXIF orientation), stretched to S x S (S = the mean image's side), the mean image
subtracted, the centre crop_size crop taken (offset (S - crop) // 2), values in 0..255 minus the
mean (no /255 scaling), then softmax over the network's outputs.
"""
import argparse
import io
import json
import os
import signal
import socket
import sys
import threading
import time
from email.message import Message
from email.parser import BytesHeaderParser
from email.utils import collapse_rfc2231_value
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

import numpy as np
import torch
import yaml
from PIL import Image, UnidentifiedImageError

from lib import model as models
from lib.data import crop_mirror, make_plan
from preprocessing.images import load_rgb

FIELD = 'image'
# Raster formats only: Pillow would hand EPS / PDF content to Ghostscript when loading it.
FORMATS = ('JPEG', 'MPO', 'PNG', 'GIF', 'BMP', 'DIB', 'TIFF', 'WEBP', 'PPM', 'TGA', 'ICO')
MAX_PIXELS = Image.MAX_IMAGE_PIXELS  # ~89 Mpixel, where Pillow starts warning about bombs


class SetupError(Exception):
    """A missing or unusable input file (snapshot, mean, classes); the message names it."""


class BadRequest(Exception):
    """The upload cannot be classified; answered with 400 and the message."""


# ----------------------------------------------------------------------------- the classifier

def _resolve_device(name):
    if name == 'auto':
        return torch.device('cuda:0' if torch.cuda.is_available() else 'cpu')
    if name == 'cpu':
        return torch.device('cpu')
    index = name[5:] if name.startswith('cuda:') else ''
    if not index.isdigit():
        raise SetupError(f"--device '{name}' is not a device (use auto, cpu or cuda:N)")
    if not torch.cuda.is_available():
        raise SetupError(f"--device '{name}' asks for CUDA, which is not available here")
    if int(index) >= torch.cuda.device_count():
        raise SetupError(f"--device '{name}' but only {torch.cuda.device_count()} CUDA device(s)")
    return torch.device(name)


def _dataset_info(path, n):
    """(class names, pad): the dataset.yaml's class_names, and the black border preprocessing
    framed the images with (0 when not recorded, or for a plain list of names)."""
    if not os.path.isfile(path):
        raise SetupError(f'class names file {path} not found (give --classes DATASET_YAML)')
    try:
        with open(path) as f:
            meta = yaml.safe_load(f)
    except (OSError, yaml.YAMLError) as e:
        raise SetupError(f'cannot read class names from {path}: {" ".join(str(e).split())}') from None
    names = meta.get('class_names') if isinstance(meta, dict) else meta
    if not isinstance(names, list):
        raise SetupError(f'{path} holds no class_names list')
    if len(names) != n:
        raise SetupError(f'{path} names {len(names)} classes, the snapshot has {n} outputs')
    pad = meta.get('pad', 0) if isinstance(meta, dict) else 0
    if not isinstance(pad, int) or isinstance(pad, bool) or pad < 0:
        raise SetupError(f'{path}: pad must be a non-negative integer, got {pad!r}')
    return [str(c) for c in names], pad


def _mean_image(path, crop_size):
    if not os.path.isfile(path):
        raise SetupError(f'mean file {path} not found (give --mean MEAN_FILE)')
    try:
        mean = np.load(path)
    except (OSError, ValueError) as e:
        raise SetupError(f'cannot read mean image {path}: {" ".join(str(e).split())}') from None
    if mean.ndim != 3 or mean.shape[0] != 3 or mean.shape[1] != mean.shape[2] \
            or mean.shape[1] < crop_size:
        raise SetupError(f'{path}: mean image has shape {mean.shape}, expected (3, S, S) with '
                         f'S >= crop_size {crop_size}')
    return torch.from_numpy(mean.astype(np.float32))


class Classifier:
    """The network of a snapshot, with the preprocessing of its training data."""

    def __init__(self, checkpoint, mean_file=None, classes_file=None, device='auto'):
        self.device = _resolve_device(device)
        if not os.path.isfile(checkpoint):
            raise SetupError(f'snapshot {checkpoint} not found')
        try:
            snap = torch.load(checkpoint, map_location='cpu', weights_only=True)
            state, cfg = snap['model'], snap.get('config') or {}
            if not isinstance(state, dict) or not isinstance(cfg, dict):
                raise TypeError("'model' must be a state_dict and 'config' a dict")
        except Exception as e:  # noqa: BLE001 -- unpickling fails in many ways
            raise SetupError(f'cannot read snapshot {checkpoint}: '
                             f'{" ".join(f"{type(e).__name__}: {e}".split())}') from None
        self.name = cfg.get('model', 'alexnet')
        self.crop_size = int(cfg.get('crop_size', 227 if self.name == 'alexnet' else 32))
        weights = [v for k, v in state.items()
                   if k.endswith('weight') and isinstance(v, torch.Tensor) and v.ndim == 2]
        if not weights:
            raise SetupError(f'{checkpoint}: no fully connected layer in the snapshot')
        self.num_classes = weights[-1].shape[0]
        try:
            net = models.build(self.name, self.num_classes, float(cfg.get('dropout', 0.5)),
                               self.crop_size, 0)
            net.load_state_dict(state)
        except (ValueError, RuntimeError) as e:
            raise SetupError(f'{checkpoint} does not fit model {self.name} '
                             f'(crop_size {self.crop_size}): {str(e).splitlines()[0]}') from None
        self.net = net.to(self.device).eval()

        if mean_file is None:
            if not cfg.get('mean_file'):
                raise SetupError(f"{checkpoint}: its config names no mean_file; give --mean MEAN_FILE")
            mean_file = cfg['mean_file']
        if classes_file is None:
            if not cfg.get('label_folder'):
                raise SetupError(f"{checkpoint}: its config names no label_folder; "
                                 "give --classes DATASET_YAML")
            classes_file = os.path.join(os.path.dirname(os.path.normpath(cfg['label_folder'])),
                                        'dataset.yaml')
        mean = _mean_image(mean_file, self.crop_size)
        self.image_size, self.mean = mean.shape[1], mean
        # validation's centre crop, no mirror (lib/data.make_plan with train=False)
        self.step = make_plan(None, 1, 1, self.image_size, self.crop_size, train=False)[0]
        self.classes, self.pad = _dataset_info(classes_file, self.num_classes)
        if 2 * self.pad >= self.image_size:
            raise SetupError(f'{classes_file}: pad {self.pad} does not fit images of {self.image_size} px')
        self.mean_file, self.classes_file = mean_file, classes_file
        self.lock = threading.Lock()  # one image at a time: bounds memory, ReLUs are in place

    def preprocess(self, data):
        """Encoded image bytes -> float32 (1, 3, c, c), as lib/data.crop_mirror feeds validation."""
        try:
            with Image.open(io.BytesIO(data)) as im:  # reads the header only
                fmt, (w, h) = im.format, im.size
        except UnidentifiedImageError:
            raise BadRequest('not an image (unknown or unsupported format)') from None
        except Exception as e:  # noqa: BLE001 -- SyntaxError, struct.error... from a bad header
            raise BadRequest(f'not an image: {" ".join(f"{type(e).__name__}: {e}".split())}') from None
        if fmt not in FORMATS:
            raise BadRequest(f'unsupported image format {fmt} (accepted: {", ".join(FORMATS)})')
        if w * h > MAX_PIXELS:
            raise BadRequest(f'image of {w} x {h} pixels is larger than {MAX_PIXELS} pixels')
        try:
            rgb = load_rgb(io.BytesIO(data), self.image_size, self.pad)  # uint8 (S, S, 3)
        except Exception as e:  # noqa: BLE001 -- BadImage, and anything a hostile file raises
            raise BadRequest(f'cannot decode the image: {" ".join(str(e).split())}') from None
        batch = torch.from_numpy(rgb.transpose(2, 0, 1)[..., None])  # (3, S, S, 1) as stored
        return crop_mirror(batch, self.mean, self.step, self.crop_size)  # (1, 3, c, c)

    def classify(self, data, k=5):
        """The top-k as [{class, index, probability}], best first, and the milliseconds taken."""
        with self.lock:
            start = time.perf_counter()
            x = self.preprocess(data)
            with torch.inference_mode():
                prob = torch.softmax(self.net(x.to(self.device)).float(), dim=1)[0].cpu()
            top = torch.topk(prob, min(k, self.num_classes))
            ms = (time.perf_counter() - start) * 1000
        return [{'class': self.classes[i], 'index': i, 'probability': p}
                for p, i in zip(top.values.tolist(), top.indices.tolist())], ms


# ----------------------------------------------------------------------------- multipart

def _header_param(message, header, param):
    value = message.get_param(param, header=header)
    return None if value is None else collapse_rfc2231_value(value)


def multipart_boundary(content_type):
    """The boundary of a multipart/form-data Content-Type; BadRequest for any other type."""
    msg = Message()
    msg['Content-Type'] = content_type or ''
    if msg.get_content_type() != 'multipart/form-data':
        raise BadRequest(f'expected Content-Type multipart/form-data with the file in field '
                         f"'{FIELD}', got {content_type or 'none'}")
    boundary = _header_param(msg, 'content-type', 'boundary')
    if not boundary or len(boundary) > 200:
        raise BadRequest('multipart/form-data without a valid boundary')
    try:
        return boundary.encode('ascii')
    except UnicodeEncodeError:
        raise BadRequest('multipart boundary is not ASCII') from None


def multipart_fields(body, boundary):
    """[(field name, content bytes)] of a multipart body (RFC 7578 / RFC 2046), in order.

    Binary-safe: the content of a part is exactly the bytes between the CRLF ending its headers
    and the CRLF before the next delimiter."""
    delim = b'--' + boundary
    if body.startswith(delim):
        pos = len(delim)
    else:  # skip a preamble
        pos = body.find(b'\r\n' + delim)
        if pos < 0:
            raise BadRequest('malformed multipart body: no boundary found')
        pos += 2 + len(delim)
    fields = []
    while not body.startswith(b'--', pos):  # '--' after a delimiter closes the body
        eol = body.find(b'\r\n', pos)
        if eol < 0 or body[pos:eol].strip(b' \t'):
            raise BadRequest('malformed multipart body: bad delimiter line')
        start = eol + 2
        end = body.find(b'\r\n' + delim, start)
        if end < 0:
            raise BadRequest('malformed multipart body: no closing boundary (truncated upload?)')
        if body.startswith(b'\r\n', start):  # a part without headers
            head, content = b'', body[start + 2:end]
        else:
            split = body.find(b'\r\n\r\n', start, end + 2)
            if split < 0:
                raise BadRequest('malformed multipart body: part headers not terminated')
            head, content = body[start:split], body[split + 4:end]
        headers = BytesHeaderParser().parsebytes(head + b'\r\n\r\n')
        name = _header_param(headers, 'content-disposition', 'name')
        fields.append((name, content))
        pos = end + 2 + len(delim)
    return fields


# ----------------------------------------------------------------------------- the server

def _index_page(classifier):
    title = f'{classifier.name}: {classifier.num_classes} classes'
    return INDEX_HTML.replace('{{title}}', title.replace('&', '&amp;').replace('<', '&lt;'))


class Handler(BaseHTTPRequestHandler):
    protocol_version = 'HTTP/1.1'  # keep-alive, and Expect: 100-continue answered before the body
    server_version = 'alexnet-serve'
    timeout = 60  # seconds a client may stall while sending
    error_content_type = 'application/json'
    classifier = None  # set by make_server
    max_bytes = None
    routes = {'/': ('GET', 'HEAD'), '/index.html': ('GET', 'HEAD'), '/api': ('POST',)}

    # --- replies
    def _send(self, code, body, content_type, close=False, extra=()):
        self.send_response(code)
        self.send_header('Content-Type', content_type)
        self.send_header('Content-Length', str(len(body)))
        self.send_header('Cache-Control', 'no-store')
        for key, value in extra:
            self.send_header(key, value)
        if close:
            self.send_header('Connection', 'close')
        self.end_headers()
        if self.command != 'HEAD':
            self.wfile.write(body)

    def _json(self, code, obj, close=False, extra=()):
        self._send(code, json.dumps(obj).encode(), 'application/json', close, extra)

    def send_error(self, code, message=None, explain=None):
        """Every error as JSON {"error": ...} (the stdlib sends HTML); closes the connection."""
        if message is None:
            message = self.responses.get(code, ('error',))[0]
        self.log_error('code %d, message %s', code, message)
        if not hasattr(self, 'command'):  # unparsable request line
            self.command = None
        extra = [('Allow', ', '.join(self._allowed()))] if code == 405 else []
        self._json(code, {'error': message}, close=True, extra=extra)

    def _route(self):
        return urlsplit(self.path).path

    def _allowed(self):
        return self.routes.get(self._route(), ())

    def _check_route(self):
        """True if method and path are served; else answers 404 / 405 and returns False."""
        allowed = self.routes.get(self._route())
        if allowed is None:
            self.send_error(404, f'no such path {self._route()} (GET / or POST /api)')
        elif self.command not in allowed:
            self.send_error(405, f'{self.command} not allowed on {self._route()} '
                                 f'(allowed: {", ".join(allowed)})')
        else:
            return True
        return False

    def _body_length(self):
        """Content-Length if acceptable; else answers 400 / 411 / 413 and returns None."""
        value = self.headers.get('Content-Length')
        if value is None:
            self.send_error(411, 'Content-Length required (chunked uploads are not accepted)')
        elif not value.strip().isdigit():
            self.send_error(400, f'bad Content-Length {value!r}')
        elif int(value) > self.max_bytes:
            self.send_error(413, f'body of {int(value)} bytes is larger than the limit of '
                                 f'{self.max_bytes} bytes')
        else:
            return int(value)
        return None

    def handle_expect_100(self):
        """Refuses before the client sends the body when the route or the size is wrong."""
        if not self._check_route() or self._body_length() is None:
            self._drain()
            return False
        return super().handle_expect_100()

    def _drain(self, seconds=2.0):
        """After an error reply with the body unread: stop sending, read and drop what the client
        still sends (closing with unread data would reset the connection, and the client could
        lose the reply), until it closes or `seconds` pass."""
        try:
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_WR)
            deadline = time.monotonic() + seconds
            while (left := deadline - time.monotonic()) > 0:
                self.connection.settimeout(left)
                if not self.connection.recv(65536):
                    break
        except OSError:
            pass

    # --- methods
    def do_GET(self):
        if self._check_route():
            self._send(200, _index_page(self.classifier).encode(), 'text/html; charset=utf-8')

    do_HEAD = do_GET

    def do_POST(self):
        if not self._check_route():
            self._drain()
            return
        length = self._body_length()
        if length is None:
            self._drain()
            return
        try:
            body = self.rfile.read(length)
        except OSError:  # timeout, reset
            self.close_connection = True
            return
        if len(body) < length:
            self.send_error(400, f'body ended after {len(body)} of {length} bytes')
            return
        try:
            boundary = multipart_boundary(self.headers.get('Content-Type'))
            data = next((c for name, c in multipart_fields(body, boundary) if name == FIELD), None)
            if data is None:
                raise BadRequest(f"no field '{FIELD}' in the form")
            if not data:
                raise BadRequest(f"field '{FIELD}' is empty (no file chosen?)")
            top5, ms = self.classifier.classify(data)
        except BadRequest as e:
            self._json(400, {'error': str(e)})
            return
        except Exception as e:  # noqa: BLE001 -- keep serving whatever one request does
            self.log_error('classifying failed: %r', e)
            self._json(500, {'error': f'internal error: {type(e).__name__}: {e}'})
            return
        self._json(200, {'top5': top5, 'model': self.classifier.name, 'ms': round(ms, 2)})

    def _not_allowed(self):
        self._check_route()  # 404, or 405: no route takes these methods
        self._drain()

    do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _not_allowed


class Server(ThreadingHTTPServer):
    daemon_threads = True


class Server6(Server):
    address_family = socket.AF_INET6


def make_server(classifier, host, port, max_bytes):
    """The bound server (raises OSError when the address is taken)."""
    handler = type('BoundHandler', (Handler,), {'classifier': classifier, 'max_bytes': max_bytes})
    return (Server6 if ':' in host else Server)((host, port), handler)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('checkpoint', help='a snapshot written by train.py (model_<epoch>.pt)')
    p.add_argument('--port', type=int, default=9999, help='0 picks a free port (default 9999)')
    p.add_argument('--host', default='127.0.0.1', help='address to listen on (default 127.0.0.1)')
    p.add_argument('--mean', help="mean image (3, S, S) .npy (default: the snapshot's mean_file)")
    p.add_argument('--classes', help='dataset.yaml with class_names (default: dataset.yaml '
                                     "beside the snapshot's label_folder)")
    p.add_argument('--device', default='auto', help='auto | cpu | cuda:N (default auto)')
    p.add_argument('--max-bytes', type=int, default=20 * 1024 * 1024,
                   help='largest accepted request body (default 20 MiB)')
    args = p.parse_args(argv)
    try:
        classifier = Classifier(args.checkpoint, args.mean, args.classes, args.device)
    except SetupError as e:
        print(f'error: {e}', file=sys.stderr)
        return 2
    try:
        server = make_server(classifier, args.host, args.port, args.max_bytes)
    except (OSError, OverflowError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        print(f'error: cannot listen on {args.host} port {args.port}: {reason}', file=sys.stderr)
        return 2
    host, port = server.server_address[:2]
    shown = f'[{host}]' if ':' in host else host
    print(f'{classifier.name} ({classifier.num_classes} classes, {classifier.device}) from '
          f'{args.checkpoint}\nserving on http://{shown}:{port}/  (Ctrl-C stops)', flush=True)

    def stop(signum, frame):
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, stop)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print('stopped', flush=True)
    finally:
        server.server_close()
    return 0


INDEX_HTML = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{{title}}</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>body{font:16px sans-serif;max-width:40em;margin:2em auto;padding:0 1em}
img{max-width:100%;max-height:20em;display:block;margin:1em 0}#error{color:#b00}</style>
</head><body>
<h1>{{title}}</h1>
<form id="form"><input type="file" id="image" name="image" accept="image/*" required>
<button type="submit" id="classify" disabled>Classify</button></form>
<img id="preview" alt="" hidden><p id="error"></p><ol id="top5"></ol><p id="info"></p>
<script>
const $ = id => document.getElementById(id);
$('image').onchange = () => {
  const f = $('image').files[0];
  if (f) { $('preview').src = URL.createObjectURL(f); $('preview').hidden = false; }
};
$('form').onsubmit = async ev => {
  ev.preventDefault();
  $('error').textContent = ''; $('info').textContent = ''; $('top5').replaceChildren();
  const body = new FormData(); body.append('image', $('image').files[0]);
  $('classify').disabled = true;
  try {
    const r = await fetch('api', {method: 'POST', body});
    const j = await r.json();
    if (!r.ok) throw new Error(j.error || r.statusText);
    for (const t of j.top5) {
      const li = document.createElement('li');
      li.textContent = `${t.class} (${t.index}): ${(100 * t.probability).toFixed(2)} %`;
      $('top5').append(li);
    }
    $('info').textContent = `${j.model}, ${j.ms} ms`;
  } catch (e) { $('error').textContent = String(e.message || e); }
  finally { $('classify').disabled = false; }
};
$('classify').disabled = false;  // the script is running: the button can work
</script></body></html>
"""

if __name__ == '__main__':
    sys.exit(main())
