from pretrain.cli import cli

cli()
