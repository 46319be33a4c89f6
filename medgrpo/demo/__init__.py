"""``medgrpo demo``: the whole pipeline on CPU on a built-in synthetic dataset.

:mod:`medgrpo.demo.synthetic` renders the dataset (MedVidBench format, answers known).
"""

from medgrpo.demo.synthetic import (
    DemoDataset,
    LabelStats,
    answer_stats,
    dataset_fingerprint,
    decode_options,
    demo_tokenizer_corpus,
    generate_dataset,
    majority_baseline,
)

__all__ = [
    "DemoDataset",
    "LabelStats",
    "answer_stats",
    "dataset_fingerprint",
    "decode_options",
    "demo_tokenizer_corpus",
    "generate_dataset",
    "majority_baseline",
]
