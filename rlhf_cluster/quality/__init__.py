"""Data-quality checks run before training (``rlhf-cluster data report``).

Pure Python, no Ray and no GPU. Import submodules explicitly (``rlhf_cluster.quality.data_report``).
"""
