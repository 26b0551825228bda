"""mlm next to today's transformers: Hugging Face's `kernels` package owns that top-level name, so
ours live in `mlm.kernels`; the wheel carries them there, and either import order works from
anywhere."""

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_python(code: str, cwd: Path, **env) -> subprocess.CompletedProcess:
    import os

    return subprocess.run(
        [sys.executable, "-c", code],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1", **env},
    )


@pytest.mark.slow
def test_the_wheel_holds_mlm_kernels_and_no_top_level_kernels(tmp_path):
    source = tmp_path / "source"  # a copy, so the build's own folders stay out of the checkout
    shutil.copytree(ROOT / "mlm", source / "mlm", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    build = subprocess.run(
        [
            sys.executable,
            *"-m pip wheel --no-deps --no-build-isolation -q -w".split(),
            str(tmp_path / "dist"),
            str(source),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert build.returncode == 0, build.stderr
    (wheel,) = (tmp_path / "dist").glob("mlm-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {"mlm/kernels/__init__.py", "mlm/kernels/linear_cross_entropy.py"} <= set(names)
    assert not [
        n
        for n in names
        if n.split("/")[0] not in ("mlm", wheel.name.split("-")[0] + "-0.1.0.dist-info")
    ]

    target = tmp_path / "site"
    install = subprocess.run(
        [sys.executable, *"-m pip install --no-deps -q --target".split(), str(target), str(wheel)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert install.returncode == 0, install.stderr
    assert sorted(p.name for p in target.iterdir() if not p.name.endswith(".dist-info")) == ["mlm"]
    code = "import mlm, mlm.kernels; print(mlm.__file__); print(mlm.kernels.__file__)"
    done = run_python(code, tmp_path, PYTHONPATH=str(target))
    assert done.returncode == 0, done.stderr
    assert [Path(line).parent for line in done.stdout.split()] == [
        target / "mlm",
        target / "mlm" / "kernels",
    ]


IMPORTS = {
    "transformers first": "import transformers.pipelines\nimport mlm\n",
    "mlm first": "import mlm\nimport transformers.pipelines\n",
}
LOAD_BOTH = """
import pathlib, kernels
from transformers import AutoModelForMaskedLM
folder = {folder!r}
model, tokenizer = mlm.load_pretrained(folder)
theirs = AutoModelForMaskedLM.from_pretrained(folder)
# Hugging Face's kernels package, whichever came first and wherever this runs: not a folder of ours.
ours = pathlib.Path({root!r}) / "kernels"
assert pathlib.Path(kernels.__file__).resolve().parent != ours, kernels.__file__
assert hasattr(kernels, "get_kernel"), kernels.__file__
print(type(model).__name__, type(theirs).__name__)
"""


@pytest.mark.slow
@pytest.mark.parametrize("order", IMPORTS)
@pytest.mark.parametrize("where", ["repository root", "another folder"])
def test_mlm_and_transformers_import_in_either_order_from_anywhere(
    hf_checkpoints, tmp_path, order, where
):
    pytest.importorskip(
        "kernels", reason="transformers 5.25 and later bring Hugging Face's kernels package"
    )
    cwd = ROOT if where == "repository root" else tmp_path
    code = IMPORTS[order] + LOAD_BOTH.format(folder=str(hf_checkpoints["bert"]), root=str(ROOT))
    done = run_python(code, cwd)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == ["MaskedLM", "BertForMaskedLM"]
