"""Datasets in one schema: loaders for standard caption formats, dataset specs, and the synthetic scenes."""

from .loaders import LoadReport
from .spec import DatasetSpec, load_dataset_spec
from .synthetic import export_yolo, make_synthetic_dataset, make_synthetic_splits

__all__ = [
    "DatasetSpec",
    "LoadReport",
    "export_yolo",
    "load_dataset_spec",
    "make_synthetic_dataset",
    "make_synthetic_splits",
]
