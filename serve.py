"""Classify uploaded images with a trained snapshot over HTTP (docs/serving.md).

    python serve.py weights/model_60.pt                     # http://127.0.0.1:9999/
    python serve.py model.pt --port 8080 --device cpu --mean img_mean.npy --classes dataset.yaml

GET / is a page to classify an image; POST /api takes the image as field `image` of a multipart
form or as the whole body (Content-Type image/* or application/octet-stream) and answers JSON
{"top5": [{"class", "words" (if dataset.yaml has class_words), "index", "probability"}], "model",
"ms"}, or {"error"} with 400, 408, 411, 413, 503, 404 or 405. The image goes through training's
preprocessing (preprocessing/images.load_rgb, validation's centre crop by lib/data.crop_mirror);
it is decoded outside the model's lock, and only the forward passes take turns.
"""
import argparse
import html
import io
import json
import os
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from itertools import chain
from urllib.parse import urlsplit

import lib.env  # noqa: F401  first: without the packages, one line instead of a traceback
import torch
from PIL import Image, UnidentifiedImageError
from werkzeug.http import parse_options_header
from werkzeug.exceptions import RequestEntityTooLarge
from werkzeug.sansio.multipart import Data, Epilogue, Field, File, MultipartDecoder, NeedData

from lib import ROOT, UserError, command, model as models
from lib.checkpoint import load_net, read as read_snapshot
from lib.data import crop_mirror, dataset_yaml, load_mean, make_plan, read_dataset
from lib.trainer import resolve_device
from preprocessing.images import load_rgb

FIELD = 'image'
# What browsers and cameras make. Image.open(formats=...) tries no other decoder: not TIFF's many
# codecs, nor EPS / PDF, which Pillow would hand to Ghostscript.
FORMATS = ('JPEG', 'PNG', 'GIF', 'BMP', 'WEBP')
PAGE = os.path.join(ROOT, 'lib', 'serve_page.html')
BUSY = [('Retry-After', '1')]  # seconds, with every 503
MULTIPART_FAULT = {'PREAMBLE': 'no boundary found', 'PART': 'bad part headers'}  # else: in a part
MAX_PARTS = 100  # of a form (a browser's has one)


class SetupError(UserError):
    """A missing or unusable input (the mean, the classes, the page, the address to listen on);
    the message names it."""


class BadRequest(Exception):
    """The upload cannot be classified; answered with 400 and the message."""


# ----------------------------------------------------------------------------- the classifier

def _dataset_info(path, n):
    """(class names, class words or None, pad) from a dataset.yaml (or a plain list of names):
    class_words, the ImageNet devkit's words in label order; pad, the black frame of the images."""
    if not os.path.isfile(path):
        raise SetupError(f'class names file {path} not found (give --classes DATASET_YAML)')
    meta = read_dataset(path)
    names, words, pad = meta.get('class_names'), meta.get('class_words'), meta.get('pad', 0)
    for key, value in (('class_names', names), ('class_words', words)):
        if (value is not None or key == 'class_names') and (
                not isinstance(value, list) or len(value) != n):
            raise SetupError(f'{path}: {key} must be a list of the {n} classes of the snapshot, '
                             f'got {len(value) if isinstance(value, list) else repr(value)[:40]}')
    if not isinstance(pad, int) or isinstance(pad, bool) or pad < 0:
        raise SetupError(f'{path}: pad must be a non-negative integer, got {pad!r}')
    return [str(c) for c in names], words and [str(w) for w in words], pad


class Classifier:
    """The network of a snapshot, with the preprocessing of its training data."""

    def __init__(self, checkpoint, mean_file=None, classes_file=None, device='auto',
                 max_pixels=16_000_000):
        self.device = resolve_device(device, '--device')
        snap = read_snapshot(checkpoint)
        cfg = snap.get('config', {})
        self.net, settings = load_net(snap, checkpoint, self.device)
        self.name, self.crop_size = settings['model'], settings['crop_size']
        self.num_classes = models.output_classes(snap['model'])
        if mean_file is None:
            if not cfg.get('mean_file'):
                raise SetupError(f"{checkpoint}: its config names no mean_file; give --mean MEAN_FILE")
            mean_file = cfg['mean_file']
        if classes_file is None:
            if not cfg.get('label_folder'):
                raise SetupError(f"{checkpoint}: its config names no label_folder; "
                                 "give --classes DATASET_YAML")
            classes_file = dataset_yaml(cfg['label_folder'])
        if not os.path.isfile(mean_file):
            raise SetupError(f'mean file {mean_file} not found (give --mean MEAN_FILE)')
        self.mean = load_mean(mean_file, crop_size=self.crop_size)
        self.image_size = self.mean.shape[1]
        # validation's centre crop, no mirror (lib/data.make_plan with train=False)
        self.step = make_plan(None, 1, 1, self.image_size, self.crop_size, train=False)[0]
        self.classes, self.words, self.pad = _dataset_info(classes_file, self.num_classes)
        if 2 * self.pad >= self.image_size:
            raise SetupError(f'{classes_file}: pad {self.pad} does not fit images of {self.image_size} px')
        self.max_pixels = max_pixels
        self.lock = threading.Lock()  # one forward pass at a time: bounds memory and threads

    def preprocess(self, data):
        """Encoded image bytes -> float32 (1, 3, c, c), as lib/data.crop_mirror feeds validation."""
        try:
            with Image.open(io.BytesIO(data), formats=FORMATS) as im:  # reads the header only
                w, h = im.size
        except UnidentifiedImageError:
            raise BadRequest(f'not an image, or not one of {", ".join(FORMATS)}') from None
        except Exception as e:  # noqa: BLE001 -- SyntaxError, struct.error... from a bad header
            raise BadRequest(f'not an image: {" ".join(f"{type(e).__name__}: {e}".split())}') from None
        if w * h > self.max_pixels:
            raise BadRequest(f'image of {w} x {h} pixels is larger than the limit of '
                             f'{self.max_pixels} pixels')
        try:
            rgb = load_rgb(io.BytesIO(data), self.image_size, self.pad)  # uint8 (S, S, 3)
        except Exception as e:  # noqa: BLE001 -- BadImage, and anything a hostile file raises
            raise BadRequest(f'cannot decode the image: {" ".join(str(e).split())}') from None
        batch = torch.from_numpy(rgb.transpose(2, 0, 1)[..., None].copy())  # (3, S, S, 1) as stored
        return crop_mirror(batch, self.mean, self.step, self.crop_size)  # (1, 3, c, c)

    def classify(self, data, k=5):
        """The top-k as [{class, words, index, probability}], best first, and the ms taken."""
        start = time.perf_counter()
        x = self.preprocess(data)  # outside the lock: uploads decode side by side
        with self.lock, torch.inference_mode():
            prob = torch.softmax(self.net(x.to(self.device)).float(), dim=1)[0].cpu()
        top = torch.topk(prob, min(k, self.num_classes))
        ms = (time.perf_counter() - start) * 1000
        return [{'class': self.classes[i], **({'words': self.words[i]} if self.words else {}),
                 'index': i, 'probability': p}
                for p, i in zip(top.values.tolist(), top.indices.tolist())], ms


def upload_image(content_type, body):
    """The image bytes of a POST body: the body itself (image/*, application/octet-stream) or
    field `image` of a multipart/form-data body (werkzeug's parser). BadRequest otherwise."""
    kind, params = parse_options_header(content_type or '')
    if kind.startswith('image/') or kind == 'application/octet-stream':
        if not body:
            raise BadRequest('empty body (no image sent)')
        return body
    if kind != 'multipart/form-data':
        raise BadRequest(f"expected the image as field '{FIELD}' of a multipart/form-data form, or "
                         f"as the body with Content-Type image/* or application/octet-stream; got "
                         f"{content_type or 'none'} "
                         "(curl -F image=@FILE, or --data-binary @FILE -H 'Content-Type: image/jpeg')")
    boundary = params.get('boundary', '')
    if not 0 < len(boundary) <= 200 or not boundary.isascii():
        raise BadRequest('multipart/form-data without a valid boundary')
    decoder = MultipartDecoder(boundary.encode(), max_parts=MAX_PARTS)
    found = part = event = None
    try:  # fed in 64 KiB chunks: 6x faster than all at once (20 MiB: 56 ms)
        for chunk in chain((body[i:i + 65536] for i in range(0, len(body), 65536)), [None]):
            decoder.receive_data(chunk)
            while not isinstance(event := decoder.next_event(), (NeedData, Epilogue)):
                if isinstance(event, (Field, File)):  # a part begins: keep the first `image` part
                    part = bytearray() if event.name == FIELD and found is None else None
                    found = part if part is not None else found
                elif isinstance(event, Data) and part is not None:
                    part += event.data
        if not isinstance(event, Epilogue):  # the body ended inside the form
            raise ValueError
    except RequestEntityTooLarge:  # (werkzeug's decoder is then past the part's headers)
        raise BadRequest(f"a form of more than {MAX_PARTS} parts (send field '{FIELD}' alone)") from None
    except ValueError:
        fault = MULTIPART_FAULT.get(decoder.state.name, 'no closing boundary (truncated upload?)')
        raise BadRequest(f'malformed multipart body: {fault}') from None
    if found is None:
        raise BadRequest(f"no field '{FIELD}' in the form")
    if not found:
        raise BadRequest(f"field '{FIELD}' is empty (no file chosen?)")
    return bytes(found)


# ----------------------------------------------------------------------------- the server

class _DeadlineReader(io.RawIOBase):
    """The connection's bytes, no read waiting past the handler's deadline for the request."""

    def __init__(self, handler):
        self.handler = handler

    def readable(self):
        return True

    def readinto(self, buf):
        left = self.handler.deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError('request deadline passed')
        self.handler.connection.settimeout(left)
        return self.handler.connection.recv_into(buf)


class Handler(BaseHTTPRequestHandler):
    protocol_version = 'HTTP/1.1'  # keep-alive, and Expect: 100-continue answered before the body
    server_version = 'alexnet-serve'
    error_content_type = 'application/json'
    classifier = max_bytes = deadline_s = None  # set by make_server
    routes = {'/': ('GET', 'HEAD'), '/index.html': ('GET', 'HEAD'), '/api': ('POST',)}

    def setup(self):
        super().setup()
        self.rfile.close()
        self.rfile = io.BufferedReader(_DeadlineReader(self))

    def handle_one_request(self):
        """Each request (idle wait, headers and body) must arrive within deadline_s seconds: a
        client that trickles bytes holds its thread no longer."""
        self.deadline = time.monotonic() + self.deadline_s
        super().handle_one_request()  # a timeout before the body closes the connection

    # --- replies
    def _send(self, code, body, content_type, close=False, extra=()):
        self.connection.settimeout(self.deadline_s)  # the reader may have left it near 0
        self.send_response(code)
        for key, value in (('Content-Type', content_type), ('Content-Length', str(len(body))),
                           ('Cache-Control', 'no-store'), *extra, *[('Connection', 'close')] * close):
            self.send_header(key, value)
        self.end_headers()
        if self.command != 'HEAD':
            self.wfile.write(body)

    def send_error(self, code, message=None, explain=None, extra=()):
        """Every error as JSON {"error": ...} (the stdlib sends HTML); closes the connection."""
        message = message or self.responses.get(code, ('error',))[0]
        self.log_error('code %d, message %s', code, message)
        if self.command is None:  # the stdlib's refusal of an unusable request line: with a status
            self.request_version = self.protocol_version  # line and headers, not HTTP/0.9's bare body
        if code == 405:
            extra = [('Allow', ', '.join(self.routes.get(urlsplit(self.path).path, ())))]
        self._send(code, json.dumps({'error': message}).encode(), 'application/json', True, extra)

    def _refuse(self, code, message, extra=()):
        """An error reply to a request whose body is unread: then read and drop what the client
        still sends (closing with unread data would reset the connection, and the client could
        lose the reply), until it closes or 2 s pass."""
        self.send_error(code, message, extra=extra)
        try:
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_WR)
            deadline = time.monotonic() + 2
            while (left := deadline - time.monotonic()) > 0:
                self.connection.settimeout(left)
                if not self.connection.recv(65536):
                    break
        except OSError:
            pass

    def _check(self, body=True):
        """The error (code, message) of the route, method and Content-Length; None when fine."""
        path = urlsplit(self.path).path
        allowed, length = self.routes.get(path), self.headers.get('Content-Length')
        if allowed is None:
            return 404, f'no such path {path} (GET / or POST /api)'
        if self.command not in allowed:
            return 405, f'{self.command} not allowed on {path} (allowed: {", ".join(allowed)})'
        if not body:
            return None
        if length is None:
            return 411, 'Content-Length required (chunked uploads are not accepted)'
        if not (length.strip().isascii() and length.strip().isdigit()):
            return 400, f'bad Content-Length {length!r}'
        if int(length) > self.max_bytes:
            return 413, f'body of {int(length)} bytes is larger than the limit of {self.max_bytes} bytes'
        return None

    def handle_expect_100(self):
        """Refuses before the client sends the body when the route or the size is wrong."""
        if error := self._check():
            self._refuse(*error)
            return False
        return super().handle_expect_100()

    # --- methods
    def do_GET(self):
        if error := self._check(body=False):
            self.send_error(*error)
        else:
            self._send(200, self.page, 'text/html; charset=utf-8')

    do_HEAD = do_GET

    def do_POST(self):
        if error := self._check():
            return self._refuse(*error)
        length = int(self.headers['Content-Length'])
        if not self.server.reserve(length):  # bounds the bytes of the bodies held at once
            return self._refuse(503, f'busy: uploads of {self.server.room[1]} bytes in all are '
                                     'being received, try again shortly', BUSY)
        try:
            code, answer, close = self._classify(length)
        finally:  # before the reply: the client's next request finds the room free
            self.server.reserve(-length)
        if close:
            self.send_error(code, answer)
        elif code:
            payload = answer if code == 200 else {'error': answer}
            self._send(code, json.dumps(payload).encode(), 'application/json',
                       extra=BUSY if code == 503 else ())
        return None

    def _classify(self, length):
        """(status, answer or error message, whether to close) for the upload; status None
        when the connection is gone."""
        try:
            body = self.rfile.read(length)
        except TimeoutError:
            return 408, f'request not received within {self.deadline_s:g} s', True
        except OSError:  # reset
            self.close_connection = True
            return None, None, False
        if len(body) < length:
            return 400, f'body ended after {len(body)} of {length} bytes', True
        if not self.server.slots.acquire(blocking=False):  # bounds the images decoded at once
            return 503, (f'busy: {self.server.max_inflight} images are being classified, try '
                         'again shortly'), False
        try:
            top5, ms = self.classifier.classify(upload_image(self.headers['Content-Type'], body))
            return 200, {'top5': top5, 'model': self.classifier.name, 'ms': round(ms, 2)}, False
        except BadRequest as e:
            return 400, str(e), False
        except Exception as e:  # noqa: BLE001 -- keep serving whatever one request does
            self.log_error('classifying failed: %r', e)
            return 500, f'internal error: {type(e).__name__}: {e}', True
        finally:
            self.server.slots.release()

    def _not_allowed(self):
        self._refuse(*self._check(body=False))  # 404, or 405: no route takes these methods

    do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _not_allowed


class Server(ThreadingHTTPServer):
    """A thread per connection (stalled clients hold only their own), at most max_connections of
    them: one more is answered 503 by the accepting thread itself, which holds it without a thread
    for up to LINGER_S, reading what its client still sends, before closing it (closing with
    unread data would reset the connection, and the client could lose the reply). What the
    threads hold at once is bounded: max_inflight x max_bytes bytes of request bodies,
    max_inflight images decoded."""
    daemon_threads = True
    request_queue_size = 128  # listen backlog (socketserver's 5 makes a burst of clients wait)
    LINGER_S = 2
    closing = ()  # (socket, when to close it): refused connections, in the serving thread

    def bound(self, max_bytes, max_inflight, max_connections=128):
        self.max_inflight, self.slots = max_inflight, threading.BoundedSemaphore(max_inflight)
        self.room, self.room_lock = [max_inflight * max_bytes] * 2, threading.Lock()  # left, all
        self.max_connections, self.n_open, self.open_lock = max_connections, 0, threading.Lock()
        self.closing = []
        error = json.dumps({'error': f'busy: {max_connections} connections are open, try again '
                                     'shortly'}).encode()
        self.busy_reply = ('HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n'
                           f'Content-Length: {len(error)}\r\nCache-Control: no-store\r\n'
                           + ''.join(f'{k}: {v}\r\n' for k, v in BUSY)
                           + 'Connection: close\r\n\r\n').encode() + error

    def reserve(self, n):
        """Takes n bytes of room for a body if that much is left (n < 0 gives them back)."""
        with self.room_lock:
            if n > self.room[0]:
                return False
            self.room[0] -= n
            return True

    # --- the connection cap (process_request runs in serve_forever's thread)
    def process_request(self, request, client_address):
        with self.open_lock:
            full = self.n_open >= self.max_connections
            self.n_open += not full
        if full:
            return self._turn_away(request)
        try:
            return super().process_request(request, client_address)  # starts the thread
        except BaseException:
            self._closed()
            raise

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._closed()

    def _closed(self):
        with self.open_lock:
            self.n_open -= 1

    def _turn_away(self, sock):
        """503 without a thread: the reply fits the socket's send buffer, so nothing blocks."""
        sock.setblocking(False)
        try:
            sock.sendall(self.busy_reply)
            sock.shutdown(socket.SHUT_WR)
        except OSError:  # BlockingIOError (a full buffer), reset: nothing more to do for it
            sock.close()
            return
        if len(self.closing) >= self.request_queue_size:  # the longest held goes first
            self.closing.pop(0)[0].close()
        self.closing.append((sock, time.monotonic() + self.LINGER_S))

    def service_actions(self):
        """After each accept and every poll (0.5 s): reads what the refused clients sent, and
        closes those that hung up or were held LINGER_S."""
        now, keep = time.monotonic(), []
        for sock, until in self.closing:
            try:
                for _ in range(16):  # a client that keeps sending does not hold this thread
                    if not sock.recv(65536):
                        break  # it hung up
                else:
                    raise BlockingIOError
                done = True
            except BlockingIOError:
                done = now > until
            except OSError:
                done = True
            if done:
                sock.close()
            else:
                keep.append((sock, until))
        self.closing = keep

    def server_close(self):
        super().server_close()
        for sock, _ in self.closing:
            sock.close()
        self.closing = []


class Server6(Server):
    address_family = socket.AF_INET6


def render_page(classifier):
    """The page's bytes, its title naming the model (rendered once: the model does not change)."""
    try:
        with open(PAGE, encoding='utf-8') as f:
            page = f.read()
    except OSError as e:
        raise SetupError(f'cannot read the page {PAGE}: {e.strerror}') from None
    title = html.escape(f'{classifier.name}: {classifier.num_classes} classes')
    return page.replace('{{title}}', title).encode()


def make_server(classifier, host, port, max_bytes, max_inflight=32, deadline=60.0,
                max_connections=128):
    """The bound server (raises OSError when the address is taken)."""
    handler = type('BoundHandler', (Handler,), {
        'classifier': classifier, 'max_bytes': max_bytes, 'deadline_s': deadline,
        'page': render_page(classifier)})
    server = (Server6 if ':' in host else Server)((host, port), handler)
    server.bound(max_bytes, max_inflight, max_connections)
    return server


@command
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
    p.add_argument('--max-pixels', type=int, default=16_000_000,
                   help='largest accepted image, width x height (default 16 Mpx)')
    p.add_argument('--max-inflight', type=int, default=32,
                   help='images decoded and classified at once, and request bodies held up to '
                        'this x --max-bytes; more get 503 (default 32)')
    p.add_argument('--deadline', type=float, default=60.0,
                   help='seconds a client has to send a whole request (default 60)')
    p.add_argument('--max-connections', type=int, default=128,
                   help='connections open at once, each with its thread (an idle keep-alive one '
                        'too, for up to --deadline); more get 503 at once (default 128)')
    args = p.parse_args(argv)
    for flag in ('max_bytes', 'max_pixels', 'max_inflight', 'deadline', 'max_connections'):
        if getattr(args, flag) <= 0:
            p.error(f'--{flag.replace("_", "-")} must be positive')
    classifier = Classifier(args.checkpoint, args.mean, args.classes, args.device, args.max_pixels)
    try:
        server = make_server(classifier, args.host, args.port, args.max_bytes, args.max_inflight,
                             args.deadline, args.max_connections)
    except (OSError, OverflowError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise SetupError(f'cannot listen on {args.host} port {args.port}: {reason}') from None
    host, port = server.server_address[:2]
    shown = f'[{host}]' if ':' in host else host
    print(f'{classifier.name} ({classifier.num_classes} classes, {classifier.device}) from '
          f'{args.checkpoint}\nserving on http://{shown}:{port}/  (Ctrl-C stops)', flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:  # (SIGTERM too): how a server is stopped, not a failure
        print('stopped', flush=True)
    finally:
        server.server_close()


if __name__ == '__main__':
    sys.exit(main())
