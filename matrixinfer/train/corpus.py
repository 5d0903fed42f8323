"""The training corpus: the CPython standard library's own ``*.py`` sources (PSF license).

Gathered deterministically from the running interpreter's stdlib directory: sorted relative
paths, site-packages and test suites excluded, and split into training and held-out files by a
hash of each relative path (so a file's side of the split never depends on which other files exist).
"""

from __future__ import annotations

import hashlib
import sysconfig
from dataclasses import dataclass
from pathlib import Path

# Directory names left out: installed third-party packages and the stdlib's own test suites
# (test code is large, repetitive and unlike the library code the model should complete).
EXCLUDED_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test"})

RECIPE = """\
- root: `sysconfig.get_paths()["stdlib"]` of the interpreter running the training
- files: every `*.py` under the root (recursive), sorted by relative POSIX path
- excluded: any file with a directory component named one of: {excluded}
- excluded: files that are not valid UTF-8
- document: the file's text as-is, wrapped as `<|bos|>` + text + `<|eos|>`
- split: held-out iff `int(sha256(relative_path).hexdigest()[:8], 16) % 100 < {pct}`
"""


@dataclass(frozen=True)
class SourceFile:
    """One stdlib file: its path relative to the stdlib root and its text."""

    path: str
    text: str


def stdlib_root() -> Path:
    """The running interpreter's stdlib source directory."""
    return Path(sysconfig.get_paths()["stdlib"])


def is_heldout(rel_path: str, heldout_percent: int) -> bool:
    """Whether ``rel_path`` (POSIX, relative to the stdlib root) belongs to the held-out split."""
    h = int(hashlib.sha256(rel_path.encode()).hexdigest()[:8], 16)
    return h % 100 < heldout_percent


def gather(root: Path | None = None) -> list[SourceFile]:
    """All corpus files under ``root`` (default: the stdlib), sorted by relative path."""
    root = root or stdlib_root()
    files = []
    for path in sorted(root.rglob("*.py"), key=lambda p: p.relative_to(root).as_posix()):
        rel = path.relative_to(root).as_posix()
        if EXCLUDED_DIRS.intersection(rel.split("/")[:-1]) or not path.is_file():
            continue
        try:
            text = path.read_bytes().decode("utf-8")
        except UnicodeDecodeError:
            continue
        files.append(SourceFile(rel, text))
    if not files:
        raise FileNotFoundError(f"{root}: no *.py files found; the corpus needs the stdlib sources")
    return files


def split(files: list[SourceFile], heldout_percent: int) -> tuple[list[SourceFile], list[SourceFile]]:
    """``(train, heldout)`` by the path hash; order within each side is the sorted order."""
    train = [f for f in files if not is_heldout(f.path, heldout_percent)]
    heldout = [f for f in files if is_heldout(f.path, heldout_percent)]
    return train, heldout


def recipe_text(heldout_percent: int) -> str:
    """The corpus recipe as Markdown bullet points (written to CORPUS.md)."""
    excluded = ", ".join(f"`{d}`" for d in sorted(EXCLUDED_DIRS))
    return RECIPE.format(excluded=excluded, pct=heldout_percent)
