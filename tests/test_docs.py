"""The documentation's examples run as written, and every public name is documented."""

import contextlib
import inspect
import io
import os
import re

import pytest

import keras_spft

DOCS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs")


def _blocks(name):
    text = open(os.path.join(DOCS, name)).read()
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


@pytest.mark.parametrize("name", ["api.md", "guide.md", "diagnostics.md"])
def test_doc_examples_run(name):
    blocks = _blocks(name)
    assert blocks, f"{name} has no python example"
    namespace = {}
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        for block in blocks:
            exec(compile(block, name, "exec"), namespace)


def test_every_public_name_is_in_the_api_reference():
    api = open(os.path.join(DOCS, "api.md")).read()
    public = [n for n in dir(keras_spft)
              if not n.startswith("_") and not inspect.ismodule(getattr(keras_spft, n))]
    assert "wrap_pretrained" in public and "learned_radii" in public
    for name in public:
        assert f"keras_spft.{name}" in api, name
