"""A griffe extension for the API reference: Keras-style doctest examples rendered as code.

The library's docstrings follow Keras' `layers/core/dense.py`: an "Example:" line, then doctest
lines at the docstring's own indentation. Google-style parsing expects an indented "Examples:"
section, so without this the doctest lines would be read as Markdown (a blockquote, and an output
such as ``[(5, 1), (1, 1)]`` as a link reference). Each unindented run of doctest lines, with the
output lines that follow them, becomes a ``pycon`` code block.
"""

import griffe


def fence_doctests(text):
    """`text` with each unindented run of `>>>` lines and their output fenced as ```pycon."""
    lines, out, inside = text.splitlines(), [], False
    for line in lines:
        starts = line.startswith(">>>")
        if starts and not inside:
            out.append("```pycon")
            inside = True
        elif inside and (not line.strip() or (line[:1].isspace() and not line.startswith("..."))):
            out.append("```")
            inside = False
        out.append(line)
    if inside:
        out.append("```")
    return "\n".join(out)


class KerasExampleSections(griffe.Extension):
    def on_instance(self, *, obj, **kwargs):
        if obj.docstring is not None and ">>>" in obj.docstring.value:
            obj.docstring.value = fence_doctests(obj.docstring.value)
