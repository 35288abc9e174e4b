"""Privacy of client updates: differential privacy and secure aggregation (``privacy:`` section)."""
