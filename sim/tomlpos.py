"""Where a key or an array element sits in a TOML text: `tomllib` gives values, never positions.

`key_lines(text)` scans the text once (strings, comments, arrays, inline tables, `[table]` and
`[[array-of-tables]]` headers) and maps every key path it meets to the 1-based line it starts on:
`("cache", "per_layer")`, `("policies", 2)` for the third element of the `policies` array,
`("exclude", 1, "policy")` for a key of the second `[[exclude]]` table. It does not validate
anything (tomllib has already accepted the text); on text it cannot follow it returns what it has.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

Path = tuple[str | int, ...]

_BARE = re.compile(r"[A-Za-z0-9_\-]+")


def _skip_string(text: str, i: int) -> tuple[int, int]:
    """Index just past the string starting at `i`, and the newlines it spans."""
    q = text[i]
    if text.startswith(q * 3, i):
        end = text.find(q * 3, i + 3)
        while end != -1 and q == '"' and _escaped(text, end):
            end = text.find(q * 3, end + 1)
        end = len(text) if end == -1 else end + 3
        while end < len(text) and text[end] == q:  # up to two quotes may close a multi-line string
            end += 1
        return end, text.count("\n", i, end)
    j = i + 1
    while j < len(text) and text[j] != q and text[j] != "\n":
        j += 2 if (q == '"' and text[j] == "\\") else 1
    return min(j + 1, len(text)), 0


def _escaped(text: str, j: int) -> bool:
    n = 0
    while j - 1 - n >= 0 and text[j - 1 - n] == "\\":
        n += 1
    return n % 2 == 1


def _read_key(text: str, i: int) -> tuple[list[str], int] | None:
    """A dotted key starting at `i`; returns its parts and the index after it, or None."""
    parts: list[str] = []
    n = len(text)
    while True:
        while i < n and text[i] in " \t":
            i += 1
        if i >= n:
            return None
        if text[i] in "\"'":
            end, _ = _skip_string(text, i)
            raw = text[i + 1 : end - 1]
            parts.append(raw)
            i = end
        else:
            m = _BARE.match(text, i)
            if not m:
                return None
            parts.append(m.group(0))
            i = m.end()
        while i < n and text[i] in " \t":
            i += 1
        if i < n and text[i] == ".":
            i += 1
            continue
        return parts, i


def key_lines(text: str) -> dict[Path, int]:
    pos: dict[Path, int] = {}
    aot: dict[Path, int] = {}  # array-of-tables: index of the last header seen
    table: Path = ()
    # open containers: [kind, path, index] with kind "table" or "array"
    stack: list[list] = []
    line, i, n = 1, 0, len(text)
    expect_key = True
    value_path: Path = ()

    def mark(path: Path) -> None:
        for k in range(1, len(path) + 1):
            pos.setdefault(path[:k], line)

    while i < n:
        c = text[i]
        if c == "\n":
            line += 1
            i += 1
            if not stack:
                expect_key = True
            continue
        if c in " \t\r":
            i += 1
            continue
        if c == "#":
            j = text.find("\n", i)
            i = n if j == -1 else j
            continue
        if not stack and expect_key and c == "[":
            double = text.startswith("[[", i)
            got = _read_key(text, i + (2 if double else 1))
            if got is None:
                return pos
            parts, j = got
            name: Path = tuple(parts)
            if double:
                idx = aot.get(name, -1) + 1
                aot[name] = idx
                table = (*name, idx)
            else:
                table = name
            mark(table)
            j = text.find("\n", j)
            i = n if j == -1 else j
            continue
        in_table = not stack or stack[-1][0] == "table"
        if expect_key and in_table:
            if c == "}" and stack:
                stack.pop()
                expect_key = False
                i += 1
                continue
            got = _read_key(text, i)
            if got is None:
                return pos
            parts, j = got
            base: Path = table if not stack else stack[-1][1]
            value_path = (*base, *parts)
            mark(value_path)
            if j < n and text[j] == "=":
                j += 1
            i = j
            expect_key = False
            continue
        # a value, or punctuation between values
        if stack and stack[-1][0] == "array" and c not in ",]":
            value_path = (*stack[-1][1], stack[-1][2])
            mark(value_path)
        if c == "{":
            stack.append(["table", value_path, 0])
            expect_key = True
            i += 1
        elif c == "[":
            stack.append(["array", value_path, 0])
            i += 1
        elif c in "]}":
            if stack:
                stack.pop()
            i += 1
        elif c == ",":
            if stack and stack[-1][0] == "array":
                stack[-1][2] += 1
            elif stack:
                expect_key = True
            i += 1
        elif c in "\"'":
            i, nl = _skip_string(text, i)
            line += nl
        else:  # a bare scalar: number, boolean, date
            m = re.compile(r"[^,\]}\s#]+").match(text, i)
            i = m.end() if m else i + 1
    return pos


def line_of(pos: dict[Path, int], loc: Sequence[str | int]) -> int | None:
    """The line of `loc`, or of its nearest enclosing key that has one."""
    path = tuple(loc)
    while path:
        if path in pos:
            return pos[path]
        path = path[:-1]
    return None


def format_loc(loc: Sequence[str | int]) -> str:
    """`('exclude', 1, 'policy')` -> `exclude[1].policy`."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out
