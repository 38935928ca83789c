"""The output folder's record of what upscale made, ``.distillsr-upscale.json``: for each
output its input, the scale, the model and the settings that change the pixels, and the
output's size and modification time. A later run skips only outputs made from the same
input with the same settings, and leaves recorded outputs out of its inputs."""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

from ..io import atomic_write, file_lock

__all__ = ["MANIFEST", "OutputRecord", "describe_settings", "COMPARED"]

MANIFEST = ".distillsr-upscale.json"  # the record of outputs, in the output folder
MANIFEST_SAVE_SECONDS = 5.0           # a long batch saves its record at least this often


def describe_settings(settings: dict) -> str:
    text = f"x{settings.get('scale')} {settings.get('model')}"
    if settings.get("self_ensemble"):
        text += " with self-ensemble"
    if settings.get("quality") is not None:
        text += f" at quality {settings['quality']}"
    return text


COMPARED = ("scale", "model_id", "self_ensemble", "quality")


class OutputRecord:
    """The output folder's record of what upscale made: ``{"outputs": {relative path: entry}}``,
    an entry holding the settings, the input and the output's size and modification time (an
    output changed since is no longer taken as made by upscale)."""

    def __init__(self, out_dir: Path, log: Callable[[str], None]):
        self.out_dir = out_dir
        self.log = log
        self.path = out_dir / MANIFEST
        self.entries: Dict[str, dict] = self._read(log)
        self.new: Dict[str, dict] = {}
        self.saved_at = time.monotonic()

    def _read(self, log=None) -> Dict[str, dict]:
        if not self.path.is_file():
            return {}
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
            outputs = data["outputs"]
            if not isinstance(outputs, dict):
                raise ValueError("'outputs' is not an object")
            return {k: v for k, v in outputs.items() if isinstance(v, dict)}
        except (OSError, ValueError, KeyError, TypeError) as e:
            if log:
                log(f"warning: {self.path}: unreadable record of earlier outputs ({e}); a new one is started")
            return {}

    def _key(self, dst: Path) -> str:
        return dst.relative_to(self.out_dir).as_posix()

    def outputs(self) -> List[Path]:
        return [self.out_dir / k for k in self.entries]

    def entry(self, dst: Path) -> Optional[dict]:
        """The record of ``dst`` if the file is still the one recorded."""
        e = self.entries.get(self._key(dst))
        try:
            st = dst.stat()
        except OSError:
            return None
        if e is None or e.get("size") != st.st_size or e.get("mtime_ns") != st.st_mtime_ns:
            return None
        return e

    def add(self, dst: Path, src: Path, settings: dict) -> None:
        st, ist = dst.stat(), src.stat()
        e = dict(settings, input=str(src.resolve()), input_size=ist.st_size, input_mtime_ns=ist.st_mtime_ns,
                 size=st.st_size, mtime_ns=st.st_mtime_ns)
        self.entries[self._key(dst)] = self.new[self._key(dst)] = e

    def save(self, force: bool = True) -> None:
        """Merge the new entries into the file (under a lock on the folder: another run may
        be writing into it too) and write it atomically. A failure is logged: the outputs
        themselves are complete, a later run then takes them as not made by upscale."""
        if not self.new or (not force and time.monotonic() - self.saved_at < MANIFEST_SAVE_SECONDS):
            return
        try:
            with file_lock(self.out_dir):
                merged = self._read()
                merged.update(self.new)
                text = json.dumps({"version": 1, "outputs": merged}, indent=1, sort_keys=True)
                atomic_write(self.path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
        except OSError as e:
            self.log(f"warning: {self.path}: could not record the outputs made ({e})")
            return
        self.entries.update(merged)
        self.new.clear()
        self.saved_at = time.monotonic()
