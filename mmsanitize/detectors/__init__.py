"""Detectors: each maps embeddings (+ a nearest-neighbour index) to one score per sample.

Higher = more suspicious. Modules never import each other, the CLI or Dask; an index is any
object with `knn(queries, k) -> (sims, ids)` and `range_search(queries, r) -> (lims, sims, ids)`.
"""
