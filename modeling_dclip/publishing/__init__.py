"""Publishing a `dclip run` output: model cards written from its measured results, and uploads to the Hub."""

from .cards import RunResults, build_model_card, eval_results_for, write_model_cards
from .push import ModelFolderError, check_model_folder, push_model_folder

__all__ = [
    "ModelFolderError",
    "RunResults",
    "build_model_card",
    "check_model_folder",
    "eval_results_for",
    "push_model_folder",
    "write_model_cards",
]
