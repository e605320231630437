"""The demo (``make demo`` = ``python -m demo``): every stage end to end on the embedded default corpus.

It sits on top of the layers (it drives data_pipeline, pretrain and finetune as subprocesses and reads
their outputs), so it lives outside the ``lmforge`` foundation package. See :mod:`demo.run`.
"""
