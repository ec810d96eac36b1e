"""Set and clear environment variables for the length of a ``with`` block, then put back exactly
what was there (W&B reads its settings from the environment)."""
from __future__ import annotations

import contextlib
import os
from typing import Iterable, Iterator, Mapping


@contextlib.contextmanager
def patched_environ(values: Mapping[str, str], clear: Iterable[str] = ()) -> Iterator[None]:
    clear = tuple(clear)
    saved = {k: os.environ.get(k) for k in (*values, *clear)}
    try:
        for k in clear:
            os.environ.pop(k, None)
        os.environ.update(values)
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
