"""A griffe extension for the API reference: docstring doctests render as code.

bnjax's docstrings carry doctests (tests/test_examples.py runs them) under ``Example:``
headings, which Google style reads as an admonition of Markdown prose, and sometimes between
paragraphs. As prose, a doctest's output such as ``[0.0, 1.0]`` reads as a Markdown link. This
extension fences each run of doctest lines (``>>>`` to the next blank or dedented line) as a
``pycon`` code block before the docstring is parsed; the source docstrings stay as they are.
"""

import griffe


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def fence_doctests(text: str) -> str:
    """`text` with every run of doctest lines wrapped in a fenced ``pycon`` block."""
    lines, out, i = text.splitlines(), [], 0
    while i < len(lines):
        line = lines[i]
        if not line.lstrip().startswith(">>>"):
            out.append(line)
            i += 1
            continue
        indent = _indent(line)
        end = i + 1
        while end < len(lines) and lines[end].strip() and _indent(lines[end]) >= indent:
            end += 1
        pad = " " * indent
        if out and out[-1].strip():
            out.append("")
        out += [f"{pad}```pycon", *lines[i:end], f"{pad}```", ""]
        i = end
    return "\n".join(out)


class DoctestExamples(griffe.Extension):
    """Fences the doctests of every docstring before it is parsed."""

    def on_instance(self, *, obj: griffe.Object, **kwargs) -> None:
        if obj.docstring is not None and ">>>" in obj.docstring.value:
            obj.docstring.value = fence_doctests(obj.docstring.value)
