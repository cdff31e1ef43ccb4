"""`accelerate launch trainers/align_base.py --config trainers/configs/align_base.yaml [--<field> VALUE ...]`

Thin entry point: every field of `modeling_dclip.training.AlignConfig` can be set in the YAML file or overridden on
the command line (`--help` describes each); mapping and list fields take YAML (`--loss_weights '{contrastive: 1}'`,
`--freeze_patterns '[text_model.*]'`). Ctrl-C stops the run and says where it can resume from.
"""

import sys

from modeling_dclip.training import AlignConfig, align_base, parse_stage_config


def main(argv: list[str] | None = None) -> int:
    config = parse_stage_config(AlignConfig, argv)
    try:
        align_base(config)
    except KeyboardInterrupt:
        return 130  # the loop has said where the run can resume from
    return 0


if __name__ == "__main__":
    sys.exit(main())
