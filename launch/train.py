"""Train the members of an ensemble, then evaluate it.

accelerate launch launch/train.py --config configs/tiny.yaml [section.key=value ...]
python launch/train.py --config configs/tiny.yaml          # one plain process
python launch/train.py --help                              # every config key
"""

from ensemble.cli.train import train_entry

if __name__ == "__main__":
    train_entry()
