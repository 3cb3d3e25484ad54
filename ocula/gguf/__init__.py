from ocula.gguf.reader import GGUFFile, GGUFTensor

__all__ = ["GGUFFile", "GGUFTensor"]
