"""The control link between the two workers of train_2gpu.py: typed ZeroMQ messages, never pickle.

Worker 0 binds a ROUTER socket on host:sock_gpu (127.0.0.1 unless a host is configured) and
worker 1 connects a DEALER to it. Every message is a 16-byte header

    magic b'ALXW', version, kind, 2 pad bytes, sequence number (u64)

followed by raw frames (bytes of a buffer, UTF-8 text, or a JSON object for the hello). The
handshake is a mutual challenge-response on a 32-byte secret that the launcher gave both workers
(HMAC-SHA256 over both sides' nonces and the sender's role; the secret never travels): worker 1
trusts nothing from a server that cannot prove it (a process that bound the port first), and
worker 0 reads nothing from a client past its proof. After the handshake worker 0 drops every
message that does not come from worker 1's connection (with a warning), so a stray or hostile
client can neither hijack the link nor make a worker act on anything. ZeroMQ drops any frame
larger than the largest legitimate one (max_frame: half the exchange buffer). Between hosts,
CURVE encryption and key authentication can be switched on (curve_dir).

Failures: every receive waits at most `timeout` seconds; ZeroMQ heartbeats run on the link (a
peer whose process is frozen or whose host vanished is disconnected after a few seconds); a
disconnection of the peer's connection, or its BYE (sent when it stops with an error), raises
PeerError at once, naming the peer and the training step it happened at (`step`, set by the
exchanger; the message's sequence number where none is set).
"""
import hashlib
import hmac
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
TOKEN_BYTES = 32
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

    def __init__(self, rank, host, port, token, timeout, curve_dir='', max_frame=None):
        if len(token) != TOKEN_BYTES:
            raise ExchangeError('the exchange secret must be 32 bytes')
        self.rank, self.peer, self.token, self.timeout = rank, 1 - rank, token, timeout
        self.address = f'{host}:{port}'
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
        endpoint = f'tcp://{self.address}'
        if rank == 0:
            try:
                self.sock.bind(endpoint)
            except zmq.ZMQError as e:
                self.close()
                raise ExchangeError(f'cannot bind the exchange socket {self.address} (sock_gpu): '
                                    f'{e.strerror}') from None
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
                if ident != self.peer_id:  # set by the handshake: the authenticated worker 1
                    self._drain()
                    self._reject('an unknown client', 'not the authenticated worker 1')
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
    def _mac(self, role, *parts):
        return hmac.new(self.token, role + b''.join(parts), hashlib.sha256).digest()

    def handshake(self, info):
        """Exchange `info` (a JSON-able dict) with the peer once both proved the secret; returns
        the peer's info. Mutual challenge-response, the secret never on the wire:

            1 -> 0   HELLO 0: nonce1
            0 -> 1   HELLO 1: nonce0, HMAC(token, 'worker0' nonce1 nonce0)
            1 -> 0   HELLO 2: HMAC(token, 'worker1' nonce0 nonce1 info1), info1
            0 -> 1   HELLO 3: HMAC(token, 'worker0-info' nonce1 nonce0 info0), info0

        Worker 1 checks worker 0's proof before it sends anything about itself, and stops with
        an error if the server cannot prove the secret (a process that bound the port first);
        worker 0 rejects clients that fail and waits past them."""
        mine = json.dumps(info).encode()
        deadline = time.monotonic() + self.timeout
        return (self._handshake_server if self.rank == 0 else self._handshake_client)(mine, deadline)

    def _hello_parts(self, deadline):
        try:
            self._poll(deadline, 0, 'hello')
        except PeerError:
            raise PeerError(f'worker {self.peer} did not connect to {self.address} within '
                            f'{self.timeout:g} s (peer_timeout)') from None
        parts = self.sock.recv_multipart(copy=False)
        ident = parts.pop(0) if self.rank == 0 else None
        stage = None
        try:
            kind, stage = parse_header(parts[0].bytes if parts else b'')
            if kind != HELLO:
                raise ValueError(f'{KIND_NAMES[kind]} before the handshake')
        except ValueError as e:
            return ident, None, parts, e
        return ident, stage, parts, None

    @staticmethod
    def _info(frame):
        peer_info = json.loads(frame.decode())
        if not isinstance(peer_info, dict):
            raise ValueError('hello is not a JSON object')
        return peer_info

    def _handshake_client(self, mine, deadline):
        nonce1 = os.urandom(TOKEN_BYTES)
        self.sock.send_multipart([header(HELLO, 0), nonce1])
        stage_frames = {1: 3, 3: 3}
        for want in (1, 3):
            _, stage, parts, error = self._hello_parts(deadline)
            try:
                if error:
                    raise error
                if stage != want or len(parts) != stage_frames[want]:
                    raise ValueError(f'unexpected hello {stage} of {len(parts)} frames')
                if want == 1:
                    nonce0 = parts[1].bytes
                    if len(nonce0) != TOKEN_BYTES or not hmac.compare_digest(
                            parts[2].bytes, self._mac(b'worker0', nonce1, nonce0)):
                        raise ValueError('it cannot prove the exchange secret')
                    self.sock.send_multipart([header(HELLO, 2),
                                              self._mac(b'worker1', nonce0, nonce1, mine), mine])
                else:
                    if not hmac.compare_digest(parts[1].bytes, self._mac(
                            b'worker0-info', nonce1, nonce0, parts[2].bytes)):
                        raise ValueError('its hello is not signed with the exchange secret')
                    peer_info = self._info(parts[2].bytes)
            except (ValueError, UnicodeDecodeError) as e:
                raise ExchangeError(f'the exchange server at {self.address} is not worker 0: {e} '
                                    f'(another process bound the port first?)') from None
        self.peer_id = b'worker0'
        return peer_info

    def _handshake_server(self, mine, deadline):
        pending = {}  # client identity -> (nonce1, nonce0) of the challenges answered
        while True:
            ident, stage, parts, error = self._hello_parts(deadline)
            who = ident.bytes
            try:
                if error:
                    raise error
                if stage == 0 and len(parts) == 2 and len(parts[1].bytes) == TOKEN_BYTES:
                    nonce1, nonce0 = parts[1].bytes, os.urandom(TOKEN_BYTES)
                    if len(pending) >= 64:  # a flood of clients: forget the oldest
                        pending.pop(next(iter(pending)))
                    pending[who] = nonce1, nonce0
                    self.sock.send_multipart([who, header(HELLO, 1), nonce0,
                                              self._mac(b'worker0', nonce1, nonce0)])
                    continue
                if stage != 2 or len(parts) != 3 or who not in pending:
                    raise ValueError(f'unexpected hello {stage} of {len(parts)} frames')
                nonce1, nonce0 = pending.pop(who)
                if not hmac.compare_digest(parts[1].bytes, self._mac(
                        b'worker1', nonce0, nonce1, parts[2].bytes)):
                    raise ValueError('wrong secret')
                peer_info = self._info(parts[2].bytes)
            except (ValueError, UnicodeDecodeError) as e:
                self._reject('a client', e)
                continue
            self.peer_id, self.peer_fd = who, parts[0].get(zmq.SRCFD)
            self.send(HELLO, 3, self._mac(b'worker0-info', nonce1, nonce0, mine), mine)
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
