"""mutmut 3.8.1 that also mutates the functions under ``@torch.no_grad()`` (and the marker
``@torch.compiler.assume_constant_result``): ``python tests/mutmut_run.py run|results|show ...``.

mutmut skips every decorated function except ``@staticmethod``/``@classmethod``
(mutmut/mutation/file_mutation.py, ``MutationVisitor._skip_node_and_children``), because a
decorator may have side effects when the function is defined (a route registered twice) or
break the trampoline (``@property``). Neither holds for these two: they only wrap the call (or
mark the function), and mutmut keeps a function's decorators on its trampoline and on every
mutant copy. Without this the allocator's ``mask_to_budget`` and ``compact``, the scorer's
``update`` and ``flat_scores``, ``orthogonality_grad_``, the layers' ``set_factors``, ``merge``,
``unmerge``, ``resize`` and ``expand``, ``load_adapters`` and ``export_lora`` get no mutant at all.

Still not mutated: ``@property`` (the adapters' ``rank``: it breaks the trampoline) and
``@functools.lru_cache`` (``regularizer._padding_cached``: mutant processes are forked from one
whose cache the clean test run filled, so cached results would hide the mutants).
"""
from __future__ import annotations

import sys

import libcst as cst
from mutmut.mutation import file_mutation as fm

TRANSPARENT = {"torch.no_grad()", "torch.compiler.assume_constant_result"}
_EMPTY = cst.Module(body=[])
_skip = fm.MutationVisitor._skip_node_and_children


def _skip_node_and_children(self, node: cst.CSTNode) -> bool:
    if isinstance(node, cst.FunctionDef) and node.decorators and all(
            _EMPTY.code_for_node(d.decorator).strip() in TRANSPARENT for d in node.decorators):
        # Judge it as the undecorated function; its decorator nodes are still never mutated.
        return _skip(self, node.with_changes(decorators=[]))
    return _skip(self, node)


def main() -> None:
    fm.MutationVisitor._skip_node_and_children = _skip_node_and_children
    from mutmut.__main__ import cli
    sys.argv[0] = "mutmut"
    cli()


if __name__ == "__main__":
    main()
