"""The pretraining corpus: many small molecules labelled at four levels of theory, and its generator.

See ``README.md`` here; the committed files are under ``extxyz/``, their provenance in ``PROVENANCE.md``.
"""
