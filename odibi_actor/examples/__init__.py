"""Example pipelines that show odibi-actor on real data; run one with ``odibi run``."""
