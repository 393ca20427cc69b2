"""Continue prompts with a trained ensemble, streamed, optionally marking the members' disagreement.

python launch/generate.py runs/tiny --prompt "The list type"
python launch/generate.py runs/tiny --prompt "x = " --sample --top-p 0.9 --show-uncertainty
"""

from ensemble.cli.generate import generate_entry

if __name__ == "__main__":
    generate_entry()
