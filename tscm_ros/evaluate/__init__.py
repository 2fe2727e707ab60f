"""Evaluation: how well places are recognised and loops closed, and the reports about it.

- ``loop_metrics``: precision-recall, average precision, maximum recall at 100 % precision.
- ``recall``: recall@N of descriptors against ground truth.
- ``loop_evaluation``: the methods run over the queries of a traversal or revisit set (``MethodRun``).
- ``methods``: which methods a run compares (baselines, given models, the node's stages) and running them.
- ``reporting``: Markdown, JSON, CSV and plots; ``match_figure``: the figure of wrong loop closures.

Imports ``detect``, ``map``, ``describe``, ``io`` and the package floor.
"""
