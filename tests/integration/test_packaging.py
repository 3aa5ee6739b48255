"""What a user gets from `pip install loopfit` (a wheel, not this checkout): the recipes, lm-eval task files and
py.typed are inside the package, and `loopfit train NAME` / `loopfit quickstart` find the shipped recipes."""

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_wheel_ships_the_recipes_and_train_finds_them_by_name(tmp_path):
    tree = tmp_path / "tree"  # build from a copy: setuptools writes build/ and *.egg-info next to the sources
    shutil.copytree(ROOT / "src", tree / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, tree / name)
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                            "-q", "-w", str(tmp_path / "dist"), str(tree)], capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr[-2000:]
    (wheel,) = (tmp_path / "dist").glob("loopfit-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = {f"loopfit/recipes/{p.name}" for p in (ROOT / "src/loopfit/recipes").glob("*.yaml")}
    assert "loopfit/recipes/quickstart.yaml" in shipped and shipped <= names
    assert {"loopfit/py.typed", "loopfit/eval/tasks/gsm8k_loopfit.yaml", "loopfit/eval/tasks/loopfit_data.py"} <= names
    from loopfit.model import MODEL_FILES

    assert {f"loopfit/model/{name}" for name in MODEL_FILES} <= names  # what converted folders copy

    site = tmp_path / "site"  # the installed package alone, imported from an empty folder
    zipfile.ZipFile(wheel).extractall(site)
    script = (
        "import loopfit, sys\n"
        "from loopfit.quickstart import RECIPE\n"
        "from loopfit.train.config import load_recipe\n"
        f"assert loopfit.__file__.startswith({str(site)!r}), loopfit.__file__\n"
        f"assert RECIPE == __import__('pathlib').Path({str(site)!r}, 'loopfit', 'recipes', 'quickstart.yaml')\n"
        "assert load_recipe('quickstart').recurrence.curriculum == '1-sqrt'\n"
        "assert load_recipe('tinyllama-448.yaml').train.steps > 1000\n"
    )
    env = dict(os.environ, PYTHONPATH=str(site))
    (tmp_path / "empty").mkdir()
    run = subprocess.run([sys.executable, "-c", script], cwd=tmp_path / "empty", env=env, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    bad = subprocess.run([sys.executable, "-m", "loopfit.cli", "train", "quickstrat"], cwd=tmp_path / "empty",
                         env=env, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "recipe quickstrat not found" in bad.stderr and "quickstart" in bad.stderr
