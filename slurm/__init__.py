"""A local SLURM cluster for tests and trials (local_cluster.sh) and a `sacct` stand-in for it (sacct)."""
