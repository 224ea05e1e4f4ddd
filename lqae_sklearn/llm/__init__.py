"""Large-language-model backends for LLMFewShotClassifier."""
