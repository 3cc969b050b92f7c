"""What to evaluate: samples read from a JSONL/CSV manifest or from folders matched by file name.

A sample is a source image, the edited output, an optional ground-truth target, the instruction, an
optional task name (for per-task tables) and an optional target caption (for CLIP-T). Relative paths
in a manifest are relative to the manifest's folder. Every problem is reported before any model is
loaded, with the line it is on.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigError

__all__ = ["IMAGE_SUFFIXES", "Sample", "load_manifest", "samples_from_folders"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
DEFAULT_TASK = "all"

# Accepted column names, first the canonical one.
FIELD_ALIASES = {
    "id": ("id", "sample_id", "key", "name"),
    "source": ("source", "source_image", "input", "input_image", "src", "original"),
    "edited": ("edited", "edited_image", "output", "output_image", "result", "pred", "prediction"),
    "target": ("target", "target_image", "gt", "ground_truth", "reference"),
    "instruction": ("instruction", "edit_instruction", "prompt", "edit", "text"),
    "task": ("task", "task_type", "edit_type", "category", "type"),
    "caption": ("caption", "target_caption", "output_caption"),
}


@dataclass(frozen=True)
class Sample:
    id: str
    source: Path
    edited: Path
    target: Path | None = None
    instruction: str = ""
    task: str = DEFAULT_TASK
    caption: str = ""

    @property
    def clip_t_text(self) -> str:
        """CLIP-T's text: the target caption, or the instruction where the sample has no caption."""
        return self.caption or self.instruction

    def identity(self) -> dict:
        """What a stored result must match to be reused on resume."""
        return {
            "source": str(self.source),
            "edited": str(self.edited),
            "target": str(self.target) if self.target else None,
            "instruction": self.instruction,
            "caption": self.caption,
        }


def _pick(row: dict, field: str) -> str:
    lowered = {str(k).strip().lower(): v for k, v in row.items() if k is not None}
    for name in FIELD_ALIASES[field]:
        value = lowered.get(name)
        if value is not None and str(value).strip():
            return str(value).strip()
    return ""


def _resolve(base: Path, value: str) -> Path:
    path = Path(value).expanduser()
    return path if path.is_absolute() else (base / path)


def _rows(path: Path) -> list[tuple[int, dict]]:
    suffix = path.suffix.lower()
    rows: list[tuple[int, dict]] = []
    if suffix in (".jsonl", ".ndjson", ".json"):
        text = path.read_text(encoding="utf-8")
        if suffix == ".json" and text.lstrip().startswith("["):
            data = json.loads(text)
            if not isinstance(data, list):
                raise ConfigError(f"{path}: a .json manifest must be a list of objects or JSON lines.")
            return [(i + 1, row) for i, row in enumerate(data) if isinstance(row, dict)]
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as exc:
                raise ConfigError(f"{path}, line {number}: not valid JSON ({exc}).") from exc
            if not isinstance(row, dict):
                raise ConfigError(f"{path}, line {number}: each line must be a JSON object.")
            rows.append((number, row))
        return rows
    if suffix in (".csv", ".tsv"):
        with open(path, newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle, delimiter="\t" if suffix == ".tsv" else ",")
            return [(number, row) for number, row in enumerate(reader, start=2)]
    raise ConfigError(f"Unknown manifest type {path.suffix!r} ({path}): use .jsonl, .json, .csv or .tsv.")


def _check_files(samples: list[Sample], where: str) -> None:
    missing = []
    for sample in samples:
        for kind in ("source", "edited", "target"):
            path = getattr(sample, kind)
            if path is not None and not path.is_file():
                missing.append(f"{sample.id} {kind}: {path}")
    if missing:
        shown = "; ".join(missing[:5]) + (f"; and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise ConfigError(f"{len(missing)} image file(s) named in {where} do not exist: {shown}.")


def _check_unique(samples: list[Sample], where: str) -> None:
    seen: set[str] = set()
    for sample in samples:
        if sample.id in seen:
            raise ConfigError(f"Sample id {sample.id!r} appears twice in {where}: ids must be unique.")
        seen.add(sample.id)


def load_manifest(path: str | Path, *, check_files: bool = True) -> list[Sample]:
    """Samples from a JSONL / JSON / CSV / TSV manifest (one sample per line or row).

    Columns (aliases in FIELD_ALIASES): source and edited (required), target, instruction, task,
    caption, id (default: the line number).
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError(f"The manifest {path} does not exist.")
    base = path.parent
    samples = []
    for number, row in _rows(path):
        source, edited = _pick(row, "source"), _pick(row, "edited")
        if not source or not edited:
            raise ConfigError(
                f"{path}, line {number}: a sample needs a source image and an edited image (columns "
                f"'source' and 'edited'; got {sorted(str(k) for k in row)})."
            )
        target = _pick(row, "target")
        samples.append(
            Sample(
                id=_pick(row, "id") or f"{number:06d}",
                source=_resolve(base, source),
                edited=_resolve(base, edited),
                target=_resolve(base, target) if target else None,
                instruction=_pick(row, "instruction"),
                task=_pick(row, "task") or DEFAULT_TASK,
                caption=_pick(row, "caption"),
            )
        )
    if not samples:
        raise ConfigError(f"The manifest {path} holds no samples.")
    _check_unique(samples, str(path))
    if check_files:
        _check_files(samples, str(path))
    return samples


def _images_by_stem(folder: Path) -> dict[str, Path]:
    if not folder.is_dir():
        raise ConfigError(f"The folder {folder} does not exist.")
    found: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES:
            if path.stem in found:
                raise ConfigError(
                    f"{folder} has two images named {path.stem!r} ({found[path.stem].name}, {path.name}): "
                    "images are matched by name, so names must be unique."
                )
            found[path.stem] = path
    return found


def samples_from_folders(
    source_dir: str | Path,
    edited_dir: str | Path,
    target_dir: str | Path | None = None,
    instructions: str | Path | None = None,
) -> tuple[list[Sample], list[str]]:
    """Samples from a source folder and an edited folder (and a target folder) matched by file stem.

    Instructions, tasks and captions come from `instructions` (a manifest whose `id` column is the
    file stem) or from a `<stem>.txt` beside the source image. Returns (samples, notes): the notes
    say which files had no partner. Edited images without a source are an error.
    """
    sources = _images_by_stem(Path(source_dir).expanduser())
    edited = _images_by_stem(Path(edited_dir).expanduser())
    targets = _images_by_stem(Path(target_dir).expanduser()) if target_dir else {}
    orphans = sorted(set(edited) - set(sources))
    if orphans:
        raise ConfigError(
            f"{len(orphans)} edited image(s) have no source image of the same name in {source_dir}: "
            + ", ".join(orphans[:5])
        )
    info: dict[str, dict] = {}
    if instructions:
        instructions_path = Path(instructions).expanduser()
        if not instructions_path.is_file():
            raise ConfigError(f"The instructions file {instructions_path} does not exist.")
        for number, row in _rows(instructions_path):
            key = _pick(row, "id")
            if not key:
                raise ConfigError(
                    f"{instructions_path}, line {number}: an 'id' (the image file stem) is needed."
                )
            info[key] = row
    samples = []
    for stem in sorted(set(sources) & set(edited)):
        row = info.get(stem, {})
        instruction = _pick(row, "instruction") if row else ""
        sidecar = sources[stem].with_suffix(".txt")
        if not instruction and sidecar.is_file():
            instruction = sidecar.read_text(encoding="utf-8").strip()
        samples.append(
            Sample(
                id=stem,
                source=sources[stem],
                edited=edited[stem],
                target=targets.get(stem),
                instruction=instruction,
                task=(_pick(row, "task") if row else "") or DEFAULT_TASK,
                caption=_pick(row, "caption") if row else "",
            )
        )
    if not samples:
        raise ConfigError(f"No image in {edited_dir} has a source of the same name in {source_dir}.")
    notes = []
    unedited = sorted(set(sources) - set(edited))
    if unedited:
        notes.append(f"{len(unedited)} source image(s) have no edited image and are left out.")
    if target_dir:
        untargeted = [s.id for s in samples if s.target is None]
        if untargeted:
            notes.append(f"{len(untargeted)} sample(s) have no target image: no L1/L2/CLIP-I/DINO for them.")
    return samples, notes
