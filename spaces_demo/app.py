"""The Space's entry point. The app itself is `modeling_dclip.demo.app`, installed from `requirements.txt`, so that this
folder and `dclip demo` run the same code; this file only tells it which folder holds the Space README."""

import sys
from pathlib import Path

from modeling_dclip.demo.app import main

if __name__ == "__main__":
    sys.exit(main(space_dir=Path(__file__).resolve().parent))
