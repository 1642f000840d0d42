"""Lightning task pipelines on VGGBackbone: ``python -m tasks.detect|segment|reid``."""
