"""Hash a folder tree (names, bytes, modes) to prove a command changed nothing in it."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


def tree_digest(root: Path, *, skip: tuple[Path, ...] = ()) -> dict[str, str]:
    """``{relative path: sha256 of bytes and mode}`` of every file and folder under ``root``.

    Paths under any of ``skip`` (the command's intended output) are left out. A
    missing ``root`` gives ``{}``; symbolic links are recorded by their target.
    """
    root = Path(root)
    skipped = [os.path.abspath(p) for p in skip]
    out: dict[str, str] = {}
    if not os.path.lexists(root):
        return out
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if os.path.abspath(os.path.join(folder, d)) not in skipped)
        for name in sorted(dirs) + sorted(files):
            full = os.path.join(folder, name)
            if os.path.abspath(full) in skipped:
                continue
            rel = os.path.relpath(full, root)
            info = os.lstat(full)
            if os.path.islink(full):
                out[rel] = "link:" + os.readlink(full)
            elif os.path.isdir(full):
                out[rel] = f"dir:{info.st_mode:o}"
            else:
                out[rel] = f"{info.st_mode:o}:" + hashlib.sha256(Path(full).read_bytes()).hexdigest()
    return out
