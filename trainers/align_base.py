"""`accelerate launch trainers/align_base.py --config trainers/configs/align_base.yaml [--<field> VALUE ...]`

Thin entry point: every field of `modeling_dclip.training.AlignConfig` can be set in the YAML file or overridden on the
command line (values are read as YAML: `--loss_weights '{contrastive: 1}'`, `--freeze_patterns '[text_model.*]'`).
"""

import sys

from modeling_dclip.training import AlignConfig, align_base, parse_stage_config


def main(argv: list[str] | None = None) -> int:
    align_base(parse_stage_config(AlignConfig, argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
