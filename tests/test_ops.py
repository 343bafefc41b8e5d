"""Typed operations: every kind of op is its own class that makes its own work items, so the
executor needs no branch on kinds (a new kind that forgot ``items`` would fail only when a plan
first used it)."""

from __future__ import annotations

import inspect

from qstream import convert
from qstream.plan import ops
from qstream.sources import modelopt as modelopt_source


def op_classes() -> list[type]:
    found = [c for m in (ops, modelopt_source) for _, c in inspect.getmembers(m, inspect.isclass)
             if issubclass(c, ops.Op) and c is not ops.Op]
    return sorted(set(found), key=lambda c: c.__name__)


def test_every_kind_makes_its_own_items():
    classes = op_classes()
    kinds = {c.kind for c in classes}
    assert kinds == {"copy", "cast", "slice", "repack", "dequantize", "fp8", "quantize"}, kinds
    for c in classes:
        assert c.items is not ops.Op.items, f"{c.__name__} does not make its work items"


def test_executor_does_not_branch_on_kinds():
    src = inspect.getsource(convert.Executor._items)
    assert "kind" not in src.split('"""')[-1], src
