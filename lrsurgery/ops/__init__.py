"""What users do with adapters after training: merge (in memory or streaming), extract, stack, combine, convert."""
