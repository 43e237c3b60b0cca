"""Atomic binary writes (no torch, no numpy): a temp file beside the target, renamed onto it.

    with atomic_open(path) as f:   # f: a binary file object
        f.write(...)

On a clean exit the temp file is made 0644 and os.replace'd onto `path`; on any exception it
is deleted and the exception goes on, so `path` is either the old file or the whole new one.
Used by tools/safetensors_io.py and tools/make_random_model.py.
"""
import contextlib
import os
import tempfile


@contextlib.contextmanager
def atomic_open(path, buffering=-1):
    """Yield a binary file for writing that becomes `path` only if the block completes."""
    path = os.path.abspath(path)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp",
                               dir=os.path.dirname(path))
    try:
        with os.fdopen(fd, "wb", buffering=buffering) as f:
            yield f
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
