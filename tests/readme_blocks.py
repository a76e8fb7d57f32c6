"""The fenced code blocks of README.md, as the README harness (tests/test_readme_blocks.py) reads them.

How a block is classified, from the README's own text:

- ```text blocks are prose (diagrams, the layout): never run.
- ```python and ```bash blocks run, unless an HTML comment right before the fence says otherwise:
  ``<!-- readme-test: skip: REASON -->`` (a reason is required) or ``<!-- readme-test: ci: REASON -->``
  (the commands CI itself runs; checked against ``.ci/run``, not run again).
- ``<!-- readme-test: replace: OLD => NEW -->`` (one or more, before the fence) runs the block with OLD
  replaced by NEW: a smaller but equivalent run (fewer steps, fewer processes); OLD must occur in it.
- A block whose first line is ``# continues the block above`` runs after the previous runnable block of
  its language, in one process.
- The block's leading comment lines ``# NAME: what it is`` name the files and directories the reader
  supplies (``path/to/llama``, ``DIR``, ``train.jsonl``, ...); the harness puts a tiny stand-in at each NAME
  in the block's working directory, so the block runs exactly as written.

Any other fence language, an unknown directive or an empty reason is an error: a new block must be
classified before CI accepts it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"

RUNNABLE = ("python", "bash")
PROSE = ("text",)
CONTINUES = "# continues the block above"

_FENCE = re.compile(r"^```(\S*)\s*$")
_DIRECTIVE = re.compile(r"^<!--\s*readme-test:\s*(?P<body>.*?)\s*-->\s*$")
_PLACEHOLDER = re.compile(r"^#\s+(?P<name>[\w./-]+):\s+(?P<what>\S.*)$")


@dataclass
class Block:
    index: int                 # 0-based position among all fenced blocks of the README
    line: int                  # 1-based line of the opening fence
    section: str               # the nearest heading above it
    lang: str
    code: str
    directives: list[str] = field(default_factory=list)
    id: str = ""

    @property
    def skip_reason(self) -> str | None:
        return self._directive("skip")

    @property
    def ci_reason(self) -> str | None:
        return self._directive("ci")

    @property
    def replacements(self) -> list[tuple[str, str]]:
        out = []
        for d in self.directives:
            if d.startswith("replace:"):
                old, sep, new = d[len("replace:"):].partition("=>")
                out.append((old.strip(), new.strip()) if sep else ("", ""))
        return out

    @property
    def continues(self) -> bool:
        return self.code.startswith(CONTINUES)

    @property
    def placeholders(self) -> dict[str, str]:
        """NAME -> what it is, from the block's leading comment lines."""
        found = {}
        for line in self.code.splitlines():
            if not line.startswith("#"):
                break
            m = _PLACEHOLDER.match(line)
            if m:
                found[m["name"]] = m["what"]
        return found

    def _directive(self, kind: str) -> str | None:
        for d in self.directives:
            if d.startswith(kind + ":"):
                return d[len(kind) + 1:].strip()
        return None

    def problems(self) -> list[str]:
        """Why the harness cannot classify this block (empty when it can)."""
        out = []
        if self.lang not in RUNNABLE + PROSE:
            out.append(f"fence language {self.lang!r}: use one of {RUNNABLE + PROSE} (text for prose)")
        for d in self.directives:
            kind = d.split(":", 1)[0]
            if kind not in ("skip", "ci", "replace") or ":" not in d:
                out.append(f"unknown directive {d!r} (skip: REASON, ci: REASON, replace: OLD => NEW)")
        if self.directives and self.lang in PROSE:
            out.append("a text block takes no readme-test directive")
        for kind in ("skip", "ci"):
            if any(d.startswith(kind + ":") for d in self.directives) and not self._directive(kind):
                out.append(f"'{kind}:' needs a reason")
        if self.skip_reason and self.ci_reason:
            out.append("both skip and ci")
        if self.lang == "bash":
            for n, line in enumerate(self.code.splitlines(), 1):
                if re.search(r"\\\s+#", line):
                    out.append(f"line {n}: a comment after '\\' ends the command (the next line runs alone)")
        for old, new in self.replacements:
            if not old or not new:
                out.append("replace needs 'OLD => NEW'")
            elif old not in self.code:
                out.append(f"replace: {old!r} does not occur in the block")
        return out


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def parse(text: str) -> list[Block]:
    """Every fenced block of a markdown text, with its section, directives and a stable id
    (section slug + its index in the section)."""
    lines = text.splitlines()
    blocks: list[Block] = []
    section = "top"
    pending: list[str] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        fence = _FENCE.match(line)
        if fence:
            start = i
            i += 1
            body = []
            while i < len(lines) and lines[i].rstrip() != "```":
                body.append(lines[i])
                i += 1
            if i == len(lines):
                raise ValueError(f"README.md:{start + 1}: the fence is never closed")
            blocks.append(Block(len(blocks), start + 1, section, fence.group(1), "\n".join(body) + "\n",
                                pending))
            pending = []
        elif line.startswith("#"):
            section = line.lstrip("#").strip()
            pending = []
        else:
            directive = _DIRECTIVE.match(line.strip())
            if directive:
                pending = [*pending, directive["body"]]
            elif line.strip():
                pending = []
        i += 1
    per_section: dict[str, int] = {}
    for b in blocks:
        n = per_section[b.section] = per_section.get(b.section, 0) + 1
        b.id = f"{_slug(b.section)}-{n}"
    return blocks


def readme_blocks() -> list[Block]:
    return parse(README.read_text(encoding="utf-8"))


def chain(blocks: list[Block], block: Block) -> list[Block]:
    """``block`` after the blocks it continues, first to last."""
    out = [block]
    while out[0].continues:
        earlier = [b for b in blocks if b.index < out[0].index and b.lang == block.lang
                   and b.skip_reason is None and b.ci_reason is None]
        if not earlier:
            raise ValueError(f"{block.id}: continues a block above, but there is none")
        out.insert(0, earlier[-1])
    return out


def program(blocks: list[Block]) -> str:
    """The code that runs for a chain of blocks: each in turn, its replacements applied."""
    parts = []
    for b in blocks:
        code = b.code
        for old, new in b.replacements:
            code = code.replace(old, new)
        parts.append(code)
    return "\n".join(parts)
