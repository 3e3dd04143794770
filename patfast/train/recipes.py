"""The packaged recipes (patfast/recipes/*.yaml): the paper's protocols as config files that `--config NAME` takes.

Each file is an ordinary `--config` YAML; its first line, a comment, says what it is (`patfast recipes` lists it).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

RECIPE_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "recipes")


@dataclass(frozen=True)
class Recipe:
    name: str
    path: str
    summary: str  # the file's first line, without its "# "


def packaged_recipes() -> dict[str, Recipe]:
    """name -> Recipe, sorted by name."""
    out = {}
    for file in sorted(os.listdir(RECIPE_DIR)):
        if file.endswith(".yaml"):
            path = os.path.join(RECIPE_DIR, file)
            with open(path) as f:
                first = f.readline().strip()
            out[file.removesuffix(".yaml")] = Recipe(file.removesuffix(".yaml"), path, first.lstrip("# ").strip())
    return out


def config_path(value: str) -> str:
    """`--config` value -> a file: an existing path as given, else a packaged recipe's name; a value that is
    neither is returned unchanged (read_yaml reports it, naming the recipes)."""
    if os.path.exists(value):
        return value
    return packaged_recipes().get(value.removesuffix(".yaml"), Recipe("", value, "")).path
