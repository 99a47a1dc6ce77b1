"""Coverage-guided fuzzing of the gateway's parsers with atheris (libFuzzer for Python).

``python -m fuzz --list``, ``python -m fuzz TARGET --seconds N`` and ``python -m fuzz all
--seconds N --jobs 2``; the targets and what each checks are in ``fuzz/targets.py``, the seed
corpora in ``fuzz/corpus/<target>/``, saved crash inputs in ``tests/fuzz_cases/<target>/``.
"""
