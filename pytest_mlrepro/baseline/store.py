"""Where baselines live and how they are read and written: one JSON file per test,
``__mlrepro__/<test module>/<test name>.json`` next to the test file, written atomically (a reader
sees the old file or the new, never half), so xdist workers updating different tests never race.
A mismatch leaves ``<test name>.obtained.json`` beside the baseline.
"""
from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Iterable, Optional

from ..atomic import atomic_write_text
from .record import Baseline, BaselineError

FOLDER = "__mlrepro__"
OBTAINED = ".obtained.json"
_UNSAFE = re.compile(r"[^A-Za-z0-9_.\-\[\]=+,]")
_MAX_NAME = 120


def file_name(test_name: str) -> str:
    """A file name for a test (``TestX::test_y[a-b]`` -> ``TestX.test_y[a-b].json``), stable and safe."""
    name = _UNSAFE.sub("_", test_name.replace("::", "."))
    if len(name) > _MAX_NAME or name.startswith("."):
        digest = hashlib.sha1(test_name.encode()).hexdigest()[:10]
        name = f"{name.lstrip('.')[:_MAX_NAME - 11]}-{digest}"
    return name + ".json"


def baseline_path(test_file: Path, test_name: str) -> Path:
    return Path(test_file).parent / FOLDER / Path(test_file).stem / file_name(test_name)


def obtained_path(path: Path) -> Path:
    return path.with_name(path.name[: -len(".json")] + OBTAINED)


def read(path: Path) -> Optional[Baseline]:
    """The baseline at ``path``, or None when there is none; BaselineError naming the file when unusable."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        raise BaselineError(f"{path}: cannot read the baseline ({exc})") from None
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise BaselineError(f"{path}: the baseline is not valid JSON (corrupt or truncated: {exc}); rewrite it "
                            "with --mlrepro-update") from None
    return Baseline.from_dict(data, str(path))


def write(path: Path, baseline: Baseline) -> Path:
    atomic_write_text(path, json.dumps(baseline.to_dict(), indent=1, allow_nan=False) + "\n", make_parents=True)
    return path


def write_obtained(path: Path, baseline: Baseline) -> Path:
    return write(obtained_path(path), baseline)


def remove_obtained(path: Path) -> None:
    obtained_path(path).unlink(missing_ok=True)


def stored(folder: Path) -> Iterable[Path]:
    """The baseline files (not ``.obtained``) in one test module's baseline folder."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.glob("*.json") if not p.name.endswith(OBTAINED))


def unused(expected: set, module_files: set) -> list[Path]:
    """Baselines no test uses any more, among the ``__mlrepro__`` folders next to ``module_files``.

    ``expected`` is the baseline path of every collected (or deselected) test of those modules. A
    module folder whose test module no longer exists counts whole.
    """
    expected = {Path(p).resolve() for p in expected}
    out: list[Path] = []
    roots = {Path(m).resolve().parent / FOLDER for m in module_files}
    seen_modules = {Path(m).resolve() for m in module_files}
    for root in sorted(roots):
        if not root.is_dir():
            continue
        for folder in sorted(p for p in root.iterdir() if p.is_dir()):
            module = root.parent / f"{folder.name}.py"
            gone = not module.exists()
            if gone or module.resolve() in seen_modules:
                out.extend(p for p in stored(folder) if gone or p.resolve() not in expected)
    return out
