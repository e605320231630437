"""data_pipeline: raw corpora → SentencePiece tokenizer → checksummed token shards → resumable loader."""
