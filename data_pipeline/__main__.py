from data_pipeline.cli import cli

cli()
