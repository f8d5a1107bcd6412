"""The demo's training text: real source code that nobody on this project wrote.

By default the corpus is the Python standard library of the running interpreter: every `*.py`
file below `sysconfig.get_paths()["stdlib"]` (608 files, 9.9 MB on CPython 3.11), minus the test
suites, installed third-party packages (`site-packages`), generated code (the `encodings` codec
tables, `pydoc_data`, `_sysconfigdata*`) and the rot13 of `this.py`. It is large enough that the
default run stays within one epoch, where Engram's tables cannot memorise text they have seen
(docs/demo.md, "Longer runs"). `--corpus stdlib-top` is the earlier, smaller selection: only the
top-level modules (~170 files, ~4.7 MB). Any other folder can be given with `--corpus DIR`: all
UTF-8 text files below it are used.

Files, not characters, are split into train and validation: a file goes to validation when the
CRC32 of its relative path is 0 mod `val_every` (deterministic, and stable when files are added),
so validation text is code the models never saw, not the second half of a file they trained on.
"""

from __future__ import annotations

import hashlib
import sysconfig
import zlib
from dataclasses import dataclass, field
from pathlib import Path

EXCLUDED_STDLIB = ("_sysconfigdata", "this.py")  # generated config; rot13 text
# Folders of the stdlib tree that are not hand-written library code: test suites, third-party
# packages, generated codec tables and the pydoc topics dump.
EXCLUDED_STDLIB_DIRS = frozenset({"test", "tests", "idle_test", "__pycache__", "encodings", "pydoc_data"})
STDLIB_SELECTIONS = ("stdlib", "stdlib-top")  # names `--corpus` takes besides a folder
MAX_FILE_BYTES = 2_000_000  # skip anything larger in a user folder (data dumps, minified files)


@dataclass
class Corpus:
    """A fixed selection of text files, split into train and validation by file."""

    root: Path
    train_files: list[Path]
    val_files: list[Path]
    # Hex digest of the selected files' names and contents: the cache key of everything derived.
    digest: str = field(default="")

    def train_texts(self) -> list[str]:
        return [_read(p) for p in self.train_files]

    def val_texts(self) -> list[str]:
        return [_read(p) for p in self.val_files]

    def describe(self) -> str:
        n_train = sum(p.stat().st_size for p in self.train_files)
        n_val = sum(p.stat().st_size for p in self.val_files)
        return (f"{self.root}: {len(self.train_files)} train files ({n_train / 1e6:.2f} MB), "
                f"{len(self.val_files)} validation files ({n_val / 1e6:.2f} MB)")


def stdlib_dir() -> Path:
    """The running interpreter's standard library folder."""
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files(root: Path | None = None, *, top_level_only: bool = False) -> list[Path]:
    """The default selection: the stdlib's *.py files (see the module doc), sorted by path.

    `top_level_only`: just the top-level modules (`--corpus stdlib-top`).
    """
    root = stdlib_dir() if root is None else root
    paths = root.glob("*.py") if top_level_only else root.rglob("*.py")
    return sorted(p for p in paths if p.is_file() and not p.name.startswith(EXCLUDED_STDLIB)
                  and _library_folders(p.relative_to(root).parts[:-1]))


def _library_folders(folders: tuple[str, ...]) -> bool:
    """Only importable package folders, none excluded: `config-3.11-<platform>` (a generated
    build script naming this install's path), `lib-dynload` and the like vary between machines."""
    return all(f.isidentifier() for f in folders) and not EXCLUDED_STDLIB_DIRS & set(folders)


def folder_files(root: Path) -> list[Path]:
    """Every UTF-8 text file below `root` (hidden folders skipped), sorted by relative path."""
    files = []
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root)
        if not path.is_file() or any(part.startswith(".") for part in rel.parts):
            continue
        if path.stat().st_size == 0 or path.stat().st_size > MAX_FILE_BYTES:
            continue
        data = path.read_bytes()
        if b"\0" in data:
            continue  # binary
        try:
            data.decode("utf-8")
        except UnicodeDecodeError:
            continue
        files.append(path)
    return files


def load_corpus(folder: str | Path | None = None, *, val_every: int = 10, max_train_bytes: int = 0) -> Corpus:
    """Select and split the corpus.

    Args:
        folder: None or "stdlib" for the stdlib tree, "stdlib-top" for its top-level modules only,
            else any folder of text files.
        val_every: about one file in `val_every` goes to validation (at least one does).
        max_train_bytes: keep only the first train files up to this many bytes (0 = all); the
            quick mode uses it. Validation files are never cut, so quick runs evaluate on the same
            text as full runs.
    """
    if folder is None or folder in STDLIB_SELECTIONS:
        root, files = stdlib_dir(), stdlib_files(top_level_only=folder == "stdlib-top")
    else:
        root = Path(folder).expanduser().resolve()
        if not root.is_dir():
            raise FileNotFoundError(f"--corpus {folder}: not a folder")
        files = folder_files(root)
    if len(files) < 2:
        raise ValueError(f"corpus {root} has {len(files)} usable text files; need at least 2")

    is_val = [zlib.crc32(str(p.relative_to(root)).encode()) % val_every == 0 for p in files]
    val = [p for p, v in zip(files, is_val) if v] or [files[-1]]  # tiny folders: last file validates
    train = [p for p in files if p not in val]
    if max_train_bytes:
        train = _first_bytes(train, max_train_bytes)
    return Corpus(root, train, val, digest=_digest(root, train, val))


def _first_bytes(files: list[Path], budget: int) -> list[Path]:
    kept, total = [], 0
    for path in files:
        if total >= budget:
            break
        kept.append(path)
        total += path.stat().st_size
    return kept


def _digest(root: Path, train: list[Path], val: list[Path]) -> str:
    h = hashlib.sha256()
    for tag, paths in (("train", train), ("val", val)):
        for path in paths:
            h.update(f"{tag}:{path.relative_to(root)}\0".encode())
            h.update(path.read_bytes())
    return h.hexdigest()[:16]


def _read(path: Path) -> str:
    return path.read_text(encoding="utf-8", errors="replace")
