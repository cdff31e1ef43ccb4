"""Dataset specs: one string (or mapping, or YAML/JSON file) that names a dataset for any command.

Grammar::

    SPEC     := KIND ":" [LOCATION] ["?" OPTIONS]  |  PATH
    OPTIONS  := NAME "=" VALUE ("&" NAME "=" VALUE)*

LOCATION and VALUEs are percent-decoded (write `%26` for '&', `%3F` for '?', `%25` for '%');
`~` is expanded. Booleans are true/false (also 1/0, yes/no).

===========  =========================================  =========================================
KIND         LOCATION                                   OPTIONS
===========  =========================================  =========================================
karpathy     dataset_*.json, or its folder              CAPTION, restval_as_train, instances
coco         captions_*.json                            CAPTION, instances
flickr30k    results.csv / Kaggle captions CSV          CAPTION
tsv          caption<TAB>image file (CC style)          CAPTION
jsonl        table of image paths + captions            CAPTION, TABLE
csv          table of image paths + captions            CAPTION, TABLE, delimiter
imagefolder  <class>/<image> folder                     split, limit
hf           Hub id, save_to_disk folder, or a local    CAPTION, TABLE, name, revision,
             .parquet/.json/.jsonl/.csv/.arrow file     label_column
wds          webdataset .tar shards: a brace pattern    split, skip_missing, limit, streaming
             ({00000..00009}.tar), glob, or folder
synthetic    (empty)                                    n (= num_images, default 200), seed, split
===========  =========================================  =========================================

CAPTION = `images` (image root), `split`, `skip_missing`, `limit`; TABLE = `image_column`,
`caption_column`, `image_id_column`, `split_column`. Each option means what the keyword of the
same name means on the matching reader in `formats/` (`load_karpathy`, `load_coco_captions`,
`load_flickr30k_csv`, `load_caption_tsv`, `load_caption_table`, `load_image_folder`,
`load_hub_dataset`, `load_webdataset`; `synthetic` is `synthetic.make_synthetic_dataset`).
`wds:...?streaming=true` gives a `datasets.IterableDataset` (rows read shard by shard, checked as they come).

Examples::

    karpathy:/data/flickr30k/dataset_flickr30k.json?split=test&images=/data/flickr30k/images
    coco:annotations/captions_val2014.json?images=val2014&instances=annotations/instances_val2014.json
    flickr30k:flickr30k_images/results.csv
    jsonl:pairs.jsonl?image_column=file&caption_column=text&skip_missing=true
    imagefolder:/data/cifar10-test?split=test
    hf:nlphuji/flickr30k?split=test&split_column=split
    synthetic:?n=200&seed=0&split=test
    wds:/data/cc3m/{00000..00331}.tar?streaming=true&skip_missing=true

A bare PATH is read as: a folder holding one `dataset_*.json` -> karpathy; a folder of class
subfolders -> imagefolder; a `.yaml`/`.yml`/`.json` spec file -> the mapping in it; a Karpathy
split `.json` -> karpathy. A mapping (or spec file) is `{"kind": ..., "path": ..., <options>}`;
relative paths in a spec file are relative to the file's folder.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote

import datasets

from .formats import (
    LoadReport,
    load_caption_table,
    load_caption_tsv,
    load_coco_captions,
    load_flickr30k_csv,
    load_hub_dataset,
    load_image_folder,
    load_karpathy,
    load_webdataset,
)

# A dataset as loaded: map-style, or streamed (`wds:...?streaming=true`).
LoadedDataset = datasets.Dataset | datasets.IterableDataset

_PATH_OPTION = "path"
_CAPTION_OPTIONS = {"images": _PATH_OPTION, "split": str, "skip_missing": bool, "limit": int}
_TABLE_OPTIONS = {
    **_CAPTION_OPTIONS,
    "image_column": str,
    "caption_column": str,
    "image_id_column": str,
    "split_column": str,
}
# Option name -> type, per kind: the whole vocabulary a spec may use.
KIND_OPTIONS: dict[str, dict[str, Any]] = {
    "karpathy": {**_CAPTION_OPTIONS, "restval_as_train": bool, "instances": _PATH_OPTION},
    "coco": {**_CAPTION_OPTIONS, "instances": _PATH_OPTION},
    "flickr30k": dict(_CAPTION_OPTIONS),
    "tsv": dict(_CAPTION_OPTIONS),
    "jsonl": dict(_TABLE_OPTIONS),
    "csv": {**_TABLE_OPTIONS, "delimiter": str},
    "imagefolder": {"split": str, "limit": int},
    "hf": {**_TABLE_OPTIONS, "name": str, "revision": str, "label_column": str},
    "wds": {"split": str, "skip_missing": bool, "limit": int, "streaming": bool},
    "synthetic": {"n": int, "seed": int, "split": str},
}


def _load_synthetic(
    location: str, n: int = 200, seed: int = 0, split: str = "test"
) -> tuple[datasets.Dataset, LoadReport]:
    """Generated scenes with known boxes (`modeling_dclip.data.synthetic.make_synthetic_dataset`)."""
    from .synthetic import make_synthetic_dataset

    dataset = make_synthetic_dataset(n, seed=seed, split=split)
    num_captions = sum(len(captions) for captions in dataset.with_format("arrow")["captions"].to_pylist())
    return dataset, LoadReport(
        source=f"synthetic(n={n}, seed={seed})", num_images=len(dataset), num_captions=num_captions
    )


_LOADERS: dict[str, Callable[..., tuple[LoadedDataset, LoadReport]]] = {
    "karpathy": load_karpathy,
    "coco": load_coco_captions,
    "flickr30k": load_flickr30k_csv,
    "tsv": load_caption_tsv,
    "jsonl": lambda location, **options: load_caption_table(location, file_format="jsonl", **options),
    "csv": lambda location, **options: load_caption_table(location, file_format="csv", **options),
    "imagefolder": load_image_folder,
    "hf": load_hub_dataset,
    "wds": load_webdataset,
    "synthetic": _load_synthetic,
}
_SPEC_FILE_SUFFIXES = (".yaml", ".yml", ".json")
_KARPATHY_SIGNATURE = re.compile(r'"sentences"\s*:\s*\[')
_TRUE, _FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")


@dataclass(frozen=True)
class DatasetSpec:
    """A parsed dataset spec: which reader, what location, which options (already typed).

    `str(spec)` gives the canonical string, and `DatasetSpec.parse(str(spec)) == spec`.
    """

    kind: str
    location: str = ""
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in KIND_OPTIONS:
            raise ValueError(f"unknown dataset kind {self.kind!r}; expected one of {sorted(KIND_OPTIONS)}")
        if not self.location and self.kind != "synthetic":
            raise ValueError(f"dataset spec of kind {self.kind!r} needs a location ({self.kind}:PATH)")

    @classmethod
    def parse(cls, spec: str | os.PathLike | Mapping[str, Any] | DatasetSpec) -> DatasetSpec:
        """Parse a spec string, a bare path, a mapping, or a spec file (see the module docstring)."""
        if isinstance(spec, DatasetSpec):
            return spec
        if isinstance(spec, Mapping):
            return cls._from_mapping(spec, base_dir=None, source="dataset spec mapping")
        text = os.fspath(spec)
        kind, separator, rest = text.partition(":")
        if separator and kind in KIND_OPTIONS and not isinstance(spec, Path):
            location, _, query = rest.partition("?")
            return cls._from_mapping(
                {"kind": kind, "path": unquote(location), **_parse_query(query, text)}, base_dir=None, source=text
            )
        return cls._from_bare_path(Path(text).expanduser())

    def load(self, *, skip_missing: bool | None = None) -> tuple[LoadedDataset, LoadReport]:
        """Read the dataset. `skip_missing`, when given, overrides the spec's own option."""
        options = dict(self.options)
        if skip_missing is not None:
            if "skip_missing" not in KIND_OPTIONS[self.kind]:
                raise ValueError(f"dataset kind {self.kind!r} has no skip_missing option")
            options["skip_missing"] = skip_missing
        return _LOADERS[self.kind](self.location, **options)

    def to_dict(self) -> dict[str, Any]:
        """`{"kind", "path", **options}`: the mapping form, e.g. for a results file or YAML config."""
        return {"kind": self.kind, "path": self.location, **self.options}

    def __str__(self) -> str:
        query = "&".join(
            f"{name}={quote(_format_value(value), safe='/~._-,:')}" for name, value in self.options.items()
        )
        return f"{self.kind}:{quote(self.location, safe='/~._-:')}" + (f"?{query}" if query else "")

    @classmethod
    def _from_mapping(cls, mapping: Mapping[str, Any], base_dir: Path | None, source: str) -> DatasetSpec:
        options = dict(mapping)
        kind = options.pop("kind", None)
        if kind is None:
            raise ValueError(f"{source}: a dataset spec mapping needs a 'kind' (one of {sorted(KIND_OPTIONS)})")
        if kind not in KIND_OPTIONS:
            raise ValueError(f"{source}: unknown dataset kind {kind!r}; expected one of {sorted(KIND_OPTIONS)}")
        location = str(options.pop("path", "") or "")
        if location and (kind != "hf" or _is_local(location, base_dir)):
            location = _resolve_path(location, base_dir)
        allowed = KIND_OPTIONS[kind]
        typed = {}
        for name, value in options.items():
            if name not in allowed:
                raise ValueError(f"{source}: unknown option {name!r} for kind {kind!r}; options: {sorted(allowed)}")
            typed[name] = _convert(value, allowed[name], name, source, base_dir)
        return cls(kind=kind, location=location, options=typed)

    @classmethod
    def _from_bare_path(cls, path: Path) -> DatasetSpec:
        if path.is_dir():
            if list(path.glob("dataset_*.json")):
                return cls(kind="karpathy", location=str(path))
            if any(child.is_dir() for child in path.iterdir()):
                return cls(kind="imagefolder", location=str(path))
            raise ValueError(
                f"{path}: folder has no dataset_*.json and no class subfolders; "
                f"write KIND:{path} with KIND one of {sorted(KIND_OPTIONS)}"
            )
        if not path.is_file():
            raise FileNotFoundError(
                f"dataset spec {str(path)!r}: no such file or folder, and it does not start with a kind "
                f"({', '.join(f'{kind}:' for kind in sorted(KIND_OPTIONS))})"
            )
        if path.suffix.lower() not in _SPEC_FILE_SUFFIXES:
            raise ValueError(
                f"{path}: cannot tell the dataset format; write KIND:{path} with KIND one of {sorted(KIND_OPTIONS)}"
            )
        with path.open(encoding="utf-8") as file:
            # Peek rather than parse: a Karpathy file may be hundreds of MB and is parsed by its reader.
            if path.suffix.lower() == ".json" and _KARPATHY_SIGNATURE.search(file.read(1 << 16)):
                return cls(kind="karpathy", location=str(path))
            file.seek(0)
            mapping = _read_spec_file(file, path)
        return cls._from_mapping(mapping, base_dir=path.parent, source=str(path))


def load_dataset_spec(
    spec: str | os.PathLike | Mapping[str, Any] | DatasetSpec, *, skip_missing: bool | None = None
) -> LoadedDataset:
    """Load the dataset a spec names, in the canonical schema (see `formats/schema.py`).

    What was dropped under `skip_missing` is logged as a warning; use `DatasetSpec.parse(spec).load()`
    to get the `LoadReport` as well.
    """
    dataset, _ = DatasetSpec.parse(spec).load(skip_missing=skip_missing)
    return dataset


def _parse_query(query: str, source: str) -> dict[str, str]:
    options: dict[str, str] = {}
    for pair in filter(None, query.split("&")):
        name, separator, value = pair.partition("=")
        if not separator or not name:
            raise ValueError(f"dataset spec {source!r}: option {pair!r} is not NAME=VALUE")
        name = unquote(name)
        if name in options or name in ("kind", "path"):
            raise ValueError(f"dataset spec {source!r}: option {name!r} given twice or reserved")
        options[name] = unquote(value)
    return options


def _convert(value: Any, option_type: Any, name: str, source: str, base_dir: Path | None) -> Any:
    if option_type is bool:
        if isinstance(value, bool):
            return value
        if str(value).lower() in _TRUE + _FALSE:
            return str(value).lower() in _TRUE
        raise ValueError(f"{source}: option {name}={value!r} must be true or false")
    if option_type is int:
        try:
            converted = int(value)
        except (TypeError, ValueError):
            raise ValueError(f"{source}: option {name}={value!r} must be an integer") from None
        if converted < 0:
            raise ValueError(f"{source}: option {name}={value!r} must not be negative")
        return converted
    if option_type == _PATH_OPTION:
        return _resolve_path(str(value), base_dir)
    return str(value)


def _format_value(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def _resolve_path(value: str, base_dir: Path | None) -> str:
    path = Path(value).expanduser()
    return str(base_dir / path if base_dir is not None and not path.is_absolute() else path)


def _is_local(location: str, base_dir: Path | None) -> bool:
    return Path(_resolve_path(location, base_dir)).exists()


def _read_spec_file(file: Any, path: Path) -> Mapping[str, Any]:
    if path.suffix.lower() == ".json":
        try:
            mapping = json.load(file)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}: not valid JSON ({error})") from error
    else:
        import yaml

        try:
            mapping = yaml.safe_load(file)
        except yaml.YAMLError as error:
            raise ValueError(f"{path}: not valid YAML ({error})") from error
    if not isinstance(mapping, Mapping):
        raise ValueError(f"{path}: a dataset spec file holds a mapping {{kind: ..., path: ..., <options>}}")
    return mapping
