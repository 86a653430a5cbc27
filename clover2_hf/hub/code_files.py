"""The code files a drafter folder carries, so that it loads AND decodes without the clover2-hf package.

A saved drafter (`Clover2ForDrafting.save_pretrained`, or `python -m clover2_hf.hub <dir>` for an existing
folder) holds::

    config.json, model.safetensors, README.md
    configuration_clover2.py, modeling_clover2.py       AutoConfig / AutoModel with trust_remote_code=True
    custom_generate/generate.py                           generate(custom_generate=<dir or repo>, trust_remote_code=True)
    custom_generate/tree_step.py, tree.py, ...            what generate.py imports, transitively

Every code file is a copy of one of the package's core modules, computed when it is written: the set starts
from the modules the two entry points need (`configuration_clover2`, `modeling_clover2` for the model;
`hub.remote_generate` -> `custom_generate/generate.py` for decoding) and follows their relative imports
transitively. Each entry point's files sit flat in the folder of its main module, because transformers'
dynamic-module loader (`get_cached_module_file`) copies a module's relative imports from the module's own
folder only (it reads them with a regex, `from .name import`; `..` and subpackages are not supported). So
the package's subpackage imports are rewritten to sibling imports (`from ..tree import x` in
`generation/tree_step.py` becomes `from .tree import x`); that is the only change made to a copy, and it
needs every shipped module to have a distinct file name.

Only core modules may be shipped: a relative import of a tool (`tools.*`), of training code or of this
module raises `ToolModuleImportError` at write time. Every written folder is checked with transformers'
own relative-import scanner, so a file transformers would look for and not find is an error at write time,
not at load time.
"""

from __future__ import annotations

import argparse
import ast
import os
import re
import sys
from collections.abc import Iterable
from pathlib import Path

__all__ = [
    "CUSTOM_GENERATE_DIR",
    "TOOL_MODULES",
    "ToolModuleImportError",
    "is_tool_module",
    "check_code_files",
    "code_files",
    "write_code_files",
]

PACKAGE_DIR = Path(__file__).resolve().parents[1]  # the clover2_hf folder
CUSTOM_GENERATE_DIR = "custom_generate"
MODEL_MODULES = ("configuration_clover2", "modeling_clover2")
REMOTE_GENERATE_MODULE = "hub.remote_generate"  # written as custom_generate/generate.py
DECODING_MODULES = (REMOTE_GENERATE_MODULE, "configuration_clover2", "modeling_clover2")
#: Modules (dotted, relative to the package) and subpackages (ending in ".") never shipped with a drafter.
TOOL_MODULES = frozenset({"tools.", "hub.code_files", "hub.__main__", "training", "data", "__init__", "__main__"})


class ToolModuleImportError(RuntimeError):
    """A core module shipped with drafters imports a module that is not shipped (a tool, training code)."""


def is_tool_module(name: str) -> bool:
    """True for a module (dotted, relative to the package) that must not be shipped with a drafter."""
    return name.split(".")[-1] == "__init__" or any(
        name.startswith(entry) if entry.endswith(".") else name == entry for entry in TOOL_MODULES
    )


def _module_path(name: str, package_dir: Path) -> Path:
    path = package_dir.joinpath(*name.split(".")).with_suffix(".py")
    if not path.is_file():
        raise FileNotFoundError(f"clover2_hf has no module {name!r} ({path}) to ship with a drafter")
    return path


def _resolve(name: str, node: ast.ImportFrom, package_dir: Path) -> str:
    """The dotted module a relative `from ...x import y` in module `name` imports."""
    package = name.split(".")[:-1]
    if node.level - 1 > len(package):
        raise ValueError(f"clover2_hf/{name}.py line {node.lineno}: relative import beyond the package")
    base = package[: len(package) - (node.level - 1)]
    if not node.module:
        raise ValueError(
            f"clover2_hf/{name.replace('.', '/')}.py line {node.lineno}: write `from .module import name`, not "
            "`from . import module` (transformers' loader does not see the latter)"
        )
    target = ".".join(base + node.module.split("."))
    if (package_dir.joinpath(*target.split(".")) / "__init__.py").is_file():
        raise ValueError(
            f"clover2_hf/{name.replace('.', '/')}.py line {node.lineno}: import from the module itself, not from the "
            f"package {target!r} (a shipped folder is flat)"
        )
    return target


def _flat_name(name: str) -> str:
    return name.split(".")[-1]


def module_closure(entries: Iterable[str], package_dir: Path = PACKAGE_DIR) -> dict[str, str]:
    """{module name: file text to write} for `entries` and every module they import relatively, transitively.

    Relative imports are rewritten to sibling imports of the flat folder; importing a tool module raises
    `ToolModuleImportError`.
    """
    texts: dict[str, str] = {}
    todo = list(entries)
    while todo:
        name = todo.pop(0)
        if name in texts:
            continue
        if is_tool_module(name):
            raise ToolModuleImportError(f"clover2_hf.{name} is a tool module and cannot be shipped with a drafter")
        source = _module_path(name, package_dir).read_text(encoding="utf-8")
        lines = source.splitlines(keepends=True)
        for node in sorted((n for n in ast.walk(ast.parse(source)) if isinstance(n, ast.ImportFrom) and n.level),
                           key=lambda n: n.lineno, reverse=True):
            target = _resolve(name, node, package_dir)
            if is_tool_module(target):
                raise ToolModuleImportError(
                    f"clover2_hf/{name.replace('.', '/')}.py line {node.lineno} imports the tool module {target}; the "
                    "modules shipped with a drafter (the decoding / model code and what it imports) must not depend "
                    "on tool modules. Move the code it needs into a core module."
                )
            todo.append(target)
            line = lines[node.lineno - 1]
            head, rest = line[: node.col_offset], line[node.col_offset :]
            rest, count = re.subn(r"^from\s+\.+[\w.]*\s+import\b", f"from .{_flat_name(target)} import", rest)
            if count != 1:
                raise ValueError(f"clover2_hf/{name.replace('.', '/')}.py line {node.lineno}: cannot rewrite this import")
            lines[node.lineno - 1] = head + rest
        texts[name] = "".join(lines)
    flat = [_flat_name(n) for n in texts]
    if len(set(flat)) != len(flat):
        raise ValueError(f"two shipped modules share a file name: {sorted(texts)}")
    return texts


def code_files(package_dir: Path = PACKAGE_DIR) -> dict[str, str]:
    """{path relative to a drafter folder: text} of every code file a drafter folder carries."""
    files = {f"{_flat_name(name)}.py": text for name, text in module_closure(MODEL_MODULES, package_dir).items()}
    for name, text in module_closure(DECODING_MODULES, package_dir).items():
        filename = "generate.py" if name == REMOTE_GENERATE_MODULE else f"{_flat_name(name)}.py"
        files[f"{CUSTOM_GENERATE_DIR}/{filename}"] = text
    return files


def _package_module_names(package_dir: Path = PACKAGE_DIR) -> set[str]:
    return {p.name for p in package_dir.rglob("*.py")}


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
        prog="python -m clover2_hf.hub",
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
