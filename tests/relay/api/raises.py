"""Which error codes a function can raise, derived from the source by an AST walk over its call graph.

The index covers ``relay/`` and ``protocol/`` (not the client SDK). A
function's codes are the ``ErrorCode`` members it names (``ErrorCode.X`` or
an alias such as ``E.X``) — except in comparisons (``exc.code is
ErrorCode.X``) and as ``.value`` strings, which report a code rather than
raise it — plus the codes of every function it calls or passes on. Calls
are resolved statically:

- plain names through the module's own definitions and its imports
  (re-exports followed), a class name meaning its ``__init__``;
- ``module.f`` for imported modules;
- ``obj.m`` by the type of ``obj``: ``self``, annotated parameters and
  locals, ``self.attr`` typed by its annotation or by the annotated
  ``__init__`` parameter assigned to it, and method return annotations;
  a ``typing.Protocol`` stands for every class of its package that defines
  the method (the SQLite and PostgreSQL stores for ``Store``).

What cannot be resolved (a callable in a dict, ``getattr``) is not
followed: the walk under-approximates there, and over-approximates in
that it ignores which ``except`` clause swallows what. Nested functions
belong to the function they are defined in.
"""

from __future__ import annotations

import ast
from collections.abc import Collection, Iterator
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

from protocol.errors import ErrorCode

ROOT = Path(__file__).resolve().parents[3]
PACKAGES = ("relay", "protocol")
EXCLUDED = ("protocol.client",)
ERROR_CODE = "protocol.errors.ErrorCode"


@dataclass
class Module:
    name: str
    tree: ast.Module
    is_package: bool
    imports: dict[str, str] = field(default_factory=dict)  # local name -> qualified name
    defined: set[str] = field(default_factory=set)  # qualified names of top-level functions and classes


@dataclass
class Function:
    qualname: str
    node: ast.FunctionDef | ast.AsyncFunctionDef
    module: Module
    owner: Class | None


@dataclass
class Class:
    qualname: str
    node: ast.ClassDef
    module: Module
    bases: list[str] = field(default_factory=list)
    methods: dict[str, Function] = field(default_factory=dict)
    attributes: dict[str, ast.expr] = field(default_factory=dict)  # attribute -> annotation or constructor

    @property
    def is_protocol(self) -> bool:
        return any(base.rsplit(".", 1)[-1] == "Protocol" for base in self.bases)


class Index:
    """Every module, class and function of the server and the protocol, parsed once."""

    def __init__(self) -> None:
        self.modules: dict[str, Module] = {}
        self.functions: dict[str, Function] = {}
        self.classes: dict[str, Class] = {}
        for package in PACKAGES:
            for path in sorted((ROOT / package).rglob("*.py")):
                parts = list(path.relative_to(ROOT).with_suffix("").parts)
                is_package = parts[-1] == "__init__"
                if is_package:
                    parts.pop()
                name = ".".join(parts)
                if name.startswith(EXCLUDED):
                    continue
                self.modules[name] = Module(name, ast.parse(path.read_text(), str(path)), is_package)
        for module in self.modules.values():
            self._read_module(module)
        for cls in self.classes.values():
            cls.bases = [q for q in (self.qualify_expr(cls.module, b) for b in cls.node.bases) if q]
            self._read_attributes(cls)

    # -- indexing ------------------------------------------------------------------

    def _read_module(self, module: Module) -> None:
        package = module.name if module.is_package else module.name.rpartition(".")[0]
        for node in module.tree.body:
            if isinstance(node, ast.Import | ast.ImportFrom):
                self._read_module_imports(module, node, package)
            elif isinstance(node, ast.If):  # `if TYPE_CHECKING:` imports count: they name types
                for inner in node.body:
                    if isinstance(inner, ast.ImportFrom | ast.Import):
                        self._read_module_imports(module, inner, package)
            elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                qualname = f"{module.name}.{node.name}"
                self.functions[qualname] = Function(qualname, node, module, None)
                module.defined.add(qualname)
            elif isinstance(node, ast.ClassDef):
                qualname = f"{module.name}.{node.name}"
                cls = Class(qualname, node, module)
                self.classes[qualname] = cls
                module.defined.add(qualname)
                for item in node.body:
                    if isinstance(item, ast.FunctionDef | ast.AsyncFunctionDef):
                        fn = Function(f"{qualname}.{item.name}", item, module, cls)
                        cls.methods[item.name] = fn
                        self.functions[fn.qualname] = fn
            elif isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
                target = self.qualify_expr(module, node.value) if isinstance(node.value, ast.Name) else None
                if target:  # `E = ErrorCode`: an alias
                    module.imports[node.targets[0].id] = target

    def _read_module_imports(self, module: Module, node: ast.Import | ast.ImportFrom, package: str) -> None:
        if isinstance(node, ast.Import):
            for alias in node.names:
                module.imports[alias.asname or alias.name.split(".")[0]] = (
                    alias.name if alias.asname else alias.name.split(".")[0]
                )
            return
        base = node.module or ""
        if node.level:
            anchor = package.split(".")
            anchor = anchor[: len(anchor) - (node.level - 1)]
            base = ".".join([*anchor, base] if base else anchor)
        for alias in node.names:
            module.imports[alias.asname or alias.name] = f"{base}.{alias.name}"

    def _read_attributes(self, cls: Class) -> None:
        for item in cls.node.body:
            if isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
                cls.attributes[item.target.id] = item.annotation
        init = cls.methods.get("__init__")
        if init is None:
            return
        params = {a.arg: a.annotation for a in _arguments(init.node) if a.annotation is not None}
        for node in ast.walk(init.node):
            targets: list[ast.expr] = []
            value: ast.expr | None = None
            if isinstance(node, ast.Assign):
                targets, value = node.targets, node.value
            elif isinstance(node, ast.AnnAssign):
                targets, value = [node.target], None
                if _is_self_attribute(node.target):
                    cls.attributes.setdefault(node.target.attr, node.annotation)  # type: ignore[union-attr]
                    continue
            for target in targets:
                if not _is_self_attribute(target) or value is None:
                    continue
                name = target.attr  # type: ignore[attr-defined]
                for candidate in _operands(value):
                    if isinstance(candidate, ast.Name) and candidate.id in params:
                        cls.attributes.setdefault(name, params[candidate.id])
                    elif isinstance(candidate, ast.Call):
                        cls.attributes.setdefault(name, candidate.func)

    # -- names and types -----------------------------------------------------------------

    def resolve(self, qualname: str, depth: int = 0) -> str | None:
        """The qualified name where ``qualname`` is defined (following re-exports), if it is in the index."""
        if qualname in self.functions or qualname in self.classes or qualname in self.modules:
            return qualname
        if depth > 8:
            return None
        owner, _, name = qualname.rpartition(".")
        module = self.modules.get(owner)
        if module is not None and name in module.imports:
            return self.resolve(module.imports[name], depth + 1)
        outer = self.resolve(owner, depth + 1) if owner else None
        if outer in self.classes:
            return self.resolve(f"{outer}.{name}", depth + 1)
        return qualname if qualname == ERROR_CODE else None

    def qualify_expr(self, module: Module, node: ast.expr) -> str | None:
        """The qualified name a Name/Attribute expression refers to at module level."""
        if isinstance(node, ast.Name):
            if node.id in module.imports:
                return self.resolve(module.imports[node.id]) or module.imports[node.id]
            local = f"{module.name}.{node.id}"
            return local if local in module.defined else None
        if isinstance(node, ast.Attribute):
            base = self.qualify_expr(module, node.value)
            if base and (base in self.modules or base in self.classes):
                return self.resolve(f"{base}.{node.attr}") or f"{base}.{node.attr}"
        if isinstance(node, ast.Subscript):  # Optional[X], list[X]: the outer name is enough for us
            return self.qualify_expr(module, node.value)
        return None

    def classes_of(self, module: Module, annotation: ast.expr | None) -> list[Class]:
        """The indexed classes an annotation (or constructor expression) names; ``X | None`` gives X."""
        if annotation is None:
            return []
        found: list[Class] = []
        for operand in _operands(annotation):
            if isinstance(operand, ast.Constant) and isinstance(operand.value, str):
                try:
                    operand = ast.parse(operand.value, mode="eval").body
                except SyntaxError:
                    continue
            qualname = self.qualify_expr(module, operand)
            if qualname in self.classes:
                found.append(self.classes[qualname])
        return found

    def mro(self, cls: Class) -> Iterator[Class]:
        seen: set[str] = set()
        todo = [cls]
        while todo:
            current = todo.pop(0)
            if current.qualname in seen:
                continue
            seen.add(current.qualname)
            yield current
            todo += [self.classes[b] for b in current.bases if b in self.classes]

    def methods_named(self, cls: Class, name: str) -> list[Function]:
        """``cls.name`` by the MRO; for a Protocol, every implementation in its package."""
        for current in self.mro(cls):
            if name in current.methods and not current.is_protocol:
                return [current.methods[name]]
        if any(c.is_protocol for c in self.mro(cls)):
            package = cls.module.name.split(".")[:2]
            return [
                other.methods[name]
                for other in self.classes.values()
                if name in other.methods and not other.is_protocol and other.module.name.split(".")[:2] == package
            ]
        return []

    def attribute_classes(self, cls: Class, name: str) -> list[Class]:
        for current in self.mro(cls):
            if name in current.attributes:
                return self.classes_of(current.module, current.attributes[name])
            if name in current.methods:  # a property: its return annotation
                return self.classes_of(current.module, current.methods[name].node.returns)
        return []


def _arguments(node: ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda) -> list[ast.arg]:
    args = node.args
    return [*args.posonlyargs, *args.args, *args.kwonlyargs]


def _is_self_attribute(node: ast.expr) -> bool:
    return isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "self"


def _operands(node: ast.expr) -> list[ast.expr]:
    """``a | b`` and ``a or b`` split into their sides; anything else as itself."""
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitOr):
        return [*_operands(node.left), *_operands(node.right)]
    if isinstance(node, ast.BoolOp):
        return [operand for value in node.values for operand in _operands(value)]
    return [node]


class _Scope:
    """Type knowledge inside one function: ``self``, annotated parameters and locals."""

    def __init__(self, index: Index, fn: Function) -> None:
        self.index = index
        self.fn = fn
        self.locals: dict[str, list[Class]] = {}
        for node in ast.walk(fn.node):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
                for arg in _arguments(node):
                    if arg.annotation is not None:
                        self.locals.setdefault(arg.arg, index.classes_of(fn.module, arg.annotation))
            elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                self.locals.setdefault(node.target.id, index.classes_of(fn.module, node.annotation))
            elif isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
                types = self.types_of(node.value)
                if types:
                    self.locals.setdefault(node.targets[0].id, types)

    def types_of(self, node: ast.expr) -> list[Class]:
        index = self.index
        if isinstance(node, ast.Name):
            if node.id == "self" and self.fn.owner is not None:
                return [self.fn.owner]
            if node.id in self.locals:
                return self.locals[node.id]
            return []
        if isinstance(node, ast.Await):
            return self.types_of(node.value)
        if isinstance(node, ast.Attribute):
            return [c for owner in self.types_of(node.value) for c in index.attribute_classes(owner, node.attr)]
        if isinstance(node, ast.Call):
            types: list[Class] = []
            for target in self.targets(node.func):
                if target.node.name == "__init__" and target.owner is not None:
                    types.append(target.owner)
                else:
                    types += index.classes_of(target.module, target.node.returns)
            return types
        return []

    def targets(self, node: ast.expr) -> list[Function]:
        """The functions a Name/Attribute expression can refer to (a class stands for its constructor)."""
        index = self.index
        module = self.fn.module
        qualname: str | None = None
        if isinstance(node, ast.Name):
            if node.id in self.locals or node.id == "self":
                return []
            qualname = index.qualify_expr(module, node)
        elif isinstance(node, ast.Attribute):
            if (
                isinstance(node.value, ast.Call)
                and isinstance(node.value.func, ast.Name)
                and node.value.func.id == "super"
            ):
                owner = self.fn.owner
                bases = [index.classes[b] for b in owner.bases if b in index.classes] if owner else []
                return [m for base in bases for m in index.methods_named(base, node.attr)]
            qualname = index.qualify_expr(module, node)
            if qualname is None:
                return [m for owner in self.types_of(node.value) for m in index.methods_named(owner, node.attr)]
        if qualname in index.functions:
            return [index.functions[qualname]]
        if qualname in index.classes:
            cls = index.classes[qualname]
            return [m for name in ("__init__", "__post_init__") for m in index.methods_named(cls, name)]
        return []


@dataclass(frozen=True)
class Summary:
    codes: frozenset[ErrorCode]
    callees: tuple[str, ...]


class Analysis:
    """Per-function summaries and their transitive closure."""

    def __init__(self) -> None:
        self.index = Index()
        self._summaries: dict[str, Summary] = {}

    def summary(self, fn: Function) -> Summary:
        cached = self._summaries.get(fn.qualname)
        if cached is not None:
            return cached
        scope = _Scope(self.index, fn)
        parents = {child: parent for parent in ast.walk(fn.node) for child in ast.iter_child_nodes(parent)}
        codes: set[ErrorCode] = set()
        callees: dict[str, None] = {}

        def visit(node: ast.AST, caught: bool) -> None:
            # ``caught``: inside the body of a ``try`` whose handlers catch every TetherlessError without
            # re-raising it, so what is raised there does not leave this function (the handlers may raise
            # other codes; they are visited as not caught).
            if isinstance(node, ast.Try | ast.TryStar):
                swallows = self._swallows(fn.module, node.handlers)
                for statement in node.body:
                    visit(statement, caught or swallows)
                for other in [*node.handlers, *node.orelse, *node.finalbody]:
                    visit(other, caught)
                return
            if (
                isinstance(node, ast.Attribute)
                and node.attr in ErrorCode.__members__
                and self.index.qualify_expr(fn.module, node.value) == ERROR_CODE
            ):
                if not caught and _raised(node, parents):
                    codes.add(ErrorCode[node.attr])
                return
            if not caught and isinstance(node, ast.Name | ast.Attribute) and isinstance(node.ctx, ast.Load):
                for target in scope.targets(node):
                    if target.qualname != fn.qualname:
                        callees[target.qualname] = None
            for child in ast.iter_child_nodes(node):
                visit(child, caught)

        visit(fn.node, False)
        result = Summary(frozenset(codes), tuple(callees))
        self._summaries[fn.qualname] = result
        return result

    def _swallows(self, module: Module, handlers: list[ast.ExceptHandler]) -> bool:
        """Whether these handlers catch every TetherlessError and none re-raises what it caught."""
        catches = False
        for handler in handlers:
            types = handler.type.elts if isinstance(handler.type, ast.Tuple) else [handler.type]
            for kind in types:
                if kind is None or (isinstance(kind, ast.Name) and kind.id in ("Exception", "BaseException")):
                    catches = True
                else:
                    catches = catches or self.index.qualify_expr(module, kind) == "protocol.errors.TetherlessError"
            for node in ast.walk(handler):
                if isinstance(node, ast.Raise) and (
                    node.exc is None or (isinstance(node.exc, ast.Name) and node.exc.id == handler.name)
                ):
                    return False
        return catches

    def codes(self, qualname: str, skip: Collection[tuple[str, str]] = ()) -> frozenset[ErrorCode]:
        """Every code ``qualname`` (a function or method) can raise, itself or through its callees."""
        return self.reach(qualname, skip)[0]

    def reach(
        self, qualname: str, skip: Collection[tuple[str, str]] = ()
    ) -> tuple[frozenset[ErrorCode], frozenset[str]]:
        """(codes, functions reached) from ``qualname``; an edge (caller, callee) in ``skip`` is not followed.

        A caller of ``"*"`` skips the callee from every caller.
        """
        start = self.index.resolve(qualname)
        if start not in self.index.functions:
            raise KeyError(f"{qualname} is not a function in relay/ or protocol/")
        seen = {start}
        todo = [start]
        codes: set[ErrorCode] = set()
        while todo:
            current = todo.pop()
            summary = self.summary(self.index.functions[current])
            codes |= summary.codes
            for callee in summary.callees:
                if callee not in seen and (current, callee) not in skip and ("*", callee) not in skip:
                    seen.add(callee)
                    todo.append(callee)
        return frozenset(codes), frozenset(seen)


def _raised(node: ast.Attribute, parents: dict[ast.AST, ast.AST]) -> bool:
    """False where a code is only reported or compared, not raised: ``X.value``, ``exc.code is X``."""
    parent = parents.get(node)
    if isinstance(parent, ast.Attribute):
        return False
    while parent is not None and not isinstance(parent, ast.stmt):
        if isinstance(parent, ast.Compare):
            return False
        parent = parents.get(parent)
    return True


@cache
def analysis() -> Analysis:
    return Analysis()


def explain(qualname: str, code: ErrorCode, skip: Collection[tuple[str, str]] = ()) -> list[str]:
    """A shortest call chain from ``qualname`` to a function that names ``code`` (for failure messages)."""
    a = analysis()
    start = a.index.resolve(qualname)
    assert start is not None
    previous: dict[str, str | None] = {start: None}
    todo = [start]
    while todo:
        current = todo.pop(0)
        summary = a.summary(a.index.functions[current])
        if code in summary.codes:
            chain: list[str] = []
            at: str | None = current
            while at is not None:
                chain.append(at)
                at = previous[at]
            return chain[::-1]
        for callee in summary.callees:
            if callee not in previous and (current, callee) not in skip and ("*", callee) not in skip:
                previous[callee] = current
                todo.append(callee)
    return []
