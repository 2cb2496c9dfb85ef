"""Build the English calibration and evaluation texts of the LLM tests and benchmarks.

    python tests/build_texts.py ~/.cache/hpcprune/texts     # writes calibration.txt, eval.txt, texts.json

The prose comes from Debian's `python3.11-doc` (apt-get install python3.11-doc), which ships the
reStructuredText sources of the Python documentation as /usr/share/doc/python3.11/html/_sources/
**/*.rst.txt: English technical prose, on any fresh Debian machine, with no download beyond apt.

    calibration.txt   library/ and howto/ (the library reference and the HOWTOs)
    eval.txt          tutorial/ (the tutorial), held out: no file of it is in calibration.txt

Each source file (in sorted path order) is cut into paragraphs at blank lines, and only prose is
kept: paragraphs that are directives or comments (`..`), indented (code samples, literal blocks,
directive bodies), interactive sessions (`>>>`), tables, section adornments, or that are mostly not
words are dropped. Inline markup is reduced to its text (:func:`len` -> len, ``x`` -> x,
`title <url>`_ -> title, **bold** -> bold), a paragraph's lines are joined, and each paragraph is
written as one line: so a line is also a sentence-model window (`calibration_windows` of
hpcprune.models.text_windows reads the whole text, `sentence_windows` one line per window).

The result depends only on the package's version, recorded with the files' sizes and SHA-256 in
texts.json; rerunning the script with that version gives the same bytes. It does nothing when the
three files are already there.
"""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path

SOURCES = Path("/usr/share/doc/python3.11/html/_sources")
PACKAGE = "python3.11-doc"
PARTS = {"calibration.txt": ("library", "howto"), "eval.txt": ("tutorial",)}
MANIFEST = "texts.json"

MIN_WORDS = 6
MIN_LETTER_SHARE = 0.7  # letters and spaces among a paragraph's characters: prose, not code or tables

ADORNMENT = re.compile(r"^([=\-~^*#\"+`':.])\1{2,}\s*$")  # a section title's over- or underline
TABLE = re.compile(r"^\s*(\+[-=+]+\+|=+( +=+)+)\s*$")
ROLE = re.compile(r":[\w:+.-]+:`([^`]*)`")
TITLED_TARGET = re.compile(r"^(.*?)\s*<[^<>]*>$", re.S)
LINK = re.compile(r"`([^`<]+?)\s*(<[^`>]*>)?`__?")
LITERAL = re.compile(r"``(.+?)``")
EMPHASIS = re.compile(r"\*\*(.+?)\*\*|\*(\S.*?)\*")
SUBSTITUTION = re.compile(r"\|(\w[\w -]*)\|")
FOOTNOTE = re.compile(r"\s*\[(#\w*|\d+|\*)\]_")
ESCAPE = re.compile(r"\\(.)")


def paragraphs(text: str) -> Iterator[list[str]]:
    """Blocks of consecutive non-blank lines."""
    block: list[str] = []
    for line in text.splitlines():
        if line.strip():
            block.append(line)
        elif block:
            yield block
            block = []
    if block:
        yield block


def role_text(match: re.Match) -> str:
    """:role:`title <target>` -> title; :role:`~a.b.c` -> c; :role:`!name` -> name."""
    content = match.group(1)
    titled = TITLED_TARGET.match(content)
    if titled and titled.group(1):
        return titled.group(1)
    content = content.lstrip("!")
    return content[1:].rsplit(".", 1)[-1] if content.startswith("~") else content


def plain(paragraph: str) -> str:
    """The paragraph's text without inline markup, on one line; ``literals`` are kept as written."""
    pieces = LITERAL.split(FOOTNOTE.sub("", re.sub(r"\s+", " ", paragraph).strip()))
    pieces[::2] = [markup_removed(piece) for piece in pieces[::2]]  # odd pieces: the literals' text
    text = "".join(pieces)
    # "For example::" introduces a literal block and reads "For example:"; a lone " ::" reads as nothing.
    return re.sub(r"::$", ":", re.sub(r" ::$", "", text))


def markup_removed(text: str) -> str:
    text = LINK.sub(r"\1", ROLE.sub(role_text, text))
    text = EMPHASIS.sub(lambda m: m.group(1) or m.group(2), text)
    return ESCAPE.sub(r"\1", SUBSTITUTION.sub(r"\1", text))


def is_prose(block: list[str]) -> bool:
    first = block[0]
    if first.startswith((" ", "\t", "..", ">>>")) or any(TABLE.match(line) for line in block):
        return False
    return True


def prose_lines(text: str) -> Iterator[str]:
    for block in paragraphs(text):
        block = [line for line in block if not ADORNMENT.match(line)]
        if not block or not is_prose(block):
            continue
        line = plain(" ".join(block))
        letters = sum(character.isalpha() or character == " " for character in line)
        if len(line.split()) >= MIN_WORDS and letters >= MIN_LETTER_SHARE * len(line):
            yield line


def source_files(parts: Iterable[str]) -> list[Path]:
    return [path for part in parts for path in sorted((SOURCES / part).rglob("*.rst.txt"))]


def package_version() -> str:
    result = subprocess.run(["dpkg-query", "-W", "-f=${Version}", PACKAGE], capture_output=True, text=True)
    return result.stdout.strip() if result.returncode == 0 else "unknown"


def write_text(out: Path, name: str, files: list[Path]) -> dict:
    lines = [line for path in files for line in prose_lines(path.read_text(encoding="utf-8"))]
    data = ("\n".join(lines) + "\n").encode("utf-8")
    temporary = out / f".{name}.tmp"
    temporary.write_bytes(data)
    temporary.replace(out / name)
    return {"sources": sorted({str(path.relative_to(SOURCES).parts[0]) for path in files}), "files": len(files),
            "lines": len(lines), "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def build(out: Path) -> None:
    if all((out / name).is_file() for name in (*PARTS, MANIFEST)):
        print(f"build_texts: {out} is complete; nothing to do")
        return
    if not SOURCES.is_dir():
        raise SystemExit(f"build_texts: {SOURCES} is missing (apt-get install {PACKAGE})")
    out.mkdir(parents=True, exist_ok=True)
    manifest = {"package": PACKAGE, "version": package_version(), "root": str(SOURCES)}
    for name, parts in PARTS.items():
        manifest[name] = write_text(out, name, source_files(parts))
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")  # last: its presence means complete
    for name in PARTS:
        print(f"build_texts: {out / name}: {manifest[name]['lines']} lines, {manifest[name]['bytes']:,} bytes")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(f"usage: python {sys.argv[0]} OUT_DIR   ({__doc__.splitlines()[0]})")
    build(Path(sys.argv[1]))
