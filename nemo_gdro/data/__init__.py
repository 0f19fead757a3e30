"""Prompt datasets with stable ids, tokenizers, data files and benchmarks.

* ``dataset.py``: ``PromptDataset`` / ``PromptRecord`` (dense ids ``0..N-1``, text bounds);
  the arithmetic task's datasets.
* ``tokenizer_base.py``: the ``Tokenizer`` contract, ``check_model_vocab``;
  ``tokenizer.py``: ``CharTokenizer``; ``hf_tokenizer.py``: ``HFTokenizer`` (offline, a checkpoint dir).
* ``prompt_format.py``: ``PromptFormat`` (``raw`` | ``chat_template``, instruction ``none`` | ``dapo``).
* ``files.py``: rows out of JSONL / Parquet / CSV by layout; ``prompt_files.py``:
  ``load_prompt_files`` (dedup, English filter, uids, token limit, ``LoadReport``);
  ``text.py``: normalisation and uids; ``fingerprint.py``: ``DatasetFingerprint`` for checkpoints.
* ``benchmarks.py``: ``BENCHMARKS`` and ``load_benchmark`` (AIME24/25, AMC23, MATH500,
  Minerva, OlympiadBench, GPQA-Diamond).
"""
