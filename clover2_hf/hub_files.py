"""The code files a drafter folder carries, so that it loads AND decodes without the clover2-hf package.

A saved drafter (`Clover2ForDrafting.save_pretrained`, or `python -m clover2_hf.hub_files <dir>` for an
existing folder) holds::

    config.json, model.safetensors, README.md
    configuration_clover2.py, modeling_clover2.py       AutoConfig / AutoModel with trust_remote_code=True
    custom_generate/generate.py                           generate(custom_generate=<dir or repo>, trust_remote_code=True)
    custom_generate/decoding.py, tree.py, ...             what generate.py imports, transitively

Every code file is a copy of one of the package's core modules, computed when it is written: the set starts from
the modules the two entry points need (`configuration_clover2`, `modeling_clover2` for the model;
`remote_generate` -> `custom_generate/generate.py`, `decoding`, `tree` for decoding) and follows their relative
imports (`from .x import ...`) transitively, so whatever those modules import later is picked up by re-writing.
Each entry point's files sit in the folder of its main module because transformers' dynamic-module loader
(`get_cached_module_file`) copies a module's relative imports from the module's own folder only (it reads them
with a regex, `from .name import`; `..` is not supported), hence the two sets are written separately.

The set may not include a tool module (bench, tune, demo, ...: see `TOOL_MODULES`): such an import at module
level raises `ToolModuleImportError`. A relative import of a tool module inside a function (decoding's
`from .tune import apply_tuned_settings`, used only by the package's own generate hook) is the one change made
to a copy: that statement becomes a call that imports the module from the installed package and, without the
package, raises an ImportError saying to install it. Every written folder is checked with transformers' own
relative-import scanner, so a file transformers would look for and not find is an error at write time, not at
load time.
"""

from __future__ import annotations

import argparse
import ast
import os
import sys
from collections.abc import Iterable
from pathlib import Path

__all__ = [
    "CUSTOM_GENERATE_DIR",
    "TOOL_MODULES",
    "ToolModuleImportError",
    "check_code_files",
    "code_files",
    "write_code_files",
]

PACKAGE_DIR = Path(__file__).resolve().parent
CUSTOM_GENERATE_DIR = "custom_generate"
MODEL_MODULES = ("configuration_clover2", "modeling_clover2")
DECODING_MODULES = ("remote_generate", "configuration_clover2", "modeling_clover2", "tree", "decoding")
REMOTE_GENERATE_MODULE = "remote_generate"  # written as custom_generate/generate.py
TOOL_MODULES = frozenset({
    "bench", "tune", "demo", "cli", "embedded", "selfdistill", "recipes", "features", "data", "training",
    "hub_files", "__init__", "__main__",
})
_HELPER_NAME = "_clover2_hf_package_import"
_HELPER = f'''

def {_HELPER_NAME}(module, names):  # added by clover2_hf.hub_files: imports of package-only (tool) modules
    """`from clover2_hf.<module> import <names>`, or an ImportError saying to install the package."""
    import importlib

    try:
        found = importlib.import_module("clover2_hf." + module)
    except ModuleNotFoundError as exc:
        raise ImportError(
            f"This feature needs the clover2-hf package (pip install clover2-hf): clover2_hf.{{module}} is not "
            "part of the code files shipped with the drafter."
        ) from exc
    return tuple(getattr(found, name) for name in names)
'''


class ToolModuleImportError(RuntimeError):
    """A core module shipped with drafters imports a tool module at module level."""


def _module_path(name: str, package_dir: Path) -> Path:
    path = package_dir / f"{name}.py"
    if not path.is_file():
        raise FileNotFoundError(f"clover2_hf has no module {name!r} ({path}) to ship with a drafter")
    return path


def _relative_imports(tree: ast.Module, name: str) -> list[tuple[ast.ImportFrom, list[str], bool]]:
    """(node, imported sibling modules, inside a function) for each relative import in a module."""
    found = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.ImportFrom) and child.level:
                if child.level != 1 or (child.module and "." in child.module):
                    raise ValueError(
                        f"clover2_hf/{name}.py line {child.lineno}: only `from .module import ...` relative imports "
                        "can be shipped with a drafter (transformers' loader copies siblings only)"
                    )
                if not child.module:
                    raise ValueError(
                        f"clover2_hf/{name}.py line {child.lineno}: write `from .module import name`, not "
                        "`from . import module` (transformers' loader does not see the latter)"
                    )
                modules = [child.module]
                found.append((child, modules, in_function))
            visit(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))

    visit(tree, False)
    return found


def module_closure(entries: Iterable[str], package_dir: Path = PACKAGE_DIR) -> dict[str, str]:
    """{module name: file text to write} for `entries` and every module they import relatively, transitively.

    Function-local imports of tool modules are rewritten (see the module docstring); a module-level one raises
    `ToolModuleImportError`.
    """
    texts: dict[str, str] = {}
    todo = list(entries)
    while todo:
        name = todo.pop(0)
        if name in texts:
            continue
        if name in TOOL_MODULES:
            raise ToolModuleImportError(f"clover2_hf.{name} is a tool module and cannot be shipped with a drafter")
        source = _module_path(name, package_dir).read_text(encoding="utf-8")
        tree = ast.parse(source)
        lines = source.splitlines(keepends=True)
        rewrites = []
        for node, modules, in_function in _relative_imports(tree, name):
            tools = [m for m in modules if m in TOOL_MODULES]
            if not tools:
                todo.extend(modules)
                continue
            if not in_function:
                raise ToolModuleImportError(
                    f"clover2_hf/{name}.py line {node.lineno} imports the tool module(s) {', '.join(tools)} at module "
                    "level; the modules shipped with a drafter (the decoding / model code and what it imports) must "
                    "not depend on tool modules. Move that import into the function that needs it, or move the code "
                    "it needs into a core module."
                )
            rewrites.append(node)
        for node in sorted(rewrites, key=lambda n: n.lineno, reverse=True):
            lines = _rewrite_import(lines, node, name)
        text = "".join(lines)
        if rewrites:
            text = text.rstrip("\n") + "\n" + _HELPER
        texts[name] = text
    return texts


def _rewrite_import(lines: list[str], node: ast.ImportFrom, name: str) -> list[str]:
    """Replace a function-local `from .tool import a, b as c` with `a, c = <helper>("tool", ("a", "b"))`."""
    first, last = node.lineno - 1, node.end_lineno - 1
    head, tail = lines[first][: node.col_offset], lines[last][node.end_col_offset :]
    if head.strip() or tail.strip().split("#")[0].strip() not in ("", ";"):
        raise ToolModuleImportError(
            f"clover2_hf/{name}.py line {node.lineno}: put the function-local import of a tool module on its own line"
        )
    targets = ", ".join(alias.asname or alias.name for alias in node.names)
    names = ", ".join(repr(alias.name) for alias in node.names)
    comment = tail.strip()
    comment = f"  {comment}" if comment.startswith("#") else ""
    statement = f"{head}{targets}, = {_HELPER_NAME}({node.module!r}, ({names},)){comment}\n"
    return lines[:first] + [statement] + lines[last + 1 :]


def code_files(package_dir: Path = PACKAGE_DIR) -> dict[str, str]:
    """{path relative to a drafter folder: text} of every code file a drafter folder carries."""
    files = {f"{name}.py": text for name, text in module_closure(MODEL_MODULES, package_dir).items()}
    for name, text in module_closure(DECODING_MODULES, package_dir).items():
        filename = "generate.py" if name == REMOTE_GENERATE_MODULE else f"{name}.py"
        files[f"{CUSTOM_GENERATE_DIR}/{filename}"] = text
    return files


def _package_module_names(package_dir: Path = PACKAGE_DIR) -> set[str]:
    return {p.name for p in package_dir.glob("*.py")}


def _stale_files(directory: Path, files: dict[str, str], package_dir: Path = PACKAGE_DIR) -> list[Path]:
    """Code files in `directory` from an earlier write that the current set no longer has."""
    stale = [p for p in directory.glob("*.py") if p.name in _package_module_names(package_dir) and p.name not in files]
    custom = directory / CUSTOM_GENERATE_DIR
    if custom.is_dir():
        stale += [p for p in custom.glob("*.py") if f"{CUSTOM_GENERATE_DIR}/{p.name}" not in files]
    return sorted(stale)


def _check_loadable(directory: Path) -> None:
    """Every relative import transformers' loader will look for exists next to its module."""
    from transformers.dynamic_module_utils import get_relative_import_files

    mains = [directory / "modeling_clover2.py", directory / "configuration_clover2.py",
             directory / CUSTOM_GENERATE_DIR / "generate.py"]
    for main in mains:
        missing = [f for f in get_relative_import_files(main) if not os.path.isfile(f)]
        if missing:
            raise ToolModuleImportError(
                f"transformers' loader would look for {', '.join(missing)} (a relative import of {main.name}, possibly "
                "in a string or docstring that starts a line with `from .`) and not find it"
            )


def write_code_files(directory: str | os.PathLike, package_dir: Path = PACKAGE_DIR) -> list[Path]:
    """(Re)write a drafter folder's code files from the installed package; returns the paths written.

    Removes code files an earlier write left that the current set no longer includes. The weights, config and card
    are not touched.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise NotADirectoryError(directory)
    files = code_files(package_dir)
    written = []
    for relpath, text in files.items():
        path = directory / relpath
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.is_file() or path.read_text(encoding="utf-8") != text:
            tmp = path.with_name(f".{path.name}.tmp")
            tmp.write_text(text, encoding="utf-8")
            os.replace(tmp, path)
        written.append(path)
    for path in _stale_files(directory, files, package_dir):
        path.unlink()
    _check_loadable(directory)
    return written


def check_code_files(directory: str | os.PathLike, package_dir: Path = PACKAGE_DIR) -> list[str]:
    """What differs between a drafter folder's code files and what `write_code_files` would write now ([] if none)."""
    directory = Path(directory)
    files = code_files(package_dir)
    problems = []
    for relpath, text in files.items():
        path = directory / relpath
        if not path.is_file():
            problems.append(f"{relpath}: missing")
        elif path.read_text(encoding="utf-8") != text:
            problems.append(f"{relpath}: differs from the package's current code")
    problems += [f"{p.relative_to(directory)}: no longer part of the code files" for p in
                 _stale_files(directory, files, package_dir)]
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m clover2_hf.hub_files",
        description="(Re)write the code files of existing Clover-2 drafter folders from the installed package, so "
                    "that they load with trust_remote_code=True and decode with "
                    "generate(custom_generate=<folder>, trust_remote_code=True) without the package.",
    )
    parser.add_argument("directories", nargs="+", help="drafter folders (holding config.json)")
    parser.add_argument("--check", action="store_true", help="only report differences; exit 1 if there are any")
    args = parser.parse_args(argv)
    status = 0
    for directory in args.directories:
        if args.check:
            problems = check_code_files(directory)
            for problem in problems:
                print(f"{directory}: {problem}")
            status |= bool(problems)
        else:
            for path in write_code_files(directory):
                print(path)
    return status


if __name__ == "__main__":
    sys.exit(main())
