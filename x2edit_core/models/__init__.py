"""Local model loading (transformers folders); each module imports its heavy dependencies lazily."""
