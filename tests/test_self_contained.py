"""The repository speaks of itself only: no file points outside it.

Every tracked text file (``git ls-files``, new files git does not ignore included; binary files and
safetensors skipped, and in notebooks the lines holding base64 image data) is scanned for:

* paths outside the repository: a machine's home or work folders, a sibling ``shared`` folder, a
  ``reference/<name>.md`` or design notes that are not part of the repository;
* the labels of the work that produced it: "session 3", "issue 8", "ticket", "the brief", and in
  docs/ and benchmarks/ also "#12" and "S4"-style labels (there "#" starts no Python comment or
  colour code).

URLs are removed from a line before it is checked, so a public link that happens to hold a number or
a path (an issue of PyTorch's on GitHub, say) is allowed. Failures name file:line and the text.
"""
import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
THIS = Path(__file__).resolve().relative_to(REPO).as_posix()

URL = re.compile(r"\b(?:https?|ftp)://\S+")
IMAGE_DATA = re.compile(r'"image/[a-z+]+"\s*:')   # base64 outputs in .ipynb files

# (why it is wrong, pattern); the letters are split so that this file does not match itself
EVERYWHERE = [
    ("design notes outside the repository (use docs/architecture.md)",
     re.compile(r"DESIGN" r"\.md")),
    ("a folder beside the repository", re.compile(r"\.\./" r"shared\b")),
    ("a machine path", re.compile(r"(?<![\w.])/(?:work|root|home)/")),
    ("a reference file outside the repository (name the public source)",
     re.compile(r"\breference/[\w.-]+\." r"md\b")),
    ("a work-session label", re.compile(r"\bsess" r"ion\s+\d+", re.IGNORECASE)),
    ("an issue number", re.compile(r"\biss" r"ue\s*#?\d+", re.IGNORECASE)),
    ("a ticket", re.compile(r"\btick" r"ets?\b", re.IGNORECASE)),
    ("a brief", re.compile(r"\bthe bri" r"ef(?:'s)?\b", re.IGNORECASE)),
]
DOCS_AND_BENCHMARKS = [
    ("a ticket number", re.compile(r"(?<![\w&/#])#\d+\b")),
    ("a work-round label", re.compile(r"\bS\d+\b|\bro" r"und\s+\d+\b", re.IGNORECASE)),
]


def _tracked_text_files():
    try:
        # tracked files, and new ones not yet committed that git does not ignore
        out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                             cwd=REPO, capture_output=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout: git ls-files is needed to list the tracked files")
    for name in out.stdout.decode().split("\0"):
        path = REPO / name
        if not name or name == THIS or name.endswith(".safetensors") or not path.is_file():
            continue
        data = path.read_bytes()
        if b"\0" in data:
            continue
        try:
            yield name, data.decode("utf-8")
        except UnicodeDecodeError:
            continue


def _findings():
    found = []
    for name, text in _tracked_text_files():
        strict = name.startswith(("docs/", "benchmarks/"))
        patterns = EVERYWHERE + (DOCS_AND_BENCHMARKS if strict else [])
        for lineno, line in enumerate(text.splitlines(), 1):
            if IMAGE_DATA.search(line):
                continue
            line = URL.sub("", line)
            for why, pattern in patterns:
                m = pattern.search(line)
                if m:
                    found.append(f"{name}:{lineno}: {why}: {m.group(0)!r}")
    return found


def test_no_file_points_outside_the_repository():
    found = _findings()
    assert not found, "\n".join(found)


@pytest.mark.parametrize("line, flagged", [
    ("see DESIGN" ".md for the rules", True),
    ("the spec in ../" "shared/API.md", True),
    ("loaded from /ho" "me/alice/model.gguf", True),
    ("as reference/peft-format" ".md says", True),
    ("measured in sess" "ion 3", True),
    ("the sizes of iss" "ue 8", True),
    ("fixes iss" "ue #12", True),
    ("run only the reference composites (minilora.reference())", False),
    ("with reference mode on, MINILORA_REFERENCE=1", False),
    ("https://github.com/pytorch/pytorch/iss" "ues/12345 explains it", False),
    ("the file at /proc/stat gives CPU steal", False),
])
def test_patterns_flag_outside_references_and_spare_ordinary_text(line, flagged):
    hit = any(p.search(URL.sub("", line)) for _, p in EVERYWHERE)
    assert hit == flagged, line


@pytest.mark.parametrize("line, flagged", [
    ("fixed in #" "12", True),
    ("the S" "4 figures", True),
    ("measured in ro" "und 3", True),
    ("5 rounds, steal 0.4%", False),
    ("## Autograd engine", False),
    ("colour &#" "39; entity", False),
])
def test_docs_patterns(line, flagged):
    hit = any(p.search(URL.sub("", line)) for _, p in DOCS_AND_BENCHMARKS)
    assert hit == flagged, line
