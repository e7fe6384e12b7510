"""The pretraining corpus's committed data: many small molecules labelled at four levels of theory.

The files are under ``extxyz/`` (provenance in ``PROVENANCE.md``); stores.py makes stores of them and levels.py
defines the levels. The generator that made them is polyfid.datasets.corpus.
"""
from pathlib import Path

DATA_DIR = Path(__file__).resolve().parent  # molecules.csv, extxyz/, labels/, structures/, the *.md files
