"""The table (commands.yaml): its model, its loader and key expressions."""
