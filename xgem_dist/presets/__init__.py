"""TrainConfig presets (YAML) shipped with the package."""

from pathlib import Path

FOLDER = Path(__file__).parent


def preset_path(name_or_path: str) -> Path:
    """A preset name (`tiny-frontal`) or a path to a YAML file."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml"):
        return path
    found = FOLDER / f"{name_or_path}.yaml"
    if not found.exists():
        raise ValueError(f"no preset {name_or_path!r}; presets: {sorted(p.stem for p in FOLDER.glob('*.yaml'))}")
    return found
