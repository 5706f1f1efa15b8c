"""Reproducibility harness for normalizing-flow anomaly detection.

Data flows one way: dataset card -> fetch -> MVTec-layout folder -> reader -> frozen backbone
features -> flow (a method) -> per-scale log-likelihood maps -> scoring -> metrics -> run record.
"""

__version__ = "0.1.0"
