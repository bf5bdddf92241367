"""Files keras-spft writes and reads back: written whole or not at all, and
read with an error that names the file when it is damaged. Internal."""

import json
import os
import uuid

__all__ = []


def atomic_write(path, write, binary=False):
    """Writes `path` through `write(file)` into a temporary file beside it,
    then renames it over `path`: a reader, or a process killed midway, never
    sees half a file. The temporary name is unique to this call (several
    processes of a distributed search may write the same file)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        with open(tmp, "wb" if binary else "w") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def atomic_json(path, obj):
    """`obj` as indented JSON, written by `atomic_write`."""
    atomic_write(path, lambda f: json.dump(obj, f, indent=2))


def read_json(path, what, remedy):
    """The JSON in `path`; a damaged file (a disk that filled up, an edit) is a
    `ValueError` naming it as a keras-spft `what`, with the `remedy`."""
    try:
        with open(path) as f:
            value = json.load(f)
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"'{path}' is not a readable keras-spft {what} ({e}); {remedy}.") from None
    if not isinstance(value, dict):   # valid JSON, but no record of ours (each is an object)
        raise ValueError(f"'{path}' is not a readable keras-spft {what} (it holds a JSON "
                         f"{type(value).__name__}, not an object); {remedy}.")
    return value
