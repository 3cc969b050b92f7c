"""`x2edit-run`: run a ComfyUI workflow from the command line (UI -> API conversion, HTTP client)."""
