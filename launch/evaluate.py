"""Evaluate members and their ensemble on a run's test split or on other data.

python launch/evaluate.py runs/tiny
python launch/evaluate.py runs/tiny --data ../shared/data/sherlock_holmes.txt
"""

import sys

from ensemble.cli import evaluate_main

if __name__ == "__main__":
    sys.exit(evaluate_main())
