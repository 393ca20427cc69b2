"""Evaluate members and their ensemble on a run's test split or on other data.

python launch/evaluate.py runs/tiny
python launch/evaluate.py runs/tiny --data ../shared/data/sherlock_holmes.txt
"""

from ensemble.cli.evaluate import evaluate_entry

if __name__ == "__main__":
    evaluate_entry()
