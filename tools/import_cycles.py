"""Print the import cycles among patfast's (and kernels') modules, function-level imports included.

Usage: python tools/import_cycles.py [ROOT]   (ROOT: the repository root, default: this file's parent folder's parent)

Edges are what each module names in `import X` / `from X import Y` anywhere in its body, function bodies included
(X.Y when that is a module, else X); the implicit import of a module's parent packages is not an edge. kernels/ is
the package patfast.kernels (setup.py). Prints one line per elementary cycle
(a -> b -> ... -> a) and "no import cycles" when there are none; exits 1 if there are any.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

PACKAGES = {"patfast": "patfast", "kernels": "patfast.kernels"}  # folder -> package name (setup.py's package_dir)


def modules(root: Path) -> dict[str, Path]:
    found = {}
    for folder, package in PACKAGES.items():
        for path in sorted((root / folder).rglob("*.py")):
            parts = [package, *path.relative_to(root / folder).with_suffix("").parts]
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    is_package = path.name == "__init__.py"
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = name.split(".") if is_package else name.split(".")[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            # `from X import m` with X.m a module imports X.m (X itself only as its parent package: no edge)
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        out.update(t for t in targets if t in known and t != name)
    return out


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Elementary cycles, each listed once, starting at its smallest module name."""
    found = []

    def walk(start: str, node: str, path: list[str]) -> None:
        for nxt in sorted(graph[node]):
            if nxt == start:
                found.append([*path, start])
            elif nxt > start and nxt not in path:
                walk(start, nxt, [*path, nxt])

    for start in sorted(graph):
        walk(start, start, [start])
    return found


def main() -> int:
    root = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent.parent
    mods = modules(root)
    graph = {name: imports(name, path, set(mods)) for name, path in mods.items()}
    found = cycles(graph)
    for cycle in found:
        print(" -> ".join(cycle))
    if not found:
        print("no import cycles")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
