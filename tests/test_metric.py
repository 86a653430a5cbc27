"""The `clover2_acceptance` evaluate module, loaded from its directory in the package (offline)."""

from __future__ import annotations

import importlib.resources
import json
import os
import subprocess
import sys

import pytest

METRIC_DIR = str(importlib.resources.files("clover2_hf") / "metrics" / "clover2_acceptance")

EXPECTED = {
    "num_steps": 5,
    "mean_accepted": 1.2,
    "tau": 2.2,
    "tau_per_generation": [2.0, 2.5],
    "accepted_length_histogram": [2, 1, 1, 1],
    "depth_acceptance": [0.6, 0.4, 0.2],
    "conditional_depth_acceptance": [0.6, 2 / 3, 0.5],
}


def _close(got, want) -> bool:
    if isinstance(want, list):
        return len(got) == len(want) and all(_close(g, w) for g, w in zip(got, want))
    if want is None:
        return got is None
    return got == pytest.approx(want)


@pytest.mark.slow  # a fresh interpreter importing evaluate (about a minute)
def test_loads_offline_from_local_path_and_computes(tmp_path):
    """A fresh interpreter with the Hub switched off loads the module from its directory."""
    script = (
        "import evaluate, json, sys\n"
        "m = evaluate.load(sys.argv[1])\n"
        "print(json.dumps(m.compute(accepted_lengths=[[0, 2, 1], [3, 0]])))\n"
    )
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_EVALUATE_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               HF_MODULES_CACHE=str(tmp_path / "modules"))
    proc = subprocess.run([sys.executable, "-c", script, METRIC_DIR], env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(result) == set(EXPECTED)
    for key, want in EXPECTED.items():
        assert _close(result[key], want), (key, result[key])


@pytest.fixture(scope="module")
def metric():
    evaluate = pytest.importorskip("evaluate")
    return evaluate.load(METRIC_DIR)


def test_max_depth_pads_and_empty_generations(metric):
    out = metric.compute(accepted_lengths=[[4, 4], [], [0]], max_depth=5)
    assert out["accepted_length_histogram"] == [1, 0, 0, 0, 2, 0]
    assert out["depth_acceptance"] == pytest.approx([2 / 3] * 4 + [0.0])
    assert out["conditional_depth_acceptance"][:5] == pytest.approx([2 / 3, 1.0, 1.0, 1.0, 0.0])
    assert out["tau_per_generation"] == [5.0, None, 1.0]
    assert out["tau"] == pytest.approx(1 + 8 / 3)


def test_bad_inputs_raise(metric):
    with pytest.raises(ValueError, match=">= 0"):
        metric.compute(accepted_lengths=[[1, -1]])
    with pytest.raises(ValueError, match="max_depth"):
        metric.compute(accepted_lengths=[[3]], max_depth=2)
    with pytest.raises(ValueError, match="no verification pass"):
        metric.compute(accepted_lengths=[[], []])
