"""pretrain: DeepSpeed ZeRO pretraining of causal (Llama-style) and masked (BERT-style) language models."""
