"""One reader per dataset format, each returning `(datasets.Dataset, LoadReport)` in the canonical schema
(`schema.py`); `modeling_dclip.data.spec` names them by a spec string."""

from .coco import load_coco_captions
from .flickr30k import load_flickr30k_csv
from .hub import load_hub_dataset
from .imagefolder import load_image_folder
from .karpathy import load_karpathy
from .schema import LoadReport, canonical_features
from .tables import load_caption_table, load_caption_tsv
from .webdataset import load_webdataset

__all__ = [
    "LoadReport",
    "canonical_features",
    "load_caption_table",
    "load_caption_tsv",
    "load_coco_captions",
    "load_flickr30k_csv",
    "load_hub_dataset",
    "load_image_folder",
    "load_karpathy",
    "load_webdataset",
]
