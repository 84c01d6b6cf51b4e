"""python/lserve/_C.pyi (shipped type stubs) names what the built module exposes: every public
function, class and class member, no more and no fewer. Regenerate with scripts/gen_stubs.sh."""
from __future__ import annotations

import ast
import inspect
import pathlib

import pytest

_C = pytest.importorskip("lserve._C")
STUB = pathlib.Path(__file__).resolve().parents[1] / "python" / "lserve" / "_C.pyi"


def _members(node):
    names = set()
    for item in node.body:
        if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)):
            names.add(item.name)
        elif isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
            names.add(item.target.id)
        elif isinstance(item, ast.Assign):
            names.update(target.id for target in item.targets if isinstance(target, ast.Name))
    return {name for name in names if not name.startswith("_")}


def _stub_names():
    names = {}
    for node in ast.parse(STUB.read_text()).body:
        if isinstance(node, ast.ClassDef):
            names[node.name] = _members(node)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            names[node.name] = None
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.target.id != "__all__":
            names[node.target.id] = None
    return names


def test_stub_matches_module():
    stub = _stub_names()
    public = {name for name in dir(_C) if not name.startswith("_")}
    assert set(stub) == public, (f"_C.pyi is stale (run scripts/gen_stubs.sh): missing {sorted(public - set(stub))}, "
                                 f"extra {sorted(set(stub) - public)}")
    for name, members in stub.items():
        obj = getattr(_C, name)
        if members is None or not inspect.isclass(obj):
            continue
        actual = {member for member in vars(obj) if not member.startswith("_")}
        assert members == actual, (f"_C.pyi is stale for {name} (run scripts/gen_stubs.sh): missing "
                                   f"{sorted(actual - members)}, extra {sorted(members - actual)}")
