"""Build hook, beside pyproject.toml (which holds everything else): the wheel carries the checkout's top-level
configs/, recipes/ and callbacks/ as slimtune/_project/{configs,recipes,callbacks}, so that an installed (not
editable) slimtune finds them; `slimtune.config.project_root()` looks in the checkout first, then there.

pyproject.toml alone cannot say this: its package discovery (`packages.find`) cannot be combined with packages mapped
from folders outside `src/`, and listing every package by hand would drop the next one added.
"""

from setuptools import find_namespace_packages, setup

PROJECT_FOLDERS = ("configs", "recipes", "callbacks")

setup(
    packages=find_namespace_packages("src", include=["slimtune*"], exclude=["*__pycache__*"])
    + [f"slimtune._project.{folder}" for folder in PROJECT_FOLDERS],
    package_dir={"": "src", **{f"slimtune._project.{folder}": folder for folder in PROJECT_FOLDERS}},
)
