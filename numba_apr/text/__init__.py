"""The text side: tokenizers (BPE, SentencePiece) exact to llama.cpp's, and chat templates."""
