"""Datasets in one schema: readers for standard caption formats (`formats/`), dataset specs, the synthetic scenes,
and the YOLO export of datasets with boxes."""

from .formats import LoadReport
from .spec import DatasetSpec, load_dataset_spec
from .synthetic import make_synthetic_dataset, make_synthetic_splits
from .yolo_export import export_yolo

__all__ = [
    "DatasetSpec",
    "LoadReport",
    "export_yolo",
    "load_dataset_spec",
    "make_synthetic_dataset",
    "make_synthetic_splits",
]
