"""Distil a run's finished members into one student, then evaluate it beside them.

python launch/distill.py runs/tiny
accelerate launch --config_file configs/accelerate/cpu.yaml launch/distill.py runs/tiny
torchrun --nproc_per_node 2 launch/distill.py runs/tiny distill.mode=member ...
"""

from ensemble.cli.distill import distill_entry

if __name__ == "__main__":
    distill_entry()
