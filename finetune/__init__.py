"""Fine-tuning: restore pretraining checkpoints and train task heads (see finetune/run.py)."""
