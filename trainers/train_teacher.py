"""`accelerate launch trainers/train_teacher.py --config trainers/configs/train_teacher.yaml [--<field> VALUE ...]`

Thin entry point: every field of `modeling_dclip.training.TeacherConfig` can be set in the YAML file or overridden on
the command line (`--help` describes each); mapping and list fields take YAML (`--loss_weights '{contrastive: 1}'`,
`--freeze_patterns '[text_model.*]'`). Ctrl-C stops the run and says where it can resume from.
"""

import sys

from modeling_dclip.commands.train_stage import train_stage


def main(argv: list[str] | None = None) -> int:
    try:
        train_stage("train_teacher", argv)
    except KeyboardInterrupt:
        return 130  # the loop has said where the run can resume from
    return 0


if __name__ == "__main__":
    sys.exit(main())
