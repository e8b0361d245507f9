"""Transform, don't patch: no module of ``lowbit/`` assigns into another module's or library's attributes.

Read from the source with ``ast``. A name is *imported* when an ``import`` binds it (at any depth) or it is
assigned from ``importlib.import_module(...)`` / ``sys.modules[...]``. A patch is a statement that writes
through an imported name: ``name.attr = ...`` (also ``+=``, ``del``, and deeper chains such as
``nn.Linear.forward = ...``), ``name.attr[key] = ...``, or ``setattr(name..., ...)`` / ``delattr(name..., ...)``.
Writes into the model a function was given (``setattr(parent, name, module)``) are lowbit's own transforms
and are not patches. ``os.environ[...]`` is the process environment, a public interface, and is allowed.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "lowbit"
ALLOWED_STORES = {"os.environ"}


def imported_names(tree: ast.AST) -> set[str]:
    """Names an import binds anywhere in ``tree``, and names assigned from a module lookup."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.asname or alias.name.partition(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            names |= {alias.asname or alias.name for alias in node.names}
        elif isinstance(node, ast.Assign) and _is_module_lookup(node.value):
            names |= {target.id for target in node.targets if isinstance(target, ast.Name)}
    return names


def _is_module_lookup(value: ast.expr) -> bool:
    """``importlib.import_module(...)`` / ``import_module(...)`` / ``sys.modules[...]``, also as ``x if c else y``."""
    if isinstance(value, ast.IfExp):
        return _is_module_lookup(value.body) or _is_module_lookup(value.orelse)
    text = ast.unparse(value)
    return text.startswith(("importlib.import_module(", "import_module(", "sys.modules["))


def _root(node: ast.expr) -> ast.expr:
    while isinstance(node, ast.Attribute | ast.Subscript | ast.Call):
        node = node.func if isinstance(node, ast.Call) else node.value
    return node


def _written(target: ast.expr) -> ast.expr | None:
    """The object whose attribute or item ``target`` writes (``a.b`` for ``a.b.c = ...``); None for a name."""
    if isinstance(target, ast.Attribute | ast.Subscript):
        return target
    return None


def find_patches(source: str) -> list[tuple[int, str]]:
    """[(line, description)] of every patch in ``source`` (see the module docstring)."""
    tree = ast.parse(source)
    imported = imported_names(tree)

    def through_import(expression: ast.expr) -> bool:
        root = _root(expression)
        if not (isinstance(root, ast.Name) and root.id in imported):
            return False
        stored = expression.value if isinstance(expression, ast.Subscript) else expression
        return ast.unparse(stored) not in ALLOWED_STORES

    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign | ast.AugAssign | ast.AnnAssign | ast.Delete):
            targets = node.targets if isinstance(node, ast.Assign | ast.Delete) else [node.target]
            for target in targets:
                for element in target.elts if isinstance(target, ast.Tuple | ast.List) else [target]:
                    written = _written(element)
                    if written is not None and through_import(written):
                        verb = "del " if isinstance(node, ast.Delete) else ""
                        found.append((node.lineno, f"{verb}{ast.unparse(element)}"))
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("setattr", "delattr"):
            if node.args and through_import(node.args[0]):
                arguments = ", ".join(ast.unparse(a) for a in node.args[:2])
                value = ", ..." if node.func.id == "setattr" else ""
                found.append((node.lineno, f"{node.func.id}({arguments}{value})"))
    return sorted(found)


def test_lowbit_patches_no_other_module():
    repository = PACKAGE.parent
    found = [f"{path.relative_to(repository).as_posix()}:{line}: {description}"
             for path in sorted(PACKAGE.rglob("*.py")) for line, description in find_patches(path.read_text())]
    assert not found, "assignments into other modules' attributes:\n" + "\n".join(found)


PLANTED = '''
import importlib
import os
import sys
import torch
from torch import nn
import transformers.modeling_utils as modeling_utils

nn.Linear.forward = lambda self, x: x
torch.backends.cuda.matmul.allow_tf32 = True
modeling_utils.caching_allocator_warmup = None
transformers_registry = None

def load(parent, name, module):
    mod = importlib.import_module("transformers.integrations") if "transformers" in sys.modules else None
    setattr(mod, "replace_with_bnb_linear", None)
    delattr(nn, "GELU")
    del modeling_utils.PreTrainedModel.save_pretrained
    nn.functional.__dict__["gelu"] = None
    torch.x, y = 1, 2
    os.environ["HF_DEACTIVATE_ASYNC_LOAD"] = "1"
    setattr(parent, name, module)
    parent.weight = None
    module.original_class = type(parent)
    transformers_registry = {}
    transformers_registry["lowbit"] = module
'''


def test_planted_patches_are_found_and_named():
    found = find_patches(PLANTED)
    assert found == [
        (9, "nn.Linear.forward"),
        (10, "torch.backends.cuda.matmul.allow_tf32"),
        (11, "modeling_utils.caching_allocator_warmup"),
        (16, "setattr(mod, 'replace_with_bnb_linear', ...)"),
        (17, "delattr(nn, 'GELU')"),
        (18, "del modeling_utils.PreTrainedModel.save_pretrained"),
        (19, "nn.functional.__dict__['gelu']"),
        (20, "torch.x"),
    ]
