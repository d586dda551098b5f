"""The type stubs of the generated modules (``manualgrad/functional.pyi``, ``manualgrad/nn/__init__.pyi``) declare
what the registry generates: the same names, with the same signatures."""

from __future__ import annotations

import ast
import inspect

import pytest
import torch

import manualgrad.functional as MF
import manualgrad.nn as mnn
from manualgrad import _stubs
from manualgrad.registry import ops


@pytest.mark.parametrize("key", sorted(_stubs.PATHS))
def test_the_stub_is_what_the_registry_generates(key):
    written = _stubs.PATHS[key].read_text()
    assert _stubs.same(written, _stubs.stubs()[key]), f"{_stubs.PATHS[key]} is stale: run python -m manualgrad._stubs"


def _declared(key: str) -> dict[str, ast.AST]:
    tree = ast.parse(_stubs.PATHS[key].read_text())
    return {node.name: node for node in tree.body if isinstance(node, (ast.FunctionDef, ast.ClassDef))}


def test_every_functional_is_declared_with_its_parameters():
    declared = _declared("functional")
    for op in ops():
        node = declared[op.name]
        names = [a.arg for a in node.args.args]
        assert names == list(inspect.signature(getattr(MF, op.name)).parameters), op.name


def test_every_twin_is_declared_as_a_subclass_of_its_torch_module():
    declared = _declared("nn")
    twins = {op.module.__name__ for op in ops() if op.module is not None}
    assert twins <= set(declared) and "MLP" in declared
    for name in twins:
        (base,) = declared[name].bases
        assert ast.unparse(base) == f"torch.nn.{name}"
        assert issubclass(getattr(mnn, name), getattr(torch.nn, name))
    mlp = {n.name: [a.arg for a in n.args.args] for n in declared["MLP"].body if isinstance(n, ast.FunctionDef)}
    assert mlp["__init__"] == list(inspect.signature(mnn.MLP.__init__).parameters)


def test_a_stale_stub_is_told_apart():
    """The comparison sees a parameter added, not only a name missing."""
    text = _stubs.stubs()["functional"]
    changed = text.replace("def relu(input: Tensor, inplace=False)", "def relu(input: Tensor, inplace=False, x=1)")
    assert changed != text and not _stubs.same(text, changed)
