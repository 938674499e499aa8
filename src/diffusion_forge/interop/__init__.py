"""diffusers compatibility at the edges."""
