"""docs/workflow.md's python examples run as written; the CLI options it lists exist."""

import contextlib
import io
import os
import re

from keras_spft import cli
from tests.workflow.conftest import REPO


def test_workflow_doc_examples_run():
    text = open(os.path.join(REPO, "docs", "workflow.md")).read()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert len(blocks) >= 4
    namespace, out = {}, io.StringIO()
    with contextlib.redirect_stdout(out):
        for block in blocks:
            exec(compile(block, "workflow.md", "exec"), namespace)
    printed = out.getvalue()
    assert "3 classes" in printed and "('train', 'val') test 18" in printed
    assert "['head_strength', 'strength']" in printed


def test_documented_options_exist():
    text = open(os.path.join(REPO, "docs", "workflow.md")).read()
    documented = set(re.findall(r"`(--[a-z-]+)`", text))
    parser = cli.build_parser()
    sub = parser._subparsers._group_actions[0].choices
    known = {opt for p in sub.values() for a in p._actions for opt in a.option_strings}
    assert documented and documented <= known, documented - known
    required = {"--data", "--model", "--weights", "--alpha", "--image-size", "--method", "--radius",
                "--head-radius", "--epochs", "--batch-size", "--lr", "--seeds", "--out"}
    assert required <= documented
