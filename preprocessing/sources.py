"""Where the bytes of one listed image come from: a file in a folder, a member of an uncompressed
archive (read in place, at its offset in the archive file), or a CIFAR record held in memory.

Workers get one item per image (a path, a Member or a Record) and open it with `opened`, which yields
something Pillow can open: the path itself, or a file object that ends where the member ends (its
bytes, read at once, or a window on the archive for a very large member), so a truncated member
decodes exactly as the same truncated file would.
"""
import bisect
import io
import os
from contextlib import contextmanager
from dataclasses import dataclass

from preprocessing import PrepError

IMAGE_EXTS = ('.jpg', '.jpeg', '.png')  # the image files listed (compared lower-case), in every layout
# Members up to this size are read with one pread and decoded from memory (one system call, no
# Python-level reads and copies: 2 % fewer instructions per decoded 18 KiB JPEG than through a
# Window); larger members, hostile ones included, still go through a Window: no worker holds more
WHOLE_MEMBER = 32 << 20


@dataclass(frozen=True)
class Member:
    """Bytes [offset, offset + size) of an uncompressed archive file: one image, read in place."""
    archive: str
    offset: int
    size: int
    name: str    # the listed name ('<wnid>/<file>' or '<file>'), for messages

    def __str__(self):
        return f'{self.archive} member {self.name}'


@dataclass(frozen=True)
class Record:
    """One CIFAR image: 1,024 R, 1,024 G and 1,024 B bytes, rows of 32 (the binary format's order)."""
    pixels: bytes
    name: str

    def __str__(self):
        return self.name


class FolderSource:
    """Listed names '<class>/<file>' or '<file>' are paths relative to a folder."""

    def __init__(self, root):
        self.root = root

    def locate(self, name):
        return os.path.join(self.root, *name.split('/'))


class ArchiveSource:
    """Listed names -> Members of one archive; `names` sorted, offsets and sizes aligned with them."""

    def __init__(self, archive, names, offsets, sizes):
        self.archive, self.names, self.offsets, self.sizes = archive, names, offsets, sizes

    def locate(self, name):
        i = bisect.bisect_left(self.names, name)  # no dict: 1.3 M names would cost ~150 MB more
        assert self.names[i] == name, name
        return Member(self.archive, int(self.offsets[i]), int(self.sizes[i]), name)


class RecordSource:
    """Listed names '<class>/<file>:<k>' -> Records, from whole files held in memory (CIFAR: 180 MB
    at most); a Record copies only its own 3,072 bytes."""

    def __init__(self, files, header):
        self.files, self.header = files, header  # {file name: bytes}, label bytes per record

    def locate(self, name):
        where, k = name.rsplit(':', 1)
        start = int(k) * (self.header + 3072) + self.header
        return Record(self.files[where.split('/', 1)[1]][start:start + 3072], name)


class Window(io.RawIOBase):
    """Read-only file object over bytes [offset, offset + size) of an open file descriptor, read with
    os.pread (no shared file position: safe in forked workers)."""

    def __init__(self, fd, offset, size):
        super().__init__()
        self.fd, self.offset, self.size, self.pos = fd, offset, size, 0

    def readable(self):
        return True

    def seekable(self):
        return True

    def readinto(self, buffer):
        n = min(len(buffer), self.size - self.pos)
        if n <= 0:
            return 0
        data = os.pread(self.fd, n, self.offset + self.pos)
        buffer[:len(data)] = data
        self.pos += len(data)
        return len(data)

    def seek(self, pos, whence=io.SEEK_SET):
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.pos, io.SEEK_END: self.size}[whence]
        if base + pos < 0:
            raise OSError(f'negative seek position {base + pos}')
        self.pos = base + pos
        return self.pos

    def tell(self):
        return self.pos


@contextmanager
def opened(item):
    """What Pillow opens for one listed image: a path, or a file object for a Member or a Record."""
    if isinstance(item, Record):
        yield io.BytesIO(b'P6 32 32 255\n' + planar_to_rgb(item.pixels))  # binary PPM: lossless
    elif isinstance(item, Member):
        try:
            raw = open(item.archive, 'rb', buffering=0)
        except OSError as e:
            raise PrepError(f'cannot read archive {item.archive}: {e.strerror}') from None
        with raw:
            if item.size <= WHOLE_MEMBER:
                try:
                    data = read_at(raw.fileno(), item.offset, item.size)
                except OSError:
                    pass  # read through the Window below: Pillow meets the error, as it would in a file
                else:
                    yield io.BytesIO(data)  # shares the bytes, no copy
                    return
            yield io.BufferedReader(Window(raw.fileno(), item.offset, item.size), 1 << 16)
    else:
        yield item


def read_at(fd, offset, size):
    """Bytes [offset, offset + size) of an open file, fewer only where the file ends first (a
    truncated archive: then the member is as truncated as its extracted file would be)."""
    data = os.pread(fd, size, offset)
    while len(data) < size:  # regular files read short only at their end; make sure of it
        more = os.pread(fd, size - len(data), offset + len(data))
        if not more:
            break
        data += more
    return data


def planar_to_rgb(pixels):
    """3,072 bytes R-plane, G-plane, B-plane -> 3,072 bytes R, G, B per pixel."""
    out = bytearray(3072)
    for c in range(3):
        out[c::3] = pixels[c * 1024:(c + 1) * 1024]
    return bytes(out)
