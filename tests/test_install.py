"""psyche installs beside the ecosystem: it owns one top-level import name (`psyche`), it runs beside Hugging
Face's `kernels` (which transformers >= 5.25 requires) from any directory, transformers still finds its own
`kernels` from the repository root, and the reference packages are the versions tests/references.txt pins."""

import importlib.metadata
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PINS = ROOT / "tests" / "references.txt"


def _pins() -> dict[str, str]:
    out = {}
    for line in PINS.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            m = re.fullmatch(r"([A-Za-z0-9_.\-]+)==([^\s;]+)", line)
            assert m, f"{PINS}: not an exact pin: {line!r}"
            out[m[1]] = m[2]
    return out


def test_setup_installs_one_top_level_name():
    """setup.py's packages and modules, read by running it with setuptools.setup replaced: only `psyche`."""
    import setuptools

    seen = {}
    real = setuptools.setup
    setuptools.setup = lambda **kw: seen.update(kw)
    cwd = os.getcwd()
    try:
        os.chdir(ROOT)
        exec(compile((ROOT / "setup.py").read_text(), "setup.py", "exec"), {"__name__": "__main__"})
    finally:
        setuptools.setup, _ = real, os.chdir(cwd)
    tops = {p.split(".")[0] for p in seen["packages"]} | set(seen.get("py_modules", []))
    assert tops == {"psyche"}, tops
    assert "psyche.kernels" in seen["packages"]
    assert not (ROOT / "kernels").exists()  # a top-level folder would shadow HF's `kernels` from the repo root


def test_reference_packages_are_the_pinned_versions():
    """What the parity tests compare against is what tests/references.txt says (`.ci/run` installs with it)."""
    pins = _pins()
    assert {"transformers", "kernels", "peft", "verl"} <= set(pins)
    wrong, absent = [], []
    for name, want in pins.items():
        try:
            have = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            absent.append(name)
            continue
        if have != want:
            wrong.append(f"{name} {have} (pinned {want})")
    assert not wrong, f"reference packages at other versions than {PINS.name}: {wrong}"
    if absent:
        pytest.skip(f"not installed (tests that need them skip or fail on their own): {absent}")


_OUTSIDE = r"""
import kernels, torch
from psyche.model_config import ModelConfig
from psyche.model import build_model
assert hasattr(kernels, "CUDAProperties") and not hasattr(kernels, "rms_norm"), kernels.__file__
cfg = ModelConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, vocab_size=64,
                  torch_dtype="float32")
logits = build_model(cfg, seed=0)(torch.arange(8)[None])
assert logits.shape == (1, 8, 64) and bool(torch.isfinite(logits).all())
print("ok", kernels.__file__)
"""

_ROOT = r"""
import kernels, transformers
assert hasattr(kernels, "CUDAProperties"), kernels.__file__
cfg = transformers.Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                               num_key_value_heads=2, vocab_size=64)
m = transformers.Qwen2ForCausalLM(cfg)
from psyche import kernels as ours
assert ours.__name__ == "psyche.kernels" and hasattr(ours, "rms_norm")
print("ok", kernels.__file__)
"""


@pytest.mark.parametrize("where", ["outside", "root"])
def test_psyche_and_hf_kernels_coexist(where, tmp_path):
    """From a directory outside the repository, `import kernels` is Hugging Face's and psyche's model runs; from
    the repository root, transformers' own `from kernels import ...` works and psyche's kernels are its own."""
    if importlib.util.find_spec("kernels") is None:
        pytest.skip("Hugging Face's `kernels` is not installed (transformers >= 5.25 brings it)")
    if where == "root" and importlib.util.find_spec("transformers") is None:
        pytest.skip("transformers is not installed")
    cwd = tmp_path if where == "outside" else ROOT
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    r = subprocess.run([sys.executable, "-c", _OUTSIDE if where == "outside" else _ROOT], cwd=cwd, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    hf_file = r.stdout.split()[-1]
    assert not Path(hf_file).resolve().is_relative_to(ROOT), hf_file
