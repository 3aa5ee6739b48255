"""Training recipes shipped with loopfit, found by name wherever loopfit is installed.

    loopfit train quickstart            # src/loopfit/recipes/quickstart.yaml
    loopfit train tinyllama-448         # the paper's TinyLlama (4,8,4) run on GPUs

A recipe argument that names an existing file is read as given; otherwise a bare name (with or without
`.yaml`) is looked up among the shipped recipes.
"""

from importlib.resources import files
from pathlib import Path


def shipped():
    """The names of the shipped recipes, sorted."""
    return sorted(p.name[: -len(".yaml")] for p in files(__name__).iterdir() if p.name.endswith(".yaml"))


def resolve(recipe):
    """The path of a recipe: `recipe` itself when it is a file, else the shipped recipe of that name (a path
    that does not exist is returned as given, for the caller's error)."""
    path = Path(recipe)
    if path.is_file() or path.name != str(recipe):
        return path
    name = path.name[: -len(".yaml")] if path.name.endswith(".yaml") else path.name
    shipped_path = Path(str(files(__name__).joinpath(f"{name}.yaml")))
    return shipped_path if shipped_path.is_file() else path
