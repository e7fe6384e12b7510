"""The corpus generator: sample (RDKit, GFN2-xTB MD), label (levels in data_shards/corpus/levels.py), check and
export the committed files of data_shards/corpus. `python -m polyfid.datasets.corpus.generate --help`.
"""
