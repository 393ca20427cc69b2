"""Train the members of an ensemble, then evaluate it.

accelerate launch launch/train.py --config configs/tiny.yaml [section.key=value ...]
python launch/train.py --config configs/tiny.yaml          # one plain process
python launch/train.py --help                              # every config key
"""

import sys

from ensemble.cli import train_main

if __name__ == "__main__":
    sys.exit(train_main())
