"""lm-evaluation-harness task YAMLs that loopfit ships for its offline data (pass this folder as --include_path)."""
