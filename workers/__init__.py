"""Worker runtime: many virtual clients over one shared frozen base model."""
