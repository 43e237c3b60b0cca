"""Small helpers shared by the Python end-to-end tests (tests/test_*.py).

- Checks: `check(cond, what)` prints "ok   what" or "FAIL what" and remembers failures;
  `finish()` prints the summary and gives the exit status.
- `import_ditmoe()`: the Python package over this build's libditmoe.so (DITMOE_BUILD / DITMOE_BIN),
  re-running the test with the ASan runtime preloaded when the library is a sanitizer build.
- `read_png(path)`: an independent PNG decoder (zlib + the five filters, written from the PNG
  specification, not our writer's code) for 8-bit gray/RGB non-interlaced files, so a test does
  not trust the code it tests. It checks every chunk CRC and the IEND, and returns
  (uint8 [H, W, C], {tEXt key: value}).
"""
import os
import struct
import subprocess
import sys
import tempfile
import unittest
import zlib

import numpy as np

failures = []

SRC = os.environ.get("DITMOE_SRC") or os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.environ.get("DITMOE_BIN") or os.path.join(SRC, "build", "bin")
BUILD = os.environ.get("DITMOE_BUILD") or os.path.dirname(BIN)


def import_ditmoe():
    """The ditmoe package bound to BUILD/lib/libditmoe.so. A sanitizer build's library only loads
    into Python with the ASan runtime preloaded: then the test re-runs itself that way (leak
    checks off: the interpreter itself is not leak-clean)."""
    os.environ["DITMOE_LIB"] = os.path.join(BUILD, "lib", "libditmoe.so")
    if ("libasan" in subprocess.run(["ldd", os.environ["DITMOE_LIB"]], capture_output=True,
                                    text=True).stdout
            and "libasan" not in os.environ.get("LD_PRELOAD", "")):
        rt = [subprocess.run(["gcc", "-print-file-name=" + n], capture_output=True,
                             text=True).stdout.strip() for n in ("libasan.so", "libubsan.so")]
        os.environ["LD_PRELOAD"] = ":".join(rt)
        os.environ["ASAN_OPTIONS"] = "detect_leaks=0"
        os.execv(sys.executable, [sys.executable] + sys.argv)
    sys.path.insert(0, os.path.join(SRC, "python"))
    import ditmoe
    return ditmoe


def check(cond, what):
    print(("ok   " if cond else "FAIL ") + what, flush=True)
    if not cond:
        failures.append(what)
    return cond


def finish():
    print(f"{len(failures)} failure(s)" if failures else "all ok")
    return 1 if failures else 0


def _paeth(a, up, c):
    pa, pb, pc = abs(up - c), abs(a - c), abs(a + up - 2 * c)
    return a if pa <= pb and pa <= pc else (up if pb <= pc else c)


def _unfilter(raw, h, stride, bpp):
    out = np.zeros((h, stride), np.int64)
    prev = np.zeros(stride, np.int64)
    for y in range(h):
        f = raw[y * (stride + 1)]
        line = np.frombuffer(raw, np.uint8, stride, y * (stride + 1) + 1).astype(np.int64)
        cur = np.zeros(stride, np.int64)
        for x in range(stride):
            a = cur[x - bpp] if x >= bpp else 0
            c = prev[x - bpp] if x >= bpp else 0
            up = prev[x]
            p = (0, a, up, (a + up) // 2, None)[f] if f < 4 else _paeth(a, up, c)
            cur[x] = (line[x] + p) & 255
        out[y], prev = cur, cur
    return out.astype(np.uint8)


def read_png(path):
    """(uint8 [H, W, C], {tEXt key: value}); raises ValueError if the file is truncated, a chunk
    CRC is wrong or the format is not 8-bit gray/RGB non-interlaced."""
    b = open(path, "rb").read()
    if b[:8] != b"\x89PNG\r\n\x1a\n":
        raise ValueError(f"{path}: bad signature")
    pos, idat, text, ihdr = 8, b"", {}, None
    while True:
        if pos + 8 > len(b):
            raise ValueError(f"{path}: truncated (no IEND)")
        n, typ = struct.unpack(">I4s", b[pos:pos + 8])
        data = b[pos + 8:pos + 8 + n]
        crc = b[pos + 8 + n:pos + 12 + n]
        if len(data) != n or len(crc) != 4 or struct.unpack(">I", crc)[0] != zlib.crc32(typ + data):
            raise ValueError(f"{path}: bad chunk {typ!r}")
        pos += 12 + n
        if typ == b"IHDR":
            ihdr = struct.unpack(">IIBBBBB", data)
        elif typ == b"IDAT":
            idat += data
        elif typ == b"tEXt":
            k, v = data.split(b"\0", 1)
            text[k.decode("latin-1")] = v.decode("latin-1")
        elif typ == b"IEND":
            break
    if ihdr is None:
        raise ValueError(f"{path}: no IHDR")
    w, h, depth, ctype, _, _, interlace = ihdr
    if depth != 8 or interlace != 0 or ctype not in (0, 2):
        raise ValueError(f"{path}: not an 8-bit gray/RGB non-interlaced PNG")
    ch = 1 if ctype == 0 else 3
    pix = _unfilter(zlib.decompress(idat), h, w * ch, ch)
    return pix.reshape(h, w, ch), text


class TempDirCase(unittest.TestCase):
    """A TestCase whose class owns one temporary directory (PREFIX names it); path(name) is in it."""
    PREFIX = "ditmoe-test-"

    @classmethod
    def setUpClass(cls):
        cls._tmp = tempfile.TemporaryDirectory(prefix=cls.PREFIX)
        cls.dir = cls._tmp.name

    @classmethod
    def tearDownClass(cls):
        cls._tmp.cleanup()

    def path(self, name):
        return os.path.join(self.dir, name)
