"""x2edit core: the maths and file formats of the x2edit pack, importable without ComfyUI."""

__version__ = "0.1.0"
