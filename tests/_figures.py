"""What every figure of the experiments must be for a reader: a readable size (no panel strip
wider than about 2,000 px), a title, and panels that each plot something and say what (title
and both axis labels). `check_figure` takes a matplotlib Figure, `check_png` a written file."""

import re
import struct

MAX_WIDTH_PX = 2000
MIN_SIDE_PX = 300


def png_size(path):
    """(width, height) in pixels, read from the PNG header."""
    with open(path, "rb") as file:
        header = file.read(24)
    assert header[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG file"
    return struct.unpack(">II", header[16:24])


def check_png(path):
    width, height = png_size(path)
    assert MIN_SIDE_PX <= width <= MAX_WIDTH_PX and MIN_SIDE_PX <= height <= MAX_WIDTH_PX, (path, width, height)
    return width, height


def check_figure(figure, title_contains=()):
    """Asserts the figure's size, its title and that every panel (colorbars aside) has data, a
    title and both axis labels; returns the panels."""
    width, height = (figure.get_size_inches() * figure.dpi).round()
    assert MIN_SIDE_PX <= width <= MAX_WIDTH_PX and MIN_SIDE_PX <= height <= MAX_WIDTH_PX, (width, height)
    title = figure.get_suptitle()
    assert title, "the figure has no title"
    for text in title_contains:
        assert text in title, (text, title)
    panels = [ax for ax in figure.axes if ax.get_label() != "<colorbar>"]
    assert panels
    for ax in panels:
        assert ax.lines or ax.collections or ax.images or ax.patches, f"empty panel {ax.get_title()!r}"
        assert ax.get_title() and ax.get_xlabel() and ax.get_ylabel(), (
            ax.get_title(),
            ax.get_xlabel(),
            ax.get_ylabel(),
        )
        legend = ax.get_legend()
        labels = [text.get_text() for text in legend.get_texts()] if legend is not None else []
        assert not any(re.search(r"(?<![\d.])1 seeds", label) for label in labels), labels  # plurals right
    return panels
