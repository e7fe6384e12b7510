"""Dataset-building tools, apart from the runtime data layer: the corpus generator (RDKit geometries, GFN2-xTB
MD, PySCF/tblite labels) and the demo-data maker. Their outputs are committed under data_shards/corpus and
data_shards/demo, where stores, `pretrained:` and the demo find them; no training or reading path imports this.
"""
