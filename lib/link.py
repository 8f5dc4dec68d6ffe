"""The control link between the two workers of train_2gpu.py: typed ZeroMQ messages, never pickle.

Worker 0 binds a ROUTER socket on the endpoint and worker 1 connects a DEALER to it. Every
message is a 16-byte header

    magic b'ALXW', version, kind, 2 pad bytes, sequence number (u64)

followed by raw frames (bytes of a buffer, UTF-8 text, or a JSON object for the hello).

Who can connect at all is the endpoint's business: on one host a unix socket in the launcher's
private folder (mode 0700: no other user can enter it), between hosts tcp with CURVE (curve_dir:
encrypted, and each side accepts only the other's key; train_2gpu.py never runs plain tcp).
Worker 0 takes the first client with a well-formed hello as worker 1 and drops every later
message from any other connection (with a warning). ZeroMQ drops any frame larger than the
largest legitimate one (max_frame: half the exchange buffer).

Failures: every receive waits at most `timeout` seconds; ZeroMQ heartbeats run on the link (a
peer whose process is frozen or whose host vanished is disconnected after a few seconds); a
disconnection of the peer's connection, or its BYE (sent when it stops with an error), raises
PeerError at once, naming the peer and the training step it happened at (`step`, set by the
exchanger; the message's sequence number where none is set).
"""
import json
import os
import struct
import sys
import time

import zmq
import zmq.utils.monitor

from lib import UserError

MAGIC, VERSION = b'ALXW', 1
HELLO, ARRIVE, DONE, DATA, METRIC, BYE = 1, 2, 3, 4, 5, 6
KIND_NAMES = {HELLO: 'hello', ARRIVE: 'arrive', DONE: 'done', DATA: 'data', METRIC: 'metric',
              BYE: 'bye'}
HEADER = struct.Struct('<4sBBxxQ')
HEARTBEAT_MS = 1000
MIN_FRAME = 1 << 16  # frame size cap when there is no exchange data (hello, bye, metrics)


class ExchangeError(UserError, RuntimeError):
    """The exchange cannot go on (bad setup, protocol violation); the message says why."""


class PeerError(ExchangeError):
    """The other worker died, stalled, disconnected or stopped with an error."""


def header(kind, seq):
    return HEADER.pack(MAGIC, VERSION, kind, seq)


def parse_header(frame):
    """bytes -> (kind, seq); ValueError for anything that is not one of our headers."""
    if len(frame) != HEADER.size:
        raise ValueError(f'bad header ({len(frame)} bytes)')
    magic, version, kind, seq = HEADER.unpack(frame)
    if magic != MAGIC or version != VERSION or kind not in KIND_NAMES:
        raise ValueError(f'not an exchange message (magic {magic!r}, version {version}, kind {kind})')
    return kind, seq


def curve_keys(curve_dir, rank):
    """(public, secret) of this worker from curve_dir/worker<rank>.key_secret, and the public
    key of the other worker, as written by zmq.auth.create_certificates(curve_dir, 'worker<r>')."""
    from zmq.auth import load_certificate
    own = os.path.join(curve_dir, f'worker{rank}.key_secret')
    peer = os.path.join(curve_dir, f'worker{1 - rank}.key')
    try:
        public, secret = load_certificate(own)
        peer_public, _ = load_certificate(peer)
    except (OSError, ValueError) as e:
        raise ExchangeError(f'curve_dir: cannot read the CURVE keys {own} / {peer}: {e}') from None
    if secret is None:
        raise ExchangeError(f'curve_dir: {own} holds no secret key')
    return public, secret, peer_public


class Link:
    """One end of the two-worker link. rank 0 binds, rank 1 connects."""

    def __init__(self, rank, endpoint, timeout, curve_dir='', max_frame=None):
        """`endpoint`: 'ipc://<folder>/link' (one host) or 'tcp://<host>:<port>' (two hosts)."""
        self.rank, self.peer, self.timeout = rank, 1 - rank, timeout
        self.address = endpoint
        self.ctx = zmq.Context()
        self.auth = None
        self.sock = self.ctx.socket(zmq.ROUTER if rank == 0 else zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.HEARTBEAT_IVL, HEARTBEAT_MS)
        self.sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, int(1000 * min(max(timeout, 3.0), 10.0)))
        self.sock.setsockopt(zmq.HEARTBEAT_TTL, int(1000 * min(max(timeout, 3.0), 10.0)))
        # the largest frame a worker sends: a DATA half, or a hello / bye / metric (< 64 KiB);
        # the slack covers CURVE's per-message overhead, which counts towards the cap
        self.sock.setsockopt(zmq.MAXMSGSIZE, (max_frame or 0) + MIN_FRAME)
        if curve_dir:
            self._curve(curve_dir)
        self.monitor = self.sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        self.peer_id = self.peer_fd = None
        self.rejected = 0
        self.step = None  # the owner's training step, for error messages
        if rank == 0:
            try:
                self.sock.bind(endpoint)
            except zmq.ZMQError as e:
                self.close()
                where = ' (exchange_host, sock_gpu)' if endpoint.startswith('tcp://') else ''
                raise ExchangeError(f'cannot bind the exchange socket {endpoint}{where}: '
                                    f'{zmq.strerror(e.errno)}') from None
        else:
            self.sock.setsockopt(zmq.IDENTITY, b'worker1-' + os.urandom(8).hex().encode())
            self.sock.connect(endpoint)

    def _curve(self, curve_dir):
        public, secret, peer_public = curve_keys(curve_dir, self.rank)
        self.sock.curve_publickey, self.sock.curve_secretkey = public, secret
        if self.rank == 0:
            from zmq.auth.thread import ThreadAuthenticator
            self.auth = ThreadAuthenticator(self.ctx)
            self.auth.start()
            self.auth.configure_curve(domain='*', location=curve_dir)  # the *.key public keys there
            self.sock.curve_server = True
        else:
            self.sock.curve_serverkey = peer_public

    # --- sending ------------------------------------------------------------------------------
    def send(self, kind, seq, *frames, track=False):
        parts = ([self.peer_id] if self.rank == 0 else []) + [header(kind, seq), *frames]
        return self.sock.send_multipart(parts, copy=not track, track=track)

    # --- receiving ----------------------------------------------------------------------------
    def at(self, seq):
        return f'step {self.step}' if self.step is not None else f'message {seq}'

    def _poll(self, deadline, seq, what):
        """Wait for a message on the link; PeerError on timeout or the peer's disconnection."""
        while True:
            if self.sock.poll(100):
                return
            while self.monitor.poll(0):
                event = zmq.utils.monitor.recv_monitor_message(self.monitor)
                if self.peer_id is not None and (self.rank == 1 or event['value'] == self.peer_fd):
                    raise PeerError(f'lost the connection to worker {self.peer} at {self.at(seq)} '
                                    f'while waiting for its {what} (it died, or its link timed out)')
            if time.monotonic() > deadline:
                raise PeerError(f'worker {self.peer} did not answer within {self.timeout:g} s '
                                f'(peer_timeout) at {self.at(seq)} while waiting for its {what}: '
                                f'stalled or dead')

    def _reject(self, who, why):
        self.rejected += 1
        if self.rejected <= 5 or self.rejected % 1000 == 0:
            print(f'exchange: rejected a message from {who} on {self.address}: {why} '
                  f'({self.rejected} so far)', file=sys.stderr, flush=True)

    def _drain(self):
        while self.sock.getsockopt(zmq.RCVMORE):
            self.sock.recv()

    def recv(self, kind, seq, into=None):
        """The frames after the header of the peer's next message, which must be (kind, seq).
        With `into` (a writable buffer), the one payload frame is received straight into it and
        must fill it exactly. Messages from anyone but the peer are dropped."""
        what = KIND_NAMES[kind]
        deadline = time.monotonic() + self.timeout
        while True:
            self._poll(deadline, seq, what)
            if self.rank == 0:
                ident = self.sock.recv()
                if ident != self.peer_id:  # set by the handshake: worker 1's connection
                    self._drain()
                    self._reject('an unknown client', 'not worker 1')
                    continue
                if not self.sock.getsockopt(zmq.RCVMORE):
                    raise ExchangeError(f'worker {self.peer} sent an empty message at {self.at(seq)}')
            frame = self.sock.recv()
            try:
                got_kind, got_seq = parse_header(frame)
            except ValueError as e:
                self._drain()
                raise ExchangeError(f'worker {self.peer} sent a malformed message at '
                                    f'{self.at(seq)}: {e}') from None
            if got_kind == BYE:
                text = self.sock.recv().decode('utf-8', 'replace') if self.sock.getsockopt(zmq.RCVMORE) else ''
                self._drain()
                raise PeerError(f'worker {self.peer} stopped ({text or "no reason given"}); this worker '
                                f'was at {self.at(seq)}')
            if (got_kind, got_seq) != (kind, seq):
                self._drain()
                raise ExchangeError(f'worker {self.peer} is out of step: expected {what} {seq}, '
                                    f'got {KIND_NAMES[got_kind]} {got_seq}')
            if into is None:
                frames = []
                while self.sock.getsockopt(zmq.RCVMORE):
                    frames.append(self.sock.recv())
                return frames
            nbytes = len(memoryview(into).cast('B'))
            got = self.sock.recv_into(into) if self.sock.getsockopt(zmq.RCVMORE) else -1
            extra = self.sock.getsockopt(zmq.RCVMORE)
            self._drain()
            if got != nbytes or extra:
                raise ExchangeError(f'worker {self.peer} sent {got} bytes at {self.at(seq)}, expected {nbytes}')
            return []

    # --- handshake --------------------------------------------------------------------------
    def handshake(self, info):
        """Send `info` (a JSON-able dict) to the peer and return the peer's. Worker 1 sends
        HELLO 1 (its rank) with its info; worker 0 answers HELLO 0 to the first client whose
        hello is well-formed, which is its peer from then on, and drops the others."""
        mine = json.dumps(info).encode()
        deadline = time.monotonic() + self.timeout
        if self.rank == 1:
            self.send(HELLO, 1, mine)
        while True:
            try:
                self._poll(deadline, 0, 'hello')
            except PeerError:
                raise PeerError(f'worker {self.peer} did not connect to {self.address} within '
                                f'{self.timeout:g} s (peer_timeout)') from None
            parts = self.sock.recv_multipart(copy=False)
            ident = parts.pop(0).bytes if self.rank == 0 else b'worker0'
            try:
                kind, rank = parse_header(parts[0].bytes if parts else b'')
                if (kind, rank, len(parts)) != (HELLO, self.peer, 2):
                    raise ValueError(f'expected the hello of worker {self.peer}, got '
                                     f'{KIND_NAMES[kind]} {rank} in {len(parts)} frames')
                peer_info = json.loads(parts[1].bytes.decode())
                if not isinstance(peer_info, dict):
                    raise ValueError('hello is not a JSON object')
            except (ValueError, UnicodeDecodeError) as e:
                if self.rank == 1:
                    raise ExchangeError(f'worker 0 sent a malformed hello on {self.address}: '
                                        f'{e}') from None
                self._reject('a client', e)
                continue
            self.peer_id = ident
            if self.rank == 0:
                self.peer_fd = parts[0].get(zmq.SRCFD)
                self.send(HELLO, 0, mine)
            return peer_info

    def close(self, reason=None):
        """Close the link; with a reason, first tell the peer we stop (best effort)."""
        if self.sock.closed:
            return
        if reason is not None and self.peer_id is not None:
            try:
                self.sock.setsockopt(zmq.LINGER, 1000)  # let the BYE reach the wire
                self.send(BYE, 0, str(reason).encode()[:2000])
            except zmq.ZMQError:
                pass
        self.sock.disable_monitor()
        self.monitor.close(0)
        self.sock.close(0)
        if self.auth is not None:
            self.auth.stop()
        self.ctx.term()
