"""Running lmforge's stages on SLURM: ``slurm.submit`` (submitit), ``slurm.status``, the sbatch templates
(pretrain.sbatch, finetune.sbatch → torchrun_job.sh), ``slurm.launch`` (what runs inside a job), and a local
test cluster (local_cluster.sh) with a ``sacct`` stand-in for it (sacct). No training logic lives here."""
