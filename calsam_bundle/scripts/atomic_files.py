"""Temporary files for atomic writes that end up with the permissions of a normally created file.

Every writer in the bundle writes a temporary file beside its target and renames it over the target, so a
killed process never leaves half a file. ``tempfile.mkstemp`` creates the temporary file with mode 0600 for
privacy, and the rename keeps that mode. Checkpoints, reports and predictions would then be unreadable to other
users of a shared machine, for example a MONAI Label server running under another account.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

__all__ = ["default_file_mode", "temporary_sibling"]


def default_file_mode() -> int:
    """Return the mode ``open()`` gives a new file under the current umask (0644 for umask 022)."""
    # The umask can only be read by setting it; it is restored at once.
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


def temporary_sibling(path: str | Path, suffix: str = ".tmp") -> tuple[int, str]:
    """Create a temporary file in the folder of ``path`` with the default file mode.

    Returns:
        The open OS-level handle and the temporary file's path, as ``tempfile.mkstemp`` does. The caller writes
        it, renames it over ``path`` with ``os.replace`` and removes it on failure.
    """
    path = Path(path)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
    try:
        os.fchmod(handle, default_file_mode())
    except BaseException:
        os.close(handle)
        os.unlink(temporary)
        raise
    return handle, temporary
