"""`accelerate launch trainers/train_teacher.py --config trainers/configs/train_teacher.yaml [--<field> VALUE ...]`

Thin entry point: every field of `modeling_dclip.training.TeacherConfig` can be set in the YAML file or overridden
on the command line (values are read as YAML: `--loss_weights '{contrastive: 1}'`,
`--freeze_patterns '[text_model.*]'`).
"""

import sys

from modeling_dclip.commands.train_stage import train_stage


def main(argv: list[str] | None = None) -> int:
    train_stage("train_teacher", argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
