"""Processes, devices and the training loop shared by training and distillation: the launcher and
distributed worlds, the placement of members on ranks, precision and compilation, DeepSpeed
ZeRO, checkpoints, fault injection, throughput, trackers, and the evaluator's sharding."""
