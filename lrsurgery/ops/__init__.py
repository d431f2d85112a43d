"""What users do with adapters after training: merge, extract (and later stack, combine, convert)."""
