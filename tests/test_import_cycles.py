"""No import circles among patfast's modules (function-level imports included), as tools/import_cycles.py finds them.

KNOWN are the circles left to their owners (#13 "The house", item 3); take one out of KNOWN when it is broken.
"""

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
KNOWN_PACKAGES: tuple[str, ...] = ()  # bench/__init__ <-> its submodules: broken (bench/measure.py)
KNOWN: set[tuple[str, ...]] = set()  # train/loop <-> teacher_cache: broken (the loop passes its run in)


def _script():
    spec = importlib.util.spec_from_file_location("import_cycles", ROOT / "tools" / "import_cycles.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_no_new_import_cycles():
    script = _script()
    mods = script.modules(ROOT)
    graph = {name: script.imports(name, path, set(mods)) for name, path in mods.items()}
    new = [c for c in script.cycles(graph)
           if not all(m.startswith(KNOWN_PACKAGES) for m in c) and tuple(sorted(set(c))) not in KNOWN]
    assert not new, "import cycles: " + "; ".join(" -> ".join(c) for c in new)


def test_the_script_sees_a_function_level_circle(tmp_path):
    script = _script()
    (tmp_path / "patfast").mkdir()
    (tmp_path / "kernels").mkdir()
    (tmp_path / "patfast" / "__init__.py").write_text("")
    (tmp_path / "patfast" / "a.py").write_text("from patfast import b\n")
    (tmp_path / "patfast" / "b.py").write_text("def f():\n    from patfast.a import x\n")
    mods = script.modules(tmp_path)
    graph = {name: script.imports(name, path, set(mods)) for name, path in mods.items()}
    assert script.cycles(graph) == [["patfast.a", "patfast.b", "patfast.a"]]
