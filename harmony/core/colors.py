"""Colour names for the config (e.g. `data.alpha_background`), parsed without any imaging library."""

from __future__ import annotations

WHITE = (255, 255, 255)


def parse_background(value: str) -> tuple[int, int, int]:
    """'white', 'black', 'gray', '#rrggbb' or 'r,g,b' -> an RGB triple; ValueError otherwise."""
    named = {"white": WHITE, "black": (0, 0, 0), "gray": (128, 128, 128), "grey": (128, 128, 128)}
    text = value.strip().lower()
    if text in named:
        return named[text]
    if text.startswith("#") and len(text) == 7:
        try:
            return int(text[1:3], 16), int(text[3:5], 16), int(text[5:7], 16)
        except ValueError:
            pass
    parts = text.split(",")
    if len(parts) == 3 and all(p.strip().isdigit() and 0 <= int(p) <= 255 for p in parts):
        r, g, b = (int(p) for p in parts)
        return r, g, b
    raise ValueError(f"{value!r} is not a colour: use white, black, gray, #rrggbb or r,g,b (0-255)")
