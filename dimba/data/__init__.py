"""Data: sentencepiece tokenizer, WebDataset token shards, and the exactly-resumable streaming loader.

Modules (imports go down this list):
  loader.py    TokenLoader: packed (tokens, clean) batches per rank, state_dict/load_state_dict
  plan.py      the arithmetic of an epoch: shard order, per-lane token ranges (a lane per micro-batch of a
               global step, whatever the number of ranks), shuffle blocks
  masks.py     draw_clean_mask: which positions are clean (given) for conditional training
  prepare.py   own text in one command (data_prep/prepare.py): train_tokenizer, then the sharding job
  sharding.py  the parallel, resumable sharding job behind data_prep/shard.py
  documents.py reading documents from text / JSONL (+ .gz) inputs, counting bad input
  shards.py    ShardWriter, manifest.json, reading and checking one shard
  tokenizer.py the special ids (the one place they are defined), Tokenizer, train_tokenizer
  errors.py    DataError, CorruptShardError
"""
