from finetune.cli import cli

cli()
