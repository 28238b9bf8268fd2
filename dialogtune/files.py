"""Writing outputs so that a kill at any moment leaves either the old version or the new one,
never half of one: write into a staging directory beside the target, then rename it into place.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from dialogtune.errors import RunError


@contextlib.contextmanager
def staged_dir(target: Path, *, may_replace: Callable[[Path], bool] | None = None,
               keep_existing: bool = False) -> Iterator[Path]:
    """Yield an empty staging directory on the target's file system; when the block ends
    without an error, it becomes `target` (an existing target is replaced, or, with
    `keep_existing`, kept and the new copy dropped: another process finished first).

    `may_replace(target)` guards against deleting a directory that is not ours: a refused
    replacement raises RunError (an output directory the user must change, whichever command
    wrote it). Callers check the target before their work, with their own message; this one is
    the backstop for a directory that appeared meanwhile. On any error the staging directory is
    removed and the target is as it was."""
    target = Path(target)
    parent = target.resolve().parent
    parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-staging-", dir=parent))
    try:
        yield staging
        if target.exists():
            if keep_existing:
                shutil.rmtree(staging)
                return
            if may_replace is not None and not may_replace(target):
                raise RunError(f"{target}: exists and is not ours to replace (it holds something dialogtune"
                               " did not write); choose another output directory")
            _swap(staging, target, parent)
        else:
            os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _swap(staging: Path, target: Path, parent: Path) -> None:
    """Replace `target` by `staging`, moving the old target aside first, so the target is absent
    only between two renames. If the second rename fails, the old target is moved back."""
    aside = Path(tempfile.mkdtemp(prefix=f".{target.name}-old-", dir=parent))
    old = aside / target.name
    try:
        os.replace(target, old)
    except BaseException:
        aside.rmdir()
        raise
    try:
        os.replace(staging, target)
    except BaseException:
        # Should this rename fail as well, the old copy stays in `aside`: never removed here.
        os.replace(old, target)
        aside.rmdir()
        raise
    shutil.rmtree(aside, ignore_errors=True)


@contextlib.contextmanager
def staged_file(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside `path` (same suffix, so writers that go by it still work);
    when the block ends without an error it replaces `path` whole, else it is removed."""
    path = Path(path)
    tmp = path.with_name(f".tmp-{path.name}")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text(path: Path, text: str) -> None:
    """A text file written whole or not at all."""
    with staged_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: Path, data: Any) -> None:
    write_text(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def write_jsonl(path: Path, records: Iterable[dict]) -> None:
    """One JSON record a line."""
    write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
