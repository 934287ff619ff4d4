"""The package's shape, checked: no import cycle, no upward import, no import inside a function but
of an optional dependency (with a comment saying so), no function over 60 lines.

Every `import` of build_llm in src/build_llm is read, at module level and inside functions. Each
module has a layer (LAYERS, lowest first; docs/architecture.md draws them); a module may import
its own layer and those below, never one above, and never round in a circle.

Run: python tools/check_imports.py   (exit 1 and one line per problem; `make test` runs it)
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "build_llm"
MAX_FUNCTION_LINES = 60

# Lowest first. A name covers the module and everything under it.
LAYERS = [
    ["errors", "settings"],
    ["config"],
    ["activation", "layer", "mlp", "moe", "attention", "transformer", "gpt", "lora"],
    ["runtime", "sizing", "progress"],
    ["store.fsio"],
    ["data"],
    ["store"],
    ["interop"],
    ["infer"],
    ["train"],
    ["inspect"],
    ["serve", "bench"],
    ["cli", "book", ""],  # "": the package's __init__, the public API
]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(module: str) -> int:
    """The layer of the longest name in LAYERS that covers `module`."""
    best, rank = -1, None
    for i, names in enumerate(LAYERS):
        for name in names:
            covers = module == name or module.startswith(name + ".") or name == ""
            if covers and len(name) > best:
                best, rank = len(name), i
    return rank


def imports(path: Path, module: str):
    """(line, imported build_llm module, inside a function, has a comment) for each import."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    lines = path.read_text(encoding="utf-8").splitlines()
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    package = [p for p in package if p]

    def visit(node, in_function):
        for child in ast.iter_child_nodes(node):
            inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                comment = "#" in lines[child.end_lineno - 1] or "#" in lines[child.lineno - 2 if child.lineno > 1 else 0]
                for target in targets(child, package):
                    yield child.lineno, target, in_function, comment
            yield from visit(child, inner)

    yield from visit(tree, False)


def targets(node, package):
    """The names a statement imports: 'build_llm.x.y' made 'x.y', others as written."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    if node.level:
        base = package[:len(package) - (node.level - 1)]
        module = ".".join(base + ([node.module] if node.module else []))
    else:
        module = node.module or ""
        if module != "build_llm" and not module.startswith("build_llm."):
            return [module]
        module = module.removeprefix("build_llm").removeprefix(".")
    out = []
    for alias in node.names:  # `from build_llm.x import y` may import the module x.y
        sub = f"{module}.{alias.name}" if module else alias.name
        out.append("build_llm:" + (sub if (PACKAGE / sub.replace(".", "/")).with_suffix(".py").exists()
                                   or (PACKAGE / sub.replace(".", "/")).is_dir() else module))
    return out


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected group of more than one module (Tarjan), or a module importing itself."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def strong(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1 or v in graph.get(v, ()):
                out.append(sorted(group))

    sys.setrecursionlimit(10_000)
    for v in sorted(graph):
        if v not in index:
            strong(v)
    return out


def long_functions(path: Path):
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            n = node.end_lineno - node.lineno + 1
            if n > MAX_FUNCTION_LINES:
                yield node.lineno, node.name, n


def problems() -> list[str]:
    found, graph = [], {}
    for path in sorted(PACKAGE.rglob("*.py")):
        module, rel = module_name(path), path.relative_to(PACKAGE.parent)
        graph.setdefault(module, set())
        for line, target, inner, comment in imports(path, module):
            if target.startswith("build_llm:"):
                target = target.removeprefix("build_llm:")
                if target == module:
                    continue
                graph[module].add(target)
                if inner:
                    found.append(f"{rel}:{line}: imports build_llm.{target} inside a function; import it at the top")
                if layer_of(target) > layer_of(module):
                    found.append(f"{rel}:{line}: {module or 'build_llm'} (layer {layer_of(module)}) imports "
                                 f"{target} (layer {layer_of(target)}), a layer above it")
            elif inner and not comment:
                found.append(f"{rel}:{line}: imports {target} inside a function with no comment; import it at the "
                             "top, or say why it is optional")
        for line, name, n in long_functions(path):
            found.append(f"{rel}:{line}: {name} is {n} lines; at most {MAX_FUNCTION_LINES}")
    for group in cycles(graph):
        found.append("import cycle: " + " -> ".join(group))
    return found


if __name__ == "__main__":
    found = problems()
    for line in found:
        print(line)
    print(f"{len(found)} problem(s)" if found else "imports: no cycle, no upward arrow; functions within "
          f"{MAX_FUNCTION_LINES} lines", file=sys.stderr)
    sys.exit(1 if found else 0)
