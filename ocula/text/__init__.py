"""Text: tokenizers (byte-level BPE, SentencePiece) and chat templates from GGUF metadata."""
