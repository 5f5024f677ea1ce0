"""The "A custom pipeline" example of docs/python-api.md, executed as written on a tiny llama."""

from __future__ import annotations

import json
import re
from pathlib import Path


API_DOC = Path(__file__).resolve().parents[1] / "docs" / "python-api.md"


def api_example() -> str:
    """The Python code between the ``python-api-example`` markers of docs/python-api.md."""
    text = API_DOC.read_text()
    block = re.search(r"<!-- python-api-example -->\s*```python\n(.*?)```\s*<!-- /python-api-example -->", text, re.S)
    assert block, "docs/python-api.md lost its python-api-example block"
    return block[1]


def test_python_api_example_runs(tmp_path, tiny_model_dir, text_corpus, capsys):
    model_dir = tiny_model_dir("llama", num_hidden_layers=3)
    settings = {"MODEL": repr(str(model_dir)), "CORPUS": repr(str(text_corpus)), "HELD_OUT": repr(str(text_corpus)),
                "SEQ_LEN": "16", "TOKENS": "128", "EVAL_TOKENS": "32",
                "TARGET": repr({"hidden_size": 24, "num_attention_heads": 4, "intermediate_size": 48}),
                "OUTPUT": repr(str(tmp_path / "custom"))}
    code = api_example()
    for name, value in settings.items():
        code, n = re.subn(rf"^{name} = .*$", f"{name} = {value}", code, flags=re.M)
        assert n == 1, f"docs/python-api.md example has no {name} = ... line"
    namespace: dict = {}
    exec(compile(code, str(API_DOC), "exec"), namespace)

    model, scores = namespace["model"], namespace["scores"]
    # the custom FFN importance decided which neurons were kept: the top-48 weight-magnitude neurons
    for i, kept in enumerate(namespace["plan"].neurons):
        assert list(kept) == sorted(scores.neurons[i].argsort(descending=True)[:48].tolist())
    assert model.config.intermediate_size == 48 and model.config.hidden_size == 24
    out = tmp_path / "custom"
    record = json.loads((out / "minicompress.json").read_text())
    assert record["recovery"]["tokens_trained"] == 128
    report = namespace["report"]
    assert report["after"]["perplexity"] > 1 and report["steps"] == 2
    printed = capsys.readouterr().out
    assert "parameters" in printed and "kl_to_teacher" in printed
    assert (out / "README.md").read_text().startswith("---\n")
