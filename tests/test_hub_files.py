"""A drafter folder's code files: written on save, current in the shipped folder, and enough to decode without
the package (in a subprocess that cannot import it, and in a fresh virtualenv that does not have it)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from importlib.metadata import version
from pathlib import Path

import pytest
import torch
from conftest import make_tiny_target

from clover2_hf import Clover2ForDrafting
from clover2_hf.hub import code_files as hub_files
from clover2_hf.modeling_clover2 import NEEDS_PACKAGE_MESSAGE

REPO = Path(__file__).resolve().parents[1]
SHIPPED = REPO / "hub_configs" / "clover2-smollm2-135m-instruct"
REFRESH = f"python -m clover2_hf.hub {SHIPPED.relative_to(REPO)}"


def test_shipped_folder_carries_current_code_files():
    """Fails when a core module changed after the shipped folder's code files were written (drift)."""
    problems = hub_files.check_code_files(SHIPPED)
    assert not problems, f"run `{REFRESH}` and commit the result: " + "; ".join(problems)


def test_code_file_set():
    files = hub_files.code_files()
    root = {p for p in files if "/" not in p}
    custom = {p.split("/", 1)[1] for p in files if p.startswith("custom_generate/")}
    assert root >= {"configuration_clover2.py", "modeling_clover2.py"}
    assert custom >= {"generate.py", "tree_step.py", "tree.py", "modeling_clover2.py", "configuration_clover2.py"}
    package_files = {p.name for p in (REPO / "clover2_hf").rglob("*.py")}
    tool_files = {p.name for p in (REPO / "clover2_hf" / "tools").glob("*.py")} | {"training.py", "data.py", "code_files.py"}
    assert (root | custom) - {"generate.py"} <= package_files and not tool_files & (root | custom)
    generate = files["custom_generate/generate.py"]
    original = (REPO / "clover2_hf" / "hub" / "remote_generate.py").read_text()
    assert generate == original.replace("from ..generation.", "from .")  # only the imports are flattened
    assert all("from .." not in text for text in files.values())


def _fake_package(tmp_path: Path, files: dict[str, str]) -> Path:
    pkg = tmp_path / "pkg"
    for name, text in files.items():
        (pkg / name).parent.mkdir(parents=True, exist_ok=True)
        (pkg / name).write_text(textwrap.dedent(text))
    return pkg


def test_subpackage_imports_are_flattened(tmp_path):
    pkg = _fake_package(tmp_path, {
        "hub/entry.py": "from ..generation.loop import run\n",
        "generation/__init__.py": "",
        "generation/loop.py": "from ..tree import build  # the tree\nfrom .stats import (\n    Stats,\n)\nrun = 1\n",
        "generation/stats.py": "Stats = 1\n",
        "tree.py": "build = 2\n",
    })
    texts = hub_files.module_closure(["hub.entry"], pkg)
    assert set(texts) == {"hub.entry", "generation.loop", "generation.stats", "tree"}
    assert texts["hub.entry"] == "from .loop import run\n"
    assert texts["generation.loop"] == "from .tree import build  # the tree\nfrom .stats import (\n    Stats,\n)\nrun = 1\n"


@pytest.mark.parametrize("where", ["module", "function"])
def test_tool_import_fails_loudly(tmp_path, where):
    statement = ("from ..tools.bench import y\n" if where == "module"
                 else "def f():\n    from ..tools.bench import y\n    return y\n")
    pkg = _fake_package(tmp_path, {
        "generation/loop.py": "from .helpers import x\n",
        "generation/helpers.py": statement + "x = 1\n",
        "tools/bench.py": "y = 2\n",
    })
    with pytest.raises(hub_files.ToolModuleImportError, match=r"helpers\.py line \d imports the tool module tools\.bench"):
        hub_files.module_closure(["generation.loop"], pkg)


def test_unsupported_relative_import_forms(tmp_path):
    pkg = _fake_package(tmp_path, {"loop.py": "from . import tree\n", "tree.py": ""})
    with pytest.raises(ValueError, match="not `from . import module`"):
        hub_files.module_closure(["loop"], pkg)
    pkg = _fake_package(tmp_path / "b", {"loop.py": "from .generation import run\n", "generation/__init__.py": ""})
    with pytest.raises(ValueError, match="not from the package 'generation'"):
        hub_files.module_closure(["loop"], pkg)
    pkg = _fake_package(tmp_path / "c", {"loop.py": "from .a.tree import x\nfrom .b.tree import y\n",
                                         "a/tree.py": "x = 1\n", "b/tree.py": "y = 1\n"})
    with pytest.raises(ValueError, match="share a file name"):
        hub_files.module_closure(["loop"], pkg)


def test_write_removes_stale_and_check_reports(tmp_path):
    (tmp_path / "custom_generate").mkdir()
    (tmp_path / "custom_generate" / "old_module.py").write_text("")
    (tmp_path / "bench.py").write_text("")  # a package module name left by an older save
    (tmp_path / "user_notes.py").write_text("")  # not ours: kept
    assert any("missing" in p for p in hub_files.check_code_files(tmp_path))
    hub_files.write_code_files(tmp_path)
    assert hub_files.check_code_files(tmp_path) == []
    assert not (tmp_path / "custom_generate" / "old_module.py").exists() and not (tmp_path / "bench.py").exists()
    assert (tmp_path / "user_notes.py").exists()
    (tmp_path / "custom_generate" / "tree.py").write_text("# edited\n")
    assert hub_files.check_code_files(tmp_path) == ["custom_generate/tree.py: differs from the package's current code"]
    assert hub_files.main(["--check", str(tmp_path)]) == 1
    assert hub_files.main([str(tmp_path)]) == 0
    assert hub_files.main(["--check", str(tmp_path)]) == 0


def test_drafter_has_no_generation_config_and_says_why():
    draft = Clover2ForDrafting.from_target(make_tiny_target("llama"))
    assert not hasattr(draft, "generation_config")  # Trainer & co. probe it with hasattr
    with pytest.raises(AttributeError, match="pip install clover2-hf") as info:
        draft.generation_config  # noqa: B018
    assert str(info.value) == NEEDS_PACKAGE_MESSAGE and "custom_generate" in NEEDS_PACKAGE_MESSAGE


# ------------------------------------------------------------------ decoding without the package

_NO_PACKAGE = textwrap.dedent(
    """
    import json, sys, torch
    sys.modules["clover2_hf"] = None  # the package cannot be imported in this process
    from transformers import AutoModel, AutoModelForCausalLM
    draft_dir, target_dir = sys.argv[1:]
    target = AutoModelForCausalLM.from_pretrained(target_dir).eval()
    draft = AutoModel.from_pretrained(draft_dir, trust_remote_code=True)
    assert type(draft).__module__.startswith("transformers_modules."), type(draft).__module__
    g = torch.Generator().manual_seed(0)
    for length in (3, 9, 17):
        ids = torch.randint(3, 160, (1, length), generator=g)
        ids[0, length // 2:] = ids[0, : length - length // 2].clone()  # repeats: the prompt-lookup path gets used
        plain = target.generate(ids, do_sample=False, max_new_tokens=20, min_new_tokens=20)
        clover = target.generate(ids, assistant_model=draft, custom_generate=draft_dir, trust_remote_code=True,
                                 do_sample=False, max_new_tokens=20, min_new_tokens=20)
        assert torch.equal(plain, clover), (plain.tolist(), clover.tolist())
    try:
        target.generate(ids, assistant_model=draft, max_new_tokens=3)
    except AttributeError as exc:
        assert "pip install clover2-hf" in str(exc), exc
    else:
        raise AssertionError("stock assisted decoding accepted a Clover-2 drafter")
    try:
        target.generate(ids, custom_generate=draft_dir, trust_remote_code=True, max_new_tokens=3)
    except ValueError as exc:
        assert "assistant_model" in str(exc), exc
    else:
        raise AssertionError("custom_generate without assistant_model= did not fail")
    print("OK", type(draft).__module__)
    """
)


@pytest.mark.parametrize("source", ["directory", "hub_repo"])
def test_saved_drafter_decodes_without_the_package(tmp_path, one_thread, source):
    """save_pretrained's folder, loaded and decoded in a process where `import clover2_hf` fails: as a local
    directory, and as a Hub repo id (served offline from a Hub cache holding the folder as a snapshot, which takes
    transformers' download branch of the loader: files fetched one by one, relative imports resolved per file)."""
    target = make_tiny_target("llama", peaked=True)
    draft = Clover2ForDrafting.from_target(target, tree_budget=6, tree_top_k=3)
    draft_dir, target_dir = tmp_path / "draft", tmp_path / "target"
    draft.save_pretrained(draft_dir)
    target.save_pretrained(target_dir)
    assert hub_files.check_code_files(draft_dir) == []
    assert (draft_dir / "custom_generate" / "generate.py").is_file()
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"), OMP_NUM_THREADS="1",
               CLOVER2_HF_CACHE=str(tmp_path / "cache"))
    draft_ref = str(draft_dir)
    if source == "hub_repo":
        draft_ref, commit = "clover2-test/tiny-drafter", "0123456789abcdef0123456789abcdef01234567"
        repo_cache = tmp_path / "hub" / "models--clover2-test--tiny-drafter"
        shutil.copytree(draft_dir, repo_cache / "snapshots" / commit)
        (repo_cache / "refs").mkdir()
        (repo_cache / "refs" / "main").write_text(commit)
        env["HF_HUB_CACHE"] = str(tmp_path / "hub")
    result = subprocess.run([sys.executable, "-c", _NO_PACKAGE, draft_ref, str(target_dir)],
                            capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "OK" in result.stdout
    if source == "hub_repo":  # loaded through the download branch: the module path holds the commit
        assert commit in result.stdout.split("OK", 1)[1], result.stdout


def test_remote_generate_in_package_matches_package_hook(one_thread):
    """The custom_generate entry, run from the package itself, gives the package hook's output and stats."""
    from clover2_hf import Clover2Stats
    from clover2_hf.hub.remote_generate import generate as remote_generate

    target = make_tiny_target("llama", peaked=True)
    draft = Clover2ForDrafting.from_target(target, tree_budget=6, tree_top_k=3)
    ids = torch.randint(3, 160, (1, 7), generator=torch.Generator().manual_seed(1))
    hook_stats, remote_stats = Clover2Stats(), Clover2Stats()
    expected = target.generate(ids, assistant_model=draft, do_sample=False, max_new_tokens=12, clover2_stats=hook_stats)
    got = remote_generate(target, inputs=ids, assistant_model=draft, do_sample=False, max_new_tokens=12,
                          clover2_stats=remote_stats)
    assert torch.equal(expected, got)
    assert remote_stats.mode == "tree" and remote_stats.tokens_per_step == hook_stats.tokens_per_step
    draft.config.decoding = "chain"
    with pytest.raises(ValueError, match="pip install clover2-hf"):
        remote_generate(target, inputs=ids, assistant_model=draft, max_new_tokens=3)


@pytest.mark.parametrize("mode", ["tree", "chain"])
def test_with_the_package_custom_generate_runs_the_package_loop_in_either_mode(tmp_path, one_thread, mode):
    """generate(custom_generate=<drafter dir>, clover2_decoding=...) with the package installed: the package's own
    loop of the asked mode runs (the folder's copy is not loaded), and the per-call option is honoured."""
    from clover2_hf import Clover2Stats

    target = make_tiny_target("llama", peaked=True)
    draft = Clover2ForDrafting.from_target(target, tree_budget=6, tree_top_k=3)
    draft.save_pretrained(tmp_path / "draft")
    ids = torch.randint(3, 160, (1, 7), generator=torch.Generator().manual_seed(2))
    stats = Clover2Stats()
    got = target.generate(ids, assistant_model=draft, custom_generate=str(tmp_path / "draft"), trust_remote_code=True,
                          clover2_decoding=mode, do_sample=False, max_new_tokens=12, clover2_stats=stats)
    assert torch.equal(got, target.generate(ids, do_sample=False, max_new_tokens=12))
    assert stats.mode == mode and stats.tokens_per_step and stats.new_tokens == 12


# ------------------------------------------------------------------ a fresh virtualenv without the package

VENV_PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "List three uses of a paperclip.",
]


def _fresh_venv(root: Path) -> Path:
    """A virtualenv (no system site packages) with only this environment's torch, transformers and safetensors.

    Cached under `root` by Python and package versions; built in a temporary folder and renamed into place.
    """
    pins = [f"torch=={torch.__version__.split('+')[0]}", f"transformers=={version('transformers')}", "safetensors"]
    key = f"py{sys.version_info.major}.{sys.version_info.minor}-" + "-".join(p.replace("==", "") for p in pins[:2])
    venv = root / key
    python = venv / "bin" / "python"
    if (venv / "ready").is_file() and python.exists():
        return python
    root.mkdir(parents=True, exist_ok=True)
    building = root / f".{key}.{os.getpid()}"
    shutil.rmtree(building, ignore_errors=True)
    try:
        subprocess.run([sys.executable, "-m", "venv", str(building)], check=True, capture_output=True, timeout=300)
        pip = subprocess.run(
            [str(building / "bin" / "python"), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", *pins],
            capture_output=True, text=True, timeout=1800,
        )
        assert pip.returncode == 0, f"pip install {' '.join(pins)} failed:\n{pip.stdout[-2000:]}\n{pip.stderr[-4000:]}"
        (building / "ready").write_text(" ".join(pins) + "\n")
        if venv.exists():  # a stale or half-built one
            shutil.rmtree(venv)
        os.rename(building, venv)  # bin/python finds its site-packages relative to itself: a moved venv works
    finally:
        shutil.rmtree(building, ignore_errors=True)
    return python


@pytest.mark.slow
def test_fresh_virtualenv_decodes_with_shipped_drafter(tmp_path):
    """Only torch + transformers + safetensors installed: the shipped drafter loads with trust_remote_code=True and
    generate(custom_generate=<its folder>) is token for token plain greedy decoding of SmolLM2-135M-Instruct."""
    from clover2_hf.tools.embedded import default_target_path

    target_dir = default_target_path()  # the converted SmolLM2 checkpoint + tokenizer (one-time conversion)
    started = time.perf_counter()
    python = _fresh_venv(target_dir.parent / "test-venvs")
    venv_s = time.perf_counter() - started
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    env.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"), OMP_NUM_THREADS="2",
               CLOVER2_HF_CACHE=str(tmp_path / "cache"))  # the loop's first-use calibration goes there
    result = subprocess.run(
        [str(python), str(REPO / "tests" / "remote_decode_script.py"), str(SHIPPED), str(target_dir), "32",
         json.dumps(VENV_PROMPTS)],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=900,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["ok"] and len(report["results"]) == len(VENV_PROMPTS)
    # the drafter was used: fewer target forwards than new tokens over the prompts
    assert sum(r["target_forwards"] for r in report["results"]) < sum(r["new_tokens"] for r in report["results"])
    print(f"venv ready in {venv_s:.0f} s;", json.dumps(report["results"]))
