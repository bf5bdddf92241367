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


_NUMBER = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:e[-+]?\d+)?"


def _expected(comment):
    """What a `print(...)  # comment` line claims to print: a number (`# 0.5`,
    `# 0.5, up to rounding`, `# 0.01 * 64 * 0.01 = 0.0064`), a literal
    (`# (0,)`, `# ['a', 'b']`, `# True: ...`), or None for prose."""
    c = comment.strip()
    m = re.fullmatch(rf".* = ({_NUMBER})", c) or re.match(rf"({_NUMBER})(?:,|$| )", c)
    if m:
        return ("number", float(m.group(1)))
    m = re.match(r"(True|False)\b", c)
    if m:
        return ("text", m.group(1))
    if c[:1] in "[(":
        depth = 0
        for i, ch in enumerate(c):   # the bracketed literal, without the words after it
            depth += (ch in "[(") - (ch in "])")
            if depth == 0:
                return ("text", c[:i + 1] + c[i + 1:].split(":")[0].rstrip())
    if c[:1] == "'":
        return ("text", c)
    return None


def _check_printed(name, lineno, claimed, printed):
    kind, value = claimed
    where = f"{name}: the example's print at block line {lineno} claims {value!r}, printed {printed!r}"
    if kind == "number":
        assert float(printed) == pytest.approx(value, rel=1e-5, abs=1e-7), where
    else:
        assert re.sub(r"\s+", "", printed) == re.sub(r"\s+", "", value), where   # any spacing


@pytest.mark.parametrize("name", ["api.md", "guide.md", "diagnostics.md"])
def test_doc_examples_run(name):
    """Every block runs, and a `print(...)  # value` prints that value."""
    blocks = _blocks(name)
    assert blocks, f"{name} has no python example"
    namespace = {}
    checked = 0
    for block in blocks:
        lines = block.splitlines()
        claims = {}
        for i, line in enumerate(lines):
            m = re.match(r"print\((.*)\)\s+#(.*)$", line)
            if m and _expected(m.group(2)) is not None:
                claims[i + 1] = _expected(m.group(2))
                lines[i] = f"__printed__({i + 1}, {m.group(1)})"
        outputs = {}

        def printed(lineno, *values, _outputs=outputs):
            text = " ".join(str(v) for v in values)
            print(text)
            _outputs.setdefault(lineno, text)

        namespace["__printed__"] = printed
        with contextlib.redirect_stdout(io.StringIO()):
            exec(compile("\n".join(lines) + "\n", name, "exec"), namespace)
        for lineno, claimed in claims.items():
            assert lineno in outputs, f"{name}: the print at block line {lineno} never ran"
            _check_printed(name, lineno, claimed, outputs[lineno])
            checked += 1
    if name == "api.md":
        assert checked >= 8, checked


def test_every_public_name_is_in_the_api_reference():
    api = open(os.path.join(DOCS, "api.md")).read() + open(os.path.join(DOCS, "diagnostics.md")).read()
    public = [n for n in dir(keras_spft)
              if not n.startswith("_") and not inspect.ismodule(getattr(keras_spft, n))]
    assert sorted(public) == sorted(keras_spft.__all__)
    assert "wrap_pretrained" in public and "learned_radii" in public
    for name in public:
        assert f"keras_spft.{name}" in api, name


def _modules():
    import importlib
    import pkgutil

    return [importlib.import_module(f"keras_spft.{i.name}") for i in pkgutil.iter_modules(keras_spft.__path__)]


def test_every_module_lists_its_public_names_and_documents_them():
    """Each module's `__all__` names are documented in docs/, and each has a
    docstring with the sections of keras' own: Args (when it takes any),
    Returns (functions), Example; a result dataclass, its Attributes."""
    import dataclasses

    docs = "".join(open(os.path.join(DOCS, f)).read() for f in os.listdir(DOCS) if f.endswith(".md"))
    for module in _modules():
        assert hasattr(module, "__all__"), f"{module.__name__} has no __all__"
        for name in module.__all__:
            obj = getattr(module, name)
            assert re.search(rf"\b{re.escape(name)}\b", docs), f"{module.__name__}.{name} is in no doc"
            if not callable(obj) or (inspect.isclass(obj) and issubclass(obj, Exception)):
                continue
            doc = inspect.getdoc(obj) or ""
            where = f"{module.__name__}.{name}"
            if dataclasses.is_dataclass(obj):
                assert "Attributes:" in doc, where
                continue
            params = [p for p in inspect.signature(obj).parameters if p != "self"]
            assert "Example" in doc, f"{where}: no Example"
            if params:
                assert "Args:" in doc, f"{where}: no Args"
            if inspect.isfunction(obj):
                assert "Returns:" in doc, f"{where}: no Returns"


def test_docstring_examples_run_and_print_what_they_show():
    import doctest
    import importlib
    import pkgutil

    ran = 0
    for info in pkgutil.iter_modules(keras_spft.__path__):
        module = importlib.import_module(f"keras_spft.{info.name}")
        result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE,
                                 extraglobs={"keras": __import__("keras"), "np": __import__("numpy")})
        assert result.failed == 0, f"keras_spft.{info.name}: {result.failed} docstring example(s) failed"
        ran += result.attempted
    assert ran >= 8, ran
