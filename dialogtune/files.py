"""Writing outputs so that a kill at any moment leaves either the old version or the new one,
never half of one: write into a staging directory beside the target, then rename it into place.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def staged_dir(target: Path, *, may_replace: Callable[[Path], bool] | None = None,
               keep_existing: bool = False) -> Iterator[Path]:
    """Yield an empty staging directory on the target's file system; when the block ends
    without an error, it becomes `target` (an existing target is replaced, or, with
    `keep_existing`, kept and the new copy dropped: another process finished first).
    `may_replace(target)` guards against deleting a directory that is not ours. On an error
    the staging directory is removed and the target is untouched."""
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
                raise FileExistsError(f"{target}: exists and is not ours to replace")
            # Swap aside first, so the target is absent only between two renames.
            aside = Path(tempfile.mkdtemp(prefix=f".{target.name}-old-", dir=parent))
            os.replace(target, aside / target.name)
            os.replace(staging, target)
            shutil.rmtree(aside, ignore_errors=True)
        else:
            os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def write_json(path: Path, data: Any) -> None:
    """A JSON file written whole or not at all."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)
