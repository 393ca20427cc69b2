"""Write adapter members merged into full Hugging Face models.

python launch/merge.py runs/lora
python launch/merge.py --members runs/lora/members/member-0 --output merged/
"""

from ensemble.cli.merge import merge_entry

if __name__ == "__main__":
    merge_entry()
