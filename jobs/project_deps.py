"""The dependency lists of a pyproject.toml, on any Python >= 3.10, with the standard library only.

Why not just `tomllib`: it arrived in Python 3.11, and `scripts/ensure_venv.sh` runs this file
with the machine's own python3 before any environment exists (3.10 on Ubuntu 22.04). On 3.11+
tomllib reads the file; on 3.10 a small reader handles the subset pyproject files use for these
lists (arrays of double-quoted strings, comments, trailing commas).

    python3 jobs/project_deps.py pyproject.toml            # one requirement a line (+ test, deploy)
    python3 jobs/project_deps.py pyproject.toml --key      # a hash naming the environment
"""
from __future__ import annotations

import hashlib
import json
import re
import sys
from pathlib import Path

_TABLE = re.compile(r"^\s*\[([^\]]+)\]\s*$")
_ARRAY_START = re.compile(r"^([A-Za-z0-9_.-]+)\s*=\s*\[", re.M)


def _without_comments(text: str) -> str:
    """Drop `# ...` outside double-quoted strings, line by line."""
    lines = []
    for line in text.splitlines():
        in_string, cut = False, len(line)
        for i, ch in enumerate(line):
            if ch == '"':
                in_string = not in_string
            elif ch == "#" and not in_string:
                cut = i
                break
        lines.append(line[:cut])
    return "\n".join(lines)


def _tables(text: str) -> dict[str, str]:
    """{table name: its body} of a TOML document (top-level tables only)."""
    tables, name, body = {}, "", []
    for line in _without_comments(text).splitlines():
        match = _TABLE.match(line)
        if match:
            tables[name] = "\n".join(body)
            name, body = match.group(1).strip(), []
        else:
            body.append(line)
    tables[name] = "\n".join(body)
    return tables


def _arrays(body: str) -> dict[str, list[str]]:
    """{key: strings} of every `key = [ "a", "b", ]` in a table body (brackets inside the
    strings, as in "ray[data]==2.60.0", do not end the array)."""
    found = {}
    for match in _ARRAY_START.finditer(body):
        items, in_string, current = [], False, []
        for ch in body[match.end():]:
            if in_string:
                if ch == '"':
                    items.append("".join(current))
                    in_string, current = False, []
                else:
                    current.append(ch)
            elif ch == '"':
                in_string = True
            elif ch == "]":
                break
        found[match.group(1)] = items
    return found


def read(path: str | Path, use_tomllib: bool = True) -> tuple[list[str], dict[str, list[str]]]:
    """(project dependencies, optional dependencies by extra) of a pyproject.toml."""
    text = Path(path).read_text()
    if use_tomllib:
        try:
            import tomllib
        except ImportError:  # Python 3.10
            pass
        else:
            project = tomllib.loads(text).get("project", {})
            return list(project.get("dependencies", [])), dict(
                project.get("optional-dependencies", {}))
    tables = _tables(text)
    return (_arrays(tables.get("project", "")).get("dependencies", []),
            _arrays(tables.get("project.optional-dependencies", "")))


def environment_key(path: str | Path) -> str:
    """Names an environment by what it holds: the dependency lists and the Python version."""
    deps, extras = read(path)
    blob = json.dumps([deps, extras, list(sys.version_info[:2])], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


if __name__ == "__main__":
    pyproject = sys.argv[1] if len(sys.argv) > 1 else "pyproject.toml"
    if "--key" in sys.argv:
        print(environment_key(pyproject))
    else:
        deps, extras = read(pyproject)
        print("\n".join(deps + extras.get("test", []) + extras.get("deploy", [])))
